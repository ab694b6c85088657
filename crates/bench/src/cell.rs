//! One training run ("cell"): its arguments (`vdg train`'s, and each cell of a bench
//! matrix), their resolution against the prepared data into a [`RunRecord`] (`config.toml`),
//! what departs from the paper's protocol, and the run folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use vdg_data::Manifest;
use vdg_trainer::ada::AdaVariant;
use vdg_trainer::models::ModelKind;
use vdg_trainer::models::blocks::BackboneKind;
use vdg_trainer::train::{AdaSpace, EnsembleRule, Protocol, RunSpec, Selection, TrainConfig};

/// Train a model on one direction of a prepared benchmark and test it on the target domains.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A folder written by `vdg prep`.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "features",
        conflicts_with = "features"
    )]
    pub data: Option<PathBuf>,
    /// A feature cache written by `vdg features`: trains a temporal head (tsn, trn,
    /// trn_attn, apn) on cached backbone features, backbone frozen; ADA then perturbs the
    /// features (`ada_space = "features"` in config.toml, a deviation from the paper).
    #[arg(long, value_name = "DIR")]
    pub features: Option<PathBuf>,
    /// Direction as the manifest names it: `ucf->hmdb`, `L->C,R`.
    #[arg(long)]
    pub direction: String,
    /// Model: a temporal head (tsn, trn, trn_attn, apn) or a whole network (tsm, i3d,
    /// non_local: need --backbone resnet18 or resnet50; i3d and non_local read dense
    /// --clip-frames windows).
    #[arg(long, value_enum, default_value = "apn")]
    pub model: ModelKind,
    /// ADA variant: `ada` attacks the last hidden feature, `ada_star` the multilayer ones.
    #[arg(long, value_enum, default_value = "none")]
    pub ada: AdaVariant,
    /// Run folder (config.toml, train.log, metrics.json, member-*/ checkpoints).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Defaults to follow: paper, released-code.
    #[arg(long, default_value = "paper")]
    pub protocol: String,
    /// Per-frame backbone: small_cnn, resnet18, resnet50.
    #[arg(long)]
    pub backbone: Option<String>,
    /// torchvision backbone weights converted to safetensors (see README).
    #[arg(long, value_name = "FILE")]
    pub backbone_weights: Option<PathBuf>,
    /// Epochs (paper: 150).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Clips per batch (paper: 40).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate (paper: 0.001, x0.1 every 30 epochs).
    #[arg(long)]
    pub lr: Option<f64>,
    /// How the learning rate falls: step (the paper's milestones, default) or cosine.
    #[arg(long, value_enum)]
    pub lr_schedule: Option<vdg_trainer::train::LrSchedule>,
    /// Gammas of the ensemble, comma-separated (paper: 0.001,0.01,0.1,1).
    #[arg(long, value_delimiter = ',')]
    pub gammas: Option<Vec<f64>>,
    /// ADA ascent steps (paper: 5).
    #[arg(long)]
    pub ada_steps: Option<usize>,
    /// Combination of ensemble members: max_confidence, mean_softmax.
    #[arg(long)]
    pub ensemble: Option<String>,
    /// Input side in pixels (paper: 224).
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Frame feature width D (paper: 256).
    #[arg(long)]
    pub feature_dim: Option<usize>,
    /// Frames of a dense clip for i3d and non_local (default 32).
    #[arg(long)]
    pub clip_frames: Option<usize>,
    /// Frames between two frames of a dense clip of i3d and non_local (default 2: 32 x 2).
    #[arg(long)]
    pub clip_stride: Option<usize>,
    /// Dropout before the backbone's projection (paper: 0.8).
    #[arg(long)]
    pub projection_dropout: Option<f32>,
    /// Model selection: source_val (default), target_test (the released code's oracle
    /// selection: flagged in the metrics), last.
    #[arg(long)]
    pub selection: Option<String>,
    /// Seed of initialisation, sampling, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, or cuda[:N] (builds with the `cuda` feature only; never falls back to CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Without ADA: train N models (one seed each) and combine them like ADA's
    /// gamma-ensemble, for a like-for-like comparison with an ADA ensemble (default 1).
    #[arg(long)]
    pub ensemble_size: Option<usize>,
    /// Mixed precision: the trunk's convolutions in bf16 or f16 (weights, BatchNorm, heads
    /// and loss stay float32); default f32. Marked as a deviation.
    #[arg(long, value_enum)]
    pub precision: Option<vdg_trainer::train::Precision>,
    /// Recompute a ResNet trunk's residual blocks in backward instead of keeping their
    /// activations (gradient checkpointing): less memory for a second forward pass of the
    /// blocks, the same numbers. `auto` (default): only where the memory check finds that
    /// the batch does not fit otherwise.
    #[arg(long, value_enum)]
    pub recompute: Option<vdg_trainer::train::RecomputeMode>,
    /// Image ADA (the baselines' `ada` under --protocol paper): maximisation phases K
    /// (default 2).
    #[arg(long)]
    pub ada_phases: Option<usize>,
    /// Image ADA: epochs between maximisation phases (default: epochs / (K + 1)).
    #[arg(long)]
    pub ada_phase_interval: Option<usize>,
    /// An oracle run, the upper bound of a direction: train on the target domain DOMAIN's own
    /// `train` split (epoch selected on its `val` split) and test on its `val` split (no ADA).
    #[arg(long, value_name = "DOMAIN")]
    pub oracle: Option<String>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop with an error naming the files being read when no batch comes from them for
    /// this many seconds (a network file system that stopped answering), instead of waiting
    /// for ever. 0: wait for ever. Changes no result.
    #[arg(long, default_value_t = vdg_trainer::loader::DEFAULT_STALL_TIMEOUT_SECS, value_name = "SECS")]
    pub stall_timeout: u64,
}

