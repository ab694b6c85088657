//! The APN attention block `T(x, y)` ([`crate::nn::AttentionBlock`]) and APN's relational
//! pyramid ([`crate::models::apn`]) as single operations on the CPU: forward and backward
//! written on slices, every product one `gemm` call on the matrices as they lie.
//!
//! Composed from the layer ops (`rowops::Linear`, the attention core, `rowops::layer_norm`)
//! the block is about twenty graph nodes per call, and APN calls it seven times per training
//! forward (eleven in evaluation): candle then allocates every output, in backward zero-fills
//! a gradient buffer per node and adds each gradient into it (the parameters' too, once per
//! call), transposes and copies operands for its products, and keeps the values it needs as
//! separate tensors (BENCHMARKS.md, "The APN head as one operation"). Here the activations
//! are kept in the op, each gradient is written once, the parameters' gradients of all calls
//! are summed in one buffer, and they are computed only when the parameters track a gradient
//! (ADA's ascent on a detached twin of the weights needs only the input's). In the pyramid,
//! projections that several calls share (the local calls' self-attention projections are
//! rows of the global call's; every cross call projects `G` alike) are computed once, and
//! their gradients summed before one backward through them.
//!
//! The parameters enter as one flat tensor ([`crate::nn::AttentionBlock::pack`], one
//! concatenation; a custom op takes at most three inputs), with a copy whose weights are
//! transposed to the layout `gemm` reads without repacking.
//!
//! The batch is cut into [`PARTS`] fixed parts computed on their own (on two threads when
//! there are two): the result does not depend on the number of threads. The dropout masks
//! are drawn before the op runs, in the order the composed block draws them, so both give
//! the same values from the same seed (the tests compare them).

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::attention::{Core, Dims};
use crate::cpu_gemm::{Mat, Real, gemm_serial as gemm};
use crate::nn::{AttentionConfig, LAYER_NORM_EPS, dropout_mask};
use crate::rowops::{affine_normalize, affine_normalize_grad, bias_relu, col_sum};

/// Offsets of one attention layer's parameters in the packed vector.
#[derive(Debug, Clone, Copy)]
struct MhaAt {
    wq: usize,
    bq: usize,
    wk: usize,
    bk: usize,
    wv: usize,
    bv: usize,
    gamma: usize,
    beta: usize,
}

/// Offsets of one feed-forward layer's parameters in the packed vector.
#[derive(Debug, Clone, Copy)]
struct FfnAt {
    wi: usize,
    bi: usize,
    wo: usize,
    bo: usize,
    gamma: usize,
    beta: usize,
}

/// Where each parameter lies in the packed vector: the order of
/// [`crate::nn::AttentionBlock::pack`] (encoder self-attention, encoder feed-forward, decoder
/// self-attention, cross-attention, decoder feed-forward; in each, weight then bias per
/// linear layer in the order q, k, v or inner, outer, then the norm's gain and shift).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Packing {
    enc_self: MhaAt,
    enc_ff: FfnAt,
    dec_self: MhaAt,
    dec_cross: MhaAt,
    dec_ff: FfnAt,
    /// Values in all.
    pub(crate) len: usize,
}

/// Hands out consecutive ranges of the packed vector.
struct Cursor(usize);

impl Cursor {
    fn take(&mut self, n: usize) -> usize {
        self.0 += n;
        self.0 - n
    }

    fn mha(&mut self, w: usize) -> MhaAt {
        MhaAt {
            wq: self.take(w * w),
            bq: self.take(w),
            wk: self.take(w * w),
            bk: self.take(w),
            wv: self.take(w * w),
            bv: self.take(w),
            gamma: self.take(w),
            beta: self.take(w),
        }
    }

    fn ffn(&mut self, w: usize, f: usize) -> FfnAt {
        FfnAt {
            wi: self.take(w * f),
            bi: self.take(f),
            wo: self.take(f * w),
            bo: self.take(w),
            gamma: self.take(w),
            beta: self.take(w),
        }
    }
}

impl Packing {
    pub(crate) fn new(cfg: &AttentionConfig) -> Self {
        let (w, f) = (cfg.width, cfg.ff_width);
        let mut c = Cursor(0);
        let enc_self = c.mha(w);
        let enc_ff = c.ffn(w, f);
        let dec_self = c.mha(w);
        let dec_cross = c.mha(w);
        let dec_ff = c.ffn(w, f);
        Packing {
            enc_self,
            enc_ff,
            dec_self,
            dec_cross,
            dec_ff,
            len: c.0,
        }
    }

    /// `(offset, out, in)` of every weight matrix.
    fn weights(&self, cfg: &AttentionConfig) -> Vec<(usize, usize, usize)> {
        let (w, f) = (cfg.width, cfg.ff_width);
        let mut out = Vec::new();
        for m in [self.enc_self, self.dec_self, self.dec_cross] {
            out.extend([(m.wq, w, w), (m.wk, w, w), (m.wv, w, w)]);
        }
        for m in [self.enc_ff, self.dec_ff] {
            out.extend([(m.wi, f, w), (m.wo, w, f)]);
        }
        out
    }

    /// `p` with every weight `[out, in]` transposed to `[in, out]` in place of it, the
    /// weights and the values between them copied on rayon's threads.
    fn transpose_weights<T: Real>(&self, cfg: &AttentionConfig, p: &[T]) -> Vec<T> {
        let mut t = spare_buffer(p.len());
        let mut weights = self.weights(cfg);
        weights.sort_unstable_by_key(|&(at, ..)| at);
        // `t` cut into the weights and the runs of values between them.
        let mut jobs = Vec::with_capacity(2 * weights.len() + 1);
        let (mut rest, mut at) = (&mut t[..], 0);
        for (w_at, o, i) in weights {
            let (gap, tail) = rest.split_at_mut(w_at - at);
            let (weight, tail) = tail.split_at_mut(o * i);
            jobs.push((at, gap, None));
            jobs.push((w_at, weight, Some((o, i))));
            (rest, at) = (tail, w_at + o * i);
        }
        jobs.push((at, rest, None));
        jobs.into_par_iter()
            .for_each(|(at, dst, shape)| match shape {
                Some((o, i)) => transpose(&p[at..at + o * i], dst, (o, i)),
                None => dst.copy_from_slice(&p[at..at + dst.len()]),
            });
        t
    }
}

/// `dst [i, o]` = the transpose of `src [o, i]`, in square tiles. Each tile is written a
/// destination row at a time: walking the source rows instead writes `o` values apart, and at
/// `o = 1024` (a power of two; the feed-forward layers' first weight) those stores fall into
/// the same few cache sets, 5-6 times slower (BENCHMARKS.md, "The serial part of the APN
/// step").
fn transpose<T: Copy>(src: &[T], dst: &mut [T], (o, i): (usize, usize)) {
    const TILE: usize = 32;
    for r0 in (0..o).step_by(TILE) {
        let r1 = (r0 + TILE).min(o);
        for c0 in (0..i).step_by(TILE) {
            for c in c0..(c0 + TILE).min(i) {
                for (d, r) in dst[c * o + r0..c * o + r1].iter_mut().zip(r0..r1) {
                    *d = src[r * i + c];
                }
            }
        }
    }
}

/// The block's parameters packed into one tensor ([`crate::nn::AttentionBlock::pack`]), and,
/// made by the first call that uses them, a copy with every weight transposed to `[in,
/// out]`: the layout `gemm` reads without repacking for `x W^T` (it gathers a row-major `W`
/// element by element on every product: 7 % of an APN step in a profile). The calls of one
/// forward share both.
#[derive(Debug, Clone)]
pub struct Packed {
    tensor: Tensor,
    transposed: Arc<Transposed>,
}

#[derive(Debug, Default)]
struct Transposed {
    f32: OnceLock<Vec<f32>>,
    f64: OnceLock<Vec<f64>>,
}

