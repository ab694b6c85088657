//! Training: the epoch loop of every member of a run.
//!
//! A run trains one model per `gamma` with ADA (or `ensemble_size` models, one per seed,
//! without) in `member-<i>/`, each: SGD with momentum, step-decayed learning rate,
//! gradient-norm clipping, and ADA as [`TrainConfig::ada_method`] says (video ADA per
//! minibatch, [`crate::step`]; or the image ADA's maximisation phases, [`crate::image_ada`]);
//! source-validation top-1 after every epoch, and after every epoch one atomic checkpoint
//! ([`crate::checkpoint`]) holding everything a resume needs. At the end each member's
//! selected weights are evaluated on every target domain and the members are combined
//! ([`crate::evaluate`]).
//!
//! Random streams: parameter initialisation, dropout masks, relation subsets and data
//! sampling each draw from their own seed, derived from the run seed and the member index.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::ada::{AdaConfig, AdaVariant, TransportCost};
use crate::checkpoint::{self, Commit, FaultHook, MemberState};
use crate::error::{Error, Result};
pub use crate::evaluate::{
    EnsembleRule, EpochRecord, MemberMetrics, Metrics, Selection, TargetMetrics, ensemble, predict,
    target_metrics, top1,
};
use crate::image_ada::{self, AugmentedSet, ImageAdaPlan};
use crate::init::seeded_init;
use crate::loader::{ClipSet, LoaderConfig, batches};
use crate::models::blocks::resnet::is_frozen_bn;
use crate::models::blocks::{Backbone, BackboneKind, PROJECTION_DROPOUT};
use crate::models::weights::load_backbone_weights;
use crate::models::{ModelConfig, ModelKind, VideoModel, build_head, build_network};
use crate::nn::{dropout_state, seed_dropout};
use crate::optim::{SgdMomentum, SgdParams};
use crate::step::{AdaStep, At, Minimisation, RngSnapshot, Updater, iteration};
use vdg_data::split::derive_seed;

/// Which protocol the defaults follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The APN paper: 150 epochs, decay every 30, gamma-ensemble over {0.001, 0.01, 0.1, 1},
    /// model selection on source validation.
    Paper,
    /// The released VideoDG code: 200 epochs, decay at 30/60/90/120, one gamma (0.01),
    /// random relation subsets; its target-test model selection stays a separate, flagged
    /// option (`selection`).
    ReleasedCode,
}

/// What ADA perturbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdaSpace {
    /// The input pixels (the paper).
    #[default]
    Pixels,
    /// Cached per-frame backbone features (`vdg train --features`): the backbone is frozen
    /// and not run, so the adversarial copies live in feature space. A deviation from the
    /// paper, recorded in every run's config.
    Features,
}

/// Everything a run needs; written to `config.toml` before training starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Defaults followed.
    pub protocol: Protocol,
    /// Temporal model.
    pub model: ModelKind,
    /// Per-frame backbone.
    pub backbone: BackboneKind,
    /// Optional safetensors with backbone weights (torchvision names).
    pub backbone_weights: Option<PathBuf>,
    /// Model settings.
    pub model_config: ModelConfig,
    /// ADA variant.
    pub ada: AdaVariant,
    /// Ascent step size.
    pub ada_eta: f64,
    /// Ascent steps.
    pub ada_t_max: usize,
    /// One member per gamma (ignored without ADA: one member).
    pub gammas: Vec<f64>,
    /// Combination of members.
    pub ensemble: EnsembleRule,
    /// Epochs.
    pub epochs: usize,
    /// Clips per batch.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Epochs at which the learning rate is multiplied by `lr_decay`.
    pub lr_milestones: Vec<usize>,
    /// Learning-rate factor at each milestone.
    pub lr_decay: f64,
    /// How the learning rate falls over the run: at `lr_milestones` (the paper) or along a
    /// half cosine, batch by batch.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clip.
    pub clip_norm: f64,
    /// Input side S.
    pub input_size: usize,
    /// Dropout before the backbone projection.
    pub projection_dropout: f32,
    /// Model selection.
    pub selection: Selection,
    /// Seed of everything.
    pub seed: u64,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// Pixels, or cached features (set from the data folder).
    #[serde(default)]
    pub ada_space: AdaSpace,
    /// Image ADA (the baselines' `ada` under the paper's protocol): maximisation phases K.
    #[serde(default = "default_phases")]
    pub ada_phases: usize,
    /// Image ADA: epochs per stage (default: epochs / (K + 1)).
    #[serde(default)]
    pub ada_phase_interval: Option<usize>,
    /// Training flips clips horizontally (off where the manifest says left and right tell
    /// classes apart).
    #[serde(default = "default_flip")]
    pub horizontal_flip: bool,
    /// Models without ADA: members of one seed each, combined by `ensemble` like ADA's
    /// gamma-ensemble, for a like-for-like comparison (default 1).
    #[serde(default = "default_ensemble_size")]
    pub ensemble_size: usize,
    /// Arithmetic of the trunk's convolutions (mixed precision); float32 everywhere else.
    #[serde(default)]
    pub precision: Precision,
    /// Whether training recomputes the trunk's residual blocks in backward instead of
    /// keeping their activations ([`crate::recompute`]): less memory, more time, the same
    /// numbers.
    #[serde(default)]
    pub recompute: RecomputeMode,
}

