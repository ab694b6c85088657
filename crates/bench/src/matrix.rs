//! The run matrix of `vdg bench run` (benchmark x direction x model x ADA x seed): its
//! configuration, resumable run folders, collecting finished runs into a leaderboard.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use vdg_data::Manifest;
use vdg_trainer::ada::AdaVariant;
use vdg_trainer::models::ModelKind;
use vdg_trainer::train::{Metrics, train};

use crate::cell::{RunRecord, TrainArgs, prepare_run_folder, resolve};
use crate::report::{self, Leaderboard, RunResult};

/// What the matrix needs from the program that runs it.
pub struct Host<'a> {
    /// The tool's git revision, recorded in every run's `config.toml`.
    pub git_revision: &'a str,
    /// Prepares the synthetic benchmark named (`synthetic` or a built-in `synthetic_*`
    /// variant) into the folder at the scale given (`vdg prep synthetic`), when a bench
    /// needs it and it is not there yet. Arguments: folder, benchmark, scale.
    pub prepare_synthetic: &'a dyn Fn(&Path, &str, &str) -> Result<()>,
    /// Told how many cells there are and when each is done.
    pub progress: &'a dyn BenchProgress,
}

/// Progress of a matrix.
pub trait BenchProgress {
    /// The matrix has `total` cells.
    fn start(&self, total: usize);
    /// One more cell is done (trained now or earlier).
    fn cell_done(&self);
}

/// No progress display.
pub struct Silent;

impl BenchProgress for Silent {
    fn start(&self, _total: usize) {}
    fn cell_done(&self) {}
}

/// What [`run_matrix`] did.
#[derive(Debug)]
pub struct MatrixOutcome {
    /// The leaderboard of every finished run under the output folder; `None` when only
    /// some cells ran (`--cell`, `--part`) or only the plan was written.
    pub leaderboard: Option<Leaderboard>,
    /// Cells this invocation ran or found done.
    pub ran: usize,
    /// Cells in the matrix.
    pub cells: usize,
    /// Wall time in seconds.
    pub wall_secs: f64,
    /// The output folder.
    pub out: PathBuf,
}

