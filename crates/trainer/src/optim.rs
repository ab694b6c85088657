//! SGD with momentum and weight decay (candle's `SGD` has neither), PyTorch semantics:
//!
//! ```text
//! d = grad + weight_decay * p
//! buf = d                       (first step)
//! buf = momentum * buf + d      (later steps)
//! p  -= lr * (nesterov ? d + momentum * buf : buf)
//! ```
//!
//! Its state (one momentum buffer per named parameter) is saved with checkpoints.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
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
            let mut d = g.clone();
            if p.weight_decay != 0.0 {
                d = (d + (var.as_tensor() * p.weight_decay)?)?;
            }
            let step = if p.momentum != 0.0 {
                let b = match buf.take() {
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

    /// Restores [`Self::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) {
        for ((n, _), b) in self.vars.iter().zip(self.buffers.iter_mut()) {
            *b = state.get(&format!("momentum.{n}")).cloned();
        }
    }
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += f64::from(
                g.sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar::<f32>()?,
            );
        }
    }
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