/// How the learning rate falls over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Multiplied by `lr_decay` at each of `lr_milestones` (the paper: x0.1 every 30 epochs)
    #[default]
    Step,
    /// From the base rate to 0 along a half cosine over all the run's batches (milestones
    /// ignored)
    Cosine,
}

impl LrSchedule {
    /// The name used by the CLI and in reports.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Step => "step",
            LrSchedule::Cosine => "cosine",
        }
    }
}

/// When training recomputes a ResNet trunk's residual blocks in backward
/// ([`crate::recompute`]: the same values and gradients, less memory, a second forward pass
/// of the blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeMode {
    // (`crate::memcheck::choose`; the doc line below is the --help text.)
    /// Only where the memory check finds that the step does not fit otherwise but fits so
    /// (CPU pixel training; where memory is not measured, e.g. VDG_MEMORY_CHECK=off: as off)
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// Arithmetic of the trunk's convolutions: `f32` (default), or `bf16` / `f16` mixed
/// precision (float32 weights, BatchNorm, heads and loss; [`crate::nn3d::Autocast`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// float32 throughout.
    #[default]
    F32,
    /// Trunk convolutions in bfloat16 (tensor cores on Ampere and newer).
    Bf16,
    /// Trunk convolutions in float16.
    F16,
}

impl Precision {
    /// The dtype trunk convolutions compute in (`None` for float32).
    pub fn trunk_dtype(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }

    /// The name as the CLI and config files spell it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

fn default_phases() -> usize {
    image_ada::DEFAULT_PHASES
}

fn default_flip() -> bool {
    true
}

fn default_ensemble_size() -> usize {
    1
}

/// How ADA enters a run, resolved from the protocol, the model and the variant.
#[derive(Debug, Clone, PartialEq)]
pub enum AdaMethod {
    /// Plain training.
    None,
    /// Video ADA per minibatch (Algorithm 1) against these features.
    Video {
        /// Targeted features, one copy each.
        targets: Vec<&'static str>,
        /// How the copies are trained on.
        minimisation: Minimisation,
    },
    /// The original image ADA: maximisation phases growing the dataset.
    Image(ImageAdaPlan),
}

impl AdaMethod {
    /// One line for config files and reports.
    pub fn describe(&self) -> String {
        match self {
            AdaMethod::None => "none".into(),
            AdaMethod::Video {
                targets,
                minimisation,
            } => format!(
                "video ADA per minibatch (Algorithm 1) against {}; cost: mean squared; {}",
                targets.join(" and "),
                match minimisation {
                    Minimisation::Sequential =>
                        "anchors: line 4's features, before line 5's update; minimisation: clean update, then one update per copy through its own classifier (lines 5, 13, 14)",
                    Minimisation::Joint =>
                        "anchors: the clean features computed anew at every ascent step, fresh dropout and subsets each forward, BatchNorm statistics moved by each; minimisation: one joint update on the clean batch and the copies (released code)",
                }
            ),
            AdaMethod::Image(p) => format!(
                "image ADA (Volpi et al. 2018) against the last hidden feature; cost: 1/2 ||z - z0||^2 per clip; \
                 {} maximisation phases, one every {} epochs, each appending a copy of every training clip",
                p.phases, p.interval
            ),
        }
    }
}

impl TrainConfig {
    /// The paper's settings for `model` with `ada`.
    pub fn paper(model: ModelKind, ada: AdaVariant) -> Self {
        TrainConfig {
            protocol: Protocol::Paper,
            model,
            backbone: BackboneKind::Resnet50,
            backbone_weights: None,
            model_config: ModelConfig {
                head_dropout: model.classifier_dropout(),
                ..ModelConfig::default()
            },
            ada,
            ada_eta: 1.0,
            ada_t_max: 5,
            gammas: vec![0.001, 0.01, 0.1, 1.0],
            ensemble: EnsembleRule::MaxConfidence,
            epochs: 150,
            batch_size: 40,
            lr: 1e-3,
            lr_milestones: (1..5).map(|k| 30 * k).collect(),
            lr_decay: 0.1,
            lr_schedule: LrSchedule::Step,
            momentum: 0.9,
            weight_decay: 5e-4,
            clip_norm: 20.0,
            input_size: 224,
            projection_dropout: PROJECTION_DROPOUT,
            selection: Selection::SourceVal,
            seed: 0,
            device: "cpu".into(),
            ada_space: AdaSpace::Pixels,
            ada_phases: image_ada::DEFAULT_PHASES,
            ada_phase_interval: None,
            horizontal_flip: true,
            ensemble_size: 1,
            precision: Precision::F32,
            recompute: RecomputeMode::Auto,
        }
    }

