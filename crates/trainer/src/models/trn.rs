//! TRN: Temporal Relation Networks (Zhou et al., "Temporal Relational Reasoning in Videos",
//! ECCV 2018, arXiv:1711.08496), multi-scale.
//!
//! For each scale `s = M..2`, relations over subsets of `s` segments: `g` = `ReLU(Linear(s*D
//! -> 256))` of the concatenated features, averaged over the sampled subsets; `h` =
//! `Linear(256 -> C)` per scale after ReLU and dropout; logits = the sum over scales.
//! Named features: `g` (the per-scale `g`, concatenated), `h` (the per-scale class scores,
//! concatenated) and `last` = `g`.

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

use super::{Head, HeadOutput, ModelConfig, SubsetSampler};
use crate::error::Result;
use crate::nn::dropout;

/// The relation MLPs shared by TRN and TRN-ATTN.
pub struct Relations {
    /// (scale, g layer, h layer) from the largest scale down.
    pub scales: Vec<(usize, Linear, Linear)>,
    /// Subsets sampled per scale (the full scale has one).
    pub per_scale: usize,
    /// Dropout inside h.
    pub dropout: f32,
    /// Subset source.
    pub sampler: SubsetSampler,
}

impl Relations {
    /// `g{s}` and `h{s}` under `vb` for every scale.
    pub fn new(cfg: &ModelConfig, num_classes: usize, seed: u64, vb: VarBuilder) -> Result<Self> {
        let m = cfg.segments;
        let mut scales = Vec::new();
        for s in (2..=m.max(2)).rev() {
            scales.push((
                s,
                linear(
                    s * cfg.feature_dim,
                    cfg.trn_bottleneck,
                    vb.pp(format!("g{s}")),
                )?,
                linear(cfg.trn_bottleneck, num_classes, vb.pp(format!("h{s}")))?,
            ));
        }
        Ok(Relations {
            scales,
            per_scale: cfg.trn_relations_per_scale,
            dropout: cfg.head_dropout,
            sampler: SubsetSampler::new(cfg.subsets, seed),
        })
    }

    /// TRN's output given how each scale's relation features `[B, R, bottleneck]` become one
    /// `g` `[B, bottleneck]` (plain TRN: the mean; TRN-ATTN: attention, then the mean).
    pub fn output(
        &self,
        x: &Tensor,
        train: bool,
        pool: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<HeadOutput> {
        let (_b, _m, _d) = x.dims3()?;
        let mut gs = Vec::new();
        let mut hs = Vec::new();
        for (feats, (_, _, h)) in self.relation_features(x, train)?.iter().zip(&self.scales) {
            let g = pool(feats)?;
            hs.push(h.forward(&dropout(&g, self.dropout, train)?)?);
            gs.push(g);
        }
        let logits = hs
            .iter()
            .skip(1)
            .try_fold(hs[0].clone(), |acc, h| acc + h)?;
        let g = Tensor::cat(&gs, 1)?;
        let h = Tensor::cat(&hs, 1)?;
        Ok(HeadOutput {
            logits,
            features: BTreeMap::from([("last", g.clone()), ("g", g), ("h", h)]),
            feature_logits: BTreeMap::new(),
        })
    }

    /// Per scale: the `g` features of each sampled relation, `[B, R_s, bottleneck]`.
    pub fn relation_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let (b, m, d) = x.dims3()?;
        let mut out = Vec::new();
        for (s, g, _) in &self.scales {
            let count = if *s >= m { 1 } else { self.per_scale };
            let mut rel = Vec::new();
            for subset in self.sampler.subsets(m, *s, count, train) {
                let picked = super::select_segments(x, &subset)?.reshape((b, subset.len() * d))?;
                rel.push(g.forward(&picked)?.relu()?);
            }
            out.push(Tensor::stack(&rel, 1)?);
        }
        Ok(out)
    }
}

/// The TRN head.
pub struct Trn {
    rel: Relations,
}

impl Trn {
    /// Weights under `vb`.
    pub fn new(cfg: &ModelConfig, num_classes: usize, seed: u64, vb: VarBuilder) -> Result<Self> {
        Ok(Trn {
            rel: Relations::new(cfg, num_classes, seed, vb)?,
        })
    }
}

impl Head for Trn {
    fn sampler(&self) -> Option<&super::SubsetSampler> {
        Some(&self.rel.sampler)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<HeadOutput> {
        self.rel.output(x, train, |feats| Ok(feats.mean(1)?))
    }
}
