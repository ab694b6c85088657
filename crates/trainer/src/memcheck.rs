//! Whether a pixel training step fits in the machine's memory, checked before training starts.
//!
//! A ResNet at 224 x 224 on a paper-sized batch needs many gigabytes of activations; without a
//! check the first step grows until the kernel kills the process (or the machine swaps to a
//! halt). Before the first epoch, [`check`] measures what one training step costs on this
//! machine with this model: two probe steps on a throw-away copy of the model, with 1 and 2
//! clips, each measured as the peak of the large allocations it makes (`vdg` counts them
//! through [`Counting`], its global allocator; elsewhere the growth of the process's peak
//! resident memory, reset through `/proc/self/clear_refs` on Linux). What a step allocates
//! grows linearly with the batch, so the two probes give a fixed part and a per-clip part
//! (scaled by 1.1: the resident memory of a large step is the allocations plus the
//! allocator's own); the step with the configured batch (times the
//! clips one update trains on: ADA's joint step trains on the clean batch and its copies
//! together), plus the loader's batches in flight, must fit in 90 % of what the machine can
//! still give (`MemAvailable`, capped by a cgroup v2 limit, or `VDG_MEMORY_LIMIT` in bytes).
//! Otherwise training stops with the largest batch that would fit. Under `--recompute auto`
//! (ResNet trunks) [`choose`] probes the model both ways and recomputes the residual blocks
//! in backward only when the step does not fit otherwise.
//!
//! CPU only (GPU memory is the device's), Linux only (elsewhere the check is skipped), and
//! skipped with `VDG_MEMORY_CHECK=off`.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::VideoModel;

/// Share of the available memory a training run may plan to use.
const HEADROOM: f64 = 0.9;

/// The per-clip slope measured between 1 and 2 clips, scaled up. Counted allocations are
/// linear from one clip on (ResNet-18 at 224 x 224 keeping its activations: 0.19 GB per clip
/// between 1 and 2 clips and between 8 and 40; recomputing its blocks: 0.12 GB both ways;
/// BENCHMARKS.md, "Training memory"), and a large step's resident memory is within a few
/// percent of them; the margin covers the allocator's own overhead. (Measured by resident
/// memory instead, the slope between 1 and 2 clips varies by about 10 % between runs, and
/// for a recomputing step it falls as low as 0.6x the large-batch slope.)
const SLOPE_MARGIN: f64 = 1.1;

/// Allocations of at least this many bytes are counted by [`Counting`]: tensors, columns and
/// gradients, which set a step's memory; the many small allocations (shapes, graph nodes)
/// are not, so they pay no atomic operation.
pub const COUNTED_BYTES: usize = 64 * 1024;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

/// A global allocator that passes every call to `A` and counts the bytes of the large
/// allocations ([`COUNTED_BYTES`]) alive now and at their peak. `vdg` installs it around
/// mimalloc, and the memory check then measures its probe steps by what they allocate rather
/// than by the process's resident memory, which depends on what the allocator kept from
/// earlier work (BENCHMARKS.md, "Training memory"). Without it the check falls back to the
/// peak resident memory.
pub struct Counting<A>(pub A);

impl<A> Counting<A> {
    fn add(size: usize) {
        if size >= COUNTED_BYTES {
            let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
    }

    fn sub(size: usize) {
        if size >= COUNTED_BYTES {
            LIVE.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is passed to `A` unchanged; the counters only observe sizes.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `A`'s.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            Self::add(layout.size());
            if !COUNTING.load(Ordering::Relaxed) {
                COUNTING.store(true, Ordering::Relaxed);
            }
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::sub(layout.size());
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::sub(layout.size());
            Self::add(new_size);
        }
        p
    }
}

/// Bytes of large allocations alive now and at their peak since [`reset_counted_peak`], when
/// the global allocator is a [`Counting`] one.
pub fn counted() -> Option<(usize, usize)> {
    COUNTING
        .load(Ordering::Relaxed)
        .then(|| (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed)))
}

