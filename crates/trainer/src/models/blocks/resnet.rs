//! ResNet-18/50 with torchvision's parameter names (`conv1`, `bn1`, `layer1.0.conv1`, ...,
//! `layerN.0.downsample.{0,1}`), so ImageNet weights converted to safetensors load by path.
//!
//! Partial BN (the released APN code's default): in training, every BatchNorm but the first
//! (`bn1`) runs in evaluation mode (running statistics, not updated); [`is_frozen_bn`] names
//! the parameters the optimiser must leave alone.
//!
//! He et al., "Deep Residual Learning for Image Recognition", 2015, arXiv:1512.03385.

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, VarBuilder, batch_norm, conv2d_no_bias};

use crate::error::Result;

fn conv(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        stride,
        padding: k / 2,
        ..Default::default()
    };
    Ok(conv2d_no_bias(cin, cout, k, cfg, vb)?)
}

fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    Ok(batch_norm(c, 1e-5, vb)?)
}

/// Whether a parameter name belongs to a BatchNorm that partial BN freezes (all but `bn1`).
pub fn is_frozen_bn(name: &str) -> bool {
    let local = name.rsplit_once("layer").map(|(_, r)| r).unwrap_or(name);
    name.contains("layer") && (local.contains(".bn") || local.contains("downsample.1"))
}

/// A map applied to the input of every residual branch (TSM's temporal shift); shared, so
/// that a recomputed block ([`crate::recompute`]) can apply it again in backward.
pub type BranchMap = std::sync::Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// A borrowed [`BranchMap`].
pub type BranchInput<'a> = &'a BranchMap;

/// A convolution through `nn3d::conv2d` (1x1 kernels as matrix products).
fn apply(c: &Conv2d, x: &Tensor) -> candle_core::Result<Tensor> {
    let cfg = c.config();
    crate::nn3d::conv2d(x, c.weight(), cfg.padding, cfg.stride, cfg.dilation)
        .map_err(candle_core::Error::wrap)
}

/// A convolution, a BatchNorm on its running statistics and, when `relu`, a ReLU: with
/// `fold` (inference) as [`conv_bn_folded`], else the convolution and one BatchNorm op (the
/// ReLU fused into it).
fn conv_bn_act(
    c: &Conv2d,
    b: &BatchNorm,
    x: &Tensor,
    fold: bool,
    relu: bool,
) -> candle_core::Result<Tensor> {
    if fold {
        return conv_bn_folded(c, b, x, relu);
    }
    let y = apply(c, x)?;
    let y = if relu {
        crate::batchnorm::forward_relu(b, &y, false)
    } else {
        crate::batchnorm::forward(b, &y, false)
    };
    y.map_err(candle_core::Error::wrap)
}

/// A convolution followed by a BatchNorm on its running statistics, then a ReLU when `relu`:
/// the BatchNorm's per-channel affine map folded into the convolution's weights and a bias
/// (`w * s`, `beta - mean * s`, `s = gamma / sqrt(var + eps)`), the same function with the
/// same gradients (they reach `w`, `gamma` and `beta` through the fold). One operation, one
/// kept activation (BatchNorm's four broadcast passes over the activation cost about as much
/// as a 1x1 convolution on `[8, 256, 56, 56]`; BENCHMARKS.md), and where the convolution is
/// lowered the ReLU is fused into it ([`crate::nn3d::conv2d_bias_relu`]).
fn conv_bn_folded(
    c: &Conv2d,
    b: &BatchNorm,
    x: &Tensor,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let s = (b.running_var() + b.eps())?.sqrt()?.recip()?;
    let (s, shift) = match b.weight_and_bias() {
        Some((gamma, beta)) => {
            let s = (s * gamma)?;
            let shift = (beta - (b.running_mean() * &s)?)?;
            (s, shift)
        }
        None => {
            let shift = (b.running_mean() * &s)?.neg()?;
            (s, shift)
        }
    };
    let w = c
        .weight()
        .broadcast_mul(&s.reshape((s.elem_count(), 1, 1, 1))?)?;
    let cfg = c.config();
    let (p, st, d) = (cfg.padding, cfg.stride, cfg.dilation);
    let y = if relu {
        crate::nn3d::conv2d_bias_relu(x, &w, Some(&shift), p, st, d)
    } else {
        crate::nn3d::conv2d_bias(x, &w, Some(&shift), p, st, d)
    };
    y.map_err(candle_core::Error::wrap)
}

