//! A residual sum and the ReLU after it as one operation, and the ReLU's gradient from the
//! output alone.
//!
//! candle keeps every tensor of the graph alive until backward ends, so each operation of
//! the forward pass costs its output's memory for the whole step. `(y + skip).relu()` keeps
//! two activations per residual block; [`add_relu`] keeps one, and its backward needs only
//! that output (`d/dy = d/dskip = grad * [out > 0]`). [`relu_grad`] is the same masking for
//! other fused ReLUs (the convolution's, `crate::im2col`). CPU float32/float64; other devices
//! use candle's operations (same values).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Inputs at least this long are split over threads.
const PAR_MIN: usize = 1 << 16;

fn on_cpu(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
}

/// `max(a + b, 0)` for tensors of one shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !on_cpu(a, b) {
        return Ok((a + b)?.relu()?);
    }
    Ok(a.contiguous()?
        .apply_op2(&b.contiguous()?, Fused::AddRelu)?)
}

/// `grad` where `out > 0`, else 0: the gradient through a ReLU whose output is `out`.
pub(crate) fn relu_grad(grad: &Tensor, out: &Tensor) -> candle_core::Result<Tensor> {
    let grad = grad.detach();
    if !on_cpu(&grad, out) {
        let mask = out.gt(0.0)?.to_dtype(grad.dtype())?;
        return grad * mask;
    }
    grad.contiguous()?
        .apply_op2_no_bwd(&out.detach().contiguous()?, &Fused::ReluGrad)
}

#[derive(Debug, Clone, Copy)]
enum Fused {
    /// `max(a + b, 0)`.
    AddRelu,
    /// `a` where `b > 0`, else 0.
    ReluGrad,
}

fn zip_map<T: candle_core::WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    let run = |((o, a), b): ((&mut [T], &[T]), &[T])| {
        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
    };
    const CHUNK: usize = 1 << 14;
    if a.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(run);
    } else {
        run(((&mut out[..], a), b));
    }
    out
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::im2col::contiguous(v, l, "fused op")
}

impl Fused {
    fn apply<T: candle_core::WithDType>(self, a: &[T], b: &[T]) -> Vec<T> {
        let zero = T::zero();
        match self {
            Fused::AddRelu => zip_map(a, b, |x, y| {
                let s = x + y;
                if s > zero { s } else { zero }
            }),
            Fused::ReluGrad => zip_map(a, b, |g, o| if o > zero { g } else { zero }),
        }
    }
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        match self {
            Fused::AddRelu => "vdg-add-relu",
            Fused::ReluGrad => "vdg-relu-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{}: shapes {:?} and {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.apply(slice(a, l1)?, slice(b, l2)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.apply(slice(a, l1)?, slice(b, l2)?))
            }
            _ => candle_core::bail!("{}: float32 or float64 of one dtype", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if let Fused::ReluGrad = self {
            candle_core::bail!("vdg-relu-grad has no gradient");
        }
        let g = relu_grad(grad, res)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use crate::init::seeded_randn;

    use super::*;

    #[test]
    fn add_relu_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        for n in [7usize, PAR_MIN + 3] {
            // Seeded: candle's own `randn` is not, and a draw with every sum below zero
            // would fail the mask check below.
            let a = Var::from_tensor(&seeded_randn(&[n], 1, DType::F64, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&seeded_randn(&[n], 2, DType::F64, &dev).unwrap()).unwrap();
            let w = seeded_randn(&[n], 3, DType::F64, &dev).unwrap();
            let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
            let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
            let diff = |x: &Tensor, y: &Tensor| -> f64 {
                (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            assert_eq!(diff(&ours, &theirs), 0.0);
            let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&a, &b] {
                let (x, y) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(diff(x, y), 0.0);
            }
            // Some inputs on each side of zero, so the mask is exercised.
            let mask = g1
                .get(&a)
                .unwrap()
                .ne(0.0)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let on: f64 = mask.sum_all().unwrap().to_scalar().unwrap();
            assert!(on > 0.0 && on < n as f64, "{on} of {n}");
        }
        // An untracked argument gets no gradient; other devices' path is candle's.
        let a = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &dev).unwrap()).unwrap();
        let b = Tensor::new(&[0.5f32, 1.0], &dev).unwrap();
        let g = add_relu(a.as_tensor(), &b)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 0.0]
        );
        assert!(g.get(&b).is_none());
    }
}
