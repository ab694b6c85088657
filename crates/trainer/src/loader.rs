//! Clips from prepared shards: TSN segment sampling or dense windows, the paper's
//! augmentation, JPEG decoding on worker threads, batches `[B, M, 3, S, S]` with prefetch;
//! or, from a feature cache (`vdg features`), batches of cached frame features `[B, M, F]`.
//!
//! Dense sampling (I3D, Non-local): `T` frames `stride` apart (32 x 2 by default, mmaction2's
//! Kinetics I3D input), the window starting at a random frame in training and centred in
//! evaluation; a video shorter than the window is looped.
//!
//! Sampling (released VideoDG/TSN code, dataset-facts §1.4, 0-based here): training takes one
//! random frame per segment (`k * (n / M) + U{0..n/M-1}`; `M` sorted random frames when a
//! segment is shorter than a frame; frame 0 when `n < M`); evaluation takes segment centres
//! (`floor(n/M/2 + k*n/M)`).
//!
//! Augmentation (§1.5): training crops a square-ish region whose sides are drawn from
//! `{1, .875, .75, .66} x` the shorter side (aspect distortion at most one step), placed at one
//! of 13 fixed offsets, resized to `S x S`, and flips the whole clip with probability 1/2.
//! Evaluation resizes the shorter side to `S * 256 / 224` and takes the centre `S x S`.
//! Pixels are scaled to [0, 1] and normalised with the ImageNet mean and std.
//!
//! Every random choice comes from a ChaCha RNG seeded by (seed, epoch, clip), so batches do not
//! depend on thread timing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use vdg_data::shard::{VIDEOS_FILE, frames_path, read_frames_at, read_videos_table};
use vdg_data::split::derive_seed;
use vdg_data::{VideoRow, VideoStatus};

use crate::error::{Error, Result};
pub use crate::frames::{
    CROP_SCALES, IMAGENET_MEAN, IMAGENET_STD, View, decode_jpeg, eval_view, fixed_offsets,
    resample, train_view,
};
use crate::models::Sampling;

/// The videos of some domains (and optionally one source split) of a prepared folder or of a
/// feature cache.
#[derive(Debug, Clone)]
pub struct ClipSet {
    dir: PathBuf,
    /// The videos, in `videos.parquet` order.
    pub videos: Vec<VideoRow>,
    /// Width of the cached features when `dir` is a feature cache (`features.json`).
    pub feature_dim: Option<usize>,
    /// Every frame's JPEG of the videos read so far, while they fit in
    /// [`FRAME_CACHE_BYTES`] (shared by clones: the loader thread and later epochs).
    cache: std::sync::Arc<std::sync::Mutex<FrameCache>>,
}

/// Bytes of JPEG frames a [`ClipSet`] keeps in memory after reading them once (small
/// benchmarks, the synthetic one among them, then never reopen a shard; larger ones read
/// from the shards as before once the budget is spent).
pub const FRAME_CACHE_BYTES: usize = 256 << 20;

#[derive(Debug, Default)]
struct FrameCache {
    videos: std::collections::HashMap<usize, std::sync::Arc<Vec<Vec<u8>>>>,
    bytes: usize,
}

impl ClipSet {
    /// Opens `dir`'s videos of `domains` whose `source_split` is `split` (any when `None`);
    /// failed and empty videos are left out.
    pub fn open(dir: &Path, domains: &[String], split: Option<&str>) -> Result<Self> {
        let rows = read_videos_table(&dir.join(VIDEOS_FILE))?;
        let videos = rows
            .into_iter()
            .filter(|r| r.status == VideoStatus::Ok && r.num_frames > 0)
            .filter(|r| domains.contains(&r.domain))
            .filter(|r| split.is_none_or(|s| r.source_split == s))
            .collect();
        let feature_dim = crate::features::FeaturesRecord::open(dir)?.map(|r| r.feature_dim);
        Ok(ClipSet {
            dir: dir.to_owned(),
            videos,
            feature_dim,
            cache: Default::default(),
        })
    }