/// Options of `vdg bench run`; a `--config` TOML file may set any of them (flags win).
#[derive(Debug, Args, Default)]
pub struct BenchRunArgs {
    /// Run only these cells, in the order given (their numbers in `plan.json`, written by
    /// `vdg bench plan`); repeat or comma-separate. The leaderboard is then left to `vdg bench report`.
    #[arg(long, value_delimiter = ',', value_name = "K")]
    pub cell: Vec<usize>,
    /// Run only part I of N of the cells (0-based, cells dealt round-robin), for a job
    /// array or one worker per GPU. The leaderboard is then left to `vdg bench report`.
    #[arg(long, value_name = "I/N", value_parser = vdg_data::parse_part)]
    pub part: Option<(u32, u32)>,
    /// Cells trained at once, each in a worker process on one thread (default: one per
    /// core for the synthetic benchmark on the CPU, else 1). The embedded benchmark's small
    /// models run faster on one thread each than on all cores (BENCHMARKS.md, "Cells in
    /// parallel"); results do not depend on it.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Stop a cell with an error naming the files being read when no batch comes from them
    /// for this many seconds (a network file system that stopped answering); the cell is
    /// left unfinished for a rerun. 0: wait for ever. Changes no result.
    #[arg(long, default_value_t = vdg_trainer::loader::DEFAULT_STALL_TIMEOUT_SECS, value_name = "SECS")]
    pub stall_timeout: u64,
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
    /// ADA settings, comma-separated: none, default (the variant of the paper's Table 1:
    /// ada_star for APN, ada for every baseline), or a variant.
    #[arg(long, value_delimiter = ',')]
    ada: Option<Vec<String>>,
    /// Directions, separated by `;` because they contain commas (`L->C,R;C->L,R`); default: all.
    #[arg(long, value_delimiter = ';')]
    directions: Option<Vec<String>>,
    /// Number of seeds (0..N; default 8 on the embedded benchmark, 3 on the others).
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
    /// How the learning rate falls: step (the paper's milestones) or cosine.
    #[arg(long, value_enum)]
    lr_schedule: Option<vdg_trainer::train::LrSchedule>,
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
    /// Frames between two frames of a dense clip (i3d, non_local; default 2).
    #[arg(long)]
    clip_stride: Option<usize>,
    /// ADA gammas, comma-separated.
    #[arg(long, value_delimiter = ',')]
    gammas: Option<Vec<f64>>,
    /// ADA ascent steps.
    #[arg(long)]
    ada_steps: Option<usize>,
    /// cpu or cuda[:N].
    #[arg(long)]
    device: Option<String>,
    /// Synthetic benchmark size: tiny, small, full, large (default: full, 120 clips per class and
    /// domain; large: 360).
    #[arg(long)]
    scale: Option<String>,
    /// Defaults to follow: paper (default) or released-code.
    #[arg(long)]
    protocol: Option<String>,
    /// torchvision backbone weights converted to safetensors, for every cell (README,
    /// "Weights").
    #[arg(long, value_name = "FILE")]
    backbone_weights: Option<PathBuf>,
    /// A feature cache written by `vdg features`: every cell trains its head on it (temporal
    /// heads only; backbone frozen, ADA in feature space: marked in reports).
    #[arg(long, value_name = "DIR", conflicts_with = "data")]
    features: Option<PathBuf>,
    /// Cells without ADA train this many models (one seed each) and combine them like the
    /// ADA ensemble, for a like-for-like comparison (default 1).
    #[arg(long)]
    ensemble_size: Option<usize>,
    /// How a run's members are combined: max_confidence (ADA's rule, default) or
    /// mean_softmax.
    #[arg(long, value_parser = ["max_confidence", "mean_softmax"])]
    ensemble: Option<String>,
    /// Mixed precision for every cell: trunk convolutions in bf16 or f16 (default f32).
    #[arg(long, value_enum)]
    precision: Option<vdg_trainer::train::Precision>,
    /// Whether every cell recomputes its ResNet trunk's residual blocks in backward instead
    /// of keeping their activations (less memory, more time, the same numbers); default
    /// `auto`: where a batch does not fit otherwise.
    #[arg(long, value_enum)]
    recompute: Option<vdg_trainer::train::RecomputeMode>,
    /// Image ADA (the baselines' `ada` under the paper's protocol): maximisation phases K.
    #[arg(long)]
    ada_phases: Option<usize>,
    /// Image ADA: epochs between maximisation phases (default: epochs / (K + 1)).
    #[arg(long)]
    ada_phase_interval: Option<usize>,
    /// Train ResNet trunks from random weights on a real benchmark under the paper's
    /// protocol (refused by default; such runs are marked in reports).
    #[arg(long)]
    allow_random_init: bool,
    /// Model selection of every cell: source_val (default), target_test (the released
    /// code's oracle; marked in reports), last.
    #[arg(long)]
    selection: Option<String>,
    /// Also train, per direction and model, on each target domain's own train split and test
    /// on its val split: the oracle row, an upper bound for the direction.
    #[arg(long)]
    oracle: bool,
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
    /// Learning-rate schedule (`step` when absent).
    #[serde(default)]
    pub lr_schedule: Option<vdg_trainer::train::LrSchedule>,
    /// Backbone.
    pub backbone: Option<String>,
    /// Input side.
    pub input_size: Option<usize>,
    /// Feature width.
    pub feature_dim: Option<usize>,
    /// Dense clip frames (I3D, Non-local).
    #[serde(default)]
    pub clip_frames: Option<usize>,
    /// Dense clip stride.
    pub clip_stride: Option<usize>,
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
    /// Protocol (`paper` when empty).
    pub protocol: String,
    /// Backbone weights for every cell.
    pub backbone_weights: Option<PathBuf>,
    /// Feature cache for every cell.
    pub features: Option<PathBuf>,
    /// Members of a cell without ADA.
    pub ensemble_size: Option<usize>,
    /// How members are combined (`max_confidence` when absent).
    #[serde(default)]
    pub ensemble: Option<String>,
    /// Trunk arithmetic of every cell (f32 when absent).
    #[serde(default)]
    pub precision: Option<vdg_trainer::train::Precision>,
    /// Residual blocks recomputed in backward in every cell (`auto` when absent).
    #[serde(default)]
    pub recompute: Option<vdg_trainer::train::RecomputeMode>,
    /// Image ADA phases.
    pub ada_phases: Option<usize>,
    /// Image ADA phase interval.
    pub ada_phase_interval: Option<usize>,
    /// Random-init ResNets allowed on real benchmarks.
    pub allow_random_init: bool,
    /// Model selection.
    pub selection: Option<String>,
    /// Oracle rows.
    pub oracle: bool,
}

