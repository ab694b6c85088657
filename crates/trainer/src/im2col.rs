//! im2col and col2im on the CPU as candle custom operations: the lowering that turns a 2-D
//! convolution into one matrix product per image.
//!
//! `im2col(x [N, C, H, W]) -> cols [N, Ho*Wo, C*kh*kw]` (pixel-major, so that a whole batch
//! is one GEMM `[N*Ho*Wo, K] x [K, C_out]`) with
//! `cols[n, oy*Wo + ox, (c*kh + p)*kw + q] = x[n, c, oy*s + p*d - pad, ox*s + q*d - pad]`
//! (zero outside the image); its gradient is `col2im`, the adjoint scatter-add. Written as
//! plain loops over contiguous memory, parallel over images: candle's own CPU `conv2d`
//! reached about a fifth of its GEMM on ResNet layers and its gradient is slower still
//! (BENCHMARKS.md). CPU only; other devices keep candle's `conv2d` (see `nn3d::conv2d`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Geometry of one lowering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Channels.
    pub c: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub padding: usize,
    /// Dilation (both axes).
    pub dilation: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

impl Geometry {
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Calls `f(col_index, image_index)` for every entry of one image's columns that reads
    /// the image; columns are pixel-major (`[Ho*Wo, C*kh*kw]`), written in order.
    #[inline]
    fn each(&self, mut f: impl FnMut(usize, usize)) {
        let (s, d, pad, k) = (self.stride, self.dilation, self.padding, self.rows());
        for oy in 0..self.ho {
            for ox in 0..self.wo {
                let pixel = (oy * self.wo + ox) * k;
                for p in 0..self.kh {
                    let iy = (oy * s + p * d) as isize - pad as isize;
                    if iy < 0 || iy >= self.h as isize {
                        continue;
                    }
                    for q in 0..self.kw {
                        let ix = (ox * s + q * d) as isize - pad as isize;
                        if ix < 0 || ix >= self.w as isize {
                            continue;
                        }
                        let at = iy as usize * self.w + ix as usize;
                        for c in 0..self.c {
                            f(
                                pixel + (c * self.kh + p) * self.kw + q,
                                c * self.h * self.w + at,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The lowering `x [N, C, H, W] -> [N, Ho*Wo, C*kh*kw]`.
#[derive(Debug, Clone, Copy)]
pub struct Im2Col(pub Geometry);

impl Im2Col {
    fn run<T: WithDType>(&self, x: &[T], n: usize) -> Vec<T> {
        let g = self.0;
        let (img, col) = (g.c * g.h * g.w, g.rows() * g.ho * g.wo);
        let mut out = vec![T::zero(); n * col];
        out.par_chunks_mut(col)
            .zip(x.par_chunks(img))
            .for_each(|(o, xi)| g.each(|ci, ii| o[ci] = xi[ii]));
        out
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "vdg-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.dims()[0];
        let shape = Shape::from((n, self.0.ho * self.0.wo, self.0.rows()));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(contiguous(v, l, "im2col")?, n)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(contiguous(v, l, "im2col")?, n)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

/// The adjoint `cols [N, Ho*Wo, C*kh*kw] -> [N, C, H, W]` (sums overlapping windows).
#[derive(Debug, Clone, Copy)]
pub struct Col2Im(pub Geometry);

impl Col2Im {
    fn run<T: WithDType>(&self, cols: &[T], n: usize) -> Vec<T> {
        let g = self.0;
        let (img, col) = (g.c * g.h * g.w, g.rows() * g.ho * g.wo);
        let mut out = vec![T::zero(); n * img];
        out.par_chunks_mut(img)
            .zip(cols.par_chunks(col))
            .for_each(|(o, ci)| g.each(|c, i| o[i] += ci[c]));
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "vdg-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.dims()[0];
        let shape = Shape::from((n, self.0.c, self.0.h, self.0.w));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(contiguous(v, l, "col2im")?, n)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(contiguous(v, l, "col2im")?, n)),
            other => candle_core::bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }
}
