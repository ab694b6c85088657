//! Non-local: I3D with embedded-Gaussian non-local blocks (Wang, Girshick, Gupta and He,
//! "Non-local Neural Networks", CVPR 2018, arXiv:1711.07971).
//!
//! A non-local block computes, for every space-time position `i` of `x [B, T, C, H, W]`,
//! `y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)` with `theta`, `phi`, `g` 1x1x1
//! convolutions to `C/2` channels (`phi` and `g` followed by a 1x2x2 max pool, the paper's
//! subsampling, when the map is at least 2x2), and returns `z = BN(W y) + x` with `W` a 1x1x1
//! convolution back to `C` channels. The BatchNorm's scale starts at zero (`zero_bn`), so a
//! new block is the identity and pretrained I3D weights keep their function.
//!
//! Placement (the paper's 5-block setting, §4.1): after every other residual block of res3
//! and res4, starting with the first, at most 2 in res3 and 3 in res4: ResNet-50 blocks
//! `layer2.{0,2}` and `layer3.{0,2,4}`; ResNet-18 blocks `layer2.0` and `layer3.0`.
//! Parameters: `layerN.K.nonlocal.{theta,phi,g,w}.{weight,bias}`, `...nonlocal.zero_bn.*`;
//! they are new, so loading ImageNet or I3D weights leaves them at their initialisation.

use candle_core::Tensor;
use candle_nn::{BatchNorm, VarBuilder, batch_norm};

use super::ModelConfig;
use super::blocks::BackboneKind;
use super::i3d::I3d;
use crate::error::Result;
use crate::nn::softmax_last;
use crate::nn3d::{Conv3d, Conv3dConfig, Pool, conv3d_no_bias, pool3d};

/// Whether block `block` of stage `stage` (0-based: 1 = res3, 2 = res4) gets a non-local block.
pub fn placed(stage: usize, block: usize) -> bool {
    match stage {
        1 => block.is_multiple_of(2) && block / 2 < 2,
        2 => block.is_multiple_of(2) && block / 2 < 3,
        _ => false,
    }
}

fn conv_bias(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv3d> {
    let w = conv3d_no_bias(cin, cout, [1, 1, 1], Conv3dConfig::default(), vb.clone())?;
    let bias = vb.get(cout, "bias")?;
    Ok(Conv3d::new(
        w.weight().clone(),
        Some(bias),
        Conv3dConfig::default(),
    ))
}

/// One embedded-Gaussian non-local block.
pub struct NonLocalBlock {
    theta: Conv3d,
    phi: Conv3d,
    g: Conv3d,
    w: Conv3d,
    bn: BatchNorm,
}

impl NonLocalBlock {
    /// A block on `channels` channels under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let inner = (channels / 2).max(1);
        Ok(NonLocalBlock {
            theta: conv_bias(channels, inner, vb.pp("theta"))?,
            phi: conv_bias(channels, inner, vb.pp("phi"))?,
            g: conv_bias(channels, inner, vb.pp("g"))?,
            w: conv_bias(inner, channels, vb.pp("w"))?,
            bn: batch_norm(channels, 1e-5, vb.pp("zero_bn"))?,
        })
    }

    /// # Shapes
    /// `x [B, T, C, H, W]` -> the same.
    ///
    /// Always float32, also under mixed precision: the softmax over `theta . phi` amplifies
    /// the rounding of half-precision projections (`vdg device parity --precision f16`: the
    /// gradients' error against float64 fell from 30 % to 16 % with the block in float32).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _float32 = crate::nn3d::Autocast::enter(None);
        let (b, t, c, h, w) = x.dims5()?;
        // [B, T, C', H, W] -> [B, T*H*W, C'].
        let flat = |y: &Tensor| -> Result<Tensor> {
            let (b, t, c, h, w) = y.dims5()?;
            Ok(y.permute((0, 1, 3, 4, 2))?.reshape((b, t * h * w, c))?)
        };
        let sub = |y: Tensor| -> Result<Tensor> {
            if h >= 2 && w >= 2 {
                pool3d(&y, [1, 2, 2], [1, 2, 2], [0, 0, 0], Pool::Max)
            } else {
                Ok(y)
            }
        };
        let theta = flat(&self.theta.forward(x)?)?;
        let phi = flat(&sub(self.phi.forward(x)?)?)?;
        let g = flat(&sub(self.g.forward(x)?)?)?;
        let f = softmax_last(&theta.matmul(&phi.transpose(1, 2)?.contiguous()?)?)?;
        let y = f.matmul(&g)?;
        let inner = y.dim(2)?;
        let y = y
            .reshape((b, t, h, w, inner))?
            .permute((0, 1, 4, 2, 3))?
            .contiguous()?;
        let z = self.w.forward(&y)?.reshape((b * t, c, h, w))?;
        let z = crate::batchnorm::forward(&self.bn, &z, train)?.reshape((b, t, c, h, w))?;
        Ok((z + x)?)
    }
}

/// The Non-local network: [`I3d`] with non-local blocks where [`placed`] says.
pub fn build(
    cfg: &ModelConfig,
    backbone: BackboneKind,
    num_classes: usize,
    vb: VarBuilder,
) -> Result<I3d> {
    I3d::new(cfg, backbone, num_classes, true, vb)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;
    use crate::init::{seeded_init, seeded_randn};

    #[test]
    fn a_new_block_is_the_identity_and_placement_follows_the_paper() {
        let vm = VarMap::new();
        let block =
            NonLocalBlock::new(8, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
        seeded_init(&vm, 0).unwrap();
        let x = seeded_randn(&[2, 3, 8, 4, 5], 1, DType::F64, &Device::Cpu).unwrap();
        let y = block.forward(&x, true).unwrap();
        let diff = (y - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        let r50: Vec<(usize, usize)> = [3, 4, 6, 3]
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..n).filter(move |&b| placed(s, b)).map(move |b| (s, b)))
            .collect();
        assert_eq!(r50, [(1, 0), (1, 2), (2, 0), (2, 2), (2, 4)]);
    }

    #[test]
    fn non_local_gradients_match_finite_differences() {
        let vm = VarMap::new();
        let block =
            NonLocalBlock::new(4, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
        seeded_init(&vm, 2).unwrap();
        // Give the output scale a value, so the attention path is exercised.
        vm.data().lock().unwrap()["zero_bn.weight"]
            .set(&Tensor::new(&[0.5f64, -1.0, 2.0, 0.3], &Device::Cpu).unwrap())
            .unwrap();
        let err = crate::gradcheck::check_input_gradient(&[2, 2, 4, 4, 4], 3, 40, &|x| {
            crate::gradcheck::project(&block.forward(x, false)?, 4)
        })
        .unwrap();
        assert!(err < 1e-5, "relative error {err}");
    }
}