#[derive(Clone)]
pub(crate) struct Block {
    pub(crate) convs: Vec<(Conv2d, BatchNorm)>,
    pub(crate) downsample: Option<(Conv2d, BatchNorm)>,
}

impl Block {
    /// The block's convolution + BatchNorm pairs: the branch's, then the downsample's.
    fn pairs(&self) -> impl Iterator<Item = &(Conv2d, BatchNorm)> {
        self.convs.iter().chain(&self.downsample)
    }

    /// The parameters a gradient can reach, in [`Block::with_params`]'s order: per pair the
    /// kernel, then the BatchNorm's gain and shift (the running statistics are constants).
    fn params(&self) -> Vec<Tensor> {
        let mut p = Vec::new();
        for (c, b) in self.pairs() {
            p.push(c.weight().clone());
            if let Some((gamma, beta)) = b.weight_and_bias() {
                p.extend([gamma.clone(), beta.clone()]);
            }
        }
        p
    }

    /// The same block on the parameters `p` ([`Block::params`]'s order).
    fn with_params(&self, p: &[Tensor]) -> candle_core::Result<Block> {
        let mut p = p.iter().cloned();
        let mut next = || {
            p.next()
                .ok_or_else(|| candle_core::Error::Msg("resnet block: too few parameters".into()))
        };
        let mut pair = |(c, b): &(Conv2d, BatchNorm)| -> candle_core::Result<(Conv2d, BatchNorm)> {
            let conv = Conv2d::new(next()?, None, *c.config());
            let (mean, var) = (b.running_mean().clone(), b.running_var().clone());
            let n = mean.elem_count();
            let bn = match b.weight_and_bias() {
                Some(_) => BatchNorm::new(n, mean, var, next()?, next()?, b.eps())?,
                None => BatchNorm::new_no_bias(n, mean, var, b.eps())?,
            };
            Ok((conv, bn))
        };
        let convs = self
            .convs
            .iter()
            .map(&mut pair)
            .collect::<candle_core::Result<_>>()?;
        let downsample = self.downsample.as_ref().map(&mut pair).transpose()?;
        Ok(Block { convs, downsample })
    }

    /// The block; `branch_input` maps the input before the residual branch (TSM's shift),
    /// the identity path keeps the unshifted input.
    ///
    /// Partial BN: these BatchNorms always use their running statistics. Inference (`fold`)
    /// folds them into the convolutions ([`conv_bn_folded`]); training keeps them as one
    /// op each (`crate::batchnorm`, the ReLU fused where one follows): folding in training
    /// too kept fewer activations but made a ResNet-50 step at 64 px 21-37 % slower (the
    /// fold's backward over every weight; BENCHMARKS.md, "Training memory"). The residual
    /// sum and its ReLU are one op ([`crate::fused::add_relu`]) either way.
    ///
    /// In training under [`crate::recompute::Recompute`] the block is one node of the graph
    /// that keeps only its output; its activations are recomputed in backward.
    fn forward(
        &self,
        x: &Tensor,
        branch_input: Option<BranchInput<'_>>,
        fold: bool,
    ) -> candle_core::Result<Tensor> {
        if !fold && self.taped_applies(x) {
            let f = std::sync::Arc::new(TapedBlock {
                block: self.clone(),
                shift: branch_input.cloned(),
            });
            return crate::recompute::taped(f, x, &self.params(), crate::recompute::enabled());
        }
        if !fold && crate::recompute::enabled() {
            let block = self.clone();
            let shift = branch_input.cloned();
            let f: crate::recompute::Function = std::sync::Arc::new(move |x, p| {
                block
                    .with_params(p)?
                    .forward_plain(x, shift.as_ref(), false)
            });
            return crate::recompute::recomputed(f, x, &self.params());
        }
        self.forward_plain(x, branch_input, fold)
    }

