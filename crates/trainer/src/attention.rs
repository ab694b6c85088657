//! The core of multi-head attention as one operation on the CPU: ReLU on the projected
//! queries, keys and values, scaled scores, the causal mask, softmax, dropout on the weights
//! and the weighted sum of the values, written straight into `[B, Tq, W]`.
//!
//! Composed from candle's operations the same core is about fifteen graph nodes per call
//! (three ReLUs, head split copies, a transposed key copy, two batched products of 5 x 64
//! matrices, the scale, the mask, softmax's ops, the dropout product, the merge copy), each
//! with its own allocation and, in backward, a zero-filled gradient buffer and an addition
//! (BENCHMARKS.md, "Where the APN step's time goes"). Here forward and backward are one pass
//! each over `(batch, head, query)`, the softmax recomputed in backward. CPU float32/float64
//! only; other devices compose candle's operations (`nn.rs`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// What the core computes besides the attention itself.
#[derive(Debug, Clone)]
pub struct Core {
    /// Attention heads; the width `W` must be a multiple.
    pub heads: usize,
    /// Mask keys after the query's own position.
    pub causal: bool,
    /// Dropout multipliers on the attention weights, `[B, H, Tq, Tk]` (0 or `1/keep`).
    pub mask: Option<Arc<Vec<f32>>>,
}

