//! One training iteration: the clean update and the minimisation over ADA's copies.
//!
//! Under the paper's protocol ([`Minimisation::Sequential`]) an iteration with video ADA is
//! Algorithm 1 as written: the update on the clean minibatch (line 5), the ascent (lines
//! 6-12, [`crate::ada::ascend`]), then one update per adversarial copy through the
//! classifier of the feature the copy was made against (line 13: `h(R^II)` for the level-II
//! copies; line 14: `h(R^III)` for the level-III ones). Under the released code's
//! ([`Minimisation::Joint`]) the copies are made first and one cross-entropy on the clean
//! batch and the copies, through the main logits, makes one update.
//!
//! Under the paper's protocol every forward pass of the ascent replays line 4's dropout masks
//! and relation subsets ([`RngSnapshot`]), so the objective is a fixed function of the input
//! and the anchors are line 4's features, of exactly that forward configuration, taken
//! before line 5's update. Under the released code's the ascent is that code's
//! ([`crate::ada::ascend_redrawn`]): fresh masks and clean features at every step.

use candle_core::{DType, Tensor};
use candle_nn::Optimizer;

use crate::ada::{AdaConfig, ascend, ascend_redrawn};
use crate::error::{Error, Result};
use crate::models::VideoModel;
use crate::nn::{cross_entropy, dropout_state, set_dropout_state};
use crate::optim::{SgdMomentum, clip_grad_norm};

/// How ADA's copies enter the minimisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Minimisation {
    /// Algorithm 1: the clean update, then one update per copy through its own classifier.
    Sequential,
    /// The released code: one update on the clean batch and the copies together.
    Joint,
}

/// A ChaCha RNG's state: seed and word position.
pub type RngState = ([u8; 32], u128);

/// The state of the random streams a forward pass draws from (dropout masks and relation
/// subsets), to replay the same forward configuration.
#[derive(Debug, Clone, Copy)]
pub struct RngSnapshot {
    dropout: RngState,
    sampler: Option<RngState>,
}

impl RngSnapshot {
    /// The current state for `model` on this thread.
    pub fn take(model: &VideoModel) -> Self {
        RngSnapshot {
            dropout: dropout_state(),
            sampler: model.sampler().and_then(|s| s.state()),
        }
    }

    /// A snapshot from saved states (checkpoints).
    pub fn from_parts(dropout: RngState, sampler: Option<RngState>) -> Self {
        RngSnapshot { dropout, sampler }
    }

    /// The saved states: (dropout, subset sampler).
    pub fn parts(&self) -> (RngState, Option<RngState>) {
        (self.dropout, self.sampler)
    }

    /// Puts the streams back where [`Self::take`] found them.
    pub fn restore(&self, model: &VideoModel) {
        set_dropout_state(self.dropout.0, self.dropout.1);
        if let (Some(s), Some((seed, pos))) = (model.sampler(), self.sampler) {
            s.set_state(seed, pos);
        }
    }
}

/// Where in the run an iteration is, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct At {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based batch within the epoch.
    pub batch: usize,
}

/// The optimizer and its settings.
pub struct Updater<'a> {
    /// The optimizer.
    pub opt: &'a mut SgdMomentum,
    /// Gradient-norm clip.
    pub clip_norm: f64,
}

impl Updater<'_> {
    /// One update of the parameters on `loss`; returns its value. A non-finite loss or
    /// gradient norm is an error and leaves the parameters untouched.
    pub fn update(&mut self, loss: &Tensor, at: At) -> Result<f32> {
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::NonFiniteLoss {
                value,
                epoch: at.epoch + 1,
                batch: at.batch + 1,
            });
        }
        let mut grads = loss.backward()?;
        let norm = clip_grad_norm(&mut grads, self.opt.vars(), self.clip_norm)?;
        if !norm.is_finite() {
            return Err(Error::NonFiniteGradient {
                norm,
                epoch: at.epoch + 1,
                batch: at.batch + 1,
            });
        }
        self.opt.step(&grads)?;
        Ok(value)
    }
}

