//! The original image ADA (Volpi et al., "Generalizing to Unseen Domains via Adversarial Data
//! Augmentation", NeurIPS 2018, Algorithm 1), with which the APN paper combines its
//! baselines (§5.2: "with the original image ADA method"; §4.3 describes its two stages).
//!
//! Training runs in `K + 1` stages of [`ImageAdaPlan::interval`] epochs (the last stage takes
//! whatever epochs remain). At the start of stage `k` (`k = 1..K`) a **maximisation phase**
//! takes every training clip of the source set once (training sampling and augmentation),
//! makes one adversarial copy of it against the last hidden feature with `T_max` ascent steps
//! of Eq. 2 (`CE - gamma * 1/2 ||z - z0||^2`, [`TransportCost::HalfSquaredL2`]), and appends
//! the copies to a growing dataset; training then continues on the union. The copies are
//! fixed tensors: unlike the source clips they are not re-sampled or re-augmented, which is
//! exactly what §4.3 says makes the method a poor fit for video, and why APN uses Algorithm 1.
//!
//! Each phase's copies are kept in `image-ada-phase-K.safetensors` in the member folder
//! (`clips` `[N, T, 3, S, S]` f32, `labels` `[N]` u32), written atomically, so a resumed run
//! loads them instead of recomputing. A phase leaves the dropout and subset RNGs where it
//! found them, so a resumed run and an uninterrupted one take the same draws afterwards.
//! Memory: the copies of all phases are held in RAM (`K x N x T x 3 x S x S x 4` bytes; at
//! the paper's shapes, 5 x 3 x 224 x 224 floats = 3 MB per clip).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::ada::{AdaConfig, TransportCost, ascend};
use crate::error::{Error, Result};
use crate::loader::{ClipSet, LoaderConfig, batches};
use crate::models::VideoModel;
use crate::step::RngSnapshot;

/// The default number of maximisation phases `K` (our choice: the APN paper does not give K
/// for its baselines; Volpi et al. vary it).
pub const DEFAULT_PHASES: usize = 2;

/// When the maximisation phases of a run happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageAdaPlan {
    /// `K`.
    pub phases: usize,
    /// Epochs per stage: phase `k` runs before epoch `k * interval` (0-based).
    pub interval: usize,
}

impl ImageAdaPlan {
    /// `phases` phases over `epochs` epochs; `interval` defaults to `epochs / (phases + 1)`
    /// (at least 1), so that every stage, the last included, trains about as long.
    pub fn new(phases: usize, interval: Option<usize>, epochs: usize) -> Self {
        ImageAdaPlan {
            phases,
            interval: interval.unwrap_or(epochs / (phases + 1)).max(1),
        }
    }

    /// The 1-based phase that runs before 0-based `epoch`, if any.
    pub fn phase_before(&self, epoch: usize) -> Option<usize> {
        (epoch > 0 && epoch.is_multiple_of(self.interval))
            .then(|| epoch / self.interval)
            .filter(|&k| k <= self.phases)
    }

    /// The phases that ran at the start of epochs before 0-based `epoch` (the phase files a
    /// run resumed at `epoch` loads up front; a phase due at `epoch` itself is the loop's).
    pub fn phases_before(&self, epoch: usize) -> usize {
        if epoch == 0 {
            return 0;
        }
        ((epoch - 1) / self.interval).min(self.phases)
    }
}

/// The adversarial clips appended so far.
#[derive(Debug, Default)]
pub struct AugmentedSet {
    clips: Vec<Tensor>,
    labels: Vec<u32>,
}

/// The file of phase `k` in a member folder.
pub fn phase_path(member_dir: &Path, k: usize) -> PathBuf {
    member_dir.join(format!("image-ada-phase-{k}.safetensors"))
}

impl AugmentedSet {
    /// Number of adversarial clips.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no phase has run.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Appends a phase's copies (`clips [N, ...]`, `labels [N]`).
    pub fn append(&mut self, clips: &Tensor, labels: &[u32]) -> Result<()> {
        for i in 0..labels.len() {
            self.clips.push(clips.get(i)?);
        }
        self.labels.extend_from_slice(labels);
        Ok(())
    }

    /// Loads phase `k` from `member_dir` and appends it.
    pub fn load_phase(&mut self, member_dir: &Path, k: usize) -> Result<()> {
        let path = phase_path(member_dir, k);
        let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let (Some(clips), Some(labels)) = (t.get("clips"), t.get("labels")) else {
            return Err(Error::Config(format!(
                "{}: no clips/labels tensors",
                path.display()
            )));
        };
        let labels = labels.to_vec1::<u32>()?;
        self.append(clips, &labels)
    }

