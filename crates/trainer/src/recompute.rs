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
//!
//! [`taped`] is the same node for a function with a backward of its own ([`Taped`]): candle
//! walks none of its inner operations (each would get a zero-filled gradient buffer that its
//! one contribution is then added to), and it either recomputes the function's tape in
//! backward or keeps it in the node until its backward has run. On the CPU every ResNet
//! block trains this way, recomputing or not (`models::blocks::resnet`).

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
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
    let (packed, shapes) = pack(params)?;
    let node = Node {
        f,
        shapes,
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
        take(&self.out)
    }

    /// The packed parameters cut back into their shapes.
    fn unpack(&self, packed: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        unpack(&self.shapes, packed)
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
        cpu_storage(&self.take()?)
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
        let grads = backward_from(&y, grad)?;
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

/// What a [`Taped`] function's forward keeps for its backward.
pub type Tape = Box<dyn std::any::Any + Send>;

/// A function of an input and parameters with a backward of its own: what [`taped`] runs
/// as one node of candle's graph.
pub trait Taped: Send + Sync {
    /// The output of `f(x, params)` for inputs that track no gradient, and what
    /// [`Taped::backward`] needs.
    fn forward(&self, x: &Tensor, params: &[Tensor]) -> candle_core::Result<(Tensor, Tape)>;

    /// The gradients of the input and of every parameter (in order) for the output's
    /// gradient `grad`, given the tape [`Taped::forward`] returned on the same inputs and
    /// the output `out`.
    fn backward(
        &self,
        tape: Tape,
        x: &Tensor,
        params: &[Tensor],
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)>;
}

/// `f(x, params)` as one node of the graph whose backward is `f`'s own ([`Taped`]): candle's
/// backward walks no inner operation (each of which would get a zero-filled gradient that its
/// one contribution is then added to). With `recompute` the node keeps nothing and backward
/// runs `f`'s forward again for its tape (like [`recomputed`]); otherwise the node keeps the
/// tape and drops it when its backward has run (candle keeps its own nodes' tensors until the
/// whole backward ends). Runs the plain forward when nothing tracks a gradient. CPU only.
pub fn taped(
    f: Arc<dyn Taped>,
    x: &Tensor,
    params: &[Tensor],
    recompute: bool,
) -> candle_core::Result<Tensor> {
    let detached: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
    let (y, tape) = f.forward(&x.detach(), &detached)?;
    let tracks = x.track_op() || params.iter().any(|p| p.track_op());
    if !tracks || params.is_empty() || !x.device().is_cpu() {
        return Ok(y);
    }
    let (packed, shapes) = pack(params)?;
    let node = TapedNode {
        f,
        shapes,
        out: Mutex::new(Some(y)),
        tape: Mutex::new((!recompute).then_some(tape)),
    };
    x.apply_op2_arc(&packed, Arc::new(Box::new(node)))
}

struct TapedNode {
    f: Arc<dyn Taped>,
    shapes: Vec<Shape>,
    out: Mutex<Option<Tensor>>,
    /// The forward's tape, kept unless recomputing; taken by backward.
    tape: Mutex<Option<Tape>>,
}

impl CustomOp2 for TapedNode {
    fn name(&self) -> &'static str {
        "taped"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_storage(&take(&self.out)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let params = unpack(&self.shapes, &packed.detach())?;
        let x = x.detach();
        let kept = self
            .tape
            .lock()
            .map_err(|_| candle_core::Error::Msg("taped: poisoned tape".into()))?
            .take();
        let tape = match kept {
            Some(t) => t,
            None => self.f.forward(&x, &params)?.1,
        };
        let (dx, dp) = self
            .f
            .backward(tape, &x, &params, &out.detach(), &grad.detach())?;
        let flat = dp
            .iter()
            .map(|g| g.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Some(dx), Some(Tensor::cat(&flat, 0)?)))
    }
}

/// `params` flattened into one tensor (a custom operation takes at most three inputs; the
/// concatenation's backward hands every parameter its part), and their shapes.
fn pack(params: &[Tensor]) -> candle_core::Result<(Tensor, Vec<Shape>)> {
    let flat = params
        .iter()
        .map(|p| p.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let shapes = params.iter().map(|p| p.shape().clone()).collect();
    Ok((Tensor::cat(&flat, 0)?, shapes))
}

/// A copy of the CPU tensor `y` as the storage a node's `cpu_fwd` returns.
fn cpu_storage(y: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
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

/// The tensor in `slot` (once).
fn take(slot: &Mutex<Option<Tensor>>) -> candle_core::Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("recomputed: poisoned output".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("recomputed: forward run twice".into()))
}

/// Parameters packed by [`taped`] or [`recomputed`] cut back into their shapes.
fn unpack(shapes: &[Shape], packed: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.elem_count();
            let p = packed.narrow(0, at, n)?.reshape(s)?;
            at += n;
            Ok(p)
        })
        .collect()
}

/// The gradients of everything `y` depends on for `y`'s gradient `grad` (candle's backward
/// seeded with `grad`). CPU float32/float64 through [`Seed`]; elsewhere through `sum(y * grad)`.
pub(crate) fn backward_from(y: &Tensor, grad: &Tensor) -> candle_core::Result<GradStore> {
    if y.device().is_cpu() && matches!(y.dtype(), DType::F32 | DType::F64) {
        y.apply_op1_arc(Arc::new(Box::new(Seed(grad.detach()))))?
            .backward()
    } else {
        (y * grad.detach())?.sum_all()?.backward()
    }
}

/// A scalar (zero) whose gradient with respect to its argument is the tensor it holds: candle's
/// backward from it hands the argument that tensor, where `sum(y * grad)` would first build
/// the product, a broadcast of ones, and both factors' gradients (each zero-filled and then
/// added to: eight passes over an activation-sized tensor against two).
struct Seed(Tensor);

impl candle_core::CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "recomputed-seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let zero = match s {
            CpuStorage::F32(_) => CpuStorage::F32(vec![0.0]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![0.0]),
            _ => candle_core::bail!("recomputed: the seed takes float32 or float64"),
        };
        Ok((zero, Shape::from(())))
    }

    /// Only ever the root of a backward, so the incoming gradient is the scalar 1 candle
    /// starts from.
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
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
