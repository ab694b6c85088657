//! 3-D convolution and pooling for Candle, with gradients.
//!
//! Candle 0.11 has no 3-D convolution or pooling, and its `max_pool2d` has no gradient when
//! windows overlap (kernel != stride: its backward bails). Everything here is composed from
//! operations whose gradients Candle implements, so input and weight gradients come from
//! Candle's autograd and are checked against finite differences and a naive loop in the
//! tests below.
//!
//! # Layout
//! Video tensors are **time-major**: `[B, T, C, H, W]` (the loader's layout), not PyTorch's
//! `[B, C, T, H, W]`. Folding time into the batch is then a free reshape, so a kernel of
//! temporal size 1 is exactly one `conv2d` on `[B*T, C, H, W]`. Weights keep PyTorch's
//! `[C_out, C_in, kt, kh, kw]`, so 3-D checkpoints with the usual names load unchanged.
//!
//! # Convolution
//! On the CPU (float32/float64) every kernel larger than 1x1x1 is one matrix product over a
//! channels-last lowering with hand-written gradients ([`crate::im2col`]). Elsewhere, and for
//! pointwise kernels, `y[:, t] = sum_i conv2d(x_pad[:, t*st + i*dt], w[:, :, i])`: one `conv2d`
//! per temporal tap on the strided temporal slice of the zero-padded input, summed; there
//! spatial stride and dilation must be equal along height and width (as in every network
//! here); spatial padding may differ.
//!
//! # Pooling
//! Max and average pooling are separable: a 1-D pool along time, then height, then width,
//! each the elementwise maximum (or mean) of `k` strided slices. Max pooling pads by
//! repeating the edge, which gives the same result as PyTorch's `-inf` padding.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

thread_local! {
    static AUTOCAST: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// While alive, float32 convolutions on this thread ([`conv2d`], [`conv3d`] and the small
/// CNN's) compute in `dtype` (bf16 or f16): operands are cast down, the result is cast back
/// to float32, and gradients flow to the float32 weights through the casts. Everything
/// else (BatchNorm, pooling, heads, the loss) stays float32, like PyTorch's autocast.
/// `None` leaves convolutions alone. Restores the previous setting when dropped.
#[must_use = "the setting lasts as long as the guard"]
pub struct Autocast(Option<DType>);

impl Autocast {
    /// Enters `dtype` for this thread's convolutions.
    pub fn enter(dtype: Option<DType>) -> Self {
        Autocast(AUTOCAST.with(|c| c.replace(dtype)))
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.with(|c| c.set(self.0));
    }
}

/// The dtype convolutions on this thread compute in, if [`Autocast`] set one.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(|c| c.get())
}

/// Applies `f` to `(x, w)` in the autocast dtype when one is active and `x` is float32.
pub fn autocast_conv(
    x: &Tensor,
    w: &Tensor,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match AUTOCAST.with(|c| c.get()) {
        Some(dt) if dt != x.dtype() && x.dtype() == DType::F32 => {
            let y = f(&x.to_dtype(dt)?, &w.to_dtype(dt)?)?;
            Ok(y.to_dtype(DType::F32)?)
        }
        _ => f(x, w),
    }
}

/// Stride, padding and dilation of a 3-D convolution, each `[t, h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conv3dConfig {
    /// Step along time, height, width.
    pub stride: [usize; 3],
    /// Zeros added on both sides of time, height, width.
    pub padding: [usize; 3],
    /// Spacing of kernel taps along time, height, width.
    pub dilation: [usize; 3],
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Conv3dConfig {
            stride: [1; 3],
            padding: [0; 3],
            dilation: [1; 3],
        }
    }
}

impl Conv3dConfig {
    /// "Same" padding for an odd kernel `k` with strides `stride`.
    pub fn same(k: [usize; 3], stride: [usize; 3]) -> Self {
        Conv3dConfig {
            stride,
            padding: [k[0] / 2, k[1] / 2, k[2] / 2],
            dilation: [1; 3],
        }
    }
}

/// Output length of a convolution or pooling along one axis.
pub fn out_len(len: usize, k: usize, stride: usize, pad: usize, dilation: usize) -> Result<usize> {
    let span = dilation * (k - 1) + 1;
    if len + 2 * pad < span || stride == 0 {
        return Err(Error::Config(format!(
            "window of {span} (kernel {k}, dilation {dilation}) does not fit {len} + 2 x {pad} \
             padding (stride {stride})"
        )));
    }
    Ok((len + 2 * pad - span) / stride + 1)
}

/// `count` slices of `x` along `dim`, starting at `start`, every `stride` entries:
/// `x[.., start + stride * i, ..]` for `i < count`. Differentiable (narrow + reshape).
pub fn strided(
    x: &Tensor,
    dim: usize,
    start: usize,
    stride: usize,
    count: usize,
) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.narrow(dim, start, count)?);
    }
    let len = x.dim(dim)?;
    let need = start + stride * count;
    // Pad at the end so that the last group of `stride` entries is complete.
    let x = if need > len {
        x.pad_with_zeros(dim, 0, need - len)?
    } else {
        x.clone()
    };
    let sliced = x.narrow(dim, start, stride * count)?.contiguous()?;
    let mut dims = sliced.dims().to_vec();
    dims[dim] = count;
    dims.insert(dim + 1, stride);
    Ok(sliced
        .reshape(dims)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)?)
}