impl BenchConfig {
    /// Defaults: for `synthetic` and its `synthetic_*` variants, a CPU-sized setting that
    /// runs in minutes; for real benchmarks, the paper's settings.
    fn defaults(benchmark: &str) -> Self {
        let synthetic = vdg_data::manifest::is_synthetic_benchmark(benchmark);
        BenchConfig {
            benchmark: benchmark.into(),
            data: None,
            models: vec!["tsn".into(), "trn".into(), "apn".into()],
            ada: vec!["none".into(), "default".into()],
            directions: vec![],
            // The embedded benchmark's runs are short: its seeds buy the interval of a
            // mean (datasets.md, "Seed spread against the training budget").
            seeds: if synthetic { 8 } else { 3 },
            epochs: synthetic.then_some(4),
            batch_size: synthetic.then_some(16),
            lr: synthetic.then_some(0.005),
            lr_schedule: None,
            backbone: synthetic.then(|| "small_cnn".into()),
            input_size: synthetic.then_some(32),
            feature_dim: synthetic.then_some(32),
            clip_frames: None,
            clip_stride: None,
            gammas: synthetic.then(|| vec![0.1]),
            ada_steps: synthetic.then_some(1),
            projection_dropout: synthetic.then_some(0.2),
            device: "cpu".into(),
            scale: "full".into(),
            protocol: "paper".into(),
            backbone_weights: None,
            features: None,
            ensemble_size: None,
            ensemble: None,
            precision: None,
            recompute: None,
            ada_phases: None,
            ada_phase_interval: None,
            allow_random_init: false,
            selection: None,
            oracle: false,
        }
    }
}