/// Float32 buffers of dropped transposed copies, for the next copy of the same size: every
/// training forward makes one (6.5 MB for APN's block), and a fresh zero-filled buffer cost
/// about as much as the transposition itself in fresh pages (BENCHMARKS.md, "The serial part
/// of the APN step"). At most [`SPARES`] are kept.
static SPARE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Buffers [`SPARE`] keeps.
const SPARES: usize = 4;

impl Drop for Transposed {
    fn drop(&mut self) {
        if let (Some(t), Ok(mut spare)) = (self.f32.take(), SPARE.lock())
            && spare.len() < SPARES
        {
            spare.push(t);
        }
    }
}

/// A buffer of `len` values whose contents the caller overwrites: a spare one of that size
/// when there is one, else zeros.
fn spare_buffer<T: Real>(len: usize) -> Vec<T> {
    let reused = SPARE.lock().ok().and_then(|mut spare| {
        let at = spare.iter().position(|b| b.len() == len)?;
        let b: Box<dyn Any> = Box::new(spare.swap_remove(at));
        // Only a float32 buffer can be taken for `T`; a float64 one is made below.
        match b.downcast::<Vec<T>>() {
            Ok(b) => Some(*b),
            Err(b) => {
                if let Ok(b) = b.downcast::<Vec<f32>>() {
                    spare.push(*b);
                }
                None
            }
        }
    });
    reused.unwrap_or_else(|| vec![T::zero(); len])
}

impl Packed {
    pub(crate) fn new(tensor: Tensor) -> Self {
        Packed {
            tensor,
            transposed: Arc::default(),
        }
    }

    /// The packed parameters: `[P / W, W]`, rows of the model width `W` (`[P]` where a
    /// parameter's size is not a multiple of `W`), in either case the values of one flat
    /// vector in the order of `AttentionBlock::pack`.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }
}

/// Dropout multipliers of one block call: on the attention weights of the encoder
/// self-attention `[B, H, Tx, Tx]`, the decoder self-attention `[B, H, Ty, Ty]` and the
/// cross-attention `[B, H, Ty, Tx]`, and on the block's output `[B, Ty, W]` (0 or `1/keep`).
#[derive(Debug, Clone)]
pub(crate) struct Masks {
    attn: [Option<Arc<Vec<f32>>>; 3],
    out: Option<Vec<f32>>,
}

/// Values of the four masks of one item of a call: the three attention layers', the output's.
fn mask_sizes(cfg: &AttentionConfig, (tx, ty): (usize, usize)) -> [usize; 4] {
    let h = cfg.heads;
    [h * tx * tx, h * ty * ty, h * ty * tx, ty * cfg.width]
}

impl Masks {
    /// Draws the masks of a call with `b` items, encoder length `tx`, decoder length `ty`,
    /// in the order the composed block draws them (none outside training).
    pub(crate) fn draw(cfg: &AttentionConfig, (b, tx, ty): Lens, train: bool) -> Self {
        let [a0, a1, a2, out] = mask_sizes(cfg, (tx, ty)).map(|n| b * n);
        let draw = |n| dropout_mask(n, cfg.dropout, train);
        Masks {
            attn: [a0, a1, a2].map(|n| draw(n).map(Arc::new)),
            out: draw(out),
        }
    }

    /// The masks of items `first .. first + n`.
    fn cut(&self, cfg: &AttentionConfig, first: usize, n: usize, lens: (usize, usize)) -> Self {
        let per = mask_sizes(cfg, lens);
        let cut = |m: &Vec<f32>, per: usize| m[first * per..(first + n) * per].to_vec();
        Masks {
            attn: std::array::from_fn(|i| self.attn[i].as_ref().map(|m| Arc::new(cut(m, per[i])))),
            out: self.out.as_ref().map(|m| cut(m, per[3])),
        }
    }

    /// Whether every mask has the size of a call with these lengths.
    fn fit(&self, cfg: &AttentionConfig, (b, tx, ty): Lens) -> bool {
        let per = mask_sizes(cfg, (tx, ty));
        let fits = |m: Option<&Vec<f32>>, i: usize| m.is_none_or(|m| m.len() == b * per[i]);
        (0..3).all(|i| fits(self.attn[i].as_deref(), i)) && fits(self.out.as_ref(), 3)
    }
}

/// Values one attention layer keeps for its backward.
struct MhaActs<T> {
    /// Projected queries, keys and values before their ReLU.
    qp: Vec<T>,
    kp: Vec<T>,
    vp: Vec<T>,
    /// Attention output plus the queries: the norm's input.
    s: Vec<T>,
    /// The layer's output.
    out: Vec<T>,
}

/// Values one feed-forward layer keeps for its backward.
struct FfnActs<T> {
    /// Hidden activations after the ReLU.
    h: Vec<T>,
    /// The norm's input.
    s: Vec<T>,
    /// The layer's output (taken as the block's output for the last layer).
    out: Vec<T>,
}

/// Everything one block call's backward reads.
struct Acts<T> {
    enc_self: MhaActs<T>,
    enc_ff: FfnActs<T>,
    dec_self: MhaActs<T>,
    dec_cross: MhaActs<T>,
    dec_ff: FfnActs<T>,
}

/// `(batch, encoder length, decoder length)`.
type Lens = (usize, usize, usize);

/// An attention layer's projected queries, keys and values (or their gradients).
type Qkv<T> = [Vec<T>; 3];

/// Gradients of `x`, `y` and, when wanted, the packed parameters.
type Grads<T> = (Vec<T>, Vec<T>, Option<Vec<T>>);

/// Parts the batch is cut into, computed on their own (on two threads when there are two):
/// fixed, so the numbers do not depend on the number of threads.
pub const PARTS: usize = 2;

/// `(first item, items)` of every part of a batch of `b`.
fn parts(b: usize) -> Vec<(usize, usize)> {
    let size = b.div_ceil(PARTS).max(1);
    (0..b)
        .step_by(size)
        .map(|first| (first, size.min(b - first)))
        .collect()
}

/// `x W^T + b` (then a ReLU) for `x [rows, i]` and the transposed weight `W^T [i, o]`:
/// `[rows, o]`.
fn linear<T: Real>(
    x: &[T],
    wt: &[T],
    b: &[T],
    (rows, i, o): (usize, usize, usize),
    relu: bool,
) -> Vec<T> {
    let mut y = vec![T::zero(); rows * o];
    gemm(
        &mut y,
        Mat::rows(x, i),
        Mat::rows(wt, o),
        (rows, o, i),
        false,
    );
    bias_relu(&mut y, b, relu);
    y
}

/// `dst += src`.
fn add_into<T: Real>(dst: &mut [T], src: &[T]) {
    for (a, &v) in dst.iter_mut().zip(src) {
        *a += v;
    }
}

/// Backward of [`linear`] (after any ReLU) for the output gradient `g [rows, o]`: `dx += g W`
/// when `dx` is given; `dW += g^T x` and `db +=` column sums of `g` in `dp` at the weight's
/// and bias's offsets when `dp` is given.
#[allow(clippy::too_many_arguments)]
fn linear_back<T: Real>(
    g: &[T],
    x: &[T],
    p: &[T],
    (w_at, b_at): (usize, usize),
    (rows, i, o): (usize, usize, usize),
    dx: Option<&mut [T]>,
    dp: Option<&mut [T]>,
) {
    if let Some(dx) = dx {
        gemm(
            dx,
            Mat::rows(g, o),
            Mat::rows(&p[w_at..w_at + o * i], i),
            (rows, i, o),
            true,
        );
    }
    if let Some(dp) = dp {
        gemm(
            &mut dp[w_at..w_at + o * i],
            Mat::t(g, o),
            Mat::rows(x, i),
            (o, i, rows),
            true,
        );
        add_into(&mut dp[b_at..b_at + o], &col_sum(g, o));
    }
}

