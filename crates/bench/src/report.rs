//! Leaderboards: per-run records, aggregates over seeds, and the JSON, Markdown, CSV and
//! self-contained HTML renderings of `vdg bench`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Version of the `leaderboard.json` layout (documented in REPORTS.md).
pub const LEADERBOARD_SCHEMA_VERSION: u32 = 2;

/// The paper's published numbers, compiled in (manifests/paper_results.toml).
pub const PAPER_RESULTS: &str = include_str!("../../../manifests/paper_results.toml");

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
    /// Models combined into `top1` (gammas with ADA, `--ensemble-size` without).
    #[serde(default = "one")]
    pub members: usize,
    /// The members' own top-1 over all target clips, averaged over members.
    #[serde(default)]
    pub member_mean_top1: Option<f64>,
    /// What ADA did, in words.
    #[serde(default)]
    pub ada_method: String,
    /// Where the run departs from the paper's protocol.
    #[serde(default)]
    pub deviations: Vec<String>,
    /// In-domain accuracy: source-validation top-1 (%) of the selected epoch, averaged over
    /// the members (`None` when the source has no validation split).
    #[serde(default)]
    pub source_val_top1: Option<f64>,
    /// Chance level (%): 100 / classes.
    #[serde(default)]
    pub chance: f64,
}

fn one() -> usize {
    1
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
    /// Members per run (the largest over the seeds).
    #[serde(default = "one")]
    pub members: usize,
    /// Mean over seeds of the members' mean top-1 (runs with more than one member).
    #[serde(default)]
    pub member_mean: Option<f64>,
    /// Sample standard deviation over seeds of the members' mean.
    #[serde(default)]
    pub member_std: Option<f64>,
    /// Deviations from the paper's protocol of any of the runs.
    #[serde(default)]
    pub deviations: Vec<String>,
    /// Mean and std over seeds of the in-domain (source-validation) top-1.
    #[serde(default)]
    pub source_val: Option<(f64, f64)>,
    /// Mean and std over seeds of the DG gap: source-validation minus target top-1.
    #[serde(default)]
    pub gap: Option<(f64, f64)>,
    /// Chance level (%).
    #[serde(default)]
    pub chance: f64,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let std = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, std)
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
    /// Per benchmark, notes on models from the benchmark's manifest (`model_notes`: TSN's
    /// order-blind ceiling on the synthetic benchmark).
    #[serde(default)]
    pub model_notes: BTreeMap<String, BTreeMap<String, String>>,
}