    /// Whether training runs this block as one node with its own backward ([`TapedBlock`]):
    /// float32 or float64 on the CPU outside mixed precision, every BatchNorm with a gain and
    /// a shift, every convolution one [`crate::nn3d::conv2d_grads`] covers.
    fn taped_applies(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.pairs().all(|(c, b)| {
                b.weight_and_bias().is_some()
                    && c.weight().dtype() == x.dtype()
                    && crate::nn3d::conv2d_grads_apply(x, c.weight(), c.config().padding)
            })
    }

    fn forward_plain(
        &self,
        x: &Tensor,
        branch_input: Option<BranchInput<'_>>,
        fold: bool,
    ) -> candle_core::Result<Tensor> {
        let mut y = match branch_input {
            Some(f) => f(x)?,
            None => x.clone(),
        };
        let n = self.convs.len();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            y = conv_bn_act(c, b, &y, fold, i + 1 < n)?;
        }
        let skip = match &self.downsample {
            Some((c, b)) => conv_bn_act(c, b, x, fold, false)?,
            None => x.clone(),
        };
        crate::fused::add_relu(&y, &skip).map_err(candle_core::Error::wrap)
    }
}

/// A residual block in training as one node of candle's graph with a backward chained by
/// hand from its operations' own ([`crate::recompute::Taped`]): the convolutions'
/// ([`crate::nn3d::conv2d_grads`]), the BatchNorms' on running statistics
/// ([`crate::batchnorm::Frozen`]) and the residual ReLU's. The same operations as
/// [`Block::forward_plain`] in the same order; candle's backward through them gave every
/// intermediate tensor (each 1x1 convolution's reshaped input and output too) a zero-filled
/// gradient and added its one contribution to it: about a fifth of a ResNet-50 step
/// (BENCHMARKS.md, "Training memory").
struct TapedBlock {
    block: Block,
    shift: Option<BranchMap>,
}

/// What [`TapedBlock`]'s backward needs: the input of every convolution of the branch and
/// of every BatchNorm (the convolutions' outputs), and the downsample's convolution output.
struct BlockTape {
    conv_in: Vec<Tensor>,
    bn_in: Vec<Tensor>,
    downsample_bn_in: Option<Tensor>,
}

/// A BatchNorm with its gain and shift as [`crate::batchnorm::Frozen`].
fn frozen(b: &BatchNorm, x: &Tensor, relu: bool) -> candle_core::Result<crate::batchnorm::Frozen> {
    crate::batchnorm::Frozen::new(b, x, relu)
        .map_err(candle_core::Error::wrap)?
        .ok_or_else(|| candle_core::Error::Msg("resnet block: BatchNorm without gain".into()))
}

/// `(dx, [dw, dgamma, dbeta])` of a convolution + BatchNorm pair with input `x`, the
/// convolution's output `z` and the BatchNorm's output gradient `d`.
fn pair_grads(
    (c, b): &(Conv2d, BatchNorm),
    x: &Tensor,
    z: &Tensor,
    d: &Tensor,
    relu: bool,
) -> candle_core::Result<(Tensor, [Tensor; 3])> {
    let (dz, dg, db) = frozen(b, z, relu)?.backward(z, d)?;
    let cfg = c.config();
    let (dx, dw) =
        crate::nn3d::conv2d_grads(x, c.weight(), cfg.padding, cfg.stride, cfg.dilation, &dz)
            .map_err(candle_core::Error::wrap)?;
    Ok((dx, [dw, dg, db]))
}