/// What an iteration did.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationLosses {
    /// The loss of the first update (the clean batch, or the joint loss).
    pub main: f32,
    /// The losses of the per-copy updates (sequential minimisation only).
    pub copies: Vec<f32>,
}

/// Per-minibatch video ADA settings of a run.
#[derive(Debug, Clone)]
pub struct AdaStep {
    /// Features attacked, one copy each (empty: plain training).
    pub targets: Vec<&'static str>,
    /// Ascent settings.
    pub cfg: AdaConfig,
    /// How the copies are trained on.
    pub minimisation: Minimisation,
}

impl AdaStep {
    /// Plain training: no copies.
    pub fn plain() -> Self {
        AdaStep {
            targets: Vec::new(),
            cfg: AdaConfig::default(),
            minimisation: Minimisation::Sequential,
        }
    }
}

/// Builds a copy of the model whose weights are detached from the trained variables
/// (`VarBuilder::from_tensors` over the current values): the ascent runs on it so that its
/// backward passes compute the input's gradient only, not weight gradients that would be
/// thrown away. Its BatchNorm running statistics are copies, so the ascent's forward passes
/// do not move the model's, unless it is built on the model's own
/// ([`crate::init::detached_sharing_statistics`]: the released code's protocol).
pub type Twin<'a> = &'a dyn Fn() -> Result<VideoModel>;

/// How an iteration's ascent runs.
enum AscentMode<'a> {
    /// Algorithm 1: every forward pass replays `snap` (line 4's dropout masks and relation
    /// subsets), the cost measured from `anchors` (line 4's features, one per target).
    Replay {
        snap: RngSnapshot,
        anchors: &'a [Tensor],
    },
    /// The released code's: every forward pass draws afresh, the clean features recomputed
    /// at each step.
    Redrawn,
}

