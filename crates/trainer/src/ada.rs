//! Video adversarial data augmentation (APN paper, Algorithm 1; after Volpi et al.,
//! "Generalizing to Unseen Domains via Adversarial Data Augmentation", NeurIPS 2018).
//!
//! Per minibatch, for each targeted feature `R`: start a copy of the input at the clean
//! input, and take `t_max` gradient-ascent steps of size `eta` on
//! `CE(h(R(x')), y) - gamma * c(R(x'), R0)`, where `R0` is the clean feature (the anchor:
//! under Algorithm 1 the one line 4 extracted, before line 5's update), `h` the classifier
//! that reads `R` and `c` the [`TransportCost`]. What the copies
//! then train is the minimisation step's business ([`crate::step`]): under the paper's
//! protocol one update per copy through `h(R)` after the clean update (Algorithm 1, lines 5,
//! 13, 14); under the released code's, one joint cross-entropy on the clean batch and the
//! copies, made by that code's ascent ([`ascend_redrawn`]). The variants say which features
//! are targeted.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::{HeadOutput, ModelKind};
use crate::nn::{cross_entropy, mse};

/// Which features adversarial copies are made against.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum AdaVariant {
    /// No augmentation.
    None,
    /// One copy against the last hidden feature (the baselines' "+ADA" of Tables 1-2).
    Ada,
    /// Multilayer (ADA*): level II and level III for APN; TRN's `g` and `h` for TRN and
    /// TRN-ATTN (Table 2); the pooled res4 and res5 outputs for TSM, I3D and Non-local.
    AdaStar,
    /// Ablation (§5.3): APN's global relation only.
    GlobalOnly,
    /// Ablation (§5.3): APN's level II only.
    Level2Only,
    /// Ablation (§5.3): APN's level III only.
    Level3Only,
}

impl AdaVariant {
    /// Every variant.
    pub const ALL: [AdaVariant; 6] = [
        AdaVariant::None,
        AdaVariant::Ada,
        AdaVariant::AdaStar,
        AdaVariant::GlobalOnly,
        AdaVariant::Level2Only,
        AdaVariant::Level3Only,
    ];

    /// The snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            AdaVariant::None => "none",
            AdaVariant::Ada => "ada",
            AdaVariant::AdaStar => "ada_star",
            AdaVariant::GlobalOnly => "global_only",
            AdaVariant::Level2Only => "level2_only",
            AdaVariant::Level3Only => "level3_only",
        }
    }

    /// Parses a snake_case name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown ADA variant {name:?}; known: {}",
                    Self::ALL.map(|v| v.name()).join(", ")
                ))
            })
    }

    /// The features attacked for `kind` (one adversarial copy each), or an error if the
    /// model has no such features.
    pub fn targets(self, kind: ModelKind) -> Result<Vec<&'static str>> {
        let t: Vec<&'static str> = match (self, kind) {
            (AdaVariant::None, _) => vec![],
            (AdaVariant::Ada, _) => vec!["last"],
            (AdaVariant::AdaStar, ModelKind::Apn) => vec!["level2", "level3"],
            (AdaVariant::AdaStar, ModelKind::Trn | ModelKind::TrnAttn) => vec!["g", "h"],
            // The pooled res4 (`layer3`) and res5 (`layer4`) outputs.
            (AdaVariant::AdaStar, ModelKind::Tsm | ModelKind::I3d | ModelKind::NonLocal) => {
                vec!["res4", "last"]
            }
            (AdaVariant::GlobalOnly, ModelKind::Apn) => vec!["global"],
            (AdaVariant::Level2Only, ModelKind::Apn) => vec!["level2"],
            (AdaVariant::Level3Only, ModelKind::Apn) => vec!["level3"],
            (v, k) => {
                return Err(Error::Config(format!(
                    "ADA variant {} needs multilayer features that {} does not have (use `ada`)",
                    v.name(),
                    k.name()
                )));
            }
        };
        Ok(t)
    }
}

