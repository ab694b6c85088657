//! The lowering that turns a 2-D or 3-D convolution into one matrix product, on the CPU, as
//! one candle custom operation with a hand-written gradient ([`conv`]).
//!
//! A convolution of `x [B, T, C, H, W]` (time-major, a 2-D convolution is `T = 1`) with
//! `w [C_out, C, kt, kh, kw]` runs block by block over the output: a block is a range of
//! output lines (rows of output frames) sized so that its columns fit in a core's L2 cache
//! (`BLOCK_FLOATS`), and for each block
//!
//! 1. [`build_cols`]: the block's columns, transposed, `[kt*kh*kw*C, n]` for its `n` output
//!    pixels, row `((a*kh + p)*kw + q)*C + c` holding
//!    `x[b, to*st + a*dt - pt, c, oy*sh + p*dh - ph, ox*sw + q*dw - pw]` (zero outside),
//!    read straight from the channels-first input as runs of input rows;
//! 2. one product with the kernel permuted to `[C_out, kt, kh, kw, C]`
//!    (`kernel [C_out, K] x cols [K, n]`, [`crate::cpu_gemm`]);
//! 3. the block's outputs written into the channels-first output with the bias and, when
//!    fused, the ReLU.
//!
//! Backward by the same blocks: the output gradient's lines gathered to `[C_out, n]`, the
//! kernel gradient accumulated transposed as `cols x dy^T` from columns recomputed from `x`,
//! the input gradient as `kernel^T x dy` added back by [`scatter_cols`] (the adjoint of step
//! 1); work is split into groups of whole clips (frames when the kernel does not reach across
//! frames) so that the groups write disjoint parts of the input gradient, and the groups'
//! partial kernel gradients are summed in a fixed order: results do not depend on the number
//! of threads.
//! Nothing of the forward pass but `x` and the kernel is kept, and no column matrix of the
//! whole batch is ever built (the version before built and zero-filled it, 9-27 times the
//! input, and transposed input and output; BENCHMARKS.md, "Convolution in cache-sized
//! blocks"). With a fused ReLU (`conv(.., relu: true)`) the backward masks the gradient by
//! the output. CPU only, float32 and float64; other devices and dtypes keep candle's
//! `conv2d` (see `nn3d::conv2d`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, WithDType};

use crate::cpu_gemm::{self, Mat, Real};
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

