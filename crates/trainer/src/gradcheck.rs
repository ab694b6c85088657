//! Finite-difference gradient checks (tests only): candle's fused kernels silently drop
//! gradients, so every differentiable piece is checked against central differences in f64.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::init::seeded_randn;

/// Checks d f / d x at `probes` entries of a seeded random `x` of `shape`; `f` maps the input
/// to a scalar. Returns the largest relative error.
pub fn check_input_gradient(
    shape: &[usize],
    seed: u64,
    probes: usize,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<f64> {
    let dev = Device::Cpu;
    let x0 = seeded_randn(shape, seed, DType::F64, &dev)?;
    let x = Var::from_tensor(&x0)?;
    let y = f(x.as_tensor())?;
    let grads = y.backward()?;
    let g = grads
        .get(x.as_tensor())
        .ok_or_else(|| crate::Error::Config("no gradient reached the input".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x0.flatten_all()?.to_vec1::<f64>()?;
    let n = base.len();
    let eps = 1e-6;
    let mut worst = 0.0f64;
    for k in 0..probes {
        let i = (k * 7919 + 13) % n;
        let eval = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, shape, &dev)?;
            Ok(f(&t)?.to_scalar::<f64>()?)
        };
        let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-3));
        worst = worst.max(err);
    }
    Ok(worst)
}

/// A fixed random projection to a scalar, so every output entry contributes.
pub fn project(y: &Tensor, seed: u64) -> Result<Tensor> {
    let w = seeded_randn(y.dims(), seed, DType::F64, y.device())?;
    Ok((y.to_dtype(DType::F64)? * w)?.sum_all()?)
}
