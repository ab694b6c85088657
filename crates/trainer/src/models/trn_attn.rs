//! TRN-ATTN: TRN with the attention block applied to its relation features (APN paper,
//! Wang et al., "Adversarial Pyramid Network for Video Domain Generalization", 2019,
//! arXiv:1912.03716, §5.3: "applies the attention blocks to the g and h features of TRN").
//!
//! Each scale's sampled relation features `g` (`[B, R, 256]`) pass through the attention
//! block `T(g, g)` before averaging; `h` and the sum over scales are TRN's. The attention
//! width must equal TRN's bottleneck.

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::trn::Relations;
use super::{Head, HeadOutput, ModelConfig};
use crate::error::{Error, Result};
use crate::nn::{AttentionBlock, dropout};

/// The TRN-ATTN head.
pub struct TrnAttn {
    rel: Relations,
    attention: AttentionBlock,
}

impl TrnAttn {
    /// Weights under `vb` (`attention` holds the block).
    pub fn new(cfg: &ModelConfig, num_classes: usize, seed: u64, vb: VarBuilder) -> Result<Self> {
        if cfg.attention.width != cfg.trn_bottleneck {
            return Err(Error::Config(format!(
                "TRN-ATTN needs attention width ({}) = TRN bottleneck ({})",
                cfg.attention.width, cfg.trn_bottleneck
            )));
        }
        Ok(TrnAttn {
            rel: Relations::new(cfg, num_classes, seed, vb.clone())?,
            attention: AttentionBlock::new(cfg.attention, vb.pp("attention"))?,
        })
    }
}

impl Head for TrnAttn {
    fn sampler(&self) -> Option<&super::SubsetSampler> {
        Some(&self.rel.sampler)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<HeadOutput> {
        let (_b, _m, _d) = x.dims3()?;
        let mut gs = Vec::new();
        let mut hs = Vec::new();
        for (feats, (_, _, h)) in self
            .rel
            .relation_features(x, train)?
            .iter()
            .zip(&self.rel.scales)
        {
            let g = self.attention.forward_t(feats, feats, train)?.mean(1)?;
            hs.push(h.forward(&dropout(&g, self.rel.dropout, train)?)?);
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
}
