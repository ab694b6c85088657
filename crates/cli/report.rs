//! Leaderboards: per-run records, aggregates over seeds, and the JSON, Markdown, CSV and
//! self-contained HTML renderings of `vdg bench`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Version of the `leaderboard.json` layout (documented in REPORTS.md).
pub const LEADERBOARD_SCHEMA_VERSION: u32 = 1;

/// The paper's published numbers, compiled in (manifests/paper_results.toml).
pub const PAPER_RESULTS: &str = include_str!("../../manifests/paper_results.toml");

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Benchmark.
    pub benchmark: String,
    /// Direction (`source->target`).
    pub direction: String,
    /// Model.
    pub model: String,
    /// ADA variant.
    pub ada: String,
    /// Seed.
    pub seed: u64,
    /// Top-1 (%) over all target clips of the direction.
    pub top1: f64,
    /// Top-1 (%) per target domain.
    pub targets: BTreeMap<String, f64>,
    /// Per-class top-1 (%) over all target clips (`null` for classes without clips).
    pub per_class: Vec<Option<f64>>,
    /// Confusion matrix over all target clips, `[true][predicted]`.
    pub confusion: Vec<Vec<u32>>,
    /// Epochs trained.
    pub epochs: usize,
    /// Wall time of the training run in seconds.
    pub wall_secs: f64,
    /// The run folder, relative to the bench output folder.
    pub run_dir: String,
}

/// Mean and standard deviation over seeds of one (benchmark, direction, model, ada).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Benchmark.
    pub benchmark: String,
    /// Direction.
    pub direction: String,
    /// Model.
    pub model: String,
    /// ADA variant.
    pub ada: String,
    /// Seeds aggregated.
    pub seeds: usize,
    /// Mean top-1 (%).
    pub mean: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
}

/// `leaderboard.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    /// [`LEADERBOARD_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Tool version.
    pub tool_version: String,
    /// Git revision of the tool.
    pub git_revision: String,
    /// Data fingerprint per benchmark.
    pub data_fingerprints: BTreeMap<String, String>,
    /// The resolved bench configuration.
    pub config: serde_json::Value,
    /// Class names per benchmark.
    pub classes: BTreeMap<String, Vec<String>>,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Mean and std over seeds.
    pub aggregates: Vec<Aggregate>,
}

/// Aggregates runs over seeds, in a stable order.
pub fn aggregate(runs: &[RunResult]) -> Vec<Aggregate> {
    let mut groups: BTreeMap<(String, String, String, String), Vec<f64>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((
                r.benchmark.clone(),
                r.direction.clone(),
                r.model.clone(),
                r.ada.clone(),
            ))
            .or_default()
            .push(r.top1);
    }
    groups
        .into_iter()
        .map(|((benchmark, direction, model, ada), v)| {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let std = if v.len() > 1 {
                (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
            } else {
                0.0
            };
            Aggregate {
                benchmark,
                direction,
                model,
                ada,
                seeds: v.len(),
                mean,
                std,
            }
        })
        .collect()
}

fn display_model(m: &str) -> String {
    match m {
        "tsn" => "TSN".into(),
        "trn" => "TRN".into(),
        "trn_attn" => "TRN-ATTN".into(),
        "non_local" => "Non-local".into(),
        "apn" => "APN".into(),
        other => other.to_uppercase(),
    }
}

fn paper_key(m: &str) -> &str {
    match m {
        "tsn" => "TSN",
        "trn" => "TRN",
        "apn" => "APN",
        "tsm" => "TSM",
        "i3d" => "I3D",
        "non_local" => "NonLocal",
        other => other,
    }
}

fn arrow(without: f64, with: f64) -> &'static str {
    if with > without {
        "↑"
    } else if with < without {
        "↓"
    } else {
        "="
    }
}

/// The paper's numbers of one benchmark: its directions, and per model one
/// (without ADA, with ADA) pair per direction.
pub type PaperTable = (Vec<String>, BTreeMap<String, Vec<(f64, f64)>>);

/// Paper rows for `benchmark`.
pub fn paper_rows(benchmark: &str) -> Option<PaperTable> {
    let table: toml::Table = toml::from_str(PAPER_RESULTS).ok()?;
    let b = table.get(benchmark)?.as_table()?;
    let dirs: Vec<String> = b
        .get("directions")?
        .as_array()?
        .iter()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    let mut rows = BTreeMap::new();
    for (k, v) in b {
        if k == "directions" {
            continue;
        }
        let pairs: Option<Vec<(f64, f64)>> = v
            .as_array()?
            .iter()
            .map(|p| {
                let a = p.as_array()?;
                Some((a.first()?.as_float()?, a.get(1)?.as_float()?))
            })
            .collect();
        rows.insert(k.clone(), pairs?);
    }
    Some((dirs, rows))
}

