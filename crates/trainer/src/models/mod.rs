//! The model registry.
//!
//! A model maps clips `[B, T, 3, H, W]` to class logits plus the named intermediate
//! features video ADA perturbs against ([`HeadOutput::features`]). Two families:
//!
//! - **Temporal heads** (TSN, TRN, TRN-ATTN, APN): a per-frame [`Backbone`] (frames -> `D`-dim
//!   features) followed by a [`Head`] over `[B, M, D]`; they also train on cached features
//!   (`vdg train --features`).
//! - **Whole networks** (TSM, I3D, Non-local): a [`Network`] that sees the clip itself, because
//!   time is mixed inside the backbone (temporal shift, 3-D convolutions).
//!
//! [`ModelKind::sampling`] says which frames the loader feeds: TSN segments or a dense
//! window. Adding a model: one file in this folder, one [`ModelKind`] variant, one arm in
//! [`build_head`] or [`build_network`], and its golden/shape test (see CONTRIBUTING.md). The
//! registry tests build every kind.

pub mod apn;
pub mod blocks;
pub mod i3d;
pub mod non_local;
pub mod trn;
pub mod trn_attn;
pub mod tsm;
pub mod tsn;
pub mod weights;

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::AttentionConfig;
use blocks::{Backbone, BackboneKind};

/// The temporal models of the registry.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ModelKind {
    /// Temporal Segment Network: average consensus.
    Tsn,
    /// Temporal Relation Network: multi-scale relations.
    Trn,
    /// TRN with the attention block on its relation features (APN paper §5.3).
    TrnAttn,
    /// Adversarial Pyramid Network (APN paper §4).
    Apn,
    /// Temporal Shift Module: ResNet with channels shifted along time in every block.
    Tsm,
    /// Inflated 3-D ResNet on dense clips.
    I3d,
    /// I3D with embedded-Gaussian non-local blocks in res3 and res4.
    NonLocal,
}

/// Which frames of a video a model is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// TSN's sparse sampling: one frame from each of `M` equal segments.
    Segments(usize),
    /// A window of `frames` frames `stride` apart: random in training, centred in evaluation
    /// (looped when the video is shorter).
    Dense {
        /// Frames `T`.
        frames: usize,
        /// Frames between two sampled ones (1 = contiguous).
        stride: usize,
    },
}

impl Sampling {
    /// Frames per clip.
    pub fn frames(self) -> usize {
        match self {
            Sampling::Segments(n) | Sampling::Dense { frames: n, .. } => n,
        }
    }
}

impl ModelKind {
    /// Every kind, in registry order.
    pub const ALL: [ModelKind; 7] = [
        ModelKind::Tsn,
        ModelKind::Trn,
        ModelKind::TrnAttn,
        ModelKind::Apn,
        ModelKind::Tsm,
        ModelKind::I3d,
        ModelKind::NonLocal,
    ];