impl crate::recompute::Taped for TapedBlock {
    fn forward(
        &self,
        x: &Tensor,
        params: &[Tensor],
    ) -> candle_core::Result<(Tensor, crate::recompute::Tape)> {
        let b = self.block.with_params(params)?;
        let n = b.convs.len();
        let mut cur = match &self.shift {
            Some(f) => f(x)?,
            None => x.clone(),
        };
        let (mut conv_in, mut bn_in) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (i, (c, bn)) in b.convs.iter().enumerate() {
            let z = apply(c, &cur)?;
            let y = frozen(bn, &z, i + 1 < n)?.forward(&z)?;
            conv_in.push(std::mem::replace(&mut cur, y));
            bn_in.push(z);
        }
        let (skip, downsample_bn_in) = match &b.downsample {
            Some((c, bn)) => {
                let z = apply(c, x)?;
                (frozen(bn, &z, false)?.forward(&z)?, Some(z))
            }
            None => (x.clone(), None),
        };
        let out = crate::fused::add_relu(&cur, &skip).map_err(candle_core::Error::wrap)?;
        let tape = BlockTape {
            conv_in,
            bn_in,
            downsample_bn_in,
        };
        Ok((out, Box::new(tape)))
    }

    fn backward(
        &self,
        tape: crate::recompute::Tape,
        x: &Tensor,
        params: &[Tensor],
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let t = tape
            .downcast::<BlockTape>()
            .map_err(|_| candle_core::Error::Msg("resnet block: not its tape".into()))?;
        let b = self.block.with_params(params)?;
        let n = b.convs.len();
        // Through the residual ReLU: both the branch and the shortcut get `g`.
        let g = crate::fused::relu_grad(grad, out)?;
        let mut grads: Vec<[Tensor; 3]> = Vec::with_capacity(n + 1);
        let mut d = g.clone();
        for i in (0..n).rev() {
            let (dx, pair) = pair_grads(&b.convs[i], &t.conv_in[i], &t.bn_in[i], &d, i + 1 < n)?;
            grads.push(pair);
            d = dx;
        }
        grads.reverse();
        // `d` is the gradient of the branch's input: back through the branch map, if any.
        let d_branch = match &self.shift {
            Some(f) => {
                let xv = Var::from_tensor(x)?;
                let s = f(xv.as_tensor())?;
                match crate::recompute::backward_from(&s, &d)?.get(xv.as_tensor()) {
                    Some(dx) => dx.clone(),
                    None => x.zeros_like()?,
                }
            }
            None => d,
        };
        let d_skip = match (&b.downsample, &t.downsample_bn_in) {
            (Some(pair), Some(z)) => {
                let (dx, p) = pair_grads(pair, x, z, &g, false)?;
                grads.push(p);
                dx
            }
            (None, None) => g,
            _ => candle_core::bail!("resnet block: the tape does not match the block"),
        };
        let dx = (d_branch + d_skip)?;
        Ok((dx, grads.into_iter().flatten().collect()))
    }
}

/// A torchvision-layout ResNet without its final `fc`.
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    layers: Vec<Vec<Block>>,
    out_dim: usize,
    /// The channels-last engine of an evaluation on constant weights (see `forward_t`).
    frozen: std::sync::OnceLock<Box<crate::infer::ResnetInference>>,
}

impl ResNet {
    /// Bottleneck blocks or basic blocks, and blocks per stage, of a ResNet backbone.
    pub fn layout(kind: super::BackboneKind) -> Result<(bool, [usize; 4])> {
        match kind {
            super::BackboneKind::Resnet18 => Ok((false, [2, 2, 2, 2])),
            super::BackboneKind::Resnet50 => Ok((true, [3, 4, 6, 3])),
            other => Err(crate::error::Error::Config(format!(
                "{} is not a ResNet (use resnet18 or resnet50)",
                other.name()
            ))),
        }
    }

    /// The ResNet of `kind` (`resnet18` or `resnet50`).
    pub fn of_kind(kind: super::BackboneKind, vb: VarBuilder) -> Result<Self> {
        let (bottleneck, counts) = Self::layout(kind)?;
        Self::build(bottleneck, counts, vb)
    }