/// The block's computation on slices, shared by [`BlockOp`] and [`PyramidOp`].
#[derive(Debug, Clone, Copy)]
struct Engine {
    cfg: AttentionConfig,
    at: Packing,
}

impl Engine {
    fn new(cfg: AttentionConfig) -> Self {
        Engine {
            cfg,
            at: Packing::new(&cfg),
        }
    }

    fn core(&self, m: &Masks, which: usize, causal: bool) -> Core {
        Core {
            heads: self.cfg.heads,
            causal,
            mask: m.attn[which].clone(),
        }
    }

    fn dims(&self, b: usize, tq: usize, tk: usize) -> Dims {
        let w = self.cfg.width;
        Dims {
            b,
            tq,
            tk,
            w,
            dh: w / self.cfg.heads,
        }
    }

    /// Whether the packed parameters and the width fit this configuration.
    fn fits(&self, w: usize, lp: &Layout) -> bool {
        let h = self.cfg.heads;
        w == self.cfg.width
            && h > 0
            && w.is_multiple_of(h)
            && lp.shape().elem_count() == self.at.len
    }

    /// The packed parameters with transposed weights, made once per packing.
    fn transposed<'a, T: Real>(&self, cache: &'a Transposed, p: &[T]) -> &'a [T] {
        let make = || self.at.transpose_weights(&self.cfg, p);
        if let Some(cell) = (&cache.f32 as &dyn Any).downcast_ref::<OnceLock<Vec<T>>>() {
            cell.get_or_init(make)
        } else if let Some(cell) = (&cache.f64 as &dyn Any).downcast_ref::<OnceLock<Vec<T>>>() {
            cell.get_or_init(make)
        } else {
            unreachable!("Real is f32 or f64")
        }
    }

    /// The projected queries, keys and values of one attention layer (before the core's
    /// ReLU): `q_in [rq, W]`, `k_in [rk, W]`.
    fn project<T: Real>(
        &self,
        pt: &[T],
        at: MhaAt,
        (q_in, k_in): (&[T], &[T]),
        (rq, rk): (usize, usize),
    ) -> Qkv<T> {
        let w = self.cfg.width;
        let lin = |x: &[T], wo: usize, bo: usize, rows: usize| {
            linear(x, &pt[wo..wo + w * w], &pt[bo..bo + w], (rows, w, w), false)
        };
        [
            lin(q_in, at.wq, at.bq, rq),
            lin(k_in, at.wk, at.bk, rk),
            lin(k_in, at.wv, at.bv, rk),
        ]
    }

    /// One attention layer on the packed parameters with transposed weights `pt`; its
    /// projections `given` where another call computed them.
    fn mha_fwd<T: Real>(
        &self,
        pt: &[T],
        at: MhaAt,
        (q_in, k_in): (&[T], &[T]),
        (d, core): (Dims, &Core),
        given: Option<Qkv<T>>,
    ) -> MhaActs<T> {
        let w = d.w;
        let [qp, kp, vp] =
            given.unwrap_or_else(|| self.project(pt, at, (q_in, k_in), (d.b * d.tq, d.b * d.tk)));
        let mut s = core.forward(&qp, &kp, &vp, d);
        add_into(&mut s, q_in);
        let out = affine_normalize(
            &s,
            &pt[at.gamma..at.gamma + w],
            &pt[at.beta..at.beta + w],
            LAYER_NORM_EPS,
        );
        MhaActs { qp, kp, vp, s, out }
    }

    /// One feed-forward layer on the packed parameters with transposed weights `pt`.
    fn ffn_fwd<T: Real>(&self, pt: &[T], at: FfnAt, a: &[T], rows: usize) -> FfnActs<T> {
        let (w, f) = (self.cfg.width, self.cfg.ff_width);
        let h = linear(
            a,
            &pt[at.wi..at.wi + f * w],
            &pt[at.bi..at.bi + f],
            (rows, w, f),
            true,
        );
        let mut s = linear(
            &h,
            &pt[at.wo..at.wo + w * f],
            &pt[at.bo..at.bo + w],
            (rows, f, w),
            false,
        );
        add_into(&mut s, a);
        let out = affine_normalize(
            &s,
            &pt[at.gamma..at.gamma + w],
            &pt[at.beta..at.beta + w],
            LAYER_NORM_EPS,
        );
        FfnActs { h, s, out }
    }

    /// One block call `T(x, y)`: its activations and output `[b, ty, W]`. `shared` holds
    /// the projections of the encoder's and the decoder's self-attention where the caller
    /// computed them (rows of other calls' projections).
    fn forward<T: Real>(
        &self,
        m: &Masks,
        (x, y): (&[T], &[T]),
        pt: &[T],
        (b, tx, ty): Lens,
        [enc, dec]: [Option<Qkv<T>>; 2],
    ) -> (Acts<T>, Vec<T>) {
        let at = self.at;
        let enc_self = self.mha_fwd(
            pt,
            at.enc_self,
            (x, x),
            (self.dims(b, tx, tx), &self.core(m, 0, false)),
            enc,
        );
        let enc_ff = self.ffn_fwd(pt, at.enc_ff, &enc_self.out, b * tx);
        let dec_self = self.mha_fwd(
            pt,
            at.dec_self,
            (y, y),
            (self.dims(b, ty, ty), &self.core(m, 1, true)),
            dec,
        );
        let dec_cross = self.mha_fwd(
            pt,
            at.dec_cross,
            (&dec_self.out, &enc_ff.out),
            (self.dims(b, ty, tx), &self.core(m, 2, false)),
            None,
        );
        let mut dec_ff = self.ffn_fwd(pt, at.dec_ff, &dec_cross.out, b * ty);
        let mut out = std::mem::take(&mut dec_ff.out);
        if let Some(mask) = &m.out {
            for (v, &k) in out.iter_mut().zip(mask) {
                *v *= T::from_f64(f64::from(k));
            }
        }
        let acts = Acts {
            enc_self,
            enc_ff,
            dec_self,
            dec_cross,
            dec_ff,
        };
        (acts, out)
    }

    /// Backward of one attention layer for its output gradient `g`: the queries' gradient is
    /// added into `dq`, the keys' into `dk` (into `dq` for self-attention, `dk = None`).
    /// With `shared` the projections came from the caller: the gradients of the projected
    /// queries, keys and values are returned instead of taken through the projections
    /// (only the residual's part of the queries' gradient goes into `dq`).
    #[allow(clippy::too_many_arguments)]
    fn mha_back<T: Real>(
        &self,
        p: &[T],
        at: MhaAt,
        acts: &MhaActs<T>,
        inputs: (&[T], &[T]),
        (d, core, shared): (Dims, &Core, bool),
        g: &[T],
        dq: &mut [T],
        dk: Option<&mut [T]>,
        mut dp: Option<&mut [T]>,
    ) -> Option<Qkv<T>> {
        let w = d.w;
        let (ds, dg, db) =
            affine_normalize_grad(&acts.s, &p[at.gamma..at.gamma + w], g, LAYER_NORM_EPS);
        if let Some(dp) = dp.as_deref_mut() {
            add_into(&mut dp[at.gamma..at.gamma + w], &dg);
            add_into(&mut dp[at.beta..at.beta + w], &db);
        }
        add_into(dq, &ds);
        let (dqp, dkp, dvp) = core.backward([&acts.qp, &acts.kp, &acts.vp, &ds], d);
        let grads = [dqp, dkp, dvp];
        if shared {
            return Some(grads);
        }
        let rows = (d.b * d.tq, d.b * d.tk);
        self.project_back(p, at, inputs, rows, &grads, dq, dk, dp);
        None
    }

    /// Backward of [`Engine::project`] for the gradients `grads` of the projected queries,
    /// keys and values: the queries' input gradient is added into `dq`, the keys' into `dk`
    /// (into `dq` when `dk = None`), the parameters' into `dp` when given.
    #[allow(clippy::too_many_arguments)]
    fn project_back<T: Real>(
        &self,
        p: &[T],
        at: MhaAt,
        (q_in, k_in): (&[T], &[T]),
        (rq, rk): (usize, usize),
        [dqp, dkp, dvp]: &Qkv<T>,
        dq: &mut [T],
        dk: Option<&mut [T]>,
        mut dp: Option<&mut [T]>,
    ) {
        let w = self.cfg.width;
        let (wq, wk, wv) = ((at.wq, at.bq), (at.wk, at.bk), (at.wv, at.bv));
        linear_back(
            dqp,
            q_in,
            p,
            wq,
            (rq, w, w),
            Some(&mut *dq),
            dp.as_deref_mut(),
        );
        let dk = match dk {
            Some(dk) => dk,
            None => dq,
        };
        linear_back(
            dkp,
            k_in,
            p,
            wk,
            (rk, w, w),
            Some(&mut *dk),
            dp.as_deref_mut(),
        );
        linear_back(dvp, k_in, p, wv, (rk, w, w), Some(dk), dp);
    }

    /// Backward of one feed-forward layer on input `a` for its output gradient `g`: the
    /// input's gradient is added into `da`.
    #[allow(clippy::too_many_arguments)]
    fn ffn_back<T: Real>(
        &self,
        p: &[T],
        at: FfnAt,
        acts: &FfnActs<T>,
        (a, rows): (&[T], usize),
        g: &[T],
        da: &mut [T],
        mut dp: Option<&mut [T]>,
    ) {
        let (w, f) = (self.cfg.width, self.cfg.ff_width);
        let (ds, dg, db) =
            affine_normalize_grad(&acts.s, &p[at.gamma..at.gamma + w], g, LAYER_NORM_EPS);
        if let Some(dp) = dp.as_deref_mut() {
            add_into(&mut dp[at.gamma..at.gamma + w], &dg);
            add_into(&mut dp[at.beta..at.beta + w], &db);
        }
        add_into(da, &ds);
        let mut dh = vec![T::zero(); rows * f];
        let wo = (at.wo, at.bo);
        linear_back(
            &ds,
            &acts.h,
            p,
            wo,
            (rows, f, w),
            Some(&mut dh),
            dp.as_deref_mut(),
        );
        // Through the ReLU (a select, so the loop vectorises).
        for (g, &h) in dh.iter_mut().zip(&acts.h) {
            *g = if h > T::zero() { *g } else { T::zero() };
        }
        linear_back(&dh, a, p, (at.wi, at.bi), (rows, w, f), Some(da), dp);
    }

    /// Backward of one block call for its output's gradient `g`: the gradients of `x` and
    /// `y`, and the parameters' added into `dp` when given. Where `shared` says the encoder's
    /// or the decoder's self-attention projections came from the caller, the gradients of
    /// those projections are returned for the caller to take through them, and `x`'s or
    /// `y`'s gradient holds only the rest.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        m: &Masks,
        (x, y, p): (&[T], &[T], &[T]),
        acts: &Acts<T>,
        (b, tx, ty): Lens,
        g: &[T],
        mut dp: Option<&mut [T]>,
        [enc, dec]: [bool; 2],
    ) -> (Vec<T>, Vec<T>, [Option<Qkv<T>>; 2]) {
        let (at, w) = (self.at, self.cfg.width);
        let mut g3 = g.to_vec();
        if let Some(mask) = &m.out {
            for (v, &k) in g3.iter_mut().zip(mask) {
                *v *= T::from_f64(f64::from(k));
            }
        }
        let mut g2 = vec![T::zero(); b * ty * w];
        let cross_in = (&acts.dec_cross.out[..], b * ty);
        self.ffn_back(
            p,
            at.dec_ff,
            &acts.dec_ff,
            cross_in,
            &g3,
            &mut g2,
            dp.as_deref_mut(),
        );
        let (mut g1, mut genc) = (vec![T::zero(); b * ty * w], vec![T::zero(); b * tx * w]);
        self.mha_back(
            p,
            at.dec_cross,
            &acts.dec_cross,
            (&acts.dec_self.out, &acts.enc_ff.out),
            (self.dims(b, ty, tx), &self.core(m, 2, false), false),
            &g2,
            &mut g1,
            Some(&mut genc),
            dp.as_deref_mut(),
        );
        let mut dy = vec![T::zero(); b * ty * w];
        let dec = self.mha_back(
            p,
            at.dec_self,
            &acts.dec_self,
            (y, y),
            (self.dims(b, ty, ty), &self.core(m, 1, true), dec),
            &g1,
            &mut dy,
            None,
            dp.as_deref_mut(),
        );
        let mut ga = vec![T::zero(); b * tx * w];
        let enc_in = (&acts.enc_self.out[..], b * tx);
        self.ffn_back(
            p,
            at.enc_ff,
            &acts.enc_ff,
            enc_in,
            &genc,
            &mut ga,
            dp.as_deref_mut(),
        );
        let mut dx = vec![T::zero(); b * tx * w];
        let enc = self.mha_back(
            p,
            at.enc_self,
            &acts.enc_self,
            (x, x),
            (self.dims(b, tx, tx), &self.core(m, 0, false), enc),
            &ga,
            &mut dx,
            None,
            dp,
        );
        (dx, dy, [enc, dec])
    }
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::im2col::contiguous(v, l, "attention block")
}

