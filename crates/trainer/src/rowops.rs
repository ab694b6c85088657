//! Adding and multiplying a row vector (a bias, LayerNorm's gain and shift) with gradients
//! that cost what they should on the CPU.
//!
//! candle 0.11 differentiates `x.broadcast_add(b)` for `x [.., C]`, `b [C]` by summing the
//! gradient over every leading dimension with its generic strided reduction: 365 us for a
//! `[40, 5, 256]` gradient, against 4 us for the addition itself (BENCHMARKS.md, "Where the
//! APN step's time goes"). Every `Linear` and `LayerNorm` pays that in backward. Here the
//! same operations are custom operations whose backward sums columns in one contiguous pass.
//! CPU float32/float64 only; other devices and dtypes use candle's broadcast operations
//! (same values).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::error::Result;

fn fast_path(x: &Tensor, v: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == v.dtype()
        && v.rank() == 1
        && x.rank() >= 1
        && x.dims().last() == Some(&v.dims()[0])
}

/// `x + b` for `x [.., C]`, `b [C]`.
pub fn add_row(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fast_path(x, b) {
        return Ok(x.broadcast_add(b)?);
    }
    Ok(x.contiguous()?.apply_op2(&b.contiguous()?, RowOp::Add)?)
}

/// `x * g` for `x [.., C]`, `g [C]`.
pub fn mul_row(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if !fast_path(x, g) {
        return Ok(x.broadcast_mul(g)?);
    }
    Ok(x.contiguous()?.apply_op2(&g.contiguous()?, RowOp::Mul)?)
}

#[derive(Debug, Clone, Copy)]
enum RowOp {
    Add,
    Mul,
}

/// Large inputs are split over threads; a `[200, 256]` activation is not.
const PAR_MIN: usize = 1 << 18;

fn row_map<T: candle_core::WithDType>(x: &[T], v: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let c = v.len();
    let mut out = vec![T::zero(); x.len()];
    let run = |(o, xs): (&mut [T], &[T])| {
        for ((o, &a), &b) in o.iter_mut().zip(xs).zip(v) {
            *o = f(a, b);
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(run);
    } else {
        out.chunks_mut(c).zip(x.chunks(c)).for_each(run);
    }
    out
}

/// Applies `f` to a float32 or float64 storage's contiguous values (`$name` in errors).
macro_rules! float_map {
    ($s:expr, $l:expr, $name:expr, |$x:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $x = slice(v, $l)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(v) => {
                let $x = slice(v, $l)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: float32 or float64 only", $name),
        }
    };
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("row op: input must be contiguous"),
    }
}

impl CustomOp2 for RowOp {
    fn name(&self) -> &'static str {
        match self {
            RowOp::Add => "vdg-add-row",
            RowOp::Mul => "vdg-mul-row",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(v)) => {
                let (x, v) = (slice(x, l1)?, slice(v, l2)?);
                CpuStorage::F32(match self {
                    RowOp::Add => row_map(x, v, |a, b| a + b),
                    RowOp::Mul => row_map(x, v, |a, b| a * b),
                })
            }
            (CpuStorage::F64(x), CpuStorage::F64(v)) => {
                let (x, v) = (slice(x, l1)?, slice(v, l2)?);
                CpuStorage::F64(match self {
                    RowOp::Add => row_map(x, v, |a, b| a + b),
                    RowOp::Mul => row_map(x, v, |a, b| a * b),
                })
            }
            _ => candle_core::bail!("{}: float32 or float64 only", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        match self {
            // d(x + b): the gradient itself, and its column sums.
            RowOp::Add => {
                let gb = grad.apply_op1_no_bwd(&ColSum)?;
                Ok((Some(grad), Some(gb)))
            }
            // d(x * g): the gradient times g, and the column sums of gradient times x.
            RowOp::Mul => {
                let gx = grad.apply_op2_no_bwd(v, &RowOp::Mul)?;
                let gg = grad.mul(x)?.apply_op1_no_bwd(&ColSum)?;
                Ok((Some(gx), Some(gg)))
            }
        }
    }
}

/// LayerNorm's normalisation over the last dimension as the APN code writes it:
/// `(x - mean) / sqrt(var + eps)` with the unbiased variance (`n - 1`), one pass forward and
/// one backward (the composed version's backward costs about 1 ms on `[40, 5, 256]`, mostly
/// strided operations on the broadcast standard deviation).
pub fn normalize_last(x: &Tensor, eps: f64) -> Result<Tensor> {
    let n = *x.dims().last().unwrap_or(&1);
    if !(x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)) || n < 2 {
        use candle_core::D;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / (n.max(2) - 1) as f64)?;
        return Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?);
    }
    Ok(x.contiguous()?.apply_op1(Normalize { eps })?)
}

#[derive(Debug, Clone, Copy)]
struct Normalize {
    eps: f64,
}

/// Per row: its mean and `s = 1 / sqrt(var + eps)` (float64 accumulators).
#[inline]
fn moments<T: candle_core::WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len();
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
    let var = row
        .iter()
        .map(|v| {
            let c = v.to_f64() - mean;
            c * c
        })
        .sum::<f64>()
        / (n - 1) as f64;
    (mean, 1.0 / (var + eps).sqrt())
}