    /// The released code's settings.
    pub fn released_code(model: ModelKind, ada: AdaVariant) -> Self {
        let mut c = Self::paper(model, ada);
        c.protocol = Protocol::ReleasedCode;
        c.epochs = 200;
        c.lr_milestones = vec![30, 60, 90, 120];
        c.gammas = vec![0.01];
        c.model_config.subsets = crate::models::SubsetRule::Combinations;
        c
    }

    /// The gammas that get a member each (0 for every member without ADA).
    pub fn members(&self) -> Vec<f64> {
        if self.ada == AdaVariant::None || self.gammas.is_empty() {
            vec![0.0; self.ensemble_size.max(1)]
        } else {
            self.gammas.clone()
        }
    }

    /// What ADA does in this run: the baselines' `ada` under the paper's protocol is the
    /// original image ADA (§5.2); APN, the multilayer variants and the released code's
    /// protocol use video ADA per minibatch (Algorithm 1).
    pub fn ada_method(&self) -> Result<AdaMethod> {
        if self.ada == AdaVariant::None {
            return Ok(AdaMethod::None);
        }
        let targets = self.ada.targets(self.model)?;
        if self.protocol == Protocol::Paper
            && self.ada == AdaVariant::Ada
            && self.model != ModelKind::Apn
        {
            return Ok(AdaMethod::Image(ImageAdaPlan::new(
                self.ada_phases,
                self.ada_phase_interval,
                self.epochs,
            )));
        }
        Ok(AdaMethod::Video {
            targets,
            minimisation: match self.protocol {
                Protocol::Paper => Minimisation::Sequential,
                Protocol::ReleasedCode => Minimisation::Joint,
            },
        })
    }

    /// Learning rate at the start of 0-based `epoch`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr_at_batch(epoch, 0, 1)
    }

    /// Learning rate for batch `batch` (0-based) of the `batches` of 0-based `epoch`.
    pub fn lr_at_batch(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        match self.lr_schedule {
            LrSchedule::Step => {
                let k = self.lr_milestones.iter().filter(|&&m| epoch >= m).count();
                self.lr * self.lr_decay.powi(k as i32)
            }
            LrSchedule::Cosine => {
                let t = (epoch as f64 + batch as f64 / batches.max(1) as f64)
                    / self.epochs.max(1) as f64;
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        }
    }
}

/// Where a run's data comes from and goes to.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Prepared folder.
    pub data: PathBuf,
    /// Source domain.
    pub source: String,
    /// Target domains.
    pub targets: Vec<String>,
    /// Test only this source split of the targets (`val` for an oracle run, which trains
    /// on the target domain's own `train` split); `None`: every target clip.
    pub target_split: Option<String>,
    /// Class names by label.
    pub classes: Vec<String>,
    /// Run folder.
    pub out: PathBuf,
}

/// Progress of a run, for bars and logs.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// A member starts (or resumes) training.
    Member {
        /// 0-based member.
        index: usize,
        /// Its gamma.
        gamma: f64,
        /// Epoch it starts at (0-based; more than 0 when resumed).
        start_epoch: usize,
        /// Total epochs.
        epochs: usize,
        /// Batches per epoch.
        batches: usize,
    },
    /// A batch was trained.
    Batch {
        /// 0-based epoch.
        epoch: usize,
        /// Its loss.
        loss: f32,
    },
    /// An epoch ended.
    Epoch {
        /// Its record.
        record: &'a EpochRecord,
    },
}