fn poisoned<E>(_: E) -> candle_core::Error {
    candle_core::Error::Msg("attention block: a thread panicked".into())
}

/// The storages of CPU tensors.
fn cpu_storages<G: std::ops::Deref<Target = Storage>, const N: usize>(
    guards: &[G; N],
) -> candle_core::Result<[&CpuStorage; N]> {
    let mut out = Vec::with_capacity(N);
    for g in guards {
        match &**g {
            Storage::Cpu(s) => out.push(s),
            _ => candle_core::bail!("attention block: tensors left the CPU"),
        }
    }
    out.try_into()
        .map_err(|_| candle_core::Error::Msg("attention block: storages".into()))
}

/// The gradients that are wanted as tensors of the inputs' shapes.
#[allow(clippy::type_complexity)]
fn tensors<T: Real>(
    (dx, dy, dp): Grads<T>,
    (want_x, want_y, _): (bool, bool, bool),
    (sx, sy, sp): (&Shape, &Shape, &Shape),
    dev: &candle_core::Device,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    Ok((
        want_x.then(|| Tensor::from_vec(dx, sx, dev)).transpose()?,
        want_y.then(|| Tensor::from_vec(dy, sy, dev)).transpose()?,
        dp.map(|dp| Tensor::from_vec(dp, sp, dev)).transpose()?,
    ))
}

/// Activations of every part, by dtype.
enum Saved<A32, A64> {
    F32(Vec<A32>),
    F64(Vec<A64>),
}

/// The block `T(x, y)` as a custom op on `x [B, Tx, W]`, `y [B, Ty, W]` and the packed
/// parameters.
pub(crate) struct BlockOp {
    engine: Engine,
    masks: Masks,
    /// Each part's masks and activations (dropped with the op when nothing tracks a
    /// gradient).
    saved: Mutex<Option<BlockSaved>>,
    transposed: Arc<Transposed>,
}

type BlockSaved = Saved<(Masks, Acts<f32>), (Masks, Acts<f64>)>;

impl BlockOp {
    pub(crate) fn new(cfg: AttentionConfig, packed: &Packed, masks: Masks) -> Self {
        BlockOp {
            engine: Engine::new(cfg),
            masks,
            saved: Mutex::new(None),
            transposed: packed.transposed.clone(),
        }
    }

