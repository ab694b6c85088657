//! Activation recomputation (what PyTorch calls gradient checkpointing): a function of an
//! input and some parameters kept in candle's graph as one node that holds only its input,
//! its output and the parameters, its inner activations recomputed in backward.
//!
//! candle keeps every tensor of the graph alive until backward ends. A ResNet block keeps
//! four to ten activations for its backward (its convolutions' inputs, the BatchNorms'
//! inputs, the residual sum); recomputed, it keeps its output only (its input is the
//! previous block's output), and the inner activations of one block at a time exist while
//! backward passes it. The price is a second forward pass of every recomputed block.
//!
//! [`recomputed`] runs `f` once without a graph, and backward runs it again on a copy of
//! the input and of the parameters that are candle variables, then candle's backward on
//! that small graph, seeded with the output's gradient. The same operations on the same
//! values in the same order: the tests find a ResNet's loss and gradients equal to the
//! plain graph's to the last bit.
//!
//! The parameters enter the node packed into one tensor (a custom operation takes at most
//! three inputs); the packing's backward (`Tensor::cat`) hands every parameter its part.
//! CPU and CUDA; elsewhere (Metal) `f` runs in the plain graph. The setting is per thread,
//! entered with [`Recompute::enter`] around a model's forward pass
//! ([`crate::models::VideoModel`]).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, Var};