/// Multi-head attention's core on projected, pre-ReLU `q [B, Tq, W]`, `k [B, Tk, W]`,
/// `v [B, Tk, W]`: per head `softmax(relu(q) relu(k)^T / sqrt(W/H) [+ causal mask]) x
/// dropout x relu(v)`, heads side by side: `[B, Tq, W]`.
pub fn core(q: &Tensor, k: &Tensor, v: &Tensor, op: Core) -> crate::error::Result<Tensor> {
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Whether [`core`] runs for these tensors (else compose candle's operations).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Shapes the op works on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) tq: usize,
    pub(crate) tk: usize,
    pub(crate) w: usize,
    pub(crate) dh: usize,
}

#[inline]
fn relu<T: WithDType>(v: T) -> T {
    if v > T::zero() { v } else { T::zero() }
}

/// `a . b` with eight partial sums (vectorisable; the order is fixed, so the result is too).
#[inline]
fn dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

/// `y += a x`.
#[inline]
fn axpy<T: WithDType>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The ReLU of every value.
fn relu_all<T: WithDType>(x: &[T]) -> Vec<T> {
    x.iter().map(|&v| relu(v)).collect()
}

/// Zeroes the gradients `g` where the pre-ReLU values `x` are not positive.
fn relu_mask<T: WithDType>(g: &mut [T], x: &[T]) {
    for (g, &x) in g.iter_mut().zip(x) {
        *g = if x > T::zero() { *g } else { T::zero() };
    }
}

impl Core {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> candle_core::Result<Dims> {
        let (b, tq, w) = lq.shape().dims3()?;
        let (b2, tk, w2) = lk.shape().dims3()?;
        if b != b2 || w != w2 || lv.dims() != lk.dims() || self.heads == 0 || w % self.heads != 0 {
            candle_core::bail!(
                "attention core: q {:?}, k {:?}, v {:?}, {} heads",
                lq.dims(),
                lk.dims(),
                lv.dims(),
                self.heads
            );
        }
        if let Some(m) = &self.mask
            && m.len() != b * self.heads * tq * tk
        {
            candle_core::bail!("attention core: dropout mask of {} values", m.len());
        }
        Ok(Dims {
            b,
            tq,
            tk,
            w,
            dh: w / self.heads,
        })
    }

    /// Softmax weights (float64) of query `i`, head `h`, of one batch item's ReLU'd `q`, `k`
    /// into `p`; masked keys get exactly 0 (the released code's -2^32 + 1 underflows to 0
    /// too).
    fn weights<T: WithDType>(&self, q: &[T], k: &[T], d: Dims, h: usize, i: usize, p: &mut [f64]) {
        let col = h * d.dh;
        let qi = &q[i * d.w + col..][..d.dh];
        let keys = if self.causal { (i + 1).min(d.tk) } else { d.tk };
        let scale = 1.0 / (d.dh as f64).sqrt();
        let mut max = f64::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate().take(keys) {
            *pj = dot(qi, &k[j * d.w + col..][..d.dh]).to_f64() * scale;
            max = max.max(*pj);
        }
        let mut sum = 0.0;
        for pj in p.iter_mut().take(keys) {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = if j < keys { *pj / sum } else { 0.0 };
        }
    }

    fn mask_at(&self, bi: usize, h: usize, i: usize, d: Dims) -> Option<&[f32]> {
        self.mask.as_ref().map(|m| {
            let at = ((bi * self.heads + h) * d.tq + i) * d.tk;
            &m[at..at + d.tk]
        })
    }

    pub(crate) fn forward<T: WithDType>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> Vec<T> {
        let mut out = vec![T::zero(); d.b * d.tq * d.w];
        let item = |(bi, o): (usize, &mut [T])| {
            let q = relu_all(&q[bi * d.tq * d.w..][..d.tq * d.w]);
            let k = relu_all(&k[bi * d.tk * d.w..][..d.tk * d.w]);
            let v = relu_all(&v[bi * d.tk * d.w..][..d.tk * d.w]);
            let mut p = vec![0.0f64; d.tk];
            for h in 0..self.heads {
                let col = h * d.dh;
                for i in 0..d.tq {
                    self.weights(&q, &k, d, h, i, &mut p);
                    let mask = self.mask_at(bi, h, i, d);
                    let oi = &mut o[i * d.w + col..][..d.dh];
                    for (j, &pj) in p.iter().enumerate() {
                        let pd = T::from_f64(pj * mask.map_or(1.0, |m| f64::from(m[j])));
                        if pd != T::zero() {
                            axpy(oi, pd, &v[j * d.w + col..][..d.dh]);
                        }
                    }
                }
            }
        };
        if d.b * d.tq * d.tk * d.w >= PAR_MIN {
            out.par_chunks_mut(d.tq * d.w).enumerate().for_each(item);
        } else {
            out.chunks_mut(d.tq * d.w).enumerate().for_each(item);
        }
        out
    }

    /// Gradients for `q`, `k`, `v` (pre-ReLU) from the output's gradient `g [B, Tq, W]`.
    pub(crate) fn backward<T: WithDType>(
        &self,
        [q, k, v, g]: [&[T]; 4],
        d: Dims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let scale = 1.0 / (d.dh as f64).sqrt();
        let mut dq = vec![T::zero(); d.b * d.tq * d.w];
        let mut dk = vec![T::zero(); d.b * d.tk * d.w];
        let mut dv = vec![T::zero(); d.b * d.tk * d.w];
        let item = |(bi, (dq, (dk, dv))): ItemGrads<'_, T>| {
            let (q0, g) = (
                &q[bi * d.tq * d.w..][..d.tq * d.w],
                &g[bi * d.tq * d.w..][..d.tq * d.w],
            );
            let (k0, v0) = (
                &k[bi * d.tk * d.w..][..d.tk * d.w],
                &v[bi * d.tk * d.w..][..d.tk * d.w],
            );
            let (q, k, v) = (relu_all(q0), relu_all(k0), relu_all(v0));
            let mut p = vec![0.0f64; d.tk];
            let mut ds = vec![0.0f64; d.tk];
            // Gradients of the ReLU'd q, k, v first; the ReLUs' masks at the end.
            for h in 0..self.heads {
                let col = h * d.dh;
                for i in 0..d.tq {
                    self.weights(&q, &k, d, h, i, &mut p);
                    let mask = self.mask_at(bi, h, i, d);
                    let gi = &g[i * d.w + col..][..d.dh];
                    // dV, dP through dropout, and the softmax's row term.
                    let mut row = 0.0;
                    for (j, &pj) in p.iter().enumerate() {
                        ds[j] = 0.0;
                        let m = mask.map_or(1.0, |m| f64::from(m[j]));
                        if pj == 0.0 || m == 0.0 {
                            continue;
                        }
                        axpy(&mut dv[j * d.w + col..][..d.dh], T::from_f64(pj * m), gi);
                        ds[j] = dot(gi, &v[j * d.w + col..][..d.dh]).to_f64() * m;
                        row += pj * ds[j];
                    }
                    // dS, then dQ and dK.
                    let qi = &q[i * d.w + col..][..d.dh];
                    for (j, &pj) in p.iter().enumerate() {
                        if pj == 0.0 {
                            continue;
                        }
                        let s = T::from_f64(pj * (ds[j] - row) * scale);
                        axpy(
                            &mut dq[i * d.w + col..][..d.dh],
                            s,
                            &k[j * d.w + col..][..d.dh],
                        );
                        axpy(&mut dk[j * d.w + col..][..d.dh], s, qi);
                    }
                }
            }
            relu_mask(dq, q0);
            relu_mask(dk, k0);
            relu_mask(dv, v0);
        };
        let (nq, nk) = (d.tq * d.w, d.tk * d.w);
        if d.b * d.tq * d.tk * d.w >= PAR_MIN {
            dq.par_chunks_mut(nq)
                .zip(dk.par_chunks_mut(nk).zip(dv.par_chunks_mut(nk)))
                .enumerate()
                .for_each(item);
        } else {
            dq.chunks_mut(nq)
                .zip(dk.chunks_mut(nk).zip(dv.chunks_mut(nk)))
                .enumerate()
                .for_each(item);
        }
        (dq, dk, dv)
    }
}

/// One batch item's gradient slices for `q`, `k`, `v`, with the item's index.
type ItemGrads<'a, T> = (usize, (&'a mut [T], (&'a mut [T], &'a mut [T])));

/// Passes with fewer multiply-adds than this stay on the calling thread.
const PAR_MIN: usize = 1 << 21;

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::im2col::contiguous(v, l, "attention core")
}

