use std::path::Path;

use crate::util::*;

fn bench(out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "bench", "run", "--out", out, "--scale", "tiny", "--seeds", "1", "--epochs", "1",
        "--models", "tsn,apn", "-q",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn bench_run_writes_all_four_reports_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let o = bench(out.to_str().unwrap(), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for f in [
        "leaderboard.json",
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.html",
        "bench.toml",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    // The JSON schema (REPORTS.md).
    let lb: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("leaderboard.json")).unwrap()).unwrap();
    assert_eq!(lb["schema_version"], 2);
    for k in [
        "tool_version",
        "git_revision",
        "data_fingerprints",
        "config",
        "classes",
        "runs",
        "aggregates",
    ] {
        assert!(!lb[k].is_null(), "no {k}");
    }
    let runs = lb["runs"].as_array().unwrap();
    // 2 directions x 2 models x (none, default ADA) x 1 seed.
    assert_eq!(runs.len(), 8);
    for r in runs {
        for k in [
            "benchmark",
            "direction",
            "model",
            "ada",
            "seed",
            "top1",
            "per_class",
            "epochs",
            "wall_secs",
        ] {
            assert!(!r[k].is_null(), "run lacks {k}: {r}");
        }
        assert_eq!(r["benchmark"], "synthetic");
        let t = r["top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&t));
    }
    let adas: std::collections::BTreeSet<&str> =
        runs.iter().map(|r| r["ada"].as_str().unwrap()).collect();
    assert_eq!(adas, ["ada", "ada_star", "none"].into_iter().collect());
    let aggs = lb["aggregates"].as_array().unwrap();
    assert_eq!(aggs.len(), 8);
    assert!(
        aggs.iter()
            .all(|a| a["seeds"] == 1 && !a["mean"].is_null() && !a["std"].is_null())
    );
    // Every run says what ADA did and is marked as off the paper's protocol.
    for r in runs {
        let method = r["ada_method"].as_str().unwrap();
        match r["ada"].as_str().unwrap() {
            "none" => assert_eq!(method, "none"),
            // TSN's `ada` under the paper's protocol is the original image ADA.
            "ada" => assert!(method.starts_with("image ADA"), "{method}"),
            _ => assert!(
                method.contains("lines 5, 13, 14") && method.contains("line 4's features"),
                "{method}"
            ),
        }
        // Algorithm 1 as written: no deviation in how the ascent is anchored.
        assert!(
            r["deviations"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| !d.as_str().unwrap().contains("anchor")),
            "{r}"
        );
        assert!(
            r["deviations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d.as_str().unwrap().contains("synthetic")),
            "{r}"
        );
    }
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    assert!(
        md.contains("| Model | source->target | target->source | Average |")
            && md.contains("| TSN + ada † |")
            && md.contains("| APN + ada_star † |")
            && md.contains("† Deviates from the paper's protocol"),
        "{md}"
    );
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    assert_eq!(csv.lines().count(), 9);
    let html = std::fs::read_to_string(out.join("leaderboard.html")).unwrap();
    assert!(html.contains("<svg") && !html.contains("<script src") && !html.contains("https://"));

    // Interrupted: one run lost its results. The rerun trains that one only (in this
    // process, `--jobs 1`, so its log says what it did).
    let some_run = out.join("runs/synthetic/source_to_target/apn/none/seed-0");
    std::fs::remove_file(some_run.join("metrics.json")).unwrap();
    std::fs::remove_file(some_run.join("bench.json")).unwrap();
    let o = run(&[
        "bench",
        "run",
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "tiny",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--models",
        "tsn,apn",
        "--jobs",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("done earlier").count(), 7, "{}", text(&o));
    assert_eq!(err.matches(": training").count(), 1, "{}", text(&o));
    let lb2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("leaderboard.json")).unwrap()).unwrap();
    assert_eq!(lb2["runs"].as_array().unwrap().len(), 8);

    // A changed configuration is refused unless --force.
    let o = bench(out.to_str().unwrap(), &["--lr", "0.1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{}",
        text(&o)
    );

    // `bench report` re-renders the same leaderboard from the run folders.
    let before = std::fs::read(out.join("leaderboard.md")).unwrap();
    std::fs::remove_file(out.join("leaderboard.md")).unwrap();
    let o = run(&["bench", "report", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read(out.join("leaderboard.md")).unwrap(), before);
}

/// Under the paper's protocol a real benchmark is not run on a randomly initialised ResNet
/// unless asked for, and then every report marks it.
#[test]
fn random_init_resnets_on_real_benchmarks_are_refused_then_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::train::prepared(tmp.path());
    let out = tmp.path().join("bench");
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "bench",
            "run",
            "--benchmark",
            "ucf_hmdb",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--models",
            "tsn",
            "--ada",
            "none,default",
            "--backbone",
            "resnet18",
            "--input-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--directions",
            "ucf->hmdb",
            "--gammas",
            "0.1",
            "--ada-steps",
            "1",
            "--selection",
            "last",
            "-q",
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let refused = args(&[]);
    let o = run(&refused.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    for needle in [
        "--backbone-weights",
        "--allow-random-init",
        "random weights",
    ] {
        assert!(text(&o).contains(needle), "{needle}: {}", text(&o));
    }
    assert!(
        !out.join("runs").exists(),
        "nothing may train before the check"
    );
    // `recompute` from a config file reaches every cell (ResNet blocks recomputed in
    // backward; the same numbers).
    let config = tmp.path().join("recompute.toml");
    std::fs::write(&config, "recompute = \"on\"\n").unwrap();
    let allowed = args(&["--allow-random-init", "--config", config.to_str().unwrap()]);
    let o = run(&allowed.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cell = out.join("runs/ucf_hmdb/ucf_to_hmdb/tsn/none/seed-0/config.toml");
    let cell = std::fs::read_to_string(&cell).unwrap();
    assert!(cell.contains("recompute = \"on\""), "{cell}");
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    for needle in [
        "| TSN + ada † |",
        "no pretrained weights",
        "backbone resnet18 (paper: ResNet-50)",
        "model selection: the last epoch",
        // The paper row of the variant that ran: Table 1's TSN + ADA.
        "| TSN + ADA (paper, Table 1) | 51.68 / 51.61 ↓ |",
    ] {
        assert!(md.contains(needle), "{needle}:\n{md}");
    }
}

#[test]
fn bench_list_names_benchmarks_directions_and_models() {
    let o = run(&["bench", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "ucf_hmdb",
        "hmdb->ucf",
        "pku_mmd",
        "L->C,R",
        "synthetic",
        "synthetic_timing",
        "synthetic_appearance",
        "synthetic_varied_source",
        "synthetic_onset",
        "synthetic_speed",
        "models: tsn, trn, trn_attn, apn",
    ] {
        assert!(s.contains(needle), "{needle}: {s}");
    }
}

/// `--oracle` adds, per direction and model, a run trained on the target domain's own train
/// split and tested on its val split, shown as the direction's upper bound.
#[test]
fn oracle_rows_train_and_test_on_the_target_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let o = run(&[
        "bench",
        "run",
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "tiny",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--models",
        "trn",
        "--ada",
        "none",
        "--oracle",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let dir = out.join("runs/synthetic/source_to_target/trn/oracle-target/seed-0");
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("oracle = \"target\""), "{config}");
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
    // Tested on the target's val split only: fewer clips than the whole domain (24).
    let clips = metrics["targets"]["target"]["clips"].as_u64().unwrap();
    assert!(clips > 0 && clips < 24, "{clips}");
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    assert!(
        md.contains("| TRN (oracle: trained and tested on the target) |"),
        "{md}"
    );
    // The oracle is not an ADA variant: no "TRN + oracle" row, no ADA effect for it.
    assert!(!md.contains("TRN + oracle"), "{md}");
}

/// `vdg bench plan`, then two workers on the shared folder with `--part`, then `vdg bench
/// report`: every cell runs once, with the numbers a single `vdg bench run` gives.
#[test]
fn bench_plan_parts_and_report_match_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let common = [
        "--scale", "tiny", "--seeds", "1", "--epochs", "1", "--models", "tsn", "-q",
    ];
    let with = |cmd: &str, out: &Path, extra: &[&str]| {
        let mut c = vdg();
        c.args(["bench", cmd, "--out"])
            .arg(out)
            .args(common)
            .args(extra);
        c
    };
    let single = tmp.path().join("single");
    let o = with("run", &single, &["--jobs", "1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The same bench with two worker processes (`--jobs 2`) in one command.
    let jobs = tmp.path().join("jobs");
    let o = with("run", &jobs, &["--jobs", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(jobs.join("leaderboard.md").exists());

    let shared = tmp.path().join("shared");
    // Workers before the plan: refused (the data is made once, by the plan).
    let o = with("run", &shared, &["--part", "0/2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("vdg bench plan"), "{}", text(&o));
    let o = with("plan", &shared, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("plan.json")).unwrap()).unwrap();
    let cells = plan.as_array().unwrap().len();
    assert_eq!(cells, 4, "2 directions x (none, ada) x 1 seed");
    // One cell alone first: the report names the three others as missing.
    let o = with("run", &shared, &["--cell", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = vdg()
        .args(["bench", "report"])
        .arg(&shared)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("3 cell(s)") && out.contains("cell 0:"),
        "{out}"
    );
    assert!(!out.contains("cell 2:"), "{out}");
    // Two workers at once, as an array of two would run them.
    let workers: Vec<_> = (0..2)
        .map(|i| {
            with("run", &shared, &["--part", &format!("{i}/2")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for w in workers {
        let o = w.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let o = vdg()
        .args(["bench", "report"])
        .arg(&shared)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("every cell"),
        "{}",
        text(&o)
    );
    // Same numbers as the single run, cell by cell.
    for c in plan.as_array().unwrap() {
        let run = c["run"].as_str().unwrap();
        let metrics = |root: &Path| -> serde_json::Value {
            let mut m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(root.join(run).join("metrics.json")).unwrap(),
            )
            .unwrap();
            // Timings are not results.
            if let Some(o) = m.as_object_mut() {
                o.retain(|k, _| !k.contains("secs") && !k.contains("time"));
            }
            m
        };
        assert_eq!(metrics(&shared), metrics(&single), "{run}");
        assert_eq!(metrics(&jobs), metrics(&single), "{run} with --jobs 2");
    }
}

/// One Ctrl-C stops `vdg bench run` while it trains, after its own synthetic prep took over
/// SIGINT for a while (the prep's handler must not outlive the prep).
#[cfg(unix)]
#[test]
fn one_sigint_stops_a_bench_that_prepared_its_data() {
    // In one process, and with worker processes (which the bench must stop with it: their
    // stderr is this pipe, so a worker left running would hold `wait_with_output` up).
    for jobs in ["1", "2"] {
        one_sigint_stops_a_bench(jobs);
    }
}

#[cfg(unix)]
fn one_sigint_stops_a_bench(jobs: &str) {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("b");
    let child = vdg()
        .args(["bench", "run", "--out"])
        .arg(&out)
        .args([
            "--scale", "tiny", "--seeds", "3", "--epochs", "3", "--models", "tsn,apn", "-q",
            "--jobs", jobs,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Training has started once the first run folder is there.
    let t0 = std::time::Instant::now();
    while !out.join("runs").exists() && t0.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(out.join("runs").exists(), "training never started");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.signal(), Some(2), "--jobs {jobs}: {}", text(&o));
    assert!(!out.join("leaderboard.md").exists());
    // Nothing trains on after the bench stopped.
    let before = walk_count(&out);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        walk_count(&out),
        before,
        "--jobs {jobs}: files still appear"
    );
    // Workers left running would have finished all 24 cells first.
    let finished = count_named(&out.join("runs"), "metrics.json");
    assert!(
        finished < 24,
        "--jobs {jobs}: {finished} cells finished after the signal"
    );
}

#[cfg(unix)]
fn count_named(dir: &Path, name: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    count_named(&p, name)
                } else {
                    usize::from(e.file_name() == name)
                }
            })
            .sum()
    })
}

#[cfg(unix)]
fn walk_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                1 + if e.path().is_dir() {
                    walk_count(&e.path())
                } else {
                    0
                }
            })
            .sum()
    })
}

/// A built-in variant of the synthetic benchmark (`--benchmark synthetic_timing`) is made on
/// demand like the embedded one, into a folder of its own name, with the embedded
/// benchmark's defaults, and every report names it; `vdg prep synthetic` refuses a name that
/// is not a synthetic benchmark.
#[test]
fn a_synthetic_variant_runs_under_its_own_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    // TSN and APN (the helper's), without ADA, one seed, one epoch.
    let o = bench(
        out.to_str().unwrap(),
        &["--benchmark", "synthetic_timing", "--ada", "none"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let data = out.join("data/synthetic_timing");
    let prep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("prep.json")).unwrap()).unwrap();
    assert_eq!(prep["benchmark"], "synthetic_timing");
    let marker = std::fs::read_to_string(data.join("raw/.vdg-synthetic")).unwrap();
    assert!(marker.contains("target_appearance=false"), "{marker}");
    let lb: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("leaderboard.json")).unwrap()).unwrap();
    let runs = lb["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{runs:?}");
    assert!(runs.iter().all(|r| r["benchmark"] == "synthetic_timing"));
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    // The embedded benchmark's CPU-sized defaults, not the paper's.
    for needle in [
        "## synthetic_timing",
        "embedded synthetic benchmark (no paper numbers)",
        "input 32 (224)",
    ] {
        assert!(md.contains(needle), "{needle}:\n{md}");
    }
    let o = run(&[
        "prep",
        "synthetic",
        "--benchmark",
        "ucf_hmdb",
        "--out",
        tmp.path().join("p").to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not a synthetic benchmark"),
        "{}",
        text(&o)
    );
}

/// `vdg bench run --force` after a change of `--scale` prepares its synthetic data again
/// (until 2026-12-04 the data prep refused it, asking for the --force already given).
#[test]
fn a_changed_scale_under_force_prepares_the_synthetic_data_again() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let args = |scale: &'static str| {
        vec![
            "bench",
            "run",
            "--out",
            out.to_str().unwrap(),
            "--scale",
            scale,
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--models",
            "tsn",
            "--ada",
            "none",
            "-q",
        ]
    };
    let o = run(&args("tiny"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = run(&args("small"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    let mut forced = args("small");
    forced.push("--force");
    let o = run(&forced);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let data = out.join("data/synthetic");
    let marker = std::fs::read_to_string(data.join("raw/.vdg-synthetic")).unwrap();
    assert!(marker.contains("scale=small"), "{marker}");
    let prep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("prep.json")).unwrap()).unwrap();
    // 48 clips per class and domain, 6 classes, 2 domains.
    assert_eq!(prep["counts"]["ok"], 576, "{}", prep["counts"]);
}