    fn build(bottleneck: bool, counts: [usize; 4], vb: VarBuilder) -> Result<Self> {
        let conv1 = conv(3, 64, 7, 2, vb.pp("conv1"))?;
        let bn1 = bn(64, vb.pp("bn1"))?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut cin = 64;
        let mut layers = Vec::new();
        for (li, (&count, width)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
            let lvb = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::new();
            for bi in 0..count {
                let b = lvb.pp(bi.to_string());
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let cout = width * expansion;
                let convs = if bottleneck {
                    vec![
                        (
                            conv(cin, width, 1, 1, b.pp("conv1"))?,
                            bn(width, b.pp("bn1"))?,
                        ),
                        (
                            conv(width, width, 3, stride, b.pp("conv2"))?,
                            bn(width, b.pp("bn2"))?,
                        ),
                        (
                            conv(width, cout, 1, 1, b.pp("conv3"))?,
                            bn(cout, b.pp("bn3"))?,
                        ),
                    ]
                } else {
                    vec![
                        (
                            conv(cin, width, 3, stride, b.pp("conv1"))?,
                            bn(width, b.pp("bn1"))?,
                        ),
                        (
                            conv(width, width, 3, 1, b.pp("conv2"))?,
                            bn(width, b.pp("bn2"))?,
                        ),
                    ]
                };
                let downsample = if stride != 1 || cin != cout {
                    Some((
                        conv(cin, cout, 1, stride, b.pp("downsample.0"))?,
                        bn(cout, b.pp("downsample.1"))?,
                    ))
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                cin = cout;
            }
            layers.push(blocks);
        }
        Ok(ResNet {
            conv1,
            bn1,
            layers,
            out_dim: cin,
            frozen: std::sync::OnceLock::new(),
        })
    }

    /// ResNet-18 (BasicBlocks 2-2-2-2).
    pub fn resnet18(vb: VarBuilder) -> Result<Self> {
        Self::build(false, [2, 2, 2, 2], vb)
    }

    /// ResNet-50 (Bottlenecks 3-4-6-3).
    pub fn resnet50(vb: VarBuilder) -> Result<Self> {
        Self::build(true, [3, 4, 6, 3], vb)
    }

    /// Channels of the pooled output (512 or 2048).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The stem and the stages' blocks (for [`crate::infer`]).
    pub(crate) fn parts(&self) -> (&Conv2d, &BatchNorm, &[Vec<Block>]) {
        (&self.conv1, &self.bn1, &self.layers)
    }
}

impl ResNet {
    /// The output of each stage (`layer1` .. `layer4`), unpooled, `[N, C_i, H_i, W_i]`;
    /// `branch_input` is applied to the input of every residual branch (see TSM).
    pub fn forward_stages(
        &self,
        x: &Tensor,
        train: bool,
        branch_input: Option<BranchInput<'_>>,
    ) -> Result<Vec<Tensor>> {
        // The stem's BatchNorm trains on batch statistics (the one partial BN leaves
        // training); inference folds it like every other.
        let x = if train {
            crate::batchnorm::forward_relu(&self.bn1, &apply(&self.conv1, x)?, true)
                .map_err(candle_core::Error::wrap)?
        } else {
            conv_bn_folded(&self.conv1, &self.bn1, x, true)?
        };
        // candle's max_pool2d has no gradient for overlapping windows; this one does.
        let mut x = crate::nn3d::max_pool2d(&x, 3, 2, 1)?;
        let mut stages = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            for block in layer {
                x = block.forward(&x, branch_input, !train)?;
            }
            stages.push(x.clone());
        }
        Ok(stages)
    }
}

impl ResNet {
    /// Whether an evaluation forward of `x` can run on the channels-last engine
    /// ([`crate::infer`]): nothing in it can want a gradient (the weights are constants, not
    /// variables, as in the detached copy `vdg train` evaluates; `x` is untracked), and it
    /// is float32 on the CPU outside mixed precision.
    fn frozen_applies(&self, x: &Tensor, train: bool) -> bool {
        !train
            && !x.track_op()
            && !self.conv1.weight().track_op()
            && x.device().is_cpu()
            && x.dtype() == candle_core::DType::F32
            && self.conv1.weight().dtype() == candle_core::DType::F32
            && crate::nn3d::autocast_dtype().is_none()
    }
}