/// 3-D convolution without bias.
///
/// # Shapes
/// `x [B, T, C_in, H, W]`, `w [C_out, C_in, kt, kh, kw]` -> `[B, T', C_out, H', W']`.
pub fn conv3d(x: &Tensor, w: &Tensor, cfg: &Conv3dConfig) -> Result<Tensor> {
    let (b, t, c, h, wd) = x.dims5()?;
    let (co, ci, kt, kh, kw) = w.dims5()?;
    if ci != c {
        return Err(Error::Config(format!(
            "conv3d: input has {c} channels, the kernel expects {ci}"
        )));
    }
    let [st, sh, sw] = cfg.stride;
    let [pt, ph, pw] = cfg.padding;
    let [dt, dh, dw] = cfg.dilation;
    if autocast_dtype().is_some_and(|d| d != x.dtype()) && x.dtype() == DType::F32 {
        return autocast_conv(x, w, |x, w| conv3d(x, w, cfg));
    }
    if (kt, kh, kw) != (1, 1, 1) && lowers(x) {
        let g = crate::im2col::Geometry {
            b,
            t,
            c,
            h,
            w: wd,
            k: [kt, kh, kw],
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            out: [
                out_len(t, kt, st, pt, dt)?,
                out_len(h, kh, sh, ph, dh)?,
                out_len(wd, kw, sw, pw, dw)?,
            ],
        };
        return crate::im2col::conv(x, w, None, g, false);
    }
    if sh != sw || dh != dw {
        return Err(Error::Config(format!(
            "conv3d: spatial stride {sh}x{sw} and dilation {dh}x{dw} must be equal along \
             height and width"
        )));
    }
    let t_out = out_len(t, kt, st, pt, dt)?;
    out_len(h, kh, sh, ph, dh)?;
    out_len(wd, kw, sw, pw, dw)?;
    // Spatial padding: conv2d's own when symmetric, explicit zeros otherwise.
    let (x, pad2) = if ph == pw {
        (x.clone(), ph)
    } else {
        (x.pad_with_zeros(3, ph, ph)?.pad_with_zeros(4, pw, pw)?, 0)
    };
    let (h, wd) = (x.dim(3)?, x.dim(4)?);
    let x = if pt > 0 {
        x.pad_with_zeros(1, pt, pt)?
    } else {
        x
    };
    let mut sum: Option<Tensor> = None;
    for i in 0..kt {
        let xi = strided(&x, 1, i * dt, st, t_out)?
            .contiguous()?
            .reshape((b * t_out, c, h, wd))?;
        let wi = w.narrow(2, i, 1)?.squeeze(2)?.contiguous()?;
        let yi = conv2d(&xi, &wi, pad2, sh, dh)?;
        sum = Some(match sum {
            Some(s) => (s + yi)?,
            None => yi,
        });
    }
    let y = sum.ok_or_else(|| Error::Config("conv3d: empty kernel".into()))?;
    let (_, _, ho, wo) = y.dims4()?;
    Ok(y.reshape((b, t_out, co, ho, wo))?)
}

/// 2-D convolution without bias, `x [N, C, H, W]`, `w [C_out, C, kh, kw]`.
///
/// Everything is a GEMM, so both gradients are GEMMs too: candle's `conv2d` computes the
/// kernel gradient as a convolution with an `H x W` kernel and reached about a fifth of its
/// GEMM speed on ResNet layers (BENCHMARKS.md). A 1x1 kernel is a matrix product (after
/// subsampling for a stride); larger kernels on the CPU are lowered by [`crate::im2col`]
/// (channels-last columns, hand-written gradients). Other devices use candle's `conv2d`,
/// with a guard against its non-square gradient bug.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    conv2d_bias(x, w, None, padding, stride, dilation)
}

/// [`conv2d`] plus a per-channel `bias [C_out]`, added to the matrix product's output rows
/// where the lowering has them (one contiguous pass; a `[1, C, 1, 1]` broadcast costs as much
/// as BatchNorm on large maps): the form a convolution takes with an inference-mode
/// BatchNorm folded in.
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    if AUTOCAST.with(|c| c.get()).is_some_and(|dt| dt != x.dtype()) && x.dtype() == DType::F32 {
        let y = autocast_conv(x, w, |x, w| conv2d(x, w, padding, stride, dilation))?;
        return match bias {
            Some(b) => channel_bias(&y, b),
            None => Ok(y),
        };
    }
    let rows_bias = |y: Tensor| -> Result<Tensor> {
        match bias {
            Some(b) => crate::rowops::add_row(&y, b),
            None => Ok(y),
        }
    };
    let (co, ci, kh, kw) = w.dims4()?;
    if (kh != 1 || kw != 1) && lowers(x) {
        return lowered_conv2d(x, w, bias, padding, stride, dilation, false);
    }
    if kh != 1 || kw != 1 {
        // candle 0.11's conv2d backward derives the transposed convolution's output padding
        // from the height alone; when height and width leave different remainders under the
        // stride, the input gradient comes out with the wrong width. Zero rows (or columns)
        // appended past the last window equalise the remainders without changing the output.
        let (h, wd) = (x.dim(2)?, x.dim(3)?);
        let rem = |len: usize, k: usize| {
            (len + 2 * padding).saturating_sub(dilation * (k - 1) + 1) % stride.max(1)
        };
        let (rh, rw) = (rem(h, kh), rem(wd, kw));
        let x = match rh.cmp(&rw) {
            std::cmp::Ordering::Less => x.pad_with_zeros(2, 0, rw - rh)?,
            std::cmp::Ordering::Greater => x.pad_with_zeros(3, 0, rh - rw)?,
            std::cmp::Ordering::Equal => x.clone(),
        };
        let y = x.conv2d(w, padding, stride, dilation, 1)?;
        return match bias {
            Some(b) => channel_bias(&y, b),
            None => Ok(y),
        };
    }
    let (n, c, h, wd) = x.dims4()?;
    if c != ci {
        return Err(Error::Config(format!(
            "conv2d: input has {c} channels, the kernel expects {ci}"
        )));
    }
    // A 1x1 kernel: subsample for the stride, then matrix products.
    let ho = out_len(h, 1, stride, padding, dilation)?;
    let wo = out_len(wd, 1, stride, padding, dilation)?;
    let x = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let x = strided(&strided(&x, 2, 0, stride, ho)?, 3, 0, stride, wo)?.contiguous()?;
    let w2 = w.reshape((co, ci))?;
    if ho * wo >= 64 {
        // Large maps: one [C_out, C] x [C, H*W] product per image, no copies.
        let y = w2.broadcast_matmul(&x.reshape((n, c, ho * wo))?)?;
        return channel_bias(&y.reshape((n, co, ho, wo))?, bias);
    }
    // Small maps (deep layers): per-image products would be thin; one GEMM for the batch,
    // at the price of two transposing copies.
    let rows = x
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((n * ho * wo, c))?;
    let y = rows_bias(rows.matmul(&w2.t()?)?)?.reshape((n, ho * wo, co))?;
    Ok(y.transpose(1, 2)?.contiguous()?.reshape((n, co, ho, wo))?)
}

