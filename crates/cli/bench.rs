//! `vdg bench`: the run matrix (benchmark x direction x model x ADA x seed), resumable run
//! folders, and leaderboards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use vdg_data::Manifest;
use vdg_trainer::ada::AdaVariant;
use vdg_trainer::models::ModelKind;
use vdg_trainer::train::{Metrics, train};

use crate::report::{self, Leaderboard, RunResult};
use crate::train::{RunRecord, TrainArgs, prepare_run_folder, resolve};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Run the matrix (default: the embedded synthetic benchmark, TSN/TRN/APN without and
    /// with ADA, 3 seeds, small CNN, CPU), then write and print the leaderboard.
    Run(Box<BenchRunArgs>),
    /// List the benchmarks, their directions, and the models.
    List,
    /// Re-render the leaderboard from the run folders of a bench output folder.
    Report {
        /// The bench output folder.
        dir: PathBuf,
    },
}

/// Options of `vdg bench run`; a `--config` TOML file may set any of them (flags win).
#[derive(Debug, Args, Default)]
pub struct BenchRunArgs {
    /// Benchmark name (see `vdg bench list`).
    #[arg(long)]
    benchmark: Option<String>,
    /// Prepared data folder (default for `synthetic`: generated under <out>/data).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Models, comma-separated: tsn, trn, trn_attn, apn, and (with --backbone resnet18 or
    /// resnet50) tsm, i3d, non_local.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// ADA settings, comma-separated: none, default (ada for TSN, TSM, I3D and Non-local;
    /// ada_star otherwise), or a variant.
    #[arg(long, value_delimiter = ',')]
    ada: Option<Vec<String>>,
    /// Directions, separated by `;` because they contain commas (`L->C,R;C->L,R`); default: all.
    #[arg(long, value_delimiter = ';')]
    directions: Option<Vec<String>>,
    /// Number of seeds (0..N).
    #[arg(long)]
    seeds: Option<u64>,
    /// Epochs per run.
    #[arg(long)]
    epochs: Option<usize>,
    /// Clips per batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Backbone.
    #[arg(long)]
    backbone: Option<String>,
    /// Input side.
    #[arg(long)]
    input_size: Option<usize>,
    /// Feature width D.
    #[arg(long)]
    feature_dim: Option<usize>,
    /// Frames of the dense clips of i3d and non_local (default 32).
    #[arg(long)]
    clip_frames: Option<usize>,
    /// ADA gammas, comma-separated.
    #[arg(long, value_delimiter = ',')]
    gammas: Option<Vec<f64>>,
    /// ADA ascent steps.
    #[arg(long)]
    ada_steps: Option<usize>,
    /// cpu or cuda[:N].
    #[arg(long)]
    device: Option<String>,
    /// Synthetic benchmark size: tiny, small, full.
    #[arg(long)]
    scale: Option<String>,
    /// A TOML file with any of these settings (a whole paper table, say).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output folder (runs/, leaderboard.*).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Redo runs whose configuration changed instead of refusing.
    #[arg(long)]
    force: bool,
}

/// The resolved matrix, written to `<out>/bench.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BenchConfig {
    /// Benchmark.
    pub benchmark: String,
    /// Prepared data folder.
    pub data: Option<PathBuf>,
    /// Models.
    pub models: Vec<String>,
    /// ADA settings.
    pub ada: Vec<String>,
    /// Directions (empty = all).
    pub directions: Vec<String>,
    /// Seeds 0..N.
    pub seeds: u64,
    /// Epochs.
    pub epochs: Option<usize>,
    /// Batch size.
    pub batch_size: Option<usize>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Backbone.
    pub backbone: Option<String>,
    /// Input side.
    pub input_size: Option<usize>,
    /// Feature width.
    pub feature_dim: Option<usize>,
    /// Dense clip frames (I3D, Non-local).
    #[serde(default)]
    pub clip_frames: Option<usize>,
    /// Gammas.
    pub gammas: Option<Vec<f64>>,
    /// ADA steps.
    pub ada_steps: Option<usize>,
    /// Projection dropout.
    pub projection_dropout: Option<f32>,
    /// Device.
    pub device: String,
    /// Synthetic scale.
    pub scale: String,
}

impl BenchConfig {
    /// Defaults: for `synthetic`, a CPU-sized setting that runs in minutes; for real
    /// benchmarks, the paper's settings.
    fn defaults(benchmark: &str) -> Self {
        let synthetic = benchmark == "synthetic";
        BenchConfig {
            benchmark: benchmark.into(),
            data: None,
            models: vec!["tsn".into(), "trn".into(), "apn".into()],
            ada: vec!["none".into(), "default".into()],
            directions: vec![],
            seeds: 3,
            epochs: synthetic.then_some(12),
            batch_size: synthetic.then_some(16),
            lr: synthetic.then_some(0.005),
            backbone: synthetic.then(|| "small_cnn".into()),
            input_size: synthetic.then_some(32),
            feature_dim: synthetic.then_some(32),
            clip_frames: None,
            gammas: synthetic.then(|| vec![0.1]),
            ada_steps: synthetic.then_some(1),
            projection_dropout: synthetic.then_some(0.2),
            device: "cpu".into(),
            scale: "small".into(),
        }
    }
}

