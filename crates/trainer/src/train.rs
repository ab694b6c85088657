//! Training and evaluation: the run folder, checkpoints, resume, model selection, the
//! gamma-ensemble and metrics.
//!
//! A run trains one model per `gamma` (one in all when ADA is off) in `member-<i>/`, each:
//! SGD with momentum, step-decayed learning rate, gradient-norm clipping, video ADA per
//! minibatch; source-validation top-1 after every epoch, the best epoch's weights kept
//! (`best.safetensors`), and everything needed to resume after a crash saved after every
//! epoch (`last.safetensors`: weights; `last-optim.safetensors`: momentum buffers;
//! `last.json`: epoch, RNG states, history). At the end each member's selected weights are
//! evaluated on every target domain and the members are combined (the original ADA rule: per
//! clip, the prediction of the most confident member).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::ada::{AdaConfig, AdaVariant, adversarial_copies};
use crate::error::{Error, Result};
use crate::init::seeded_init;
use crate::loader::{ClipSet, LoaderConfig, batches};
use crate::models::blocks::resnet::is_frozen_bn;
use crate::models::blocks::{Backbone, BackboneKind, PROJECTION_DROPOUT};
use crate::models::{ModelConfig, ModelKind, VideoModel, build_head, build_network};
use crate::nn::{cross_entropy, dropout_state, seed_dropout, set_dropout_state};
use crate::optim::{SgdMomentum, SgdParams, clip_grad_norm};

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

/// How the best epoch is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Best source-validation top-1 (the default; no target labels are looked at).
    SourceVal,
    /// Best target-test top-1: the released code's oracle selection. Flagged in every report.
    TargetTest,
    /// The last epoch.
    Last,
}

/// How gamma-ensemble members are combined at test time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsembleRule {
    /// Per clip, the prediction of the member with the highest softmax confidence (ADA's rule).
    MaxConfidence,
    /// The mean of the members' softmax outputs.
    MeanSoftmax,
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
}

impl TrainConfig {
    /// The paper's settings for `model` with `ada`.
    pub fn paper(model: ModelKind, ada: AdaVariant) -> Self {
        TrainConfig {
            protocol: Protocol::Paper,
            model,
            backbone: BackboneKind::Resnet50,
            backbone_weights: None,
            model_config: ModelConfig::default(),
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
            momentum: 0.9,
            weight_decay: 5e-4,
            clip_norm: 20.0,
            input_size: 224,
            projection_dropout: PROJECTION_DROPOUT,
            selection: Selection::SourceVal,
            seed: 0,
            device: "cpu".into(),
            ada_space: AdaSpace::Pixels,
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

    /// The gammas that get a member each.
    pub fn members(&self) -> Vec<f64> {
        if self.ada == AdaVariant::None || self.gammas.is_empty() {
            vec![0.0]
        } else {
            self.gammas.clone()
        }
    }

    /// Learning rate at 0-based `epoch`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let k = self.lr_milestones.iter().filter(|&&m| epoch >= m).count();
        self.lr * self.lr_decay.powi(k as i32)
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

/// One epoch of one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Source-validation top-1 (%).
    pub source_val_top1: f64,
    /// Target top-1 (%) per domain, only with target-test selection.
    pub target_top1: Option<BTreeMap<String, f64>>,
}

/// What a member's `last.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberState {
    epochs_done: usize,
    history: Vec<EpochRecord>,
    best_epoch: usize,
    best_score: f64,
    dropout_rng: ([u8; 32], u128),
    sampler_rng: Option<([u8; 32], u128)>,
}

/// Accuracy on one target domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetMetrics {
    /// Clips tested.
    pub clips: usize,
    /// Top-1 (%).
    pub top1: f64,
    /// Top-1 (%) per class (`null` for classes without clips).
    pub per_class: Vec<Option<f64>>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u32>>,
}

/// `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Class names by label.
    pub classes: Vec<String>,
    /// Per member: gamma, history, selected epoch.
    pub members: Vec<MemberMetrics>,
    /// The ensemble (or the single model) on each target domain.
    pub targets: BTreeMap<String, TargetMetrics>,
    /// Selection rule used (flagged when it looked at target labels).
    pub selection: Selection,
}

/// One member in `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberMetrics {
    /// Its gamma (0 without ADA).
    pub gamma: f64,
    /// Every epoch.
    pub epochs: Vec<EpochRecord>,
    /// The selected epoch (1-based).
    pub selected_epoch: usize,
    /// Its own top-1 per target.
    pub target_top1: BTreeMap<String, f64>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: e,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    vdg_data::atomic::AtomicFile::write_all(path, bytes)?;
    Ok(())
}