    /// The snake_case name (`trn_attn`).
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Tsn => "tsn",
            ModelKind::Trn => "trn",
            ModelKind::TrnAttn => "trn_attn",
            ModelKind::Apn => "apn",
            ModelKind::Tsm => "tsm",
            ModelKind::I3d => "i3d",
            ModelKind::NonLocal => "non_local",
        }
    }

    /// Whether the kind is a temporal head over per-frame features (and so can train on
    /// cached features), rather than a whole [`Network`].
    pub fn is_head(self) -> bool {
        matches!(
            self,
            ModelKind::Tsn | ModelKind::Trn | ModelKind::TrnAttn | ModelKind::Apn
        )
    }

    /// Dropout right before the classifier, as the model's reference implementation has it:
    /// TSM 0.5 (its `--dropout` for Kinetics and Something-Something), I3D and Non-local 0.5
    /// (mmaction2's `I3DHead` `dropout_ratio`); TSN 0 here because its one dropout (0.8 for
    /// RGB, before `new_fc`) is the backbone's projection dropout in this framework; TRN's
    /// relation module has none; APN's classifier reads the pyramid directly (the released
    /// code's dropout is in the attention blocks).
    pub fn classifier_dropout(self) -> f32 {
        match self {
            ModelKind::Tsm | ModelKind::I3d | ModelKind::NonLocal => 0.5,
            ModelKind::Tsn | ModelKind::Trn | ModelKind::TrnAttn | ModelKind::Apn => 0.0,
        }
    }

    /// The classifier's initialisation, where the reference implementation sets one: normal
    /// weights of this standard deviation and zero bias (TSN and TSM: 0.001 for `new_fc`;
    /// mmaction2's I3D head: 0.01). `None`: PyTorch's default uniform bounds.
    pub fn classifier_init_std(self) -> Option<f64> {
        match self {
            ModelKind::Tsn | ModelKind::Tsm => Some(0.001),
            ModelKind::I3d | ModelKind::NonLocal => Some(0.01),
            ModelKind::Trn | ModelKind::TrnAttn | ModelKind::Apn => None,
        }
    }

    /// The variable prefix of the classifier (`head.fc`, or the networks' `backbone.new_fc`).
    pub fn classifier_name(self) -> &'static str {
        if self.is_head() {
            "head.fc"
        } else {
            "backbone.new_fc"
        }
    }

    /// The frames the loader feeds this kind.
    pub fn sampling(self, cfg: &ModelConfig) -> Sampling {
        match self {
            ModelKind::I3d | ModelKind::NonLocal => Sampling::Dense {
                frames: cfg.clip_frames,
                stride: cfg.clip_stride,
            },
            _ => Sampling::Segments(cfg.segments),
        }
    }

    /// Parses a snake_case name (the same names as serde and clap use).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown model {name:?}; known: {}",
                    Self::ALL.map(|k| k.name()).join(", ")
                ))
            })
    }

    /// The named features this kind exposes for ADA.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            ModelKind::Tsn => &["last"],
            ModelKind::Trn | ModelKind::TrnAttn => &["last", "g", "h"],
            ModelKind::Apn => &["last", "global", "level2", "level3"],
            ModelKind::Tsm | ModelKind::I3d | ModelKind::NonLocal => &["last", "res4"],
        }
    }
}

/// How a head picks frame subsets for relations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubsetRule {
    /// The paper's "m consecutive items": a window of `m` consecutive segments, at a random
    /// position in training and centred in evaluation.
    #[default]
    Consecutive,
    /// The released code's `itertools.combinations`: any sorted subset of `m` segments, random
    /// in training; evaluation takes the evenly spaced subset (deterministic).
    Combinations,
}

/// What every model shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Temporal segments M.
    pub segments: usize,
    /// Per-frame feature width D (the paper's 256).
    pub feature_dim: usize,
    /// Attention block settings (TRN-ATTN, APN).
    pub attention: AttentionConfig,
    /// Frame subsets of TRN/APN relations.
    pub subsets: SubsetRule,
    /// Relations sampled per scale in TRN (TRN's `subsample_num`).
    pub trn_relations_per_scale: usize,
    /// Bottleneck width of TRN's g.
    pub trn_bottleneck: usize,
    /// Dropout before the TSN classifier and inside TRN's h (and before the classifier of
    /// TSM, I3D and Non-local).
    pub head_dropout: f32,
    /// Frames of a dense clip (I3D, Non-local).
    #[serde(default = "default_clip_frames")]
    pub clip_frames: usize,
    /// Frames between two frames of a dense clip: 2, as mmaction2's Kinetics I3D and
    /// Non-local inputs (32 x 2: 32 frames over about 2.5 s at 25 fps), which the paper's
    /// Kinetics-pretrained 3-D ResNet-50s with "32 input frames" (§5.2) were trained on.
    #[serde(default = "default_clip_stride")]
    pub clip_stride: usize,
    /// TSM shifts `1 / shift_div` of the channels each way.
    #[serde(default = "default_shift_div")]
    pub shift_div: usize,
}

fn default_clip_frames() -> usize {
    32
}

fn default_clip_stride() -> usize {
    2
}

fn default_shift_div() -> usize {
    8
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            segments: 5,
            feature_dim: 256,
            attention: AttentionConfig::default(),
            subsets: SubsetRule::Consecutive,
            trn_relations_per_scale: 3,
            trn_bottleneck: 256,
            head_dropout: 0.6,
            clip_frames: default_clip_frames(),
            clip_stride: default_clip_stride(),
            shift_div: default_shift_div(),
        }
    }
}

impl ModelConfig {
    /// A tiny configuration for tests: `M = 3`, `D = 16`, 2 heads.
    pub fn tiny() -> Self {
        ModelConfig {
            segments: 3,
            feature_dim: 16,
            attention: AttentionConfig {
                width: 16,
                heads: 2,
                ff_width: 32,
                dropout: 0.0,
            },
            trn_bottleneck: 16,
            head_dropout: 0.0,
            clip_frames: 4,
            ..ModelConfig::default()
        }
    }
}

