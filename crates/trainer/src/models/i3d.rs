//! I3D: an inflated 3-D ResNet (Carreira and Zisserman, "Quo Vadis, Action Recognition? A New
//! Model and the Kinetics Dataset", CVPR 2017, arXiv:1705.07750), in the ResNet form of Wang
//! et al., "Non-local Neural Networks", CVPR 2018, arXiv:1711.07971 (§4, Table 1).
//!
//! Input: a dense clip `[B, T, 3, H, W]` (32 contiguous frames in the paper's setting, see
//! [`super::Sampling::Dense`]). Layout, for ResNet-50 (ResNet-18 alike with basic blocks):
//!
//! | stage | kernel | stride (t, h, w) | output for 32x224x224 |
//! |---|---|---|---|
//! | `conv1` | 5x7x7 | 2, 2, 2 | 16x112x112 |
//! | pool1 | max 1x3x3 | 1, 2, 2 | 16x56x56 |
//! | `layer1` (res2) | bottlenecks | 1, 1, 1 | 16x56x56 |
//! | pool2 | max 3x1x1 (pad 1) | 2, 1, 1 | 8x56x56 |
//! | `layer2`..`layer4` | bottlenecks | 1, 2, 2 each | 8x7x7 |
//!
//! Inflation: each bottleneck's `conv2` (3x3) becomes 1x3x3; its `conv1` (1x1) becomes 3x1x1
//! in every other block (res2: all three; res3: blocks 0, 2; res4: 0, 2, 4; res5: block 1),
//! 1x1x1 elsewhere; in basic blocks the first 3x3 becomes 3x3x3 by the same pattern.
//! Downsampling shortcuts are 1x1x1. Parameter names are torchvision's (`conv1.weight`,
//! `layer1.0.conv1.weight`, ..., 5-D), so 2-D ImageNet weights inflate into them (each 2-D
//! kernel repeated over the `kt` temporal taps and divided by `kt`, so a static clip gives
//! the 2-D network's activations) and 3-D checkpoints with the same names load as they are
//! (`models::weights::load_backbone_weights`). BatchNorm follows the repository's partial-BN rule (all
//! but `bn1` use running statistics).
//!
//! The spatio-temporal average of `layer4` is `last` (ADA's target); with `ada_star`, the
//! average of `layer3` (`res4`) is attacked too. Dropout, then `new_fc`, gives the logits.

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::{BatchNorm, VarBuilder, batch_norm};

use crate::rowops::{Linear, linear};

use super::blocks::BackboneKind;
use super::blocks::resnet::ResNet;
use super::non_local::NonLocalBlock;
use super::{HeadOutput, ModelConfig, Network};
use crate::error::{Error, Result};
use crate::nn::dropout;
use crate::nn3d::{Conv3d, Conv3dConfig, Pool, batch_norm_frames, conv3d_no_bias, pool3d};

/// Which blocks of each stage get a temporal (3x1x1, or 3x3x3 in basic blocks) first kernel.
pub fn inflated(stage: usize, block: usize, blocks: usize) -> bool {
    match stage {
        0 => true,
        3 => block % 2 == 1 || blocks == 1,
        _ => block.is_multiple_of(2),
    }
}

fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    Ok(batch_norm(c, 1e-5, vb)?)
}

struct Block3d {
    convs: Vec<(Conv3d, BatchNorm)>,
    downsample: Option<(Conv3d, BatchNorm)>,
    non_local: Option<NonLocalBlock>,
}

impl Block3d {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let n = self.convs.len();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            // Partial BN: running statistics.
            y = batch_norm_frames(b, &c.forward(&y)?, false)?;
            if i + 1 < n {
                y = y.relu()?;
            }
        }
        let skip = match &self.downsample {
            Some((c, b)) => batch_norm_frames(b, &c.forward(x)?, false)?,
            None => x.clone(),
        };
        let out = crate::fused::add_relu(&y, &skip)?;
        match &self.non_local {
            Some(nl) => nl.forward(&out, train),
            None => Ok(out),
        }
    }
}

/// The I3D network (and, with non-local blocks, the Non-local network).
pub struct I3d {
    conv1: Conv3d,
    bn1: BatchNorm,
    layers: Vec<Vec<Block3d>>,
    fc: Linear,
    dropout: f32,
}