/// Receives [`TrainEvent`]s.
pub trait TrainProgress {
    /// Called for each event.
    fn event(&self, event: &TrainEvent<'_>);
}

impl<F: Fn(&TrainEvent<'_>)> TrainProgress for F {
    fn event(&self, event: &TrainEvent<'_>) {
        self(event)
    }
}

/// The seeds of one member's random streams.
#[derive(Debug, Clone, Copy)]
struct Streams {
    init: u64,
    dropout: u64,
    subsets: u64,
    data: u64,
}

impl Streams {
    fn of(seed: u64, member: usize) -> Self {
        let d = |what: &str| derive_seed(seed, &format!("{what}/member/{member}"));
        Streams {
            init: d("init"),
            dropout: d("dropout"),
            subsets: d("subsets"),
            data: d("data"),
        }
    }
}

/// The model's structure under `vb` (no initialisation).
fn structure(
    cfg: &TrainConfig,
    classes: usize,
    streams: Streams,
    feature_dim: Option<usize>,
    vb: VarBuilder,
) -> Result<VideoModel> {
    let mc = &cfg.model_config;
    if cfg.model.is_head() {
        let backbone = match feature_dim {
            Some(dim) => Backbone::cached(
                dim,
                mc.feature_dim,
                cfg.projection_dropout,
                vb.pp("backbone"),
            )?,
            None => Backbone::new(
                cfg.backbone,
                mc.feature_dim,
                cfg.projection_dropout,
                vb.pp("backbone"),
            )?,
        };
        let head = build_head(cfg.model, mc, classes, streams.subsets, vb.pp("head"))?;
        Ok(VideoModel::frames(backbone, head, cfg.model)
            .with_trunk_dtype(cfg.precision.trunk_dtype())
            .with_recompute(cfg.recompute == RecomputeMode::On))
    } else {
        if feature_dim.is_some() {
            return Err(Error::Config(format!(
                "{} mixes time inside its backbone, so it cannot train on cached frame \
                 features; give it the prepared frames (--data)",
                cfg.model.name()
            )));
        }
        let net = build_network(cfg.model, mc, cfg.backbone, classes, vb.pp("backbone"))?;
        Ok(VideoModel::network(net, cfg.model)
            .with_trunk_dtype(cfg.precision.trunk_dtype())
            .with_recompute(cfg.recompute == RecomputeMode::On))
    }
}

fn build(
    cfg: &TrainConfig,
    classes: usize,
    streams: Streams,
    feature_dim: Option<usize>,
    device: &Device,
) -> Result<(VarMap, VideoModel)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
    let model = structure(cfg, classes, streams, feature_dim, vb)?;
    seeded_init(&vm, streams.init)?;
    if let Some(std) = cfg.model.classifier_init_std() {
        crate::init::normal_classifier(
            &vm,
            cfg.model.classifier_name(),
            std,
            derive_seed(streams.init, "classifier"),
        )?;
    }
    if let Some(w) = &cfg.backbone_weights {
        if feature_dim.is_some() {
            return Err(Error::Config(
                "backbone weights are baked into a feature cache; drop --backbone-weights".into(),
            ));
        }
        load_backbone_weights(&vm, w)?;
    }
    Ok((vm, model))
}

/// The model on detached copies of `vm`'s current values ([`crate::step::Twin`]); with
/// `share_statistics`, on `vm`'s own BatchNorm running statistics, which its training-mode
/// forward passes then update.
fn twin(
    cfg: &TrainConfig,
    classes: usize,
    streams: Streams,
    feature_dim: Option<usize>,
    vm: &VarMap,
    device: &Device,
    share_statistics: bool,
) -> Result<VideoModel> {
    let values = if share_statistics {
        crate::init::detached_sharing_statistics(vm)?
    } else {
        crate::init::detached(vm)?
    };
    let vb = VarBuilder::from_tensors(values, DType::F32, device);
    structure(cfg, classes, streams, feature_dim, vb)
}
fn io(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: e,
    }
}

/// Trains every member of the run (resuming what `out` already holds when `resume`), then
/// evaluates and writes `metrics.json`.
pub fn train(
    spec: &RunSpec,
    cfg: &TrainConfig,
    resume: bool,
    progress: &dyn TrainProgress,
) -> Result<Metrics> {
    train_with(spec, cfg, resume, progress, None)
}