/// The paper's layout: per benchmark, rows = models, columns = directions (and their
/// average), each cell "without / with ADA" as mean ± std over seeds with an up or down
/// arrow; the paper's published numbers as reference rows for real benchmarks.
pub fn render_markdown(lb: &Leaderboard) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Leaderboard\n");
    let _ = writeln!(
        out,
        "Top-1 accuracy (%) on the target domains, mean ± std over seeds; each cell is \
         *without ADA / with ADA* and the arrow says whether ADA helped.\n"
    );
    let benchmarks: Vec<String> = {
        let mut v: Vec<String> = lb.aggregates.iter().map(|a| a.benchmark.clone()).collect();
        v.dedup();
        v
    };
    for b in benchmarks {
        let aggs: Vec<&Aggregate> = lb.aggregates.iter().filter(|a| a.benchmark == b).collect();
        let mut dirs: Vec<String> = Vec::new();
        for r in lb.runs.iter().filter(|r| r.benchmark == b) {
            if !dirs.contains(&r.direction) {
                dirs.push(r.direction.clone());
            }
        }
        let mut models: Vec<String> = Vec::new();
        for r in lb.runs.iter().filter(|r| r.benchmark == b) {
            if !models.contains(&r.model) {
                models.push(r.model.clone());
            }
        }
        // The paper's row order: baselines first, APN last.
        let rank = |m: &str| {
            ["tsn", "trn", "trn_attn", "tsm", "i3d", "non_local", "apn"]
                .iter()
                .position(|x| *x == m)
                .unwrap_or(usize::MAX)
        };
        models.sort_by_key(|m| rank(m));
        let fingerprint = lb
            .data_fingerprints
            .get(&b)
            .map(|f| &f[..f.len().min(16)])
            .unwrap_or("");
        let _ = writeln!(out, "## {b}\n");
        if !fingerprint.is_empty() {
            let _ = writeln!(out, "Data fingerprint `{fingerprint}`.\n");
        }
        let _ = write!(out, "| Model |");
        for d in &dirs {
            let _ = write!(out, " {d} |");
        }
        let _ = writeln!(out, " Average |");
        let _ = writeln!(out, "|---|{}---|", "---|".repeat(dirs.len()));
        for m in &models {
            let find = |d: &str, with: bool| {
                aggs.iter()
                    .find(|a| a.direction == d && a.model == *m && (a.ada != "none") == with)
            };
            let ada_name = aggs
                .iter()
                .find(|a| a.model == *m && a.ada != "none")
                .map(|a| a.ada.clone());
            let label = match &ada_name {
                Some(v) => format!("{} (+{v})", display_model(m)),
                None => display_model(m),
            };
            let _ = write!(out, "| {label} |");
            let (mut sw, mut sa, mut n) = (0.0, 0.0, 0usize);
            let mut both = true;
            for d in &dirs {
                let (w, a) = (find(d, false), find(d, true));
                let cell = |x: Option<&&Aggregate>| {
                    x.map_or("—".to_string(), |x| {
                        format!("{:.2} ± {:.2}", x.mean, x.std)
                    })
                };
                match (w, a) {
                    (Some(w), Some(a)) => {
                        let _ = write!(
                            out,
                            " {} / {} {} |",
                            cell(Some(w)),
                            cell(Some(a)),
                            arrow(w.mean, a.mean)
                        );
                        sw += w.mean;
                        sa += a.mean;
                        n += 1;
                    }
                    _ => {
                        both = false;
                        let _ = write!(out, " {} / {} |", cell(w), cell(a));
                    }
                }
            }
            if both && n > 0 {
                let (w, a) = (sw / n as f64, sa / n as f64);
                let _ = writeln!(out, " {w:.2} / {a:.2} {} |", arrow(w, a));
            } else {
                let _ = writeln!(out, " — |");
            }
        }
        if let Some((pdirs, rows)) = paper_rows(&b) {
            for m in &models {
                let Some(pairs) = rows.get(paper_key(m)) else {
                    continue;
                };
                let _ = write!(out, "| {} (paper) |", display_model(m));
                let (mut sw, mut sa) = (0.0, 0.0);
                for d in &dirs {
                    match pdirs.iter().position(|p| p == d).and_then(|i| pairs.get(i)) {
                        Some((w, a)) => {
                            let _ = write!(out, " {w:.2} / {a:.2} {} |", arrow(*w, *a));
                            sw += w;
                            sa += a;
                        }
                        None => {
                            let _ = write!(out, " — |");
                        }
                    }
                }
                let n = dirs.len().max(1) as f64;
                let _ = writeln!(out, " {:.2} / {:.2} {} |", sw / n, sa / n, arrow(sw, sa));
            }
        }
        let _ = writeln!(out);
    }
    out
}