/// How many cells [`BenchRunArgs::jobs`] trains at once for these options.
pub fn jobs(a: &BenchRunArgs) -> Result<usize> {
    if let Some(n) = a.jobs {
        if n == 0 {
            bail!("--jobs must be at least 1");
        }
        return Ok(n);
    }
    let cfg = resolve_config(a)?;
    let cpu = cfg.device.is_empty() || cfg.device == "cpu";
    Ok(
        if vdg_data::manifest::is_synthetic_benchmark(&cfg.benchmark)
            && cfg.features.is_none()
            && cpu
        {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            1
        },
    )
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
            lr_schedule,
            backbone,
            input_size,
            feature_dim,
            clip_frames,
            clip_stride,
            gammas,
            ada_steps,
            projection_dropout,
            device,
            scale,
            protocol,
            backbone_weights,
            features,
            ensemble_size,
            ensemble,
            precision,
            recompute,
            ada_phases,
            ada_phase_interval,
            allow_random_init,
            selection,
            oracle
        );
    }
    macro_rules! flag {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { c.$f = v.clone().into(); } )* };
    }
    flag!(models, ada, directions, seeds, device, scale, protocol);
    if a.allow_random_init {
        c.allow_random_init = true;
    }
    if a.oracle {
        c.oracle = true;
    }
    macro_rules! opt {
        ($($f:ident),*) => { $( if a.$f.is_some() { c.$f = a.$f.clone(); } )* };
    }
    opt!(
        data,
        epochs,
        batch_size,
        lr,
        lr_schedule,
        backbone,
        input_size,
        feature_dim,
        clip_frames,
        clip_stride,
        gammas,
        ada_steps,
        backbone_weights,
        features,
        ensemble_size,
        ensemble,
        precision,
        recompute,
        ada_phases,
        ada_phase_interval,
        selection
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

/// The variant `setting` names for `model`: `default` is the variant of the paper's Table 1
/// (APN + ADA*, every baseline + ADA: Table 1's TRN + ADA is 53.28 / 70.36, Table 2's
/// single-layer row, not ADA*'s 52.56 / 69.68).
pub fn ada_for(setting: &str, model: ModelKind) -> Result<AdaVariant> {
    Ok(match setting {
        "default" => match model {
            ModelKind::Apn => AdaVariant::AdaStar,
            _ => AdaVariant::Ada,
        },
        other => AdaVariant::from_name(other)?,
    })
}

fn slug(direction: &str) -> String {
    direction.replace("->", "_to_").replace(',', "+")
}

/// Runs (or resumes) the matrix `a` describes and writes the four reports; a changed
/// configuration is refused unless `--force`.
pub fn run_matrix(a: &BenchRunArgs, host: &Host<'_>) -> Result<MatrixOutcome> {
    matrix(a, host, false)
}

/// The plan of a bench: prepares the data, checks every cell, writes `bench.toml` and
/// `plan.json` (the numbered cell list `--cell` and `--part` select from) and trains
/// nothing. Run it once before starting workers on a shared folder.
pub fn plan_matrix(a: &BenchRunArgs, host: &Host<'_>) -> Result<MatrixOutcome> {
    matrix(a, host, true)
}

/// `plan.json`: the numbered cells of a bench.
pub const PLAN_FILE: &str = "plan.json";

/// One cell of `plan.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedCell {
    /// Its number (`--cell K`).
    pub cell: usize,
    /// Its run folder, relative to the bench folder.
    pub run: String,
    /// Direction.
    pub direction: String,
    /// Model.
    pub model: String,
    /// ADA variant, or `oracle-<target>`.
    pub variant: String,
    /// Seed.
    pub seed: u64,
}

/// Cells of `plan.json` in `out` whose run folder has no finished run.
pub fn missing_cells(out: &Path) -> Result<Option<Vec<PlannedCell>>> {
    let path = out.join(PLAN_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let cells: Vec<PlannedCell> =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        cells
            .into_iter()
            .filter(|c| {
                let dir = out.join(&c.run);
                !(dir.join("metrics.json").exists() && dir.join("bench.json").exists())
            })
            .collect(),
    ))
}