/// [`train`] with a fault hook on every checkpoint commit (tests).
pub fn train_with(
    spec: &RunSpec,
    cfg: &TrainConfig,
    resume: bool,
    progress: &dyn TrainProgress,
    fault: FaultHook<'_>,
) -> Result<Metrics> {
    let device = crate::device::device(&cfg.device)?;
    if cfg.precision == Precision::Bf16 && device.is_cpu() {
        return Err(Error::Config(
            "--precision bf16 needs a CUDA device: candle's CPU matrix product has no bfloat16 \
             (use f16 on the CPU, or f32)"
                .into(),
        ));
    }
    let classes = spec.classes.len();
    if cfg.epochs == 0 {
        return Err(Error::Config("epochs must be at least 1".into()));
    }
    let train_set = ClipSet::open(
        &spec.data,
        std::slice::from_ref(&spec.source),
        Some("train"),
    )?;
    let val_set = ClipSet::open(&spec.data, std::slice::from_ref(&spec.source), Some("val"))?;
    if train_set.is_empty() {
        return Err(Error::Config(format!(
            "{}: no usable training videos in domain {:?}",
            spec.data.display(),
            spec.source
        )));
    }
    if val_set.is_empty() && cfg.selection == Selection::SourceVal {
        return Err(Error::Config(format!(
            "{}: the source domain {:?} has no usable validation videos, so no epoch can be \
             selected on them; prepare a validation split or train with --selection last",
            spec.data.display(),
            spec.source
        )));
    }
    let target_sets: Vec<(String, ClipSet)> = spec
        .targets
        .iter()
        .map(|t| {
            Ok((
                t.clone(),
                ClipSet::open(
                    &spec.data,
                    std::slice::from_ref(t),
                    spec.target_split.as_deref(),
                )?,
            ))
        })
        .collect::<Result<_>>()?;
    let space = if train_set.feature_dim.is_some() {
        AdaSpace::Features
    } else {
        AdaSpace::Pixels
    };
    if space != cfg.ada_space {
        return Err(Error::Config(format!(
            "{}: the configuration says ada_space = {:?} but the folder holds {}",
            spec.data.display(),
            cfg.ada_space,
            if space == AdaSpace::Features {
                "cached features"
            } else {
                "frames"
            }
        )));
    }
    let method = cfg.ada_method()?;
    let sampling = cfg.model.sampling(&cfg.model_config);
    let eval = |model: &VideoModel, set: &ClipSet| {
        predict(
            model,
            set,
            sampling,
            cfg.input_size,
            cfg.batch_size,
            &device,
        )
    };
    // Evaluation runs on a detached copy of the current weights: candle keeps the whole
    // forward graph of a batch alive while its inputs include variables (every activation
    // of a ResNet trunk: 9 GB for 64 frames of ResNet-50 at 224), and on constants a CPU
    // ResNet trunk runs channels-last (`crate::infer`). Same values: evaluation draws no
    // random numbers, and the copy's forward is the same function.
    let twin_of = |vm: &VarMap, streams: Streams, share_statistics: bool| {
        twin(
            cfg,
            classes,
            streams,
            train_set.feature_dim,
            vm,
            &device,
            share_statistics,
        )
    };
    let eval_on = |vm: &VarMap, streams: Streams, set: &ClipSet| {
        let copy = twin_of(vm, streams, false)?;
        eval(&copy, set)
    };
    // `--recompute auto` is decided here, before any member is built from `cfg`.
    let mut decided = cfg.clone();
    // The memory check's estimate of one step, compared with the first step run.
    let mut planned_step: Option<f64> = None;
    if train_set.feature_dim.is_none() && device.is_cpu() {
        let estimate;
        // Before any member trains: a throw-away copy of the model (the probe moves its
        // BatchNorm statistics and random streams; each member re-seeds its own).
        let (probe_vars, probe) = build(cfg, classes, Streams::of(cfg.seed, 0), None, &device)?;
        let parameter_bytes: usize = probe_vars
            .all_vars()
            .iter()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum();
        let clips_per_update = match &method {
            AdaMethod::Video {
                targets,
                minimisation: Minimisation::Joint,
            } => 1 + targets.len(),
            _ => 1,
        };
        let recomputable = matches!(
            cfg.backbone,
            BackboneKind::Resnet18 | BackboneKind::Resnet50
        ) && (cfg.model.is_head() || cfg.model == ModelKind::Tsm);
        let plan = crate::memcheck::Plan {
            batch: cfg.batch_size,
            clips_per_update,
            frames: sampling.frames(),
            size: cfg.input_size,
            in_flight: 2,
            could_recompute: recomputable && cfg.recompute == RecomputeMode::Off,
            recomputing: recomputable && cfg.recompute == RecomputeMode::On,
            update_bytes: 2.0 * parameter_bytes as f64,
        };
        if recomputable && cfg.recompute == RecomputeMode::Auto {
            let mut on = cfg.clone();
            on.recompute = RecomputeMode::On;
            let (_, recomputing) = build(&on, classes, Streams::of(cfg.seed, 0), None, &device)?;
            let (choice, memory) = crate::memcheck::choose(&recomputing, &probe, plan)?;
            decided.recompute = match choice {
                crate::memcheck::Choice::Keep => RecomputeMode::Off,
                crate::memcheck::Choice::Recompute => RecomputeMode::On,
            };
            estimate = memory;
        } else {
            estimate = crate::memcheck::check(&probe, plan)?;
        }
        // What the first step should allocate, the loader's batches in flight beside it
        // included (the loader keeps filling them while the step runs).
        planned_step = estimate.map(|m| {
            m.need(
                plan.batch * plan.clips_per_update,
                plan.batch,
                plan.in_flight,
                plan.input_per_clip(),
            )
        });
    }
    let cfg = &decided;
    let mut member_probs: Vec<BTreeMap<String, Vec<Vec<f32>>>> = Vec::new();
    let mut members = Vec::new();
    for (index, gamma) in cfg.members().into_iter().enumerate() {
        let dir = spec.out.join(format!("member-{index}"));
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let streams = Streams::of(cfg.seed, index);
        seed_dropout(streams.dropout);
        let (vm, model) = build(cfg, classes, streams, train_set.feature_dim, &device)?;
        let params = SgdParams {
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            nesterov: false,
        };
        // Partial BN only on a pretrained trunk: from random weights every BatchNorm learns.
        let partial_bn = train_set.feature_dim.is_none()
            && cfg.backbone_weights.is_some()
            && matches!(
                cfg.backbone,
                BackboneKind::Resnet18 | BackboneKind::Resnet50
            );
        let mut opt = SgdMomentum::from_varmap(&vm, params, |n| {
            !(crate::init::is_running_statistic(n) || (partial_bn && is_frozen_bn(n)))
        })?;
        let mut state = MemberState {
            epochs_done: 0,
            history: Vec::new(),
            best_epoch: 0,
            best_score: f64::MIN,
            dropout_rng: dropout_state(),
            sampler_rng: model.sampler().and_then(|s| s.state()),
        };
        checkpoint::remove_unfinished(&dir)?;
        if resume && let Some((epoch, ckpt)) = checkpoint::latest(&dir)? {
            state = checkpoint::read_state(&ckpt)?;
            let mut vm_mut = vm.clone();
            vm_mut.load(ckpt.join(checkpoint::WEIGHTS))?;
            opt.load_state(&checkpoint::read_optim(&ckpt, &device)?)?;
            RngSnapshot::from_parts(state.dropout_rng, state.sampler_rng).restore(&model);
            tracing::info!("member {index}: resuming after epoch {epoch}");
        }
        let lc = LoaderConfig {
            sampling,
            input_size: cfg.input_size,
            train: true,
            batch_size: cfg.batch_size,
            flip: cfg.horizontal_flip,
            seed: streams.data,
        };
        let ada_cfg = AdaConfig {
            eta: cfg.ada_eta,
            t_max: cfg.ada_t_max,
            gamma,
            cost: TransportCost::MeanSquared,
        };
        let step = match &method {
            AdaMethod::Video {
                targets,
                minimisation,
            } => AdaStep {
                targets: targets.clone(),
                cfg: ada_cfg,
                minimisation: *minimisation,
            },
            AdaMethod::None | AdaMethod::Image(_) => AdaStep::plain(),
        };
        // Image ADA: the phases a resumed run has already been through.
        let mut augmented = AugmentedSet::default();
        if let AdaMethod::Image(plan) = &method {
            for k in 1..=plan.phases_before(state.epochs_done) {
                augmented.load_phase(&dir, k)?;
            }
        }
        let source_batches = train_set.len().div_ceil(cfg.batch_size.max(1));
        progress.event(&TrainEvent::Member {
            index,
            gamma,
            start_epoch: state.epochs_done,
            epochs: cfg.epochs,
            batches: source_batches,
        });
        for epoch in state.epochs_done..cfg.epochs {
            if let AdaMethod::Image(plan) = &method
                && let Some(k) = plan.phase_before(epoch)
            {
                let path = image_ada::phase_path(&dir, k);
                if path.exists() {
                    augmented.load_phase(&dir, k)?;
                } else {
                    tracing::info!(
                        "member {index}: image ADA phase {k} before epoch {}",
                        epoch + 1
                    );
                    // The ascent needs only the input's gradient: run it on detached weights
                    // that replay the model's random streams.
                    let frozen = twin_of(&vm, streams, false)?;
                    RngSnapshot::take(&model).restore(&frozen);
                    let (clips, labels) =
                        image_ada::run_phase(&frozen, &train_set, lc, k, &ada_cfg, &dir, &device)?;
                    augmented.append(&clips, &labels)?;
                }
            }
            // Set batch by batch below; the record keeps the epoch's first rate.
            let lr = cfg.lr_at(epoch);
            let (mut sum, mut count) = (0.0f64, 0usize);
            let adv_batches = augmented.batches(
                cfg.batch_size,
                derive_seed(streams.data, &format!("image-ada/epoch/{epoch}")),
                &device,
            )?;
            let order = image_ada::interleave(
                source_batches,
                adv_batches.len(),
                derive_seed(streams.data, &format!("interleave/epoch/{epoch}")),
            );
            let mut source = batches(&train_set, lc, epoch, device.clone());
            let mut adv = adv_batches.into_iter();
            let mut up = Updater {
                opt: &mut opt,
                clip_norm: cfg.clip_norm,
            };
            let in_epoch = order.len();
            for (bi, is_adv) in order.into_iter().enumerate() {
                up.opt
                    .set_learning_rate(cfg.lr_at_batch(epoch, bi, in_epoch));
                let (x, y) = if is_adv {
                    adv.next()
                        .ok_or_else(|| Error::Config("image ADA batches ran out".into()))?
                } else {
                    match source.next() {
                        Some(b) => {
                            let b = b?;
                            (b.clips, b.labels)
                        }
                        None => continue,
                    }
                };
                let at = At { epoch, batch: bi };
                // The released code's ascent runs on the model in training mode, so its
                // forward passes move the BatchNorm statistics; Algorithm 1's here do not.
                let frozen = || twin_of(&vm, streams, cfg.protocol == Protocol::ReleasedCode);
                let watch = planned_step
                    .take()
                    .and_then(crate::memcheck::FirstStep::start);
                let losses = iteration(&model, &mut up, &x, &y, &step, Some(&frozen), at)?;
                if let Some(w) = watch {
                    w.finish();
                }
                sum += f64::from(losses.main);
                count += 1;
                progress.event(&TrainEvent::Batch {
                    epoch,
                    loss: losses.main,
                });
            }
            let source_val_top1 = if val_set.is_empty() {
                0.0
            } else {
                let val_labels: Vec<u32> = val_set.videos.iter().map(|v| v.label).collect();
                top1(&eval_on(&vm, streams, &val_set)?, &val_labels)
            };
            let target_top1 = if cfg.selection == Selection::TargetTest {
                let mut m = BTreeMap::new();
                for (name, set) in &target_sets {
                    let labels: Vec<u32> = set.videos.iter().map(|v| v.label).collect();
                    m.insert(name.clone(), top1(&eval_on(&vm, streams, set)?, &labels));
                }
                Some(m)
            } else {
                None
            };
            let record = EpochRecord {
                epoch: epoch + 1,
                loss: if count > 0 { sum / count as f64 } else { 0.0 },
                lr,
                source_val_top1,
                target_top1: target_top1.clone(),
            };
            let score = match cfg.selection {
                Selection::SourceVal => source_val_top1,
                Selection::TargetTest => {
                    let t = target_top1.unwrap_or_default();
                    t.values().sum::<f64>() / t.len().max(1) as f64
                }
                Selection::Last => (epoch + 1) as f64,
            };
            let improved = score > state.best_score;
            if improved {
                state.best_score = score;
                state.best_epoch = epoch + 1;
            }
            progress.event(&TrainEvent::Epoch { record: &record });
            state.history.push(record);
            state.epochs_done = epoch + 1;
            let snap = RngSnapshot::take(&model);
            (state.dropout_rng, state.sampler_rng) = snap.parts();
            checkpoint::commit(
                &dir,
                &Commit {
                    vars: &vm,
                    optim: &opt.state(),
                    improved,
                    state: &state,
                },
                fault,
            )?;
        }
        // Evaluate the selected weights.
        let (_, ckpt) = checkpoint::latest(&dir)?
            .ok_or_else(|| Error::Config(format!("{}: no checkpoint", dir.display())))?;
        let mut vm_best = vm.clone();
        vm_best.load(ckpt.join(checkpoint::BEST))?;
        let mut probs = BTreeMap::new();
        let mut member_top1 = BTreeMap::new();
        for (name, set) in &target_sets {
            let p = eval_on(&vm, streams, set)?;
            let labels: Vec<u32> = set.videos.iter().map(|v| v.label).collect();
            member_top1.insert(name.clone(), top1(&p, &labels));
            probs.insert(name.clone(), p);
        }
        member_probs.push(probs);
        members.push(MemberMetrics {
            gamma,
            epochs: state.history,
            selected_epoch: state.best_epoch,
            target_top1: member_top1,
        });
    }
    let mut targets_out = BTreeMap::new();
    for (name, set) in &target_sets {
        let all: Vec<Vec<Vec<f32>>> = member_probs.iter().map(|m| m[name].clone()).collect();
        let combined = ensemble(&all, cfg.ensemble);
        let labels: Vec<u32> = set.videos.iter().map(|v| v.label).collect();
        targets_out.insert(name.clone(), target_metrics(&combined, &labels, classes));
    }
    let metrics = Metrics {
        classes: spec.classes.clone(),
        members,
        targets: targets_out,
        selection: cfg.selection,
        source_val_clips: val_set.len(),
    };
    let json = serde_json::to_vec_pretty(&metrics).map_err(|e| Error::Config(e.to_string()))?;
    vdg_data::atomic::AtomicFile::write_all(&spec.out.join("metrics.json"), &json)?;
    Ok(metrics)
}