    fn check(&self, lx: &Layout, ly: &Layout, lp: &Layout) -> candle_core::Result<Lens> {
        let (b, tx, w) = lx.shape().dims3()?;
        let (b2, ty, w2) = ly.shape().dims3()?;
        let lens = (b, tx, ty);
        if b != b2 || w2 != w || !self.engine.fits(w, lp) || !self.masks.fit(&self.engine.cfg, lens)
        {
            candle_core::bail!(
                "attention block: x {:?}, y {:?}, {} parameters for width {}, {} heads",
                lx.dims(),
                ly.dims(),
                lp.dims().iter().product::<usize>(),
                self.engine.cfg.width,
                self.engine.cfg.heads
            );
        }
        Ok(lens)
    }

    /// Every part (in parallel): the activations by part and the output.
    #[allow(clippy::type_complexity)]
    fn forward_all<T: Real>(
        &self,
        (x, y, p): (&[T], &[T], &[T]),
        (b, tx, ty): Lens,
    ) -> (Vec<(Masks, Acts<T>)>, Vec<T>) {
        let (e, w) = (&self.engine, self.engine.cfg.width);
        let pt = e.transposed(&self.transposed, p);
        let done: Vec<_> = parts(b)
            .into_par_iter()
            .map(|(first, n)| {
                let m = self.masks.cut(&e.cfg, first, n, (tx, ty));
                let xs = &x[first * tx * w..(first + n) * tx * w];
                let ys = &y[first * ty * w..(first + n) * ty * w];
                let (acts, out) = e.forward(&m, (xs, ys), pt, (n, tx, ty), [None, None]);
                ((m, acts), out)
            })
            .collect();
        let mut out = Vec::with_capacity(y.len());
        let mut saved = Vec::with_capacity(done.len());
        for (s, o) in done {
            out.extend_from_slice(&o);
            saved.push(s);
        }
        (saved, out)
    }

    /// Gradients of `x`, `y` and (when `params`) the packed parameters, every part in
    /// parallel; the parts' parameter gradients are added in order.
    fn backward_all<T: Real>(
        &self,
        (x, y, p): (&[T], &[T], &[T]),
        saved: &[(Masks, Acts<T>)],
        (b, tx, ty): Lens,
        g: &[T],
        params: bool,
    ) -> Grads<T> {
        let (e, w) = (&self.engine, self.engine.cfg.width);
        let done: Vec<_> = parts(b)
            .into_par_iter()
            .zip(saved)
            .map(|((first, n), (m, acts))| {
                let (xr, yr) = (
                    first * tx * w..(first + n) * tx * w,
                    first * ty * w..(first + n) * ty * w,
                );
                let mut dp = params.then(|| vec![T::zero(); e.at.len]);
                let s = (&x[xr], &y[yr.clone()], p);
                let dp_at = dp.as_deref_mut();
                let (dx, dy, _) = e.backward(m, s, acts, (n, tx, ty), &g[yr], dp_at, [false; 2]);
                (dx, dy, dp)
            })
            .collect();
        join_parts(done, (x.len(), y.len()))
    }
}

/// The parts' input gradients concatenated, their parameter gradients added in order.
fn join_parts<T: Real>(done: Vec<Grads<T>>, (nx, ny): (usize, usize)) -> Grads<T> {
    let (mut dx, mut dy) = (Vec::with_capacity(nx), Vec::with_capacity(ny));
    let mut dp: Option<Vec<T>> = None;
    for (gx, gy, gp) in done {
        dx.extend_from_slice(&gx);
        dy.extend_from_slice(&gy);
        dp = match (dp, gp) {
            (Some(mut acc), Some(gp)) => {
                add_into(&mut acc, &gp);
                Some(acc)
            }
            (acc, gp) => acc.or(gp),
        };
    }
    (dx, dy, dp)
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "vdg-attention-block"
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
        let lens = self.check(l1, l2, l3)?;
        let (saved, out) = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(p)) => {
                let s = (slice(x, l1)?, slice(y, l2)?, slice(p, l3)?);
                let (acts, out) = self.forward_all(s, lens);
                (Saved::F32(acts), CpuStorage::F32(out))
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(p)) => {
                let s = (slice(x, l1)?, slice(y, l2)?, slice(p, l3)?);
                let (acts, out) = self.forward_all(s, lens);
                (Saved::F64(acts), CpuStorage::F64(out))
            }
            _ => candle_core::bail!("attention block: float32 or float64 only"),
        };
        *self.saved.lock().map_err(poisoned)? = Some(saved);
        Ok((out, Shape::from((lens.0, lens.2, self.engine.cfg.width))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let lens = self.check(x.layout(), y.layout(), p.layout())?;
        let dev = x.device().clone();
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let guards = [xs, ys, ps, gs];
        let [xs, ys, ps, gs] = cpu_storages(&guards)?;
        let saved = self.saved.lock().map_err(poisoned)?;
        let want = (x.track_op(), y.track_op(), p.track_op());
        let shapes = (xl.shape(), yl.shape(), pl.shape());
        match (xs, ys, ps, gs, &*saved) {
            (
                CpuStorage::F32(xv),
                CpuStorage::F32(yv),
                CpuStorage::F32(pv),
                CpuStorage::F32(gv),
                Some(Saved::F32(acts)),
            ) => {
                let s = (slice(xv, xl)?, slice(yv, yl)?, slice(pv, pl)?);
                let grads = self.backward_all(s, acts, lens, slice(gv, gl)?, want.2);
                tensors(grads, want, shapes, &dev)
            }
            (
                CpuStorage::F64(xv),
                CpuStorage::F64(yv),
                CpuStorage::F64(pv),
                CpuStorage::F64(gv),
                Some(Saved::F64(acts)),
            ) => {
                let s = (slice(xv, xl)?, slice(yv, yl)?, slice(pv, pl)?);
                let grads = self.backward_all(s, acts, lens, slice(gv, gl)?, want.2);
                tensors(grads, want, shapes, &dev)
            }
            _ => candle_core::bail!("attention block: float32 or float64 only, forward first"),
        }
    }
}

/// APN's relational pyramid over `x [B, M, W]` ([`crate::models::apn`]) as one op, the
/// block's parameters packed: the global relation `G = T(x, x)`; for every scale, in the
/// order given, the subsets' local relations `L = T(x_s, x_s)` and cross relations
/// `C = T(L, G)`, averaged over the scale's subsets and summed over the scales into level
/// II. Output `[2, B, M, W]`: `G`, then level II (zeros without scales).
pub(crate) struct PyramidOp {
    engine: Engine,
    /// Per scale, its subsets (sorted segment indices).
    scales: Vec<Vec<Vec<usize>>>,
    /// The calls' masks in call order: global, then per scale and subset local and cross.
    masks: Vec<Masks>,
    saved: Mutex<Option<PyramidSaved>>,
    transposed: Arc<Transposed>,
}

/// One part's activations: per call its masks, inputs where they are not `x`, activations.
struct PyramidActs<T> {
    global: (Masks, Acts<T>, Vec<T>),
    /// Per scale and subset: the selected segments, the local call, its output, the cross
    /// call.
    calls: Vec<Vec<SubsetActs<T>>>,
}

struct SubsetActs<T> {
    xs: Vec<T>,
    local: (Masks, Acts<T>),
    l: Vec<T>,
    cross: (Masks, Acts<T>),
}

type PyramidSaved = Saved<PyramidActs<f32>, PyramidActs<f64>>;

impl PyramidOp {
    /// The op for `b` clips of `m` segments, drawing the calls' dropout masks in the order
    /// of the composed head.
    pub(crate) fn new(
        cfg: AttentionConfig,
        packed: &Packed,
        (b, m): (usize, usize),
        scales: Vec<Vec<Vec<usize>>>,
        train: bool,
    ) -> Self {
        let mut masks = vec![Masks::draw(&cfg, (b, m, m), train)];
        for subsets in &scales {
            for s in subsets {
                masks.push(Masks::draw(&cfg, (b, s.len(), s.len()), train));
                masks.push(Masks::draw(&cfg, (b, s.len(), m), train));
            }
        }
        PyramidOp {
            engine: Engine::new(cfg),
            scales,
            masks,
            saved: Mutex::new(None),
            transposed: packed.transposed.clone(),
        }
    }