/// A 2-D convolution (kernel larger than 1x1) through [`crate::im2col`], the ReLU fused
/// when `relu`.
fn lowered_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    relu: bool,
) -> Result<Tensor> {
    let (co, ci, kh, kw) = w.dims4()?;
    let g = lowered_geometry(x, w, padding, stride, dilation)?;
    // `x [N, C, H, W]` as it is, and `[N, C_out, Ho, Wo]` straight out of the op: a reshape
    // on either side would be a graph node, and candle's backward gives every node a
    // zero-filled gradient buffer and an addition over the whole tensor (BENCHMARKS.md,
    // "The kernel gradient transposed").
    crate::im2col::conv(x, &w.reshape((co, ci, 1, kh, kw))?, bias, g, relu)
}

/// The lowering's geometry of a 2-D convolution of `x [N, C, H, W]` by `w [C_out, C, kh, kw]`.
fn lowered_geometry(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<crate::im2col::Geometry> {
    let (_, ci, kh, kw) = w.dims4()?;
    let (n, c, h, wd) = x.dims4()?;
    if c != ci {
        return Err(Error::Config(format!(
            "conv2d: input has {c} channels, the kernel expects {ci}"
        )));
    }
    Ok(crate::im2col::Geometry {
        b: n,
        t: 1,
        c,
        h,
        w: wd,
        k: [1, kh, kw],
        stride: [1, stride, stride],
        padding: [0, padding, padding],
        dilation: [1, dilation, dilation],
        out: [
            1,
            out_len(h, kh, stride, padding, dilation)?,
            out_len(wd, kw, stride, padding, dilation)?,
        ],
    })
}

/// Whether [`conv2d_grads`] computes the gradients of [`conv2d`] for `x` and `w`: float32 or
/// float64 on the CPU outside mixed precision, a lowered kernel or an unpadded 1x1 one.
pub(crate) fn conv2d_grads_apply(x: &Tensor, w: &Tensor, padding: usize) -> bool {
    let one = w.dims().get(2..) == Some(&[1, 1][..]);
    lowers(x)
        && x.dtype() == w.dtype()
        && AUTOCAST.with(|c| c.get()).is_none_or(|dt| dt == x.dtype())
        && (!one || padding == 0)
}

/// The input and kernel gradients of [`conv2d`]`(x, w, ..)` for its output's gradient `dy`,
/// computed directly (no graph; whether `x` or `w` track a gradient does not matter): a
/// lowered kernel through [`crate::im2col::conv_grads`], a 1x1 kernel as the transposed
/// products of its forward. Where [`conv2d_grads_apply`] holds.
pub(crate) fn conv2d_grads(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (co, ci, kh, kw) = w.dims4()?;
    let (n, c, h, wd) = x.dims4()?;
    let dy = dy.contiguous()?;
    if kh != 1 || kw != 1 {
        let g = lowered_geometry(x, w, padding, stride, dilation)?;
        let wk = w
            .reshape((co, ci, 1, kh, kw))?
            .permute((0, 2, 3, 4, 1))?
            .contiguous()?
            .reshape((co, g.cols()))?;
        let (dx, dwk) = crate::im2col::conv_grads(
            &x.reshape((n, 1, c, h, wd))?,
            &wk,
            &dy.reshape((n, 1, co, g.out[1], g.out[2]))?,
            g,
        )?;
        // The kernel's gradient back from the columns' order (co, a, p, q, c).
        let dw = dwk
            .reshape((co, 1, kh, kw, ci))?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()?
            .reshape((co, ci, kh, kw))?;
        return Ok((dx.reshape((n, c, h, wd))?, dw));
    }
    if padding != 0 {
        return Err(Error::Config("conv2d_grads: a padded 1x1 kernel".into()));
    }
    let ho = out_len(h, 1, stride, 0, dilation)?;
    let wo = out_len(wd, 1, stride, 0, dilation)?;
    let xs = strided(&strided(x, 2, 0, stride, ho)?, 3, 0, stride, wo)?.contiguous()?;
    let w2 = w.reshape((co, ci))?;
    let (dxs, dw) = if ho * wo >= 64 {
        // Forward: y[i] = W x[i] per image. dx[i] = W^T dy[i]; dW = sum_i dy[i] x[i]^T.
        let x3 = xs.reshape((n, c, ho * wo))?;
        let d3 = dy.reshape((n, co, ho * wo))?;
        let dx = w2.t()?.broadcast_as((n, ci, co))?.matmul(&d3)?;
        let dw = d3.matmul(&x3.t()?)?.sum(0)?;
        (dx.reshape((n, c, ho, wo))?, dw)
    } else {
        // Forward: rows [N*Ho*Wo, C] x W^T. d rows = d out rows x W; dW = (d out rows)^T rows.
        let rows = xs
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((n * ho * wo, c))?;
        let drows_out = dy
            .reshape((n, co, ho * wo))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * ho * wo, co))?;
        let dx = drows_out
            .matmul(&w2)?
            .reshape((n, ho, wo, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let dw = drows_out.t()?.matmul(&rows)?;
        (dx, dw)
    };
    let dw = dw.reshape((co, ci, 1, 1))?;
    if stride == 1 {
        return Ok((dxs, dw));
    }
    // The subsampled positions' gradients scattered back into the full input's.
    Ok((scatter_strided(&dxs, (h, wd), stride)?, dw))
}

/// `d [N, C, Ho, Wo]` placed at every `stride`-th row and column of a zero `[N, C, H, W]`.
fn scatter_strided(d: &Tensor, (h, w): (usize, usize), stride: usize) -> Result<Tensor> {
    fn run<T: candle_core::WithDType>(
        d: &[T],
        (planes, ho, wo): (usize, usize, usize),
        (h, w): (usize, usize),
        stride: usize,
    ) -> Vec<T> {
        let mut out = vec![T::zero(); planes * h * w];
        for (o, src) in out.chunks_exact_mut(h * w).zip(d.chunks_exact(ho * wo)) {
            for (r, row) in src.chunks_exact(wo).enumerate() {
                let at = &mut o[r * stride * w..];
                for (j, &v) in row.iter().enumerate() {
                    at[j * stride] = v;
                }
            }
        }
        out
    }
    let (n, c, ho, wo) = d.dims4()?;
    let d = d.contiguous()?;
    let dims = (n * c, ho, wo);
    let out = match d.dtype() {
        DType::F32 => Tensor::from_vec(
            run(&d.flatten_all()?.to_vec1::<f32>()?, dims, (h, w), stride),
            (n, c, h, w),
            d.device(),
        )?,
        DType::F64 => Tensor::from_vec(
            run(&d.flatten_all()?.to_vec1::<f64>()?, dims, (h, w), stride),
            (n, c, h, w),
            d.device(),
        )?,
        other => return Err(Error::Config(format!("conv2d_grads: dtype {other:?}"))),
    };
    Ok(out)
}

/// `relu(conv2d_bias(..))`; where the convolution is lowered (CPU, kernels larger than 1x1,
/// no mixed precision) the ReLU is part of the convolution's op, so the activation before it
/// is never kept (a folded BatchNorm's convolution followed by a ReLU, in ResNet blocks).
pub fn conv2d_bias_relu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let autocast =
        AUTOCAST.with(|c| c.get()).is_some_and(|dt| dt != x.dtype()) && x.dtype() == DType::F32;
    if !autocast && (kh != 1 || kw != 1) && lowers(x) {
        return lowered_conv2d(x, w, bias, padding, stride, dilation, true);
    }
    Ok(conv2d_bias(x, w, bias, padding, stride, dilation)?.relu()?)
}