fn matrix(a: &BenchRunArgs, host: &Host<'_>, plan_only: bool) -> Result<MatrixOutcome> {
    let cfg = resolve_config(a)?;
    // Only some cells: other workers share the folder, so nothing common is made here.
    let partial = !a.cell.is_empty() || a.part.is_some();
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
    // Data: a feature cache, a prep folder, or the synthetic benchmark made on demand.
    let data = match (&cfg.features, &cfg.data, cfg.benchmark.as_str()) {
        (Some(f), _, _) => f.clone(),
        (None, Some(d), _) => d.clone(),
        (None, None, b)
            if vdg_data::manifest::is_synthetic_benchmark(b)
                && vdg_data::manifest::BUILTIN_MANIFESTS
                    .iter()
                    .any(|(n, _)| *n == b) =>
        {
            let d = out.join("data").join(b);
            if partial && !d.join(vdg_data::shard::PREP_FILE).exists() {
                bail!(
                    "{} has no prepared data: run `vdg bench plan` with the same options once \
                     before starting workers with --cell or --part",
                    out.display()
                );
            }
            if !d.join(vdg_data::shard::PREP_FILE).exists() {
                tracing::info!(
                    "preparing the synthetic benchmark {b} ({}) in {}",
                    cfg.scale,
                    d.display()
                );
            }
            if !partial {
                (host.prepare_synthetic)(&d, b, &cfg.scale)
                    .with_context(|| format!("preparing the synthetic benchmark {b}"))?;
            }
            d
        }
        (None, None, other) => {
            bail!(
                "--data (a folder written by `vdg prep`) or --features (one written by `vdg \
                 features`) is needed for benchmark {other:?}"
            )
        }
    };
    let prep: serde_json::Value = match &cfg.features {
        Some(f) => {
            vdg_trainer::features::FeaturesRecord::open(f)?
                .with_context(|| format!("{} is not a vdg features folder", f.display()))?
                .prep
        }
        None => serde_json::from_str(
            &std::fs::read_to_string(data.join(vdg_data::shard::PREP_FILE))
                .with_context(|| format!("reading {}/prep.json", data.display()))?,
        )?,
    };
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
    // The matrix; a variant named twice (`default` and `ada`) runs once.
    let mut specs = Vec::new();
    for d in &directions {
        for m in &cfg.models {
            let model = ModelKind::from_name(m)?;
            let mut variants: Vec<AdaVariant> = Vec::new();
            for setting in &cfg.ada {
                let ada = ada_for(setting, model)?;
                if !variants.contains(&ada) {
                    variants.push(ada);
                }
            }
            for ada in variants {
                for seed in 0..cfg.seeds {
                    specs.push((d.clone(), model, ada, seed, None::<String>));
                }
            }
            // The oracle: trained and tested on each target domain's own splits.
            if cfg.oracle {
                let targets = manifest
                    .directions
                    .iter()
                    .find(|x| x.to_string() == d.replace(' ', ""))
                    .map(|x| x.targets.clone())
                    .with_context(|| {
                        format!("benchmark {} has no direction {d:?}", cfg.benchmark)
                    })?;
                for t in targets {
                    for seed in 0..cfg.seeds {
                        specs.push((d.clone(), model, AdaVariant::None, seed, Some(t.clone())));
                    }
                }
            }
        }
    }
    // Every cell resolves (and passes the pretrained-weights rule) before any trains.
    let cell_args = |d: &str,
                     model: ModelKind,
                     ada: AdaVariant,
                     seed: u64,
                     oracle: Option<String>,
                     dir: PathBuf| TrainArgs {
        // An oracle tests on the target's val split: it takes the last epoch.
        selection: if oracle.is_some() {
            Some("last".into())
        } else {
            cfg.selection.clone()
        },
        oracle,
        data: cfg.features.is_none().then(|| data.clone()),
        features: cfg.features.clone(),
        direction: d.to_string(),
        model,
        ada,
        out: dir,
        protocol: if cfg.protocol.is_empty() {
            "paper".into()
        } else {
            cfg.protocol.clone()
        },
        backbone: if cfg.features.is_some() {
            None
        } else {
            cfg.backbone.clone()
        },
        backbone_weights: cfg.backbone_weights.clone(),
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        lr_schedule: cfg.lr_schedule,
        gammas: cfg.gammas.clone(),
        ada_steps: cfg.ada_steps,
        ensemble: cfg.ensemble.clone(),
        input_size: cfg.input_size,
        feature_dim: cfg.feature_dim,
        clip_frames: cfg.clip_frames,
        clip_stride: cfg.clip_stride,
        projection_dropout: cfg.projection_dropout,
        seed,
        device: cfg.device.clone(),
        ensemble_size: cfg.ensemble_size,
        precision: cfg.precision,
        recompute: cfg.recompute,
        ada_phases: cfg.ada_phases,
        ada_phase_interval: cfg.ada_phase_interval,
        resume: true,
        stall_timeout: a.stall_timeout,
    };
    for (d, model, ada, seed, oracle) in &specs {
        let (record, _) = resolve(
            &cell_args(d, *model, *ada, *seed, oracle.clone(), out.join("check")),
            host.git_revision,
        )?;
        if !cfg.allow_random_init
            && let Some(problem) = crate::cell::random_init_problem(
                &record.train,
                &record.benchmark,
                cfg.features.is_some(),
            )
        {
            bail!("{problem}");
        }
    }
    // The configuration is recorded once every cell has passed its checks. Workers on a
    // shared folder (`--cell`, `--part`) write nothing common: the plan did, and they
    // checked above that their configuration is the planned one.
    if partial {
        if !cfg_path.exists() || !out.join(PLAN_FILE).exists() {
            bail!(
                "{} has no plan: run `vdg bench plan` with the same options once before \
                 starting workers with --cell or --part",
                out.display()
            );
        }
    } else {
        vdg_data::atomic::AtomicFile::write_all(&cfg_path, text.as_bytes())?;
    }
    let total = specs.len();
    let planned: Vec<PlannedCell> = specs
        .iter()
        .enumerate()
        .map(|(k, (d, model, ada, seed, oracle))| {
            let variant = match oracle {
                Some(t) => format!("oracle-{t}"),
                None => ada.name().to_string(),
            };
            PlannedCell {
                cell: k,
                run: format!(
                    "runs/{}/{}/{}/{variant}/seed-{seed}",
                    cfg.benchmark,
                    slug(d),
                    model.name(),
                ),
                direction: d.clone(),
                model: model.name().to_owned(),
                variant,
                seed: *seed,
            }
        })
        .collect();
    if !partial {
        vdg_data::atomic::AtomicFile::write_all(
            &out.join(PLAN_FILE),
            serde_json::to_string_pretty(&planned)?.as_bytes(),
        )?;
    }
    if plan_only {
        return Ok(MatrixOutcome {
            leaderboard: None,
            ran: 0,
            cells: total,
            wall_secs: 0.0,
            out,
        });
    }
    if let Some(k) = a.cell.iter().find(|&&k| k >= total) {
        bail!(
            "--cell {k}: the plan has cells 0..{} (see {PLAN_FILE})",
            total - 1
        );
    }
    // The cells in the order `--cell` names them (the `--jobs` parent lists the costly
    // ones first), else in plan order.
    let order: Vec<usize> = if a.cell.is_empty() {
        (0..total).collect()
    } else {
        let mut seen = vec![false; total];
        a.cell
            .iter()
            .copied()
            .filter(|&k| !std::mem::replace(&mut seen[k], true))
            .collect()
    };
    let order: Vec<usize> = order
        .into_iter()
        .filter(|&k| a.part.is_none_or(|(i, n)| k % n as usize == i as usize))
        .collect();
    let started = Instant::now();
    host.progress.start(order.len());
    let mut ran = 0;
    let locks = out.join(".locks");
    for k in order {
        let (d, model, ada, seed, oracle) = specs[k].clone();
        let rel = planned[k].run.clone();
        let dir = out.join(&rel);
        // Two workers never train the same cell: the second one skips it.
        std::fs::create_dir_all(&locks).with_context(|| format!("creating {}", locks.display()))?;
        let lock_path = locks.join(format!("cell-{k}.lock"));
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(
                    "[{}/{total}] {rel}: running in another worker; skipped",
                    k + 1
                );
                continue;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
        ran += 1;
        let args = cell_args(&d, model, ada, seed, oracle, dir.clone());
        let (record, spec) = resolve(&args, host.git_revision)?;
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
                host.progress.cell_done();
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
        host.progress.cell_done();
    }
    if partial {
        return Ok(MatrixOutcome {
            leaderboard: None,
            ran,
            cells: total,
            wall_secs: started.elapsed().as_secs_f64(),
            out,
        });
    }
    let leaderboard = collect(&out, host.git_revision)?;
    write_reports(&out, &leaderboard)?;
    Ok(MatrixOutcome {
        leaderboard: Some(leaderboard),
        ran,
        cells: total,
        wall_secs: started.elapsed().as_secs_f64(),
        out,
    })
}