/// One CSV row per run.
pub fn render_csv(lb: &Leaderboard) -> String {
    let mut out =
        String::from("benchmark,direction,model,ada,seed,top1,epochs,wall_secs,run_dir\n");
    for r in &lb.runs {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.4},{},{:.1},{}",
            r.benchmark,
            r.direction,
            r.model,
            r.ada,
            r.seed,
            r.top1,
            r.epochs,
            r.wall_secs,
            r.run_dir
        );
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page (no network fetch): the tables, one bar chart per direction
/// (mean with ± std error bars per model and ADA setting), and the confusion matrix of the
/// best run.
pub fn render_html(lb: &Leaderboard) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>videodg leaderboard</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}\
         td:first-child{{text-align:left}}</style></head><body><h1>videodg leaderboard</h1>\
         <p>tool {} ({}), schema {}</p>",
        esc(&lb.tool_version),
        esc(&lb.git_revision),
        lb.schema_version
    );
    let mut keys: Vec<(String, String)> = Vec::new();
    for a in &lb.aggregates {
        let k = (a.benchmark.clone(), a.direction.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (b, d) in &keys {
        let aggs: Vec<&Aggregate> = lb
            .aggregates
            .iter()
            .filter(|a| &a.benchmark == b && &a.direction == d)
            .collect();
        let _ = write!(
            out,
            "<h2>{} &mdash; {}</h2><table><tr><th>model</th><th>ADA</th><th>seeds</th><th>top-1 mean</th><th>std</th></tr>",
            esc(b),
            esc(d)
        );
        for a in &aggs {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                esc(&display_model(&a.model)),
                esc(&a.ada),
                a.seeds,
                a.mean,
                a.std
            );
        }
        let _ = write!(out, "</table>");
        // Bar chart.
        let (w, h, pad) = (60.0 * aggs.len() as f64 + 60.0, 240.0, 30.0);
        let _ = write!(
            out,
            "<svg width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"top-1 per model\">",
            h + 60.0
        );
        let _ = write!(
            out,
            "<line x1=\"{pad}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#333\"/>"
        );
        for (i, a) in aggs.iter().enumerate() {
            let x = pad + 10.0 + 60.0 * i as f64;
            let bh = a.mean / 100.0 * (h - 20.0);
            let colour = if a.ada == "none" {
                "#7aa6d6"
            } else {
                "#e39b4f"
            };
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"{:.1}\" width=\"40\" height=\"{bh:.1}\" fill=\"{colour}\"><title>{} {}: {:.2} ± {:.2}</title></rect>",
                h - bh,
                esc(&a.model),
                esc(&a.ada),
                a.mean,
                a.std
            );
            let (lo, hi) = (
                (a.mean - a.std).max(0.0) / 100.0 * (h - 20.0),
                (a.mean + a.std).min(100.0) / 100.0 * (h - 20.0),
            );
            let _ = write!(
                out,
                "<line x1=\"{0}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"#000\"/>",
                x + 20.0,
                h - lo,
                h - hi
            );
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
                x + 20.0,
                h + 14.0,
                esc(&display_model(&a.model))
            );
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                x + 20.0,
                h + 26.0,
                esc(&a.ada)
            );
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{:.1}</text>",
                x + 20.0,
                h - bh - 4.0,
                a.mean
            );
        }
        let _ = write!(out, "</svg>");
        // Confusion matrix of the best run of this direction.
        if let Some(best) = lb
            .runs
            .iter()
            .filter(|r| &r.benchmark == b && &r.direction == d)
            .max_by(|x, y| x.top1.total_cmp(&y.top1))
        {
            let classes = lb.classes.get(b).cloned().unwrap_or_default();
            let n = best.confusion.len();
            let cell = 22.0;
            let max = best
                .confusion
                .iter()
                .flatten()
                .copied()
                .max()
                .unwrap_or(1)
                .max(1);
            let _ = write!(
                out,
                "<p>Confusion matrix of the best run ({} {} seed {}, {:.2}%): rows true, columns predicted.</p>",
                esc(&best.model),
                esc(&best.ada),
                best.seed,
                best.top1
            );
            let size = 120.0 + cell * n as f64;
            let _ = write!(out, "<svg width=\"{size}\" height=\"{size}\">");
            for (i, row) in best.confusion.iter().enumerate() {
                let name = classes.get(i).map(String::as_str).unwrap_or("");
                let _ = write!(
                    out,
                    "<text x=\"115\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"end\">{}</text>",
                    14.0 + cell * i as f64,
                    esc(name)
                );
                for (j, &v) in row.iter().enumerate() {
                    let shade = 255 - (200 * v / max) as u8;
                    let _ = write!(
                        out,
                        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\"><title>{} -> {}: {v}</title></rect>",
                        120.0 + cell * j as f64,
                        cell * i as f64,
                        esc(name),
                        esc(classes.get(j).map(String::as_str).unwrap_or(""))
                    );
                }
            }
            let _ = write!(out, "</svg>");
        }
    }
    let _ = writeln!(
        out,
        "<h2>Markdown</h2><pre>{}</pre></body></html>",
        esc(&render_markdown(lb))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &str, model: &str, ada: &str, seed: u64, top1: f64) -> RunResult {
        RunResult {
            benchmark: "ucf_hmdb".into(),
            direction: dir.into(),
            model: model.into(),
            ada: ada.into(),
            seed,
            top1,
            targets: BTreeMap::new(),
            per_class: vec![Some(top1), None],
            confusion: vec![vec![3, 1], vec![0, 0]],
            epochs: 1,
            wall_secs: 1.5,
            run_dir: format!("runs/{seed}"),
        }
    }

    /// Snapshot of the Markdown layout (timings and paths do not appear in it).
    #[test]
    fn every_registered_model_has_a_display_name_and_a_paper_key() {
        for kind in vdg_trainer::models::ModelKind::ALL {
            let shown = display_model(kind.name());
            assert!(!shown.contains('_'), "{shown}");
            assert_ne!(paper_key(kind.name()), "", "{}", kind.name());
        }
        assert_eq!(display_model("non_local"), "Non-local");
        assert_eq!(paper_key("non_local"), "NonLocal");
    }

    #[test]
    fn markdown_layout_snapshot() {
        let runs = vec![
            run("ucf->hmdb", "tsn", "none", 0, 50.0),
            run("ucf->hmdb", "tsn", "none", 1, 52.0),
            run("ucf->hmdb", "tsn", "ada", 0, 49.0),
            run("ucf->hmdb", "tsn", "ada", 1, 49.0),
            run("hmdb->ucf", "tsn", "none", 0, 70.0),
            run("hmdb->ucf", "tsn", "ada", 0, 71.0),
            run("ucf->hmdb", "apn", "none", 0, 55.0),
        ];
        let lb = Leaderboard {
            schema_version: LEADERBOARD_SCHEMA_VERSION,
            tool_version: "0.1.0".into(),
            git_revision: "abc".into(),
            data_fingerprints: BTreeMap::from([(
                "ucf_hmdb".to_string(),
                "0123456789abcdef0123".to_string(),
            )]),
            config: serde_json::Value::Null,
            classes: BTreeMap::new(),
            aggregates: aggregate(&runs),
            runs,
        };
        let md = render_markdown(&lb);
        let expected = "\
# Leaderboard

Top-1 accuracy (%) on the target domains, mean ± std over seeds; each cell is *without ADA / with ADA* and the arrow says whether ADA helped.

## ucf_hmdb

Data fingerprint `0123456789abcdef`.

| Model | ucf->hmdb | hmdb->ucf | Average |
|---|---|---|---|
| TSN (+ada) | 51.00 ± 1.41 / 49.00 ± 0.00 ↓ | 70.00 ± 0.00 / 71.00 ± 0.00 ↑ | 60.50 / 60.00 ↓ |
| APN | 55.00 ± 0.00 / — | — / — | — |
| TSN (paper) | 51.68 / 51.61 ↓ | 68.80 / 68.50 ↓ | 60.24 / 60.05 ↓ |
| APN (paper) | 54.21 / 57.90 ↑ | 71.43 / 73.57 ↑ | 62.82 / 65.73 ↑ |

";
        assert_eq!(md, expected, "\n{md}");
        let csv = render_csv(&lb);
        assert!(csv.starts_with("benchmark,direction,model,ada,seed,top1,epochs,wall_secs,run_dir\nucf_hmdb,ucf->hmdb,tsn,none,0,50.0000,1,1.5,runs/0\n"), "{csv}");
        let html = render_html(&lb);
        assert!(
            html.contains("<svg")
                && !html.contains("http://")
                && !html.contains("https://")
                && !html.contains("<script src")
        );
    }
}
