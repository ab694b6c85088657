//! Progress of one unit of decoding work, for prep's stall watchdog.
//!
//! A decoding worker can stop making progress without failing: a read on a network file
//! system that stopped answering blocks in the kernel, and a decoder or demuxer can loop on
//! crafted input. The worker beats a [`Watch`] for every packet it reads and every frame it
//! hands over; prep's watchdog reads how long it has been idle, and past `--stall-timeout`
//! abandons it ([`Watch::abandon`]): the video is recorded as failed, a fresh worker takes
//! its place, and FFmpeg is asked to give up (its interrupt callback, polled around its
//! reads, returns "immediate exit requested"). A read blocked in the kernel or a loop that
//! never reads cannot be interrupted; such a thread is left behind, and the run goes on
//! without it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Heartbeat and abandonment of one unit of work.
#[derive(Debug)]
pub struct Watch {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last_beat_ms: AtomicU64,
    beats: AtomicU64,
    abandoned: AtomicBool,
    /// The run's stop flag (a signal): set, the work is given up on too.
    stop: Option<Arc<AtomicBool>>,
}

impl Default for Watch {
    fn default() -> Self {
        Watch::new()
    }
}

impl Watch {
    /// A watch whose last beat is now.
    pub fn new() -> Watch {
        Watch::stopped_by(None)
    }

    /// A watch that also counts as abandoned once `stop` is set (SIGINT, SIGTERM), so a
    /// long video being decoded does not hold the run's stop back.
    pub fn stopped_by(stop: Option<Arc<AtomicBool>>) -> Watch {
        Watch {
            origin: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            beats: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
            stop,
        }
    }

    /// Records progress (a packet read, a frame handed over).
    pub fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_beat_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Beats so far.
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }

    /// Time since the last beat (or since the watch was made).
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Gives up on the work: [`Watch::is_abandoned`] is true from now on, which FFmpeg's
    /// interrupt callback reads.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }

    /// Whether the work was given up on, or the run asked to stop.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
            || self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_resets_the_idle_time_and_abandoning_sticks() {
        let w = Watch::new();
        std::thread::sleep(Duration::from_millis(200));
        assert!(w.idle() >= Duration::from_millis(200));
        w.beat();
        assert!(w.idle() < Duration::from_millis(200), "{:?}", w.idle());
        assert_eq!(w.beats(), 1);
        assert!(!w.is_abandoned());
        w.abandon();
        assert!(w.is_abandoned());
        let flag = Arc::new(AtomicBool::new(false));
        let w = Watch::stopped_by(Some(flag.clone()));
        assert!(!w.is_abandoned());
        flag.store(true, Ordering::SeqCst);
        assert!(w.is_abandoned());
    }
}