/// Sets the counted peak to the bytes alive now.
pub fn reset_counted_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

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
        Self::from_probes_at((1, one), (2, two))
    }

    /// From the peak growth of steps on `a.0` and `b.0` clips (`a.0 < b.0`).
    pub fn from_probes_at(a: (usize, u64), b: (usize, u64)) -> Self {
        let per_clip = ((b.1 as f64 - a.1 as f64) / (b.0 - a.0) as f64).max(0.0);
        StepMemory {
            fixed: (a.1 as f64 - per_clip * a.0 as f64).max(0.0),
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

/// One probe step on `clips` zero clips of `[frames, 3, size, size]`: how much it grows
/// memory. Under a [`Counting`] allocator, the peak of the large allocations alive during the
/// step over those alive before it: within 1-2 % between runs (the parallel ops' per-thread
/// buffers), and linear in the clips from one clip on (BENCHMARKS.md, "Training memory").
/// Otherwise the growth of the peak resident memory over `base`, the resident memory before
/// the first probe (the allocator keeps freed memory, so a second probe measured from its own
/// start would see only what it needs beyond the first one's leftovers).
fn probe_step(
    model: &VideoModel,
    clips: usize,
    frames: usize,
    size: usize,
    base: u64,
) -> Result<Option<u64>> {
    let dev = Device::Cpu;
    let counted_before = counted().map(|(live, _)| {
        reset_counted_peak();
        live
    });
    if counted_before.is_none() && !reset_peak() {
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
    if let (Some(before), Some((_, peak))) = (counted_before, counted()) {
        return Ok(Some(peak.saturating_sub(before) as u64));
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
    /// The model has a ResNet trunk and `--recompute off`: the advice names
    /// `--recompute on`.
    pub could_recompute: bool,
    /// The probed model recomputes its residual blocks (said in the messages).
    pub recomputing: bool,
    /// Bytes an update holds besides the probed step: SGD's momentum buffers and the
    /// clipped and decayed gradients' copies, about twice the parameters.
    pub update_bytes: f64,
}

/// A measurement session: the resident memory and the memory available before its first
/// probe. Under a [`Counting`] allocator each probe is measured by what it allocates, from its
/// own start. By resident memory, several models probed in one session are measured from the
/// same start, so the allocator's leftovers of one probe count against the next, not for it:
/// a probe whose steps need more than every earlier one's is measured right (the allocator
/// reuses the leftovers), one that needs less would see mostly leftovers. Probe the model that
/// needs less first, and the other on more clips.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    base: u64,
    available: u64,
}

impl Probe {
    /// `None` where memory cannot be measured here, or with `VDG_MEMORY_CHECK=off`.
    pub fn start() -> Option<Probe> {
        if std::env::var("VDG_MEMORY_CHECK").is_ok_and(|v| v == "off") {
            return None;
        }
        Some(Probe {
            available: available()?,
            base: rss()?,
        })
    }

    /// Probe steps of `model` (a throw-away copy: its BatchNorm statistics and random streams
    /// move) on `clips.0` and `clips.1` clips, and whether `plan` fits; `None` where it could
    /// not be measured.
    pub fn measure(
        &self,
        model: &VideoModel,
        plan: Plan,
        clips: (usize, usize),
    ) -> Result<Option<Verdict>> {
        let (Some(a), Some(b)) = (
            probe_step(model, clips.0, plan.frames, plan.size, self.base)?,
            probe_step(model, clips.1, plan.frames, plan.size, self.base)?,
        ) else {
            return Ok(None);
        };
        let mut memory = StepMemory::from_probes_at((clips.0, a), (clips.1, b));
        memory.per_clip *= SLOPE_MARGIN;
        memory.fixed += plan.update_bytes;
        let need = memory.need(
            plan.batch * plan.clips_per_update,
            plan.batch,
            plan.in_flight,
            plan.input_per_clip(),
        );
        tracing::debug!(
            "memory: a step{} needs about {:.2} GB ({:.1} MB fixed + {:.2} MB per clip, the \
             {} of probe steps on {} and {} clips); {:.2} GB available",
            plan.recomputing_words(),
            need / 1e9,
            memory.fixed / 1e6,
            memory.per_clip / 1e6,
            if counted().is_some() {
                "allocations"
            } else {
                "resident memory"
            },
            clips.0,
            clips.1,
            self.available as f64 / 1e9
        );
        Ok(Some(Verdict {
            memory,
            need,
            available: self.available,
            clips,
            plan,
        }))
    }
}

/// What a probe found: the estimate, and whether the planned step fits.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// The measured cost of a step.
    pub memory: StepMemory,
    /// Bytes the planned step needs (the loader's batches included).
    pub need: f64,
    /// Bytes the process could still grow by when the session started.
    pub available: u64,
    clips: (usize, usize),
    plan: Plan,
}

impl Verdict {
    /// Whether the step fits in [`HEADROOM`] of what is available.
    pub fn fits(&self) -> bool {
        self.need <= self.available as f64 * HEADROOM
    }

    /// The error of a step that does not fit, with the largest batch that would.
    pub fn error(&self) -> Error {
        let plan = self.plan;
        let largest = self.memory.largest_batch(
            self.available as f64,
            plan.clips_per_update,
            plan.in_flight,
            plan.input_per_clip(),
        );
        let recompute = if plan.could_recompute {
            "--recompute on (residual blocks recomputed in backward: measured 0.4-0.7x the \
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
        Error::Config(format!(
            "a training step on {} clips of {} frames at {}x{}{} needs about {:.1} GB \
             ({:.2} GB per clip: the slope measured on this machine with {} and {} clips, \
             plus 10 %), but only {:.1} GB of memory are available (90 % of it may be \
             planned); {advice}. VDG_MEMORY_CHECK=off skips this check.",
            plan.batch * plan.clips_per_update,
            plan.frames,
            plan.size,
            plan.size,
            plan.recomputing_words(),
            self.need / 1e9,
            self.memory.per_clip / 1e9,
            self.clips.0,
            self.clips.1,
            self.available as f64 / 1e9
        ))
    }
}

impl Plan {
    /// Bytes of one clip of input.
    pub(crate) fn input_per_clip(&self) -> f64 {
        (self.frames * 3 * self.size * self.size * 4) as f64
    }

    fn recomputing_words(&self) -> &'static str {
        if self.recomputing {
            " with recomputed residual blocks"
        } else {
            ""
        }
    }
}

/// Probes `model` on 1 and 2 clips ([`Probe::measure`]) and fails with the largest batch
/// that fits when `plan` does not. Returns the estimate, or `None` where it could not be
/// measured.
pub fn check(model: &VideoModel, plan: Plan) -> Result<Option<StepMemory>> {
    let Some(session) = Probe::start() else {
        return Ok(None);
    };
    match session.measure(model, plan, (1, 2))? {
        Some(v) if !v.fits() => Err(v.error()),
        v => Ok(v.map(|v| v.memory)),
    }
}

/// The first training step measured against what the check planned for it: its counted
/// allocations (a [`Counting`] allocator) over those alive before it. A step that allocates
/// more than planned, beyond the slope's margin and 64 MB, logs a warning, so an estimate
/// that was too low is seen on the run where it matters; otherwise the comparison is logged
/// at debug level (`vdg -v`).
#[derive(Debug)]
pub struct FirstStep {
    planned: f64,
    before: usize,
}

impl FirstStep {
    /// Starts measuring a step planned at `planned` bytes; `None` without a counting
    /// allocator.
    pub fn start(planned: f64) -> Option<Self> {
        let (live, _) = counted()?;
        reset_counted_peak();
        Some(FirstStep {
            planned,
            before: live,
        })
    }

    /// The bytes the step allocated at once, and whether that exceeds the plan.
    pub fn finish(self) -> Option<(f64, bool)> {
        let (_, peak) = counted()?;
        let grew = peak.saturating_sub(self.before) as f64;
        let over = grew > self.planned * SLOPE_MARGIN + 64e6;
        if over {
            tracing::warn!(
                "memory: the first training step allocated {:.2} GB at once, more than the \
                 {:.2} GB the memory check planned for it; if memory runs out, lower \
                 --batch-size (BENCHMARKS.md, \"Training memory\")",
                grew / 1e9,
                self.planned / 1e9
            );
        } else {
            tracing::debug!(
                "memory: the first training step allocated {:.2} GB at once (planned {:.2} GB)",
                grew / 1e9,
                self.planned / 1e9
            );
        }
        Some((grew, over))
    }
}

/// How `--recompute auto` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The step fits keeping every activation (or could not be measured).
    Keep,
    /// It fits only with the residual blocks recomputed.
    Recompute,
}

/// `--recompute auto`: probes `recomputing` (the model with its residual blocks recomputed)
/// on 1 and 2 clips first, then `keeping` (the same model keeping its activations, which
/// needs more at every batch) on 1 and 2 clips under a [`Counting`] allocator, on 2 and 4
/// when measured by resident memory, in one session ([`Probe`]). Keeps the
/// activations when that fits, else recomputes when that fits, else fails with the
/// recomputing step's error.
pub fn choose(
    recomputing: &VideoModel,
    keeping: &VideoModel,
    plan: Plan,
) -> Result<(Choice, Option<StepMemory>)> {
    let Some(session) = Probe::start() else {
        return Ok((Choice::Keep, None));
    };
    let on = Plan {
        recomputing: true,
        could_recompute: false,
        ..plan
    };
    let off = Plan {
        recomputing: false,
        could_recompute: false,
        ..plan
    };
    // Counted allocations need no ordering; resident memory does (see [`Probe`]).
    let keep_clips = if counted().is_some() { (1, 2) } else { (2, 4) };
    let r = session.measure(recomputing, on, (1, 2))?;
    let k = session.measure(keeping, off, keep_clips)?;
    match (k, r) {
        (None, _) => Ok((Choice::Keep, None)),
        (Some(k), _) if k.fits() => Ok((Choice::Keep, Some(k.memory))),
        (Some(k), Some(r)) if r.fits() => {
            tracing::info!(
                "recomputing the residual blocks in backward (--recompute auto): a step \
                 keeping their activations needs about {:.1} GB, one recomputing them {:.1} \
                 GB; {:.1} GB are available",
                k.need / 1e9,
                r.need / 1e9,
                k.available as f64 / 1e9
            );
            Ok((Choice::Recompute, Some(r.memory)))
        }
        (Some(_), Some(r)) => Err(r.error()),
        (Some(k), None) => Err(k.error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_batch_is_the_last_that_fits() {
        // Probes on 2 and 4 clips: the same line.
        assert_eq!(
            StepMemory::from_probes_at((2, 400), (4, 600)),
            StepMemory::from_probes(300, 400)
        );
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