fn save_vars(vm: &VarMap, path: &Path) -> Result<()> {
    let tmp = vdg_data::atomic::tmp_path(path);
    vm.save(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn build(
    cfg: &TrainConfig,
    classes: usize,
    seed: u64,
    feature_dim: Option<usize>,
    device: &Device,
) -> Result<(VarMap, VideoModel)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
    let mc = &cfg.model_config;
    let model = if cfg.model.is_head() {
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
        let head = build_head(cfg.model, mc, classes, seed, vb.pp("head"))?;
        VideoModel::frames(backbone, head, cfg.model)
    } else {
        if feature_dim.is_some() {
            return Err(Error::Config(format!(
                "{} mixes time inside its backbone, so it cannot train on cached frame \
                 features; give it the prepared frames (--data)",
                cfg.model.name()
            )));
        }
        let net = build_network(cfg.model, mc, cfg.backbone, classes, vb.pp("backbone"))?;
        VideoModel::network(net, cfg.model)
    };
    seeded_init(&vm, seed)?;
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

/// The name a tensor of a 3-D checkpoint in mmaction2's layout has in ours
/// (`backbone.layer1.0.conv1.conv.weight` -> `layer1.0.conv1.weight`,
/// `...conv1.bn.bias` -> `...bn1.bias`, `downsample.conv`/`.bn` -> `downsample.0`/`.1`);
/// torchvision names come back unchanged.
pub fn canonical_name(key: &str) -> String {
    let k = key.strip_prefix("backbone.").unwrap_or(key);
    let k = k
        .replace("downsample.conv.", "downsample.0.")
        .replace("downsample.bn.", "downsample.1.");
    let parts: Vec<&str> = k.split('.').collect();
    if parts.len() >= 3 {
        let n = parts.len();
        let (owner, kind) = (parts[n - 3], parts[n - 2]);
        if let Some(idx) = owner
            .strip_prefix("conv")
            .filter(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
        {
            let head = parts[..n - 3].join(".");
            let sep = if head.is_empty() { "" } else { "." };
            match kind {
                "conv" => return format!("{head}{sep}conv{idx}.{}", parts[n - 1]),
                "bn" => return format!("{head}{sep}bn{idx}.{}", parts[n - 1]),
                _ => {}
            }
        }
    }
    k
}

/// Loads torchvision-named backbone weights (`conv1.weight`, `layer1.0.bn1.running_mean`,
/// ...) from a safetensors file into the `backbone.` variables; `fc.*` is ignored. Every
/// backbone variable except the projection must be present.
pub fn load_backbone_weights(vm: &VarMap, path: &Path) -> Result<()> {
    let raw = candle_core::safetensors::load(path, &Device::Cpu)?;
    let tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, v)| (canonical_name(&k), v))
        .collect();
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Config("poisoned VarMap".into()))?;
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| n.starts_with("backbone.") && !n.starts_with("backbone.new_fc"))
        .collect();
    names.sort();
    for name in names {
        let key = &name["backbone.".len()..];
        let var = &data[name];
        let Some(t) = tensors.get(key) else {
            // Non-local blocks are new: ImageNet and I3D checkpoints do not have them.
            if key.contains(".nonlocal.") {
                continue;
            }
            return Err(Error::Config(format!(
                "{}: no tensor {key:?} for the backbone",
                path.display()
            )));
        };
        let t = match (t.dims(), var.dims()) {
            // Inflation: a 2-D kernel [O, I, kh, kw] into a 3-D one [O, I, kt, kh, kw],
            // repeated over the temporal taps and divided by their number.
            (&[o, i, kh, kw], &[o3, i3, kt, kh3, kw3]) if (o, i, kh, kw) == (o3, i3, kh3, kw3) => {
                (t.unsqueeze(2)?.repeat((1, 1, kt, 1, 1))? / kt as f64)?
            }
            (a, b) if a == b => t.clone(),
            (a, b) => {
                return Err(Error::Config(format!(
                    "{}: {key} has shape {a:?}, the model expects {b:?}",
                    path.display()
                )));
            }
        };
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Softmax outputs `[N, C]` of `model` on `set`, in order.
pub fn predict(
    model: &VideoModel,
    set: &ClipSet,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let lc = LoaderConfig {
        sampling: cfg.model.sampling(&cfg.model_config),
        input_size: cfg.input_size,
        train: false,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
    };
    let mut out = Vec::with_capacity(set.len());
    for b in batches(set, lc, 0, device.clone()) {
        let b = b?;
        let logits = model.forward_t(&b.clips, false)?.logits;
        let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        out.extend(p.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

/// Top-1 (%) of predictions against labels.
pub fn top1(probs: &[Vec<f32>], labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let ok = probs
        .iter()
        .zip(labels)
        .filter(|(p, l)| argmax(p) == **l as usize)
        .count();
    100.0 * ok as f64 / labels.len() as f64
}

/// Combines members' softmax outputs by `rule`.
pub fn ensemble(members: &[Vec<Vec<f32>>], rule: EnsembleRule) -> Vec<Vec<f32>> {
    let n = members.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| match rule {
            EnsembleRule::MaxConfidence => members
                .iter()
                .map(|m| &m[i])
                .fold(None::<&Vec<f32>>, |best, p| match best {
                    Some(b)
                        if b.iter().cloned().fold(f32::MIN, f32::max)
                            >= p.iter().cloned().fold(f32::MIN, f32::max) =>
                    {
                        Some(b)
                    }
                    _ => Some(p),
                })
                .cloned()
                .unwrap_or_default(),
            EnsembleRule::MeanSoftmax => {
                let c = members[0][i].len();
                (0..c)
                    .map(|k| members.iter().map(|m| m[i][k]).sum::<f32>() / members.len() as f32)
                    .collect()
            }
        })
        .collect()
}

/// Top-1, per-class accuracy and confusion matrix.
pub fn target_metrics(probs: &[Vec<f32>], labels: &[u32], classes: usize) -> TargetMetrics {
    let mut confusion = vec![vec![0u32; classes]; classes];
    for (p, &l) in probs.iter().zip(labels) {
        let pred = argmax(p).min(classes - 1);
        confusion[l as usize][pred] += 1;
    }
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let n: u32 = row.iter().sum();
            (n > 0).then(|| 100.0 * f64::from(row[c]) / f64::from(n))
        })
        .collect();
    TargetMetrics {
        clips: labels.len(),
        top1: top1(probs, labels),
        per_class,
        confusion,
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
    let device = crate::device::device(&cfg.device)?;
    let classes = spec.classes.len();
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
    let target_sets: Vec<(String, ClipSet)> = spec
        .targets
        .iter()
        .map(|t| {
            Ok((
                t.clone(),
                ClipSet::open(&spec.data, std::slice::from_ref(t), None)?,
            ))
        })
        .collect::<Result<_>>()?;
    let targets_by_name: Vec<String> = target_sets.iter().map(|(n, _)| n.clone()).collect();
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
    let targets = cfg.ada.targets(cfg.model)?;
    let mut member_probs: Vec<BTreeMap<String, Vec<Vec<f32>>>> = Vec::new();
    let mut members = Vec::new();
    for (index, gamma) in cfg.members().into_iter().enumerate() {
        let dir = spec.out.join(format!("member-{index}"));
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let seed = vdg_data::split::derive_seed(cfg.seed, &format!("member/{index}"));
        seed_dropout(seed);
        let (vm, model) = build(cfg, classes, seed, train_set.feature_dim, &device)?;
        let params = SgdParams {
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            nesterov: false,
        };
        let partial_bn = train_set.feature_dim.is_none()
            && matches!(
                cfg.backbone,
                BackboneKind::Resnet18 | BackboneKind::Resnet50
            );
        let mut opt = SgdMomentum::from_varmap(&vm, params, |n| {
            let stats = n.ends_with("running_mean") || n.ends_with("running_var");
            !(stats || (partial_bn && is_frozen_bn(n)))
        })?;
        let last_json = dir.join("last.json");
        let mut state = MemberState {
            epochs_done: 0,
            history: Vec::new(),
            best_epoch: 0,
            best_score: f64::MIN,
            dropout_rng: dropout_state(),
            sampler_rng: model.sampler().and_then(|s| s.state()),
        };
        if resume && last_json.exists() {
            let text = std::fs::read_to_string(&last_json).map_err(|e| io(&last_json, e))?;
            state = serde_json::from_str(&text)
                .map_err(|e| Error::Config(format!("{}: {e}", last_json.display())))?;
            let mut vm_mut = vm.clone();
            vm_mut.load(dir.join("last.safetensors"))?;
            let optim =
                candle_core::safetensors::load(dir.join("last-optim.safetensors"), &device)?;
            opt.load_state(&optim);
            set_dropout_state(state.dropout_rng.0, state.dropout_rng.1);
            if let (Some(s), Some((seed, pos))) = (model.sampler(), state.sampler_rng) {
                s.set_state(seed, pos);
            }
            tracing::info!("member {index}: resuming after epoch {}", state.epochs_done);
        }
        let lc = LoaderConfig {
            sampling: cfg.model.sampling(&cfg.model_config),
            input_size: cfg.input_size,
            train: true,
            batch_size: cfg.batch_size,
            seed: vdg_data::split::derive_seed(cfg.seed, &format!("data/{index}")),
        };
        progress.event(&TrainEvent::Member {
            index,
            gamma,
            start_epoch: state.epochs_done,
            epochs: cfg.epochs,
            batches: train_set.len().div_ceil(cfg.batch_size.max(1)),
        });
        let ada_cfg = AdaConfig {
            eta: cfg.ada_eta,
            t_max: cfg.ada_t_max,
            gamma,
        };
        for epoch in state.epochs_done..cfg.epochs {
            let lr = cfg.lr_at(epoch);
            opt.set_learning_rate(lr);
            let (mut sum, mut count) = (0.0f64, 0usize);
            for (bi, batch) in batches(&train_set, lc, epoch, device.clone()).enumerate() {
                let batch = batch?;
                let fwd = |x: &Tensor, train: bool| model.forward_t(x, train);
                let copies =
                    adversarial_copies(&fwd, &batch.clips, &batch.labels, &targets, &ada_cfg)?;
                let n = 1 + copies.len();
                let xs: Vec<Tensor> = std::iter::once(batch.clips.clone()).chain(copies).collect();
                let x = Tensor::cat(&xs, 0)?;
                let y = Tensor::cat(&vec![batch.labels.clone(); n], 0)?;
                let loss = cross_entropy(&model.forward_t(&x, true)?.logits, &y)?;
                let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(Error::NonFiniteLoss {
                        value,
                        epoch: epoch + 1,
                        batch: bi + 1,
                    });
                }
                let mut grads = loss.backward()?;
                clip_grad_norm(&mut grads, opt.vars(), cfg.clip_norm)?;
                opt.step(&grads)?;
                sum += f64::from(value);
                count += 1;
                progress.event(&TrainEvent::Batch { epoch, loss: value });
            }
            let val_probs = predict(&model, &val_set, cfg, &device)?;
            let val_labels: Vec<u32> = val_set.videos.iter().map(|v| v.label).collect();
            let source_val_top1 = top1(&val_probs, &val_labels);
            let target_top1 = if cfg.selection == Selection::TargetTest {
                let mut m = BTreeMap::new();
                for (name, set) in &target_sets {
                    let labels: Vec<u32> = set.videos.iter().map(|v| v.label).collect();
                    m.insert(
                        name.clone(),
                        top1(&predict(&model, set, cfg, &device)?, &labels),
                    );
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
            if score > state.best_score {
                state.best_score = score;
                state.best_epoch = epoch + 1;
                save_vars(&vm, &dir.join("best.safetensors"))?;
            }
            progress.event(&TrainEvent::Epoch { record: &record });
            state.history.push(record);
            state.epochs_done = epoch + 1;
            state.dropout_rng = dropout_state();
            state.sampler_rng = model.sampler().and_then(|s| s.state());
            // Checkpoint: weights and optimizer first, then the JSON that points at them.
            save_vars(&vm, &dir.join("last.safetensors"))?;
            let optim_path = dir.join("last-optim.safetensors");
            let tmp = vdg_data::atomic::tmp_path(&optim_path);
            candle_core::safetensors::save(&opt.state(), &tmp)?;
            std::fs::rename(&tmp, &optim_path).map_err(|e| io(&optim_path, e))?;
            let json =
                serde_json::to_vec_pretty(&state).map_err(|e| Error::Config(e.to_string()))?;
            write_atomic(&last_json, &json)?;
        }
        // Evaluate the selected weights.
        let mut vm_best = vm.clone();
        vm_best.load(dir.join("best.safetensors"))?;
        let mut probs = BTreeMap::new();
        let mut member_top1 = BTreeMap::new();
        for (name, set) in &target_sets {
            let p = predict(&model, set, cfg, &device)?;
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
    for ((name, set), key) in target_sets.iter().zip(&targets_by_name) {
        let all: Vec<Vec<Vec<f32>>> = member_probs.iter().map(|m| m[key].clone()).collect();
        let combined = ensemble(&all, cfg.ensemble);
        let labels: Vec<u32> = set.videos.iter().map(|v| v.label).collect();
        targets_out.insert(name.clone(), target_metrics(&combined, &labels, classes));
    }
    let metrics = Metrics {
        classes: spec.classes.clone(),
        members,
        targets: targets_out,
        selection: cfg.selection,
    };
    let json = serde_json::to_vec_pretty(&metrics).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&spec.out.join("metrics.json"), &json)?;
    Ok(metrics)
}

/// The momentum-buffer map type, for callers that save optimizer state themselves.
pub type OptimState = HashMap<String, Tensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_and_ensembles() {
        let c = TrainConfig::paper(ModelKind::Apn, AdaVariant::AdaStar);
        assert_eq!(c.lr_at(0), 1e-3);
        assert!((c.lr_at(30) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(149) - 1e-7).abs() < 1e-15);
        assert_eq!(c.members(), [0.001, 0.01, 0.1, 1.0]);
        assert_eq!(
            TrainConfig::paper(ModelKind::Tsn, AdaVariant::None).members(),
            [0.0]
        );
        let a = vec![vec![0.6f32, 0.4], vec![0.2, 0.8]];
        let b = vec![vec![0.1f32, 0.9], vec![0.45, 0.55]];
        let max = ensemble(&[a.clone(), b.clone()], EnsembleRule::MaxConfidence);
        assert_eq!(max, vec![vec![0.1, 0.9], vec![0.2, 0.8]]);
        let mean = ensemble(&[a, b], EnsembleRule::MeanSoftmax);
        assert!((mean[0][0] - 0.35).abs() < 1e-6);
        let m = target_metrics(
            &[vec![0.9, 0.1], vec![0.3, 0.7], vec![0.6, 0.4]],
            &[0, 1, 1],
            2,
        );
        assert_eq!(m.confusion, vec![vec![1, 0], vec![1, 1]]);
        assert!((m.top1 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.per_class, vec![Some(100.0), Some(50.0)]);
    }
}

#[cfg(test)]
mod weight_tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::load_backbone_weights;
    use crate::init::seeded_init;
    use crate::models::blocks::resnet::ResNet;
    use crate::models::blocks::{Backbone, BackboneKind};

    #[test]
    fn resnet_uses_torchvision_names_and_loads_a_converted_state_dict() {
        // ResNet-50's names, as torchvision's state_dict() has them.
        let vm50 = VarMap::new();
        ResNet::resnet50(VarBuilder::from_varmap(&vm50, DType::F32, &Device::Cpu)).unwrap();
        let names50: Vec<String> = vm50.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv3.weight",
            "layer1.0.downsample.1.running_mean",
            "layer3.5.bn2.bias",
            "layer4.2.conv2.weight",
        ] {
            assert!(names50.iter().any(|x| x == n), "no {n}");
        }
        // 53 convolutions (weights only), 53 BatchNorms (4 tensors each).
        assert_eq!(names50.len(), 53 + 53 * 4, "parameter and buffer count");

        // A "converted" ResNet-18 state dict written by the test (plus torchvision's fc).
        let dir = tempfile::tempdir().unwrap();
        let src = VarMap::new();
        ResNet::resnet18(VarBuilder::from_varmap(&src, DType::F32, &Device::Cpu)).unwrap();
        seeded_init(&src, 42).unwrap();
        let mut tensors: std::collections::HashMap<String, candle_core::Tensor> = src
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors.insert(
            "fc.weight".into(),
            candle_core::Tensor::zeros((1000, 512), DType::F32, &Device::Cpu).unwrap(),
        );
        let path = dir.path().join("resnet18.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let vm = VarMap::new();
        Backbone::new(
            BackboneKind::Resnet18,
            8,
            0.8,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("backbone"),
        )
        .unwrap();
        seeded_init(&vm, 1).unwrap();
        load_backbone_weights(&vm, &path).unwrap();
        let data = vm.data().lock().unwrap();
        for key in [
            "conv1.weight",
            "layer2.0.downsample.0.weight",
            "layer4.1.bn2.running_mean",
        ] {
            let got = data[&format!("backbone.{key}")]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = tensors[key]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, want, "{key}");
        }
        drop(data);
        // A missing tensor is an error naming it.
        let mut partial = tensors.clone();
        partial.remove("layer1.0.conv1.weight");
        candle_core::safetensors::save(&partial, &path).unwrap();
        let err = load_backbone_weights(&vm, &path).unwrap_err().to_string();
        assert!(err.contains("layer1.0.conv1.weight"), "{err}");
    }
}
