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

/// Applies `f` to a float32 or float64 storage's contiguous values (`$name` in errors): the
/// dtype dispatch of a custom op's `cpu_fwd` on one input.
macro_rules! float_map {
    ($s:expr, $l:expr, $name:expr, |$x:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(v) => {
                let $x = $crate::im2col::contiguous(v, $l, $name)?;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::CpuStorage::F64(v) => {
                let $x = $crate::im2col::contiguous(v, $l, $name)?;
                candle_core::CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: float32 or float64 only", $name),
        }
    };
}
pub(crate) use float_map;

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::im2col::contiguous(v, l, "row op")
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

/// `sum f(a[i], b[i])` (equal lengths) in eight interleaved partial sums added in a fixed
/// order: the same value for every thread count, and a loop the compiler vectorises, where
/// one running sum is a chain of dependent additions (an addition's latency per value).
#[inline(always)]
fn sum8<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + rest
}

/// Per row: its mean and `s = 1 / sqrt(var + eps)` (float64 accumulators).
#[inline]
fn moments<T: candle_core::WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len();
    let mean = sum8(row, row, |v, _| v.to_f64()) / n as f64;
    let var = sum8(row, row, |v, _| {
        let c = v.to_f64() - mean;
        c * c
    }) / (n - 1) as f64;
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
        let gsum = sum8(grow, grow, |g, _| g.to_f64());
        let dot = sum8(grow, row, |g, v| g.to_f64() * (v.to_f64() - mean));
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

/// LayerNorm as one operation: [`normalize_last`] of `x [.., C]`, times `gamma [C]`, plus
/// `beta [C]`; its backward is one pass for all three gradients (three ops and three
/// activation-sized intermediates before).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if !(fast_path(x, gamma) && fast_path(x, beta))
        || gamma.dims() != beta.dims()
        || x.dims().last() < Some(&2)
    {
        let y = normalize_last(x, eps)?;
        return add_row(&mul_row(&y, gamma)?, beta);
    }
    Ok(x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        AffineNormalize { eps },
    )?)
}

#[derive(Debug, Clone, Copy)]
struct AffineNormalize {
    eps: f64,
}

pub(crate) fn affine_normalize<T: candle_core::WithDType>(
    x: &[T],
    g: &[T],
    b: &[T],
    eps: f64,
) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::zero(); x.len()];
    for (o, row) in out.chunks_mut(n).zip(x.chunks(n)) {
        let (mean, s) = moments(row, eps);
        for (((o, v), g), b) in o.iter_mut().zip(row).zip(g).zip(b) {
            *o = T::from_f64((v.to_f64() - mean) * s * g.to_f64() + b.to_f64());
        }
    }
    out
}

/// `(dx, dgamma, dbeta)` of [`affine_normalize`] for the output gradient `d`.
pub(crate) fn affine_normalize_grad<T: candle_core::WithDType>(
    x: &[T],
    g: &[T],
    d: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = g.len();
    let mut dx = vec![T::zero(); x.len()];
    let (mut dg, mut db) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut gy = vec![0.0f64; n];
    for ((o, row), drow) in dx.chunks_mut(n).zip(x.chunks(n)).zip(d.chunks(n)) {
        let (mean, s) = moments(row, eps);
        for ((((dg, db), gy), (dv, v)), g) in dg
            .iter_mut()
            .zip(&mut db)
            .zip(&mut gy)
            .zip(drow.iter().zip(row))
            .zip(g)
        {
            let (dv, xc) = (dv.to_f64(), v.to_f64() - mean);
            *dg += dv * xc * s;
            *db += dv;
            *gy = dv * g.to_f64();
        }
        let gsum = sum8(&gy, &gy, |a, _| a);
        let dot = sum8(&gy, row, |a, v| a * (v.to_f64() - mean));
        let gm = gsum / n as f64;
        let k = s * s * s * dot / (n - 1) as f64;
        for ((o, gy), v) in o.iter_mut().zip(&gy).zip(row) {
            *o = T::from_f64(s * (gy - gm) - k * (v.to_f64() - mean));
        }
    }
    let back = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
    (dx, back(dg), back(db))
}
impl candle_core::CustomOp3 for AffineNormalize {
    fn name(&self) -> &'static str {
        "vdg-layer-norm"
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
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => CpuStorage::F32(
                affine_normalize(slice(x, l1)?, slice(g, l2)?, slice(b, l3)?, self.eps),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => CpuStorage::F64(
                affine_normalize(slice(x, l1)?, slice(g, l2)?, slice(b, l3)?, self.eps),
            ),
            _ => candle_core::bail!("{}: float32 or float64 only", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let dev = x.device().clone();
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (
            candle_core::Storage::Cpu(xs),
            candle_core::Storage::Cpu(gs),
            candle_core::Storage::Cpu(ds),
        ) = (&*xs, &*gs, &*ds)
        else {
            candle_core::bail!("layer norm: tensors left the CPU")
        };
        fn run<T: candle_core::WithDType>(
            eps: f64,
            (x, xl): (&[T], &Layout),
            (g, gl): (&[T], &Layout),
            d: &[T],
            dev: &candle_core::Device,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dx, dg, db) = affine_normalize_grad(x, g, d, eps);
            Ok((
                Some(Tensor::from_vec(dx, xl.shape(), dev)?),
                Some(Tensor::from_vec(dg, gl.shape(), dev)?),
                Some(Tensor::from_vec(db, gl.shape(), dev)?),
            ))
        }
        match (xs, gs, ds) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(d)) => run(
                self.eps,
                (slice(x, xl)?, xl),
                (slice(g, gl)?, gl),
                slice(d, dl)?,
                &dev,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(d)) => run(
                self.eps,
                (slice(x, xl)?, xl),
                (slice(g, gl)?, gl),
                slice(d, dl)?,
                &dev,
            ),
            _ => candle_core::bail!("layer norm: float32 or float64 only"),
        }
    }
}