/// `config.toml` of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Tool version.
    pub tool_version: String,
    /// Git revision of the tool.
    pub git_revision: String,
    /// Prepared data folder.
    pub data: String,
    /// Its prep fingerprint.
    pub data_fingerprint: String,
    /// Benchmark.
    pub benchmark: String,
    /// Direction.
    pub direction: String,
    /// What ADA does in this run, in words.
    #[serde(default)]
    pub ada_method: String,
    /// Where the run departs from the paper's protocol (§5.1), one line each; reports mark
    /// such runs and never show a paper row as comparable to them without the mark.
    #[serde(default)]
    pub deviations: Vec<String>,
    /// For an oracle run, the target domain it trained and tested on.
    #[serde(default)]
    pub oracle: Option<String>,
    /// The resolved training configuration.
    pub train: TrainConfig,
}

/// Where `c` (on `benchmark`, from a feature cache when `features`) departs from the
/// paper's protocol.
pub fn deviations(c: &TrainConfig, benchmark: &str, features: bool) -> Vec<String> {
    let paper = TrainConfig::paper(c.model, c.ada);
    let mut d = Vec::new();
    if vdg_data::manifest::is_synthetic_benchmark(benchmark) {
        d.push("embedded synthetic benchmark (no paper numbers)".to_string());
    }
    if c.protocol == Protocol::ReleasedCode {
        d.push("protocol: released-code (200 epochs, one gamma, random subsets; ADA as one joint step)".into());
    }
    match c.selection {
        Selection::SourceVal => {}
        Selection::TargetTest => {
            d.push("model selection on target-test accuracy (the released code's oracle)".into())
        }
        Selection::Last => d.push("model selection: the last epoch".into()),
    }
    if features {
        d.push("frozen backbone: trained on cached features, ADA in feature space".into());
    }
    if c.precision != vdg_trainer::train::Precision::F32 && !features {
        d.push(format!(
            "mixed precision: trunk convolutions in {} (paper: float32)",
            c.precision.name()
        ));
    }
    if c.model == ModelKind::TrnAttn {
        d.push(
            "TRN-ATTN attends the g features only (§5.3 also attends h; ARCHITECTURE.md says why)"
                .into(),
        );
    }
    let resnet = matches!(c.backbone, BackboneKind::Resnet18 | BackboneKind::Resnet50);
    if c.backbone != BackboneKind::Resnet50 {
        d.push(format!("backbone {} (paper: ResNet-50)", c.backbone.name()));
    }
    if resnet && !features && c.backbone_weights.is_none() {
        d.push("no pretrained weights: the ResNet trunk starts from random weights".into());
    }
    let mut budget = Vec::new();
    if c.epochs != paper.epochs && c.protocol == Protocol::Paper {
        budget.push(format!("epochs {} (150)", c.epochs));
    }
    if c.batch_size != paper.batch_size {
        budget.push(format!("batch {} (40)", c.batch_size));
    }
    if c.input_size != paper.input_size {
        budget.push(format!("input {} (224)", c.input_size));
    }
    if c.model_config.feature_dim != paper.model_config.feature_dim {
        budget.push(format!("D {} (256)", c.model_config.feature_dim));
    }
    if (c.lr - paper.lr).abs() > 1e-12 {
        budget.push(format!("lr {} (0.001)", c.lr));
    }
    if c.lr_schedule != paper.lr_schedule {
        budget.push(format!(
            "lr schedule {} (x0.1 every 30 epochs)",
            c.lr_schedule.name()
        ));
    }
    if c.ada == AdaVariant::None && c.ensemble_size > 1 {
        budget.push(format!(
            "{} models of their own seeds combined per run (one)",
            c.ensemble_size
        ));
    }
    let members = if c.ada == AdaVariant::None {
        c.ensemble_size
    } else {
        c.gammas.len()
    };
    if members > 1 && c.ensemble == EnsembleRule::MeanSoftmax {
        budget.push("members' softmax averaged (ADA: the most confident member)".into());
    }
    if c.ada != AdaVariant::None {
        if c.gammas != paper.gammas && c.protocol == Protocol::Paper {
            let g: Vec<String> = c.gammas.iter().map(|g| g.to_string()).collect();
            budget.push(format!("gammas {} (0.001,0.01,0.1,1)", g.join(",")));
        }
        if c.ada_t_max != paper.ada_t_max {
            budget.push(format!("ascent steps {} (5)", c.ada_t_max));
        }
    }
    if !budget.is_empty() {
        d.push(format!(
            "settings differ from the paper: {}",
            budget.join(", ")
        ));
    }
    d
}