fn resolve_config(a: &BenchRunArgs) -> Result<BenchConfig> {
    let file: Option<BenchConfig> = match &a.config {
        Some(p) => Some(
            toml::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
        ),
        None => None,
    };
    let benchmark = a
        .benchmark
        .clone()
        .or_else(|| {
            file.as_ref()
                .map(|f| f.benchmark.clone())
                .filter(|b| !b.is_empty())
        })
        .unwrap_or_else(|| "synthetic".into());
    let mut c = BenchConfig::defaults(&benchmark);
    if let Some(f) = file {
        let d = BenchConfig::default();
        macro_rules! take {
            ($($f:ident),*) => { $( if f.$f != d.$f { c.$f = f.$f.clone(); } )* };
        }
        take!(
            data,
            models,
            ada,
            directions,
            seeds,
            epochs,
            batch_size,
            lr,
            backbone,
            input_size,
            feature_dim,
            clip_frames,
            gammas,
            ada_steps,
            projection_dropout,
            device,
            scale
        );
    }
    macro_rules! flag {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { c.$f = v.clone().into(); } )* };
    }
    flag!(models, ada, directions, seeds, device, scale);
    macro_rules! opt {
        ($($f:ident),*) => { $( if a.$f.is_some() { c.$f = a.$f.clone(); } )* };
    }
    opt!(
        data,
        epochs,
        batch_size,
        lr,
        backbone,
        input_size,
        feature_dim,
        clip_frames,
        gammas,
        ada_steps
    );
    if c.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    for m in &c.models {
        let kind = ModelKind::from_name(m)?;
        let resnet = matches!(c.backbone.as_deref(), None | Some("resnet18" | "resnet50"));
        if !kind.is_head() && !resnet {
            bail!(
                "{m} needs a ResNet trunk; add --backbone resnet18 (or resnet50) to run it (this \
                 benchmark's default backbone is {})",
                c.backbone.as_deref().unwrap_or("resnet50")
            );
        }
    }
    Ok(c)
}

fn ada_for(setting: &str, model: ModelKind) -> Result<AdaVariant> {
    Ok(match setting {
        // The paper's "+ADA" rows: single-layer ADA for the baselines without a feature
        // hierarchy of their own (TSN, TSM, I3D, Non-local), ADA* for TRN, TRN-ATTN and APN.
        "default" => match model {
            ModelKind::Tsn | ModelKind::Tsm | ModelKind::I3d | ModelKind::NonLocal => {
                AdaVariant::Ada
            }
            _ => AdaVariant::AdaStar,
        },
        other => AdaVariant::from_name(other)?,
    })
}

fn slug(direction: &str) -> String {
    direction.replace("->", "_to_").replace(',', "+")
}