    fn check(&self, lx: &Layout, lp: &Layout) -> candle_core::Result<(usize, usize)> {
        let (b, m, w) = lx.shape().dims3()?;
        let cfg = &self.engine.cfg;
        let mut calls = vec![(b, m, m)];
        let mut subsets_ok = true;
        for subsets in &self.scales {
            subsets_ok &= !subsets.is_empty();
            for s in subsets {
                subsets_ok &= !s.is_empty() && s.iter().all(|&i| i < m);
                calls.extend([(b, s.len(), s.len()), (b, s.len(), m)]);
            }
        }
        let masks_ok = self.masks.len() == calls.len()
            && self.masks.iter().zip(&calls).all(|(k, &c)| k.fit(cfg, c));
        if !self.engine.fits(w, lp) || !subsets_ok || !masks_ok {
            candle_core::bail!(
                "APN pyramid: x {:?}, {} parameters for width {}, subsets {:?}",
                lx.dims(),
                lp.dims().iter().product::<usize>(),
                cfg.width,
                self.scales
            );
        }
        Ok((b, m))
    }

    /// Rows `subset` of every clip of `x [n, m, W]`: `[n, |subset|, W]`.
    fn select<T: Real>(x: &[T], (n, m, w): Lens, subset: &[usize]) -> Vec<T> {
        let mut out = Vec::with_capacity(n * subset.len() * w);
        for clip in 0..n {
            for &i in subset {
                out.extend_from_slice(&x[(clip * m + i) * w..][..w]);
            }
        }
        out
    }

    /// Rows `subset` of every clip of the projections `qkv` (each `[n, m, W]`).
    fn select_qkv<T: Real>(qkv: [&[T]; 3], lens: Lens, subset: &[usize]) -> Qkv<T> {
        qkv.map(|v| Self::select(v, lens, subset))
    }

    /// `dst [n, m, W] +=` the rows of `src [n, |subset|, W]` at the rows `subset` of every
    /// clip: the backward of [`PyramidOp::select`].
    fn scatter_add<T: Real>(dst: &mut [T], src: &[T], (n, m, w): Lens, subset: &[usize]) {
        let k = subset.len();
        for clip in 0..n {
            for (j, &i) in subset.iter().enumerate() {
                let from = &src[(clip * k + j) * w..][..w];
                add_into(&mut dst[(clip * m + i) * w..][..w], from);
            }
        }
    }

    /// One part's pyramid: its activations and `(G, level II)`.
    ///
    /// The local calls' self-attention projections are rows of the global call's (both
    /// project segments of `x` with the same weights; dropout acts only after them), and
    /// every cross call projects `G` for its decoder self-attention: each is computed once,
    /// on all rows, instead of once per call (the same values; 84 of the 647 weight-sized
    /// products per clip of a training forward at `M = 5`).
    fn forward_part<T: Real>(
        &self,
        (first, n): (usize, usize),
        x: &[T],
        pt: &[T],
        m: usize,
    ) -> (PyramidActs<T>, Vec<T>, Vec<T>) {
        let (e, w) = (&self.engine, self.engine.cfg.width);
        let rows = (n * m, n * m);
        let cut = |k: &Masks, (tx, ty): (usize, usize)| k.cut(&e.cfg, first, n, (tx, ty));
        let gm = cut(&self.masks[0], (m, m));
        let shared = [e.at.enc_self, e.at.dec_self].map(|at| Some(e.project(pt, at, (x, x), rows)));
        let (gacts, g) = e.forward(&gm, (x, x), pt, (n, m, m), shared);
        let pg = (!self.scales.is_empty()).then(|| e.project(pt, e.at.dec_self, (&g, &g), rows));
        let mut level2: Option<Vec<T>> = None;
        let mut calls = Vec::with_capacity(self.scales.len());
        let mut at = 1;
        for subsets in &self.scales {
            let mut cross: Option<Vec<T>> = None;
            let mut done = Vec::with_capacity(subsets.len());
            for s in subsets {
                let k = s.len();
                let xs = Self::select(x, (n, m, w), s);
                let lm = cut(&self.masks[at], (k, k));
                let shared = [&gacts.enc_self, &gacts.dec_self]
                    .map(|a| Some(Self::select_qkv([&a.qp, &a.kp, &a.vp], (n, m, w), s)));
                let (lacts, l) = e.forward(&lm, (&xs, &xs), pt, (n, k, k), shared);
                let cm = cut(&self.masks[at + 1], (k, m));
                let (cacts, c) = e.forward(&cm, (&l, &g), pt, (n, k, m), [None, pg.clone()]);
                at += 2;
                cross = Some(match cross {
                    Some(mut acc) => {
                        add_into(&mut acc, &c);
                        acc
                    }
                    None => c,
                });
                done.push(SubsetActs {
                    xs,
                    local: (lm, lacts),
                    l,
                    cross: (cm, cacts),
                });
            }
            if let Some(mut cross) = cross {
                let count = T::from_f64(subsets.len() as f64);
                for v in &mut cross {
                    *v /= count;
                }
                level2 = Some(match level2 {
                    Some(mut acc) => {
                        add_into(&mut acc, &cross);
                        acc
                    }
                    None => cross,
                });
            }
            calls.push(done);
        }
        let level2 = level2.unwrap_or_else(|| vec![T::zero(); g.len()]);
        let acts = PyramidActs {
            global: (gm, gacts, g.clone()),
            calls,
        };
        (acts, g, level2)
    }

    /// One part's gradients of `x` and (added into `dp`) the parameters, for the gradients
    /// `dg` of `G` and `d2` of level II.
    #[allow(clippy::too_many_arguments)]
    fn backward_part<T: Real>(
        &self,
        (x, p): (&[T], &[T]),
        acts: &PyramidActs<T>,
        (n, m): (usize, usize),
        dg: &[T],
        d2: &[T],
        mut dp: Option<&mut [T]>,
    ) -> Vec<T> {
        let (e, w) = (&self.engine, self.engine.cfg.width);
        let rows = (n * m, n * m);
        let zeros = || -> Qkv<T> { std::array::from_fn(|_| vec![T::zero(); x.len()]) };
        // Gradients of the shared projections: `x`'s (encoder, decoder) and `G`'s.
        let (mut dpx, mut dpg) = ([zeros(), zeros()], zeros());
        let mut dx = vec![T::zero(); x.len()];
        let mut dg = dg.to_vec();
        let g = &acts.global.2;
        for (subsets, done) in self.scales.iter().zip(&acts.calls) {
            let count = T::from_f64(subsets.len() as f64);
            let dc: Vec<T> = d2.iter().map(|&v| v / count).collect();
            for (s, sub) in subsets.iter().zip(done) {
                let k = s.len();
                let (cm, cacts) = &sub.cross;
                let inputs = (&sub.l[..], &g[..], p);
                let dp_at = dp.as_deref_mut();
                let (dl, dgc, [_, dec]) =
                    e.backward(cm, inputs, cacts, (n, k, m), &dc, dp_at, [false, true]);
                add_into(&mut dg, &dgc);
                for (acc, d) in dpg.iter_mut().zip(dec.iter().flatten()) {
                    add_into(acc, d);
                }
                let (lm, lacts) = &sub.local;
                let inputs = (&sub.xs[..], &sub.xs[..], p);
                let dp_at = dp.as_deref_mut();
                let (da, db, shared) =
                    e.backward(lm, inputs, lacts, (n, k, k), &dl, dp_at, [true, true]);
                Self::scatter_add(&mut dx, &da, (n, m, w), s);
                Self::scatter_add(&mut dx, &db, (n, m, w), s);
                for (acc, d) in dpx.iter_mut().zip(&shared) {
                    for (acc, d) in acc.iter_mut().zip(d.iter().flatten()) {
                        Self::scatter_add(acc, d, (n, m, w), s);
                    }
                }
            }
        }
        if !self.scales.is_empty() {
            let (g, dp_at) = (&g[..], dp.as_deref_mut());
            e.project_back(p, e.at.dec_self, (g, g), rows, &dpg, &mut dg, None, dp_at);
        }
        let (gm, gacts, _) = &acts.global;
        let dp_at = dp.as_deref_mut();
        let (da, db, shared) = e.backward(gm, (x, x, p), gacts, (n, m, m), &dg, dp_at, [true; 2]);
        add_into(&mut dx, &da);
        add_into(&mut dx, &db);
        let ats = [e.at.enc_self, e.at.dec_self];
        for ((at, acc), d) in ats.into_iter().zip(&mut dpx).zip(&shared) {
            for (acc, d) in acc.iter_mut().zip(d.iter().flatten()) {
                add_into(acc, d);
            }
            e.project_back(p, at, (x, x), rows, acc, &mut dx, None, dp.as_deref_mut());
        }
        dx
    }