/// One iteration on the batch `x` with `labels`: plain training when `step.targets` is
/// empty, otherwise video ADA against each target feature. With `twin` the ascent runs on
/// a detached copy of the weights (the same numbers, fewer backward operations).
pub fn iteration(
    model: &VideoModel,
    up: &mut Updater<'_>,
    x: &Tensor,
    labels: &Tensor,
    step: &AdaStep,
    twin: Option<Twin<'_>>,
    at: At,
) -> Result<IterationLosses> {
    let (targets, ada, minimisation) = (&step.targets[..], &step.cfg, step.minimisation);
    // The ascent at the current weights: Algorithm 1's, replaying line 4's forward
    // configuration (dropout masks, relation subsets) and anchored at line 4's features; or
    // the released code's, every forward pass drawing afresh.
    let make_copies = |mode: AscentMode<'_>| -> Result<Vec<Tensor>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let frozen = twin.map(|build| build()).transpose()?;
        let m = frozen.as_ref().unwrap_or(model);
        let ascent = match mode {
            AscentMode::Replay { snap, anchors } => {
                let fwd = |v: &Tensor| {
                    snap.restore(m);
                    m.forward_t(v, true)
                };
                ascend(&fwd, x, labels, targets, Some(anchors), ada)?
            }
            AscentMode::Redrawn => {
                if frozen.is_some() {
                    // The twin draws from where the model's streams are.
                    RngSnapshot::take(model).restore(m);
                }
                let fwd = |v: &Tensor| m.forward_t(v, true);
                ascend_redrawn(&fwd, x, labels, targets, ada)?
            }
        };
        // The model's own streams continue from where the ascent's did.
        if frozen.is_some() {
            RngSnapshot::take(m).restore(model);
        }
        Ok(ascent.copies)
    };
    match minimisation {
        Minimisation::Sequential => {
            // Line 4: the pyramid features of the clean batch, the anchors R0 of the
            // ascent; line 5: the clean update on the same forward pass.
            let snap = RngSnapshot::take(model);
            let out = model.forward_t(x, true)?;
            let anchors = targets
                .iter()
                .map(|t| Ok(out.feature(t)?.detach()))
                .collect::<Result<Vec<_>>>()?;
            let loss = cross_entropy(&out.logits, labels)?;
            drop(out);
            let main = up.update(&loss, at)?;
            drop(loss);
            // Lines 6-12 at the updated weights, in line 4's forward configuration and
            // anchored at line 4's features, then lines 13-14.
            let copies = make_copies(AscentMode::Replay {
                snap,
                anchors: &anchors,
            })?;
            drop(anchors);
            let mut losses = Vec::with_capacity(copies.len());
            for (t, copy) in targets.iter().zip(&copies) {
                let out = model.forward_t(copy, true)?;
                let loss = cross_entropy(out.logits_for(t), labels)?;
                losses.push(up.update(&loss, at)?);
            }
            Ok(IterationLosses {
                main,
                copies: losses,
            })
        }
        Minimisation::Joint => {
            let copies = make_copies(AscentMode::Redrawn)?;
            let n = 1 + copies.len();
            let xs: Vec<Tensor> = std::iter::once(x.clone()).chain(copies).collect();
            let x_all = if n == 1 {
                x.clone()
            } else {
                Tensor::cat(&xs, 0)?
            };
            let y_all = if n == 1 {
                labels.clone()
            } else {
                Tensor::cat(&vec![labels.clone(); n], 0)?
            };
            let loss = cross_entropy(&model.forward_t(&x_all, true)?.logits, &y_all)?;
            Ok(IterationLosses {
                main: up.update(&loss, at)?,
                copies: Vec::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::ada::{AdaVariant, TransportCost};
    use crate::init::{seeded_init, seeded_randn};
    use crate::models::blocks::Backbone;
    use crate::models::{ModelConfig, ModelKind, build_head};
    use crate::nn::seed_dropout;
    use crate::optim::SgdParams;

    /// APN on cached 8-d features with dropout on everywhere (projection 0.5, attention 0.2).
    fn apn(seed: u64) -> (VarMap, VideoModel) {
        let vm = VarMap::new();
        let model = apn_on(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), seed);
        seeded_init(&vm, seed).unwrap();
        (vm, model)
    }

    /// The model of [`apn`] on the variables of `vb`.
    fn apn_on(vb: VarBuilder, seed: u64) -> VideoModel {
        let mut cfg = ModelConfig::tiny();
        cfg.segments = 4;
        cfg.attention.dropout = 0.2;
        let backbone = Backbone::cached(8, cfg.feature_dim, 0.5, vb.pp("backbone")).unwrap();
        let head = build_head(ModelKind::Apn, &cfg, 3, seed, vb.pp("head")).unwrap();
        VideoModel::frames(backbone, head, ModelKind::Apn)
    }

    fn params(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                (
                    n.clone(),
                    data[n]
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            })
            .collect()
    }

    fn batch() -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        (
            seeded_randn(&[6, 4, 8], 11, DType::F32, &dev).unwrap(),
            Tensor::new(&[0u32, 1, 2, 0, 1, 2], &dev).unwrap(),
        )
    }

    /// `model`'s forward in training mode, every call replaying the random streams of `snap`.
    fn replaying(
        model: &VideoModel,
        snap: RngSnapshot,
    ) -> impl Fn(&Tensor) -> Result<crate::models::HeadOutput> + '_ {
        move |v: &Tensor| {
            snap.restore(model);
            model.forward_t(v, true)
        }
    }

    fn ada(eta: f64) -> AdaConfig {
        AdaConfig {
            eta,
            t_max: 3,
            gamma: 0.1,
            cost: TransportCost::MeanSquared,
        }
    }

    #[test]
    fn the_ascent_replays_one_forward_configuration_so_the_anchor_is_exact() {
        let (_vm, model) = apn(1);
        let (x, y) = batch();
        let targets = AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap();
        // With eta = 0 the copy never moves: every step's cost must be exactly 0 when each
        // forward replays the anchor's dropout masks and relation subsets.
        seed_dropout(5);
        let fixed = replaying(&model, RngSnapshot::take(&model));
        let a = ascend(&fixed, &x, &y, &targets, None, &ada(0.0)).unwrap();
        for costs in &a.costs {
            assert_eq!(costs, &vec![0.0; 3]);
        }
        // Fresh masks on every forward (what the ascent did before): the cost to the anchor
        // is not 0 even though the input did not change.
        seed_dropout(5);
        let fresh = |v: &Tensor| model.forward_t(v, true);
        let b = ascend(&fresh, &x, &y, &targets, None, &ada(0.0)).unwrap();
        for costs in &b.costs {
            assert_eq!(costs[0], 0.0);
            assert!(costs[1] > 1e-6 && costs[2] > 1e-6, "{costs:?}");
        }
        // A moving copy in training mode: the cost starts at 0 and then grows.
        let c = ascend(&fixed, &x, &y, &targets, None, &ada(1.0)).unwrap();
        for costs in &c.costs {
            assert_eq!(costs[0], 0.0);
            assert!(costs[1] > 0.0, "{costs:?}");
        }
    }

    #[test]
    fn the_ascent_is_anchored_at_line_4s_features_before_line_5s_update() {
        let (vm, model) = apn(4);
        let (x, y) = batch();
        let targets = AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap();
        seed_dropout(7);
        // Line 4 in one forward configuration, replayed by every ascent step.
        let snap = RngSnapshot::take(&model);
        let out = model.forward_t(&x, true).unwrap();
        let anchors: Vec<Tensor> = targets
            .iter()
            .map(|t| out.feature(t).unwrap().detach())
            .collect();
        let fixed = replaying(&model, snap);
        // At line 4's weights the anchor is the ascent's own first feature: cost exactly 0.
        let same = ascend(&fixed, &x, &y, &targets, Some(&anchors), &ada(0.0)).unwrap();
        for costs in &same.costs {
            assert_eq!(costs, &vec![0.0; 3]);
        }
        // Line 5's update moves the weights; a copy that does not move (eta = 0) then sits
        // at the same positive distance from line 4's anchor at every step.
        let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true).unwrap();
        let mut up = Updater {
            opt: &mut opt,
            clip_norm: 20.0,
        };
        up.update(
            &cross_entropy(&out.logits, &y).unwrap(),
            At { epoch: 0, batch: 0 },
        )
        .unwrap();
        let after = ascend(&fixed, &x, &y, &targets, Some(&anchors), &ada(0.0)).unwrap();
        for costs in &after.costs {
            assert!(costs[0] > 1e-9, "{costs:?}");
            assert!(costs.iter().all(|c| c == &costs[0]), "{costs:?}");
        }
        // Anchored at the updated weights' own feature instead, the distance is 0 again.
        let own = ascend(&fixed, &x, &y, &targets, None, &ada(0.0)).unwrap();
        for costs in &own.costs {
            assert_eq!(costs, &vec![0.0; 3]);
        }
        // The anchors must be one per target.
        assert!(ascend(&fixed, &x, &y, &targets, Some(&anchors[..1]), &ada(0.0)).is_err());
    }

    /// The APN of [`apn`] with seed 2, its SGD, dropout seeded: where every iteration test
    /// starts.
    fn from_scratch() -> (VarMap, VideoModel, SgdMomentum) {
        let (vm, model) = apn(2);
        seed_dropout(9);
        let opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true).unwrap();
        (vm, model, opt)
    }

    /// Runs `n` iterations of `minimisation` from a fresh model, the ascent on a detached
    /// twin when `use_twin`; returns the parameters and the last iteration's losses.
    fn run_iterations(
        minimisation: Minimisation,
        use_twin: bool,
        n: usize,
    ) -> (Vec<(String, Vec<f32>)>, IterationLosses) {
        let (vm, model, mut opt) = from_scratch();
        let mut up = Updater {
            opt: &mut opt,
            clip_norm: 20.0,
        };
        let (x, y) = batch();
        let step = AdaStep {
            targets: AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap(),
            cfg: ada(1.0),
            minimisation,
        };
        let twin = || -> Result<VideoModel> { Ok(detached(&vm, 2)) };
        let twin_ref: Option<Twin<'_>> = if use_twin { Some(&twin) } else { None };
        let at = At { epoch: 0, batch: 0 };
        let mut last = None;
        for _ in 0..n {
            last = Some(iteration(&model, &mut up, &x, &y, &step, twin_ref, at).unwrap());
        }
        (params(&vm), last.unwrap())
    }

    /// One iteration of `minimisation` from a fresh model.
    fn run(minimisation: Minimisation) -> (Vec<(String, Vec<f32>)>, IterationLosses) {
        run_iterations(minimisation, false, 1)
    }

    #[test]
    fn the_ascent_on_a_detached_twin_gives_the_same_iteration() {
        for minimisation in [Minimisation::Sequential, Minimisation::Joint] {
            let (with, _) = run_iterations(minimisation, true, 2);
            let (without, _) = run_iterations(minimisation, false, 2);
            for ((name, a), (_, b)) in with.iter().zip(&without) {
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0f32, f32::max);
                assert!(diff <= 1e-6, "{minimisation:?} {name}: {diff}");
            }
        }
    }

    /// A way to take a model's values for its twin ([`crate::init::detached`] and kin).
    type Values = fn(&VarMap) -> Result<HashMap<String, Tensor>>;

    #[test]
    fn the_released_codes_ascent_moves_batchnorm_statistics_as_on_the_model_itself() {
        use crate::models::blocks::BackboneKind;
        // APN on pixels through the small CNN, whose BatchNorms train.
        let pixel_apn = |vb: VarBuilder| {
            let mut cfg = ModelConfig::tiny();
            cfg.segments = 3;
            let backbone = Backbone::new(
                BackboneKind::SmallCnn,
                cfg.feature_dim,
                0.0,
                vb.pp("backbone"),
            )
            .unwrap();
            let head = build_head(ModelKind::Apn, &cfg, 3, 4, vb.pp("head")).unwrap();
            VideoModel::frames(backbone, head, ModelKind::Apn)
        };
        let dev = Device::Cpu;
        let x = seeded_randn(&[4, 3, 3, 16, 16], 12, DType::F32, &dev).unwrap();
        let y = Tensor::new(&[0u32, 1, 2, 0], &dev).unwrap();
        // One released-code iteration: the ascent on the model itself (`None`), or on a
        // twin on detached weights whose statistics are the model's or copies.
        let run = |twin: Option<Values>| {
            let vm = VarMap::new();
            let model = pixel_apn(VarBuilder::from_varmap(&vm, DType::F32, &dev));
            seeded_init(&vm, 3).unwrap();
            seed_dropout(9);
            let mut opt =
                SgdMomentum::from_varmap(&vm, SgdParams::default(), |n| !n.contains("running"))
                    .unwrap();
            let mut up = Updater {
                opt: &mut opt,
                clip_norm: 20.0,
            };
            let step = AdaStep {
                targets: AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap(),
                cfg: ada(1.0),
                minimisation: Minimisation::Joint,
            };
            let build = || -> Result<VideoModel> {
                let values = (twin.unwrap())(&vm)?;
                Ok(pixel_apn(VarBuilder::from_tensors(
                    values,
                    DType::F32,
                    &dev,
                )))
            };
            let twin_ref: Option<Twin<'_>> = twin.map(|_| &build as Twin<'_>);
            iteration(
                &model,
                &mut up,
                &x,
                &y,
                &step,
                twin_ref,
                At { epoch: 0, batch: 0 },
            )
            .unwrap();
            params(&vm)
        };
        let on_model = run(None);
        let shared = run(Some(crate::init::detached_sharing_statistics));
        let copied = run(Some(crate::init::detached));
        let stats = |n: &str| n.contains("running");
        assert!(on_model.iter().any(|(n, _)| stats(n)), "no BatchNorm");
        for (((name, a), (_, b)), (_, c)) in on_model.iter().zip(&shared).zip(&copied) {
            let diff = |u: &[f32], v: &[f32]| {
                u.iter()
                    .zip(v)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0f32, f32::max)
            };
            assert!(diff(a, b) <= 1e-6, "{name}: {}", diff(a, b));
            // Copied statistics miss the ascent's forward passes; the weights do not
            // depend on them (training mode normalises with the batch's statistics).
            if stats(name) {
                assert!(diff(a, c) > 1e-6, "{name}");
            } else {
                assert!(diff(a, c) <= 1e-6, "{name}: {}", diff(a, c));
            }
        }
    }

    /// The released code's iteration written out by hand (thuml/VideoDG `main_val.py` with
    /// `--add_dg`): per ascent step the clean features anew, then one step of each copy,
    /// every forward drawing fresh masks; one update on the clean batch and the copies.
    fn released_by_hand() -> Vec<(String, Vec<f32>)> {
        let (vm, model, mut opt) = from_scratch();
        let mut up = Updater {
            opt: &mut opt,
            clip_norm: 20.0,
        };
        let (x, y) = batch();
        let targets = AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap();
        let cfg = ada(1.0);
        let mut copies = vec![x.clone(); targets.len()];
        for _ in 0..cfg.t_max {
            let src = model.forward_t(&x, true).unwrap();
            let anchors: Vec<Tensor> = targets
                .iter()
                .map(|t| src.feature(t).unwrap().detach())
                .collect();
            for (i, t) in targets.iter().enumerate() {
                let v = candle_core::Var::from_tensor(&copies[i]).unwrap();
                let out = model.forward_t(v.as_tensor(), true).unwrap();
                let obj = crate::ada::objective(&out, t, &y, &anchors[i], &cfg).unwrap();
                let g = obj.backward().unwrap().get(v.as_tensor()).unwrap().clone();
                copies[i] = (&copies[i] + (g * cfg.eta).unwrap()).unwrap().detach();
            }
        }
        let xs: Vec<Tensor> = std::iter::once(x).chain(copies).collect();
        let x_all = Tensor::cat(&xs, 0).unwrap();
        let y_all = Tensor::cat(&vec![y; xs.len()], 0).unwrap();
        let out = model.forward_t(&x_all, true).unwrap();
        up.update(
            &cross_entropy(&out.logits, &y_all).unwrap(),
            At { epoch: 0, batch: 0 },
        )
        .unwrap();
        params(&vm)
    }

    #[test]
    fn joint_minimisation_is_the_released_codes_iteration() {
        let (got, losses) = run(Minimisation::Joint);
        assert!(losses.copies.is_empty() && losses.main.is_finite());
        assert_eq!(got, released_by_hand(), "not the released code's iteration");
        // Its anchors are drawn afresh: with dropout on, even a copy that never moves is
        // away from them at the first step (the replayed ascent starts at exactly 0).
        let (_vm, model) = apn(5);
        let (x, y) = batch();
        let targets = AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap();
        seed_dropout(3);
        let fresh = |v: &Tensor| model.forward_t(v, true);
        let a = crate::ada::ascend_redrawn(&fresh, &x, &y, &targets, &ada(0.0)).unwrap();
        for costs in &a.costs {
            assert!(costs.iter().all(|&c| c > 1e-9), "{costs:?}");
        }
    }

    /// The APN of [`apn`] on detached copies of `vm`'s current values.
    fn detached(vm: &VarMap, seed: u64) -> VideoModel {
        apn_on(
            VarBuilder::from_tensors(crate::init::detached(vm).unwrap(), DType::F32, &Device::Cpu),
            seed,
        )
    }

    /// Algorithm 1 written out by hand, with `level2_logits` choosing the classifier line 13
    /// trains through.
    fn by_hand(level2_own_classifier: bool, updates: usize) -> Vec<(String, Vec<f32>)> {
        let (vm, model, mut opt) = from_scratch();
        let mut up = Updater {
            opt: &mut opt,
            clip_norm: 20.0,
        };
        let at = At { epoch: 0, batch: 0 };
        let (x, y) = batch();
        let targets = ["level2", "level3"];
        // Line 4, its anchors copied out of the graph's buffers.
        let snap = RngSnapshot::take(&model);
        let out = model.forward_t(&x, true).unwrap();
        let anchors: Vec<Tensor> = targets
            .iter()
            .map(|t| {
                let f = out.feature(t).unwrap();
                Tensor::from_vec(
                    f.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    f.shape(),
                    &Device::Cpu,
                )
                .unwrap()
            })
            .collect();
        // Line 5.
        up.update(&cross_entropy(&out.logits, &y).unwrap(), at)
            .unwrap();
        if updates == 1 {
            return params(&vm);
        }
        // Lines 6-12: line 4's forward configuration at the updated weights.
        let fwd = replaying(&model, snap);
        let copies = ascend(&fwd, &x, &y, &targets, Some(&anchors), &ada(1.0))
            .unwrap()
            .copies;
        // Line 13: h(R^II) of the level-II copies.
        let out = model.forward_t(&copies[0], true).unwrap();
        let logits = if level2_own_classifier {
            out.logits_for("level2")
        } else {
            &out.logits
        };
        up.update(&cross_entropy(logits, &y).unwrap(), at).unwrap();
        if updates == 2 {
            return params(&vm);
        }
        // Line 14: h(R^III) of the level-III copies.
        let out = model.forward_t(&copies[1], true).unwrap();
        up.update(&cross_entropy(&out.logits, &y).unwrap(), at)
            .unwrap();
        params(&vm)
    }

    #[test]
    fn sequential_minimisation_is_lines_5_13_and_14_in_order() {
        let (got, losses) = run(Minimisation::Sequential);
        assert_eq!(losses.copies.len(), 2);
        assert!(losses.main.is_finite() && losses.copies.iter().all(|l| l.is_finite()));
        assert_eq!(got, by_hand(true, 3), "not Algorithm 1 as written");
        // Each update moves every parameter group of the model, and the result depends on
        // each: stopping after line 5 or 13, or training line 13 through the main
        // classifier, gives other weights.
        let after5 = by_hand(true, 1);
        let after13 = by_hand(true, 2);
        let (fresh_vm, _) = apn(2);
        let fresh = params(&fresh_vm);
        for (stage, p) in [
            ("line 5", &after5),
            ("line 13", &after13),
            ("line 14", &got),
        ] {
            let before = match stage {
                "line 5" => &fresh,
                "line 13" => &after5,
                _ => &after13,
            };
            for ((name, a), (_, b)) in p.iter().zip(before) {
                // Running statistics are not trained; everything else moves at every line.
                if name.contains("running") {
                    continue;
                }
                assert_ne!(a, b, "{stage} did not change {name}");
            }
        }
        assert_ne!(got, by_hand(false, 3), "line 13 must train h(R^II)");
        // The released code's joint step is something else.
        let (joint, jl) = run(Minimisation::Joint);
        assert!(jl.copies.is_empty());
        assert_ne!(joint, got);
    }

    #[test]
    fn a_non_finite_loss_or_gradient_stops_before_touching_the_weights() {
        let (vm, model) = apn(3);
        let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true).unwrap();
        let mut up = Updater {
            opt: &mut opt,
            clip_norm: 20.0,
        };
        let before = params(&vm);
        let (x, y) = batch();
        let x = (x * f64::NAN).unwrap();
        let err = iteration(
            &model,
            &mut up,
            &x,
            &y,
            &AdaStep::plain(),
            None,
            At { epoch: 2, batch: 4 },
        )
        .unwrap_err();
        // NaN inputs: candle's cross-entropy may or may not propagate the NaN into the
        // loss value, but then the gradient norm is NaN; either is a clear error.
        assert!(
            matches!(
                err,
                Error::NonFiniteLoss {
                    epoch: 3,
                    batch: 5,
                    ..
                } | Error::NonFiniteGradient {
                    epoch: 3,
                    batch: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(params(&vm), before);
    }
}
