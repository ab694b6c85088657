//! TRN: Temporal Relation Networks (Zhou et al., "Temporal Relational Reasoning in Videos",
//! ECCV 2018, arXiv:1711.08496), multi-scale, as its `RelationModuleMultiScale`.
//!
//! For each scale `s = M..2`: relations over ordered subsets of `s` segments, drawn without
//! replacement from all `C(M, s)` combinations (`trn_relations_per_scale` of them; the full
//! scale has one; evaluation takes distinct combinations spread evenly over the list). Each
//! relation `r`: `g_r = ReLU(Linear(s*D -> 256)(ReLU(x_r)))`, class scores
//! `h_r = Linear(256 -> C)(g_r)`; the logits are the sum of `h_r` over every relation of every
//! scale. TRN has no dropout in its relation module (the frame features' dropout is the
//! backbone's). Named features: `g` (per scale, the mean of its `g_r`, concatenated), `h`
//! (per scale, the summed class scores, concatenated) and `last` = `g`.

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::rowops::{Linear, linear};

use super::{Head, HeadOutput, ModelConfig, SubsetRule, SubsetSampler};
use crate::error::Result;

/// The relation MLPs shared by TRN and TRN-ATTN.
pub struct Relations {
    /// (scale, g layer, h layer) from the largest scale down.
    pub scales: Vec<(usize, Linear, Linear)>,
    /// Subsets sampled per scale (the full scale has one).
    pub per_scale: usize,
    /// Subset source: combinations without replacement.
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
            sampler: SubsetSampler::new(SubsetRule::Combinations, seed),
        })
    }

    /// TRN's output given how each scale's relation features `[B, R, bottleneck]` are
    /// transformed before `h` (plain TRN: not at all; TRN-ATTN: the attention block).
    pub fn output(
        &self,
        x: &Tensor,
        train: bool,
        transform: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<HeadOutput> {
        let mut gs = Vec::new();
        let mut hs = Vec::new();
        for (feats, (_, _, h)) in self.relation_features(x, train)?.iter().zip(&self.scales) {
            let g = transform(feats)?;
            // h on every relation, class scores summed over the relations.
            hs.push(h.forward(&g)?.sum(1)?);
            gs.push(g.mean(1)?);
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
        let x = x.relu()?;
        let mut out = Vec::new();
        for (s, g, _) in &self.scales {
            let count = if *s >= m { 1 } else { self.per_scale };
            let mut rel = Vec::new();
            for subset in self.sampler.subsets(m, *s, count, train) {
                let picked = super::select_segments(&x, &subset)?.reshape((b, subset.len() * d))?;
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
        self.rel.output(x, train, |feats| Ok(feats.clone()))
    }
}