/// The transportation cost `c(R, R0)` of the adversarial objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportCost {
    /// The mean squared difference over every element of the batch's features: the video
    /// ADA of APN (paper §4.3, after Eq. 8: "measured by the mean squared loss"). `gamma`
    /// then weighs a per-element squared distance.
    #[default]
    MeanSquared,
    /// Eq. 2 of the paper (Volpi et al. 2018): `1/2 ||R - R0||^2` per clip, averaged over the
    /// batch like the cross-entropy: the original image ADA of the baselines. `gamma` then
    /// weighs a per-clip squared Euclidean distance (larger by the feature width than the
    /// mean squared cost at the same gamma).
    HalfSquaredL2,
}

impl TransportCost {
    /// The cost between `r` and the anchor `r0` (both `[B, ...]`).
    pub fn cost(self, r: &Tensor, r0: &Tensor) -> Result<Tensor> {
        Ok(match self {
            TransportCost::MeanSquared => mse(r, r0)?,
            TransportCost::HalfSquaredL2 => {
                let b = r.dim(0)?;
                ((r - r0)?.sqr()?.sum_all()? * (0.5 / b.max(1) as f64))?
            }
        })
    }
}

/// ADA hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaConfig {
    /// Step size of the gradient ascent (the paper's eta = 1).
    pub eta: f64,
    /// Ascent steps per minibatch (the paper's T_max = 5).
    pub t_max: usize,
    /// Weight of the feature-distance penalty (gamma; the paper ensembles 0.001..1).
    pub gamma: f64,
    /// How the distance to the anchor is measured.
    #[serde(default)]
    pub cost: TransportCost,
}

impl Default for AdaConfig {
    fn default() -> Self {
        AdaConfig {
            eta: 1.0,
            t_max: 5,
            gamma: 0.01,
            cost: TransportCost::MeanSquared,
        }
    }
}

/// The adversarial objective `CE(h(R(x')), y) - gamma * c(R(x'), R0)` of one output.
pub fn objective(
    out: &HeadOutput,
    target: &str,
    labels: &Tensor,
    anchor: &Tensor,
    cfg: &AdaConfig,
) -> Result<Tensor> {
    let ce = cross_entropy(out.logits_for(target), labels)?;
    let dist = cfg.cost.cost(out.feature(target)?, anchor)?;
    Ok((ce - (dist * cfg.gamma)?)?)
}

/// Adversarial copies and what the ascent saw.
#[derive(Debug)]
pub struct Ascent {
    /// One copy of the input per target feature, in the order of the targets.
    pub copies: Vec<Tensor>,
    /// Per target, the transport cost `c(R(x'), R0)` at each ascent step, measured before
    /// the step (the first is 0 when the anchor is that step's own feature).
    pub costs: Vec<Vec<f64>>,
}

/// Makes one adversarial copy of `x` per target feature (Algorithm 1, lines 6-12).
///
/// `forward(x)` runs the model in training mode and must be a fixed function of `x` for
/// the duration of the call: the trainer restores the dropout and relation-subset RNGs
/// before every call ([`crate::step`]), so every ascent step sees the same masks and subsets.
/// `anchors` holds the anchor `R0` of each target, in the order of `targets` (Algorithm 1:
/// line 4's features, taken before line 5's update); without them the anchor of each target
/// is its feature in the first ascent step, which runs on the clean input, and the
/// transport cost starts at 0 ([`Ascent::costs`]). With `t_max = 0` the copies are the
/// clean input.
pub fn ascend(
    forward: &dyn Fn(&Tensor) -> Result<HeadOutput>,
    x: &Tensor,
    labels: &Tensor,
    targets: &[&str],
    anchors: Option<&[Tensor]>,
    cfg: &AdaConfig,
) -> Result<Ascent> {
    if let Some(a) = anchors
        && a.len() != targets.len()
    {
        return Err(Error::Config(format!(
            "{} anchors for {} targeted features",
            a.len(),
            targets.len()
        )));
    }
    let mut copies = Vec::with_capacity(targets.len());
    let mut all_costs = Vec::with_capacity(targets.len());
    for (i, &t) in targets.iter().enumerate() {
        let mut adv = x.detach();
        let mut anchor: Option<Tensor> = anchors.map(|a| a[i].detach());
        let mut costs = Vec::with_capacity(cfg.t_max);
        for _ in 0..cfg.t_max {
            let (moved, cost) = ascent_step(forward, &adv, labels, t, &mut anchor, cfg)?;
            adv = moved;
            costs.push(cost);
        }
        all_costs.push(costs);
        copies.push(adv);
    }
    Ok(Ascent {
        copies,
        costs: all_costs,
    })
}

