//! Seeded parameter initialisation.
//!
//! candle's CPU random number generator cannot be seeded, so every parameter a model creates
//! is overwritten here from a ChaCha RNG, in name order: weights of two or more dimensions
//! (linear, convolution) uniform in `±1/sqrt(fan_in)` (PyTorch's default), their biases
//! likewise; normalisation weights 1 (0 for a normalisation named `zero_bn`, which makes a
//! residual branch start as the identity: non-local blocks), biases and running means 0,
//! running variances 1.

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// Fan-in of a weight of shape `[out, in, k...]`.
fn fan_in(dims: &[usize]) -> usize {
    dims.iter().skip(1).product::<usize>().max(1)
}

/// Re-initialises every variable of `vm` deterministically from `seed`.
pub fn seeded_init(vm: &VarMap, seed: u64) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| crate::error::Error::Config("poisoned VarMap".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let sibling_weight = data
            .get(&format!("{prefix}.weight"))
            .map(|w| w.dims().to_vec());
        let values: Vec<f32> = match leaf {
            "running_mean" => vec![0.0; n],
            "running_var" => vec![1.0; n],
            "weight" if dims.len() == 1 && prefix.ends_with("zero_bn") => vec![0.0; n],
            "weight" if dims.len() == 1 => vec![1.0; n],
            "bias" => match sibling_weight {
                Some(w) if w.len() >= 2 => {
                    let b = 1.0 / (fan_in(&w) as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-b..=b)).collect()
                }
                _ => vec![0.0; n],
            },
            _ if dims.len() >= 2 => {
                let b = 1.0 / (fan_in(&dims) as f32).sqrt();
                (0..n).map(|_| rng.random_range(-b..=b)).collect()
            }
            _ => vec![0.0; n],
        };
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Sets the classifier `<prefix>.weight` to seeded normal values of standard deviation
/// `std` and `<prefix>.bias` to 0, the classifier initialisation of TSN, TSM (std 0.001) and
/// mmaction2's I3D head (std 0.01). Missing variables are an error naming them.
pub fn normal_classifier(vm: &VarMap, prefix: &str, std: f64, seed: u64) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| crate::error::Error::Config("poisoned VarMap".into()))?;
    let name = format!("{prefix}.weight");
    let w = data
        .get(&name)
        .ok_or_else(|| crate::error::Error::Config(format!("no classifier variable {name}")))?;
    let v = (seeded_randn(w.dims(), seed, DType::F32, w.device())? * std)?;
    w.set(&v.to_dtype(w.dtype())?)?;
    if let Some(b) = data.get(&format!("{prefix}.bias")) {
        b.set(&b.as_tensor().zeros_like()?)?;
    }
    Ok(())
}

/// A seeded `[shape]` tensor of standard normal values, for tests and synthetic inputs.
pub fn seeded_randn(
    shape: &[usize],
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    // Box-Muller.
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

/// Detached copies of `vm`'s current values by name (sharing their storage, tracking no
/// gradient): what a `VarBuilder::from_tensors` twin of a model is built on (ADA's ascent,
/// evaluation). The copies see later in-place updates of the variables.
pub fn detached(vm: &VarMap) -> Result<std::collections::HashMap<String, Tensor>> {
    detached_with(vm, false)
}

/// Whether the variable `name` is a BatchNorm running statistic (not trained by the
/// optimiser; moved by training-mode forward passes).
pub fn is_running_statistic(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// [`detached`], except that BatchNorm running statistics stay `vm`'s own variables: a twin
/// built on them updates the model's statistics in its training-mode forward passes, as
/// forward passes on the model itself do (the released code's ascent).
pub fn detached_sharing_statistics(
    vm: &VarMap,
) -> Result<std::collections::HashMap<String, Tensor>> {
    detached_with(vm, true)
}

fn detached_with(
    vm: &VarMap,
    share_statistics: bool,
) -> Result<std::collections::HashMap<String, Tensor>> {
    Ok(vm
        .data()
        .lock()
        .map_err(|_| crate::Error::Config("poisoned VarMap".into()))?
        .iter()
        .map(|(k, v)| {
            let t = if share_statistics && is_running_statistic(k) {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            };
            (k.clone(), t)
        })
        .collect())
}
