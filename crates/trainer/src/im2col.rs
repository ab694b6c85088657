//! The lowering that turns a 2-D or 3-D convolution into one matrix product, on the CPU, as
//! one candle custom operation with a hand-written gradient ([`conv`]).
//!
//! A convolution of `x [B, T, C, H, W]` (time-major, a 2-D convolution is `T = 1`) with
//! `w [C_out, C, kt, kh, kw]` runs as
//!
//! 1. [`FrameTranspose`]: every frame `[C, H*W]` to channels-last `[H*W, C]`;
//! 2. [`Vol2Col`]: the columns `[B*To*Ho*Wo, kt*kh*kw*C]`, one row per output pixel, column
//!    `((a*kh + p)*kw + q)*C + c` = `x[b, to*st + a*dt - pt, c, oy*sh + p*dh - ph, ox*sw + q*dw - pw]`
//!    (zero outside): with channels last, every tap is one contiguous copy of `C` values;
//! 3. one GEMM with the kernel permuted to `[C_out, kt, kh, kw, C]` (candle's `matmul`);
//! 4. [`FrameTranspose`] of the output rows `[Ho*Wo, C_out]` back to channels-first.
//!
//! Backward: the output gradient transposed to rows, the input gradient as `rows x kernel`
//! scattered back by [`Col2Vol`] (the adjoint of step 2, gathering per input frame:
//! race-free in parallel) and transposed, the kernel gradient as `cols^T x rows` with the
//! columns recomputed already transposed by [`Vol2ColT`]; nothing of the forward pass but
//! `x` and the kernel is kept. Large batches are differentiated in chunks of images so that
//! no column buffer exceeds 256 MB (a ResNet-18 stem at 200 images would build 1.5 GB ones;
//! `CHUNK_FLOATS`). With a fused ReLU (`conv(.., relu: true)`) the output is clamped in the
//! same pass and the backward masks the gradient by the output. Measured in BENCHMARKS.md ("Convolution backward"): the
//! earlier channel-major lowering (strided reads and writes, one `conv2d` per temporal tap on
//! strided slices) cost 3-6x its forward in backward, this one 2.1-2.8x. CPU only, float32
//! and float64; other devices and dtypes keep candle's `conv2d` (see `nn3d::conv2d`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Geometry of one lowering; arrays are `[time, height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Batch.
    pub b: usize,
    /// Input frames, channels, height, width.
    pub t: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel extent.
    pub k: [usize; 3],
    /// Stride.
    pub stride: [usize; 3],
    /// Zero padding on both sides.
    pub padding: [usize; 3],
    /// Dilation.
    pub dilation: [usize; 3],
    /// Output frames, height, width.
    pub out: [usize; 3],
}

impl Geometry {
    /// Columns per output pixel: `kt*kh*kw*C`.
    pub fn cols(&self) -> usize {
        self.k.iter().product::<usize>() * self.c
    }

    /// Rows of the lowering: `B*To*Ho*Wo`.
    pub fn rows(&self) -> usize {
        self.b * self.out.iter().product::<usize>()
    }

    /// Input frame of temporal tap `a` for output frame `to`, if inside the clip.
    #[inline]
    fn frame(&self, to: usize, a: usize) -> Option<usize> {
        let t = (to * self.stride[0] + a * self.dilation[0]) as isize - self.padding[0] as isize;
        (t >= 0 && (t as usize) < self.t).then_some(t as usize)
    }

    /// Input coordinate along axis 1 (height) or 2 (width) of output `o`, tap `p`.
    #[inline]
    fn coord(&self, axis: usize, o: usize, p: usize) -> Option<usize> {
        let len = if axis == 1 { self.h } else { self.w };
        let i = (o * self.stride[axis] + p * self.dilation[axis]) as isize
            - self.padding[axis] as isize;
        (i >= 0 && (i as usize) < len).then_some(i as usize)
    }
}

