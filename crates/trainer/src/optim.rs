//! SGD with momentum and weight decay (candle's `SGD` has neither), PyTorch semantics:
//!
//! ```text
//! d = grad + weight_decay * p
//! buf = d                       (first step)
//! buf = momentum * buf + d      (later steps)
//! p  -= lr * (nesterov ? d + momentum * buf : buf)
//! ```
//!
//! Its state (one momentum buffer per named parameter) is saved with checkpoints. On the CPU
//! every step after the first updates the buffer and the parameter in place, two passes in
//! the composed ops' arithmetic (the same bits).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f64,
    /// Momentum (0.9 in the paper).
    pub momentum: f64,
    /// L2 weight decay (5e-4 in the paper).
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdParams {
    fn default() -> Self {
        SgdParams {
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        }
    }
}

/// SGD with momentum over named parameters.
pub struct SgdMomentum {
    vars: Vec<(String, Var)>,
    buffers: Vec<Option<Tensor>>,
    params: SgdParams,
}

impl Optimizer for SgdMomentum {
    type Config = SgdParams;

    fn new(vars: Vec<Var>, params: SgdParams) -> candle_core::Result<Self> {
        let vars: Vec<(String, Var)> = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect();
        Ok(SgdMomentum {
            buffers: vec![None; vars.len()],
            vars,
            params,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let p = self.params;
        for ((_, var), buf) in self.vars.iter().zip(self.buffers.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if let Some(b) = buf.as_ref().filter(|b| in_place(p, var.as_tensor(), g, b)) {
                // Two passes on the storages, no new tensors; the same numbers as below.
                b.inplace_op3(
                    g,
                    var.as_tensor(),
                    &MomentumUpdate {
                        momentum: p.momentum,
                        weight_decay: p.weight_decay,
                    },
                )?;
                var.as_tensor().inplace_op2(b, &Descend { lr: p.lr })?;
                continue;
            }
            let mut d = g.clone();
            if p.weight_decay != 0.0 {
                d = (d + (var.as_tensor() * p.weight_decay)?)?;
            }
            let step = if p.momentum != 0.0 {
                let b = match buf.take() {
                    // A copy when `d` is the gradient itself: the buffer is updated in place.
                    None if p.weight_decay == 0.0 => d.copy()?,
                    None => d.clone(),
                    Some(b) => ((b * p.momentum)? + &d)?,
                };
                let s = if p.nesterov {
                    (&d + (&b * p.momentum)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b.detach());
                s
            } else {
                d
            };
            var.set(&(var.as_tensor() - (step * p.lr)?)?.detach())?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

impl SgdMomentum {
    /// Optimises the variables of `vm` whose name `train` accepts, in name order.
    pub fn from_varmap(
        vm: &VarMap,
        params: SgdParams,
        train: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| crate::error::Error::Config("poisoned VarMap".into()))?;
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(n, _)| train(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(SgdMomentum {
            buffers: vec![None; vars.len()],
            vars,
            params,
        })
    }

    /// The optimised variables with their names.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The momentum buffers by parameter name (`momentum.<name>`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (format!("momentum.{n}"), b.clone())))
            .collect()
    }

    /// Restores [`Self::state`] (copies: the buffers are updated in place).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for ((n, _), b) in self.vars.iter().zip(self.buffers.iter_mut()) {
            *b = state
                .get(&format!("momentum.{n}"))
                .map(Tensor::copy)
                .transpose()?;
        }
        Ok(())
    }
}

/// Whether a step of `var` can run as [`MomentumUpdate`] and [`Descend`] on the storages:
/// plain momentum, contiguous float32/float64 tensors of one shape on the CPU.
fn in_place(p: SgdParams, var: &Tensor, g: &Tensor, b: &Tensor) -> bool {
    let ts = [var, g, b];
    p.momentum != 0.0
        && !p.nesterov
        && ts.iter().all(|t| {
            t.device().is_cpu()
                && t.is_contiguous()
                && t.dims() == var.dims()
                && t.dtype() == var.dtype()
                && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        })
}

/// `buf = momentum * buf + (grad + weight_decay * p)` on `buf`'s storage, in the order and
/// precision of the composed candle ops (`t * a` is candle's `affine`, `t * a + 0` in the
/// tensor's type; `+ 0.0` kept: it turns -0 into +0 as candle's does), so the numbers are the
/// same bits.
struct MomentumUpdate {
    momentum: f64,
    weight_decay: f64,
}

/// `p = p - (lr * buf)`, as the composed ops compute it.
struct Descend {
    lr: f64,
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::im2col::contiguous(v, l, "sgd")
}

fn contiguous_mut<'a, T>(v: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    crate::im2col::contiguous_mut(v, l, "sgd")
}

/// Values per task when a step runs on rayon's threads. Every value is updated on its own,
/// so the result does not depend on how the slices are cut or on the number of threads.
const CHUNK: usize = 1 << 15;

fn momentum_update<T: candle_core::WithDType>(b: &mut [T], g: &[T], p: &[T], m: f64, wd: f64) {
    // As `step`: no decay term at all when the decay is 0 (`g + 0` would turn -0 into +0).
    let decay = wd != 0.0;
    let (m, wd, zero) = (T::from_f64(m), T::from_f64(wd), T::zero());
    let run = |b: &mut [T], g: &[T], p: &[T]| {
        for ((b, &g), &p) in b.iter_mut().zip(g).zip(p) {
            let d = if decay { g + (p * wd + zero) } else { g };
            *b = (*b * m + zero) + d;
        }
    };
    if b.len() <= CHUNK {
        return run(b, g, p);
    }
    b.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(p.par_chunks(CHUNK))
        .for_each(|((b, g), p)| run(b, g, p));
}

fn descend<T: candle_core::WithDType>(p: &mut [T], b: &[T], lr: f64) {
    let (lr, zero) = (T::from_f64(lr), T::zero());
    let run = |p: &mut [T], b: &[T]| {
        for (p, &b) in p.iter_mut().zip(b) {
            *p -= b * lr + zero;
        }
    };
    if p.len() <= CHUNK {
        return run(p, b);
    }
    p.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(p, b)| run(p, b));
}

impl InplaceOp3 for MomentumUpdate {
    fn name(&self) -> &'static str {
        "vdg-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (m, wd) = (self.momentum, self.weight_decay);
        match (s1, s2, s3) {
            (CpuStorage::F32(b), CpuStorage::F32(g), CpuStorage::F32(p)) => momentum_update(
                contiguous_mut(b, l1)?,
                contiguous(g, l2)?,
                contiguous(p, l3)?,
                m,
                wd,
            ),
            (CpuStorage::F64(b), CpuStorage::F64(g), CpuStorage::F64(p)) => momentum_update(
                contiguous_mut(b, l1)?,
                contiguous(g, l2)?,
                contiguous(p, l3)?,
                m,
                wd,
            ),
            _ => candle_core::bail!("{}: float32 or float64 only", self.name()),
        }
        Ok(())
    }
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "vdg-sgd-descend"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(b)) => {
                descend(contiguous_mut(p, l1)?, contiguous(b, l2)?, self.lr)
            }
            (CpuStorage::F64(p), CpuStorage::F64(b)) => {
                descend(contiguous_mut(p, l1)?, contiguous(b, l2)?, self.lr)
            }
            _ => candle_core::bail!("{}: float32 or float64 only", self.name()),
        }
        Ok(())
    }
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
///
/// The per-parameter sums of squares are read back together, in one copy (on a GPU, one
/// wait for the device instead of one per parameter), and added in float64 in `vars`' order.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let sums = vars
        .iter()
        .filter_map(|(_, v)| grads.get(v.as_tensor()))
        .map(|g| g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total: f64 = if sums.is_empty() {
        0.0
    } else {
        Tensor::stack(&sums, 0)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .sum()
    };
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Two steps on f(p) = sum(p^2) / 2 (grad = p), worked by hand.
    #[test]
    fn momentum_and_weight_decay_match_steps_worked_by_hand() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &dev).unwrap()).unwrap();
        let params = SgdParams {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            nesterov: false,
        };
        let mut opt = SgdMomentum::new(vec![p.clone()], params).unwrap();
        let step = |opt: &mut SgdMomentum| {
            let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        };
        // Step 1: d = p + 0.01 p = 1.01 p; buf = d; p -= 0.1 d -> p * (1 - 0.101) = 0.899 p.
        step(&mut opt);
        let v: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        assert!(
            (v[0] - 0.899).abs() < 1e-12 && (v[1] + 1.798).abs() < 1e-12,
            "{v:?}"
        );
        // Step 2: d = 1.01 * 0.899 p0 = 0.90799 p0; buf = 0.9 * 1.01 p0 + d = 1.81699 p0;
        // p = 0.899 p0 - 0.181699 p0 = 0.717301 p0.
        step(&mut opt);
        let v: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        assert!((v[0] - 0.717301).abs() < 1e-12, "{v:?}");
        assert!((v[1] + 2.0 * 0.717301).abs() < 1e-12, "{v:?}");
        let _ = DType::F64;
    }

    /// The in-place path (every step after the first) gives the bits of candle's composed
    /// ops, float32, with and without decay, on values that include -0, on one thread and cut
    /// into chunks.
    #[test]
    fn the_in_place_step_equals_the_composed_ops_bit_for_bit() {
        let dev = Device::Cpu;
        // One slice, and one cut into tasks on rayon's threads.
        for (n, weight_decay) in [(67usize, 5e-4), (67, 0.0), (2 * super::CHUNK + 5, 5e-4)] {
            let params = SgdParams {
                lr: 0.01,
                momentum: 0.9,
                weight_decay,
                nesterov: false,
            };
            let init: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let mut init = init;
            init[3] = -0.0;
            let var = Var::from_tensor(&Tensor::new(init.as_slice(), &dev).unwrap()).unwrap();
            let mut opt = SgdMomentum::new(vec![var.clone()], params).unwrap();
            // The reference: the composed ops of `step`, written out.
            let mut p = Tensor::new(init.as_slice(), &dev).unwrap();
            let mut buf: Option<Tensor> = None;
            for k in 0..5 {
                let mut gv: Vec<f32> = (0..n)
                    .map(|i| ((i * 13 + k * 7) % 17) as f32 * 0.37 - 2.9)
                    .collect();
                gv[5] = -0.0;
                gv[6] = if k % 2 == 0 { -0.0 } else { 0.0 };
                let g = Tensor::new(gv.as_slice(), &dev).unwrap();
                // A GradStore holding exactly `g` (with its -0s) for the variable.
                let loss = var.as_tensor().sum_all().unwrap();
                let mut grads = loss.backward().unwrap();
                grads.insert(var.as_tensor(), g.clone());
                opt.step(&grads).unwrap();
                let mut d = g.clone();
                if weight_decay != 0.0 {
                    d = (d + (&p * weight_decay).unwrap()).unwrap();
                }
                let b = match buf.take() {
                    None => d.clone(),
                    Some(b) => ((b * 0.9).unwrap() + &d).unwrap(),
                };
                p = (&p - (&b * 0.01).unwrap()).unwrap();
                buf = Some(b);
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(
                    bits(var.as_tensor()),
                    bits(&p),
                    "{n} values, step {k}, decay {weight_decay}"
                );
                assert_eq!(
                    bits(opt.state().values().next().unwrap()),
                    bits(buf.as_ref().unwrap()),
                    "{n} values, step {k}, decay {weight_decay}"
                );
            }
        }
    }

    #[test]
    fn the_gradient_norm_covers_every_parameter_with_a_gradient() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[3.0f32, 0.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[0.0f32], [4.0]], &dev).unwrap()).unwrap();
        let unused = Var::from_tensor(&Tensor::new(&[12.0f32], &dev).unwrap()).unwrap();
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap()
            * 0.5)
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = [
            ("a".to_string(), a.clone()),
            ("unused".to_string(), unused),
            ("b".to_string(), b.clone()),
        ];
        // Gradients (3, 0) and (0, 4): norm 5, the parameter without one left out.
        let norm = clip_grad_norm(&mut grads, &vars, 10.0).unwrap();
        assert_eq!(norm, 5.0);
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        let ga: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-6 && ga[1] == 0.0, "{ga:?}");
        assert_eq!(clip_grad_norm(&mut grads, &vars[1..2], 1.0).unwrap(), 0.0);
    }

    #[test]
    fn nesterov_and_clipping() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[3.0f64, 4.0], &dev).unwrap()).unwrap();
        let params = SgdParams {
            lr: 1.0,
            momentum: 0.5,
            weight_decay: 0.0,
            nesterov: true,
        };
        let mut opt = SgdMomentum::new(vec![p.clone()], params).unwrap();
        let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let mut grads = loss.backward().unwrap();
        // |grad| = 5 -> clipped to 1: grad = (0.6, 0.8).
        let norm = clip_grad_norm(&mut grads, &[("p".into(), p.clone())], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        opt.step(&grads).unwrap();
        // Nesterov first step: buf = d; step = d + 0.5 d = 1.5 d.
        let v: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        assert!(
            (v[0] - (3.0 - 1.5 * 0.6)).abs() < 1e-5 && (v[1] - (4.0 - 1.5 * 0.8)).abs() < 1e-5,
            "{v:?}"
        );
    }
}
