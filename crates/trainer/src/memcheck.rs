//! Whether a pixel training step fits in the machine's memory, checked before training starts.
//!
//! A ResNet at 224 x 224 on a paper-sized batch needs many gigabytes of activations; without a
//! check the first step grows until the kernel kills the process (or the machine swaps to a
//! halt). Before the first epoch, [`check`] measures what one training step costs on this
//! machine with this model: two probe steps on a throw-away copy of the model, with 1 and 2
//! clips, each measured as the growth of the process's peak resident memory (Linux: the peak
//! is reset through `/proc/self/clear_refs`). Memory grows about linearly with the batch, so
//! the two probes give a fixed part and a per-clip part (scaled by 1.1: the slope can grow a
//! little with the batch); the step with the configured batch (times the
//! clips one update trains on: ADA's joint step trains on the clean batch and its copies
//! together), plus the loader's batches in flight, must fit in 90 % of what the machine can
//! still give (`MemAvailable`, capped by a cgroup v2 limit, or `VDG_MEMORY_LIMIT` in bytes).
//! Otherwise training stops with the largest batch that would fit.
//!
//! CPU only (GPU memory is the device's), Linux only (elsewhere the check is skipped), and
//! skipped with `VDG_MEMORY_CHECK=off`.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::VideoModel;

/// Share of the available memory a training run may plan to use.
const HEADROOM: f64 = 0.9;

/// The per-clip slope measured between 1 and 2 clips, scaled up: on ResNet-18 at 224 x 224
/// it was 0.19-0.21 GB against 0.21 GB between 8 and 40 clips (BENCHMARKS.md, "Training
/// memory"; before the fused BatchNorm + ReLU it was 15-20 % below), so a small margin keeps
/// the estimate on the safe side.
const SLOPE_MARGIN: f64 = 1.1;

/// One field of `/proc/self/status` or `/proc/meminfo`, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Peak resident memory of this process, in bytes.
pub fn peak_rss() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

fn rss() -> Option<u64> {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// Resets the peak to the current resident memory (Linux >= 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes this process can still grow by: `VDG_MEMORY_LIMIT` if set, else `MemAvailable`
/// capped by the cgroup v2 limit of this process's group.
pub fn available() -> Option<u64> {
    if let Some(limit) = std::env::var("VDG_MEMORY_LIMIT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(limit.saturating_sub(rss().unwrap_or(0)));
    }
    let mut avail = proc_kib("/proc/meminfo", "MemAvailable:")?;
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
        avail = avail.min(max.saturating_sub(current));
    }
    Some(avail)
}

/// What one training step costs: `fixed + per_clip * clips` bytes of peak growth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMemory {
    /// Bytes independent of the batch (weights' gradients, workspace).
    pub fixed: f64,
    /// Bytes per clip of the batch (activations kept for backward).
    pub per_clip: f64,
}

impl StepMemory {
    /// From the peak growth of steps on 1 and 2 clips.
    pub fn from_probes(one: u64, two: u64) -> Self {
        let per_clip = (two as f64 - one as f64).max(0.0);
        StepMemory {
            fixed: (one as f64 - per_clip).max(0.0),
            per_clip,
        }
    }

    /// Bytes a step on `clips` clips needs, plus `input_per_clip` for each clip held by the
    /// loader (`in_flight` batches of `batch` clips).
    pub fn need(&self, clips: usize, batch: usize, in_flight: usize, input_per_clip: f64) -> f64 {
        self.fixed + self.per_clip * clips as f64 + input_per_clip * (batch * in_flight) as f64
    }

    /// The largest batch whose step (trained on `batch * clips_per_update` clips) fits in
    /// `avail` bytes; 0 when not even one clip does.
    pub fn largest_batch(
        &self,
        avail: f64,
        clips_per_update: usize,
        in_flight: usize,
        input_per_clip: f64,
    ) -> usize {
        let per = self.per_clip * clips_per_update as f64 + input_per_clip * in_flight as f64;
        let room = avail * HEADROOM - self.fixed;
        if room <= 0.0 || per <= 0.0 {
            return if room > 0.0 { usize::MAX } else { 0 };
        }
        (room / per).floor() as usize
    }
}

/// One probe step on `clips` zero clips of `[frames, 3, size, size]`: the growth of the peak
/// resident memory over `base`, the resident memory before the first probe (the allocator
/// keeps freed memory, so a second probe measured from its own start would see only what it
/// needs beyond the first one's leftovers).
fn probe_step(
    model: &VideoModel,
    clips: usize,
    frames: usize,
    size: usize,
    base: u64,
) -> Result<Option<u64>> {
    let dev = Device::Cpu;
    if !reset_peak() {
        return Ok(None);
    }
    {
        let x = Tensor::zeros((clips, frames, 3, size, size), DType::F32, &dev)?;
        let y = Tensor::zeros(clips, DType::U32, &dev)?;
        let out = model.forward_t(&x, true)?;
        let loss = crate::nn::cross_entropy(&out.logits, &y)?;
        let grads = loss.backward()?;
        drop(grads);
    }
    Ok(peak_rss().map(|p| p.saturating_sub(base)))
}

