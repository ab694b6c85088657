//! Evaluation: predictions, top-1, the members' combination, per-class accuracy and the
//! confusion matrix, and the records `metrics.json` is made of.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::loader::{ClipSet, LoaderConfig, batches};
use crate::models::{Sampling, VideoModel};

/// How the best epoch is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Best source-validation top-1 (the default; no target labels are looked at).
    SourceVal,
    /// Best target-test top-1: the released code's oracle selection. Flagged in every report.
    TargetTest,
    /// The last epoch.
    Last,
}

/// How gamma-ensemble members are combined at test time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsembleRule {
    /// Per clip, the prediction of the member with the highest softmax confidence (ADA's rule).
    MaxConfidence,
    /// The mean of the members' softmax outputs.
    MeanSoftmax,
}

/// One epoch of one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Source-validation top-1 (%).
    pub source_val_top1: f64,
    /// Target top-1 (%) per domain, only with target-test selection.
    pub target_top1: Option<BTreeMap<String, f64>>,
}

/// Accuracy on one target domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetMetrics {
    /// Clips tested.
    pub clips: usize,
    /// Top-1 (%).
    pub top1: f64,
    /// Top-1 (%) per class (`null` for classes without clips).
    pub per_class: Vec<Option<f64>>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u32>>,
}

/// `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Class names by label.
    pub classes: Vec<String>,
    /// Per member: gamma, history, selected epoch.
    pub members: Vec<MemberMetrics>,
    /// The ensemble (or the single model) on each target domain.
    pub targets: BTreeMap<String, TargetMetrics>,
    /// Selection rule used (flagged when it looked at target labels).
    pub selection: Selection,
    /// Clips in the source-validation split (0: the `source_val_top1` values mean nothing).
    #[serde(default)]
    pub source_val_clips: usize,
}

/// One member in `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberMetrics {
    /// Its gamma (0 without ADA).
    pub gamma: f64,
    /// Every epoch.
    pub epochs: Vec<EpochRecord>,
    /// The selected epoch (1-based).
    pub selected_epoch: usize,
    /// Its own top-1 per target.
    pub target_top1: BTreeMap<String, f64>,
}

/// Softmax outputs `[N, C]` of `model` on `set`, in order.
///
/// Evaluation views (centred crop, deterministic frames) in batches of `batch_size`.
pub fn predict(
    model: &VideoModel,
    set: &ClipSet,
    sampling: Sampling,
    input_size: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let lc = LoaderConfig {
        sampling,
        input_size,
        train: false,
        batch_size,
        flip: false,
        seed: 0,
    };
    let mut out = Vec::with_capacity(set.len());
    for b in batches(set, lc, 0, device.clone()) {
        let b = b?;
        let logits = model.forward_t(&b.clips, false)?.logits;
        let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        out.extend(p.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

/// Top-1 (%) of predictions against labels.
pub fn top1(probs: &[Vec<f32>], labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let ok = probs
        .iter()
        .zip(labels)
        .filter(|(p, l)| argmax(p) == **l as usize)
        .count();
    100.0 * ok as f64 / labels.len() as f64
}

/// Combines members' softmax outputs by `rule`.
pub fn ensemble(members: &[Vec<Vec<f32>>], rule: EnsembleRule) -> Vec<Vec<f32>> {
    let n = members.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| match rule {
            EnsembleRule::MaxConfidence => members
                .iter()
                .map(|m| &m[i])
                .fold(None::<&Vec<f32>>, |best, p| match best {
                    Some(b)
                        if b.iter().cloned().fold(f32::MIN, f32::max)
                            >= p.iter().cloned().fold(f32::MIN, f32::max) =>
                    {
                        Some(b)
                    }
                    _ => Some(p),
                })
                .cloned()
                .unwrap_or_default(),
            EnsembleRule::MeanSoftmax => {
                let c = members[0][i].len();
                (0..c)
                    .map(|k| members.iter().map(|m| m[i][k]).sum::<f32>() / members.len() as f32)
                    .collect()
            }
        })
        .collect()
}

/// Top-1, per-class accuracy and confusion matrix.
pub fn target_metrics(probs: &[Vec<f32>], labels: &[u32], classes: usize) -> TargetMetrics {
    let mut confusion = vec![vec![0u32; classes]; classes];
    for (p, &l) in probs.iter().zip(labels) {
        let pred = argmax(p).min(classes - 1);
        confusion[l as usize][pred] += 1;
    }
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let n: u32 = row.iter().sum();
            (n > 0).then(|| 100.0 * f64::from(row[c]) / f64::from(n))
        })
        .collect();
    TargetMetrics {
        clips: labels.len(),
        top1: top1(probs, labels),
        per_class,
        confusion,
    }
}

/// The mean of the members' own top-1 on each target (what the members score alone, next to
/// the combination in `targets`).
pub fn member_mean(members: &[MemberMetrics]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for m in members {
        for (t, v) in &m.target_top1 {
            let e = sums.entry(t.clone()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(t, (s, n))| (t, s / n.max(1) as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensembles_and_metrics() {
        let a = vec![vec![0.6f32, 0.4], vec![0.2, 0.8]];
        let b = vec![vec![0.1f32, 0.9], vec![0.45, 0.55]];
        let max = ensemble(&[a.clone(), b.clone()], EnsembleRule::MaxConfidence);
        assert_eq!(max, vec![vec![0.1, 0.9], vec![0.2, 0.8]]);
        let mean = ensemble(&[a, b], EnsembleRule::MeanSoftmax);
        assert!((mean[0][0] - 0.35).abs() < 1e-6);
        let m = target_metrics(
            &[vec![0.9, 0.1], vec![0.3, 0.7], vec![0.6, 0.4]],
            &[0, 1, 1],
            2,
        );
        assert_eq!(m.confusion, vec![vec![1, 0], vec![1, 1]]);
        assert!((m.top1 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.per_class, vec![Some(100.0), Some(50.0)]);
    }
}