    #[allow(clippy::type_complexity)]
    fn forward_all<T: Real>(
        &self,
        (x, p): (&[T], &[T]),
        (b, m): (usize, usize),
    ) -> (Vec<PyramidActs<T>>, Vec<T>) {
        let (e, w) = (&self.engine, self.engine.cfg.width);
        let pt = e.transposed(&self.transposed, p);
        let done: Vec<_> = parts(b)
            .into_par_iter()
            .map(|(first, n)| {
                let xs = &x[first * m * w..(first + n) * m * w];
                self.forward_part((first, n), xs, pt, m)
            })
            .collect();
        let mut out = Vec::with_capacity(2 * x.len());
        let mut saved = Vec::with_capacity(done.len());
        let mut level2 = Vec::with_capacity(x.len());
        for (acts, g, l2) in done {
            out.extend_from_slice(&g);
            level2.extend_from_slice(&l2);
            saved.push(acts);
        }
        out.extend_from_slice(&level2);
        (saved, out)
    }

    fn backward_all<T: Real>(
        &self,
        (x, p): (&[T], &[T]),
        saved: &[PyramidActs<T>],
        (b, m): (usize, usize),
        grad: &[T],
        params: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (e, w) = (&self.engine, self.engine.cfg.width);
        let half = x.len();
        let done: Vec<_> = parts(b)
            .into_par_iter()
            .zip(saved)
            .map(|((first, n), acts)| {
                let r = first * m * w..(first + n) * m * w;
                let (dg, d2) = (&grad[r.clone()], &grad[half + r.start..half + r.end]);
                let mut dp = params.then(|| vec![T::zero(); e.at.len]);
                let dx = self.backward_part((&x[r], p), acts, (n, m), dg, d2, dp.as_deref_mut());
                (dx, Vec::new(), dp)
            })
            .collect();
        let (dx, _, dp) = join_parts(done, (x.len(), 0));
        (dx, dp)
    }
}