impl Geometry {
    /// Walks the taps of output frame `to` whose temporal tap `a` reads input frame `t`
    /// (every `t` when `only` is `None`) and lands inside the image: `f(t, row, tap, src)`
    /// with `row` the output pixel's row of the frame's columns (`oy*Wo + ox`), `tap` its
    /// column offset (`((a*kh + p)*kw + q)*C`) and `src` the input pixel (`iy*W + ix`).
    /// The one loop nest of [`Vol2Col`] and its adjoint [`Col2Vol`].
    #[inline]
    fn each_tap(
        &self,
        to: usize,
        only: Option<usize>,
        mut f: impl FnMut(usize, usize, usize, usize),
    ) {
        let [_, ho, wo] = self.out;
        let [kt, kh, kw] = self.k;
        for a in 0..kt {
            let Some(t) = self.frame(to, a) else { continue };
            if only.is_some_and(|o| o != t) {
                continue;
            }
            for oy in 0..ho {
                for p in 0..kh {
                    let Some(iy) = self.coord(1, oy, p) else {
                        continue;
                    };
                    for ox in 0..wo {
                        for q in 0..kw {
                            let Some(ix) = self.coord(2, ox, q) else {
                                continue;
                            };
                            let tap = ((a * kh + p) * kw + q) * self.c;
                            f(t, oy * wo + ox, tap, iy * self.w + ix);
                        }
                    }
                }
            }
        }
    }
}

/// `v`'s values under a contiguous `layout` (an error naming `what` otherwise); the CPU
/// custom ops of this crate share it.
pub(crate) fn contiguous<'a, T>(
    v: &'a [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the float32 or float64 slice of a contiguous storage.
macro_rules! dispatch {
    ($s:expr, $l:expr, $what:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $v = contiguous(v, $l, $what)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(v) => {
                let $v = contiguous(v, $l, $what)?;
                CpuStorage::F64($body)
            }
            other => candle_core::bail!("{}: unsupported dtype {:?}", $what, other.dtype()),
        }
    };
}

/// `x [N, R, C] -> [N, C, R]`: each of the `N` matrices transposed (cache-blocked).
#[derive(Debug, Clone, Copy)]
pub struct FrameTranspose {
    /// Rows of each input matrix.
    pub rows: usize,
    /// Columns of each input matrix.
    pub cols: usize,
}

impl FrameTranspose {
    const BLOCK: usize = 32;

    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (r, c) = (self.rows, self.cols);
        let mut out = vec![T::zero(); x.len()];
        if r * c == 0 {
            return out;
        }
        let one = |o: &mut [T], xi: &[T]| {
            if r * c <= 1 << 14 {
                // Fits in L2: no blocking.
                for (i, row) in xi.chunks_exact(c).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        o[j * r + i] = v;
                    }
                }
                return;
            }
            for r0 in (0..r).step_by(Self::BLOCK) {
                let r1 = (r0 + Self::BLOCK).min(r);
                for c0 in (0..c).step_by(Self::BLOCK) {
                    let c1 = (c0 + Self::BLOCK).min(c);
                    for (i, row) in xi[r0 * c..r1 * c].chunks_exact(c).enumerate() {
                        for (j, &v) in row[c0..c1].iter().enumerate() {
                            o[(c0 + j) * r + r0 + i] = v;
                        }
                    }
                }
            }
        };
        if x.len() / (r * c) == 1 || r * c >= 1 << 14 {
            out.par_chunks_mut(r * c)
                .zip(x.par_chunks(r * c))
                .for_each(|(o, xi)| one(o, xi));
        } else {
            // Many small matrices: chunks of several per task.
            let per = ((1 << 14) / (r * c)).max(1) * r * c;
            out.par_chunks_mut(per)
                .zip(x.par_chunks(per))
                .for_each(|(o, xi)| {
                    o.chunks_mut(r * c)
                        .zip(xi.chunks(r * c))
                        .for_each(|(o, xi)| one(o, xi))
                });
        }
        out
    }
}