/// Column sums of `[.., C]`: `[C]`.
struct ColSum;

pub(crate) fn col_sum<T: candle_core::WithDType>(x: &[T], c: usize) -> Vec<T> {
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

impl Linear {
    /// `relu(x W^T + b)`.
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / k.max(1);
        let x2 = x.contiguous()?.reshape((rows, k))?;
        let y = match &self.bias {
            Some(b)
                if x2.device().is_cpu()
                    && matches!(x2.dtype(), DType::F32 | DType::F64)
                    && self.weight.dtype() == x2.dtype()
                    && b.dtype() == x2.dtype()
                    && b.dims() == [self.weight.dim(0)?] =>
            {
                x2.apply_op3(&self.weight, b, LinearOp { relu })?
            }
            _ => {
                let y = x2.matmul(&self.weight.t()?)?;
                let y = match &self.bias {
                    Some(b) => add_row(&y, b).map_err(candle_core::Error::wrap)?,
                    None => y,
                };
                if relu { y.relu()? } else { y }
            }
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
}

/// `x [R, K] W^T [K, N] + b [N]` (then a ReLU when `relu`) as one graph node on the CPU: the
/// product through candle's CPU matrix multiplication, the bias (and ReLU) in the same pass
/// over the output; backward gives `dW = g^T x` in `W`'s own `[N, K]` layout and `db` as
/// column sums. Composed from candle's operations the same layer was four nodes (transpose,
/// product, bias, ReLU), each gradient zero-filled and added, the weight's through a strided
/// transpose, and candle's ReLU gradient (a comparison, a conversion and a product) cost
/// more than the layer's forward on `[200, 1024]`.
#[derive(Debug, Clone, Copy)]
struct LinearOp {
    relu: bool,
}

pub(crate) fn bias_relu<T: candle_core::WithDType>(y: &mut [T], b: &[T], relu: bool) {
    for row in y.chunks_mut(b.len()) {
        for (v, &c) in row.iter_mut().zip(b) {
            let s = *v + c;
            *v = if relu && s <= T::zero() { T::zero() } else { s };
        }
    }
}

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "vdg-linear"
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
        use candle_core::backend::BackendStorage;
        let (rows, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || l3.dims() != [n] {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let y = s1.matmul(s2, (1, rows, n, k), l1, &l2.transpose(0, 1)?)?;
        let y = match (y, s3) {
            (CpuStorage::F32(mut y), CpuStorage::F32(b)) => {
                bias_relu(&mut y, slice(b, l3)?, self.relu);
                CpuStorage::F32(y)
            }
            (CpuStorage::F64(mut y), CpuStorage::F64(b)) => {
                bias_relu(&mut y, slice(b, l3)?, self.relu);
                CpuStorage::F64(y)
            }
            _ => candle_core::bail!("linear: float32 or float64 only"),
        };
        Ok((y, Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu {
            crate::fused::relu_grad(grad, res)?
        } else {
            grad.detach()
        }
        .contiguous()?;
        // Only the gradients someone needs: the first layer on cached features needs no
        // input gradient, and ADA's ascent on a detached twin of the weights needs only that.
        let dx = x.track_op().then(|| g.matmul(&w.detach())).transpose()?;
        let dw = w
            .track_op()
            .then(|| g.t()?.matmul(&x.detach()))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| g.apply_op1_no_bwd(&ColSum))
            .transpose()?;
        Ok((dx, dw, db))
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
        // The fused LayerNorm against the three row ops, values and all three gradients.
        let b = Var::from_tensor(&seeded_randn(&[5], 4, DType::F64, &dev).unwrap()).unwrap();
        let composed = add_row(
            &mul_row(&normalize_last(x.as_tensor(), 1e-8).unwrap(), v.as_tensor()).unwrap(),
            b.as_tensor(),
        )
        .unwrap();
        let ours = layer_norm(x.as_tensor(), v.as_tensor(), b.as_tensor(), 1e-8).unwrap();
        close(&ours, &composed);
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), v.as_tensor(), b.as_tensor()] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap());
        }
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
        // Parameters that track no gradient get none (ADA's ascent on a detached twin).
        let twin = Linear {
            weight: ours.weight().detach(),
            bias: ours.bias().map(Tensor::detach),
        };
        let g = twin
            .forward(x.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(
            g.get(x.as_tensor()).unwrap(),
            g1.get(x.as_tensor()).unwrap(),
        );
        assert!(g.get(&twin.weight).is_none() && g.get(twin.bias.as_ref().unwrap()).is_none());
        // With the ReLU in the same op (about half the outputs are clamped here).
        let a = ours.forward_relu(x.as_tensor()).unwrap();
        let b = theirs.forward(x.as_tensor()).unwrap().relu().unwrap();
        close(&a, &b);
        let zeros = a
            .eq(0.0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .mean_all()
            .unwrap();
        let zeros = zeros.to_scalar::<f64>().unwrap();
        assert!(
            (0.2..0.8).contains(&zeros),
            "{zeros} of the outputs clamped"
        );
        let g1 = (&a * &w.narrow(2, 0, 5).unwrap().pad_with_zeros(2, 0, 2).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&b * &w.narrow(2, 0, 5).unwrap().pad_with_zeros(2, 0, 2).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), ours.weight(), ours.bias().unwrap()] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap());
        }
    }
}
