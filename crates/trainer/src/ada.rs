//! Video adversarial data augmentation (APN paper, Algorithm 1; after Volpi et al.,
//! "Generalizing to Unseen Domains via Adversarial Data Augmentation", NeurIPS 2018).
//!
//! Per minibatch, for each targeted feature `R`: start a copy of the input at the clean
//! input, and take `t_max` gradient-ascent steps of size `eta` on
//! `CE(h(R(x')), y) - gamma * MSE(R(x'), R(x))`, where `R(x)` is the clean feature and `h`
//! the classifier that reads `R`. The copies, with the clean batch and the original labels,
//! then make the minimisation step. The variants say which features are targeted.

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

/// ADA hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaConfig {
    /// Step size of the gradient ascent (the paper's eta = 1).
    pub eta: f64,
    /// Ascent steps per minibatch (the paper's T_max = 5).
    pub t_max: usize,
    /// Weight of the feature-distance penalty (gamma; the paper ensembles 0.001..1).
    pub gamma: f64,
}

impl Default for AdaConfig {
    fn default() -> Self {
        AdaConfig {
            eta: 1.0,
            t_max: 5,
            gamma: 0.01,
        }
    }
}

/// The adversarial objective `CE(h(R(x')), y) - gamma * MSE(R(x'), R0)` of one output.
pub fn objective(
    out: &HeadOutput,
    target: &str,
    labels: &Tensor,
    clean: &Tensor,
    gamma: f64,
) -> Result<Tensor> {
    let ce = cross_entropy(out.logits_for(target), labels)?;
    let dist = mse(out.feature(target)?, clean)?;
    Ok((ce - (dist * gamma)?)?)
}

/// Makes one adversarial copy of `x` per target feature.
///
/// `forward(x, train)` runs the model; `targets` come from [`AdaVariant::targets`].
pub fn adversarial_copies(
    forward: &dyn Fn(&Tensor, bool) -> Result<HeadOutput>,
    x: &Tensor,
    labels: &Tensor,
    targets: &[&str],
    cfg: &AdaConfig,
) -> Result<Vec<Tensor>> {
    if targets.is_empty() {
        return Ok(vec![]);
    }
    let clean = forward(x, true)?;
    let mut copies = Vec::new();
    for &t in targets {
        let r0 = clean.feature(t)?.detach();
        let mut adv = x.detach();
        for _ in 0..cfg.t_max {
            let v = Var::from_tensor(&adv)?;
            let out = forward(v.as_tensor(), true)?;
            let obj = objective(&out, t, labels, &r0, cfg.gamma)?;
            let grads = obj.backward()?;
            let g = grads.get(v.as_tensor()).ok_or_else(|| {
                Error::Config(format!(
                    "no gradient reaches the input through feature {t:?}"
                ))
            })?;
            adv = (adv + (g * cfg.eta)?)?.detach();
        }
        copies.push(adv);
    }
    Ok(copies)
}
