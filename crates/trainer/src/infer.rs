//! ResNet inference on the CPU in channels-last layout, outside candle's graph: what `vdg
//! features` runs (a frozen trunk, no gradients).
//!
//! The same function as [`ResNet`]'s evaluation forward (BatchNorms on running statistics,
//! folded into the convolutions), computed differently:
//! - activations stay `[N, H, W, C]` from the stem to the pooling, so a 1x1 convolution is one
//!   matrix product on the activation as it lies and a kxk one lowers to columns by
//!   contiguous copies of `C` values; the graph path transposes to and from channels-last
//!   around every convolution;
//! - each BatchNorm is folded once, when the engine is built (weights `w * s` stored as the
//!   `[k*k*C_in, C_out]` matrices the products need), not at every call;
//! - the bias, the residual sum and the ReLU are one pass over a product's output, and the
//!   last convolution of a block accumulates straight onto its shortcut (`gemm`'s
//!   `c += a b`, [`crate::cpu_gemm`]);
//! - buffers are kept between calls ([`ResnetInference`] owns them), so later batches touch
//!   no fresh pages and fill no zeros.
//!
//! Only for frozen weights: the output carries no gradient. Training and anything that
//! differentiates keeps [`ResNet`]'s graph path. Test:
//! `channels_last_inference_equals_the_graph_forward`.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::{BatchNorm, Conv2d};
use rayon::prelude::*;

use crate::cpu_gemm::matmul;
use crate::error::{Error, Result};
use crate::models::blocks::resnet::ResNet;

/// Columns of one lowered convolution are built for groups of images of at most this many
/// values (32 MiB), so the lowering's memory does not grow with the batch.
const COLS_FLOATS: usize = 8 << 20;

/// A convolution with its BatchNorm folded in.
struct FoldedConv {
    k: usize,
    stride: usize,
    pad: usize,
    cin: usize,
    cout: usize,
    /// `[k * k * cin, cout]`, rows in `(ky, kx, c_in)` order.
    w: Vec<f32>,
    bias: Vec<f32>,
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

impl FoldedConv {
    /// `w * s`, `beta - mean * s` with `s = gamma / sqrt(var + eps)` (in float64).
    fn fold(c: &Conv2d, b: &BatchNorm) -> Result<Self> {
        let (cout, cin, kh, kw) = c.weight().dims4()?;
        let cfg = c.config();
        if kh != kw || cfg.dilation != 1 || cfg.groups != 1 {
            return Err(Error::Config(format!(
                "channels-last inference handles square, undilated, ungrouped kernels, not \
                 {kh}x{kw} (dilation {}, groups {})",
                cfg.dilation, cfg.groups
            )));
        }
        let w = c
            .weight()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mean = values(b.running_mean())?;
        let var = values(b.running_var())?;
        let (gamma, beta) = match b.weight_and_bias() {
            Some((g, s)) => (values(g)?, values(s)?),
            None => (vec![1.0; cout], vec![0.0; cout]),
        };
        let s: Vec<f64> = (0..cout)
            .map(|o| gamma[o] / (var[o] + b.eps()).sqrt())
            .collect();
        let bias = (0..cout)
            .map(|o| (beta[o] - mean[o] * s[o]) as f32)
            .collect();
        let taps = kh * kw;
        let mut packed = vec![0f32; taps * cin * cout];
        for (row, dst) in packed.chunks_exact_mut(cout).enumerate() {
            let (t, ci) = (row / cin, row % cin);
            for (o, d) in dst.iter_mut().enumerate() {
                *d = (f64::from(w[(o * cin + ci) * taps + t]) * s[o]) as f32;
            }
        }
        Ok(FoldedConv {
            k: kh,
            stride: cfg.stride,
            pad: cfg.padding,
            cin,
            cout,
            w: packed,
            bias,
        })
    }

