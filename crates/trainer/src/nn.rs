//! Layers with gradients that candle's fused kernels do not give.
//!
//! candle's fused `layer_norm`, `softmax_last_dim` and `sdpa` are applied without a backward
//! pass and silently stop gradients (ecosystem-notes §5). Everything here is built from
//! differentiable primitives; `tests` checks each against finite differences.

use std::sync::Arc;

use candle_core::{D, DType, Module, ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::rowops::{Linear, linear};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// Layer normalisation over the last dimension, from differentiable primitives:
/// `gamma * (x - mean) / sqrt(var + eps) + beta`, with the unbiased variance of the released
/// APN code. (The released code divides by `std + eps`; `sqrt(var + eps)` keeps the gradient
/// finite for a constant input.)
#[derive(Debug, Clone)]
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

/// The released APN code's layer-norm epsilon.
pub const LAYER_NORM_EPS: f64 = 1e-8;

impl LayerNorm {
    /// `gamma` (ones) and `beta` (zeros) of width `dim` under `vb` (`weight`, `bias`).
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let gamma = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let beta = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(LayerNorm { gamma, beta, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::rowops::layer_norm(x, &self.gamma, &self.beta, self.eps)
            .map_err(candle_core::Error::wrap)
    }
}

/// Softmax over the last dimension that passes gradients (`candle_nn::ops::softmax`, not
/// the fused `softmax_last_dim`).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

thread_local! {
    static DROPOUT_RNG: std::cell::RefCell<ChaCha8Rng> = std::cell::RefCell::new(ChaCha8Rng::seed_from_u64(0));
}

/// Seeds this thread's dropout masks (candle's own dropout draws from an unseeded RNG).
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = ChaCha8Rng::seed_from_u64(seed));
}

/// This thread's dropout RNG state (seed, stream position), for checkpoints.
pub fn dropout_state() -> ([u8; 32], u128) {
    DROPOUT_RNG.with(|r| {
        let r = r.borrow();
        (r.get_seed(), r.get_word_pos())
    })
}

/// Restores [`dropout_state`].
pub fn set_dropout_state(seed: [u8; 32], word_pos: u128) {
    DROPOUT_RNG.with(|r| {
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_word_pos(word_pos);
        *r.borrow_mut() = rng;
    });
}

/// Inverted dropout with a seeded mask; a no-op outside training.
///
/// On the CPU one op, `Dropout`: candle's product `x * mask` would, in backward, also
/// compute the constant mask's gradient (a product, a zero-filled buffer and an addition
/// over every value: on ADA's ascent, which takes the input's gradient through the
/// projection's dropout on 2048-d features, about 5 % of an ADA* step). Elsewhere the
/// product.
pub fn dropout(x: &Tensor, p: f32, train: bool) -> candle_core::Result<Tensor> {
    let Some(mask) = dropout_mask(x.elem_count(), p, train) else {
        return Ok(x.clone());
    };
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(Dropout(Arc::new(mask)));
    }
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// `x * mask` for a contiguous `x` and a constant mask, on the CPU: the values of candle's
/// product (a float32 mask widened for float64, as `to_dtype` does), and in backward the
/// input's gradient `grad * mask` only.
struct Dropout(Arc<Vec<f32>>);

impl Dropout {
    fn apply<T: crate::cpu_gemm::Real>(&self, x: &[T]) -> Vec<T> {
        x.iter()
            .zip(self.0.iter())
            .map(|(&v, &m)| v * T::from_f64(f64::from(m)))
            .collect()
    }
}

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "vdg-dropout"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        if l.shape().elem_count() != self.0.len() {
            candle_core::bail!("dropout: {:?} for a mask of {}", l.dims(), self.0.len());
        }
        let out = crate::rowops::float_map!(s, l, self.name(), |x| self.apply(x));
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mask = Dropout(self.0.clone());
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&mask)?))
    }
}