/// Whether a convolution of `x` goes through [`crate::im2col`]: float32 or float64 on the CPU.
fn lowers(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `y [N, C, H, W] + b [C]` per channel.
fn channel_bias<'a>(y: &Tensor, b: impl Into<Option<&'a Tensor>>) -> Result<Tensor> {
    match b.into() {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?),
        None => Ok(y.clone()),
    }
}

/// A 3-D convolution layer (`weight [C_out, C_in, kt, kh, kw]`, optional `bias [C_out]`).
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv3dConfig,
}

impl Conv3d {
    /// A layer from existing tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv3dConfig) -> Self {
        Conv3d { weight, bias, cfg }
    }

    /// The kernel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// # Shapes
    /// `[B, T, C_in, H, W]` -> `[B, T', C_out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv3d(x, &self.weight, &self.cfg)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, 1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// A bias-free [`Conv3d`] with kernel `k` whose weight is `vb`'s `weight`.
pub fn conv3d_no_bias(
    cin: usize,
    cout: usize,
    k: [usize; 3],
    cfg: Conv3dConfig,
    vb: VarBuilder,
) -> Result<Conv3d> {
    let fan_in = (cin * k.iter().product::<usize>()) as f64;
    let bound = 1.0 / fan_in.sqrt();
    let weight = vb.get_with_hints(
        (cout, cin, k[0], k[1], k[2]),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Conv3d::new(weight, None, cfg))
}

/// A 2-D BatchNorm applied to every frame of `[B, T, C, H, W]` (statistics over B, T, H, W in
/// training: PyTorch's `BatchNorm3d`).
pub fn batch_norm_frames(bn: &candle_nn::BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    let (b, t, c, h, w) = x.dims5()?;
    let y = crate::batchnorm::forward(bn, &x.reshape((b * t, c, h, w))?, train)?;
    Ok(y.reshape((b, t, c, h, w))?)
}

/// Which reduction a pool applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Maximum over the window (edge-replicated padding).
    Max,
    /// Mean over the window (zero padding counted, as PyTorch's default).
    Avg,
}

/// 1-D pooling of `x` along `dim`: window `k`, `stride`, `pad` on both sides.
pub fn pool1d(
    x: &Tensor,
    dim: usize,
    k: usize,
    stride: usize,
    pad: usize,
    kind: Pool,
) -> Result<Tensor> {
    if k == 1 && stride == 1 && pad == 0 {
        return Ok(x.clone());
    }
    let n = out_len(x.dim(dim)?, k, stride, pad, 1)?;
    let x = match (pad, kind) {
        (0, _) => x.clone(),
        (p, Pool::Max) => x.pad_with_same(dim, p, p)?,
        (p, Pool::Avg) => x.pad_with_zeros(dim, p, p)?,
    };
    let mut acc: Option<Tensor> = None;
    for i in 0..k {
        let s = strided(&x, dim, i, stride, n)?;
        acc = Some(match (acc, kind) {
            (None, _) => s,
            (Some(a), Pool::Max) => a.maximum(&s)?,
            (Some(a), Pool::Avg) => (a + s)?,
        });
    }
    let acc = acc.ok_or_else(|| Error::Config("pool: empty window".into()))?;
    Ok(match kind {
        Pool::Max => acc,
        Pool::Avg => (acc / k as f64)?,
    })
}