impl ModuleT for ResNet {
    /// Training, or anything with variables in it, runs candle's graph. An evaluation on
    /// constant weights (the detached copy `vdg train` evaluates on) runs the channels-last
    /// engine, folded on first use and kept: such a copy must not outlive a change of the
    /// weights it was made from (it shares their storage; `vdg train` makes a fresh one for
    /// every evaluation).
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if self.frozen_applies(x, train) {
            let engine = match self.frozen.get() {
                Some(e) => e,
                None => {
                    let e = crate::infer::ResnetInference::new(self)
                        .map_err(candle_core::Error::wrap)?;
                    self.frozen.get_or_init(|| Box::new(e))
                }
            };
            return engine.forward(x).map_err(candle_core::Error::wrap);
        }
        let stages = self
            .forward_stages(x, train, None)
            .map_err(candle_core::Error::wrap)?;
        match stages.last() {
            Some(last) => last.mean((2, 3)),
            None => candle_core::bail!("ResNet without stages"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folding a BatchNorm into its convolution changes nothing, values or gradients: every
    /// convolution of a ResNet-50 (3x3, 1x1 on large and small maps, strided, the 7x7 stem)
    /// with random running statistics, gains and shifts, folded and not, with and without
    /// the ReLU (fused into the lowered convolution), in float64. Gradients of the input,
    /// the kernel, the gain and the shift are compared on a subset (every third pair).
    #[test]
    fn folded_batch_norm_equals_batch_norm_on_running_statistics() {
        use candle_core::{DType, Device, Var};
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let net = ResNet::resnet50(VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
        crate::init::seeded_init(&vm, 3).unwrap();
        {
            let data = vm.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for (i, name) in names.into_iter().enumerate() {
                let var = &data[name];
                let r = crate::init::seeded_randn(var.dims(), 100 + i as u64, DType::F64, &dev)
                    .unwrap();
                if name.ends_with("running_var") {
                    var.set(&(r.abs().unwrap() + 0.5).unwrap()).unwrap();
                } else if name.ends_with("running_mean") || name.contains("bn") {
                    var.set(&r).unwrap();
                }
            }
        }
        let mut pairs: Vec<(&Conv2d, &BatchNorm)> = vec![(&net.conv1, &net.bn1)];
        for layer in &net.layers {
            for block in layer {
                pairs.extend(block.convs.iter().map(|(c, b)| (c, b)));
                pairs.extend(block.downsample.iter().map(|(c, b)| (c, b)));
            }
        }
        assert!(pairs.len() > 50);
        let max_abs = |t: &Tensor| -> f64 {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = max_abs(&(a - b).unwrap());
            let scale = max_abs(a).max(1.0);
            assert!(d <= 1e-10 * scale, "{what}: {d} (scale {scale})");
        };
        for (i, (c, b)) in pairs.into_iter().enumerate() {
            let cin = c.weight().dim(1).unwrap();
            // A large map (16x16 -> the 1x1 per-image path) and a small one (5x5).
            for side in [16, 5] {
                let x =
                    crate::init::seeded_randn(&[2, cin, side, side], i as u64, DType::F64, &dev)
                        .unwrap();
                let x = Var::from_tensor(&x).unwrap();
                for relu in [false, true] {
                    let bn = crate::batchnorm::forward(b, &apply(c, x.as_tensor()).unwrap(), false)
                        .unwrap();
                    let plain = if relu { bn.relu().unwrap() } else { bn };
                    let folded = conv_bn_folded(c, b, x.as_tensor(), relu).unwrap();
                    close(
                        &plain,
                        &folded,
                        &format!("conv {i} side {side} relu {relu}"),
                    );
                    if i % 3 != 0 || side != 5 {
                        continue;
                    }
                    let r = crate::init::seeded_randn(plain.dims(), 7, DType::F64, &dev).unwrap();
                    let g1 = (&plain * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let g2 = (&folded * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let (gamma, beta) = b.weight_and_bias().unwrap();
                    for (t, what) in [
                        (x.as_tensor(), "input"),
                        (c.weight(), "kernel"),
                        (gamma, "gain"),
                        (beta, "shift"),
                    ] {
                        close(
                            g1.get(t).unwrap(),
                            g2.get(t).unwrap(),
                            &format!("conv {i} relu {relu}: gradient of the {what}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gradients_reach_the_stem_through_the_overlapping_max_pool() {
        use candle_core::{DType, Device};
        use candle_nn::VarMap;
        let vm = VarMap::new();
        let net = ResNet::resnet18(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        crate::init::seeded_init(&vm, 0).unwrap();
        let x = crate::init::seeded_randn(&[2, 3, 32, 32], 1, DType::F32, &Device::Cpu).unwrap();
        let loss = net
            .forward_t(&x, true)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let g = grads
            .get(data["conv1.weight"].as_tensor())
            .expect("conv1 gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0);
    }

    /// Recomputed blocks (`vdg train --recompute`) give the plain graph's values and
    /// gradients (input and every parameter), with and without a branch-input map (TSM's
    /// shift).
    #[test]
    fn recomputed_blocks_give_the_plain_gradients() {
        use candle_core::{DType, Device, Var};
        use candle_nn::VarMap;
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let net = ResNet::resnet18(VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
        crate::init::seeded_init(&vm, 3).unwrap();
        let x = Var::from_tensor(
            &crate::init::seeded_randn(&[2, 3, 32, 32], 4, DType::F64, &dev).unwrap(),
        )
        .unwrap();
        let w = crate::init::seeded_randn(&[2, 512, 1, 1], 5, DType::F64, &dev).unwrap();
        let shift: BranchMap = std::sync::Arc::new(|t: &Tensor| t.affine(0.5, 0.25));
        for branch in [None, Some(&shift)] {
            let run = |on: bool| {
                let _r = crate::recompute::Recompute::enter(on);
                let stages = net.forward_stages(x.as_tensor(), true, branch).unwrap();
                let loss = stages[3]
                    .sqr()
                    .unwrap()
                    .broadcast_mul(&w)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                (loss.to_scalar::<f64>().unwrap(), loss.backward().unwrap())
            };
            let ((l1, g1), (l2, g2)) = (run(false), run(true));
            assert_eq!(l1, l2, "loss");
            let data = vm.data().lock().unwrap();
            let mut checked = 0;
            for (name, v) in data.iter().chain([(&"input".to_string(), &x)]) {
                let (Some(a), Some(b)) = (g1.get(v.as_tensor()), g2.get(v.as_tensor())) else {
                    assert!(
                        name.contains("running")
                            || g1.get(v.as_tensor()).is_none() == g2.get(v.as_tensor()).is_none(),
                        "{name}: a gradient on one side only"
                    );
                    continue;
                };
                let scale = crate::tests::max_diff(a, &a.zeros_like().unwrap()).max(1e-30);
                let d = crate::tests::max_diff(a, b);
                assert!(d == 0.0, "{name}: {d} (scale {scale})");
                checked += 1;
            }
            // 20 kernels, 20 BatchNorms' gain and shift, the input.
            assert_eq!(checked, 61, "branch map {}", branch.is_some());
        }
    }

    /// The blocks' own backward ([`TapedBlock`], every block in training on the CPU) against
    /// candle's backward through the same operations composed ([`Block::forward_plain`]):
    /// ResNet-18 and ResNet-50 at 64 x 64 (1x1 convolutions on maps of 256 to 64 pixels and on
    /// smaller ones, strided shortcuts), with and without a branch-input map.
    #[test]
    fn the_blocks_own_backward_equals_candles() {
        use candle_core::{DType, Device, Var};
        use candle_nn::VarMap;
        let dev = Device::Cpu;
        for fifty in [false, true] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
            let net = if fifty {
                ResNet::resnet50(vb)
            } else {
                ResNet::resnet18(vb)
            }
            .unwrap();
            crate::init::seeded_init(&vm, 7).unwrap();
            let x = Var::from_tensor(
                &crate::init::seeded_randn(&[2, 3, 64, 64], 8, DType::F64, &dev).unwrap(),
            )
            .unwrap();
            let shift: BranchMap = std::sync::Arc::new(|t: &Tensor| {
                // A map that mixes positions, like TSM's shift: the gradient must go back
                // through it.
                let (n, c, h, w) = t.dims4()?;
                let half = t.narrow(1, 0, c / 2)?;
                let rest = t.narrow(1, c / 2, c - c / 2)?;
                Tensor::cat(&[&rest, &half.affine(0.5, 0.0)?], 1)?.reshape((n, c, h, w))
            });
            for branch in [None, Some(&shift)] {
                let run = |composed: bool| {
                    let stages = if composed {
                        let stem = crate::batchnorm::forward_relu(
                            &net.bn1,
                            &apply(&net.conv1, x.as_tensor()).unwrap(),
                            true,
                        )
                        .unwrap();
                        let mut h = crate::nn3d::max_pool2d(&stem, 3, 2, 1).unwrap();
                        for layer in &net.layers {
                            for block in layer {
                                h = block.forward_plain(&h, branch, false).unwrap();
                            }
                        }
                        h
                    } else {
                        net.forward_stages(x.as_tensor(), true, branch).unwrap()[3].clone()
                    };
                    let w = crate::init::seeded_randn(stages.dims(), 9, DType::F64, &dev).unwrap();
                    let loss = (stages.sqr().unwrap() * w).unwrap().sum_all().unwrap();
                    (loss.to_scalar::<f64>().unwrap(), loss.backward().unwrap())
                };
                let ((l1, g1), (l2, g2)) = (run(true), run(false));
                assert!((l1 - l2).abs() <= 1e-12 * l1.abs(), "loss {l1} vs {l2}");
                let data = vm.data().lock().unwrap();
                let mut checked = 0;
                for (name, v) in data.iter().chain([(&"input".to_string(), &x)]) {
                    if name.contains("running") {
                        continue;
                    }
                    let (a, b) = (
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    );
                    let scale = crate::tests::max_diff(a, &a.zeros_like().unwrap());
                    let d = crate::tests::max_diff(a, b);
                    assert!(
                        scale > 0.0 && d <= 1e-10 * scale,
                        "{name}: {d} (scale {scale})"
                    );
                    checked += 1;
                }
                // Kernels, BatchNorms' gains and shifts, the input.
                let convs = if fifty { 53 } else { 20 };
                assert_eq!(
                    checked,
                    3 * convs + 1,
                    "ResNet-50 {fifty}, map {}",
                    branch.is_some()
                );
            }
        }
    }

    /// `vdg train` evaluates on a detached copy of the weights: there the evaluation forward
    /// runs the channels-last engine (same values as the graph on the variables), while a
    /// forward whose input wants a gradient keeps the graph and gets one.
    #[test]
    fn an_evaluation_on_constant_weights_runs_channels_last_with_the_same_values() {
        use candle_core::{DType, Device, Var};
        use candle_nn::VarMap;
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let net = ResNet::resnet18(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        crate::init::seeded_init(&vm, 5).unwrap();
        let tensors = crate::init::detached(&vm).unwrap();
        let copy = ResNet::resnet18(VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap();
        let x = crate::init::seeded_randn(&[2, 3, 40, 40], 6, DType::F32, &dev).unwrap();
        let graph = net.forward_t(&x, false).unwrap();
        assert!(net.frozen.get().is_none(), "variables must keep the graph");
        let engine = copy.forward_t(&x, false).unwrap();
        assert!(
            copy.frozen.get().is_some(),
            "constants should run channels-last"
        );
        let (a, b): (Vec<f32>, Vec<f32>) = (
            graph.flatten_all().unwrap().to_vec1().unwrap(),
            engine.flatten_all().unwrap().to_vec1().unwrap(),
        );
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-4 * scale, "{u} vs {v}");
        }
        let xv = Var::from_tensor(&x).unwrap();
        let y = copy.forward_t(xv.as_tensor(), false).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(xv.as_tensor()).is_some(),
            "the input lost its gradient"
        );
    }

    #[test]
    fn frozen_bn_names() {
        assert!(!is_frozen_bn("backbone.bn1.weight"));
        assert!(is_frozen_bn("backbone.layer1.0.bn2.weight"));
        assert!(is_frozen_bn("backbone.layer3.0.downsample.1.running_mean"));
        assert!(!is_frozen_bn("backbone.layer3.0.downsample.0.weight"));
        assert!(!is_frozen_bn("backbone.layer2.1.conv1.weight"));
    }
}