impl CustomOp2 for PyramidOp {
    fn name(&self) -> &'static str {
        "vdg-apn-pyramid"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, m) = self.check(l1, l2)?;
        let (saved, out) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => {
                let (acts, out) = self.forward_all((slice(x, l1)?, slice(p, l2)?), (b, m));
                (Saved::F32(acts), CpuStorage::F32(out))
            }
            (CpuStorage::F64(x), CpuStorage::F64(p)) => {
                let (acts, out) = self.forward_all((slice(x, l1)?, slice(p, l2)?), (b, m));
                (Saved::F64(acts), CpuStorage::F64(out))
            }
            _ => candle_core::bail!("APN pyramid: float32 or float64 only"),
        };
        *self.saved.lock().map_err(poisoned)? = Some(saved);
        Ok((out, Shape::from((2, b, m, self.engine.cfg.width))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let bm = self.check(x.layout(), p.layout())?;
        let dev = x.device().clone();
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let guards = [xs, ps, gs];
        let [xs, ps, gs] = cpu_storages(&guards)?;
        let saved = self.saved.lock().map_err(poisoned)?;
        let want = (x.track_op(), false, p.track_op());
        let shapes = (xl.shape(), xl.shape(), pl.shape());
        match (xs, ps, gs, &*saved) {
            (
                CpuStorage::F32(xv),
                CpuStorage::F32(pv),
                CpuStorage::F32(gv),
                Some(Saved::F32(a)),
            ) => {
                let s = (slice(xv, xl)?, slice(pv, pl)?);
                let (dx, dp) = self.backward_all(s, a, bm, slice(gv, gl)?, want.2);
                let (dx, _, dp) = tensors((dx, Vec::new(), dp), want, shapes, &dev)?;
                Ok((dx, dp))
            }
            (
                CpuStorage::F64(xv),
                CpuStorage::F64(pv),
                CpuStorage::F64(gv),
                Some(Saved::F64(a)),
            ) => {
                let s = (slice(xv, xl)?, slice(pv, pl)?);
                let (dx, dp) = self.backward_all(s, a, bm, slice(gv, gl)?, want.2);
                let (dx, _, dp) = tensors((dx, Vec::new(), dp), want, shapes, &dev)?;
                Ok((dx, dp))
            }
            _ => candle_core::bail!("APN pyramid: float32 or float64 only, forward first"),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use crate::init::{detached, seeded_init, seeded_randn};
    use crate::nn::{AttentionBlock, AttentionConfig, seed_dropout};
    use crate::tests::max_diff;

    /// The transposed copy: every weight `[out, in]` as `[in, out]`, every other value as it
    /// was, at widths below, at and across the tile size, also in a reused buffer.
    #[test]
    fn transposing_the_packed_weights_moves_each_weight_and_keeps_the_rest() {
        for (width, ff_width) in [(12, 20), (32, 64), (40, 100)] {
            let cfg = AttentionConfig {
                width,
                heads: 4,
                ff_width,
                dropout: 0.0,
            };
            let at = super::Packing::new(&cfg);
            let p: Vec<f32> = (0..at.len).map(|v| v as f32).collect();
            // A spare buffer of NaNs: every value must be written over.
            super::SPARE.lock().unwrap().push(vec![f32::NAN; at.len]);
            let t = at.transpose_weights(&cfg, &p);
            let mut moved = vec![false; at.len];
            for (w, o, i) in at.weights(&cfg) {
                for r in 0..o {
                    for c in 0..i {
                        assert_eq!(t[w + c * o + r], p[w + r * i + c], "{width}: ({r}, {c})");
                        moved[w + r * i + c] = true;
                    }
                }
            }
            let kept = (0..at.len).filter(|&k| !moved[k]);
            assert!(
                kept.clone().all(|k| t[k] == p[k]),
                "{width}: a bias or gain moved"
            );
            // Per attention layer three biases, a gain and a shift; per feed-forward layer two
            // biases, a gain and a shift.
            assert_eq!(
                kept.count(),
                3 * 5 * width + 2 * (ff_width + 3 * width),
                "{width}"
            );
        }
    }

    /// The fused block against the block composed from its layers: the same values and the
    /// same gradients for both inputs and every parameter, in float64 (1e-11) and float32
    /// (relative 1e-4), for self- and cross-calls, with and without dropout, and with the
    /// parameters packed once and shared by two calls (how APN calls it).
    #[test]
    fn the_fused_block_equals_the_composed_one_with_gradients() {
        let dev = Device::Cpu;
        let cfg = AttentionConfig {
            width: 12,
            heads: 3,
            ff_width: 20,
            dropout: 0.3,
        };
        for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 1e-4)] {
            let vm = VarMap::new();
            let block =
                AttentionBlock::new(cfg, VarBuilder::from_varmap(&vm, dtype, &dev)).unwrap();
            seeded_init(&vm, 5).unwrap();
            let x = Var::from_tensor(&seeded_randn(&[3, 4, 12], 1, dtype, &dev).unwrap()).unwrap();
            let y = Var::from_tensor(&seeded_randn(&[3, 5, 12], 2, dtype, &dev).unwrap()).unwrap();
            let w = seeded_randn(&[3, 5, 12], 3, dtype, &dev).unwrap();
            let wx = seeded_randn(&[3, 4, 12], 4, dtype, &dev).unwrap();
            let mut params: Vec<Tensor> = vm
                .all_vars()
                .iter()
                .map(|v| v.as_tensor().clone())
                .collect();
            params.extend([x.as_tensor().clone(), y.as_tensor().clone()]);
            for train in [false, true] {
                let (x, y) = (x.as_tensor(), y.as_tensor());
                // Calls sharing one packing, as in APN: `g = T(x, x)`, then `T(y, g)` (length
                // of `x`) and `T(g, y)` (length of `y`).
                let packed = block.pack(x).unwrap();
                assert!(
                    packed.is_some(),
                    "{dtype:?}: the fused block runs on the CPU"
                );
                seed_dropout(9);
                let g1 = block.forward_with(packed.as_ref(), x, x, train).unwrap();
                let ours = block.forward_with(packed.as_ref(), y, &g1, train).unwrap();
                let ours_y = block.forward_with(packed.as_ref(), &g1, y, train).unwrap();
                seed_dropout(9);
                let g2 = block.composed(x, x, train).unwrap();
                let theirs = block.composed(y, &g2, train).unwrap();
                let theirs_y = block.composed(&g2, y, train).unwrap();
                let scale = 1.0 + max_diff(&theirs, &theirs.zeros_like().unwrap());
                for (a, b) in [(&ours, &theirs), (&ours_y, &theirs_y), (&g1, &g2)] {
                    let d = max_diff(a, b);
                    assert!(
                        d < tol * scale,
                        "{dtype:?} values differ by {d} (train {train})"
                    );
                }
                let loss = |a: &Tensor, b: &Tensor| {
                    ((a * &wx).unwrap().sum_all().unwrap() + (b * &w).unwrap().sum_all().unwrap())
                        .unwrap()
                };
                let ga = loss(&ours, &ours_y).backward().unwrap();
                let gb = loss(&theirs, &theirs_y).backward().unwrap();
                let mut compared = 0;
                for p in &params {
                    match (ga.get(p), gb.get(p)) {
                        (Some(a), Some(b)) => {
                            let scale = 1.0 + max_diff(b, &b.zeros_like().unwrap());
                            let d = max_diff(a, b);
                            assert!(
                                d < tol * scale,
                                "{dtype:?} gradient {:?} differs by {d} (train {train})",
                                p.dims()
                            );
                            compared += 1;
                        }
                        (a, b) => panic!("gradient present {} vs {}", a.is_some(), b.is_some()),
                    }
                }
                assert_eq!(compared, params.len());
                // Dropout draws as the composed block does: a different stream gives other values.
                if train {
                    let other = block.forward_with(packed.as_ref(), x, x, train).unwrap();
                    assert!(max_diff(&other, &g1) > 1e-3);
                }
            }
        }
    }

    /// A width-8 block without dropout, its weights seeded.
    fn small_block(dtype: DType) -> (VarMap, AttentionConfig, AttentionBlock) {
        let cfg = AttentionConfig {
            width: 8,
            heads: 2,
            ff_width: 16,
            dropout: 0.0,
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        let block = AttentionBlock::new(cfg, vb).unwrap();
        seeded_init(&vm, 2).unwrap();
        (vm, cfg, block)
    }

    /// The packed parameters are rows of the width holding the values of the flat
    /// concatenation, in order, where every parameter's size is a multiple of the width.
    #[test]
    fn packing_in_rows_keeps_the_flat_order() {
        let (_vm, cfg, block) = small_block(DType::F32);
        let x = Tensor::zeros((2, 3, 8), DType::F32, &Device::Cpu).unwrap();
        let packed = block.pack(&x).unwrap().unwrap();
        let len = super::Packing::new(&cfg).len;
        assert_eq!(packed.tensor().dims(), [len / cfg.width, cfg.width]);
        let flat: Vec<f32> = packed.tensor().flatten_all().unwrap().to_vec1().unwrap();
        let mut want = Vec::new();
        for t in block.parameters() {
            want.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        assert_eq!(flat, want);
    }

    /// On a detached copy of the weights (ADA's ascent) the block gives the input's gradient
    /// only, equal to the one through the trained weights; the packed parameters track none.
    #[test]
    fn on_detached_weights_only_the_input_gets_a_gradient() {
        let dev = Device::Cpu;
        let (vm, cfg, block) = small_block(DType::F64);
        let twin_values = detached(&vm).unwrap();
        let twin = AttentionBlock::new(
            cfg,
            VarBuilder::from_tensors(twin_values.clone(), DType::F64, &dev),
        )
        .unwrap();
        let x = Var::from_tensor(&seeded_randn(&[2, 3, 8], 1, DType::F64, &dev).unwrap()).unwrap();
        let g_full = block
            .forward_t(x.as_tensor(), x.as_tensor(), true)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let packed = twin.pack(x.as_tensor()).unwrap().unwrap();
        assert!(!packed.tensor().track_op());
        let g_twin = twin
            .forward_with(Some(&packed), x.as_tensor(), x.as_tensor(), true)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g_full.get(x.as_tensor()).unwrap(),
            g_twin.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-12);
        assert!(twin_values.values().all(|v| g_twin.get(v).is_none()));
        assert!(g_twin.get(packed.tensor()).is_none());
    }

    /// Constant weights are packed once and the packing reused (with its transposed
    /// weights); weights that are variables are packed again on every call, so an update
    /// between two calls is seen.
    #[test]
    fn constant_weights_are_packed_once_variables_every_time() {
        let dev = Device::Cpu;
        let (vm, cfg, block) = small_block(DType::F32);
        let twin = AttentionBlock::new(
            cfg,
            VarBuilder::from_tensors(detached(&vm).unwrap(), DType::F32, &dev),
        )
        .unwrap();
        let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let (a, b) = (
            twin.pack(&x).unwrap().unwrap(),
            twin.pack(&x).unwrap().unwrap(),
        );
        assert_eq!(a.tensor().id(), b.tensor().id());
        assert!(std::sync::Arc::ptr_eq(&a.transposed, &b.transposed));
        let first = block.pack(&x).unwrap().unwrap();
        for v in vm.all_vars() {
            v.set(&(v.as_tensor() + 1.0).unwrap()).unwrap();
        }
        let second = block.pack(&x).unwrap().unwrap();
        assert_ne!(first.tensor().id(), second.tensor().id());
        assert!(max_diff(first.tensor(), second.tensor()) > 0.5);
    }

    /// Wrong shapes are errors naming the block, not panics.
    #[test]
    fn the_block_checks_its_shapes() {
        let dev = Device::Cpu;
        let (_vm, _, block) = small_block(DType::F32);
        let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let packed = block.pack(&x).unwrap().unwrap();
        let wide = Tensor::zeros((2, 3, 12), DType::F32, &dev).unwrap();
        let other_batch = Tensor::zeros((3, 3, 8), DType::F32, &dev).unwrap();
        let short = super::Packed::new(packed.tensor().narrow(0, 0, 10).unwrap());
        for (a, b, p) in [
            (&wide, &wide, &packed),
            (&x, &other_batch, &packed),
            (&x, &x, &short),
        ] {
            let err = block.forward_with(Some(p), a, b, false).unwrap_err();
            assert!(err.to_string().contains("attention block"), "{err}");
        }
    }
}
