//! TSM: Temporal Shift Module (Lin, Gan and Han, "TSM: Temporal Shift Module for Efficient
//! Video Understanding", ICCV 2019, arXiv:1811.08383).
//!
//! A 2-D ResNet on TSN segments in which, inside every residual block, the input of the
//! residual branch has `1 / shift_div` of its channels shifted one segment back in time and
//! another `1 / shift_div` one segment forward (zero padded at the clip ends); the identity
//! path keeps the unshifted input ("residual shift", the paper's default, shift_div 8). The
//! pooled frame features are averaged over segments (TSN consensus) and classified by
//! `new_fc` after dropout; since the classifier is linear this equals averaging per-frame
//! scores as the TSM code does.
//!
//! Parameters use torchvision's names (`conv1`, `layer1.0.conv1`, ...), so ImageNet ResNet
//! weights load unchanged. ADA targets: `last` (the segment-averaged pooled `layer4` output,
//! `--ada ada`) and, with `ada_star`, also `res4` (the segment-averaged pooled `layer3`).

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::rowops::{Linear, linear};

use super::blocks::BackboneKind;
use super::blocks::resnet::{BranchMap, ResNet};
use super::{HeadOutput, ModelConfig, Network};
use crate::error::{Error, Result};
use crate::nn::dropout;

/// Shifts `x [B*M, C, H, W]` (segments of a clip consecutive) along time: channels
/// `[0, C/div)` take the next segment's values, `[C/div, 2C/div)` the previous segment's,
/// the rest stay; zeros enter at the ends.
pub fn temporal_shift(x: &Tensor, segments: usize, div: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let fold = c / div.max(1);
    if fold == 0 || segments == 0 {
        return Ok(x.clone());
    }
    let m = segments;
    let x5 = x.reshape((n / m, m, c, h, w))?;
    let (left, right) = (x5.narrow(2, 0, fold)?, x5.narrow(2, fold, fold)?);
    let (left, right) = if m == 1 {
        (left.zeros_like()?, right.zeros_like()?)
    } else {
        (
            left.narrow(1, 1, m - 1)?.pad_with_zeros(1, 0, 1)?,
            right.narrow(1, 0, m - 1)?.pad_with_zeros(1, 1, 0)?,
        )
    };
    let rest = x5.narrow(2, 2 * fold, c - 2 * fold)?;
    Tensor::cat(&[left, right, rest], 2)?.reshape((n, c, h, w))
}

/// The TSM network.
pub struct Tsm {
    resnet: ResNet,
    fc: Linear,
    shift_div: usize,
    dropout: f32,
}

impl Tsm {
    /// The ResNet `backbone` under `vb` (torchvision names) and `new_fc`.
    pub fn new(
        cfg: &ModelConfig,
        backbone: BackboneKind,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet = ResNet::of_kind(backbone, vb.clone())
            .map_err(|e| Error::Config(format!("tsm: {e}")))?;
        Ok(Tsm {
            fc: linear(resnet.out_dim(), num_classes, vb.pp("new_fc"))?,
            resnet,
            shift_div: cfg.shift_div,
            dropout: cfg.head_dropout,
        })
    }
}

impl Network for Tsm {
    fn forward_t(&self, clips: &Tensor, train: bool) -> Result<HeadOutput> {
        let (b, m, _c, _h, _w) = clips.dims5()?;
        let frames = clips.flatten(0, 1)?;
        let shift_div = self.shift_div;
        let shift: BranchMap =
            std::sync::Arc::new(move |x: &Tensor| temporal_shift(x, m, shift_div));
        let stages = self.resnet.forward_stages(&frames, train, Some(&shift))?;
        let pooled = |t: &Tensor| -> Result<Tensor> {
            let p = t.mean((2, 3))?;
            let d = p.dim(1)?;
            Ok(p.reshape((b, m, d))?.mean(1)?)
        };
        let last = pooled(&stages[3])?;
        let res4 = pooled(&stages[2])?;
        let logits = self.fc.forward(&dropout(&last, self.dropout, train)?)?;
        Ok(HeadOutput {
            logits,
            features: BTreeMap::from([("last", last), ("res4", res4)]),
            feature_logits: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::init::seeded_randn;

    #[test]
    fn shift_matches_a_loop_reference() {
        let (b, m, c, h, w) = (2, 4, 16, 2, 3);
        let x = seeded_randn(&[b * m, c, h, w], 1, DType::F32, &Device::Cpu).unwrap();
        let y = temporal_shift(&x, m, 8).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |bi: usize, t: usize, ci: usize, p: usize| (((bi * m + t) * c + ci) * h * w) + p;
        let fold = c / 8;
        for bi in 0..b {
            for t in 0..m {
                for ci in 0..c {
                    for p in 0..h * w {
                        let want = if ci < fold {
                            if t + 1 < m {
                                xv[at(bi, t + 1, ci, p)]
                            } else {
                                0.0
                            }
                        } else if ci < 2 * fold {
                            if t > 0 { xv[at(bi, t - 1, ci, p)] } else { 0.0 }
                        } else {
                            xv[at(bi, t, ci, p)]
                        };
                        assert_eq!(yv[at(bi, t, ci, p)], want, "b{bi} t{t} c{ci} p{p}");
                    }
                }
            }
        }
        // One segment: the shifted channels are all zero.
        let one = temporal_shift(&x, 1, 8).unwrap();
        let v = one
            .narrow(1, 0, 2 * fold)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(v.to_scalar::<f32>().unwrap(), 0.0);
    }
}