/// The four report files [`write_reports`] writes, in the order they are listed to users.
pub const REPORT_FILES: [&str; 4] = [
    "leaderboard.md",
    "leaderboard.json",
    "leaderboard.csv",
    "leaderboard.html",
];

/// Reads every finished run folder under `<out>/runs` (`git_revision`: the tool's, used
/// when no run records one).
pub fn collect(out: &Path, git_revision: &str) -> Result<Leaderboard> {
    let mut runs = Vec::new();
    let mut fingerprints = BTreeMap::new();
    let mut classes = BTreeMap::new();
    let mut git = git_revision.to_owned();
    let mut model_notes = BTreeMap::new();
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
            // Oracle runs aggregate on their own (over seeds and target domains).
            ada: if record.oracle.is_some() {
                "oracle".into()
            } else {
                record.train.ada.name().into()
            },
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
            members: metrics.members.len().max(1),
            member_mean_top1: member_mean(&metrics),
            ada_method: record.ada_method.clone(),
            deviations: record.deviations.clone(),
            source_val_top1: selected_source_val(&metrics),
            chance: 100.0 / n.max(1) as f64,
        });
        if !model_notes.contains_key(&record.benchmark)
            && let Some(m) = manifest_of(Path::new(&record.data))
        {
            model_notes.insert(record.benchmark.clone(), m.model_notes);
        }
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
        model_notes,
    })
}