/// Aggregates runs over seeds, in a stable order.
pub fn aggregate(runs: &[RunResult]) -> Vec<Aggregate> {
    let mut groups: BTreeMap<(String, String, String, String), Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((
                r.benchmark.clone(),
                r.direction.clone(),
                r.model.clone(),
                r.ada.clone(),
            ))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|((benchmark, direction, model, ada), v)| {
            let top: Vec<f64> = v.iter().map(|r| r.top1).collect();
            let (mean, std) = mean_std(&top);
            let members = v.iter().map(|r| r.members).max().unwrap_or(1);
            let mm: Vec<f64> = v.iter().filter_map(|r| r.member_mean_top1).collect();
            let (member_mean, member_std) = if members > 1 && mm.len() == v.len() {
                let (m, s) = mean_std(&mm);
                (Some(m), Some(s))
            } else {
                (None, None)
            };
            let sv: Vec<f64> = v.iter().filter_map(|r| r.source_val_top1).collect();
            let (source_val, gap) = if sv.len() == v.len() && !sv.is_empty() {
                let gaps: Vec<f64> = v
                    .iter()
                    .filter_map(|r| r.source_val_top1.map(|s| s - r.top1))
                    .collect();
                (Some(mean_std(&sv)), Some(mean_std(&gaps)))
            } else {
                (None, None)
            };
            let chance = v.first().map_or(0.0, |r| r.chance);
            let mut deviations: Vec<String> = Vec::new();
            for r in &v {
                for d in &r.deviations {
                    if !deviations.contains(d) {
                        deviations.push(d.clone());
                    }
                }
            }
            Aggregate {
                benchmark,
                direction,
                model,
                ada,
                seeds: v.len(),
                mean,
                std,
                members,
                member_mean,
                member_std,
                deviations,
                source_val,
                gap,
                chance,
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
        "trn_attn" => "TRN-ATTN",
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

/// One paper reference row: where it comes from and one (without, with) pair per
/// direction of the paper's table (`None` where the paper gives no number).
#[derive(Debug, Clone, PartialEq)]
pub struct PaperRef {
    /// Row label, e.g. `TRN + ADA* (paper, Table 2)`.
    pub label: String,
    /// Per direction (the paper's names): without ADA, with the variant.
    pub values: BTreeMap<String, (f64, Option<f64>)>,
}

fn table2_key(model: &str, ada: &str) -> Option<String> {
    let m = match model {
        "trn" => "TRN",
        "trn_attn" => "TRN-ATTN",
        "apn" => "APN",
        _ => return None,
    };
    Some(match (model, ada) {
        (_, "ada") => format!("{m}+ADA"),
        (_, "ada_star") => format!("{m}+ADA*"),
        ("apn", "global_only") => "APN+ADA(global R_I)".into(),
        ("apn", "level2_only") => "APN+ADA(R_II only)".into(),
        ("apn", "level3_only") => "APN+ADA(R_III only)".into(),
        _ => return None,
    })
}

/// The paper's row for `model` trained with `ada` (`none` for the model alone) on
/// `benchmark`: Table 2 and the §5.3 ablations where they have the variant (UCF-HMDB:
/// TRN, TRN-ATTN, APN), else the Table 1/3-5 pair when the variant is the one those tables
/// ran (APN: ADA*; every baseline: ADA). `None` when the paper has no such number.
pub fn paper_reference(benchmark: &str, model: &str, ada: &str) -> Option<PaperRef> {
    let table: toml::Table = toml::from_str(PAPER_RESULTS).ok()?;
    let b = table.get(benchmark)?.as_table()?;
    let dirs: Vec<String> = b
        .get("directions")?
        .as_array()?
        .iter()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    let pair = |v: &toml::Value| -> Option<Vec<f64>> {
        v.as_array()?.iter().map(toml::Value::as_float).collect()
    };
    let variant_name = match ada {
        "ada" => " + ADA",
        "ada_star" => " + ADA*",
        "global_only" => " + ADA (global R_I only)",
        "level2_only" => " + ADA (R_II only)",
        "level3_only" => " + ADA (R_III only)",
        _ => "",
    };
    let base = match model {
        "trn" => Some("TRN"),
        "trn_attn" => Some("TRN-ATTN"),
        "apn" => Some("APN"),
        _ => None,
    };
    if let (Some(t2), Some(base)) = (b.get("table2").and_then(|t| t.as_table()), base)
        && let Some(without) = t2.get(base).and_then(pair)
    {
        let with = if ada == "none" {
            Some(None)
        } else {
            table2_key(model, ada)
                .and_then(|k| t2.get(&k).and_then(pair))
                .map(Some)
        };
        if let Some(with) = with {
            let source = if ada.ends_with("_only") {
                "§5.3"
            } else {
                "Table 2"
            };
            return Some(PaperRef {
                label: format!("{}{variant_name} (paper, {source})", display_model(model)),
                values: dirs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| {
                        Some((
                            d.clone(),
                            (
                                *without.get(i)?,
                                with.as_ref().and_then(|w| w.get(i).copied()),
                            ),
                        ))
                    })
                    .collect(),
            });
        }
    }
    let table1_variant = if model == "apn" { "ada_star" } else { "ada" };
    if ada != "none" && ada != table1_variant {
        return None;
    }
    let rows = b.get(paper_key(model))?.as_array()?;
    let values = dirs
        .iter()
        .zip(rows)
        .filter_map(|(d, v)| {
            let p = pair(v)?;
            let with = if ada == "none" {
                None
            } else {
                Some(*p.get(1)?)
            };
            Some((d.clone(), (*p.first()?, with)))
        })
        .collect();
    Some(PaperRef {
        label: format!("{}{variant_name} (paper, Table 1)", display_model(model)),
        values,
    })
}

const ADA_ORDER: [&str; 6] = [
    "none",
    "ada",
    "ada_star",
    "global_only",
    "level2_only",
    "level3_only",
];

fn ada_rank(a: &str) -> usize {
    ADA_ORDER.iter().position(|x| *x == a).unwrap_or(usize::MAX)
}

/// The paper's layout: per benchmark, one row per model and ADA variant (every variant its
/// own row), columns = directions (and their average), each cell "without / with ADA" as
/// mean ± std over seeds with an up or down arrow; for ensembles a second row with the
/// members' own mean; rows that deviate from the paper's protocol marked †, with the
/// deviations listed; the paper's published rows for the variants that were run.
pub fn render_markdown(lb: &Leaderboard) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Leaderboard\n");
    let _ = writeln!(
        out,
        "Top-1 accuracy (%) on the target domains, mean ± std over seeds; each cell is \
         *without ADA / with ADA* and the arrow says whether the ADA run scored higher.\n"
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
        let mut deviations: Vec<String> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut shown: Vec<(String, String)> = Vec::new();
        let cell = |x: Option<&&Aggregate>, members: bool| {
            x.map_or("—".to_string(), |x| {
                match (members, x.member_mean, x.member_std) {
                    (true, Some(m), Some(s)) => format!("{m:.2} ± {s:.2}"),
                    _ => format!("{:.2} ± {:.2}", x.mean, x.std),
                }
            })
        };
        for m in &models {
            let find = |d: &str, ada: &str| {
                aggs.iter()
                    .find(|a| a.direction == d && a.model == *m && a.ada == ada)
            };
            let mut variants: Vec<String> = aggs
                .iter()
                .filter(|a| a.model == *m && a.ada != "none" && a.ada != "oracle")
                .map(|a| a.ada.clone())
                .collect();
            variants.sort_by_key(|v| ada_rank(v));
            variants.dedup();
            let rows: Vec<Option<String>> = if variants.is_empty() {
                vec![None]
            } else {
                variants.into_iter().map(Some).collect()
            };
            for v in rows {
                shown.push((m.clone(), v.clone().unwrap_or_else(|| "none".into())));
                let group: Vec<&&Aggregate> = aggs
                    .iter()
                    .filter(|a| a.model == *m && (a.ada == "none" || Some(&a.ada) == v.as_ref()))
                    .collect();
                let marked = group.iter().any(|a| !a.deviations.is_empty());
                for a in &group {
                    for d in &a.deviations {
                        if !deviations.contains(d) {
                            deviations.push(d.clone());
                        }
                    }
                }
                let mark = if marked { " †" } else { "" };
                let base = match &v {
                    Some(v) => format!("{} + {v}", display_model(m)),
                    None => display_model(m),
                };
                let members_of = |ada: &str| {
                    group
                        .iter()
                        .filter(|a| a.ada == ada)
                        .map(|a| a.members)
                        .max()
                        .unwrap_or(1)
                };
                let ensemble =
                    members_of("none") > 1 || v.as_ref().is_some_and(|v| members_of(v) > 1);
                let passes: &[bool] = if ensemble { &[false, true] } else { &[false] };
                for &member_row in passes {
                    let label = if member_row {
                        format!("{base}, mean of members{mark}")
                    } else {
                        format!("{base}{mark}")
                    };
                    let _ = write!(out, "| {label} |");
                    let (mut sw, mut sa, mut n) = (0.0, 0.0, 0usize);
                    let mut both = true;
                    for d in &dirs {
                        let w = find(d, "none");
                        let a = v.as_deref().and_then(|v| find(d, v));
                        let value = |x: &&Aggregate, members: bool| match (members, x.member_mean) {
                            (true, Some(m)) => m,
                            _ => x.mean,
                        };
                        match (w, a) {
                            (Some(w), Some(a)) => {
                                let (wv, av) = (value(w, member_row), value(a, member_row));
                                let _ = write!(
                                    out,
                                    " {} / {} {} |",
                                    cell(Some(w), member_row),
                                    cell(Some(a), member_row),
                                    arrow(wv, av)
                                );
                                sw += wv;
                                sa += av;
                                n += 1;
                            }
                            _ => {
                                both = false;
                                let _ = write!(
                                    out,
                                    " {} / {} |",
                                    cell(w, member_row),
                                    cell(a, member_row)
                                );
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
                if let Some(v) = &v {
                    let (nw, na) = (members_of("none"), members_of(v));
                    let what = |n: usize| {
                        if n == 1 {
                            "1 model".to_string()
                        } else {
                            format!("an ensemble of {n} models")
                        }
                    };
                    if nw == na {
                        if na > 1 {
                            notes.push(format!(
                                "{base}: like for like, {} with and without ADA.",
                                what(na)
                            ));
                        }
                    } else {
                        notes.push(format!(
                            "{base}: the arrow compares {} with ADA (one per gamma) against {} \
                             without, so it mixes ADA with ensembling{}; train the cells without \
                             ADA with --ensemble-size {na} for a like-for-like comparison.",
                            what(na),
                            what(nw),
                            if na > 1 {
                                "; the \"mean of members\" row compares single models"
                            } else {
                                ""
                            }
                        ));
                    }
                }
            }
        }
        // Oracle rows: the upper bound of each direction.
        for m in &models {
            let oracle: Vec<&&Aggregate> = aggs
                .iter()
                .filter(|a| a.model == *m && a.ada == "oracle")
                .collect();
            if oracle.is_empty() {
                continue;
            }
            let _ = write!(
                out,
                "| {} (oracle: trained and tested on the target) |",
                display_model(m)
            );
            let mut vals = Vec::new();
            for d in &dirs {
                match oracle.iter().find(|a| &a.direction == d) {
                    Some(a) => {
                        let _ = write!(out, " {:.2} ± {:.2} |", a.mean, a.std);
                        vals.push(a.mean);
                    }
                    None => {
                        let _ = write!(out, " — |");
                    }
                }
            }
            if vals.len() == dirs.len() && !vals.is_empty() {
                let _ = writeln!(
                    out,
                    " {:.2} |",
                    vals.iter().sum::<f64>() / vals.len() as f64
                );
            } else {
                let _ = writeln!(out, " — |");
            }
        }
        // The paper's rows for what was run.
        let mut papers: Vec<PaperRef> = Vec::new();
        for (m, v) in &shown {
            if let Some(p) = paper_reference(&b, m, v)
                && !papers.iter().any(|q| q.label == p.label)
            {
                papers.push(p);
            }
        }
        for p in &papers {
            let _ = write!(out, "| {} |", p.label);
            let (mut sw, mut sa, mut n, mut all) = (0.0, 0.0, 0usize, true);
            for d in &dirs {
                match p.values.get(d) {
                    Some((w, Some(a))) => {
                        let _ = write!(out, " {w:.2} / {a:.2} {} |", arrow(*w, *a));
                        sw += w;
                        sa += a;
                        n += 1;
                    }
                    Some((w, None)) => {
                        let _ = write!(out, " {w:.2} / — |");
                        sw += w;
                        all = false;
                        n += 1;
                    }
                    None => {
                        let _ = write!(out, " — |");
                        all = false;
                    }
                }
            }
            let k = dirs.len().max(1) as f64;
            if n == dirs.len() && all {
                let _ = writeln!(out, " {:.2} / {:.2} {} |", sw / k, sa / k, arrow(sw, sa));
            } else if n == dirs.len() {
                let _ = writeln!(out, " {:.2} / — |", sw / k);
            } else {
                let _ = writeln!(out, " — |");
            }
        }
        let _ = writeln!(out);
        for n in &notes {
            let _ = writeln!(out, "- {n}");
        }
        if !deviations.is_empty() {
            let _ = writeln!(
                out,
                "- † Deviates from the paper's protocol{}:",
                if papers.is_empty() {
                    ""
                } else {
                    ", so the paper rows are a reference, not a like-for-like comparison"
                }
            );
            for d in &deviations {
                let _ = writeln!(out, "  - {d}");
            }
        }
        if let Some(model_notes) = lb.model_notes.get(&b) {
            for m in &models {
                if let Some(n) = model_notes.get(m) {
                    let _ = writeln!(out, "- {}: {n}", display_model(m));
                }
            }
        }
        if !notes.is_empty() || !deviations.is_empty() || lb.model_notes.contains_key(&b) {
            let _ = writeln!(out);
        }
        // In-domain accuracy, target accuracy and the gap between them, per cell.
        // (Oracle runs test on the split they were trained beside: no gap to show.)
        let mut cells: Vec<&&Aggregate> = aggs
            .iter()
            .filter(|a| a.source_val.is_some() && a.ada != "oracle")
            .collect();
        if !cells.is_empty() {
            cells.sort_by_key(|a| {
                (
                    rank(&a.model),
                    ada_rank(&a.ada),
                    dirs.iter().position(|d| *d == a.direction),
                )
            });
            let _ = writeln!(
                out,
                "In-domain (source-validation) and target top-1 (%), and the DG gap between them, \
                 mean ± std over seeds:\n"
            );
            let _ = writeln!(
                out,
                "| Model | ADA | Direction | Source val | Target | DG gap | Chance |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|");
            for a in cells {
                let (sv, ss) = a.source_val.unwrap_or_default();
                let (g, gs) = a.gap.unwrap_or_default();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {sv:.2} ± {ss:.2} | {:.2} ± {:.2} | {g:.2} ± {gs:.2} | {:.2} |",
                    display_model(&a.model),
                    a.ada,
                    a.direction,
                    a.mean,
                    a.std,
                    a.chance
                );
            }
            let _ = writeln!(out);
        }
    }
    for line in summary(lb) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// Two-sided 95 % Student t quantile for `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match df {
        0 => f64::NAN,
        1..=10 => T[df - 1],
        11..=20 => 2.086,
        21..=40 => 2.021,
        _ => 1.96,
    }
}

/// The target top-1 differences `a - b` of the runs of cells `a` and `b` (model, ADA) of
/// `benchmark` trained on the same direction with the same seed.
fn paired_differences(
    lb: &Leaderboard,
    benchmark: &str,
    a: (&str, &str),
    b: (&str, &str),
) -> Vec<f64> {
    let cell = |r: &RunResult, (m, v): (&str, &str)| {
        r.benchmark == benchmark && r.model == m && r.ada == v
    };
    lb.runs
        .iter()
        .filter(|w| cell(w, a))
        .filter_map(|w| {
            lb.runs
                .iter()
                .find(|r| cell(r, b) && r.direction == w.direction && r.seed == w.seed)
                .map(|r| w.top1 - r.top1)
        })
        .collect()
}

/// `"{mean} [{low}, {high}]"`: the mean of paired differences and its 95 % confidence
/// interval (Student t over the pairs); `None` without pairs. The differences are of two
/// accuracies in percent, so the interval is cut to [-100, +100], where the true difference
/// lies: with few pairs (two pairs: t = 12.7) the t interval alone can run past it.
fn with_interval(diffs: &[f64]) -> Option<String> {
    if diffs.is_empty() {
        return None;
    }
    let (mean, sd) = mean_std(diffs);
    let half = t95(diffs.len() - 1) * sd / (diffs.len() as f64).sqrt();
    Some(if half.is_finite() {
        format!(
            "{mean:+.2} [{:+.2}, {:+.2}]",
            (mean - half).max(-100.0),
            (mean + half).min(100.0)
        )
    } else {
        format!("{mean:+.2} (one pair: no interval)")
    })
}

/// One line per benchmark: the best model by mean target top-1 over its directions and its
/// margin over the best cell of any other model, and for every model trained with and
/// without ADA the ADA effect; each difference the mean over (direction, seed) pairs, with
/// its 95 % confidence interval (Student t over the pairs).
pub fn summary(lb: &Leaderboard) -> Vec<String> {
    let mut lines = Vec::new();
    let mut benchmarks: Vec<&String> = lb.aggregates.iter().map(|a| &a.benchmark).collect();
    benchmarks.dedup();
    for b in benchmarks {
        // Best (model, ada) by the mean of its per-direction means.
        let mut by_cell: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
        for a in lb
            .aggregates
            .iter()
            .filter(|a| &a.benchmark == b && a.ada != "oracle")
        {
            by_cell
                .entry((a.model.as_str(), a.ada.as_str()))
                .or_default()
                .push(a.mean);
        }
        let means: Vec<((&str, &str), f64)> = by_cell
            .iter()
            .map(|(k, v)| (*k, v.iter().sum::<f64>() / v.len() as f64))
            .collect();
        let best_of = |skip: Option<&str>| {
            means
                .iter()
                .filter(|((m, _), _)| Some(*m) != skip)
                .max_by(|x, y| x.1.total_cmp(&y.1))
                .copied()
        };
        let Some(((m, v), best)) = best_of(None) else {
            continue;
        };
        let cell_label = |m: &str, v: &str| {
            if v == "none" {
                display_model(m)
            } else {
                format!("{} + {v}", display_model(m))
            }
        };
        let label = cell_label(m, v);
        // The margin over the best cell of another model, on the runs both trained.
        let margin = best_of(Some(m)).and_then(|((m2, v2), _)| {
            with_interval(&paired_differences(lb, b, (m, v), (m2, v2))).map(|d| {
                format!(
                    "; {label} minus {} (the best cell of another model): {d} points, mean \
                         over the (direction, seed) pairs both ran [95 % CI]",
                    cell_label(m2, v2)
                )
            })
        });
        let mut effects = Vec::new();
        let mut models: Vec<&str> = lb
            .runs
            .iter()
            .filter(|r| &r.benchmark == b)
            .map(|r| r.model.as_str())
            .collect();
        models.sort_by_key(|m| {
            ["tsn", "trn", "trn_attn", "tsm", "i3d", "non_local", "apn"]
                .iter()
                .position(|x| x == m)
                .unwrap_or(usize::MAX)
        });
        models.dedup();
        for m in models {
            let mut variants: Vec<&str> = lb
                .runs
                .iter()
                .filter(|r| {
                    &r.benchmark == b && r.model == m && r.ada != "none" && r.ada != "oracle"
                })
                .map(|r| r.ada.as_str())
                .collect();
            variants.sort_by_key(|v| ada_rank(v));
            variants.dedup();
            for v in variants {
                if let Some(d) = with_interval(&paired_differences(lb, b, (m, v), (m, "none"))) {
                    effects.push(format!("{} + {v} {d}", display_model(m)));
                }
            }
        }
        let mut line = format!(
            "Summary ({b}): best {label}, {best:.2} % mean target top-1 over its directions{}",
            margin.unwrap_or_default()
        );
        if !effects.is_empty() {
            let _ = write!(
                line,
                "; ADA effect, points, mean over (direction, seed) pairs [95 % CI]: {}",
                effects.join("; ")
            );
        }
        lines.push(line + ".");
    }
    lines
}

/// One CSV row per run.
pub fn render_csv(lb: &Leaderboard) -> String {
    let mut out = String::from(
        "benchmark,direction,model,ada,seed,top1,members,member_mean_top1,deviates,epochs,wall_secs,run_dir\n",
    );
    for r in &lb.runs {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.4},{},{},{},{},{:.1},{}",
            r.benchmark,
            r.direction,
            r.model,
            r.ada,
            r.seed,
            r.top1,
            r.members,
            r.member_mean_top1
                .map_or(String::new(), |m| format!("{m:.4}")),
            !r.deviations.is_empty(),
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

/// A vertical bar chart as inline SVG: one bar per `(label, sublabel, value, std, colour)`,
/// a labelled y axis in %, a dashed chance line, ± std error bars.
fn bar_chart(
    bars: &[(String, String, f64, Option<f64>, &str)],
    chance: f64,
    title: &str,
) -> String {
    let mut out = String::new();
    let (left, top, h, bw, gap) = (44.0, 24.0, 200.0, 34.0, 14.0);
    // Room on the right for the chance label.
    let w = left + (bw + gap) * bars.len() as f64 + gap + 56.0;
    let total_h = top + h + 48.0;
    let y = |v: f64| top + h - v.clamp(0.0, 100.0) / 100.0 * h;
    let _ = write!(
        out,
        "<svg width=\"{w:.0}\" height=\"{total_h:.0}\" role=\"img\" aria-label=\"{}\" \
         font-family=\"sans-serif\"><text x=\"{left}\" y=\"14\" font-size=\"12\">{}</text>",
        esc(title),
        esc(title)
    );
    for t in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let _ = write!(
            out,
            "<line x1=\"{left}\" x2=\"{w:.0}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#eee\"/>\
             <text x=\"{1}\" y=\"{2:.1}\" font-size=\"9\" text-anchor=\"end\">{t:.0}</text>",
            y(t),
            left - 4.0,
            y(t) + 3.0
        );
    }
    let _ = write!(
        out,
        "<text x=\"10\" y=\"{0:.1}\" font-size=\"10\" transform=\"rotate(-90 10 {0:.1})\" \
         text-anchor=\"middle\">top-1 (%)</text>\
         <line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{1:.1}\" stroke=\"#333\"/>\
         <line x1=\"{left}\" x2=\"{w:.0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#333\"/>",
        top + h / 2.0,
        top + h
    );
    for (i, (label, sub, v, sd, colour)) in bars.iter().enumerate() {
        let x = left + gap + (bw + gap) * i as f64;
        let _ = write!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw}\" height=\"{:.1}\" fill=\"{colour}\">\
             <title>{} {}: {v:.2}{}</title></rect>",
            y(*v),
            top + h - y(*v),
            esc(label),
            esc(sub),
            sd.map_or(String::new(), |s| format!(" ± {s:.2}"))
        );
        if let Some(sd) = sd {
            let _ = write!(
                out,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"#000\"/>",
                x + bw / 2.0,
                y(v - sd),
                y(v + sd)
            );
        }
        let _ = write!(
            out,
            "<text x=\"{0:.1}\" y=\"{1:.1}\" font-size=\"9\" text-anchor=\"middle\">{v:.1}</text>\
             <text x=\"{0:.1}\" y=\"{2:.1}\" font-size=\"10\" text-anchor=\"middle\">{3}</text>\
             <text x=\"{0:.1}\" y=\"{4:.1}\" font-size=\"9\" text-anchor=\"middle\">{5}</text>",
            x + bw / 2.0,
            y(*v) - 3.0,
            top + h + 14.0,
            esc(label),
            top + h + 26.0,
            esc(sub)
        );
    }
    if chance > 0.0 {
        let _ = write!(
            out,
            "<line x1=\"{left}\" x2=\"{w:.0}\" y1=\"{0:.1}\" y2=\"{0:.1}\" stroke=\"#c00\" \
             stroke-dasharray=\"4 3\"/><text x=\"{1:.0}\" y=\"{2:.1}\" font-size=\"9\" fill=\"#c00\" \
             text-anchor=\"end\">chance {chance:.1}</text>",
            y(chance),
            w - 2.0,
            y(chance) - 3.0
        );
    }
    let _ = write!(out, "</svg>");
    out
}

/// A self-contained HTML page (no network fetch): per benchmark and direction, the table
/// (target, in-domain and gap, deviations marked), a bar chart with a chance line, the
/// paper-vs-this-run chart on the paper's benchmarks, the best run's per-class accuracy and
/// its confusion matrix with labelled axes; the Markdown report at the end.
pub fn render_html(lb: &Leaderboard) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>videodg leaderboard</title><style>\
         body{{font-family:sans-serif;margin:1.5em;max-width:1100px}}table{{border-collapse:collapse;margin:0.5em 0}}\
         td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}}th{{background:#f4f4f4}}\
         td:first-child,td:nth-child(2){{text-align:left}}.charts{{display:flex;flex-wrap:wrap;gap:1.5em;\
         align-items:flex-start}}h2{{margin-top:1.2em}}pre{{font-size:11px}}</style></head><body>\
         <h1>videodg leaderboard</h1><p>tool {} ({}), schema {}</p>",
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
    let rank = |m: &str| {
        ["tsn", "trn", "trn_attn", "tsm", "i3d", "non_local", "apn"]
            .iter()
            .position(|x| *x == m)
            .unwrap_or(usize::MAX)
    };
    for (b, d) in &keys {
        let mut aggs: Vec<&Aggregate> = lb
            .aggregates
            .iter()
            .filter(|a| &a.benchmark == b && &a.direction == d)
            .collect();
        aggs.sort_by_key(|a| (rank(&a.model), ada_rank(&a.ada)));
        let chance = aggs.first().map_or(0.0, |a| a.chance);
        let _ = write!(
            out,
            "<h2>{} &mdash; {}</h2><table><tr><th>model</th><th>ADA</th><th>seeds</th>\
             <th>target top-1</th><th>source val</th><th>DG gap</th><th>chance</th></tr>",
            esc(b),
            esc(d)
        );
        let mut deviations: Vec<&String> = Vec::new();
        for a in &aggs {
            let pm = |x: Option<(f64, f64)>| {
                x.map_or("—".to_string(), |(m, s)| format!("{m:.2} ± {s:.2}"))
            };
            let _ = write!(
                out,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{:.2} ± {:.2}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
                esc(&display_model(&a.model)),
                if a.deviations.is_empty() { "" } else { " †" },
                esc(&a.ada),
                a.seeds,
                a.mean,
                a.std,
                pm(a.source_val),
                pm(a.gap),
                a.chance
            );
            for dv in &a.deviations {
                if !deviations.contains(&dv) {
                    deviations.push(dv);
                }
            }
        }
        let _ = write!(out, "</table>");
        if !deviations.is_empty() {
            let _ = write!(out, "<p>† Deviates from the paper's protocol:</p><ul>");
            for dv in deviations {
                let _ = write!(out, "<li>{}</li>", esc(dv));
            }
            let _ = write!(out, "</ul>");
        }
        let _ = write!(out, "<div class=\"charts\">");
        let bars: Vec<(String, String, f64, Option<f64>, &str)> = aggs
            .iter()
            .map(|a| {
                (
                    display_model(&a.model),
                    a.ada.clone(),
                    a.mean,
                    Some(a.std),
                    if a.ada == "none" {
                        "#7aa6d6"
                    } else {
                        "#e39b4f"
                    },
                )
            })
            .collect();
        out.push_str(&bar_chart(
            &bars,
            chance,
            "target top-1, mean ± std over seeds",
        ));
        // The paper's numbers beside this run's, where the paper has the variant.
        let mut paper_bars = Vec::new();
        for a in &aggs {
            if let Some(p) = paper_reference(b, &a.model, &a.ada)
                && let Some((w, with)) = p.values.get(d.as_str())
            {
                let paper = if a.ada == "none" { Some(*w) } else { *with };
                if let Some(pv) = paper {
                    let sub = if a.ada == "none" { "" } else { a.ada.as_str() };
                    paper_bars.push((
                        display_model(&a.model),
                        format!("{sub} paper"),
                        pv,
                        None,
                        "#aaaaaa",
                    ));
                    paper_bars.push((
                        display_model(&a.model),
                        format!("{sub} run"),
                        a.mean,
                        Some(a.std),
                        "#e39b4f",
                    ));
                }
            }
        }
        if !paper_bars.is_empty() {
            out.push_str(&bar_chart(&paper_bars, chance, "paper vs this run"));
        }
        let _ = write!(out, "</div>");
        // The best run of this direction: per-class accuracy and confusion matrix.
        if let Some(best) = lb
            .runs
            .iter()
            .filter(|r| &r.benchmark == b && &r.direction == d)
            .max_by(|x, y| x.top1.total_cmp(&y.top1))
        {
            let classes = lb.classes.get(b).cloned().unwrap_or_default();
            let name = |i: usize| {
                classes
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("class {i}"))
            };
            let n = best.confusion.len();
            let _ = write!(
                out,
                "<h3>Best run: {} + {} seed {} ({:.2} %)</h3><div class=\"charts\">",
                esc(&display_model(&best.model)),
                esc(&best.ada),
                best.seed,
                best.top1
            );
            // Per-class accuracy, horizontal bars.
            let (lw, bw, row) = (130.0, 200.0, 16.0);
            let _ = write!(
                out,
                "<svg width=\"{:.0}\" height=\"{:.0}\" font-family=\"sans-serif\" role=\"img\" \
                 aria-label=\"per-class accuracy\"><text x=\"0\" y=\"12\" font-size=\"12\">per-class top-1 (%)</text>",
                lw + bw + 40.0,
                24.0 + row * n as f64 + 8.0
            );
            for (i, pc) in best.per_class.iter().enumerate() {
                let yy = 20.0 + row * i as f64;
                let v = pc.unwrap_or(0.0);
                let _ = write!(
                    out,
                    "<text x=\"{0:.0}\" y=\"{1:.1}\" font-size=\"10\" text-anchor=\"end\">{2}</text>\
                     <rect x=\"{3:.0}\" y=\"{4:.1}\" width=\"{5:.1}\" height=\"12\" fill=\"#7aa6d6\"/>\
                     <text x=\"{6:.1}\" y=\"{1:.1}\" font-size=\"9\">{7}</text>",
                    lw - 4.0,
                    yy + 10.0,
                    esc(&name(i)),
                    lw,
                    yy,
                    v / 100.0 * bw,
                    lw + v / 100.0 * bw + 3.0,
                    pc.map_or("no clips".to_string(), |v| format!("{v:.0}"))
                );
            }
            if chance > 0.0 {
                let _ = write!(
                    out,
                    "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"18\" y2=\"{1:.1}\" stroke=\"#c00\" stroke-dasharray=\"4 3\"/>",
                    lw + chance / 100.0 * bw,
                    20.0 + row * n as f64
                );
            }
            let _ = write!(out, "</svg>");
            // Confusion matrix: rows true class, columns predicted class.
            let cell = 20.0;
            let (left, top) = (140.0, 110.0);
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
                "<svg width=\"{:.0}\" height=\"{:.0}\" font-family=\"sans-serif\" role=\"img\" \
                 aria-label=\"confusion matrix\"><text x=\"{:.1}\" y=\"12\" font-size=\"11\" \
                 text-anchor=\"middle\">predicted class</text><text x=\"12\" y=\"{:.1}\" font-size=\"11\" \
                 text-anchor=\"middle\" transform=\"rotate(-90 12 {:.1})\">true class</text>",
                // Room for the last rotated column label.
                left + cell * n as f64 + 80.0,
                top + cell * n as f64 + 10.0,
                left + cell * n as f64 / 2.0,
                top + cell * n as f64 / 2.0,
                top + cell * n as f64 / 2.0
            );
            for j in 0..n {
                let (x, yy) = (left + cell * j as f64 + cell / 2.0, top - 4.0);
                let _ = write!(
                    out,
                    "<text x=\"{x:.1}\" y=\"{yy:.1}\" font-size=\"9\" transform=\"rotate(-60 {x:.1} {yy:.1})\">{}</text>",
                    esc(&name(j))
                );
            }
            for (i, r) in best.confusion.iter().enumerate() {
                let _ = write!(
                    out,
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"end\">{}</text>",
                    left - 4.0,
                    top + cell * i as f64 + 13.0,
                    esc(&name(i))
                );
                for (j, &v) in r.iter().enumerate() {
                    let shade = 255 - (200 * v / max) as u8;
                    let _ = write!(
                        out,
                        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{cell}\" height=\"{cell}\" \
                         fill=\"rgb({shade},{shade},255)\" stroke=\"#fff\"><title>{} -> {}: {v}</title></rect>",
                        left + cell * j as f64,
                        top + cell * i as f64,
                        esc(&name(i)),
                        esc(&name(j))
                    );
                    if v > 0 {
                        let _ = write!(
                            out,
                            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"8\" text-anchor=\"middle\">{v}</text>",
                            left + cell * j as f64 + cell / 2.0,
                            top + cell * i as f64 + 13.0
                        );
                    }
                }
            }
            let _ = write!(out, "</svg></div>");
        }
    }
    let summary = summary(lb);
    if !summary.is_empty() {
        let _ = write!(out, "<h2>Summary</h2>");
        for line in summary {
            let _ = write!(out, "<p>{}</p>", esc(&line));
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
            members: 1,
            member_mean_top1: None,
            ada_method: String::new(),
            deviations: Vec::new(),
            source_val_top1: Some((top1 + 40.0).min(100.0)),
            chance: 100.0 / 12.0,
        }
    }

    /// A leaderboard of `runs` with their aggregates and nothing else.
    fn leaderboard(runs: Vec<RunResult>) -> Leaderboard {
        Leaderboard {
            schema_version: LEADERBOARD_SCHEMA_VERSION,
            tool_version: "0.1.0".into(),
            git_revision: "abc".into(),
            data_fingerprints: BTreeMap::new(),
            config: serde_json::Value::Null,
            classes: BTreeMap::new(),
            aggregates: aggregate(&runs),
            runs,
            model_notes: BTreeMap::new(),
        }
    }

    #[test]
    fn the_summary_pairs_runs_by_direction_and_seed_for_its_intervals() {
        // Seeds 0-2 of one direction: TRN 60, 64, 68; APN 58, 60, 62; APN + ada_star 59,
        // 61, 66 (the best APN cell, mean 62). A TRN run of a seed APN lacks counts in TRN's
        // mean (64) but in no pair.
        let mut runs = Vec::new();
        for (seed, trn, apn, apn_ada) in [
            (0, 60.0, 58.0, 59.0),
            (1, 64.0, 60.0, 61.0),
            (2, 68.0, 62.0, 66.0),
        ] {
            runs.push(run("ucf->hmdb", "trn", "none", seed, trn));
            runs.push(run("ucf->hmdb", "apn", "none", seed, apn));
            runs.push(run("ucf->hmdb", "apn", "ada_star", seed, apn_ada));
        }
        runs.push(run("ucf->hmdb", "trn", "none", 3, 64.0));
        let lb = leaderboard(runs);
        let line = summary(&lb).join("\n");
        // TRN minus APN + ada_star: 1, 3, 2 -> mean 2, sd 1, t(2) = 4.303: +/- 2.48.
        assert!(
            line.contains("best TRN, 64.00 %")
                && line.contains("TRN minus APN + ada_star (the best cell of another model): +2.00 [-0.48, +4.48] points"),
            "{line}"
        );
        // APN's ADA effect: 1, 1, 4 -> mean 2, sd sqrt(3), half 4.303 * 1 = 4.30.
        assert!(
            line.contains("APN + ada_star +2.00 [-2.30, +6.30]"),
            "{line}"
        );
    }

    #[test]
    fn a_summary_interval_stays_within_the_possible_differences() {
        // Two pairs, TRN + ada minus TRN: -20 and +40 -> mean +10, sd 42.43, t(1) = 12.706:
        // +/- 381.2, cut to the [-100, +100] a difference of two accuracies can take.
        let runs = vec![
            run("ucf->hmdb", "trn", "none", 0, 60.0),
            run("ucf->hmdb", "trn", "ada", 0, 40.0),
            run("ucf->hmdb", "trn", "none", 1, 30.0),
            run("ucf->hmdb", "trn", "ada", 1, 70.0),
        ];
        let line = summary(&leaderboard(runs)).join("\n");
        assert!(
            line.contains("TRN + ada +10.00 [-100.00, +100.00]"),
            "{line}"
        );
        // Within the range an interval is left as it is.
        assert_eq!(
            with_interval(&[1.0, 3.0, 2.0]).unwrap(),
            "+2.00 [-0.48, +4.48]"
        );
    }

    #[test]
    fn every_variant_gets_the_paper_row_of_that_variant() {
        let get = |b: &str, m: &str, a: &str| {
            paper_reference(b, m, a).map(|p| {
                let first = p.values.values().next().copied().unwrap();
                (p.label, first)
            })
        };
        type Case<'a> = (&'a str, &'a str, &'a str, &'a str, (f64, Option<f64>));
        let cases: &[Case] = &[
            (
                "ucf_hmdb",
                "trn",
                "none",
                "TRN (paper, Table 2)",
                (70.13, None),
            ),
            (
                "ucf_hmdb",
                "trn",
                "ada",
                "TRN + ADA (paper, Table 2)",
                (70.13, Some(70.36)),
            ),
            (
                "ucf_hmdb",
                "trn",
                "ada_star",
                "TRN + ADA* (paper, Table 2)",
                (70.13, Some(69.68)),
            ),
            (
                "ucf_hmdb",
                "trn_attn",
                "ada",
                "TRN-ATTN + ADA (paper, Table 2)",
                (70.93, Some(71.77)),
            ),
            (
                "ucf_hmdb",
                "trn_attn",
                "ada_star",
                "TRN-ATTN + ADA* (paper, Table 2)",
                (70.93, Some(70.28)),
            ),
            (
                "ucf_hmdb",
                "apn",
                "ada",
                "APN + ADA (paper, Table 2)",
                (71.43, Some(72.47)),
            ),
            (
                "ucf_hmdb",
                "apn",
                "ada_star",
                "APN + ADA* (paper, Table 2)",
                (71.43, Some(73.57)),
            ),
            (
                "ucf_hmdb",
                "apn",
                "global_only",
                "APN + ADA (global R_I only) (paper, §5.3)",
                (71.43, Some(71.83)),
            ),
            (
                "ucf_hmdb",
                "apn",
                "level2_only",
                "APN + ADA (R_II only) (paper, §5.3)",
                (71.43, Some(72.53)),
            ),
            (
                "ucf_hmdb",
                "apn",
                "level3_only",
                "APN + ADA (R_III only) (paper, §5.3)",
                (71.43, Some(72.47)),
            ),
            (
                "ucf_hmdb",
                "tsn",
                "ada",
                "TSN + ADA (paper, Table 1)",
                (68.80, Some(68.50)),
            ),
            (
                "ucf_hmdb",
                "non_local",
                "none",
                "Non-local (paper, Table 1)",
                (71.58, None),
            ),
            (
                "pku_mmd",
                "apn",
                "ada_star",
                "APN + ADA* (paper, Table 1)",
                (35.29, Some(39.72)),
            ),
            (
                "something_something",
                "trn",
                "ada",
                "TRN + ADA (paper, Table 1)",
                (37.15, Some(37.24)),
            ),
        ];
        for (b, m, a, label, first) in cases {
            // BTreeMap order: the first direction alphabetically.
            assert_eq!(
                get(b, m, a),
                Some((label.to_string(), *first)),
                "{b} {m} {a}"
            );
        }
        // Variants the paper did not run on that benchmark have no row.
        assert_eq!(get("ucf_hmdb", "tsn", "ada_star"), None);
        assert_eq!(get("pku_mmd", "apn", "ada"), None);
        assert_eq!(get("pku_mmd", "trn", "ada_star"), None);
        assert_eq!(get("synthetic", "apn", "ada_star"), None);
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
    fn a_plain_ensemble_gets_its_mean_of_members_row() {
        let ens = |mut r: RunResult| {
            r.members = 3;
            r.member_mean_top1 = Some(r.top1 - 4.0);
            r
        };
        let runs = vec![
            ens(run("ucf->hmdb", "trn", "none", 0, 60.0)),
            ens(run("ucf->hmdb", "trn", "none", 1, 62.0)),
        ];
        let lb = leaderboard(runs);
        let md = render_markdown(&lb);
        assert!(md.contains("| TRN | 61.00 ± 1.41 / — |"), "{md}");
        assert!(
            md.contains("| TRN, mean of members | 57.00 ± 1.41 / — |"),
            "{md}"
        );
    }

    #[test]
    fn markdown_layout_snapshot() {
        let ens = |mut r: RunResult, mean: f64| {
            r.members = 4;
            r.member_mean_top1 = Some(mean);
            r
        };
        let dev = |mut r: RunResult| {
            r.deviations = vec!["no pretrained weights".into()];
            r
        };
        let runs = vec![
            run("ucf->hmdb", "tsn", "none", 0, 50.0),
            run("ucf->hmdb", "tsn", "none", 1, 52.0),
            run("ucf->hmdb", "tsn", "ada", 0, 49.0),
            run("ucf->hmdb", "tsn", "ada", 1, 49.0),
            run("hmdb->ucf", "tsn", "none", 0, 70.0),
            run("hmdb->ucf", "tsn", "ada", 0, 71.0),
            run("ucf->hmdb", "trn", "none", 0, 52.0),
            ens(run("ucf->hmdb", "trn", "ada", 0, 54.0), 51.0),
            ens(run("ucf->hmdb", "trn", "ada_star", 0, 53.0), 50.5),
            dev(run("ucf->hmdb", "apn", "none", 0, 55.0)),
            run("ucf->hmdb", "trn", "oracle", 0, 60.0),
            run("ucf->hmdb", "trn", "oracle", 1, 62.0),
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
            model_notes: BTreeMap::from([(
                "ucf_hmdb".to_string(),
                BTreeMap::from([("tsn".to_string(), "order-blind".to_string())]),
            )]),
        };
        let md = render_markdown(&lb);
        let expected = "\
# Leaderboard

Top-1 accuracy (%) on the target domains, mean ± std over seeds; each cell is *without ADA / with ADA* and the arrow says whether the ADA run scored higher.

## ucf_hmdb

Data fingerprint `0123456789abcdef`.

| Model | ucf->hmdb | hmdb->ucf | Average |
|---|---|---|---|
| TSN + ada | 51.00 ± 1.41 / 49.00 ± 0.00 ↓ | 70.00 ± 0.00 / 71.00 ± 0.00 ↑ | 60.50 / 60.00 ↓ |
| TRN + ada | 52.00 ± 0.00 / 54.00 ± 0.00 ↑ | — / — | — |
| TRN + ada, mean of members | 52.00 ± 0.00 / 51.00 ± 0.00 ↓ | — / — | — |
| TRN + ada_star | 52.00 ± 0.00 / 53.00 ± 0.00 ↑ | — / — | — |
| TRN + ada_star, mean of members | 52.00 ± 0.00 / 50.50 ± 0.00 ↓ | — / — | — |
| APN † | 55.00 ± 0.00 / — | — / — | — |
| TRN (oracle: trained and tested on the target) | 61.00 ± 1.41 | — | — |
| TSN + ADA (paper, Table 1) | 51.68 / 51.61 ↓ | 68.80 / 68.50 ↓ | 60.24 / 60.05 ↓ |
| TRN + ADA (paper, Table 2) | 52.83 / 53.28 ↑ | 70.13 / 70.36 ↑ | 61.48 / 61.82 ↑ |
| TRN + ADA* (paper, Table 2) | 52.83 / 52.56 ↓ | 70.13 / 69.68 ↓ | 61.48 / 61.12 ↓ |
| APN (paper, Table 2) | 54.21 / — | 71.43 / — | 62.82 / — |

- TRN + ada: the arrow compares an ensemble of 4 models with ADA (one per gamma) against 1 model without, so it mixes ADA with ensembling; the \"mean of members\" row compares single models; train the cells without ADA with --ensemble-size 4 for a like-for-like comparison.
- TRN + ada_star: the arrow compares an ensemble of 4 models with ADA (one per gamma) against 1 model without, so it mixes ADA with ensembling; the \"mean of members\" row compares single models; train the cells without ADA with --ensemble-size 4 for a like-for-like comparison.
- † Deviates from the paper's protocol, so the paper rows are a reference, not a like-for-like comparison:
  - no pretrained weights
- TSN: order-blind

In-domain (source-validation) and target top-1 (%), and the DG gap between them, mean ± std over seeds:

| Model | ADA | Direction | Source val | Target | DG gap | Chance |
|---|---|---|---|---|---|---|
| TSN | none | ucf->hmdb | 91.00 ± 1.41 | 51.00 ± 1.41 | 40.00 ± 0.00 | 8.33 |
| TSN | none | hmdb->ucf | 100.00 ± 0.00 | 70.00 ± 0.00 | 30.00 ± 0.00 | 8.33 |
| TSN | ada | ucf->hmdb | 89.00 ± 0.00 | 49.00 ± 0.00 | 40.00 ± 0.00 | 8.33 |
| TSN | ada | hmdb->ucf | 100.00 ± 0.00 | 71.00 ± 0.00 | 29.00 ± 0.00 | 8.33 |
| TRN | none | ucf->hmdb | 92.00 ± 0.00 | 52.00 ± 0.00 | 40.00 ± 0.00 | 8.33 |
| TRN | ada | ucf->hmdb | 94.00 ± 0.00 | 54.00 ± 0.00 | 40.00 ± 0.00 | 8.33 |
| TRN | ada_star | ucf->hmdb | 93.00 ± 0.00 | 53.00 ± 0.00 | 40.00 ± 0.00 | 8.33 |
| APN | none | ucf->hmdb | 95.00 ± 0.00 | 55.00 ± 0.00 | 40.00 ± 0.00 | 8.33 |

Summary (ucf_hmdb): best TSN, 60.50 % mean target top-1 over its directions; TSN minus APN (the best cell of another model): -5.00 (one pair: no interval) points, mean over the (direction, seed) pairs both ran [95 % CI]; ADA effect, points, mean over (direction, seed) pairs [95 % CI]: TSN + ada -1.00 [-5.97, +3.97]; TRN + ada +2.00 (one pair: no interval); TRN + ada_star +1.00 (one pair: no interval).
";
        assert_eq!(md, expected, "\n{md}");
        let csv = render_csv(&lb);
        assert!(csv.starts_with("benchmark,direction,model,ada,seed,top1,members,member_mean_top1,deviates,epochs,wall_secs,run_dir\nucf_hmdb,ucf->hmdb,tsn,none,0,50.0000,1,,false,1,1.5,runs/0\n"), "{csv}");
        let html = render_html(&lb);
        assert!(
            html.contains("<svg")
                && !html.contains("http://")
                && !html.contains("https://")
                && !html.contains("<script src")
        );
        // Labelled axes, the chance line, per-class bars, paper vs this run.
        for needle in [
            "predicted class",
            "true class",
            "top-1 (%)",
            "chance 8.3",
            "per-class top-1 (%)",
            "paper vs this run",
            "<th>source val</th><th>DG gap</th><th>chance</th>",
            "Summary (ucf_hmdb)",
        ] {
            assert!(html.contains(needle), "{needle}");
        }
    }
}