impl CustomOp3 for Core {
    fn name(&self) -> &'static str {
        "vdg-attention-core"
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
        let d = self.dims(l1, l2, l3)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.forward(slice(q, l1)?, slice(k, l2)?, slice(v, l3)?, d))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.forward(slice(q, l1)?, slice(k, l2)?, slice(v, l3)?, d))
            }
            _ => candle_core::bail!("attention core: float32 or float64 only"),
        };
        Ok((out, Shape::from((d.b, d.tq, d.w))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let d = self.dims(q.layout(), k.layout(), v.layout())?;
        let dev = q.device().clone();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (
            candle_core::Storage::Cpu(qs),
            candle_core::Storage::Cpu(ks),
            candle_core::Storage::Cpu(vs),
            candle_core::Storage::Cpu(gs),
        ) = (&*qs, &*ks, &*vs, &*gs)
        else {
            candle_core::bail!("attention core: tensors left the CPU")
        };
        fn run<T: WithDType>(
            op: &Core,
            s: [&[T]; 4],
            d: Dims,
            (ql, kl): (&Layout, &Layout),
            dev: &candle_core::Device,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dq, dk, dv) = op.backward(s, d);
            Ok((
                Some(Tensor::from_vec(dq, ql.shape(), dev)?),
                Some(Tensor::from_vec(dk, kl.shape(), dev)?),
                Some(Tensor::from_vec(dv, kl.shape(), dev)?),
            ))
        }
        match (qs, ks, vs, gs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v), CpuStorage::F32(g)) => {
                let s = [slice(q, ql)?, slice(k, kl)?, slice(v, vl)?, slice(g, gl)?];
                run(self, s, d, (ql, kl), &dev)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v), CpuStorage::F64(g)) => {
                let s = [slice(q, ql)?, slice(k, kl)?, slice(v, vl)?, slice(g, gl)?];
                run(self, s, d, (ql, kl), &dev)
            }
            _ => candle_core::bail!("attention core: float32 or float64 only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use std::sync::Arc;

    use super::{Core, core};
    use candle_nn::{VarBuilder, VarMap};

    use crate::init::{seeded_init, seeded_randn};
    use crate::nn::{AttentionConfig, MultiHeadAttention, seed_dropout};

    /// The fused core inside multi-head attention against candle's composition: the same
    /// values and the same gradients for the inputs and every weight, for self-attention (one
    /// fused projection), cross-attention, the causal mask and dropout on the weights.
    #[test]
    fn fused_attention_equals_the_composed_one_with_gradients() {
        let dev = Device::Cpu;
        let cfg = AttentionConfig {
            width: 12,
            heads: 3,
            ff_width: 8,
            dropout: 0.3,
        };
        let vm = VarMap::new();
        let mha =
            MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
        seeded_init(&vm, 5).unwrap();
        let x = Var::from_tensor(&seeded_randn(&[3, 4, 12], 1, DType::F64, &dev).unwrap()).unwrap();
        let y = Var::from_tensor(&seeded_randn(&[3, 6, 12], 2, DType::F64, &dev).unwrap()).unwrap();
        let w = seeded_randn(&[3, 4, 12], 3, DType::F64, &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let mut params: Vec<Tensor> = vm
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        params.extend([x.as_tensor().clone(), y.as_tensor().clone()]);
        for (keys, causal, train) in [
            (x.as_tensor(), false, false),
            (x.as_tensor(), true, false),
            (x.as_tensor(), true, true),
            (y.as_tensor(), false, true),
        ] {
            seed_dropout(9);
            let ours = mha.forward_t(x.as_tensor(), keys, causal, train).unwrap();
            seed_dropout(9);
            let theirs = mha.composed(x.as_tensor(), keys, causal, train).unwrap();
            let d = max_diff(&ours, &theirs);
            assert!(
                d < 1e-12,
                "values differ by {d} (causal {causal}, train {train})"
            );
            let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for p in &params {
                match (g1.get(p), g2.get(p)) {
                    (Some(a), Some(b)) => {
                        let d = max_diff(a, b);
                        assert!(d < 1e-11, "gradient differs by {d} (causal {causal})");
                    }
                    (None, None) => {}
                    (a, b) => panic!("gradient present {} vs {}", a.is_some(), b.is_some()),
                }
            }
        }
        // Dropout really drops: two draws give different outputs.
        let a = mha
            .forward_t(x.as_tensor(), x.as_tensor(), false, true)
            .unwrap();
        let b = mha
            .forward_t(x.as_tensor(), x.as_tensor(), false, true)
            .unwrap();
        assert!(max_diff(&a, &b) > 1e-3);
    }

    /// Mismatched shapes are errors, not panics.
    #[test]
    fn the_core_checks_its_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 4, 8), DType::F32, &dev).unwrap();
        let short = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let op = |heads, mask: Option<usize>| Core {
            heads,
            causal: false,
            mask: mask.map(|n| Arc::new(vec![1.0; n])),
        };
        assert!(core(&q, &k, &k, op(3, None)).is_err());
        assert!(core(&q, &k, &short, op(2, None)).is_err());
        assert!(core(&q, &k, &k, op(2, Some(7))).is_err());
        let out = core(&q, &k, &k, op(2, Some(2 * 2 * 3 * 4))).unwrap();
        assert_eq!(out.dims(), &[2, 3, 8]);
    }
}