/// The momentum-buffer map type, for callers that save optimizer state themselves.
pub type OptimState = std::collections::HashMap<String, Tensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_members_and_ada_methods() {
        let c = TrainConfig::paper(ModelKind::Apn, AdaVariant::AdaStar);
        assert_eq!(c.lr_at(0), 1e-3);
        assert!((c.lr_at(30) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(149) - 1e-7).abs() < 1e-15);
        // The step schedule does not move within an epoch.
        assert_eq!(c.lr_at_batch(29, 9, 10), 1e-3);
        // Cosine: the base rate at the start, half at mid-run, falling batch by batch, near 0
        // on the last batch; the milestones play no part.
        let mut cos = c.clone();
        cos.lr_schedule = LrSchedule::Cosine;
        cos.epochs = 4;
        assert_eq!(cos.lr_at(0), 1e-3);
        assert!((cos.lr_at(2) - 0.5e-3).abs() < 1e-15);
        assert!(cos.lr_at_batch(1, 3, 10) < cos.lr_at_batch(1, 2, 10));
        let last = cos.lr_at_batch(3, 9, 10);
        assert!(last > 0.0 && last < 1e-5, "{last}");
        // A config written before the option existed reads as the step schedule.
        let text = toml::to_string(&c)
            .unwrap()
            .replace("lr_schedule = \"step\"\n", "");
        assert!(!text.contains("lr_schedule"));
        let old: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(old, c);
        assert_eq!(c.members(), [0.001, 0.01, 0.1, 1.0]);
        let mut plain = TrainConfig::paper(ModelKind::Tsn, AdaVariant::None);
        assert_eq!(plain.members(), [0.0]);
        plain.ensemble_size = 4;
        assert_eq!(plain.members(), [0.0; 4]);
        assert_eq!(plain.ada_method().unwrap(), AdaMethod::None);
        // APN's ADA* under the paper: Algorithm 1's sequential updates.
        assert_eq!(
            c.ada_method().unwrap(),
            AdaMethod::Video {
                targets: vec!["level2", "level3"],
                minimisation: Minimisation::Sequential
            }
        );
        // The baselines' `ada` under the paper: the original image ADA.
        for m in [
            ModelKind::Tsn,
            ModelKind::Trn,
            ModelKind::TrnAttn,
            ModelKind::Tsm,
            ModelKind::I3d,
            ModelKind::NonLocal,
        ] {
            let c = TrainConfig::paper(m, AdaVariant::Ada);
            assert_eq!(
                c.ada_method().unwrap(),
                AdaMethod::Image(ImageAdaPlan {
                    phases: 2,
                    interval: 50
                }),
                "{}",
                m.name()
            );
            // The released code has only Algorithm 1's joint step.
            let r = TrainConfig::released_code(m, AdaVariant::Ada);
            assert!(matches!(
                r.ada_method().unwrap(),
                AdaMethod::Video {
                    minimisation: Minimisation::Joint,
                    ..
                }
            ));
        }
        // The classifiers start as their reference implementations'.
        for (kind, std, drop) in [
            (ModelKind::Tsn, 0.001, 0.0),
            (ModelKind::Tsm, 0.001, 0.5),
            (ModelKind::I3d, 0.01, 0.5),
        ] {
            let mut c = TrainConfig::paper(kind, AdaVariant::None);
            assert_eq!(c.model_config.head_dropout, drop, "{}", kind.name());
            c.backbone = BackboneKind::Resnet18;
            c.model_config.feature_dim = 64;
            let (vm, _) = build(&c, 12, Streams::of(0, 0), None, &Device::Cpu).unwrap();
            let data = vm.data().lock().unwrap();
            let w: Vec<f32> = data[&format!("{}.weight", kind.classifier_name())]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let sd = (w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
            assert!((sd / std - 1.0).abs() < 0.2, "{}: std {sd}", kind.name());
            let b: Vec<f32> = data[&format!("{}.bias", kind.classifier_name())]
                .as_tensor()
                .to_vec1()
                .unwrap();
            assert!(b.iter().all(|v| *v == 0.0));
        }
        // APN's single-layer ADA stays video ADA (Table 2's "APN+ADA").
        assert!(matches!(
            TrainConfig::paper(ModelKind::Apn, AdaVariant::Ada)
                .ada_method()
                .unwrap(),
            AdaMethod::Video { .. }
        ));
    }
}