/// The multipliers [`dropout`] applies to `n` values (0 or `1/keep`, drawn from this thread's
/// dropout RNG), or `None` outside training.
///
/// Element `i` keeps its value when the `i`-th `f32` of `rand`'s standard uniform draw is
/// below `keep`; the words are drawn a block at a time (`Rng::fill`, the same words in the
/// same order as one `random::<f32>()` per value, which leaves the RNG at the same position)
/// and turned into floats the way `rand` does, `(word >> 8) * 2^-24`, in a loop that
/// vectorises (drawing one value at a time was 3-4 % of an APN training step). Long masks
/// are cut into spans drawn on rayon's threads, each from a copy of the RNG set to the
/// span's first word (ChaCha's stream is seekable): the same words, and the RNG is left
/// after the last one.
pub fn dropout_mask(n: usize, p: f32, train: bool) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    /// Values per span drawn on one thread.
    const SPAN: usize = 1 << 16;
    if !train || p <= 0.0 {
        return None;
    }
    let keep = 1.0 - p;
    let mut mask = vec![0f32; n];
    DROPOUT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        if n <= SPAN {
            return draw_multipliers(&mut r, keep, &mut mask);
        }
        let start = r.get_word_pos();
        let base = r.clone();
        mask.par_chunks_mut(SPAN).enumerate().for_each(|(i, out)| {
            let mut rng = base.clone();
            rng.set_word_pos(start + (i * SPAN) as u128);
            draw_multipliers(&mut rng, keep, out);
        });
        r.set_word_pos(start + n as u128);
    });
    Some(mask)
}

/// Fills `out` with multipliers drawn from `rng`, a block of words at a time.
fn draw_multipliers(rng: &mut ChaCha8Rng, keep: f32, out: &mut [f32]) {
    /// Words drawn per block: small enough to stay in the L1 cache.
    const BLOCK: usize = 1024;
    let mut words = [0u32; BLOCK];
    for out in out.chunks_mut(BLOCK) {
        let words = &mut words[..out.len()];
        rng.fill(words);
        multipliers(words, keep, out);
    }
}

/// `out[i]` = `1/keep` where the uniform float of `words[i]` is below `keep`, else 0 (its own
/// function: with `keep` read through a closure's reference the loop did not vectorise).
fn multipliers(words: &[u32], keep: f32, out: &mut [f32]) {
    let (kept, scale) = (1.0 / keep, 1.0 / (1u32 << 24) as f32);
    for (m, &w) in out.iter_mut().zip(words) {
        *m = if ((w >> 8) as f32) * scale < keep {
            kept
        } else {
            0.0
        };
    }
}

/// Hyper-parameters of the attention block (released APN code, `opts/hyper.py`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttentionConfig {
    /// Model width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of the feed-forward layer.
    pub ff_width: usize,
    /// Dropout on attention weights and on the block output.
    pub dropout: f32,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        AttentionConfig {
            width: 256,
            heads: 4,
            ff_width: 1024,
            dropout: 0.3,
        }
    }
}

/// Multi-head attention as in the released APN code: Q, K, V are `Linear + ReLU`; scores are
/// scaled by `1/sqrt(width/heads)`; future keys are masked when `causal`; dropout on the
/// weights; no output projection; the raw queries are added back and layer-normalised.
///
/// Deviation: the released code also masks keys and queries whose vector sums to exactly
/// zero (its padding convention). Clips here always have M segments, so nothing is padded,
/// and after a layer norm every row sums to zero up to rounding: that test would mask rows
/// at random (and make the loss discontinuous). It is left out.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    norm: LayerNorm,
    cfg: AttentionConfig,
}

const MASKED: f64 = -4_294_967_295.0; // -2^32 + 1, as the released code

impl MultiHeadAttention {
    /// Weights `q`, `k`, `v`, `norm` under `vb`.
    pub fn new(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        Ok(MultiHeadAttention {
            q: linear(w, w, vb.pp("q"))?,
            k: linear(w, w, vb.pp("k"))?,
            v: linear(w, w, vb.pp("v"))?,
            norm: LayerNorm::new(w, LAYER_NORM_EPS, vb.pp("norm"))?,
            cfg,
        })
    }