fn normalize<T: candle_core::WithDType>(x: &[T], n: usize, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    for (o, row) in out.chunks_mut(n).zip(x.chunks(n)) {
        let (mean, s) = moments(row, eps);
        for (o, v) in o.iter_mut().zip(row) {
            *o = T::from_f64((v.to_f64() - mean) * s);
        }
    }
    out
}

/// `dx = s (g - mean(g)) - s^3 xc sum(g xc) / (n - 1)`, row by row.
fn normalize_grad<T: candle_core::WithDType>(x: &[T], g: &[T], n: usize, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    for ((o, row), grow) in out.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
        let (mean, s) = moments(row, eps);
        let (mut gsum, mut dot) = (0.0, 0.0);
        for (g, v) in grow.iter().zip(row) {
            let g = g.to_f64();
            gsum += g;
            dot += g * (v.to_f64() - mean);
        }
        let gm = gsum / n as f64;
        let k = s * s * s * dot / (n - 1) as f64;
        for ((o, g), v) in o.iter_mut().zip(grow).zip(row) {
            *o = T::from_f64(s * (g.to_f64() - gm) - k * (v.to_f64() - mean));
        }
    }
    out
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "vdg-normalize-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l.shape().dims().last().unwrap_or(&1);
        let out = float_map!(s, l, self.name(), |x| normalize(x, n, self.eps));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &NormalizeGrad(*self))?))
    }
}

struct NormalizeGrad(Normalize);

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "vdg-normalize-last-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l1.shape().dims().last().unwrap_or(&1);
        let eps = self.0.eps;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(normalize_grad(slice(x, l1)?, slice(g, l2)?, n, eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(normalize_grad(slice(x, l1)?, slice(g, l2)?, n, eps))
            }
            _ => candle_core::bail!("vdg-normalize-last-grad: float32 or float64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Column sums of `[.., C]`: `[C]`.
struct ColSum;

fn col_sum<T: candle_core::WithDType>(x: &[T], c: usize) -> Vec<T> {
    let mut acc = vec![T::zero(); c];
    for row in x.chunks(c) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
    acc
}

impl CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "vdg-col-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = *l.shape().dims().last().unwrap_or(&1);
        let out = float_map!(s, l, self.name(), |x| col_sum(x, c));
        Ok((out, Shape::from(c)))
    }
}

/// A fully connected layer, `y = x W^T + b`: candle_nn's `Linear` (same parameters, names
/// and initialisation) with the bias added by [`add_row`].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `Linear(in, out)` with a bias, parameters `weight` and `bias` under `vb`, initialised as
/// `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear {
        weight: l.weight().clone(),
        bias: l.bias().cloned(),
    })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / k.max(1);
        let y = x
            .contiguous()?
            .reshape((rows, k))?
            .matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => add_row(&y, b).map_err(candle_core::Error::wrap)?,
            None => y,
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::init::seeded_randn;

    /// Both ops and `Linear` against candle's broadcast versions: the same values and the
    /// same gradients for every input.
    #[test]
    fn row_ops_match_broadcasting_with_their_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&seeded_randn(&[3, 4, 5], 1, DType::F64, &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&seeded_randn(&[5], 2, DType::F64, &dev).unwrap()).unwrap();
        let w = seeded_randn(&[3, 4, 5], 3, DType::F64, &dev).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>();
            assert!(d.unwrap() < 1e-12);
        };
        for op in [RowOp::Add, RowOp::Mul] {
            let (ours, theirs) = match op {
                RowOp::Add => (
                    add_row(x.as_tensor(), v.as_tensor()).unwrap(),
                    x.as_tensor().broadcast_add(v.as_tensor()).unwrap(),
                ),
                RowOp::Mul => (
                    mul_row(x.as_tensor(), v.as_tensor()).unwrap(),
                    x.as_tensor().broadcast_mul(v.as_tensor()).unwrap(),
                ),
            };
            close(&ours, &theirs);
            let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for t in [x.as_tensor(), v.as_tensor()] {
                close(g1.get(t).unwrap(), g2.get(t).unwrap());
            }
        }
        // The normalisation against its composed definition, values and input gradient.
        let composed = {
            use candle_core::D;
            let t = x.as_tensor();
            let xc = t
                .broadcast_sub(&t.mean_keepdim(D::Minus1).unwrap())
                .unwrap();
            let var = (xc.sqr().unwrap().sum_keepdim(D::Minus1).unwrap() / 4.0).unwrap();
            xc.broadcast_div(&(var + 1e-8).unwrap().sqrt().unwrap())
                .unwrap()
        };
        let ours = normalize_last(x.as_tensor(), 1e-8).unwrap();
        close(&ours, &composed);
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        // Linear on a 3-D input against candle_nn's.
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let ours = linear(5, 7, vb.pp("l")).unwrap();
        let theirs = candle_nn::Linear::new(ours.weight().clone(), ours.bias().cloned());
        let a = ours.forward(x.as_tensor()).unwrap();
        let b = theirs.forward(x.as_tensor()).unwrap();
        assert_eq!(a.dims(), &[3, 4, 7]);
        close(&a, &b);
        let g1 = a.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = b.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for t in [x.as_tensor(), ours.weight(), ours.bias().unwrap()] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap());
        }
    }
}