    /// The JPEGs of frames `idx` of video `index` (stored from shard row `first`): from the
    /// cache, or read whole from the shard and cached while the budget lasts.
    fn frames(&self, index: usize, shard: u32, first: u64, idx: &[u32]) -> Result<Vec<Vec<u8>>> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.videos.get(&index).cloned());
        let all = match cached {
            Some(all) => all,
            None => {
                let path = frames_path(&self.dir, shard);
                let full = self
                    .cache
                    .lock()
                    .map_or(true, |c| c.bytes >= FRAME_CACHE_BYTES);
                if full {
                    return Ok(read_frames_at(&path, first, idx)?);
                }
                let n = self.videos[index].num_frames;
                let every: Vec<u32> = (0..n).collect();
                let all = std::sync::Arc::new(read_frames_at(&path, first, &every)?);
                if let Ok(mut c) = self.cache.lock() {
                    c.bytes += all.iter().map(Vec::len).sum::<usize>();
                    c.videos.insert(index, all.clone());
                }
                all
            }
        };
        idx.iter()
            .map(|&i| {
                all.get(i as usize).cloned().ok_or_else(|| {
                    Error::Config(format!(
                        "{}: frame {i} past its {} frames",
                        self.videos[index].video_id,
                        all.len()
                    ))
                })
            })
            .collect()
    }

    /// Number of clips.
    pub fn len(&self) -> usize {
        self.videos.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.videos.is_empty()
    }
}

/// How clips are turned into tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoaderConfig {
    /// Which frames: `M` segments or a dense window of `T`.
    pub sampling: Sampling,
    /// Side of the square input S (224 in the paper).
    pub input_size: usize,
    /// Training sampling and augmentation, or the deterministic evaluation protocol.
    pub train: bool,
    /// Clips per batch.
    pub batch_size: usize,
    /// Training may flip clips horizontally (the benchmark's manifest says).
    pub flip: bool,
    /// Seed of every random choice.
    pub seed: u64,
}

/// Frame indices for one clip of `n` frames.
pub fn segment_indices(n: usize, m: usize, train: bool, rng: &mut impl Rng) -> Vec<u32> {
    if n == 0 {
        return vec![0; m];
    }
    if train {
        let avg = n / m;
        if avg > 0 {
            (0..m)
                .map(|k| (k * avg + rng.random_range(0..avg)) as u32)
                .collect()
        } else if n > m {
            let mut v: Vec<u32> = rand::seq::index::sample(rng, n, m)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            v.sort_unstable();
            v
        } else {
            vec![0; m]
        }
    } else if n > m {
        let tick = n as f64 / m as f64;
        (0..m)
            .map(|k| (tick / 2.0 + k as f64 * tick) as u32)
            .collect()
    } else {
        vec![0; m]
    }
}

/// Frame indices of a dense window of `t` frames in a video of `n`: random start in
/// training, centred in evaluation; looped when `n < t`.
pub fn dense_indices(
    n: usize,
    t: usize,
    stride: usize,
    train: bool,
    rng: &mut impl Rng,
) -> Vec<u32> {
    if n == 0 {
        return vec![0; t];
    }
    let stride = stride.max(1);
    let span = (t.max(1) - 1) * stride + 1;
    let start = if n <= span {
        0
    } else if train {
        rng.random_range(0..=n - span)
    } else {
        (n - span) / 2
    };
    (0..t).map(|i| ((start + i * stride) % n) as u32).collect()
}

/// Frame indices for one clip of `n` frames under `sampling`.
pub fn clip_indices(n: usize, sampling: Sampling, train: bool, rng: &mut impl Rng) -> Vec<u32> {
    match sampling {
        Sampling::Segments(m) => segment_indices(n, m, train, rng),
        Sampling::Dense { frames, stride } => dense_indices(n, frames, stride, train, rng),
    }
}