/// What [`check`] needs to know about the run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Clips per batch.
    pub batch: usize,
    /// Clips one update trains on, per clip of the batch (ADA's joint step: 1 + copies).
    pub clips_per_update: usize,
    /// Frames per clip and their side.
    pub frames: usize,
    /// Input side in pixels.
    pub size: usize,
    /// Batches the loader holds besides the one in use.
    pub in_flight: usize,
    /// The model has a ResNet trunk that does not recompute its residual blocks: the
    /// advice names `--recompute`.
    pub could_recompute: bool,
}

/// Probes `model` (a throw-away copy: its BatchNorm statistics and random streams move) and
/// fails with the largest batch that fits when `plan` does not. Returns the estimate, or
/// `None` where it could not be measured.
pub fn check(model: &VideoModel, plan: Plan) -> Result<Option<StepMemory>> {
    if std::env::var("VDG_MEMORY_CHECK").is_ok_and(|v| v == "off") {
        return Ok(None);
    }
    let Some(avail) = available() else {
        return Ok(None);
    };
    let Some(base) = rss() else { return Ok(None) };
    let (Some(one), Some(two)) = (
        probe_step(model, 1, plan.frames, plan.size, base)?,
        probe_step(model, 2, plan.frames, plan.size, base)?,
    ) else {
        return Ok(None);
    };
    let mut mem = StepMemory::from_probes(one, two);
    mem.per_clip *= SLOPE_MARGIN;
    let input_per_clip = (plan.frames * 3 * plan.size * plan.size * 4) as f64;
    let need = mem.need(
        plan.batch * plan.clips_per_update,
        plan.batch,
        plan.in_flight,
        input_per_clip,
    );
    tracing::debug!(
        "memory: a step needs about {:.2} GB ({:.2} GB fixed + {:.3} GB per clip); {:.2} GB available",
        need / 1e9,
        mem.fixed / 1e9,
        mem.per_clip / 1e9,
        avail as f64 / 1e9
    );
    if need > avail as f64 * HEADROOM {
        let largest = mem.largest_batch(
            avail as f64,
            plan.clips_per_update,
            plan.in_flight,
            input_per_clip,
        );
        let recompute = if plan.could_recompute {
            "--recompute (residual blocks recomputed in backward: measured 0.4-0.7x the \
             memory for 1.2x the time, BENCHMARKS.md), or "
        } else {
            ""
        };
        let advice = if largest == 0 {
            format!(
                "not even one clip fits: try {recompute}lower --input-size, or train a \
                 temporal head on cached features (vdg features, then --features)"
            )
        } else {
            format!(
                "the largest batch that fits is {largest} clips (--batch-size {largest}); or \
                 {recompute}lower --input-size, or train on cached features (vdg features)"
            )
        };
        return Err(Error::Config(format!(
            "a training step on {} clips of {} frames at {}x{} needs about {:.1} GB \
             ({:.2} GB per clip: the slope measured on this machine with 1 and 2 clips, plus \
             10 %), but only {:.1} GB \
             of memory are available (90 % of it may be planned); {advice}. \
             VDG_MEMORY_CHECK=off skips this check.",
            plan.batch * plan.clips_per_update,
            plan.frames,
            plan.size,
            plan.size,
            need / 1e9,
            mem.per_clip / 1e9,
            avail as f64 / 1e9
        )));
    }
    Ok(Some(mem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_batch_is_the_last_that_fits() {
        let mem = StepMemory::from_probes(300, 400);
        assert_eq!(mem.per_clip, 100.0);
        assert_eq!(mem.fixed, 200.0);
        // 90 % of 1,000 = 900 = 200 + 100 * 7: seven clips fit, with no loader copies.
        assert_eq!(mem.largest_batch(1000.0, 1, 0, 0.0), 7);
        assert!(mem.need(7, 7, 0, 0.0) <= 900.0 && mem.need(8, 8, 0, 0.0) > 900.0);
        // A joint ADA step on 3x the batch, and two batches of 10 bytes a clip in flight.
        assert_eq!(mem.largest_batch(1000.0, 3, 2, 10.0), 2);
        assert_eq!(mem.largest_batch(100.0, 1, 0, 0.0), 0);
    }

    #[test]
    fn the_peak_and_available_memory_are_readable_here() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss().is_some_and(|p| p > 0));
            assert!(available().is_some_and(|a| a > 0));
            assert!(reset_peak());
        }
    }
}
