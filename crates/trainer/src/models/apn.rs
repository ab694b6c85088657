//! APN: Adversarial Pyramid Network (Wang et al., "Adversarial Pyramid Network for Video
//! Domain Generalization", 2019, arXiv:1912.03716, §4; TPAMI 2021 as "VideoDG").
//!
//! The relational feature pyramid over frame features `X [B, M, D]`, with one shared
//! attention block `T(x, y)`:
//! - level I: the global relation `G = T(X, X)` and, for every `m = M-1 .. 2`, a local
//!   relation `L_m = T(X_m, X_m)` over a subset of `m` segments (the paper's `m` consecutive
//!   items by default: a random window in training, the centred one in evaluation, or the
//!   mean over the two central windows when none is centred);
//! - cross relations `C_m = T(L_m, G)`: the local relation encoded, the global relation as
//!   the queries, so each `C_m` has `G`'s length `M`;
//! - level II: `R_II = sum_m C_m`; level III: `R_III = G + R_II`;
//! - a linear classifier (after ReLU) on the flattened `R_III`; the same classifier on
//!   `R_II` gives the logits ADA attacks at level II.
//!
//! Named features: `global` (flattened `G`), `level2`, `level3`, `last` (= `level3`).

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::rowops::{Linear, linear};

use super::{Head, HeadOutput, ModelConfig, SubsetSampler};
use crate::error::{Error, Result};
use crate::nn::AttentionBlock;

/// The APN head.
pub struct Apn {
    attention: AttentionBlock,
    fc: Linear,
    sampler: SubsetSampler,
    segments: usize,
}

impl Apn {
    /// Weights `attention` and `fc` under `vb`.
    pub fn new(cfg: &ModelConfig, num_classes: usize, seed: u64, vb: VarBuilder) -> Result<Self> {
        if cfg.attention.width != cfg.feature_dim {
            return Err(Error::Config(format!(
                "APN needs attention width ({}) = feature dim ({})",
                cfg.attention.width, cfg.feature_dim
            )));
        }
        Ok(Apn {
            attention: AttentionBlock::new(cfg.attention, vb.pp("attention"))?,
            fc: linear(cfg.segments * cfg.feature_dim, num_classes, vb.pp("fc"))?,
            sampler: SubsetSampler::new(cfg.subsets, seed),
            segments: cfg.segments,
        })
    }
}

impl Head for Apn {
    fn sampler(&self) -> Option<&super::SubsetSampler> {
        Some(&self.sampler)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<HeadOutput> {
        let (b, m, d) = x.dims3()?;
        if m != self.segments {
            return Err(Error::Config(format!(
                "APN built for M = {}, got {m} segments",
                self.segments
            )));
        }
        let global = self.attention.forward_t(x, x, train)?;
        let mut level2: Option<Tensor> = None;
        for size in (2..m).rev() {
            // One window in training; in evaluation the centred one, or the mean over the two
            // central windows when none is centred (M = 3, m = 2).
            let subsets = self.sampler.subsets(m, size, 1, train);
            let mut cross: Option<Tensor> = None;
            for subset in &subsets {
                let xs = super::select_segments(x, subset)?;
                let local = self.attention.forward_t(&xs, &xs, train)?;
                let c = self.attention.forward_t(&local, &global, train)?;
                cross = Some(match cross {
                    Some(acc) => (acc + c)?,
                    None => c,
                });
            }
            let Some(cross) = cross else { continue };
            let cross = (cross / subsets.len() as f64)?;
            level2 = Some(match level2 {
                Some(acc) => (acc + cross)?,
                None => cross,
            });
        }
        // M = 2 has no local scale: level II is empty (zeros) and level III is G.
        let level2 = match level2 {
            Some(l) => l,
            None => global.zeros_like()?,
        };
        let level3 = (&global + &level2)?;
        let flat = |t: &Tensor| t.reshape((b, m * d));
        let (g, l2, l3) = (flat(&global)?, flat(&level2)?, flat(&level3)?);
        let logits = self.fc.forward(&l3.relu()?)?;
        let logits2 = self.fc.forward(&l2.relu()?)?;
        Ok(HeadOutput {
            logits,
            features: BTreeMap::from([
                ("last", l3.clone()),
                ("global", g),
                ("level2", l2),
                ("level3", l3),
            ]),
            feature_logits: BTreeMap::from([("level2", logits2)]),
        })
    }
}