/// One clip as `[M * 3 * S * S]` floats (`[M * F]` from a feature cache).
pub fn load_clip(
    set: &ClipSet,
    index: usize,
    cfg: &LoaderConfig,
    epoch: usize,
) -> Result<Vec<f32>> {
    let v = &set.videos[index];
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
        cfg.seed,
        &format!("clip/{epoch}/{}", v.video_id),
    ));
    let idx = clip_indices(v.num_frames as usize, cfg.sampling, cfg.train, &mut rng);
    let (Some(shard), Some(first)) = (v.shard, v.first_row) else {
        return Err(Error::Config(format!(
            "{}: no frames in the shards",
            v.video_id
        )));
    };
    if let Some(dim) = set.feature_dim {
        let path = set.dir.join(crate::features::features_file_name(shard));
        let rows = vdg_data::shard::read_features_at(&path, first, &idx)?;
        let mut out = Vec::with_capacity(idx.len() * dim);
        for r in rows {
            if r.len() != dim {
                return Err(Error::Config(format!(
                    "{}: {}: feature of width {} (features.json says {dim})",
                    path.display(),
                    v.video_id,
                    r.len()
                )));
            }
            out.extend(r);
        }
        return Ok(out);
    }
    let frames = set.frames(index, shard, first, &idx)?;
    let s = cfg.input_size;
    let n = idx.len();
    let mut out = vec![0f32; n * 3 * s * s];
    let mut view = None;
    for (k, jpeg) in frames.iter().enumerate() {
        let (w, h, rgb) = decode_jpeg(jpeg).map_err(|message| Error::Frame {
            video_id: v.video_id.clone(),
            frame: idx[k] as usize,
            message,
        })?;
        let vw = *view.get_or_insert_with(|| {
            if cfg.train {
                train_view(w, h, s, cfg.flip, &mut rng)
            } else {
                eval_view(w, h, s)
            }
        });
        resample(
            &rgb,
            w,
            h,
            &vw,
            s,
            &mut out[k * 3 * s * s..(k + 1) * 3 * s * s],
        );
    }
    Ok(out)
}

/// A batch: clips `[B, M, 3, S, S]`, labels `[B]`, and which videos they are.
pub struct Batch {
    /// Pixels.
    pub clips: Tensor,
    /// Labels (u32).
    pub labels: Tensor,
    /// Indices into the clip set.
    pub indices: Vec<usize>,
}

/// The order of an epoch: shuffled (training) or as stored.
pub fn epoch_order(n: usize, cfg: &LoaderConfig, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.train {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
            cfg.seed,
            &format!("order/{epoch}"),
        )));
    }
    order
}

/// Builds one batch from clip indices, decoding clips in parallel.
pub fn make_batch(
    set: &ClipSet,
    indices: &[usize],
    cfg: &LoaderConfig,
    epoch: usize,
    device: &Device,
) -> Result<Batch> {
    let clips: Vec<Vec<f32>> = indices
        .par_iter()
        .map(|&i| load_clip(set, i, cfg, epoch))
        .collect::<Result<_>>()?;
    let s = cfg.input_size;
    let m = cfg.sampling.frames();
    let flat: Vec<f32> = clips.into_iter().flatten().collect();
    let clips = match set.feature_dim {
        Some(f) => Tensor::from_vec(flat, (indices.len(), m, f), device)?,
        None => Tensor::from_vec(flat, (indices.len(), m, 3, s, s), device)?,
    };
    let labels: Vec<u32> = indices.iter().map(|&i| set.videos[i].label).collect();
    Ok(Batch {
        labels: Tensor::new(labels.as_slice(), device)?,
        clips,
        indices: indices.to_vec(),
    })
}

/// How long [`batches`] waits for the next batch before giving up, in milliseconds (0: for
/// ever). Process-wide: an operational setting, like thread counts, not part of a run's
/// configuration (it changes no number).
static STALL_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_STALL_TIMEOUT_SECS * 1000);