/// 3-D pooling of `[B, T, C, H, W]` with window `k`, `stride`, `padding` (each `[t, h, w]`).
pub fn pool3d(
    x: &Tensor,
    k: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
    kind: Pool,
) -> Result<Tensor> {
    x.dims5()?;
    let x = pool1d(x, 1, k[0], stride[0], padding[0], kind)?;
    let x = pool1d(&x, 3, k[1], stride[1], padding[1], kind)?;
    pool1d(&x, 4, k[2], stride[2], padding[2], kind)
}

/// 2-D max pooling of `[N, C, H, W]` with overlapping windows and a gradient (ResNet's stem:
/// `k = 3, stride = 2, pad = 1`).
///
/// On the CPU (float32/float64) one custom op whose backward recomputes each window's
/// maximum from the input ([`MaxPool2d`]): the separable form below keeps padded copies and
/// strided slices of the activation for backward, about five activation-sized tensors on the
/// largest map of a ResNet (BENCHMARKS.md, "Training memory").
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = MaxPool2d {
            k,
            stride,
            pad,
            h,
            w,
            ho: out_len(h, k, stride, pad, 1)?,
            wo: out_len(w, k, stride, pad, 1)?,
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    let x = pool1d(x, 2, k, stride, pad, Pool::Max)?;
    pool1d(&x, 3, k, stride, pad, Pool::Max)
}

/// 2-D max pooling of contiguous `[N, C, H, W]` planes, padding ignored (PyTorch's `-inf`);
/// the gradient goes to the first maximum of each window in row-major order.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    k: usize,
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl MaxPool2d {
    /// Input rows (or columns) of output `o`'s window, clipped to `0..len`.
    fn span(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.pad as isize;
        let end = (start + self.k as isize).min(len as isize);
        start.max(0) as usize..end.max(0) as usize
    }

    /// Calls `f(output index, input index of the window's maximum)` for one plane.
    fn each<T: candle_core::WithDType>(&self, plane: &[T], mut f: impl FnMut(usize, usize)) {
        for oy in 0..self.ho {
            let rows = self.span(oy, self.h);
            for ox in 0..self.wo {
                let cols = self.span(ox, self.w);
                let mut best: Option<(usize, T)> = None;
                for iy in rows.clone() {
                    for ix in cols.clone() {
                        let at = iy * self.w + ix;
                        let v = plane[at];
                        if best.is_none_or(|(_, b)| v > b) {
                            best = Some((at, v));
                        }
                    }
                }
                if let Some((at, _)) = best {
                    f(oy * self.wo + ox, at);
                }
            }
        }
    }

    fn fwd<T: candle_core::WithDType>(&self, x: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        let (inp, out) = (self.h * self.w, self.ho * self.wo);
        let mut y = vec![T::zero(); x.len() / inp.max(1) * out];
        y.par_chunks_mut(out.max(1))
            .zip(x.par_chunks(inp.max(1)))
            .for_each(|(yo, xi)| self.each(xi, |o, i| yo[o] = xi[i]));
        y
    }

    fn bwd<T: candle_core::WithDType>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        let (inp, out) = (self.h * self.w, self.ho * self.wo);
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(inp.max(1))
            .zip(x.par_chunks(inp.max(1)).zip(dy.par_chunks(out.max(1))))
            .for_each(|(d, (xi, g))| self.each(xi, |o, i| d[i] += g[o]));
        dx
    }
}