    /// # Shapes
    /// `queries [B, Tq, W]`, `keys [B, Tk, W]` -> `[B, Tq, W]`.
    pub fn forward_t(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        causal: bool,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, tq, _) = queries.dims3()?;
        let tk = keys.dim(1)?;
        let h = self.cfg.heads;
        if crate::attention::supported(queries) {
            // The core (ReLUs to the weighted sum) as one op with its own backward.
            let mask = dropout_mask(b * h * tq * tk, self.cfg.dropout, train).map(Arc::new);
            let q = self.q.forward(queries)?;
            let (k, v) = (self.k.forward(keys)?, self.v.forward(keys)?);
            let op = crate::attention::Core {
                heads: h,
                causal,
                mask,
            };
            let out = crate::attention::core(&q, &k, &v, op).map_err(candle_core::Error::wrap)?;
            return self.norm.forward(&(out + queries)?);
        }
        self.composed(queries, keys, causal, train)
    }

    /// The same function from candle's operations (other devices and dtypes; tests).
    pub fn composed(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        causal: bool,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, tq, w) = queries.dims3()?;
        let tk = keys.dim(1)?;
        let h = self.cfg.heads;
        let dh = w / h;
        let split = |x: Tensor, t: usize| x.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous();
        let q = split(self.q.forward(queries)?.relu()?, tq)?;
        let k = split(self.k.forward(keys)?.relu()?, tk)?;
        let v = split(self.v.forward(keys)?.relu()?, tk)?;
        let mut scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?;
        if causal {
            let masked =
                Tensor::full(MASKED, scores.shape(), scores.device())?.to_dtype(scores.dtype())?;
            let future: Vec<u8> = (0..tq)
                .flat_map(|i| (0..tk).map(move |j| u8::from(j > i)))
                .collect();
            let future = Tensor::from_vec(future, (1, 1, tq, tk), scores.device())?
                .broadcast_as(scores.shape())?;
            scores = future.where_cond(&masked, &scores)?;
        }
        let weights = softmax_last(&scores)?;
        let weights = dropout(&weights, self.cfg.dropout, train)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, tq, w))?;
        self.norm.forward(&(out + queries)?)
    }
}

/// `Linear(W -> F) + ReLU -> Linear(F -> W)`, residual, layer norm.
#[derive(Debug, Clone)]
pub struct FeedForward {
    inner: Linear,
    outer: Linear,
    norm: LayerNorm,
}