/// The default of [`set_stall_timeout`]: ten minutes, as `vdg prep`'s. One batch of the
/// paper's shapes (40 clips x 5 frames of JPEG) takes well under a second to read and decode.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 600;

/// Sets how long [`batches`] waits for a batch before it returns [`Error::Stalled`] naming
/// the files being read (`vdg train --stall-timeout`); `None` waits for ever.
pub fn set_stall_timeout(timeout: Option<Duration>) {
    let ms = timeout.map_or(0, |t| {
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
    });
    STALL_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

/// `--stall-timeout SECS` as [`set_stall_timeout`] takes it: 0 is `None` (for ever).
pub fn stall_timeout_secs(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn stall_timeout() -> Option<Duration> {
    match STALL_TIMEOUT_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// The file video `index` is read from: its frames shard, or its feature file.
fn source_file(set: &ClipSet, index: usize) -> Option<PathBuf> {
    let shard = set.videos.get(index)?.shard?;
    Some(match set.feature_dim {
        Some(_) => set.dir.join(crate::features::features_file_name(shard)),
        None => frames_path(&set.dir, shard),
    })
}

/// The batches of one epoch ([`batches`]): each waited for at most the stall timeout.
pub struct Batches {
    rx: mpsc::Receiver<Result<Batch>>,
    /// The files of the batch being read (set by the loader thread before it reads).
    reading: Arc<Mutex<Vec<PathBuf>>>,
    timeout: Option<Duration>,
    /// The producer, joined when it hangs up: a panic there is an error, not an epoch that
    /// silently ends early.
    producer: Option<std::thread::JoinHandle<()>>,
    ended: bool,
}

impl Batches {
    /// Batches from `rx`, with `reading` naming what the `producer` reads.
    fn new(
        rx: mpsc::Receiver<Result<Batch>>,
        reading: Arc<Mutex<Vec<PathBuf>>>,
        timeout: Option<Duration>,
        producer: Option<std::thread::JoinHandle<()>>,
    ) -> Self {
        Batches {
            rx,
            reading,
            timeout,
            producer,
            ended: false,
        }
    }

    /// The end of the batches: `None` when the producer finished, an error when it panicked.
    fn hung_up(&mut self) -> Option<Result<Batch>> {
        self.ended = true;
        let panic = self.producer.take()?.join().err()?;
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Some(Err(Error::Config(format!(
            "the loader's thread panicked ({what}); the epoch cannot be completed"
        ))))
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.ended {
            return None;
        }
        let Some(timeout) = self.timeout else {
            return match self.rx.recv() {
                Ok(b) => Some(b),
                Err(_) => self.hung_up(),
            };
        };
        match self.rx.recv_timeout(timeout) {
            Ok(b) => Some(b),
            Err(mpsc::RecvTimeoutError::Disconnected) => self.hung_up(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The loader thread stays blocked where it is; the run stops with its files.
                self.ended = true;
                let files = self.reading.lock().map(|f| shown(&f)).unwrap_or_default();
                Some(Err(Error::Stalled {
                    seconds: timeout.as_secs_f64(),
                    files,
                }))
            }
        }
    }
}

/// Batches of one epoch, prepared by a background thread two batches ahead. A batch that
/// does not come within the stall timeout ([`set_stall_timeout`]: a read that does not return,
/// say from a network file system that stopped answering) ends the iteration with
/// [`Error::Stalled`], naming the files it was reading, instead of waiting for ever.
pub fn batches(set: &ClipSet, cfg: LoaderConfig, epoch: usize, device: Device) -> Batches {
    let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
    let set = set.clone();
    let order = epoch_order(set.len(), &cfg, epoch);
    let reading = Arc::new(Mutex::new(Vec::new()));
    let watched = reading.clone();
    let producer = std::thread::spawn(move || {
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let mut files: Vec<PathBuf> =
                chunk.iter().filter_map(|&i| source_file(&set, i)).collect();
            files.sort();
            files.dedup();
            if let Ok(mut r) = watched.lock() {
                *r = files;
            }
            inject_delay();
            let b = make_batch(&set, chunk, &cfg, epoch, &device);
            let stop = b.is_err();
            if tx.send(b).is_err() || stop {
                return;
            }
        }
    });
    Batches::new(rx, reading, stall_timeout(), Some(producer))
}

/// Runs the read `f` of `files` on a thread of its own and waits for it at most the stall
/// timeout ([`set_stall_timeout`]): past that, [`Error::Stalled`] naming the files, and the
/// thread is left to itself (a read blocked in the kernel cannot be cancelled). For reads
/// outside [`batches`] (`vdg features`).
pub fn read_watched<T: Send + 'static>(
    files: Vec<PathBuf>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let Some(timeout) = stall_timeout() else {
        return f();
    };
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("vdg-read".into())
        .spawn(move || {
            inject_delay();
            let _ = tx.send(f());
        })
        .map_err(|e| Error::Config(format!("starting a reader thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Stalled {
            seconds: timeout.as_secs_f64(),
            files: shown(&files),
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Config(format!(
            "the reader of {} ended without a result",
            shown(&files).join(", ")
        ))),
    }
}

/// The paths as an error names them.
fn shown(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|p| p.display().to_string()).collect()
}

/// Debug builds: `VDG_INJECT_LOADER_DELAY_MS=<ms>` holds the loader that long before its
/// first batch (or [`read_watched`] before its first read), once per process: a read that
/// does not return, for the tests.
fn inject_delay() {
    if !cfg!(debug_assertions) {
        return;
    }
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let ms = std::env::var("VDG_INJECT_LOADER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = ms
        && !DONE.swap(true, Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_does_not_come_in_time_is_an_error_naming_the_files() {
        let files = Arc::new(Mutex::new(vec![PathBuf::from(
            "/data/frames-00003.parquet",
        )]));
        // The producer holds its end open and sends nothing: a read that does not return.
        let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
        let mut it = Batches::new(rx, files.clone(), Some(Duration::from_millis(50)), None);
        let started = std::time::Instant::now();
        match it.next().map(|r| r.map(|_| ())) {
            Some(Err(e @ Error::Stalled { .. })) => {
                let m = e.to_string();
                assert!(m.contains("/data/frames-00003.parquet"), "{m}");
                assert!(m.contains("no batch read for 0 s"), "{m}");
            }
            other => panic!("expected a stall, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(it.next().is_none(), "the iteration ends after a stall");
        drop(tx);
        // A producer that ends ends the iteration; without a timeout, nothing times out.
        let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
        drop(tx);
        assert!(
            Batches::new(rx, files.clone(), Some(Duration::from_millis(50)), None)
                .next()
                .is_none()
        );
        let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            tx.send(Err(Error::Config("sent late".into()))).unwrap();
        });
        match Batches::new(rx, files.clone(), None, None)
            .next()
            .map(|r| r.map(|_| ()))
        {
            Some(Err(Error::Config(m))) => assert_eq!(m, "sent late"),
            other => panic!("expected the late batch, got {other:?}"),
        }
        sender.join().unwrap();
        // A producer that panics is an error after what it sent, not a short epoch.
        for timeout in [None, Some(Duration::from_secs(5))] {
            let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(2);
            let producer = std::thread::spawn(move || {
                tx.send(Err(Error::Config("first".into()))).unwrap();
                panic!("a bad clip");
            });
            let mut it = Batches::new(rx, files.clone(), timeout, Some(producer));
            assert!(matches!(it.next(), Some(Err(Error::Config(m))) if m == "first"));
            match it.next().map(|r| r.map(|_| ())) {
                Some(Err(Error::Config(m))) => assert!(m.contains("a bad clip"), "{m}"),
                other => panic!("expected the panic as an error, got {other:?}"),
            }
            assert!(it.next().is_none());
        }
        assert_eq!(stall_timeout_secs(0), None);
        assert_eq!(stall_timeout_secs(5), Some(Duration::from_secs(5)));
    }

    #[test]
    fn segment_sampling_follows_tsn() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // Evaluation: segment centres.
        assert_eq!(
            segment_indices(100, 5, false, &mut rng),
            [10, 30, 50, 70, 90]
        );
        assert_eq!(segment_indices(3, 5, false, &mut rng), [0; 5]);
        for _ in 0..50 {
            let t = segment_indices(100, 5, true, &mut rng);
            for (k, &i) in t.iter().enumerate() {
                assert!((k * 20..k * 20 + 20).contains(&(i as usize)), "{t:?}");
            }
            let short = segment_indices(7, 5, true, &mut rng);
            assert!(
                short.windows(2).all(|w| w[0] < w[1]) && short.iter().all(|&i| i < 7),
                "{short:?}"
            );
        }
    }

    #[test]
    fn dense_windows_are_contiguous_centred_in_evaluation_and_looped_when_short() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(dense_indices(100, 4, 1, false, &mut rng), [48, 49, 50, 51]);
        assert_eq!(dense_indices(3, 5, 1, true, &mut rng), [0, 1, 2, 0, 1]);
        // Stride 2 (mmaction2's 32x2 I3D input): a centred 7-frame span for 4 frames.
        assert_eq!(dense_indices(100, 4, 2, false, &mut rng), [46, 48, 50, 52]);
        assert_eq!(dense_indices(5, 4, 2, false, &mut rng), [0, 2, 4, 1]);
        let mut starts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let w = dense_indices(40, 32, 1, true, &mut rng);
            assert!(
                w.windows(2).all(|p| p[1] == p[0] + 1) && w[31] < 40,
                "{w:?}"
            );
            starts.insert(w[0]);
        }
        assert_eq!(starts.len(), 9, "every start 0..=8 is drawn");
    }

    #[test]
    fn views_stay_inside_the_frame() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let v = train_view(341, 256, 224, true, &mut rng);
            assert!(
                v.x >= 0.0 && v.y >= 0.0 && v.x + v.w <= 341.0 && v.y + v.h <= 256.0,
                "{v:?}"
            );
            assert!(v.w >= 256.0 * 0.66 - 1.0 && v.h >= 256.0 * 0.66 - 1.0);
        }
        let e = eval_view(341, 256, 224);
        // Short side 256 scales to 256 (=224*256/224): the centre 224x224 at (58.5, 16).
        assert!(
            (e.w - 224.0).abs() < 1e-9 && (e.x - 58.5).abs() < 1e-9 && (e.y - 16.0).abs() < 1e-9,
            "{e:?}"
        );
        let small = eval_view(160, 120, 64);
        assert!((small.w - 120.0 * 224.0 / 256.0).abs() < 1e-9, "{small:?}");
    }

    #[test]
    fn resample_identity_flip_and_normalisation() {
        // A 2x1 image: red, blue. Identity view at 2x2 output keeps columns; flip swaps them.
        let rgb = [255u8, 0, 0, 0, 0, 255];
        let mut out = [0f32; 3 * 2];
        let v = View {
            x: 0.0,
            y: 0.0,
            w: 2.0,
            h: 1.0,
            flip: false,
        };
        resample(&rgb, 2, 1, &v, 1, &mut out[..3]);
        let mut o2 = [0f32; 3 * 4];
        resample(&rgb, 2, 1, &View { h: 1.0, ..v }, 2, &mut o2);
        let red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        let none = (0.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        assert!(
            (o2[0] - red).abs() < 1e-5 && (o2[1] - none).abs() < 1e-5,
            "{o2:?}"
        );
        resample(&rgb, 2, 1, &View { flip: true, ..v }, 2, &mut o2);
        assert!(
            (o2[0] - none).abs() < 1e-5 && (o2[1] - red).abs() < 1e-5,
            "{o2:?}"
        );
    }
}