/// [`contiguous`] for an in-place op's destination.
pub(crate) fn contiguous_mut<'a, T>(
    v: &'a mut [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Target entries of one block's column buffer (1 MB of float32: half a core's L2 on the
/// machines measured in BENCHMARKS.md).
const BLOCK_FLOATS: usize = 1 << 18;
/// Fewest output pixels per block, so that a wide kernel (`kt*kh*kw*C` in the thousands) still
/// gives the block products a useful width.
const MIN_BLOCK_COLS: usize = 256;
/// Most groups of the backward pass; each keeps a partial kernel gradient, summed in order.
const MAX_GROUPS: usize = 8;
/// Entries of all partial kernel gradients together (64 MB of float32).
const PARTIAL_FLOATS: usize = 1 << 24;
/// Most tasks the forward pass splits the output frames into.
const FORWARD_TASKS: usize = 16;

#[cfg(test)]
thread_local! {
    /// Tests set (output lines per block, most backward groups) to exercise many blocks and
    /// groups on small inputs.
    pub(crate) static BLOCKING_OVERRIDE: std::cell::Cell<Option<(usize, usize)>> =
        const { std::cell::Cell::new(None) };
}

/// Output lines (rows of one output frame) per block and the most backward groups. Depends
/// on the geometry only, never on the thread count: the kernel gradient's summation order
/// follows the blocks and groups, and results must not change with the machine's cores.
fn blocking(g: &Geometry) -> (usize, usize) {
    #[cfg(test)]
    if let Some(b) = BLOCKING_OVERRIDE.with(|c| c.get()) {
        return b;
    }
    let cols = (BLOCK_FLOATS / g.cols().max(1)).max(MIN_BLOCK_COLS);
    ((cols / g.out[2].max(1)).max(1), MAX_GROUPS)
}

/// For width tap `q`: the outputs `lo..hi` whose input column `ox*s + off` lies inside the
/// row, and `off`.
#[inline]
fn width_span(g: &Geometry, q: usize) -> (usize, usize, isize) {
    let s = g.stride[2];
    let off = (q * g.dilation[2]) as isize - g.padding[2] as isize;
    let lo = if off >= 0 {
        0
    } else {
        (-off as usize).div_ceil(s)
    };
    let hi = if (g.w as isize) > off {
        ((g.w as isize - off - 1) as usize / s + 1).min(g.out[2])
    } else {
        0
    };
    (lo, hi.max(lo), off)
}

/// Walks the columns of output lines `l0..l1` (a line is one row of one output frame,
/// numbered `(b*To + to)*Ho + oy` over the batch): `f(seg, src)` for every column `k` (in
/// the order `((a*kh + p)*kw + q)*C + c`) and every line, with `seg` the line's `Wo` entries
/// of that column, and `src` the input row they read (`(offset of x[b, t, c, iy, 0], lo, hi,
/// off)`: entries `lo..hi` read `ox*s + off`, the rest are padding), `None` when the whole
/// line is padding. The one loop nest of the lowering ([`build_cols`]) and its adjoint
/// ([`scatter_cols`]).
#[inline]
fn each_line<T>(
    g: &Geometry,
    cols: &mut [T],
    (l0, l1): (usize, usize),
    mut f: impl FnMut(&mut [T], Option<(usize, usize, usize, isize)>),
) {
    let [to_n, ho, wo] = g.out;
    let [kt, kh, kw] = g.k;
    let c = g.c;
    let plane = g.h * g.w;
    let n = (l1 - l0) * wo;
    let spans: Vec<_> = (0..kw).map(|q| width_span(g, q)).collect();
    for line in l0..l1 {
        let (bt, oy) = (line / ho, line % ho);
        let (b, to) = (bt / to_n, bt % to_n);
        let at = (line - l0) * wo;
        for a in 0..kt {
            let t = g.frame(to, a);
            for p in 0..kh {
                // Offset of x[b, t, 0, iy, 0].
                let row = t
                    .zip(g.coord(1, oy, p))
                    .map(|(t, iy)| (b * g.t + t) * c * plane + iy * g.w);
                for (q, &(lo, hi, off)) in spans.iter().enumerate() {
                    let k0 = ((a * kh + p) * kw + q) * c;
                    for ci in 0..c {
                        let seg = &mut cols[(k0 + ci) * n + at..][..wo];
                        f(seg, row.map(|r| (r + ci * plane, lo, hi, off)));
                    }
                }
            }
        }
    }
}

/// The columns of lines `l0..l1` transposed, `[kt*kh*kw*C, (l1 - l0)*Wo]`, from the
/// channels-first input `x [B, T, C, H, W]`: every entry of `cols` is written.
fn build_cols<T: WithDType>(g: &Geometry, x: &[T], lines: (usize, usize), cols: &mut [T]) {
    let s = g.stride[2];
    each_line(g, cols, lines, |seg, src| match src {
        Some((at, lo, hi, off)) if lo < hi => {
            // Only the padded ends (most lines have none: no call for an empty fill).
            if lo > 0 {
                seg[..lo].fill(T::zero());
            }
            if hi < seg.len() {
                seg[hi..].fill(T::zero());
            }
            let first = (at as isize + (lo * s) as isize + off) as usize;
            if s == 1 {
                seg[lo..hi].copy_from_slice(&x[first..][..hi - lo]);
            } else if s == 2 {
                gather_even(&mut seg[lo..hi], &x[first..]);
            } else {
                let xr = &x[first..][..(hi - lo - 1) * s + 1];
                for (i, v) in seg[lo..hi].iter_mut().enumerate() {
                    *v = xr[i * s];
                }
            }
        }
        _ => seg.fill(T::zero()),
    });
}

/// `seg[i] = x[2 i]` for every `i` of `seg` (`x` holds at least `2 seg.len() - 1` values),
/// eight values at a time from sixteen where `x` holds the sixteenth: the compiler unrolls
/// those blocks, which spares a loop count and an index computation per value.
#[inline]
fn gather_even<T: Copy>(seg: &mut [T], x: &[T]) {
    let len = seg.len();
    let mut i = 0;
    while i + 8 <= len && 2 * i + 16 <= x.len() {
        let src: &[T; 16] = x[2 * i..2 * i + 16].try_into().expect("16 values");
        let dst: &mut [T; 8] = (&mut seg[i..i + 8]).try_into().expect("8 values");
        for j in 0..8 {
            dst[j] = src[2 * j];
        }
        i += 8;
    }
    for k in i..len {
        seg[k] = x[2 * k];
    }
}

/// The adjoint of [`gather_even`]: `dx[2 i] += seg[i]` (`dx` holds at least `2 seg.len() -
/// 1` values; the odd ones are left as they are). An empty `seg` (a window wholly in the
/// padding) touches nothing.
#[inline]
fn scatter_even<T: WithDType>(dx: &mut [T], seg: &[T]) {
    let len = seg.len();
    let mut i = 0;
    while i + 8 <= len && 2 * i + 16 <= dx.len() {
        let d: &mut [T; 16] = (&mut dx[2 * i..2 * i + 16]).try_into().expect("16 values");
        let v: &[T; 8] = seg[i..i + 8].try_into().expect("8 values");
        for j in 0..8 {
            d[2 * j] += v[j];
        }
        i += 8;
    }
    for k in i..len {
        dx[2 * k] += seg[k];
    }
}

/// The adjoint of [`build_cols`]: adds the column gradients of lines `l0..l1` into `dx`, the
/// input gradient's frames from offset `base` of `[B, T, C, H, W]` on.
fn scatter_cols<T: WithDType>(
    g: &Geometry,
    cols: &mut [T],
    lines: (usize, usize),
    dx: &mut [T],
    base: usize,
) {
    let s = g.stride[2];
    each_line(g, cols, lines, |seg, src| {
        if let Some((at, lo, hi, off)) = src {
            let first = (at as isize + (lo * s) as isize + off) as usize - base;
            if s == 1 {
                for (d, v) in dx[first..][..hi - lo].iter_mut().zip(&seg[lo..hi]) {
                    *d += *v;
                }
            } else if s == 2 {
                scatter_even(&mut dx[first..], &seg[lo..hi]);
            } else {
                for (run, v) in dx[first..].chunks_mut(s).zip(&seg[lo..hi]) {
                    run[0] += *v;
                }
            }
        }
    });
}

/// `c = a b` on the calling thread, or on all of rayon's when `wide` (the same values).
fn product<T: Real>(
    c: &mut [T],
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    dims: (usize, usize, usize),
    accumulate: bool,
    wide: bool,
) {
    if wide {
        cpu_gemm::gemm(c, a, b, dims, accumulate);
    } else {
        cpu_gemm::gemm_serial(c, a, b, dims, accumulate);
    }
}

/// Lines `l0..l1` cut where an output frame (`ho` lines) ends: the runs `(la, lb)` whose
/// lines lie in one frame.
fn frame_runs((l0, l1): (usize, usize), ho: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut la = l0;
    std::iter::from_fn(move || {
        (la < l1).then(|| {
            let lb = ((la / ho + 1) * ho).min(l1);
            let run = (la, lb);
            la = lb;
            run
        })
    })
}

/// The transpose `[cols, rows]` of the row-major `a [rows, cols]`.
fn transposed<T: WithDType>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::zero(); rows * cols];
    for (i, row) in a.chunks_exact(cols).take(rows).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// A buffer of at least `n` entries (its contents are stale; callers overwrite them).