/// The error (bench) or warning (train) text for a ResNet trunk from random weights on a
/// real benchmark under the paper's protocol, if that is the case.
pub fn random_init_problem(c: &TrainConfig, benchmark: &str, features: bool) -> Option<String> {
    let resnet = matches!(c.backbone, BackboneKind::Resnet18 | BackboneKind::Resnet50);
    (c.protocol == Protocol::Paper
        && !vdg_data::manifest::is_synthetic_benchmark(benchmark)
        && resnet
        && !features
        && c.backbone_weights.is_none())
    .then(|| {
        format!(
            "{} on {benchmark}: the paper trains from ImageNet-pretrained weights, and this run \
             would start its {} trunk from random weights. Convert torchvision's weights once \
             (README, \"Weights\") and pass --backbone-weights resnet50.safetensors, or train on a \
             feature cache (--features); --allow-random-init runs it anyway (marked in reports)",
            c.model.name(),
            c.backbone.name()
        )
    })
}

fn parse<T>(what: &str, v: &str, f: impl Fn(&str) -> Option<T>, known: &str) -> Result<T> {
    f(v).with_context(|| format!("unknown {what} {v:?}; known: {known}"))
}

/// Resolves the arguments into a run record (protocol defaults, then flags); `git_revision`
/// is the tool's, recorded in `config.toml`.
pub fn resolve(a: &TrainArgs, git_revision: &str) -> Result<(RunRecord, RunSpec)> {
    let (data, prep, features) = match (&a.data, &a.features) {
        (_, Some(f)) => {
            let record = vdg_trainer::features::FeaturesRecord::open(f)?.with_context(|| {
                format!(
                    "{} has no {} (is --features a vdg features folder?)",
                    f.display(),
                    vdg_trainer::features::FEATURES_FILE
                )
            })?;
            (f.clone(), record.prep.clone(), Some(record))
        }
        (Some(d), None) => {
            let prep_path = d.join(vdg_data::shard::PREP_FILE);
            let prep: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&prep_path).with_context(|| {
                    format!(
                        "reading {} (is --data a vdg prep folder?)",
                        prep_path.display()
                    )
                })?)
                .with_context(|| format!("parsing {}", prep_path.display()))?;
            (d.clone(), prep, None)
        }
        (None, None) => bail!("give --data <prep folder> or --features <feature folder>"),
    };
    let prep_path = data.join(vdg_data::shard::PREP_FILE);
    let manifest_text = prep["manifest_toml"]
        .as_str()
        .context("prep.json has no manifest")?;
    let manifest = Manifest::from_toml(manifest_text, &prep_path)?;
    let dir = manifest
        .directions
        .iter()
        .find(|d| d.to_string() == a.direction.replace(' ', ""))
        .with_context(|| {
            format!(
                "benchmark {} has no direction {:?}; it has {}",
                manifest.name,
                a.direction,
                manifest
                    .directions
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let (model, ada) = (a.model, a.ada);
    let mut c = match a.protocol.as_str() {
        "paper" => TrainConfig::paper(model, ada),
        "released-code" => TrainConfig::released_code(model, ada),
        other => bail!("unknown protocol {other:?}; known: paper, released-code"),
    };
    let _: Protocol = c.protocol;
    c.model_config.segments = manifest.segments as usize;
    c.horizontal_flip = manifest.horizontal_flip;
    if let Some(b) = &a.backbone {
        c.backbone = BackboneKind::from_name(b)?;
    }
    if let Some(f) = &features {
        if !model.is_head() {
            bail!(
                "{} mixes time inside its backbone and cannot train on cached features; use --data",
                model.name()
            );
        }
        if a.backbone
            .as_deref()
            .is_some_and(|b| BackboneKind::from_name(b).ok() != Some(f.backbone))
        {
            bail!(
                "the feature cache was computed with {}; --backbone cannot change it",
                f.backbone.name()
            );
        }
        c.backbone = f.backbone;
        c.ada_space = AdaSpace::Features;
    }
    if let Some(v) = a.clip_frames {
        c.model_config.clip_frames = v.max(1);
    }
    if let Some(v) = a.clip_stride {
        c.model_config.clip_stride = v.max(1);
    }
    c.backbone_weights = a.backbone_weights.clone();
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v.max(1);
    }
    if let Some(v) = a.lr {
        c.lr = v;
    }
    if let Some(v) = a.lr_schedule {
        c.lr_schedule = v;
    }
    if let Some(v) = &a.gammas {
        c.gammas = v.clone();
    }
    if let Some(v) = a.ada_steps {
        c.ada_t_max = v;
    }
    if let Some(v) = &a.ensemble {
        c.ensemble = parse(
            "ensemble rule",
            v,
            |s| match s {
                "max_confidence" => Some(EnsembleRule::MaxConfidence),
                "mean_softmax" => Some(EnsembleRule::MeanSoftmax),
                _ => None,
            },
            "max_confidence, mean_softmax",
        )?;
    }
    if let Some(v) = a.input_size {
        c.input_size = v;
    }
    if let Some(d) = a.feature_dim {
        c.model_config.feature_dim = d;
        c.model_config.attention.width = d;
        c.model_config.trn_bottleneck = d;
    }
    if let Some(v) = a.projection_dropout {
        c.projection_dropout = v;
    }
    if let Some(v) = &a.selection {
        c.selection = parse(
            "selection",
            v,
            |s| match s {
                "source_val" => Some(Selection::SourceVal),
                "target_test" => Some(Selection::TargetTest),
                "last" => Some(Selection::Last),
                _ => None,
            },
            "source_val, target_test, last",
        )?;
    }
    if let Some(v) = a.ensemble_size {
        if v == 0 {
            bail!("--ensemble-size must be at least 1");
        }
        c.ensemble_size = v;
    }
    if let Some(v) = a.ada_phases {
        c.ada_phases = v;
    }
    if let Some(v) = a.precision {
        c.precision = v;
    }
    if let Some(v) = a.recompute {
        c.recompute = v;
    }
    if let Some(v) = a.ada_phase_interval {
        if v == 0 {
            bail!("--ada-phase-interval must be at least 1");
        }
        c.ada_phase_interval = Some(v);
    }
    c.seed = a.seed;
    c.device = a.device.clone();
    let ada_method = c.ada_method()?.describe();
    let deviations = deviations(&c, &manifest.name, features.is_some());
    let record = RunRecord {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git_revision.into(),
        data: data.display().to_string(),
        data_fingerprint: match &features {
            Some(f) => f.fingerprint.clone(),
            None => prep["fingerprint"].as_str().unwrap_or_default().into(),
        },
        benchmark: manifest.name.clone(),
        direction: dir.to_string(),
        ada_method,
        deviations,
        oracle: a.oracle.clone(),
        train: c,
    };
    let (source, targets, target_split) = match &a.oracle {
        None => (dir.source.clone(), dir.targets.clone(), None),
        Some(t) => {
            if !dir.targets.contains(t) {
                bail!(
                    "--oracle {t}: direction {dir} has targets {}",
                    dir.targets.join(", ")
                );
            }
            if a.ada != AdaVariant::None {
                bail!("an oracle run (--oracle) trains without ADA; drop --ada");
            }
            if record.train.selection != Selection::Last {
                bail!(
                    "an oracle run tests on the target's val split, so it cannot select its \
                     epoch there: add --selection last"
                );
            }
            (t.clone(), vec![t.clone()], Some("val".to_string()))
        }
    };
    let spec = RunSpec {
        data,
        source,
        targets,
        target_split,
        classes: manifest.classes.iter().map(|c| c.name.clone()).collect(),
        out: a.out.clone(),
    };
    Ok((record, spec))
}

/// Writes or checks the run folder's `config.toml`.
pub fn prepare_run_folder(out: &Path, record: &RunRecord, resume: bool) -> Result<()> {
    let path = out.join("config.toml");
    let text = toml::to_string(record).context("serialising the run config")?;
    if path.exists() {
        let old: RunRecord = toml::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let mut a = old.clone();
        let mut b = record.clone();
        a.git_revision.clear();
        b.git_revision.clear();
        if !resume {
            bail!(
                "{} already holds a run; pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        if a != b {
            bail!(
                "{} was started with another configuration; --resume needs the same arguments (see its config.toml)",
                out.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    vdg_data::atomic::AtomicFile::write_all(&path, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget_line(c: &TrainConfig) -> String {
        deviations(c, "ucf-hmdb", false)
            .into_iter()
            .find(|d| d.starts_with("settings differ"))
            .unwrap_or_default()
    }

    #[test]
    fn ensembles_beyond_the_papers_are_marked() {
        let mut c = TrainConfig::paper(ModelKind::Trn, AdaVariant::None);
        assert_eq!(budget_line(&c), "");
        // A plain run of several models is not the paper's single model.
        c.ensemble_size = 3;
        assert!(budget_line(&c).contains("3 models of their own seeds combined per run"));
        c.ensemble = EnsembleRule::MeanSoftmax;
        assert!(budget_line(&c).contains("members' softmax averaged"));
        // One model: the rule combines nothing.
        c.ensemble_size = 1;
        assert_eq!(budget_line(&c), "");
        // ADA's gamma-ensemble is the paper's; only the rule departs from it.
        let mut a = TrainConfig::paper(ModelKind::Trn, AdaVariant::Ada);
        assert_eq!(budget_line(&a), "");
        a.ensemble = EnsembleRule::MeanSoftmax;
        assert!(budget_line(&a).contains("members' softmax averaged"));
        assert!(!budget_line(&a).contains("models of their own seeds"));
    }
}