impl CustomOp1 for FrameTranspose {
    fn name(&self) -> &'static str {
        "vdg-frame-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() != 3 || dims[1] != self.rows || dims[2] != self.cols {
            candle_core::bail!(
                "frame transpose: expected [N, {}, {}], got {dims:?}",
                self.rows,
                self.cols
            );
        }
        let shape = Shape::from((dims[0], self.cols, self.rows));
        Ok((dispatch!(s, l, "frame transpose", |v| self.run(v)), shape))
    }
}

/// The lowering `x [B, T, H, W, C]` (channels last) `-> [B*To*Ho*Wo, kt*kh*kw*C]`.
#[derive(Debug, Clone, Copy)]
pub struct Vol2Col(pub Geometry);

impl Vol2Col {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let g = self.0;
        let [to_n, ho, wo] = g.out;
        let (c, k) = (g.c, g.cols());
        let frame = g.h * g.w * c;
        let mut out = vec![T::zero(); g.rows() * k];
        out.par_chunks_mut(ho * wo * k)
            .enumerate()
            .for_each(|(bt, o)| {
                let (b, to) = (bt / to_n, bt % to_n);
                g.each_tap(to, None, |t, row, tap, src| {
                    let xf = &x[(b * g.t + t) * frame..];
                    o[row * k + tap..][..c].copy_from_slice(&xf[src * c..][..c]);
                });
            });
        out
    }
}

impl CustomOp1 for Vol2Col {
    fn name(&self) -> &'static str {
        "vdg-vol2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        if l.shape().elem_count() != g.b * g.t * g.h * g.w * g.c {
            candle_core::bail!("vol2col: input {:?} does not match {g:?}", l.dims());
        }
        let shape = Shape::from((g.rows(), g.cols()));
        Ok((dispatch!(s, l, "vol2col", |v| self.run(v)), shape))
    }
}

/// The same columns transposed, `[kt*kh*kw*C, B*To*Ho*Wo]`, straight from the channels-first
/// input `x [B, T, C, H, W]`: the layout in which the kernel gradient `cols^T x rows` runs as
/// fast as the forward product (with `[R, K]` columns, that product's long inner dimension
/// made it about twice as slow; BENCHMARKS.md). Each row reads runs of one input row.
#[derive(Debug, Clone, Copy)]
pub struct Vol2ColT(pub Geometry);