impl candle_core::CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "vdg-max-pool2d"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("max pool: input must be contiguous")
        };
        let d = l.dims();
        let shape = candle_core::Shape::from((d[0], d[1], self.ho, self.wo));
        let out = match s {
            S::F32(v) => S::F32(self.fwd(&v[a..b])),
            S::F64(v) => S::F64(self.fwd(&v[a..b])),
            _ => candle_core::bail!("max pool: unsupported dtype"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("max pool: tensors left the CPU")
        };
        let (Some((xa, xb)), Some((ga, gb))) = (xl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("max pool: tensors must be contiguous")
        };
        let dev = x.device();
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                self.bwd(
                    &xs.as_slice::<f32>()?[xa..xb],
                    &gs.as_slice::<f32>()?[ga..gb],
                ),
                x.shape(),
                dev,
            )?,
            _ => Tensor::from_vec(
                self.bwd(
                    &xs.as_slice::<f64>()?[xa..xb],
                    &gs.as_slice::<f64>()?[ga..gb],
                ),
                x.shape(),
                dev,
            )?,
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::gradcheck::{check_input_gradient, project};
    use crate::init::seeded_randn;

    /// Naive 3-D convolution on `[B, T, C, H, W]` (PyTorch's definition, written out).
    fn naive_conv3d(
        x: &[f64],
        [b, t, c, h, w]: [usize; 5],
        k: &[f64],
        [co, kt, kh, kw]: [usize; 4],
        cfg: &Conv3dConfig,
    ) -> (Vec<f64>, [usize; 5]) {
        let [st, sh, sw] = cfg.stride;
        let [pt, ph, pw] = cfg.padding;
        let [dt, dh, dw] = cfg.dilation;
        let to = (t + 2 * pt - dt * (kt - 1) - 1) / st + 1;
        let ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
        let wo = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
        let mut y = vec![0.0; b * to * co * ho * wo];
        for bi in 0..b {
            for ti in 0..to {
                for o in 0..co {
                    for yi in 0..ho {
                        for xi in 0..wo {
                            let mut s = 0.0;
                            for ci in 0..c {
                                for a in 0..kt {
                                    for p in 0..kh {
                                        for q in 0..kw {
                                            let tt = (ti * st + a * dt) as isize - pt as isize;
                                            let yy = (yi * sh + p * dh) as isize - ph as isize;
                                            let xx = (xi * sw + q * dw) as isize - pw as isize;
                                            if tt < 0
                                                || yy < 0
                                                || xx < 0
                                                || tt >= t as isize
                                                || yy >= h as isize
                                                || xx >= w as isize
                                            {
                                                continue;
                                            }
                                            let xv = x[(((bi * t + tt as usize) * c + ci) * h
                                                + yy as usize)
                                                * w
                                                + xx as usize];
                                            let kv = k[(((o * c + ci) * kt + a) * kh + p) * kw + q];
                                            s += xv * kv;
                                        }
                                    }
                                }
                            }
                            y[(((bi * to + ti) * co + o) * ho + yi) * wo + xi] = s;
                        }
                    }
                }
            }
        }
        (y, [b, to, co, ho, wo])
    }

    fn naive_pool(
        x: &[f64],
        [b, t, c, h, w]: [usize; 5],
        k: [usize; 3],
        s: [usize; 3],
        p: [usize; 3],
        max: bool,
    ) -> Vec<f64> {
        let o: Vec<usize> = [t, h, w]
            .iter()
            .enumerate()
            .map(|(i, &n)| (n + 2 * p[i] - k[i]) / s[i] + 1)
            .collect();
        let mut y = Vec::new();
        for bi in 0..b {
            for ti in 0..o[0] {
                for ci in 0..c {
                    for yi in 0..o[1] {
                        for xi in 0..o[2] {
                            let mut acc = if max { f64::MIN } else { 0.0 };
                            for a in 0..k[0] {
                                for q in 0..k[1] {
                                    for r in 0..k[2] {
                                        let tt = (ti * s[0] + a) as isize - p[0] as isize;
                                        let yy = (yi * s[1] + q) as isize - p[1] as isize;
                                        let xx = (xi * s[2] + r) as isize - p[2] as isize;
                                        let inside = tt >= 0
                                            && yy >= 0
                                            && xx >= 0
                                            && (tt as usize) < t
                                            && (yy as usize) < h
                                            && (xx as usize) < w;
                                        if !inside {
                                            continue;
                                        }
                                        let v = x[(((bi * t + tt as usize) * c + ci) * h
                                            + yy as usize)
                                            * w
                                            + xx as usize];
                                        acc = if max { acc.max(v) } else { acc + v };
                                    }
                                }
                            }
                            y.push(if max {
                                acc
                            } else {
                                acc / (k[0] * k[1] * k[2]) as f64
                            });
                        }
                    }
                }
            }
        }
        y
    }

    fn vec(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() < 1e-9 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    const CASES: [Conv3dConfig; 5] = [
        Conv3dConfig {
            stride: [1, 1, 1],
            padding: [0, 0, 0],
            dilation: [1, 1, 1],
        },
        Conv3dConfig {
            stride: [2, 2, 2],
            padding: [1, 1, 1],
            dilation: [1, 1, 1],
        },
        Conv3dConfig {
            stride: [1, 2, 2],
            padding: [2, 1, 0],
            dilation: [2, 1, 1],
        },
        Conv3dConfig {
            stride: [3, 1, 1],
            padding: [1, 2, 2],
            dilation: [1, 2, 2],
        },
        // Height and width differ in stride and dilation (the CPU lowering allows it).
        Conv3dConfig {
            stride: [1, 2, 1],
            padding: [1, 2, 1],
            dilation: [1, 1, 2],
        },
    ];

    #[test]
    fn conv3d_matches_a_naive_loop() {
        let dev = Device::Cpu;
        let xs = [2, 7, 3, 9, 8];
        let ks = [4, 3, 3, 3];
        for (n, cfg) in CASES.iter().enumerate() {
            let x = seeded_randn(&xs, 1 + n as u64, DType::F64, &dev).unwrap();
            let w = seeded_randn(&[4, 3, 3, 3, 3], 10 + n as u64, DType::F64, &dev).unwrap();
            let y = conv3d(&x, &w, cfg).unwrap();
            let (want, dims) = naive_conv3d(&vec(&x), xs, &vec(&w), ks, cfg);
            assert_eq!(y.dims(), &dims, "case {n}");
            assert_close(&vec(&y), &want, &format!("case {n}"));
        }
        // A 1x1x1 kernel is a per-frame matrix product; a 3x1x1 one mixes time only.
        let x = seeded_randn(&[1, 4, 2, 3, 3], 3, DType::F64, &dev).unwrap();
        let w = seeded_randn(&[5, 2, 3, 1, 1], 4, DType::F64, &dev).unwrap();
        let cfg = Conv3dConfig::same([3, 1, 1], [1, 1, 1]);
        let (want, _) = naive_conv3d(&vec(&x), [1, 4, 2, 3, 3], &vec(&w), [5, 3, 1, 1], &cfg);
        assert_close(&vec(&conv3d(&x, &w, &cfg).unwrap()), &want, "3x1x1");
        // A 1x3x3 kernel on several frames: the backward's groups are single frames.
        let w = seeded_randn(&[5, 2, 1, 3, 3], 5, DType::F64, &dev).unwrap();
        let cfg = Conv3dConfig {
            stride: [1, 2, 1],
            padding: [0, 1, 1],
            dilation: [1, 1, 1],
        };
        let (want, _) = naive_conv3d(&vec(&x), [1, 4, 2, 3, 3], &vec(&w), [5, 1, 3, 3], &cfg);
        assert_close(&vec(&conv3d(&x, &w, &cfg).unwrap()), &want, "1x3x3");
    }

    #[test]
    fn conv2d_equals_candles_forward_and_has_gradients_on_non_square_inputs() {
        let dev = Device::Cpu;
        // A 7x6 map (small: pointwise kernels take the single-GEMM path) and a 10x9 one
        // (pointwise kernels take the per-image path at stride 1).
        for xs in [[3usize, 5, 7, 6], [2, 5, 10, 9]] {
            let x = seeded_randn(&xs, 1, DType::F64, &dev).unwrap();
            for (k, pad, stride, dil) in [
                (1, 0, 1, 1),
                (1, 0, 2, 1),
                (1, 1, 2, 1),
                (1, 0, 3, 1),
                (3, 1, 1, 1),
                (3, 1, 2, 1),
                (3, 2, 1, 2),
                (7, 3, 2, 1),
            ] {
                let w = seeded_randn(&[4, 5, k, k], 2, DType::F64, &dev).unwrap();
                let (pad, stride) = (pad, stride);
                let want = x.conv2d(&w, pad, stride, dil, 1).unwrap();
                let got = conv2d(&x, &w, pad, stride, dil).unwrap();
                assert_eq!(got.dims(), want.dims(), "pad {pad} stride {stride}");
                assert_close(
                    &vec(&got),
                    &vec(&want),
                    &format!("pad {pad} stride {stride}"),
                );
                let err = check_input_gradient(&xs, 3, 30, &|x| {
                    project(&conv2d(x, &w, pad, stride, dil)?, 4)
                })
                .unwrap();
                assert!(err < 1e-5, "input gradient: {err}");
                let err = check_input_gradient(&[4, 5, k, k], 5, 20, &|w| {
                    project(&conv2d(&x, w, pad, stride, dil)?, 6)
                })
                .unwrap();
                assert!(err < 1e-5, "weight gradient: {err}");
            }
        }
        // 1x1x1 with a spatial stride (I3D's shortcuts) through conv3d.
        let x = seeded_randn(&[2, 3, 4, 7, 7], 7, DType::F64, &dev).unwrap();
        let w = seeded_randn(&[6, 4, 1, 1, 1], 8, DType::F64, &dev).unwrap();
        let cfg = Conv3dConfig::same([1, 1, 1], [1, 2, 2]);
        let (want, _) = naive_conv3d(&vec(&x), [2, 3, 4, 7, 7], &vec(&w), [6, 1, 1, 1], &cfg);
        assert_close(
            &vec(&conv3d(&x, &w, &cfg).unwrap()),
            &want,
            "1x1x1 stride 2",
        );
    }

    #[test]
    fn a_convolution_with_bias_has_its_gradients() {
        let dev = Device::Cpu;
        let x = seeded_randn(&[3, 4, 6, 5], 70, DType::F64, &dev).unwrap();
        let w = seeded_randn(&[2, 4, 3, 3], 71, DType::F64, &dev).unwrap();
        let b = seeded_randn(&[2], 72, DType::F64, &dev).unwrap();
        let want = (conv2d(&x, &w, 1, 2, 1).unwrap()
            + b.reshape((1, 2, 1, 1))
                .unwrap()
                .broadcast_as((3, 2, 3, 3))
                .unwrap())
        .unwrap();
        let got = conv2d_bias(&x, &w, Some(&b), 1, 2, 1).unwrap();
        assert_close(&vec(&got), &vec(&want), "bias");
        for (what, shape, seed) in [("bias", vec![2], 73), ("input", vec![3, 4, 6, 5], 74)] {
            let err = check_input_gradient(&shape, seed, 20, &|v| {
                let y = if what == "bias" {
                    conv2d_bias(&x, &w, Some(v), 1, 2, 1)?
                } else {
                    conv2d_bias(v, &w, Some(&b), 1, 2, 1)?
                };
                project(&y, 75)
            })
            .unwrap();
            assert!(err < 1e-6, "{what} gradient: {err}");
        }
    }

    /// Blocks of one output line and one or several backward groups give the gradients of
    /// the default blocking, for a strided 2-D convolution with bias and the fused ReLU and
    /// for a 3-D one (the blocking changes only the order of the kernel gradient's sums).
    #[test]
    fn the_blocking_does_not_change_the_gradients() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let var = |dims: &[usize], seed| {
            Var::from_tensor(&seeded_randn(dims, seed, DType::F64, &dev).unwrap()).unwrap()
        };
        let (x, w, b) = (var(&[3, 4, 9, 8], 1), var(&[5, 4, 3, 3], 2), var(&[5], 3));
        let (x3, w3) = (var(&[3, 4, 2, 6, 5], 4), var(&[3, 2, 3, 3, 3], 5));
        let run = |blocking: Option<(usize, usize)>| -> Vec<Vec<f64>> {
            crate::im2col::BLOCKING_OVERRIDE.with(|c| c.set(blocking));
            let y = conv2d_bias_relu(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 1, 2, 1)
                .unwrap();
            let y3 = conv3d(x3.as_tensor(), w3.as_tensor(), &CASES[0]).unwrap();
            let loss = (project(&y, 6).unwrap() + project(&y3, 7).unwrap()).unwrap();
            let g = loss.backward().unwrap();
            crate::im2col::BLOCKING_OVERRIDE.with(|c| c.set(None));
            [&x, &w, &b, &x3, &w3]
                .iter()
                .map(|v| vec(&g.get(v.as_tensor()).unwrap().flatten_all().unwrap()))
                .collect()
        };
        let whole = run(None);
        for blocking in [(1, 1), (1, 8), (2, 2)] {
            let blocked = run(Some(blocking));
            for (k, (a, b)) in whole.iter().zip(&blocked).enumerate() {
                assert_close(a, b, &format!("gradient {k}, blocking {blocking:?}"));
                assert!(a.iter().any(|v| *v != 0.0), "gradient {k} is zero");
            }
        }
    }

    #[test]
    fn conv3d_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for (n, cfg) in CASES.iter().enumerate() {
            let w = seeded_randn(&[3, 2, 3, 3, 3], 20 + n as u64, DType::F64, &dev).unwrap();
            let err = check_input_gradient(&[2, 6, 2, 7, 7], 30 + n as u64, 40, &|x| {
                project(&conv3d(x, &w, cfg)?, 40)
            })
            .unwrap();
            assert!(err < 1e-5, "case {n}: input gradient relative error {err}");
            let x = seeded_randn(&[2, 6, 2, 7, 7], 50 + n as u64, DType::F64, &dev).unwrap();
            let err = check_input_gradient(&[3, 2, 3, 3, 3], 60 + n as u64, 40, &|w| {
                project(&conv3d(&x, w, cfg)?, 41)
            })
            .unwrap();
            assert!(err < 1e-5, "case {n}: weight gradient relative error {err}");
        }
        // A kernel that does not reach across frames, on several frames and clips.
        let cfg = Conv3dConfig {
            stride: [1, 2, 1],
            padding: [0, 1, 1],
            dilation: [1, 1, 2],
        };
        let w = seeded_randn(&[3, 2, 1, 3, 3], 80, DType::F64, &dev).unwrap();
        let err = check_input_gradient(&[2, 3, 2, 6, 7], 81, 40, &|x| {
            project(&conv3d(x, &w, &cfg)?, 82)
        })
        .unwrap();
        assert!(err < 1e-5, "1x3x3: input gradient relative error {err}");
        let x = seeded_randn(&[2, 3, 2, 6, 7], 83, DType::F64, &dev).unwrap();
        let err = check_input_gradient(&[3, 2, 1, 3, 3], 84, 40, &|w| {
            project(&conv3d(&x, w, &cfg)?, 85)
        })
        .unwrap();
        assert!(err < 1e-5, "1x3x3: weight gradient relative error {err}");
    }

    #[test]
    fn pooling_matches_a_naive_loop_and_has_gradients() {
        let dev = Device::Cpu;
        let dims = [2, 6, 3, 9, 8];
        let x = seeded_randn(&dims, 7, DType::F64, &dev).unwrap();
        for (k, s, p) in [
            ([3, 3, 3], [2, 2, 2], [1, 1, 1]),
            ([1, 3, 3], [1, 2, 2], [0, 1, 1]),
            ([2, 2, 2], [2, 2, 2], [0, 0, 0]),
            ([3, 1, 1], [2, 1, 1], [0, 0, 0]),
        ] {
            for (kind, max) in [(Pool::Max, true), (Pool::Avg, false)] {
                let p = if max { p } else { [0; 3] };
                let y = pool3d(&x, k, s, p, kind).unwrap();
                let want = naive_pool(&vec(&x), dims, k, s, p, max);
                assert_close(&vec(&y), &want, &format!("{kind:?} {k:?} {s:?} {p:?}"));
                let err =
                    check_input_gradient(&dims, 8, 40, &|x| project(&pool3d(x, k, s, p, kind)?, 9))
                        .unwrap();
                assert!(err < 1e-5, "{kind:?} {k:?}: relative error {err}");
            }
        }
        // The 2-D stem pool (overlapping windows) has a gradient, unlike candle's, and equals
        // the separable max pool on 1-frame clips.
        let err = check_input_gradient(&[2, 3, 9, 8], 10, 40, &|x| {
            project(&max_pool2d(x, 3, 2, 1)?, 11)
        })
        .unwrap();
        assert!(err < 1e-5, "max_pool2d: relative error {err}");
        for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)] {
            let x = seeded_randn(&[2, 3, 9, 8], 12, DType::F64, &dev).unwrap();
            let want = naive_pool(
                &vec(&x),
                [2, 1, 3, 9, 8],
                [1, k, k],
                [1, s, s],
                [0, p, p],
                true,
            );
            assert_close(
                &vec(&max_pool2d(&x, k, s, p).unwrap()),
                &want,
                &format!("max_pool2d {k} {s} {p}"),
            );
        }
    }

    #[test]
    fn autocast_computes_convolutions_in_half_precision_with_float32_gradients() {
        let dev = Device::Cpu;
        let x = seeded_randn(&[2, 8, 12, 12], 1, DType::F32, &dev).unwrap();
        let w = candle_core::Var::from_tensor(
            &seeded_randn(&[16, 8, 3, 3], 2, DType::F32, &dev).unwrap(),
        )
        .unwrap();
        let full = conv2d(&x, &w, 1, 1, 1).unwrap();
        let (half, grads) = {
            let _g = Autocast::enter(Some(DType::F16));
            let y = conv2d(&x, &w, 1, 1, 1).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        };
        // Outside the guard: float32 again, bit for bit the plain result.
        assert_eq!(autocast_dtype(), None);
        let again = conv2d(&x, &w, 1, 1, 1).unwrap();
        let diff = (&again - &full).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(half.dtype(), DType::F32);
        let sq = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let rel = |a: &Tensor, b: &Tensor| (sq(&(a - b).unwrap()) / sq(b)).sqrt();
        // Computed in f16 (so not exact), and close to float32 (f16 keeps 11 bits).
        let e = rel(&half, &full);
        assert!(e > 0.0 && e < 5e-3, "{e}");
        let gw = grads
            .get(w.as_tensor())
            .expect("the float32 weight gets a gradient");
        assert_eq!(gw.dtype(), DType::F32);
        let reference = full.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let e = rel(gw, reference.get(w.as_tensor()).unwrap());
        assert!(e > 0.0 && e < 5e-3, "{e}");
    }
}