    /// The batches of one epoch over the adversarial clips, shuffled by `seed`.
    pub fn batches(
        &self,
        batch_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        order
            .chunks(batch_size.max(1))
            .map(|chunk| {
                let xs: Vec<Tensor> = chunk.iter().map(|&i| self.clips[i].clone()).collect();
                let ys: Vec<u32> = chunk.iter().map(|&i| self.labels[i]).collect();
                Ok((
                    Tensor::stack(&xs, 0)?.to_device(device)?,
                    Tensor::new(ys.as_slice(), device)?,
                ))
            })
            .collect()
    }
}

/// Runs maximisation phase `k`: one adversarial copy of every training clip against the
/// `last` feature, written to `member_dir` (atomically) and returned.
pub fn run_phase(
    model: &VideoModel,
    set: &ClipSet,
    lc: LoaderConfig,
    k: usize,
    ada: &AdaConfig,
    member_dir: &Path,
    device: &Device,
) -> Result<(Tensor, Vec<u32>)> {
    let cfg = AdaConfig {
        cost: TransportCost::HalfSquaredL2,
        ..*ada
    };
    let outer = RngSnapshot::take(model);
    let mut clips = Vec::new();
    let mut labels = Vec::new();
    // Its own sampling and augmentation draws, apart from every training epoch's.
    for batch in batches(set, lc, 1_000_000 + k, device.clone()) {
        let batch = batch?;
        let snap = RngSnapshot::take(model);
        let fwd = |v: &Tensor| {
            snap.restore(model);
            model.forward_t(v, true)
        };
        let mut copies = ascend(&fwd, &batch.clips, &batch.labels, &["last"], None, &cfg)?.copies;
        clips.push(copies.remove(0).to_device(&Device::Cpu)?);
        labels.extend(batch.labels.to_vec1::<u32>()?);
    }
    outer.restore(model);
    let clips = Tensor::cat(&clips, 0)?.to_dtype(DType::F32)?;
    let path = phase_path(member_dir, k);
    let tmp = vdg_data::atomic::tmp_path(&path);
    let tensors = HashMap::from([
        ("clips".to_string(), clips.clone()),
        (
            "labels".to_string(),
            Tensor::new(labels.as_slice(), &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    Ok((clips, labels))
}

/// The order of one epoch's batches when `n_source` source batches and `n_adv` adversarial
/// ones are mixed: `true` for an adversarial batch, shuffled by `seed` (minibatches drawn
/// uniformly from the union, as in Volpi et al.'s training loop).
pub fn interleave(n_source: usize, n_adv: usize, seed: u64) -> Vec<bool> {
    let mut v: Vec<bool> = std::iter::repeat_n(false, n_source)
        .chain(std::iter::repeat_n(true, n_adv))
        .collect();
    v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_split_the_epochs_into_stages() {
        let p = ImageAdaPlan::new(2, None, 12);
        assert_eq!(p.interval, 4);
        let when: Vec<(usize, usize)> = (0..12)
            .filter_map(|e| p.phase_before(e).map(|k| (e, k)))
            .collect();
        assert_eq!(when, [(4, 1), (8, 2)]);
        assert_eq!(p.phases_before(0), 0);
        // Resuming at epoch 4: phase 1 is due at its start, so none is loaded up front.
        assert_eq!(p.phases_before(4), 0);
        assert_eq!(p.phases_before(5), 1);
        assert_eq!(p.phases_before(9), 2);
        assert_eq!(p.phases_before(11), 2);
        // The paper's 150 epochs with K = 2: phases before epochs 50 and 100.
        let p = ImageAdaPlan::new(2, None, 150);
        assert_eq!(
            (p.phase_before(50), p.phase_before(100)),
            (Some(1), Some(2))
        );
        assert_eq!(p.phase_before(149), None);
        // An explicit interval; never a phase past K.
        let p = ImageAdaPlan::new(1, Some(3), 12);
        assert_eq!(
            (p.phase_before(3), p.phase_before(6), p.phases_before(10)),
            (Some(1), None, 1)
        );
        let order = interleave(3, 2, 7);
        assert_eq!(order.len(), 5);
        assert_eq!(order.iter().filter(|&&a| a).count(), 2);
        assert_eq!(order, interleave(3, 2, 7));
    }
}
