//! TSN: Temporal Segment Networks (Wang et al., "Temporal Segment Networks: Towards Good
//! Practices for Deep Action Recognition", ECCV 2016, arXiv:1608.00859).
//!
//! One frame per segment, average consensus of the frame features, a linear classifier.

use std::collections::BTreeMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::rowops::{Linear, linear};

use super::{Head, HeadOutput, ModelConfig, classify};
use crate::error::Result;
use crate::nn::dropout;

/// The TSN head.
pub struct Tsn {
    fc: Linear,
    dropout: f32,
}

impl Tsn {
    /// `fc` under `vb`.
    pub fn new(cfg: &ModelConfig, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Tsn {
            fc: linear(cfg.feature_dim, num_classes, vb.pp("fc"))?,
            dropout: cfg.head_dropout,
        })
    }
}

impl Head for Tsn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<HeadOutput> {
        let (_b, _m, _d) = x.dims3()?;
        let last = x.mean(1)?;
        let logits = classify(&self.fc, &dropout(&last, self.dropout, train)?)?;
        Ok(HeadOutput {
            logits,
            features: BTreeMap::from([("last", last)]),
            feature_logits: BTreeMap::new(),
        })
    }
}