impl I3d {
    /// The inflated `backbone` (`resnet18` or `resnet50`) under `vb`, `new_fc`, and, when
    /// `non_local`, the non-local blocks placed by [`super::non_local::placed`].
    pub fn new(
        cfg: &ModelConfig,
        backbone: BackboneKind,
        num_classes: usize,
        non_local: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (bottleneck, counts) =
            ResNet::layout(backbone).map_err(|e| Error::Config(format!("i3d: {e}")))?;
        let conv1 = conv3d_no_bias(
            3,
            64,
            [5, 7, 7],
            Conv3dConfig::same([5, 7, 7], [2, 2, 2]),
            vb.pp("conv1"),
        )?;
        let bn1 = bn(64, vb.pp("bn1"))?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut cin = 64;
        let mut layers = Vec::new();
        for (li, (&count, width)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
            let lvb = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::new();
            for bi in 0..count {
                let b = lvb.pp(bi.to_string());
                let s = if bi == 0 && li > 0 { 2 } else { 1 };
                let kt = if inflated(li, bi, count) { 3 } else { 1 };
                let cout = width * expansion;
                let c =
                    |ci, co, k: [usize; 3], stride, name: &str| -> Result<(Conv3d, BatchNorm)> {
                        Ok((
                            conv3d_no_bias(ci, co, k, Conv3dConfig::same(k, stride), b.pp(name))?,
                            bn(co, b.pp(name.replace("conv", "bn")))?,
                        ))
                    };
                let convs = if bottleneck {
                    vec![
                        c(cin, width, [kt, 1, 1], [1, 1, 1], "conv1")?,
                        c(width, width, [1, 3, 3], [1, s, s], "conv2")?,
                        c(width, cout, [1, 1, 1], [1, 1, 1], "conv3")?,
                    ]
                } else {
                    vec![
                        c(cin, width, [kt, 3, 3], [1, s, s], "conv1")?,
                        c(width, width, [1, 3, 3], [1, 1, 1], "conv2")?,
                    ]
                };
                let downsample = if s != 1 || cin != cout {
                    Some((
                        conv3d_no_bias(
                            cin,
                            cout,
                            [1, 1, 1],
                            Conv3dConfig::same([1, 1, 1], [1, s, s]),
                            b.pp("downsample.0"),
                        )?,
                        bn(cout, b.pp("downsample.1"))?,
                    ))
                } else {
                    None
                };
                let non_local = if non_local && super::non_local::placed(li, bi) {
                    Some(NonLocalBlock::new(cout, b.pp("nonlocal"))?)
                } else {
                    None
                };
                blocks.push(Block3d {
                    convs,
                    downsample,
                    non_local,
                });
                cin = cout;
            }
            layers.push(blocks);
        }
        Ok(I3d {
            conv1,
            bn1,
            layers,
            fc: linear(cin, num_classes, vb.pp("new_fc"))?,
            dropout: cfg.head_dropout,
        })
    }
}

impl Network for I3d {
    fn forward_t(&self, clips: &Tensor, train: bool) -> Result<HeadOutput> {
        let (_b, _t, _c, _h, _w) = clips.dims5()?;
        let x = batch_norm_frames(&self.bn1, &self.conv1.forward(clips)?, train)?.relu()?;
        let mut x = pool3d(&x, [1, 3, 3], [1, 2, 2], [0, 1, 1], Pool::Max)?;
        let mut res4 = None;
        for (li, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward(&x, train)?;
            }
            if li == 0 {
                x = pool3d(&x, [3, 1, 1], [2, 1, 1], [1, 0, 0], Pool::Max)?;
            }
            if li == 2 {
                res4 = Some(x.mean((1, 3, 4))?);
            }
        }
        let last = x.mean((1, 3, 4))?;
        let logits = self.fc.forward(&dropout(&last, self.dropout, train)?)?;
        let mut features = BTreeMap::from([("last", last)]);
        if let Some(r) = res4 {
            features.insert("res4", r);
        }
        Ok(HeadOutput {
            logits,
            features,
            feature_logits: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;
    use crate::init::{seeded_init, seeded_randn};

    #[test]
    fn inflation_pattern_and_output_sizes_follow_the_table() {
        let pattern: Vec<Vec<bool>> = [3, 4, 6, 3]
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n).map(|b| inflated(s, b, n)).collect())
            .collect();
        assert_eq!(
            pattern,
            vec![
                vec![true; 3],
                vec![true, false, true, false],
                vec![true, false, true, false, true, false],
                vec![false, true, false],
            ]
        );
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = ModelConfig::tiny();
        let net = I3d::new(&cfg, BackboneKind::Resnet50, 7, false, vb).unwrap();
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        let dims = |n: &str| vm.data().lock().unwrap()[n].dims().to_vec();
        assert_eq!(dims("conv1.weight"), [64, 3, 5, 7, 7]);
        assert_eq!(dims("layer1.0.conv1.weight"), [64, 64, 3, 1, 1]);
        assert_eq!(dims("layer2.1.conv1.weight"), [128, 512, 1, 1, 1]);
        assert_eq!(dims("layer4.1.conv1.weight"), [512, 2048, 3, 1, 1]);
        assert_eq!(dims("layer3.0.conv2.weight"), [256, 256, 1, 3, 3]);
        assert_eq!(dims("layer3.0.downsample.0.weight"), [1024, 512, 1, 1, 1]);
        // Same tensors as torchvision's ResNet-50 (53 convolutions, 53 BatchNorms) + new_fc.
        assert_eq!(names.len(), 53 + 53 * 4 + 2);
        seeded_init(&vm, 0).unwrap();
        // 8 frames of 64x64: time 8 -> 4 (conv1) -> 2 (pool2); space 64 -> 2 at layer4.
        let x = seeded_randn(&[1, 8, 3, 64, 64], 1, DType::F32, &Device::Cpu).unwrap();
        let out = net.forward_t(&x, false).unwrap();
        assert_eq!(out.logits.dims(), &[1, 7]);
        assert_eq!(out.feature("last").unwrap().dims(), &[1, 2048]);
        assert_eq!(out.feature("res4").unwrap().dims(), &[1, 1024]);
    }
}