/// The source-validation top-1 of each member's selected epoch, averaged over the members
/// (`None` when no member recorded a validation accuracy for it).
fn selected_source_val(metrics: &Metrics) -> Option<f64> {
    if metrics.source_val_clips == 0 {
        return None;
    }
    let v: Vec<f64> = metrics
        .members
        .iter()
        .filter_map(|m| {
            m.epochs
                .iter()
                .find(|e| e.epoch == m.selected_epoch)
                .map(|e| e.source_val_top1)
        })
        .collect();
    (!v.is_empty() && v.len() == metrics.members.len())
        .then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The manifest a prepared folder or feature cache was made with.
fn manifest_of(data: &Path) -> Option<Manifest> {
    let prep: serde_json::Value =
        match std::fs::read_to_string(data.join(vdg_data::shard::PREP_FILE)) {
            Ok(t) => serde_json::from_str(&t).ok()?,
            Err(_) => {
                vdg_trainer::features::FeaturesRecord::open(data)
                    .ok()??
                    .prep
            }
        };
    Manifest::from_toml(prep["manifest_toml"].as_str()?, data).ok()
}

/// The members' own top-1 over all target clips, averaged over the members.
fn member_mean(metrics: &Metrics) -> Option<f64> {
    let total: usize = metrics.targets.values().map(|t| t.clips).sum();
    if metrics.members.is_empty() || total == 0 {
        return None;
    }
    let per_member = metrics.members.iter().map(|m| {
        metrics
            .targets
            .iter()
            .map(|(name, t)| m.target_top1.get(name).copied().unwrap_or(0.0) * t.clips as f64)
            .sum::<f64>()
            / total as f64
    });
    Some(per_member.sum::<f64>() / metrics.members.len() as f64)
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

/// Writes `leaderboard.{json,md,csv,html}` into `out` (each atomically).
pub fn write_reports(out: &Path, lb: &Leaderboard) -> Result<()> {
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