thread_local! {
    static ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, the blocks that support it (ResNet's residual blocks) recompute their
/// activations in backward on this thread. Restores the previous setting when dropped.
#[must_use = "the setting lasts as long as the guard"]
pub struct Recompute(bool);

impl Recompute {
    /// Enters `on` for this thread.
    pub fn enter(on: bool) -> Self {
        Recompute(ON.with(|c| c.replace(on)))
    }
}

impl Drop for Recompute {
    fn drop(&mut self) {
        ON.with(|c| c.set(self.0));
    }
}

/// Whether [`Recompute`] is on for this thread.
pub fn enabled() -> bool {
    ON.with(|c| c.get())
}

/// A function of an input and parameters: `f(x, params)`.
pub type Function = Arc<dyn Fn(&Tensor, &[Tensor]) -> candle_core::Result<Tensor> + Send + Sync>;

/// `f(x, params)` as one node of the graph that keeps no inner activation (module docs).
/// Runs `f` in the plain graph when nothing tracks a gradient, on Metal, or without
/// parameters.
pub fn recomputed(f: Function, x: &Tensor, params: &[Tensor]) -> candle_core::Result<Tensor> {
    let tracks = x.track_op() || params.iter().any(|p| p.track_op());
    let device = x.device();
    if !tracks || !(device.is_cpu() || device.is_cuda()) || params.is_empty() {
        return f(x, params);
    }
    let detached: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
    let y = f(&x.detach(), &detached)?;
    let flat = params
        .iter()
        .map(|p| p.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let node = Node {
        f,
        shapes: params.iter().map(|p| p.shape().clone()).collect(),
        out: Mutex::new(Some(y)),
        autocast: crate::nn3d::autocast_dtype(),
    };
    x.apply_op2_arc(&packed, Arc::new(Box::new(node)))
}

struct Node {
    f: Function,
    /// Shapes of the packed parameters, in order.
    shapes: Vec<Shape>,
    /// The output of the graph-less first run, handed to candle by `cpu_fwd` (and dropped).
    out: Mutex<Option<Tensor>>,
    /// Mixed precision in force at the first run, entered again for the recomputation.
    autocast: Option<DType>,
}

impl Node {
    /// The first run's output (once).
    fn take(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("recomputed: poisoned output".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recomputed: forward run twice".into()))
    }

    /// The packed parameters cut back into their shapes.
    fn unpack(&self, packed: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut at = 0;
        self.shapes
            .iter()
            .map(|s| {
                let n = s.elem_count();
                let p = packed.narrow(0, at, n)?.reshape(s)?;
                at += n;
                Ok(p)
            })
            .collect()
    }
}

impl CustomOp2 for Node {
    fn name(&self) -> &'static str {
        "recomputed"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let flat = y.flatten_all()?;
        let storage = match y.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            DType::F16 => CpuStorage::F16(flat.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
            other => candle_core::bail!("recomputed: unsupported dtype {other:?}"),
        };
        Ok((storage, y.shape().clone()))
    }

    /// On a GPU the output is copied on the device (not verified on a GPU yet: the CPU tests
    /// cover the node's logic, `scripts/gpu-check` trains TSM with `--recompute` on the GPU).
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take()?.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("recomputed: the output left the GPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _autocast = crate::nn3d::Autocast::enter(self.autocast);
        // Copies of the tracked inputs as variables of a small graph of their own.
        let xv = if x.track_op() {
            Some(Var::from_tensor(&x.detach())?)
        } else {
            None
        };
        let pv = if packed.track_op() {
            Some(
                self.unpack(&packed.detach())?
                    .iter()
                    .map(Var::from_tensor)
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        let xin = xv
            .as_ref()
            .map_or_else(|| x.detach(), |v| v.as_tensor().clone());
        let pin = match &pv {
            Some(v) => v.iter().map(|v| v.as_tensor().clone()).collect(),
            None => self.unpack(&packed.detach())?,
        };
        let y = (self.f)(&xin, &pin)?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let dx = match &xv {
            Some(v) => Some(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => x.zeros_like()?,
            }),
            None => None,
        };
        let dp = match &pv {
            Some(vars) => {
                let parts = vars
                    .iter()
                    .map(|v| match grads.get(v.as_tensor()) {
                        Some(g) => g.flatten_all(),
                        None => v.as_tensor().zeros_like()?.flatten_all(),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(Tensor::cat(&parts, 0)?)
            }
            None => None,
        };
        Ok((dx, dp))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::init::seeded_randn;
    use crate::tests::max_diff;

    /// A small two-layer function with a residual: `relu(x w1) w2 * s + x`.
    fn f() -> Function {
        Arc::new(|x: &Tensor, p: &[Tensor]| {
            let h = x.matmul(&p[0])?.relu()?.matmul(&p[1])?;
            h.broadcast_mul(&p[2])? + x
        })
    }

    #[test]
    fn recomputed_gradients_equal_the_plain_ones() {
        let dev = Device::Cpu;
        let r = |shape: &[usize], seed| seeded_randn(shape, seed, DType::F64, &dev).unwrap();
        let x = Var::from_tensor(&r(&[6, 5], 1)).unwrap();
        let p: Vec<Var> = [r(&[5, 7], 2), r(&[7, 5], 3), r(&[5], 4)]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let pt: Vec<Tensor> = p.iter().map(|v| v.as_tensor().clone()).collect();
        let weights = r(&[6, 5], 5);
        // A consumer after the node, so the seed of its backward is not all ones.
        let loss = |y: Tensor| (y.sqr().unwrap() * &weights).unwrap().sum_all().unwrap();
        let plain = loss(f()(x.as_tensor(), &pt).unwrap());
        let node = loss(recomputed(f(), x.as_tensor(), &pt).unwrap());
        assert!(max_diff(&plain, &node) < 1e-12, "values differ");
        let (ga, gb) = (plain.backward().unwrap(), node.backward().unwrap());
        for (name, v) in std::iter::once(("x", &x)).chain(p.iter().map(|v| ("param", v))) {
            let (a, b) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(max_diff(a, b) < 1e-12, "{name}: gradients differ");
        }
    }

    #[test]
    fn untracked_inputs_get_no_gradient_and_the_params_still_do() {
        let dev = Device::Cpu;
        let r = |shape: &[usize], seed| seeded_randn(shape, seed, DType::F32, &dev).unwrap();
        let x = r(&[4, 3], 1);
        let w = Var::from_tensor(&r(&[3, 3], 2)).unwrap();
        let pt = vec![w.as_tensor().clone(), r(&[3, 3], 3), r(&[3], 4)];
        let y = recomputed(f(), &x, &pt).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        let plain = f()(&x, &pt).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            grads.get(w.as_tensor()).unwrap(),
            plain.get(w.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-5);
        // Nothing tracks: the plain function, no node.
        let y = recomputed(f(), &x, &[r(&[3, 3], 2), r(&[3, 3], 3), r(&[3], 4)]).unwrap();
        assert!(!y.track_op());
    }

    #[test]
    fn the_setting_is_scoped() {
        assert!(!enabled());
        {
            let _on = Recompute::enter(true);
            assert!(enabled());
            {
                let _off = Recompute::enter(false);
                assert!(!enabled());
            }
            assert!(enabled());
        }
        assert!(!enabled());
    }
}