    fn out_side(&self, len: usize) -> usize {
        (len + 2 * self.pad).saturating_sub(self.k) / self.stride + 1
    }
}

struct FoldedBlock {
    convs: Vec<FoldedConv>,
    downsample: Option<FoldedConv>,
}

/// An activation `[n, h, w, c]` in a buffer that may be longer.
struct Act {
    buf: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl Act {
    fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    fn data(&self) -> &[f32] {
        &self.buf[..self.len()]
    }
    fn data_mut(&mut self) -> &mut [f32] {
        let len = self.len();
        &mut self.buf[..len]
    }
}

/// Buffers kept between calls.
#[derive(Default)]
struct Scratch(Vec<Vec<f32>>);

impl Scratch {
    /// A buffer of at least `len` values (contents unspecified): the smallest kept one that
    /// fits, else a new one.
    fn take(&mut self, len: usize) -> Vec<f32> {
        let best = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => self.0.swap_remove(i),
            None => vec![0f32; len],
        }
    }
    fn give(&mut self, b: Vec<f32>) {
        self.0.push(b);
    }
}

/// A ResNet-18/50 trunk folded for inference: `[N, 3, H, W]` frames to `[N, C]` pooled
/// features, the values of `ResNet::forward_t(x, false)` to float32 rounding.
pub struct ResnetInference {
    stem: FoldedConv,
    blocks: Vec<FoldedBlock>,
    out_dim: usize,
    scratch: Mutex<Scratch>,
}

impl ResnetInference {
    /// Folds `net`'s current weights (later changes to them are not seen).
    pub fn new(net: &ResNet) -> Result<Self> {
        let (conv1, bn1, layers) = net.parts();
        let blocks = layers
            .iter()
            .flatten()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|block| {
                Ok(FoldedBlock {
                    convs: block
                        .convs
                        .iter()
                        .map(|(c, b)| FoldedConv::fold(c, b))
                        .collect::<Result<_>>()?,
                    downsample: block
                        .downsample
                        .as_ref()
                        .map(|(c, b)| FoldedConv::fold(c, b))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ResnetInference {
            stem: FoldedConv::fold(conv1, bn1)?,
            blocks,
            out_dim: net.out_dim(),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Channels of the pooled output.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// # Shapes
    /// `frames [N, 3, H, W]` (any float type, any device) -> `[N, out_dim]` float32 on the
    /// CPU.
    pub fn forward(&self, frames: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = frames.dims4()?;
        if c != self.stem.cin {
            return Err(Error::Config(format!(
                "ResNet input has {c} channels, the stem takes {}",
                self.stem.cin
            )));
        }
        if n == 0 {
            return Ok(Tensor::zeros((0, self.out_dim), DType::F32, &Device::Cpu)?);
        }
        let pixels = frames
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| Error::Config("inference buffers poisoned by a panic".into()))?;
        let scratch = &mut *guard;
        let x = to_channels_last(&pixels, (n, c, h, w), scratch);
        let y = conv(&self.stem, &x, true, None, scratch);
        scratch.give(x.buf);
        let mut x = max_pool_3x3_s2(&y, scratch);
        scratch.give(y.buf);
        for block in &self.blocks {
            x = block_forward(block, x, scratch);
        }
        let pooled = average_pool(&x);
        scratch.give(x.buf);
        Ok(Tensor::from_vec(pooled, (n, self.out_dim), &Device::Cpu)?)
    }
}

fn block_forward(block: &FoldedBlock, x: Act, scratch: &mut Scratch) -> Act {
    let last = block.convs.len() - 1;
    let mut t: Option<Act> = None;
    for conv_i in &block.convs[..last] {
        let input = t.as_ref().unwrap_or(&x);
        let y = conv(conv_i, input, true, None, scratch);
        if let Some(old) = t.replace(y) {
            scratch.give(old.buf);
        }
    }
    let skip = match &block.downsample {
        Some(d) => {
            let s = conv(d, &x, false, None, scratch);
            scratch.give(x.buf);
            s
        }
        None => x,
    };
    // The block's input (or the downsampled shortcut) becomes the output: the last
    // convolution accumulates onto it, then bias and ReLU.
    let input = t
        .as_ref()
        .expect("a residual block has at least two convolutions");
    let out = conv(&block.convs[last], input, true, Some(skip), scratch);
    if let Some(t) = t {
        scratch.give(t.buf);
    }
    out
}

fn to_channels_last(
    px: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    s: &mut Scratch,
) -> Act {
    let mut buf = s.take(n * h * w * c);
    let hw = h * w;
    buf[..n * hw * c]
        .par_chunks_mut(hw * c)
        .zip(px.par_chunks(c * hw))
        .for_each(|(dst, src)| {
            for (p, d) in dst.chunks_exact_mut(c).enumerate() {
                for (ch, v) in d.iter_mut().enumerate() {
                    *v = src[ch * hw + p];
                }
            }
        });
    Act { buf, n, h, w, c }
}

/// `relu?(conv(x) + bias [+ onto])`: with `onto`, the product accumulates onto that
/// activation (the shortcut), which becomes the output.
fn conv(f: &FoldedConv, x: &Act, relu: bool, onto: Option<Act>, scratch: &mut Scratch) -> Act {
    let (ho, wo) = (f.out_side(x.h), f.out_side(x.w));
    let rows = x.n * ho * wo;
    let accumulate = onto.is_some();
    let mut out = match onto {
        Some(a) => {
            debug_assert_eq!((a.n, a.h, a.w, a.c), (x.n, ho, wo, f.cout));
            a
        }
        None => Act {
            buf: scratch.take(rows * f.cout),
            n: x.n,
            h: ho,
            w: wo,
            c: f.cout,
        },
    };
    let kdim = f.k * f.k * f.cin;
    if f.k == 1 && f.stride == 1 && f.pad == 0 {
        matmul(
            out.data_mut(),
            x.data(),
            f.cin,
            &f.w,
            (rows, f.cout, kdim),
            accumulate,
        );
    } else {
        let per_image = ho * wo * kdim;
        let group = (COLS_FLOATS / per_image.max(1)).clamp(1, x.n);
        let mut cols = scratch.take(group * per_image);
        let out_per_image = ho * wo * f.cout;
        for i0 in (0..x.n).step_by(group) {
            let g = group.min(x.n - i0);
            lower(f, x, i0, g, (ho, wo), &mut cols[..g * per_image]);
            matmul(
                &mut out.data_mut()[i0 * out_per_image..(i0 + g) * out_per_image],
                &cols,
                kdim,
                &f.w,
                (g * ho * wo, f.cout, kdim),
                accumulate,
            );
        }
        scratch.give(cols);
    }
    bias_relu(out.data_mut(), &f.bias, relu);
    out
}

/// The columns of images `i0..i0 + g`: one row per output pixel, `k * k * C` values in
/// `(ky, kx, c)` order, zeros where the window leaves the image.
fn lower(f: &FoldedConv, x: &Act, i0: usize, g: usize, (ho, wo): (usize, usize), cols: &mut [f32]) {
    let (c, kdim) = (x.c, f.k * f.k * x.c);
    let img = &x.data()[i0 * x.h * x.w * c..(i0 + g) * x.h * x.w * c];
    cols.par_chunks_mut(wo * kdim)
        .enumerate()
        .for_each(|(r, row)| {
            let (i, oy) = (r / ho, r % ho);
            let plane = &img[i * x.h * x.w * c..(i + 1) * x.h * x.w * c];
            for (ox, col) in row.chunks_exact_mut(kdim).enumerate() {
                for ky in 0..f.k {
                    let iy = (oy * f.stride + ky).wrapping_sub(f.pad);
                    for kx in 0..f.k {
                        let ix = (ox * f.stride + kx).wrapping_sub(f.pad);
                        let dst = &mut col[(ky * f.k + kx) * c..][..c];
                        if iy < x.h && ix < x.w {
                            dst.copy_from_slice(&plane[(iy * x.w + ix) * c..][..c]);
                        } else {
                            dst.fill(0.0);
                        }
                    }
                }
            }
        });
}

fn bias_relu(out: &mut [f32], bias: &[f32], relu: bool) {
    let c = bias.len();
    out.par_chunks_mut(c * 64).for_each(|rows| {
        for row in rows.chunks_exact_mut(c) {
            for (v, b) in row.iter_mut().zip(bias) {
                let y = *v + b;
                *v = if relu { y.max(0.0) } else { y };
            }
        }
    });
}

/// 3x3 max pooling, stride 2, padding 1 (the stem's).
fn max_pool_3x3_s2(x: &Act, scratch: &mut Scratch) -> Act {
    let (k, s, p) = (3usize, 2usize, 1usize);
    let ho = (x.h + 2 * p - k) / s + 1;
    let wo = (x.w + 2 * p - k) / s + 1;
    let c = x.c;
    let mut out = Act {
        buf: scratch.take(x.n * ho * wo * c),
        n: x.n,
        h: ho,
        w: wo,
        c,
    };
    let src = x.data();
    out.data_mut()
        .par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(r, row)| {
            let (i, oy) = (r / ho, r % ho);
            let plane = &src[i * x.h * x.w * c..(i + 1) * x.h * x.w * c];
            for (ox, dst) in row.chunks_exact_mut(c).enumerate() {
                dst.fill(f32::NEG_INFINITY);
                for ky in 0..k {
                    let iy = (oy * s + ky).wrapping_sub(p);
                    if iy >= x.h {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * s + kx).wrapping_sub(p);
                        if ix >= x.w {
                            continue;
                        }
                        for (d, v) in dst.iter_mut().zip(&plane[(iy * x.w + ix) * c..][..c]) {
                            *d = d.max(*v);
                        }
                    }
                }
            }
        });
    out
}

/// The mean over each image's pixels: `[n, c]`.
fn average_pool(x: &Act) -> Vec<f32> {
    let (hw, c) = (x.h * x.w, x.c);
    let mut out = vec![0f32; x.n * c];
    out.par_chunks_mut(c)
        .zip(x.data().par_chunks(hw * c))
        .for_each(|(dst, img)| {
            for px in img.chunks_exact(c) {
                for (d, v) in dst.iter_mut().zip(px) {
                    *d += v;
                }
            }
            for d in dst.iter_mut() {
                *d /= hw as f32;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::ModuleT;
    use candle_nn::{VarBuilder, VarMap};

    /// Random weights and BatchNorm statistics (so the fold matters), frames of odd sizes
    /// (padding and strides at the edges): the channels-last engine gives the graph path's
    /// evaluation forward for ResNet-18 and ResNet-50, and a second call (buffers reused,
    /// a smaller batch) gives the same again.
    #[test]
    fn channels_last_inference_equals_the_graph_forward() {
        let dev = Device::Cpu;
        for (kind, seed) in [
            (crate::models::blocks::BackboneKind::Resnet18, 1u64),
            (crate::models::blocks::BackboneKind::Resnet50, 2),
        ] {
            let vm = VarMap::new();
            let net =
                ResNet::of_kind(kind, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
            crate::init::seeded_init(&vm, seed).unwrap();
            {
                let data = vm.data().lock().unwrap();
                let mut names: Vec<&String> = data.keys().collect();
                names.sort();
                for (i, name) in names.into_iter().enumerate() {
                    let var = &data[name];
                    let r = crate::init::seeded_randn(var.dims(), 50 + i as u64, DType::F32, &dev)
                        .unwrap();
                    if name.ends_with("running_var") {
                        var.set(&(r.abs().unwrap() + 0.5).unwrap()).unwrap();
                    } else if name.ends_with("running_mean") {
                        var.set(&(r * 0.1).unwrap()).unwrap();
                    } else if name.contains("bn") || name.contains("downsample.1") {
                        var.set(&((r * 0.2).unwrap() + 1.0).unwrap()).unwrap();
                    }
                }
            }
            let engine = ResnetInference::new(&net).unwrap();
            for (n, h, w) in [(3, 45, 37), (2, 32, 32)] {
                let x =
                    crate::init::seeded_randn(&[n, 3, h, w], seed + 10, DType::F32, &dev).unwrap();
                let want = net.forward_t(&x, false).unwrap();
                let got = engine.forward(&x).unwrap();
                assert_eq!(got.dims(), want.dims());
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.0);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{kind:?} {n}x{h}x{w}: {a} vs {b} (scale {scale})"
                    );
                }
            }
        }
    }

    /// `vdg features` promises that `--batch-frames` does not change a byte: a frame's
    /// features must not depend on the other frames of its forward pass (the products'
    /// row count changes with the batch, and the lowering's image groups with it).
    #[test]
    fn a_frame_gives_the_same_bits_in_any_batch() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let net = ResNet::resnet50(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        crate::init::seeded_init(&vm, 4).unwrap();
        let engine = ResnetInference::new(&net).unwrap();
        let x = crate::init::seeded_randn(&[9, 3, 64, 64], 5, DType::F32, &dev).unwrap();
        let all: Vec<f32> = engine
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (start, len) in [(0, 1), (4, 1), (2, 5), (8, 1)] {
            let part: Vec<f32> = engine
                .forward(&x.narrow(0, start, len).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = engine.out_dim();
            assert_eq!(
                part,
                all[start * d..(start + len) * d],
                "frames {start}..+{len}"
            );
        }
    }

    #[test]
    fn a_frame_with_the_wrong_channels_is_refused_and_no_frames_give_no_rows() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let net = ResNet::resnet18(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let engine = ResnetInference::new(&net).unwrap();
        let x = Tensor::zeros((1, 4, 16, 16), DType::F32, &dev).unwrap();
        let err = engine.forward(&x).unwrap_err().to_string();
        assert!(err.contains("4 channels"), "{err}");
        let none = Tensor::zeros((0, 3, 16, 16), DType::F32, &dev).unwrap();
        assert_eq!(engine.forward(&none).unwrap().dims(), &[0, 512]);
    }
}
