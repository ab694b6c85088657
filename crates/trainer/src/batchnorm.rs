//! BatchNorm as one candle custom operation with a closed-form backward, on the CPU.
//!
//! candle-nn's `BatchNorm` is built from broadcast operations: in training a transposed copy,
//! the centred input, its square, the normalised input, the scaled and the shifted one, six
//! tensors the size of the activation that autograd keeps until backward ends (candle keeps
//! every node of the graph alive for the whole backward pass). On a ResNet that made a
//! training step need several times PyTorch's memory (BENCHMARKS.md, "Training memory"). Here
//! the normalisation is one node that keeps only its input: the statistics are computed
//! first (one read pass, no graph), and the backward pass recomputes the normalised input
//! from them:
//!
//! `dbeta = sum dy`, `dgamma = sum dy * xhat`,
//! `dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma)` (batch statistics, `M` values
//! per channel), or `dx = dy * gamma * invstd` on running statistics.
//!
//! Running statistics are updated like candle-nn's (and PyTorch's): momentum-weighted, the
//! variance unbiased. Other devices and dtypes use candle-nn's `BatchNorm`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var, WithDType};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use crate::error::Result;

/// Per-channel statistics of `x [N, C, S]` (contiguous): means and biased variances.
fn channel_stats<T: WithDType>(x: &[T], n: usize, c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let (mut sum, mut sq) = (0.0f64, 0.0f64);
            for ni in 0..n {
                for v in &x[(ni * c + ci) * s..][..s] {
                    let v = v.to_f64();
                    sum += v;
                    sq += v * v;
                }
            }
            let m = (n * s) as f64;
            let mean = sum / m;
            (mean, (sq / m - mean * mean).max(0.0))
        })
        .unzip()
}

/// The normalisation with fixed per-channel `mean` and `invstd` (batch or running statistics),
/// then `gamma`, `beta`.
#[derive(Debug, Clone)]
struct Normalize {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    /// Whether `mean`/`invstd` are the batch's own (their gradient then flows back into `x`).
    batch_stats: bool,
    /// A ReLU after the normalisation, in the same op (one node, one kept tensor fewer).
    relu: bool,
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("batch norm: input must be contiguous"),
    }
}

/// The output gradient through the fused ReLU of one channel, as candle's `relu` passes it:
/// where the normalised value `x * scale + shift` is >= 0.
#[derive(Debug, Clone, Copy)]
struct Gate {
    relu: bool,
    scale: f64,
    shift: f64,
}

impl Gate {
    #[inline]
    fn pass<T: WithDType>(self, d: T, x: T) -> f64 {
        if !self.relu {
            return d.to_f64();
        }
        let y = T::from_f64(x.to_f64() * self.scale + self.shift);
        if y >= T::zero() { d.to_f64() } else { 0.0 }
    }
}

/// The fused ReLU: `y` below zero becomes zero (`-0.0` and NaN pass as they are).
#[inline]
fn relu<T: WithDType>(y: T) -> T {
    if y < T::zero() { T::zero() } else { y }
}

impl Normalize {
    /// The channel `ci`'s normalisation `x * scale + shift` and the fused ReLU's gate on it,
    /// its constants taken once for the channel's values.
    fn gate<T: WithDType>(&self, g: &[T], b: &[T], ci: usize) -> Gate {
        let scale = self.invstd[ci] * g[ci].to_f64();
        Gate {
            relu: self.relu,
            scale,
            shift: b[ci].to_f64() - self.mean[ci] * scale,
        }
    }

    fn dims(l: &Layout) -> (usize, usize, usize) {
        let d = l.dims();
        (d[0], d[1], d[2..].iter().product())
    }