impl Vol2ColT {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let g = self.0;
        let [to_n, ho, wo] = g.out;
        let [_, kh, kw] = g.k;
        let (c, r) = (g.c, g.rows());
        let (plane, frame) = (g.h * g.w, g.c * g.h * g.w);
        let mut out = vec![T::zero(); g.cols() * r];
        out.par_chunks_mut(r).enumerate().for_each(|(k, o)| {
            let (a, p, q, ci) = (k / (kh * kw * c), k / (kw * c) % kh, k / c % kw, k % c);
            for b in 0..g.b {
                for to in 0..to_n {
                    let Some(t) = g.frame(to, a) else { continue };
                    let xp = &x[(b * g.t + t) * frame + ci * plane..][..plane];
                    let ob = &mut o[(b * to_n + to) * ho * wo..][..ho * wo];
                    for oy in 0..ho {
                        let Some(iy) = g.coord(1, oy, p) else {
                            continue;
                        };
                        let xr = &xp[iy * g.w..][..g.w];
                        let orow = &mut ob[oy * wo..][..wo];
                        // The outputs whose tap lands inside the row: a strided copy.
                        let (s, off) = (
                            g.stride[2],
                            (q * g.dilation[2]) as isize - g.padding[2] as isize,
                        );
                        let lo = if off >= 0 {
                            0
                        } else {
                            (-off as usize).div_ceil(s)
                        };
                        let hi = if (g.w as isize) > off {
                            ((g.w as isize - off - 1) as usize / s + 1).min(wo)
                        } else {
                            0
                        };
                        if lo < hi {
                            let first = (lo * s) as isize + off;
                            let src = xr[first as usize..].iter().step_by(s);
                            for (v, &x) in orow[lo..hi].iter_mut().zip(src) {
                                *v = x;
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

impl CustomOp1 for Vol2ColT {
    fn name(&self) -> &'static str {
        "vdg-vol2col-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        if l.shape().elem_count() != g.b * g.t * g.c * g.h * g.w {
            candle_core::bail!("vol2col-t: input {:?} does not match {g:?}", l.dims());
        }
        let shape = Shape::from((g.cols(), g.rows()));
        Ok((dispatch!(s, l, "vol2col-t", |v| self.run(v)), shape))
    }
}

/// The adjoint of [`Vol2Col`]: `cols [B*To*Ho*Wo, kt*kh*kw*C] -> [B, T, H, W, C]`, summing
/// overlapping windows. Parallel over input frames, each gathering from the output frames
/// whose windows reach it.
#[derive(Debug, Clone, Copy)]
pub struct Col2Vol(pub Geometry);

impl Col2Vol {
    fn run<T: WithDType>(&self, cols: &[T]) -> Vec<T> {
        let g = self.0;
        let [to_n, ho, wo] = g.out;
        let (c, k) = (g.c, g.cols());
        let frame = g.h * g.w * c;
        let mut out = vec![T::zero(); g.b * g.t * frame];
        out.par_chunks_mut(frame).enumerate().for_each(|(bt, o)| {
            let (b, t) = (bt / g.t, bt % g.t);
            for to in 0..to_n {
                let block = &cols[(b * to_n + to) * ho * wo * k..][..ho * wo * k];
                g.each_tap(to, Some(t), |_, row, tap, src| {
                    let dst = &mut o[src * c..][..c];
                    for (d, s) in dst.iter_mut().zip(&block[row * k + tap..][..c]) {
                        *d += *s;
                    }
                });
            }
        });
        out
    }
}

impl CustomOp1 for Col2Vol {
    fn name(&self) -> &'static str {
        "vdg-col2vol"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        if l.dims() != [g.rows(), g.cols()] {
            candle_core::bail!("col2vol: input {:?} does not match {g:?}", l.dims());
        }
        let shape = Shape::from((g.b * g.t * g.h * g.w, g.c));
        Ok((dispatch!(s, l, "col2vol", |v| self.run(v)), shape))
    }
}

/// The whole convolution as one operation with its own gradient, so that candle's autograd
/// sees only the inputs (`x`, the permuted kernel, the bias) and the output: no intermediate
/// tensor (the columns, the GEMM's output rows) is kept for the backward pass or gets the
/// zero-filled gradient buffer and extra addition candle gives every node. The backward pass
/// recomputes the columns from `x` (one memory pass, cheaper than keeping 9-27 copies of the
/// input alive), and skips the gradient of an argument that is not tracked (a network's
/// first layer on images; the ascent passes of ADA on a detached twin).
/// Largest column buffer the backward builds at once, in entries (256 MB of float32);
/// larger batches are differentiated in chunks of images.
const CHUNK_FLOATS: usize = 1 << 26;

#[cfg(test)]
thread_local! {
    /// Tests set a tiny chunk to exercise the chunked backward on small inputs.
    pub(crate) static CHUNK_FLOATS_OVERRIDE: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

fn chunk_floats() -> usize {
    #[cfg(test)]
    if let Some(n) = CHUNK_FLOATS_OVERRIDE.with(|c| c.get()) {
        return n;
    }
    CHUNK_FLOATS
}

#[derive(Debug, Clone, Copy)]
/// The convolution of a geometry; with `.1`, a ReLU applied to its output in the same op.
struct Convolution(Geometry, bool);

impl Convolution {
    fn transpose_in(&self) -> FrameTranspose {
        FrameTranspose {
            rows: self.0.c,
            cols: self.0.h * self.0.w,
        }
    }

    fn fwd<T: WithDType>(
        &self,
        x: &[T],
        wk: &[T],
        bias: Option<&[T]>,
        co: usize,
    ) -> candle_core::Result<Vec<T>> {
        let g = self.0;
        let cols = Vol2Col(g).run(&self.transpose_in().run(x));
        let dev = candle_core::Device::Cpu;
        let cols = Tensor::from_vec(cols, (g.rows(), g.cols()), &dev)?;
        let wk = Tensor::from_slice(wk, (co, g.cols()), &dev)?;
        let y = cols.matmul(&wk.t()?)?;
        let (storage, layout) = y.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("convolution: the product left the CPU")
        };
        let y = contiguous(cpu.as_slice::<T>()?, layout, "convolution")?;
        let [_, ho, wo] = g.out;
        let mut out = FrameTranspose {
            rows: ho * wo,
            cols: co,
        }
        .run(y);
        let relu = self.1;
        if bias.is_some() || relu {
            let zero = T::zero();
            out.par_chunks_mut(ho * wo * co).for_each(|frame| {
                for (c, plane) in frame.chunks_mut(ho * wo).enumerate() {
                    let b = bias.map_or(zero, |b| b[c]);
                    for v in plane.iter_mut() {
                        let y = *v + b;
                        *v = if !relu || y > zero { y } else { zero };
                    }
                }
            });
        }
        Ok(out)
    }

    fn check(&self, x: &Layout, wk: &Layout) -> candle_core::Result<usize> {
        let g = self.0;
        let co = wk.dims()[0];
        if x.shape().elem_count() != g.b * g.t * g.c * g.h * g.w || wk.dims() != [co, g.cols()] {
            candle_core::bail!(
                "convolution: inputs {:?} and {:?} do not match {g:?}",
                x.dims(),
                wk.dims()
            );
        }
        Ok(co)
    }

    fn shape(&self, co: usize) -> Shape {
        let [to, ho, wo] = self.0.out;
        Shape::from((self.0.b, to, co, ho, wo))
    }

    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let co = self.check(l1, l2)?;
        const WHAT: &str = "convolution";
        let out = match (s1, s2, bias) {
            (CpuStorage::F32(x), CpuStorage::F32(w), b) => {
                let b = match b {
                    Some((CpuStorage::F32(b), l)) => Some(contiguous(b, l, WHAT)?),
                    Some(_) => candle_core::bail!("{WHAT}: bias dtype differs"),
                    None => None,
                };
                CpuStorage::F32(self.fwd(
                    contiguous(x, l1, WHAT)?,
                    contiguous(w, l2, WHAT)?,
                    b,
                    co,
                )?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), b) => {
                let b = match b {
                    Some((CpuStorage::F64(b), l)) => Some(contiguous(b, l, WHAT)?),
                    Some(_) => candle_core::bail!("{WHAT}: bias dtype differs"),
                    None => None,
                };
                CpuStorage::F64(self.fwd(
                    contiguous(x, l1, WHAT)?,
                    contiguous(w, l2, WHAT)?,
                    b,
                    co,
                )?)
            }
            (x, w, _) => candle_core::bail!(
                "{WHAT}: unsupported dtypes {:?} and {:?}",
                x.dtype(),
                w.dtype()
            ),
        };
        Ok((out, self.shape(co)))
    }

    /// The output gradient before the fused ReLU (masked by the output), or as it is.
    fn through_relu(&self, grad: &Tensor, res: &Tensor) -> candle_core::Result<Tensor> {
        if self.1 {
            crate::fused::relu_grad(grad, res)
        } else {
            Ok(grad.clone())
        }
    }

    /// Gradients of `x`, the kernel and (with `bias`) the bias, each only when tracked.
    fn grads(
        &self,
        x: &Tensor,
        wk: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let g = self.0;
        let co = wk.dim(0)?;
        let [to, ho, wo] = g.out;
        // The output gradient as GEMM rows [B*To*Ho*Wo, C_out].
        let rows = grad
            .detach()
            .contiguous()?
            .reshape((g.b * to, co, ho * wo))?
            .apply_op1_no_bwd(&FrameTranspose {
                rows: co,
                cols: ho * wo,
            })?
            .reshape((g.rows(), co))?;
        // Image by image in chunks of at most CHUNK_FLOATS column entries: the columns are
        // the backward's largest buffers (a ResNet-18 stem at 200 images: 1.5 GB each).
        let per_image = to * ho * wo * g.cols();
        let chunk = (chunk_floats() / per_image.max(1)).clamp(1, g.b.max(1));
        let rows_per_image = to * ho * wo;
        let (want_dx, want_dw) = (x.track_op(), wk.track_op());
        let x = x.detach().contiguous()?;
        let mut dx_parts = Vec::new();
        let mut dw: Option<Tensor> = None;
        for start in (0..g.b).step_by(chunk) {
            let n = chunk.min(g.b - start);
            let gc = Geometry { b: n, ..g };
            let rows_c = rows.narrow(0, start * rows_per_image, n * rows_per_image)?;
            if want_dx {
                let dx = rows_c
                    .matmul(&wk.detach())?
                    .apply_op1_no_bwd(&Col2Vol(gc))?
                    .reshape((n * g.t, g.h * g.w, g.c))?
                    .apply_op1_no_bwd(&FrameTranspose {
                        rows: g.h * g.w,
                        cols: g.c,
                    })?;
                dx_parts.push(dx.reshape((n, g.t * g.c * g.h * g.w))?);
            }
            if want_dw {
                // [K, R] x [R, C_out], transposed back to the kernel's [C_out, K] below.
                let xc = x.narrow(0, start, n)?.contiguous()?;
                let cols_t = xc.apply_op1_no_bwd(&Vol2ColT(gc))?;
                let part = cols_t.matmul(&rows_c)?;
                dw = Some(match dw {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        let dx = if want_dx {
            let dx = if dx_parts.len() == 1 {
                dx_parts.remove(0)
            } else {
                Tensor::cat(&dx_parts, 0)?
            };
            Some(dx.reshape(x.shape())?)
        } else {
            None
        };
        let dw = match dw {
            Some(dw) => Some(dw.t()?.contiguous()?),
            None => None,
        };
        let db = match bias {
            Some(b) if b.track_op() => Some(rows.sum(0)?),
            _ => None,
        };
        Ok([dx, dw, db])
    }
}

impl candle_core::CustomOp2 for Convolution {
    fn name(&self) -> &'static str {
        "vdg-convolution"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wk: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = self.through_relu(grad, res)?;
        let [dx, dw, _] = self.grads(x, wk, None, &grad)?;
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp3 for Convolution {
    fn name(&self) -> &'static str {
        "vdg-convolution-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l3.dims() != [l2.dims()[0]] {
            candle_core::bail!("convolution: bias {:?} for {:?}", l3.dims(), l2.dims());
        }
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wk: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = self.through_relu(grad, res)?;
        let [dx, dw, db] = self.grads(x, wk, Some(bias), &grad)?;
        Ok((dx, dw, db))
    }
}

/// A convolution through the lowering: `x [B, T, C, H, W]`, `w [C_out, C, kt, kh, kw]`,
/// optional `bias [C_out]` -> `[B, To, C_out, Ho, Wo]` (the geometry's output), then a ReLU
/// when `relu` (in the same op: only the output is kept, and its backward masks by it).
/// CPU, float32 or float64, any layouts.
pub fn conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: Geometry,
    relu: bool,
) -> crate::error::Result<Tensor> {
    let co = w.dim(0)?;
    // The kernel in the columns' order (a, p, q, c).
    let wk = w
        .permute((0, 2, 3, 4, 1))?
        .contiguous()?
        .reshape((co, g.cols()))?;
    let x = x.contiguous()?;
    Ok(match bias {
        Some(b) => x.apply_op3(&wk, &b.contiguous()?, Convolution(g, relu))?,
        None => x.apply_op2(&wk, Convolution(g, relu))?,
    })
}