/// The released code's ascent (thuml/VideoDG, `main_val.py` with `--add_dg`): at each of
/// the `t_max` steps the clean input's features are computed anew, without gradient, and
/// then every copy, in the order of `targets`, takes one step against them. No forward
/// configuration is replayed: `forward` draws its dropout masks and relation subsets afresh
/// at every call, as every forward pass in training mode does there, so the anchors differ
/// from step to step and the cost is not 0 even at the first step.
pub fn ascend_redrawn(
    forward: &dyn Fn(&Tensor) -> Result<HeadOutput>,
    x: &Tensor,
    labels: &Tensor,
    targets: &[&str],
    cfg: &AdaConfig,
) -> Result<Ascent> {
    let mut copies: Vec<Tensor> = targets.iter().map(|_| x.detach()).collect();
    let mut costs: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    let clean = x.detach();
    for _ in 0..cfg.t_max {
        let out = forward(&clean)?;
        let anchors = targets
            .iter()
            .map(|t| Ok(out.feature(t)?.detach()))
            .collect::<Result<Vec<_>>>()?;
        drop(out);
        for (i, (&t, anchor)) in targets.iter().zip(anchors).enumerate() {
            let (moved, cost) =
                ascent_step(forward, &copies[i], labels, t, &mut Some(anchor), cfg)?;
            copies[i] = moved;
            costs[i].push(cost);
        }
    }
    Ok(Ascent { copies, costs })
}

/// One ascent step of the copy `adv` against feature `t`: the moved copy and the transport
/// cost before the step. Without an `anchor`, the step's own feature becomes it.
fn ascent_step(
    forward: &dyn Fn(&Tensor) -> Result<HeadOutput>,
    adv: &Tensor,
    labels: &Tensor,
    t: &str,
    anchor: &mut Option<Tensor>,
    cfg: &AdaConfig,
) -> Result<(Tensor, f64)> {
    let v = Var::from_tensor(adv)?;
    let out = forward(v.as_tensor())?;
    let r0 = match anchor {
        Some(r0) => r0.clone(),
        None => anchor.insert(out.feature(t)?.detach()).clone(),
    };
    let ce = cross_entropy(out.logits_for(t), labels)?;
    let dist = cfg.cost.cost(out.feature(t)?, &r0)?;
    let cost = f64::from(dist.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
    let obj = (ce - (dist * cfg.gamma)?)?;
    let grads = obj.backward()?;
    let g = grads.get(v.as_tensor()).ok_or_else(|| {
        Error::Config(format!(
            "no gradient reaches the input through feature {t:?}"
        ))
    })?;
    Ok(((adv + (g * cfg.eta)?)?.detach(), cost))
}

/// [`ascend`]'s copies only, each target anchored at its feature in the first ascent step.
pub fn adversarial_copies(
    forward: &dyn Fn(&Tensor) -> Result<HeadOutput>,
    x: &Tensor,
    labels: &Tensor,
    targets: &[&str],
    cfg: &AdaConfig,
) -> Result<Vec<Tensor>> {
    Ok(ascend(forward, x, labels, targets, None, cfg)?.copies)
}