/// `vdg bench ...`.
pub fn run(cmd: BenchCommand, quiet: bool) -> Result<ExitCode> {
    match cmd {
        BenchCommand::List => {
            for (name, text) in vdg_data::manifest::BUILTIN_MANIFESTS {
                let m = Manifest::from_toml(text, Path::new(name))?;
                let dirs: Vec<String> = m.directions.iter().map(|d| d.to_string()).collect();
                println!(
                    "{name:<20} {:<22} {} classes, M = {}, directions: {}",
                    m.title,
                    m.classes.len(),
                    m.segments,
                    dirs.join("; ")
                );
            }
            let models: Vec<&str> = ModelKind::ALL.iter().map(|k| k.name()).collect();
            println!("models: {}", models.join(", "));
            let adas: Vec<&str> = AdaVariant::ALL.iter().map(|v| v.name()).collect();
            println!(
                "ada: {} (and `default`: ada for tsn, ada_star otherwise)",
                adas.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Report { dir } => {
            let lb = collect(&dir)?;
            write_reports(&dir, &lb)?;
            print!("{}", report::render_markdown(&lb));
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Run(a) => bench_run(&a, quiet),
    }
}

fn bench_run(a: &BenchRunArgs, quiet: bool) -> Result<ExitCode> {
    let cfg = resolve_config(a)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("bench-out"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let cfg_path = out.join("bench.toml");
    let text = toml::to_string(&cfg)?;
    if let Ok(old) = std::fs::read_to_string(&cfg_path)
        && old != text
        && !a.force
    {
        bail!(
            "{} holds a bench with another configuration (see its bench.toml); rerun with --force to redo changed runs, or choose another --out",
            out.display()
        );
    }
    vdg_data::atomic::AtomicFile::write_all(&cfg_path, text.as_bytes())?;
    // Data: the synthetic benchmark is made on demand.
    let data = match (&cfg.data, cfg.benchmark.as_str()) {
        (Some(d), _) => d.clone(),
        (None, "synthetic") => {
            let d = out.join("data").join("synthetic");
            if !d.join(vdg_data::shard::PREP_FILE).exists() {
                tracing::info!(
                    "preparing the synthetic benchmark ({}) in {}",
                    cfg.scale,
                    d.display()
                );
            }
            let prep = crate::prep::PrepCommand::Synthetic(crate::prep::SyntheticArgs::new(
                &d, &cfg.scale,
            ));
            let code = crate::prep::run(prep, true)?;
            if code != ExitCode::SUCCESS {
                bail!("preparing the synthetic benchmark failed");
            }
            d
        }
        (None, other) => {
            bail!("--data is needed for benchmark {other:?} (a folder written by `vdg prep`)")
        }
    };
    let prep: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join(vdg_data::shard::PREP_FILE))
            .with_context(|| format!("reading {}/prep.json", data.display()))?,
    )?;
    let manifest = Manifest::from_toml(
        prep["manifest_toml"]
            .as_str()
            .context("prep.json has no manifest")?,
        &data,
    )?;
    if manifest.name != cfg.benchmark {
        bail!(
            "{} holds benchmark {:?}, not {:?}",
            data.display(),
            manifest.name,
            cfg.benchmark
        );
    }
    let directions: Vec<String> = if cfg.directions.is_empty() {
        manifest.directions.iter().map(|d| d.to_string()).collect()
    } else {
        cfg.directions.clone()
    };
    // The matrix.
    let mut specs = Vec::new();
    for d in &directions {
        for m in &cfg.models {
            let model = ModelKind::from_name(m)?;
            for setting in &cfg.ada {
                let ada = ada_for(setting, model)?;
                for seed in 0..cfg.seeds {
                    specs.push((d.clone(), model, ada, seed));
                }
            }
        }
    }
    let total = specs.len();
    let started = Instant::now();
    let bar = crate::logging::new_bar(quiet, "runs");
    if let Some(b) = &bar {
        b.set_length(total as u64);
    }
    for (k, (d, model, ada, seed)) in specs.into_iter().enumerate() {
        let rel = format!(
            "runs/{}/{}/{}/{}/seed-{seed}",
            cfg.benchmark,
            slug(&d),
            model.name(),
            ada.name()
        );
        let dir = out.join(&rel);
        let args = TrainArgs {
            data: Some(data.clone()),
            features: None,
            direction: d.clone(),
            model,
            ada,
            out: dir.clone(),
            protocol: "paper".into(),
            backbone: cfg.backbone.clone(),
            backbone_weights: None,
            epochs: cfg.epochs,
            batch_size: cfg.batch_size,
            lr: cfg.lr,
            gammas: cfg.gammas.clone(),
            ada_steps: cfg.ada_steps,
            ensemble: None,
            input_size: cfg.input_size,
            feature_dim: cfg.feature_dim,
            clip_frames: cfg.clip_frames,
            projection_dropout: cfg.projection_dropout,
            selection: None,
            seed,
            device: cfg.device.clone(),
            resume: true,
        };
        let (record, spec) = resolve(&args)?;
        let config_path = dir.join("config.toml");
        if config_path.exists() {
            let old: Option<RunRecord> = std::fs::read_to_string(&config_path)
                .ok()
                .and_then(|t| toml::from_str(&t).ok());
            let same = old.is_some_and(|mut o| {
                let mut r = record.clone();
                o.git_revision.clear();
                r.git_revision.clear();
                o == r
            });
            if !same {
                if !a.force {
                    bail!(
                        "{}: the run's configuration changed; rerun with --force to redo it",
                        dir.display()
                    );
                }
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            } else if dir.join("metrics.json").exists() && dir.join("bench.json").exists() {
                tracing::info!("[{}/{total}] {rel}: done earlier", k + 1);
                if let Some(b) = &bar {
                    b.inc(1);
                }
                continue;
            }
        }
        prepare_run_folder(&dir, &record, true)?;
        tracing::info!(
            "[{}/{total}] {rel}: training ({:.0} s elapsed)",
            k + 1,
            started.elapsed().as_secs_f64()
        );
        let t0 = Instant::now();
        let quiet_progress = |_: &vdg_trainer::train::TrainEvent<'_>| {};
        train(&spec, &record.train, true, &quiet_progress)
            .with_context(|| format!("training {}", dir.display()))?;
        let wall = serde_json::json!({ "wall_secs": t0.elapsed().as_secs_f64() });
        vdg_data::atomic::AtomicFile::write_all(
            &dir.join("bench.json"),
            wall.to_string().as_bytes(),
        )?;
    }
    let lb = collect(&out)?;
    write_reports(&out, &lb)?;
    if !quiet {
        print!("{}", report::render_markdown(&lb));
    }
    println!(
        "{} runs in {:.0} s; reports: {}",
        total,
        started.elapsed().as_secs_f64(),
        [
            "leaderboard.md",
            "leaderboard.json",
            "leaderboard.csv",
            "leaderboard.html"
        ]
        .map(|f| out.join(f).display().to_string())
        .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads every finished run folder under `<out>/runs`.
pub fn collect(out: &Path) -> Result<Leaderboard> {
    let mut runs = Vec::new();
    let mut fingerprints = BTreeMap::new();
    let mut classes = BTreeMap::new();
    let mut git = String::from(env!("VDG_GIT_REV"));
    let root = out.join("runs");
    let mut metric_files: Vec<PathBuf> = walk(&root);
    metric_files.sort();
    for m in metric_files {
        let dir = m.parent().map(Path::to_owned).unwrap_or_default();
        let (Ok(cfg_text), Ok(bench_text)) = (
            std::fs::read_to_string(dir.join("config.toml")),
            std::fs::read_to_string(dir.join("bench.json")),
        ) else {
            continue;
        };
        let record: RunRecord = toml::from_str(&cfg_text)
            .with_context(|| format!("parsing {}/config.toml", dir.display()))?;
        let metrics: Metrics = serde_json::from_str(&std::fs::read_to_string(&m)?)
            .with_context(|| format!("parsing {}", m.display()))?;
        let wall: serde_json::Value = serde_json::from_str(&bench_text).unwrap_or_default();
        let n = metrics.classes.len();
        let mut confusion = vec![vec![0u32; n]; n];
        for t in metrics.targets.values() {
            for (i, row) in t.confusion.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    confusion[i][j] += v;
                }
            }
        }
        let total: u32 = confusion.iter().flatten().sum();
        let correct: u32 = (0..n).map(|i| confusion[i][i]).sum();
        let per_class = confusion
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let s: u32 = r.iter().sum();
                (s > 0).then(|| 100.0 * f64::from(r[i]) / f64::from(s))
            })
            .collect();
        fingerprints.insert(record.benchmark.clone(), record.data_fingerprint.clone());
        classes.insert(record.benchmark.clone(), metrics.classes.clone());
        git = record.git_revision.clone();
        runs.push(RunResult {
            benchmark: record.benchmark.clone(),
            direction: record.direction.clone(),
            model: record.train.model.name().into(),
            ada: record.train.ada.name().into(),
            seed: record.train.seed,
            top1: if total > 0 {
                100.0 * f64::from(correct) / f64::from(total)
            } else {
                0.0
            },
            targets: metrics
                .targets
                .iter()
                .map(|(k, v)| (k.clone(), v.top1))
                .collect(),
            per_class,
            confusion,
            epochs: record.train.epochs,
            wall_secs: wall["wall_secs"].as_f64().unwrap_or(0.0),
            run_dir: dir.strip_prefix(out).unwrap_or(&dir).display().to_string(),
        });
    }
    if runs.is_empty() {
        bail!("{}: no finished runs under runs/", out.display());
    }
    // Matrix order: benchmark, direction, model, ADA (none first), seed.
    runs.sort_by(|a, b| {
        (
            &a.benchmark,
            &a.direction,
            &a.model,
            a.ada != "none",
            &a.ada,
            a.seed,
        )
            .cmp(&(
                &b.benchmark,
                &b.direction,
                &b.model,
                b.ada != "none",
                &b.ada,
                b.seed,
            ))
    });
    let config: serde_json::Value = std::fs::read_to_string(out.join("bench.toml"))
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or_default();
    Ok(Leaderboard {
        schema_version: report::LEADERBOARD_SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git,
        data_fingerprints: fingerprints,
        config,
        classes,
        aggregates: report::aggregate(&runs),
        runs,
    })
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n == "metrics.json") {
            out.push(p);
        }
    }
    out
}

fn write_reports(out: &Path, lb: &Leaderboard) -> Result<()> {
    let json = serde_json::to_vec_pretty(lb)?;
    vdg_data::atomic::AtomicFile::write_all(&out.join("leaderboard.json"), &json)?;
    vdg_data::atomic::AtomicFile::write_all(
        &out.join("leaderboard.md"),
        report::render_markdown(lb).as_bytes(),
    )?;
    vdg_data::atomic::AtomicFile::write_all(
        &out.join("leaderboard.csv"),
        report::render_csv(lb).as_bytes(),
    )?;
    vdg_data::atomic::AtomicFile::write_all(
        &out.join("leaderboard.html"),
        report::render_html(lb).as_bytes(),
    )?;
    Ok(())
}