    fn fwd<T: WithDType>(
        &self,
        x: &[T],
        g: &[T],
        b: &[T],
        (n, c, s): (usize, usize, usize),
    ) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(i, (o, xi))| {
                let Gate { scale, shift, .. } = self.gate(g, b, i % c);
                // Two loops, so that neither tests `relu` per value.
                if self.relu {
                    for (o, v) in o.iter_mut().zip(xi) {
                        *o = relu(T::from_f64(v.to_f64() * scale + shift));
                    }
                } else {
                    for (o, v) in o.iter_mut().zip(xi) {
                        *o = T::from_f64(v.to_f64() * scale + shift);
                    }
                }
            });
        let _ = n;
        out
    }

    /// `(dx, dgamma, dbeta)` as vectors.
    fn bwd<T: WithDType>(
        &self,
        x: &[T],
        g: &[T],
        b: &[T],
        dy: &[T],
        (n, c, s): (usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        // Per channel: sum dy and sum dy * xhat.
        let (dbeta, dgamma): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ci| {
                let (mean, invstd) = (self.mean[ci], self.invstd[ci]);
                let gate = self.gate(g, b, ci);
                let (mut sb, mut sg) = (0.0f64, 0.0f64);
                for ni in 0..n {
                    let at = (ni * c + ci) * s;
                    for (d, v) in dy[at..at + s].iter().zip(&x[at..at + s]) {
                        let d = gate.pass(*d, *v);
                        sb += d;
                        sg += d * (v.to_f64() - mean) * invstd;
                    }
                }
                (sb, sg)
            })
            .unzip();
        let m = (n * s) as f64;
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(s)
            .zip(dy.par_chunks(s).zip(x.par_chunks(s)))
            .enumerate()
            .for_each(|(i, (o, (dyi, xi)))| {
                let ci = i % c;
                let (mean, invstd) = (self.mean[ci], self.invstd[ci]);
                let k = g[ci].to_f64() * invstd;
                let gate = self.gate(g, b, ci);
                if self.batch_stats {
                    let (db, dg) = (dbeta[ci] / m, dgamma[ci] / m);
                    for (o, (d, v)) in o.iter_mut().zip(dyi.iter().zip(xi)) {
                        let xhat = (v.to_f64() - mean) * invstd;
                        let d = gate.pass(*d, *v);
                        *o = T::from_f64(k * (d - db - xhat * dg));
                    }
                } else {
                    for (o, (d, v)) in o.iter_mut().zip(dyi.iter().zip(xi)) {
                        *o = T::from_f64(k * gate.pass(*d, *v));
                    }
                }
            });
        let to = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        (dx, to(dgamma), to(dbeta))
    }
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "vdg-batch-norm"
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
        let dims = Self::dims(l1);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.fwd(
                slice::<f32>(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                dims,
            )),
            DType::F64 => CpuStorage::F64(self.fwd(
                slice::<f64>(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                dims,
            )),
            other => candle_core::bail!("batch norm: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let (dims, shape, dev) = (
            Self::dims(x.layout()),
            x.shape().clone(),
            x.device().clone(),
        );
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (
            candle_core::Storage::Cpu(xs),
            candle_core::Storage::Cpu(gs),
            candle_core::Storage::Cpu(bs),
            candle_core::Storage::Cpu(ds),
        ) = (&*xs, &*gs, &*bs, &*ds)
        else {
            candle_core::bail!("batch norm: tensors left the CPU")
        };
        // The three gradients as tensors, for one float type.
        fn run<T: WithDType>(
            op: &Normalize,
            [x, g, b, d]: [(&CpuStorage, &Layout); 4],
            dims: (usize, usize, usize),
            shape: Shape,
            dev: &candle_core::Device,
        ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
            let c = dims.1;
            let (dx, dg, db) = op.bwd::<T>(
                slice(x.0, x.1)?,
                slice(g.0, g.1)?,
                slice(b.0, b.1)?,
                slice(d.0, d.1)?,
                dims,
            );
            Ok((
                Tensor::from_vec(dx, shape, dev)?,
                Tensor::from_vec(dg, c, dev)?,
                Tensor::from_vec(db, c, dev)?,
            ))
        }
        let args = [(xs, xl), (gs, gl), (bs, bl), (ds, dl)];
        let (dx, dg, db) = match x.dtype() {
            DType::F32 => run::<f32>(self, args, dims, shape, &dev)?,
            DType::F64 => run::<f64>(self, args, dims, shape, &dev)?,
            other => candle_core::bail!("batch norm: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// `bn` applied to `x [N, C, ...]`: batch statistics (and a running-statistics update) when
/// `train`, running statistics otherwise; same function as candle-nn's `forward_t`.
pub fn forward(bn: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    normalize(bn, x, train, false)
}

/// [`forward`] followed by a ReLU, as one op on the CPU (the same values and gradients as
/// `forward(..)?.relu()`, one activation-sized tensor fewer kept for backward).
pub fn forward_relu(bn: &BatchNorm, x: &Tensor, train: bool) -> Result<Tensor> {
    normalize(bn, x, train, true)
}

fn normalize(bn: &BatchNorm, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
    let fused =
        x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2;
    let Some((gamma, beta)) = bn.weight_and_bias().filter(|_| fused) else {
        let y = candle_core::ModuleT::forward_t(bn, x, train)?;
        return Ok(if relu { y.relu()? } else { y });
    };
    let x = x.contiguous()?;
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let s: usize = x.dims()[2..].iter().product();
    let op = if train {
        let (mean, var) = {
            let (st, l) = x.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*st else {
                unreachable!("checked above: a CPU tensor")
            };
            match x.dtype() {
                DType::F32 => channel_stats(slice::<f32>(cpu, l)?, n, c, s),
                _ => channel_stats(slice::<f64>(cpu, l)?, n, c, s),
            }
        };
        let m = (n * s) as f64;
        let mom = bn.momentum();
        let dt = bn.running_mean().dtype();
        let dev = x.device();
        let rm = ((bn.running_mean() * (1.0 - mom))?
            + (Tensor::new(mean.as_slice(), dev)?.to_dtype(dt)? * mom)?)?;
        let unbiased: Vec<f64> = var.iter().map(|v| v * m / (m - 1.0).max(1.0)).collect();
        let rv = ((bn.running_var() * (1.0 - mom))?
            + (Tensor::new(unbiased.as_slice(), dev)?.to_dtype(dt)? * mom)?)?;
        Var::from_tensor(bn.running_mean())?.set(&rm)?;
        Var::from_tensor(bn.running_var())?.set(&rv)?;
        Normalize {
            invstd: var.iter().map(|v| 1.0 / (v + bn.eps()).sqrt()).collect(),
            mean,
            batch_stats: true,
            relu,
        }
    } else {
        let rm = bn.running_mean().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let rv = bn.running_var().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Normalize {
            invstd: rv.iter().map(|v| 1.0 / (v + bn.eps()).sqrt()).collect(),
            mean: rm,
            batch_stats: false,
            relu,
        }
    };
    let gamma = gamma.to_dtype(x.dtype())?.contiguous()?;
    let beta = beta.to_dtype(x.dtype())?.contiguous()?;
    Ok(x.apply_op3(&gamma, &beta, op)?)
}

/// A BatchNorm on its running statistics (then a ReLU when `relu`) whose backward is called
/// directly: a block whose operations are chained by hand (`models::blocks::resnet`). The
/// same op and the same values as [`forward`]`(bn, x, false)` (or [`forward_relu`]).
pub(crate) struct Frozen {
    op: Normalize,
    gamma: Tensor,
    beta: Tensor,
}

impl Frozen {
    /// `bn` for inputs of `dtype` on the CPU; `None` where [`forward`] would not run the op
    /// (another device or dtype, no gain and shift).
    pub(crate) fn new(bn: &BatchNorm, x: &Tensor, relu: bool) -> Result<Option<Self>> {
        let fused =
            x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 2;
        let Some((gamma, beta)) = bn.weight_and_bias().filter(|_| fused) else {
            return Ok(None);
        };
        let rm = bn.running_mean().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let rv = bn.running_var().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(Some(Frozen {
            op: Normalize {
                invstd: rv.iter().map(|v| 1.0 / (v + bn.eps()).sqrt()).collect(),
                mean: rm,
                batch_stats: false,
                relu,
            },
            gamma: gamma.to_dtype(x.dtype())?.contiguous()?,
            beta: beta.to_dtype(x.dtype())?.contiguous()?,
        }))
    }

    /// The normalised input (no graph: for inputs and parameters that track no gradient).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op3_no_bwd(&self.gamma, &self.beta, &self.op)
    }

    /// `(dx, dgamma, dbeta)` for the input `x` of [`Frozen::forward`] and its output's
    /// gradient `dy`.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        // `res` is not read by this op's backward.
        match CustomOp3::bwd(&self.op, &x.contiguous()?, &self.gamma, &self.beta, dy, dy)? {
            (Some(dx), Some(dg), Some(db)) => Ok((dx, dg, db)),
            _ => candle_core::bail!("batch norm: a gradient is missing"),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap, batch_norm};

    use super::*;
    use crate::gradcheck::{check_input_gradient, project};
    use crate::init::seeded_randn;

    fn bn(vm: &VarMap) -> BatchNorm {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        let bn = batch_norm(3, 1e-5, vb).unwrap();
        // Non-trivial affine parameters and running statistics.
        let (g, b) = bn.weight_and_bias().unwrap();
        Var::from_tensor(g)
            .unwrap()
            .set(&Tensor::new(&[1.5f64, -0.7, 0.3], &Device::Cpu).unwrap())
            .unwrap();
        Var::from_tensor(b)
            .unwrap()
            .set(&Tensor::new(&[0.2f64, 0.0, -1.1], &Device::Cpu).unwrap())
            .unwrap();
        Var::from_tensor(bn.running_mean())
            .unwrap()
            .set(&Tensor::new(&[0.1f64, -0.2, 0.5], &Device::Cpu).unwrap())
            .unwrap();
        Var::from_tensor(bn.running_var())
            .unwrap()
            .set(&Tensor::new(&[0.9f64, 2.0, 0.4], &Device::Cpu).unwrap())
            .unwrap();
        bn
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn equals_candles_batch_norm_and_its_running_statistics() {
        let x = seeded_randn(&[4, 3, 5, 2], 1, DType::F64, &Device::Cpu).unwrap();
        for train in [true, false] {
            let (va, vb) = (VarMap::new(), VarMap::new());
            let (a, b) = (bn(&va), bn(&vb));
            let ours = forward(&a, &x, train).unwrap();
            let theirs = candle_core::ModuleT::forward_t(&b, &x, train).unwrap();
            for (p, q) in values(&ours).iter().zip(values(&theirs)) {
                assert!((p - q).abs() < 1e-10, "train {train}: {p} vs {q}");
            }
            // The fused ReLU is exactly the ReLU of the same values.
            let (vc, vd) = (VarMap::new(), VarMap::new());
            let fused = forward_relu(&bn(&vc), &x, train).unwrap();
            let relu = forward(&bn(&vd), &x, train).unwrap().relu().unwrap();
            assert_eq!(values(&fused), values(&relu), "train {train}: fused ReLU");
            for (p, q) in [
                (a.running_mean(), b.running_mean()),
                (a.running_var(), b.running_var()),
            ] {
                for (p, q) in values(p).iter().zip(values(q)) {
                    assert!((p - q).abs() < 1e-12, "train {train}: running {p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for train in [true, false] {
            let vm = VarMap::new();
            let norm = bn(&vm);
            // The input's gradient (through the batch statistics when training).
            let err = check_input_gradient(&[4, 3, 5, 2], 2, 40, &|x| {
                project(&forward(&norm, x, train)?, 3)
            })
            .unwrap();
            assert!(err < 1e-6, "train {train}: input gradient {err}");
            // With the fused ReLU: the gradients of the ReLU applied after, to the last bit.
            let x0 = Var::from_tensor(
                &seeded_randn(&[4, 3, 5, 2], 7, DType::F64, &Device::Cpu).unwrap(),
            )
            .unwrap();
            let grads = |fused: bool| {
                let vm = VarMap::new();
                let n = bn(&vm);
                let y = if fused {
                    forward_relu(&n, x0.as_tensor(), train).unwrap()
                } else {
                    forward(&n, x0.as_tensor(), train).unwrap().relu().unwrap()
                };
                let gs = project(&y, 8).unwrap().backward().unwrap();
                let (g, b) = n.weight_and_bias().unwrap();
                [x0.as_tensor(), g, b].map(|t| values(gs.get(t).unwrap()))
            };
            assert_eq!(
                grads(true),
                grads(false),
                "train {train}: fused ReLU gradients"
            );
            // gamma and beta, through a fresh BatchNorm built on them.
            let x = seeded_randn(&[4, 3, 5, 2], 4, DType::F64, &Device::Cpu).unwrap();
            let (rm, rv) = (norm.running_mean().clone(), norm.running_var().clone());
            for which in 0..2 {
                let err = check_input_gradient(&[3], 5 + which, 3, &|p| {
                    let (g, b) = norm.weight_and_bias().unwrap();
                    let (g, b) = if which == 0 {
                        (p.clone(), b.clone())
                    } else {
                        (g.clone(), p.clone())
                    };
                    let fresh = BatchNorm::new(3, rm.copy()?, rv.copy()?, g, b, 1e-5)?;
                    project(&forward(&fresh, &x, train)?, 6)
                })
                .unwrap();
                assert!(
                    err < 1e-6,
                    "train {train}: parameter {which} gradient {err}"
                );
            }
        }
    }
}
