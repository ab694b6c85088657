//! The model registry: temporal heads on top of a per-frame backbone.
//!
//! A model maps clips `[B, M, 3, H, W]` to class logits plus the named intermediate
//! features video ADA perturbs against ([`HeadOutput::features`]). It is a [`Backbone`]
//! (frames -> `D`-dim features) followed by a temporal head chosen by [`ModelKind`].
//!
//! Adding a model: one file in this folder, one [`ModelKind`] variant, one arm in
//! [`build_head`], and its golden/shape test (see CONTRIBUTING.md). The registry test builds
//! every kind.

pub mod apn;
pub mod blocks;
pub mod trn;
pub mod trn_attn;
pub mod tsn;

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
use blocks::Backbone;

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
}

impl ModelKind {
    /// Every kind, in registry order.
    pub const ALL: [ModelKind; 4] = [
        ModelKind::Tsn,
        ModelKind::Trn,
        ModelKind::TrnAttn,
        ModelKind::Apn,
    ];

    /// The snake_case name (`trn_attn`).
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Tsn => "tsn",
            ModelKind::Trn => "trn",
            ModelKind::TrnAttn => "trn_attn",
            ModelKind::Apn => "apn",
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
    /// Dropout before the TSN classifier and inside TRN's h.
    pub head_dropout: f32,
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

    /// `count` subsets of `m` of `n` segments (sorted indices). Training draws them at random;
    /// evaluation is deterministic.
    pub fn subsets(&self, n: usize, m: usize, count: usize, train: bool) -> Vec<Vec<usize>> {
        let m = m.min(n);
        if !train {
            return eval_subsets(n, m, count, self.rule);
        }
        let Ok(mut rng) = self.rng.lock() else {
            return eval_subsets(n, m, count, self.rule);
        };
        (0..count)
            .map(|_| match self.rule {
                SubsetRule::Consecutive => {
                    let start = rand::Rng::random_range(&mut *rng, 0..=n - m);
                    (start..start + m).collect()
                }
                SubsetRule::Combinations => {
                    let mut v = sample(&mut *rng, n, m).into_vec();
                    v.sort_unstable();
                    v
                }
            })
            .collect()
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

/// Deterministic evaluation subsets: `count` windows (or evenly spaced subsets) spread evenly
/// over the clip; one centred window when `count == 1`.
pub fn eval_subsets(n: usize, m: usize, count: usize, rule: SubsetRule) -> Vec<Vec<usize>> {
    let positions = n - m + 1;
    let count = count.max(1).min(positions);
    (0..count)
        .map(|k| {
            let start = if count == 1 {
                (n - m) / 2
            } else {
                k * (n - m) / (count - 1)
            };
            match rule {
                SubsetRule::Consecutive => (start..start + m).collect(),
                // Evenly spaced indices over the whole clip, shifted per subset.
                SubsetRule::Combinations => {
                    let mut v: Vec<usize> = (0..m)
                        .map(|j| if m == 1 { start } else { j * (n - 1) / (m - 1) })
                        .collect();
                    v.dedup();
                    v
                }
            }
        })
        .collect()
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
    })
}

/// A whole video model: backbone per frame, then the temporal head.
pub struct VideoModel {
    /// Frames -> features.
    pub backbone: Backbone,
    /// Features -> logits.
    pub head: Box<dyn Head>,
    /// The kind.
    pub kind: ModelKind,
}

impl VideoModel {
    /// # Shapes
    /// `clips [B, M, 3, H, W]` -> [`HeadOutput`] with logits `[B, C]`.
    pub fn forward_t(&self, clips: &Tensor, train: bool) -> Result<HeadOutput> {
        let (b, m, c, h, w) = clips.dims5()?;
        let frames = clips.reshape((b * m, c, h, w))?;
        let feats = self.backbone.forward_t(&frames, train)?;
        let d = feats.dim(1)?;
        self.head.forward_t(&feats.reshape((b, m, d))?, train)
    }

    /// The head on precomputed frame features `[B, M, D]`.
    pub fn forward_features_t(&self, feats: &Tensor, train: bool) -> Result<HeadOutput> {
        self.head.forward_t(feats, train)
    }
}

/// The segments `subset` of `x [B, M, D]`: `[B, |subset|, D]`.
pub(crate) fn select_segments(x: &Tensor, subset: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = subset.iter().map(|&i| i as u32).collect();
    Ok(x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 1)?)
}

/// A classifier `Linear` applied to `x`, for heads.
pub(crate) fn classify(fc: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    Ok(fc.forward(x)?)
}