impl FeedForward {
    /// Weights `inner`, `outer`, `norm` under `vb`.
    pub fn new(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(FeedForward {
            inner: linear(cfg.width, cfg.ff_width, vb.pp("inner"))?,
            outer: linear(cfg.ff_width, cfg.width, vb.pp("outer"))?,
            norm: LayerNorm::new(cfg.width, LAYER_NORM_EPS, vb.pp("norm"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.outer.forward(&self.inner.forward_relu(x)?)?;
        self.norm.forward(&(y + x)?)
    }
}

/// The APN attention block `T(x, y)` (released code's `AttModel`): an encoder on `x`
/// (self-attention, feed-forward) and a decoder on `y` (causal self-attention, attention
/// over the encoder output, feed-forward), then dropout. The output has `y`'s length.
///
/// On the CPU the block runs as one operation ([`crate::block`]) on its parameters packed
/// into one tensor ([`AttentionBlock::pack`]); [`AttentionBlock::composed`] is the same
/// function from the layers' own ops (other devices; tests).
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    enc_self: MultiHeadAttention,
    enc_ff: FeedForward,
    dec_self: MultiHeadAttention,
    dec_cross: MultiHeadAttention,
    dec_ff: FeedForward,
    cfg: AttentionConfig,
    /// The packing of constant parameters (none tracks a gradient: the detached twin ADA's
    /// ascent runs its passes on), made by the first forward pass and shared by the later
    /// ones with its transposed weights.
    frozen: std::sync::OnceLock<crate::block::Packed>,
}

impl MultiHeadAttention {
    fn parameters(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        for l in [&self.q, &self.k, &self.v] {
            out.push(l.weight());
            out.extend(l.bias());
        }
        out.extend([&self.norm.gamma, &self.norm.beta]);
        out
    }
}

impl FeedForward {
    fn parameters(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        for l in [&self.inner, &self.outer] {
            out.push(l.weight());
            out.extend(l.bias());
        }
        out.extend([&self.norm.gamma, &self.norm.beta]);
        out
    }
}

impl AttentionBlock {
    /// Weights under `vb`.
    pub fn new(cfg: AttentionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(AttentionBlock {
            enc_self: MultiHeadAttention::new(cfg, vb.pp("enc_self"))?,
            enc_ff: FeedForward::new(cfg, vb.pp("enc_ff"))?,
            dec_self: MultiHeadAttention::new(cfg, vb.pp("dec_self"))?,
            dec_cross: MultiHeadAttention::new(cfg, vb.pp("dec_cross"))?,
            dec_ff: FeedForward::new(cfg, vb.pp("dec_ff"))?,
            cfg,
            frozen: Default::default(),
        })
    }

    /// The parameters in the order they are packed: per layer (encoder self-attention and
    /// feed-forward, decoder self-attention, cross-attention and feed-forward) weight then
    /// bias per linear layer, then the norm's gain and shift.
    pub(crate) fn parameters(&self) -> Vec<&Tensor> {
        let mut parts = self.enc_self.parameters();
        parts.extend(self.enc_ff.parameters());
        parts.extend(self.dec_self.parameters());
        parts.extend(self.dec_cross.parameters());
        parts.extend(self.dec_ff.parameters());
        parts
    }

    /// The block's parameters as one tensor for the fused block (one concatenation, in rows
    /// of the model width; its gradient flows back to every parameter), or `None` where the
    /// fused block does not run for inputs like `like` (another device or dtype). A model
    /// that calls the block several times per forward packs once and passes the result to
    /// [`AttentionBlock::forward_with`]. Constant parameters are packed once and kept: a
    /// block on detached copies of variables (which share their storage) must not outlive
    /// an update of those variables (`vdg train` makes a fresh twin for every ascent and
    /// every evaluation).
    pub fn pack(&self, like: &Tensor) -> candle_core::Result<Option<crate::block::Packed>> {
        let parts = self.parameters();
        let expected = crate::block::Packing::new(&self.cfg).len;
        if !crate::attention::supported(like)
            || parts
                .iter()
                .any(|t| t.dtype() != like.dtype() || !t.device().same_device(like.device()))
            || parts.iter().map(|t| t.elem_count()).sum::<usize>() != expected
        {
            return Ok(None);
        }
        // Rows of the model width, concatenated: the same values in the same order as one
        // flat vector. The weights that already have rows of that width enter the
        // concatenation as they are; a flattened weight would add a reshape to the graph,
        // and with it a zero-filled gradient buffer and an addition over every value in
        // backward (BENCHMARKS.md, "The serial part of the APN step").
        let w = self.cfg.width;
        let rows = parts.iter().all(|t| t.elem_count() % w == 0);
        let make = || -> candle_core::Result<crate::block::Packed> {
            let pieces = parts
                .iter()
                .map(|t| match t.dims() {
                    _ if !rows => t.flatten_all(),
                    [_, c] if *c == w => Ok((*t).clone()),
                    _ => t.reshape(((), w)),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(crate::block::Packed::new(Tensor::cat(&pieces, 0)?))
        };
        if parts.iter().any(|t| t.track_op()) {
            return make().map(Some);
        }
        if let Some(p) = self.frozen.get() {
            return Ok(Some(p.clone()));
        }
        let p = make()?;
        Ok(Some(self.frozen.get_or_init(|| p).clone()))
    }

    /// # Shapes
    /// `x [B, Tx, W]` (encoder input), `y [B, Ty, W]` (decoder input) -> `[B, Ty, W]`.
    pub fn forward_t(&self, x: &Tensor, y: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_with(self.pack(x)?.as_ref(), x, y, train)
    }

    /// [`AttentionBlock::forward_t`] with the parameters packed by [`AttentionBlock::pack`]
    /// (`None`: the composed layers).
    pub fn forward_with(
        &self,
        packed: Option<&crate::block::Packed>,
        x: &Tensor,
        y: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let Some(packed) = packed else {
            return self.composed(x, y, train);
        };
        let (b, tx, _) = x.dims3()?;
        let ty = y.dim(1)?;
        // Drawn in the composed block's order: the three attention layers' weights, then the
        // output.
        let masks = crate::block::Masks::draw(&self.cfg, (b, tx, ty), train);
        let op = crate::block::BlockOp::new(self.cfg, packed, masks);
        x.contiguous()?
            .apply_op3(&y.contiguous()?, packed.tensor(), op)
    }

    /// APN's relational pyramid on `x [B, M, W]` with this block as one op
    /// ([`crate::block`]): the global relation `G = T(x, x)` and level II, the sum over
    /// `scales` of the mean over each scale's subsets `s` of `T(T(x_s, x_s), G)`.
    pub(crate) fn pyramid(
        &self,
        packed: &crate::block::Packed,
        x: &Tensor,
        scales: Vec<Vec<Vec<usize>>>,
        train: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, m, _) = x.dims3()?;
        let op = crate::block::PyramidOp::new(self.cfg, packed, (b, m), scales, train);
        let out = x.contiguous()?.apply_op2(packed.tensor(), op)?;
        Ok((out.get(0)?, out.get(1)?))
    }

    /// The block from its layers' own ops (what runs where [`AttentionBlock::pack`] gives
    /// `None`).
    pub fn composed(&self, x: &Tensor, y: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let enc = self
            .enc_ff
            .forward(&self.enc_self.forward_t(x, x, false, train)?)?;
        let dec = self.dec_self.forward_t(y, y, true, train)?;
        let dec = self.dec_cross.forward_t(&dec, &enc, false, train)?;
        let dec = self.dec_ff.forward(&dec)?;
        dropout(&dec, self.cfg.dropout, train)
    }
}

/// Mean cross-entropy of `logits [B, C]` against `labels [B]` (u32), from log-softmax.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// Mean squared error between two tensors of one shape.
pub fn mse(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// `ModuleT` for anything with `forward_t(x, train)`.
pub fn apply_t<M: ModuleT>(m: &M, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    m.forward_t(x, train)
}

/// The dtype every model computes in.
pub const DTYPE: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;

    /// The masks one value at a time, as `rand` documents its uniform floats.
    fn one_at_a_time(rng: &mut ChaCha8Rng, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 - p;
        (0..n)
            .map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The dropout op gives candle's `x * mask` and its input gradient bit for bit, in
    /// float32 and float64, on a contiguous and a transposed input; outside training the
    /// input comes back as it is.
    #[test]
    fn the_dropout_op_equals_the_product_with_the_mask_and_its_gradient() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            for transposed in [false, true] {
                let x0 = crate::init::seeded_randn(&[6, 35], 3, dtype, &dev).unwrap();
                let x = Var::from_tensor(&x0).unwrap();
                let input = if transposed {
                    x.as_tensor().t().unwrap()
                } else {
                    x.as_tensor().clone()
                };
                let w = crate::init::seeded_randn(input.dims(), 4, dtype, &dev).unwrap();
                seed_dropout(8);
                let y = dropout(&input, 0.4, true).unwrap();
                let gx = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                seed_dropout(8);
                let mask = dropout_mask(input.elem_count(), 0.4, true).unwrap();
                let mask = Tensor::from_vec(mask, input.shape(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let want = (&input * &mask).unwrap();
                let gw = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let bits = |t: &Tensor| -> Vec<u64> {
                    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                let what = format!("{dtype:?}, transposed {transposed}");
                assert_eq!(bits(&y), bits(&want), "{what}");
                let (a, b) = (
                    gx.get(x.as_tensor()).unwrap(),
                    gw.get(x.as_tensor()).unwrap(),
                );
                assert_eq!(bits(a), bits(b), "{what}");
                assert!(bits(&y).contains(&0), "{what}: nothing dropped");
            }
        }
        let x = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        assert_eq!(dropout(&x, 0.5, false).unwrap().id(), x.id());
    }

    #[test]
    fn masks_drawn_in_blocks_equal_draws_one_at_a_time_and_leave_the_rng_alike() {
        for (seed, p) in [(3u64, 0.5f32), (4, 0.8), (5, 0.1), (6, 0.999)] {
            seed_dropout(seed);
            let mut reference = ChaCha8Rng::seed_from_u64(seed);
            // Lengths below, at and across the block size and the span drawn on one thread,
            // in a row (the RNG carries on).
            for n in [1usize, 7, 1023, 1024, 1025, 5000, 0, 3, 200_003, 65_536, 9] {
                let got = dropout_mask(n, p, true).expect("training draws a mask");
                assert_eq!(got, one_at_a_time(&mut reference, n, p), "n {n}, p {p}");
                assert_eq!(dropout_state().1, reference.get_word_pos(), "n {n}, p {p}");
            }
            let zeros = dropout_mask(10_000, p, true).expect("a mask");
            let dropped = zeros.iter().filter(|&&v| v == 0.0).count() as f32 / 10_000.0;
            assert!((dropped - p).abs() < 0.03, "dropped {dropped}, p {p}");
        }
        assert!(dropout_mask(10, 0.5, false).is_none());
        assert!(dropout_mask(10, 0.0, true).is_none());
    }
}