fn at_least<T: WithDType>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::zero());
    }
    &mut v[..n]
}

/// Slice of a contiguous CPU tensor.
fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("convolution: tensor is not on the CPU")
    };
    f(contiguous(cpu.as_slice::<T>()?, layout, "convolution")?)
}

/// The convolution of a geometry.
#[derive(Debug, Clone, Copy)]
struct Convolution {
    g: Geometry,
    /// A ReLU applied to the output in the same op.
    relu: bool,
    /// The output laid out `[B, C_out, Ho, Wo]` (a 2-D convolution: one input and one output
    /// frame) instead of `[B, To, C_out, Ho, Wo]`: the same values, so that a 2-D caller
    /// needs no reshape of input or output, each a graph node whose backward costs a
    /// zero-filled buffer and an addition over the whole tensor in candle.
    planar: bool,
}

impl Convolution {
    /// The output `[B*To, C_out, Ho*Wo]`: per block of output lines, the transposed columns
    /// ([`build_cols`]) and one product `kernel [C_out, K] x cols [K, n]`, written into the
    /// output frames with the bias and the ReLU. Tasks are ranges of output frames.
    fn fwd<T: Real>(&self, x: &[T], wk: &[T], bias: Option<&[T]>, co: usize) -> Vec<T> {
        let g = self.g;
        let [to_n, ho, wo] = g.out;
        let (how, k, relu, zero) = (ho * wo, g.cols(), self.relu, T::zero());
        let frames = g.b * to_n;
        let mut out = vec![zero; frames * co * how];
        if out.is_empty() {
            return out;
        }
        let (per_block, _) = blocking(&g);
        let per_task = frames.div_ceil(FORWARD_TASKS);
        // Too few tasks for the threads: the products take them instead.
        let wide = frames.div_ceil(per_task) < rayon::current_num_threads();
        out.par_chunks_mut(per_task * co * how)
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(cols, ys), (task, o)| {
                    let f0 = task * per_task;
                    let end = (f0 + o.len() / (co * how)) * ho;
                    for l0 in (f0 * ho..end).step_by(per_block) {
                        let l1 = (l0 + per_block).min(end);
                        let n = (l1 - l0) * wo;
                        let cols = at_least(cols, k * n);
                        build_cols(&g, x, (l0, l1), cols);
                        let ys = at_least(ys, co * n);
                        product(
                            ys,
                            Mat::rows(wk, k),
                            Mat::rows(cols, n),
                            (co, n, k),
                            false,
                            wide,
                        );
                        // The block's lines of each output frame are contiguous in both
                        // `ys` and the frame: one run per frame and channel.
                        for (la, lb) in frame_runs((l0, l1), ho) {
                            let (bt, oy) = (la / ho, la % ho);
                            let frame = &mut o[(bt - f0) * co * how..][..co * how];
                            let len = (lb - la) * wo;
                            for c in 0..co {
                                let b = bias.map_or(zero, |b| b[c]);
                                let src = &ys[c * n + (la - l0) * wo..][..len];
                                let dst = &mut frame[c * how + oy * wo..][..len];
                                // Two loops, so that neither tests `relu` per value.
                                if relu {
                                    for (d, &y) in dst.iter_mut().zip(src) {
                                        let y = y + b;
                                        *d = if y > zero { y } else { zero };
                                    }
                                } else {
                                    for (d, &y) in dst.iter_mut().zip(src) {
                                        *d = y + b;
                                    }
                                }
                            }
                        }
                    }
                },
            );
        out
    }

    /// The input and kernel gradients (each only when wanted) from the output gradient
    /// `dy [B*To, C_out, Ho*Wo]`, by the forward's blocks: per block the gradient's lines
    /// gathered to `[C_out, n]`, the kernel gradient accumulated transposed, `[K, C_out]`, as
    /// `cols x dy^T` (columns recomputed), the column gradients `kernel^T x dy` scattered
    /// into `dx` ([`scatter_cols`]). The work is split into groups of whole clips (whole
    /// frames when the kernel does not reach across frames), so that no two groups write the
    /// same input pixel; each group keeps its own partial kernel gradient, and the partials
    /// are summed in group order.
    ///
    /// Both products read their operands row by row: `dy x cols^T` (the kernel gradient
    /// untransposed) read the columns across their rows and ran 20-30 % slower than the
    /// forward's product of the same size (BENCHMARKS.md, "The kernel gradient transposed").
    fn bwd_cpu<T: Real>(
        &self,
        x: &[T],
        wk: &[T],
        dy: &[T],
        co: usize,
        (want_dx, want_dw): (bool, bool),
    ) -> (Vec<T>, Vec<T>) {
        let g = self.g;
        let [to_n, ho, wo] = g.out;
        let (how, k, zero) = (ho * wo, g.cols(), T::zero());
        let in_frame = g.c * g.h * g.w;
        // Without temporal taps, stride or padding, output frame `to` reads input frame `to`
        // only: frames are independent.
        let by_frame = g.k[0] == 1 && g.stride[0] == 1 && g.padding[0] == 0 && to_n == g.t;
        let (units, out_per_unit, in_per_unit) = if by_frame {
            (g.b * g.t, 1, 1)
        } else {
            (g.b, to_n, g.t)
        };
        let (per_block, max_groups) = blocking(&g);
        let groups = units
            .min(max_groups)
            .min((PARTIAL_FLOATS / (co * k).max(1)).max(1))
            .max(1);
        let per_group = units.div_ceil(groups).max(1);
        let groups = units.div_ceil(per_group);
        let wide = groups < rayon::current_num_threads();
        // The kernel transposed, `[K, C_out]`, for the column gradients' product.
        let wkt = if want_dx {
            transposed(wk, co, k)
        } else {
            Vec::new()
        };
        let mut dx = if want_dx {
            vec![zero; g.b * g.t * in_frame]
        } else {
            Vec::new()
        };
        let regions: Vec<Option<&mut [T]>> = if want_dx {
            dx.chunks_mut(per_group * in_per_unit * in_frame)
                .map(Some)
                .collect()
        } else {
            (0..groups).map(|_| None).collect()
        };
        let partials: Vec<Vec<T>> = regions
            .into_par_iter()
            .enumerate()
            .map(|(group, mut dxg)| {
                // This group's part of the kernel gradient, transposed: `[K, C_out]`.
                let mut dwt = if want_dw {
                    vec![zero; k * co]
                } else {
                    Vec::new()
                };
                let (mut cols, mut dys) = (Vec::new(), Vec::new());
                let u0 = group * per_group;
                let u1 = (u0 + per_group).min(units);
                let base = u0 * in_per_unit * in_frame;
                let end = u1 * out_per_unit * ho;
                for l0 in (u0 * out_per_unit * ho..end).step_by(per_block) {
                    let l1 = (l0 + per_block).min(end);
                    let n = (l1 - l0) * wo;
                    let dys = at_least(&mut dys, co * n);
                    for (la, lb) in frame_runs((l0, l1), ho) {
                        let (bt, oy) = (la / ho, la % ho);
                        let len = (lb - la) * wo;
                        for c in 0..co {
                            dys[c * n + (la - l0) * wo..][..len]
                                .copy_from_slice(&dy[(bt * co + c) * how + oy * wo..][..len]);
                        }
                    }
                    let cols = at_least(&mut cols, k * n);
                    if want_dw {
                        build_cols(&g, x, (l0, l1), cols);
                        product(
                            &mut dwt,
                            Mat::rows(cols, n),
                            Mat::t(dys, n),
                            (k, co, n),
                            true,
                            wide,
                        );
                    }
                    if let Some(dxg) = dxg.as_deref_mut() {
                        product(
                            cols,
                            Mat::rows(&wkt, co),
                            Mat::rows(dys, n),
                            (k, n, co),
                            false,
                            wide,
                        );
                        scatter_cols(&g, cols, (l0, l1), dxg, base);
                    }
                }
                dwt
            })
            .collect();
        let mut dw = Vec::new();
        if want_dw {
            let mut parts = partials.into_iter();
            let mut dwt = parts.next().unwrap_or_else(|| vec![zero; k * co]);
            for part in parts {
                for (a, b) in dwt.iter_mut().zip(&part) {
                    *a += *b;
                }
            }
            dw = transposed(&dwt, k, co);
        }
        (dx, dw)
    }

    fn check(&self, x: &Layout, wk: &Layout) -> candle_core::Result<usize> {
        let g = self.g;
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
        let [to, ho, wo] = self.g.out;
        if self.planar {
            Shape::from((self.g.b, co, ho, wo))
        } else {
            Shape::from((self.g.b, to, co, ho, wo))
        }
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
                CpuStorage::F32(self.fwd(contiguous(x, l1, WHAT)?, contiguous(w, l2, WHAT)?, b, co))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), b) => {
                let b = match b {
                    Some((CpuStorage::F64(b), l)) => Some(contiguous(b, l, WHAT)?),
                    Some(_) => candle_core::bail!("{WHAT}: bias dtype differs"),
                    None => None,
                };
                CpuStorage::F64(self.fwd(contiguous(x, l1, WHAT)?, contiguous(w, l2, WHAT)?, b, co))
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
        if self.relu {
            crate::fused::relu_grad(grad, res)
        } else {
            Ok(grad.clone())
        }
    }

    /// [`Self::bwd_cpu`] and the bias gradient (per-channel sums of `dy`) for element type `T`.
    fn grads_as<T: Real>(
        &self,
        x: &Tensor,
        wk: &Tensor,
        dy: &Tensor,
        want: (bool, bool, bool),
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let g = self.g;
        let co = wk.dim(0)?;
        let how = g.out[1] * g.out[2];
        let (want_dx, want_dw, want_db) = want;
        let dev = candle_core::Device::Cpu;
        with_slice::<T, _>(dy, |dys| {
            let db = if want_db {
                let sums: Vec<T> = (0..co)
                    .into_par_iter()
                    .map(|c| {
                        let mut s = T::zero();
                        for frame in dys.chunks_exact(co * how) {
                            for &v in &frame[c * how..][..how] {
                                s += v;
                            }
                        }
                        s
                    })
                    .collect();
                Some(Tensor::from_vec(sums, co, &dev)?)
            } else {
                None
            };
            if !(want_dx || want_dw) {
                return Ok([None, None, db]);
            }
            let (dx, dw) = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(wk, |ws| {
                    Ok(self.bwd_cpu(xs, ws, dys, co, (want_dx, want_dw)))
                })
            })?;
            let dx = if want_dx {
                Some(Tensor::from_vec(dx, x.shape(), &dev)?)
            } else {
                None
            };
            let dw = if want_dw {
                Some(Tensor::from_vec(dw, (co, g.cols()), &dev)?)
            } else {
                None
            };
            Ok([dx, dw, db])
        })
    }

    /// Gradients of `x`, the kernel and (with `bias`) the bias, each only when tracked.
    fn grads(
        &self,
        x: &Tensor,
        wk: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let want = (
            x.track_op(),
            wk.track_op(),
            bias.is_some_and(|b| b.track_op()),
        );
        let x = x.detach().contiguous()?;
        let wk = wk.detach().contiguous()?;
        let dy = grad.detach().contiguous()?;
        match dy.dtype() {
            DType::F32 => self.grads_as::<f32>(&x, &wk, &dy, want),
            DType::F64 => self.grads_as::<f64>(&x, &wk, &dy, want),
            other => candle_core::bail!("convolution: unsupported dtype {other:?}"),
        }
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

/// The input and kernel gradients of [`conv`] without a ReLU and without a bias, for
/// `x [B, T, C, H, W]`, the kernel in the columns' order `wk [C_out, K]` and the output's
/// gradient `dy`, whatever tracks a gradient: the backward of a block whose operations are
/// chained by hand (`models::blocks::resnet`). CPU, float32 or float64.
pub(crate) fn conv_grads(
    x: &Tensor,
    wk: &Tensor,
    dy: &Tensor,
    g: Geometry,
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = Convolution {
        g,
        relu: false,
        planar: false,
    };
    let (x, wk, dy) = (x.contiguous()?, wk.contiguous()?, dy.contiguous()?);
    let want = (true, true, false);
    let [dx, dw, _] = match dy.dtype() {
        DType::F32 => op.grads_as::<f32>(&x, &wk, &dy, want)?,
        DType::F64 => op.grads_as::<f64>(&x, &wk, &dy, want)?,
        other => candle_core::bail!("convolution: unsupported dtype {other:?}"),
    };
    match (dx, dw) {
        (Some(dx), Some(dw)) => Ok((dx, dw)),
        _ => candle_core::bail!("convolution: a wanted gradient is missing"),
    }
}

/// A convolution through the lowering: `x [B, T, C, H, W]`, `w [C_out, C, kt, kh, kw]`,
/// optional `bias [C_out]` -> `[B, To, C_out, Ho, Wo]` (the geometry's output), then a ReLU
/// when `relu` (in the same op: only the output is kept, and its backward masks by it).
/// A 2-D convolution (`T = To = 1`) may take `x [B, C, H, W]` and then returns `[B, C_out,
/// Ho, Wo]`. CPU, float32 or float64, any layouts.
pub fn conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: Geometry,
    relu: bool,
) -> crate::error::Result<Tensor> {
    let co = w.dim(0)?;
    let planar = x.rank() == 4;
    if planar && (g.t != 1 || g.out[0] != 1) {
        return Err(crate::error::Error::Config(format!(
            "convolution: a 4-D input {:?} needs one input and one output frame, not {} and {}",
            x.dims(),
            g.t,
            g.out[0]
        )));
    }
    // The kernel in the columns' order (a, p, q, c).
    let wk = w
        .permute((0, 2, 3, 4, 1))?
        .contiguous()?
        .reshape((co, g.cols()))?;
    let x = x.contiguous()?;
    let op = Convolution { g, relu, planar };
    Ok(match bias {
        Some(b) => x.apply_op3(&wk, &b.contiguous()?, op)?,
        None => x.apply_op2(&wk, op)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_four_dimensional_input_gives_a_four_dimensional_output_or_a_clear_error() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::ones((2, 3, 5, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones((6, 3, 1, 3, 3), DType::F32, &dev).unwrap();
        let g = Geometry {
            b: 2,
            t: 1,
            c: 3,
            h: 5,
            w: 4,
            k: [1, 3, 3],
            stride: [1, 1, 1],
            padding: [0, 1, 1],
            dilation: [1, 1, 1],
            out: [1, 5, 4],
        };
        let y = conv(&x, &w, None, g, false).unwrap();
        assert_eq!(y.dims(), [2, 6, 5, 4]);
        let y5 = conv(&x.unsqueeze(1).unwrap(), &w, None, g, false).unwrap();
        assert_eq!(y5.dims(), [2, 1, 6, 5, 4]);
        let same = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(same, y5.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // The centre pixel sees all 27 ones.
        assert_eq!(same[2 * 4 + 1], 27.0);
        let x3 = Tensor::ones((1, 3, 5, 4), DType::F32, &dev).unwrap();
        let g3 = Geometry {
            b: 1,
            t: 2,
            out: [2, 5, 4],
            ..g
        };
        let err = conv(&x3, &w, None, g3, false).unwrap_err().to_string();
        assert!(err.contains("one input and one output frame"), "{err}");
    }

    #[test]
    fn frame_runs_cut_the_lines_at_every_frame_end() {
        // Frames of 5 lines; blocks that start inside, end inside, span several frames.
        for (l0, l1) in [(0, 5), (3, 4), (3, 12), (5, 15), (7, 23), (0, 1)] {
            let runs: Vec<_> = frame_runs((l0, l1), 5).collect();
            let mut at = l0;
            for &(la, lb) in &runs {
                assert_eq!(la, at, "runs of {l0}..{l1}: {runs:?}");
                assert!(
                    la < lb && la / 5 == (lb - 1) / 5,
                    "run {la}..{lb} leaves its frame"
                );
                at = lb;
            }
            assert_eq!(at, l1, "runs of {l0}..{l1} stop early: {runs:?}");
            let frames = (l1 - 1) / 5 - l0 / 5 + 1;
            assert_eq!(runs.len(), frames, "one run per frame for {l0}..{l1}");
        }
        assert_eq!(frame_runs((4, 4), 5).count(), 0);
    }
}