/// Logits and the named features ADA can target.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// Class scores `[B, C]`.
    pub logits: Tensor,
    /// Named features, each `[B, *]`: `last` (the last hidden feature) for every model, plus
    /// `g`, `h` (TRN, TRN-ATTN) or `global`, `level2`, `level3` (APN).
    pub features: BTreeMap<&'static str, Tensor>,
    /// Logits computed from a named feature, where the model defines them (APN: `level2`
    /// through the shared classifier).
    pub feature_logits: BTreeMap<&'static str, Tensor>,
}

impl HeadOutput {
    /// The named feature, or an error naming the ones that exist.
    pub fn feature(&self, name: &str) -> Result<&Tensor> {
        self.features.get(name).ok_or_else(|| {
            Error::Config(format!(
                "the model has no feature {name:?}; it has {}",
                self.features.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Logits to attack with when perturbing `feature`: its own where defined, else the main.
    pub fn logits_for(&self, feature: &str) -> &Tensor {
        self.feature_logits.get(feature).unwrap_or(&self.logits)
    }
}

/// A temporal head: `[B, M, D]` frame features -> [`HeadOutput`].
pub trait Head: Send + Sync {
    /// # Shapes
    /// `x [B, M, D]` -> logits `[B, C]` and named features.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<HeadOutput>;

    /// The subset sampler whose state checkpoints must keep, if the head samples subsets.
    fn sampler(&self) -> Option<&SubsetSampler> {
        None
    }
}

/// Seeded source of frame subsets for relation heads; its state is saved in checkpoints.
#[derive(Debug)]
pub struct SubsetSampler {
    rng: Mutex<ChaCha8Rng>,
    rule: SubsetRule,
}

impl SubsetSampler {
    /// A sampler seeded with `seed`.
    pub fn new(rule: SubsetRule, seed: u64) -> Self {
        SubsetSampler {
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            rule,
        }
    }

    /// `count` subsets of `m` of `n` segments (sorted indices). Training draws them at random
    /// by the sampler's rule; evaluation is deterministic ([`eval_subsets`]: with the
    /// consecutive rule and `count == 1`, the centred window, or the two central windows
    /// when no window is exactly centred).
    pub fn subsets(&self, n: usize, m: usize, count: usize, train: bool) -> Vec<Vec<usize>> {
        let m = m.min(n);
        if !train {
            return eval_subsets(n, m, count, self.rule);
        }
        let Ok(mut rng) = self.rng.lock() else {
            return eval_subsets(n, m, count, self.rule);
        };
        match self.rule {
            SubsetRule::Consecutive => (0..count)
                .map(|_| {
                    let start = rand::Rng::random_range(&mut *rng, 0..=n - m);
                    (start..start + m).collect()
                })
                .collect(),
            SubsetRule::Combinations => {
                let all = combinations(n, m);
                let k = count.min(all.len());
                sample(&mut *rng, all.len(), k)
                    .into_iter()
                    .map(|i| all[i].clone())
                    .collect()
            }
        }
    }

    /// The RNG state (seed and stream position) for checkpoints.
    pub fn state(&self) -> Option<([u8; 32], u128)> {
        self.rng
            .lock()
            .ok()
            .map(|r| (r.get_seed(), r.get_word_pos()))
    }

    /// Restores [`Self::state`].
    pub fn set_state(&self, seed: [u8; 32], word_pos: u128) {
        if let Ok(mut r) = self.rng.lock() {
            *r = ChaCha8Rng::from_seed(seed);
            r.set_word_pos(word_pos);
        }
    }
}

/// Every sorted subset of `m` of `0..n`, in lexicographic order (`itertools.combinations`).
pub fn combinations(n: usize, m: usize) -> Vec<Vec<usize>> {
    fn rec(start: usize, n: usize, m: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == m {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            if n - i < m - cur.len() {
                break;
            }
            cur.push(i);
            rec(i + 1, n, m, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(0, n, m.min(n), &mut Vec::new(), &mut out);
    out
}

/// Deterministic evaluation subsets. Consecutive rule: with `count == 1` the centred
/// window, or the two central windows when `n - m` is odd and no window is centred (the
/// heads average over them); with more, `count` windows spread evenly. Combinations rule:
/// `count` distinct combinations spread evenly over the lexicographic list (with
/// `count == 1`, the middle one).
pub fn eval_subsets(n: usize, m: usize, count: usize, rule: SubsetRule) -> Vec<Vec<usize>> {
    match rule {
        SubsetRule::Consecutive => {
            let positions = n - m + 1;
            let count = count.max(1).min(positions);
            if count == 1 {
                let lo = (n - m) / 2;
                let hi = (n - m).div_ceil(2);
                return (lo..=hi).map(|s| (s..s + m).collect()).collect();
            }
            (0..count)
                .map(|k| {
                    let start = k * (n - m) / (count - 1);
                    (start..start + m).collect()
                })
                .collect()
        }
        SubsetRule::Combinations => {
            let all = combinations(n, m);
            let count = count.max(1).min(all.len());
            (0..count)
                .map(|k| all[(2 * k + 1) * all.len() / (2 * count)].clone())
                .collect()
        }
    }
}

/// Builds the head of `kind`.
pub fn build_head(
    kind: ModelKind,
    cfg: &ModelConfig,
    num_classes: usize,
    seed: u64,
    vb: VarBuilder,
) -> Result<Box<dyn Head>> {
    Ok(match kind {
        ModelKind::Tsn => Box::new(tsn::Tsn::new(cfg, num_classes, vb)?),
        ModelKind::Trn => Box::new(trn::Trn::new(cfg, num_classes, seed, vb)?),
        ModelKind::TrnAttn => Box::new(trn_attn::TrnAttn::new(cfg, num_classes, seed, vb)?),
        ModelKind::Apn => Box::new(apn::Apn::new(cfg, num_classes, seed, vb)?),
        ModelKind::Tsm | ModelKind::I3d | ModelKind::NonLocal => {
            return Err(Error::Config(format!(
                "{} is a whole network, not a head over frame features",
                kind.name()
            )));
        }
    })
}

/// A whole video network: clips in, logits and named features out.
pub trait Network: Send + Sync {
    /// # Shapes
    /// `clips [B, T, 3, H, W]` -> logits `[B, C]` and named features (`last`, `res4`).
    fn forward_t(&self, clips: &Tensor, train: bool) -> Result<HeadOutput>;
}

/// Builds the network of `kind` on the ResNet `backbone` (`resnet18` or `resnet50`).
pub fn build_network(
    kind: ModelKind,
    cfg: &ModelConfig,
    backbone: BackboneKind,
    num_classes: usize,
    vb: VarBuilder,
) -> Result<Box<dyn Network>> {
    Ok(match kind {
        ModelKind::Tsm => Box::new(tsm::Tsm::new(cfg, backbone, num_classes, vb)?),
        ModelKind::I3d => Box::new(i3d::I3d::new(cfg, backbone, num_classes, false, vb)?),
        ModelKind::NonLocal => Box::new(non_local::build(cfg, backbone, num_classes, vb)?),
        ModelKind::Tsn | ModelKind::Trn | ModelKind::TrnAttn | ModelKind::Apn => {
            return Err(Error::Config(format!(
                "{} is a head over frame features, not a whole network",
                kind.name()
            )));
        }
    })
}

enum Body {
    Frames {
        backbone: Backbone,
        head: Box<dyn Head>,
    },
    Network(Box<dyn Network>),
}

/// A whole video model of any kind.
pub struct VideoModel {
    body: Body,
    /// The kind.
    pub kind: ModelKind,
    /// Mixed precision: the dtype the trunk's convolutions compute in ([`crate::nn3d::Autocast`]).
    trunk_dtype: Option<candle_core::DType>,
    /// Training recomputes the trunk's residual blocks in backward ([`crate::recompute`]).
    recompute: bool,
}

impl VideoModel {
    /// A temporal head on a per-frame backbone.
    pub fn frames(backbone: Backbone, head: Box<dyn Head>, kind: ModelKind) -> Self {
        VideoModel {
            body: Body::Frames { backbone, head },
            kind,
            trunk_dtype: None,
            recompute: false,
        }
    }

    /// A whole network.
    pub fn network(network: Box<dyn Network>, kind: ModelKind) -> Self {
        VideoModel {
            body: Body::Network(network),
            kind,
            trunk_dtype: None,
            recompute: false,
        }
    }

    /// Runs the trunk's convolutions in `dtype` (bf16 or f16; `None`: float32), with float32
    /// weights, BatchNorm, heads and loss: mixed precision.
    pub fn with_trunk_dtype(mut self, dtype: Option<candle_core::DType>) -> Self {
        self.trunk_dtype = dtype;
        self
    }

    /// Training keeps one activation per residual block of a ResNet trunk (TSN, TRN,
    /// TRN-ATTN, APN on ResNet; TSM) and recomputes the others in backward: less memory, a
    /// second forward pass of the blocks ([`crate::recompute`]). The same values and
    /// gradients, to the last bit in the tests.
    pub fn with_recompute(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }

    /// # Shapes
    /// `clips [B, T, 3, H, W]` -> [`HeadOutput`] with logits `[B, C]`. For a head on a cached
    /// trunk, `clips` are features `[B, M, F]`.
    pub fn forward_t(&self, clips: &Tensor, train: bool) -> Result<HeadOutput> {
        match &self.body {
            Body::Network(n) => {
                let _autocast = crate::nn3d::Autocast::enter(self.trunk_dtype);
                let _recompute = crate::recompute::Recompute::enter(self.recompute);
                n.forward_t(clips, train)
            }
            Body::Frames { backbone, head } => {
                let dims = clips.dims();
                let (b, m) = (dims[0], dims[1]);
                let frames = clips.flatten(0, 1)?;
                let feats = {
                    let _autocast = crate::nn3d::Autocast::enter(self.trunk_dtype);
                    let _recompute = crate::recompute::Recompute::enter(self.recompute);
                    backbone.forward_t(&frames, train)?
                };
                let d = feats.dim(1)?;
                head.forward_t(&feats.reshape((b, m, d))?, train)
            }
        }
    }

    /// The subset sampler whose state checkpoints keep, if any.
    pub fn sampler(&self) -> Option<&SubsetSampler> {
        match &self.body {
            Body::Frames { head, .. } => head.sampler(),
            Body::Network(_) => None,
        }
    }
}

/// The segments `subset` of `x [B, M, D]`: `[B, |subset|, D]`.
pub(crate) fn select_segments(x: &Tensor, subset: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = subset.iter().map(|&i| i as u32).collect();
    Ok(x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 1)?)
}

/// A classifier `Linear` applied to `x`, for heads.
pub(crate) fn classify(fc: &crate::rowops::Linear, x: &Tensor) -> Result<Tensor> {
    Ok(fc.forward(x)?)
}

#[cfg(test)]
mod subset_tests {
    use super::*;

    #[test]
    fn evaluation_windows_are_centred_and_combinations_distinct() {
        // M = 3, m = 2: no window is centred, so both central windows (heads average them).
        assert_eq!(
            eval_subsets(3, 2, 1, SubsetRule::Consecutive),
            [vec![0, 1], vec![1, 2]]
        );
        assert_eq!(
            eval_subsets(5, 3, 1, SubsetRule::Consecutive),
            [vec![1, 2, 3]]
        );
        assert_eq!(
            eval_subsets(5, 4, 1, SubsetRule::Consecutive),
            [vec![0, 1, 2, 3], vec![1, 2, 3, 4]]
        );
        // Combinations: distinct, spread over the lexicographic list.
        assert_eq!(combinations(4, 2).len(), 6);
        assert_eq!(combinations(5, 3)[0], vec![0, 1, 2]);
        let e = eval_subsets(5, 2, 3, SubsetRule::Combinations);
        assert_eq!(e.len(), 3);
        assert!(e[0] != e[1] && e[1] != e[2] && e[0] != e[2], "{e:?}");
        assert_eq!(e, [vec![0, 2], vec![1, 3], vec![2, 4]]);
        // Training draws without replacement: never the same combination twice in a draw.
        let s = SubsetSampler::new(SubsetRule::Combinations, 3);
        for _ in 0..50 {
            let d = s.subsets(5, 3, 3, true);
            assert_eq!(d.len(), 3);
            assert!(d[0] != d[1] && d[1] != d[2] && d[0] != d[2], "{d:?}");
            assert!(d.iter().all(|c| c.windows(2).all(|w| w[0] < w[1])));
        }
        // More subsets asked than exist: each once.
        assert_eq!(s.subsets(3, 2, 5, true).len(), 3);
    }
}
