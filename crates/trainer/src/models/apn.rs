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

impl Apn {
    /// The pyramid from the block's composed ops: `(G, level II)`.
    fn composed(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let m = self.segments;
        let block = |x: &Tensor, y: &Tensor| self.attention.forward_t(x, y, train);
        let global = block(x, x)?;
        let mut level2: Option<Tensor> = None;
        for size in (2..m).rev() {
            // One window in training; in evaluation the centred one, or the mean over the two
            // central windows when none is centred (M = 3, m = 2).
            let subsets = self.sampler.subsets(m, size, 1, train);
            let mut cross: Option<Tensor> = None;
            for subset in &subsets {
                let xs = super::select_segments(x, subset)?;
                let local = block(&xs, &xs)?;
                let c = block(&local, &global)?;
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
        Ok((global, level2))
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
        // On the CPU the whole pyramid is one op on the block's packed parameters; the
        // subsets are drawn here, in the order `composed` draws them.
        let (global, level2) = match self.attention.pack(x)? {
            Some(packed) => {
                let scales = (2..m)
                    .rev()
                    .map(|size| self.sampler.subsets(m, size, 1, train))
                    .filter(|s| !s.is_empty())
                    .collect();
                self.attention.pyramid(&packed, x, scales, train)?
            }
            None => self.composed(x, train)?,
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::init::{seeded_init, seeded_randn};
    use crate::nn::{AttentionConfig, seed_dropout};
    use crate::tests::max_diff;

    /// The pyramid as one op against the pyramid of composed blocks, in float64: the same
    /// `G` and level II, and the same gradients for the input and every weight, in training
    /// (random windows, dropout) and evaluation (the two central windows averaged), for
    /// M = 5 and M = 2 (no local scale), with the parameters packed in rows and flat.
    #[test]
    fn the_fused_pyramid_equals_the_composed_one_with_gradients() {
        let dev = Device::Cpu;
        for segments in [5, 2] {
            let cfg = ModelConfig {
                segments,
                feature_dim: 12,
                attention: AttentionConfig {
                    width: 12,
                    heads: 3,
                    // Packed in rows of the width (a multiple of it) and flat (not one).
                    ff_width: if segments == 5 { 24 } else { 16 },
                    dropout: 0.3,
                },
                ..ModelConfig::default()
            };
            let vm = VarMap::new();
            let apn = Apn::new(&cfg, 4, 7, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
            seeded_init(&vm, 3).unwrap();
            let x =
                Var::from_tensor(&seeded_randn(&[3, segments, 12], 1, DType::F64, &dev).unwrap())
                    .unwrap();
            let (w1, w2) = (
                seeded_randn(&[3, segments, 12], 2, DType::F64, &dev).unwrap(),
                seeded_randn(&[3, segments, 12], 3, DType::F64, &dev).unwrap(),
            );
            let mut params: Vec<Tensor> = vm
                .all_vars()
                .iter()
                .map(|v| v.as_tensor().clone())
                .collect();
            params.push(x.as_tensor().clone());
            for train in [false, true] {
                let state = apn.sampler.state().unwrap();
                seed_dropout(11);
                let packed = apn.attention.pack(x.as_tensor()).unwrap().unwrap();
                let scales = (2..segments)
                    .rev()
                    .map(|size| apn.sampler.subsets(segments, size, 1, train))
                    .collect();
                let ours = apn
                    .attention
                    .pyramid(&packed, x.as_tensor(), scales, train)
                    .unwrap();
                apn.sampler.set_state(state.0, state.1);
                seed_dropout(11);
                let theirs = apn.composed(x.as_tensor(), train).unwrap();
                for (a, b) in [(&ours.0, &theirs.0), (&ours.1, &theirs.1)] {
                    let d = max_diff(a, b);
                    assert!(
                        d < 1e-11,
                        "M {segments}, train {train}: values differ by {d}"
                    );
                }
                if segments > 2 {
                    assert!(max_diff(&ours.1, &ours.1.zeros_like().unwrap()) > 0.1);
                }
                let loss = |(g, l2): &(Tensor, Tensor)| {
                    ((g * &w1).unwrap().sum_all().unwrap() + (l2 * &w2).unwrap().sum_all().unwrap())
                        .unwrap()
                        .backward()
                        .unwrap()
                };
                let (ga, gb) = (loss(&ours), loss(&theirs));
                let mut compared = 0;
                for p in &params {
                    // The classifier is not part of the pyramid.
                    let (a, b) = match (ga.get(p), gb.get(p)) {
                        (Some(a), Some(b)) => (a, b),
                        (None, None) => continue,
                        (a, b) => panic!("gradient present {} vs {}", a.is_some(), b.is_some()),
                    };
                    compared += 1;
                    let d = max_diff(a, b);
                    let scale = 1.0 + max_diff(b, &b.zeros_like().unwrap());
                    assert!(
                        d < 1e-11 * scale,
                        "M {segments}, train {train}: gradient {:?} differs by {d}",
                        p.dims()
                    );
                }
                // 36 block parameters and the input.
                assert_eq!(compared, 37);
            }
        }
    }
}
