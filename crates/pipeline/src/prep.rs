//! The resumable, deterministic prep job runner.
//!
//! Workers (`jobs` threads, one FFmpeg decoder each) decode and JPEG-encode
//! videos; a single writer appends them to frame shards **in plan order**, holding at most
//! a small window of finished videos, so memory is bounded by about `2 x jobs` videos and
//! the bytes written do not depend on `jobs` or on timing. A shard is closed (footer written,
//! renamed from `.tmp`) once it reaches the size target; its footer lists the videos it
//! covers, so after a crash a rerun keeps every complete shard, deletes `.tmp` leftovers and
//! continues from the first video not in a complete shard, producing the same bytes as an
//! uninterrupted run. `videos.parquet` and then `prep.json` are written last.
//!
//! A watchdog ([`RunOptions::stall_timeout`]) gives up on a worker whose video makes no
//! progress: the video is recorded as failed and a fresh worker takes the stuck one's
//! place, so a file system that stops answering or a decoder that never returns cannot
//! hang the run; past one such video per worker the run stops with [`Error::Stalled`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vdg_data::atomic::{AtomicFile, TMP_SUFFIX, sha256_file};
use vdg_data::shard::{
    self, DEFAULT_MAX_ROW_GROUP_BYTES, FrameShardWriter, PREP_FILE, SHARD_SCHEMA_VERSION,
    ShardInfo, VIDEOS_FILE,
};
use vdg_data::{EncodedFrame, ShardMeta, VideoRow, VideoStatus};

use crate::buffer::{DEFAULT_MEMORY_FRAMES, FrameBuffer};
use crate::decode::{
    DEFAULT_FRAME_SHORTFALL_ABS, DEFAULT_FRAME_SHORTFALL_FRAC, DecodeOptions, DecodeStats, Pixels,
    decode_video_watched, keep_frame,
};
use crate::error::{Error, Result};
use crate::plan::{ContentOptions, PartInfo, Plan, PlanItem};
use crate::stall::Watch;

/// Name of the lock file held while prep writes a folder.
pub const LOCK_FILE: &str = ".vdg-prep.lock";

/// Each input's size and modification time at the last complete run, so a rerun redoes the
/// videos whose file changed (kept out of the fingerprinted outputs: copying a dataset
/// changes modification times, not frames).
pub const INPUTS_FILE: &str = "inputs.json";

/// Where shards are moved while a rerun rebuilds from them: videos that need no redoing
/// are copied from here rather than decoded again. Removed when the run completes.
pub const REUSE_DIR: &str = ".vdg-reuse";

/// `vdg prep --stall-timeout`'s default: ten minutes without a packet read or a frame
/// decoded. No good file comes near it (one frame's decoding is the longest wait, about
/// 20 ms for 4K HEVC on one core: datasets.md); a network file system that stopped
/// answering does.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 600;

/// Options that do not change what is written.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Worker threads (0 = one per core).
    pub jobs: usize,
    /// Discard an existing prep of other inputs or options instead of refusing.
    pub force: bool,
    /// Redo the videos recorded as failed (a transient I/O error, a replaced file); the
    /// others are kept.
    pub retry_failed: bool,
    /// Set (by a signal handler) to stop the run: videos being decoded stop at their next
    /// packet ([`crate::stall::Watch::stopped_by`]), complete shards stay, and the run ends
    /// with [`Error::Interrupted`].
    pub interrupt: Option<std::sync::Arc<AtomicBool>>,
    /// Give up on a video whose decoding makes no progress (no packet read, no frame
    /// decoded) for this long: it is recorded as failed and a fresh worker takes its place
    /// ([`crate::stall`]). `None`: wait for ever.
    pub stall_timeout: Option<std::time::Duration>,
}

/// Progress reported by [`run_prep`]; the CLI turns these into bars or log lines.
#[derive(Debug)]
pub enum PrepEvent<'a> {
    /// Work is about to start.
    Started {
        /// Videos in the plan.
        total_videos: u64,
        /// Of which already done in complete shards (resumed).
        resumed_videos: u64,
    },
    /// One video finished (written or failed).
    VideoDone {
        /// Its row.
        row: &'a VideoRow,
    },
    /// A shard was completed.
    ShardWritten {
        /// What it holds.
        info: &'a ShardInfo,
    },
}

/// Receives [`PrepEvent`]s from the writer thread.
pub trait Progress: Sync {
    /// Called for each event.
    fn event(&self, event: &PrepEvent<'_>);
}

impl<F: Fn(&PrepEvent<'_>) + Sync> Progress for F {
    fn event(&self, event: &PrepEvent<'_>) {
        self(event)
    }
}

/// `prep.json`: what was prepared, how, and how to check it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepRecord {
    /// Always `videodg`.
    pub tool: String,
    /// Version of the tool that wrote it.
    pub tool_version: String,
    /// Shard layout version.
    pub schema_version: u32,
    /// Benchmark name.
    pub benchmark: String,
    /// Where the manifest came from.
    pub manifest_origin: String,
    /// SHA-256 of the manifest text.
    pub manifest_sha256: String,
    /// The manifest text itself.
    pub manifest_toml: String,
    /// Content options.
    pub options: serde_json::Value,
    /// Fingerprint of the plan (inputs, manifest, options, tool and library versions).
    pub plan_fingerprint: String,
    /// FFmpeg's and libjpeg-turbo's versions the frames were made with.
    #[serde(default)]
    pub libraries: BTreeMap<String, String>,
    /// Which part of a larger plan this folder holds (`vdg prep --part`), if it is one.
    #[serde(default)]
    pub part: Option<PartInfo>,
    /// Counts.
    pub counts: PrepCounts,
    /// Videos that failed, with the reason.
    pub failed: Vec<FailedVideo>,
    /// Frame shards in order.
    pub shards: Vec<ShardInfo>,
    /// The videos table.
    pub videos_table: ShardInfo,
    /// SHA-256 over the hashes of every shard and the videos table: equal fingerprints mean
    /// byte-identical outputs.
    pub fingerprint: String,
}

/// Counts recorded in `prep.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PrepCounts {
    /// Videos planned.
    pub planned: u64,
    /// Videos written.
    pub ok: u64,
    /// Videos that failed.
    pub failed: u64,
    /// Frames written.
    pub frames: u64,
    /// Videos of classes outside the benchmark, per dataset.
    pub skipped_out_of_benchmark: BTreeMap<String, u64>,
    /// Planned videos per domain and source split (`"ucf/train"`).
    pub per_domain_split: BTreeMap<String, u64>,
    /// `"<domain>/<class>"` of manifest classes with no video in that domain (a partial
    /// download).
    #[serde(default)]
    pub empty_classes: Vec<String>,
    /// Videos, per dataset, whose names did not parse into their layout's split group (each
    /// formed a group of its own).
    #[serde(default)]
    pub ungrouped: BTreeMap<String, u64>,
}

/// A failed video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedVideo {
    /// Its id.
    pub video_id: String,
    /// Why.
    pub error: String,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct PrepSummary {
    /// The output was already complete for this plan; nothing was done.
    pub up_to_date: bool,
    /// Videos taken from complete shards of an interrupted run.
    pub resumed_videos: u64,
    /// Videos decoded by this run.
    pub decoded_videos: u64,
    /// Videos copied from the shards of an earlier run rather than decoded again.
    pub copied_videos: u64,
    /// Videos redone because their input file changed on disk.
    pub changed_inputs: u64,
    /// Videos redone because they had failed and `retry_failed` was asked.
    pub retried_failed: u64,
    /// The record written (or found) in `prep.json`.
    pub record: PrepRecord,
}

/// The exclusive lock on an output folder (an OS file lock, released when dropped or when
/// the process dies), held while anything in the folder is written or removed.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    dir: PathBuf,
}

/// Creates `dir` if needed and locks it; another `vdg` writing there gives
/// [`Error::Locked`].
pub fn lock_output(dir: &Path) -> Result<OutputLock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(OutputLock {
            _file: file,
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// Our files in `dir`: frame shards by index, and leftover temporary files.
fn list_outputs(dir: &Path) -> Result<(BTreeMap<u32, PathBuf>, Vec<PathBuf>)> {
    let mut shards = BTreeMap::new();
    let mut tmps = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(i) = shard::parse_frames_file_name(name) {
            shards.insert(i, entry.path());
        } else if let Some(base) = name.strip_suffix(TMP_SUFFIX)
            && (shard::parse_frames_file_name(base).is_some()
                || base == VIDEOS_FILE
                || base == PREP_FILE)
        {
            tmps.push(entry.path());
        }
    }
    Ok((shards, tmps))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

pub(crate) fn read_record(path: &Path) -> Option<PrepRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn is_complete(dir: &Path, rec: &PrepRecord) -> bool {
    let size_ok = |info: &ShardInfo| {
        std::fs::metadata(dir.join(&info.file)).is_ok_and(|m| m.len() == info.bytes)
    };
    rec.shards.iter().all(size_ok) && size_ok(&rec.videos_table)
}

/// A file's modification time in nanoseconds since the epoch, when the OS reports one.
fn mtime_ns(path: &Path) -> Option<i64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

type Identities = BTreeMap<String, (u64, Option<i64>)>;

fn read_inputs(out: &Path) -> Identities {
    std::fs::read(out.join(INPUTS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Why a recorded row must be redone for the current plan item, if it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redo {
    Changed,
    Failed,
}

struct Staleness<'a> {
    recorded: Identities,
    now: Vec<Option<i64>>,
    plan: &'a Plan,
    retry_failed: bool,
}

impl Staleness<'_> {
    fn of(&self, pos: usize, row: &VideoRow) -> Option<Redo> {
        let item = &self.plan.items[pos];
        let recorded_mtime = self.recorded.get(&row.video_id).and_then(|r| r.1);
        if row.file_bytes != item.row.file_bytes
            || recorded_mtime.is_some_and(|m| self.now[pos] != Some(m))
        {
            return Some(Redo::Changed);
        }
        (self.retry_failed && row.status == VideoStatus::Failed).then_some(Redo::Failed)
    }
}

/// A video of an earlier run's shard that can be copied instead of decoded.
struct Reusable {
    shard: PathBuf,
    row: VideoRow,
}

/// Shards moved into [`REUSE_DIR`], and the frame shards of `sources` (merged part
/// folders), by video id.
fn reusable(out: &Path, sources: &[PathBuf]) -> Result<BTreeMap<String, Reusable>> {
    let mut map = BTreeMap::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(out.join(REUSE_DIR)) {
        paths.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for dir in sources {
        let (shards, _) = list_outputs(dir)?;
        paths.extend(shards.into_values());
    }
    paths.sort();
    for path in paths {
        // A shard that no longer reads is simply not reused.
        let Ok(meta) = shard::read_shard_meta(&path) else {
            continue;
        };
        for row in meta.videos {
            map.insert(
                row.video_id.clone(),
                Reusable {
                    shard: path.clone(),
                    row,
                },
            );
        }
    }
    Ok(map)
}

/// Runs (or resumes, or confirms) the prep of `plan` into `out`, locking it first.
pub fn run_prep(
    plan: &Plan,
    out: &Path,
    run: &RunOptions,
    progress: &dyn Progress,
) -> Result<PrepSummary> {
    let lock = lock_output(out)?;
    run_prep_locked(plan, &lock, run, progress)
}

/// [`run_prep`] into the folder `lock` holds (for callers that write there first, as
/// `vdg prep synthetic` generates its raw clips under the same lock).
pub fn run_prep_locked(
    plan: &Plan,
    lock: &OutputLock,
    run: &RunOptions,
    progress: &dyn Progress,
) -> Result<PrepSummary> {
    run_locked(plan, lock, run, progress, None)
}

/// Merges the folders of `vdg prep --part 0/N .. N-1/N` into `lock`'s folder: checks that
/// they are the finished parts of one plan, rebuilds that plan from their rows and writes it
/// by copying every video's frames from them, never decoding. The frame shards and
/// `videos.parquet` are byte-identical to a prep of the whole plan on one machine; an
/// interrupted merge resumes like a prep.
pub fn merge_parts(
    parts: &[PathBuf],
    lock: &OutputLock,
    run: &RunOptions,
    progress: &dyn Progress,
) -> Result<PrepSummary> {
    let bad = |path: &Path, message: String| Error::OutputMismatch {
        path: path.to_owned(),
        message,
    };
    let mut recs: Vec<(PrepRecord, PartInfo)> = Vec::new();
    for dir in parts {
        let rec = read_record(&dir.join(PREP_FILE)).ok_or_else(|| {
            bad(
                dir,
                "has no readable prep.json: not a finished `vdg prep --part` folder (rerun that \
                 part; it resumes)"
                    .into(),
            )
        })?;
        let Some(part) = rec.part.clone() else {
            return Err(bad(dir, "is a whole prep, not a `--part` folder".into()));
        };
        if !is_complete(dir, &rec) {
            return Err(bad(
                dir,
                "is missing shards its prep.json lists; rerun that part".into(),
            ));
        }
        recs.push((rec, part));
    }
    let Some((first, first_part)) = recs.first().cloned() else {
        return Err(bad(&lock.dir, "no part folders to merge".into()));
    };
    let mut seen = vec![false; first_part.count as usize];
    for ((rec, part), dir) in recs.iter().zip(parts) {
        if part.whole_fingerprint != first_part.whole_fingerprint
            || part.count != first_part.count
            || rec.libraries != first.libraries
        {
            return Err(bad(
                dir,
                format!(
                    "is a part of another prep than {} (other inputs, options, part count or \
                     libraries)",
                    parts[0].display()
                ),
            ));
        }
        match seen.get_mut(part.index as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(bad(
                    dir,
                    format!("part {}/{} is given twice", part.index, part.count),
                ));
            }
        }
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| !**s)
        .map(|(i, _)| format!("{i}/{}", first_part.count))
        .collect();
    if !missing.is_empty() {
        return Err(bad(
            &lock.dir,
            format!("part(s) {} are missing from the merge", missing.join(", ")),
        ));
    }
    // The merge copies the parts' bytes and records the result's hashes as good: a part
    // damaged on its way here (a bad copy between machines) must not pass into it.
    for dir in parts {
        let v = crate::verify::verify(dir, 0, &|_, _| {})?;
        if !v.ok() {
            let mut what: Vec<String> = v
                .checked
                .iter()
                .filter_map(|c| {
                    let name = c.path.file_name()?.to_string_lossy().into_owned();
                    Some(format!("{name}: {}", c.problem.as_ref()?))
                })
                .collect();
            what.extend(v.stray.iter().filter_map(|p| {
                Some(format!(
                    "{}: not listed in prep.json",
                    p.file_name()?.to_string_lossy()
                ))
            }));
            return Err(bad(
                dir,
                format!(
                    "does not match its prep.json ({}); copy the part again from where it was \
                     prepared, or rerun that part with --force",
                    what.join("; ")
                ),
            ));
        }
    }
    let mut rows = Vec::new();
    let mut inputs = Identities::new();
    for dir in parts {
        rows.extend(shard::read_videos_table(&dir.join(VIDEOS_FILE))?);
        inputs.extend(read_inputs(dir));
    }
    let manifest =
        vdg_data::Manifest::from_toml(&first.manifest_toml, Path::new(&first.manifest_origin))?;
    let options: ContentOptions = serde_json::from_value(first.options.clone())
        .map_err(|e| bad(&parts[0], format!("prep.json options do not read: {e}")))?;
    let plan = Plan::from_rows(
        manifest,
        options,
        first.libraries.clone(),
        rows,
        first.counts.skipped_out_of_benchmark.clone(),
        first.counts.ungrouped.clone(),
    );
    if plan.fingerprint != first_part.whole_fingerprint
        || plan.items.len() as u64 != first_part.whole_videos
    {
        return Err(bad(
            &lock.dir,
            "the parts' rows do not make up the plan they were cut from (a part was redone \
             with other inputs?); rerun the parts"
                .into(),
        ));
    }
    run_locked(
        &plan,
        lock,
        run,
        progress,
        Some(MergeSources { parts, inputs }),
    )
}

/// Where a merge copies from: the part folders, and the inputs their runs recorded.
struct MergeSources<'a> {
    parts: &'a [PathBuf],
    inputs: Identities,
}

fn run_locked(
    plan: &Plan,
    lock: &OutputLock,
    run: &RunOptions,
    progress: &dyn Progress,
    merge: Option<MergeSources<'_>>,
) -> Result<PrepSummary> {
    let out = lock.dir.as_path();
    // A part may be empty (more parts than recordings); a whole plan may not.
    if plan.items.is_empty() && plan.part.is_none() {
        return Err(Error::Layout {
            path: out.to_owned(),
            message: format!(
                "no videos of benchmark {:?} were found in the input folders",
                plan.manifest.name
            ),
        });
    }
    let prep_path = out.join(PREP_FILE);
    let (existing, tmps) = list_outputs(out)?;
    for t in &tmps {
        tracing::debug!(path = %t.display(), "removing leftover temporary file");
        remove(t)?;
    }
    let mismatch = |what: &str| Error::OutputMismatch {
        path: out.to_owned(),
        message: format!(
            "{what} was prepared from other inputs, manifest, options or tool version; \
             rerun with --force to replace it, or choose another --out"
        ),
    };
    let mut wipe = run.force;
    let stale = Staleness {
        recorded: read_inputs(out),
        now: match &merge {
            // A merge never looks at the raw files (they may be on other machines): the
            // parts recorded them.
            Some(m) => plan
                .items
                .iter()
                .map(|it| m.inputs.get(&it.row.video_id).and_then(|i| i.1))
                .collect(),
            None => plan.items.iter().map(|it| mtime_ns(&it.abs_path)).collect(),
        },
        plan,
        retry_failed: run.retry_failed,
    };
    // The hashes the last finished run recorded: a shard kept below must still have those
    // bytes, or the new prep.json would record a damaged shard (bit rot, a bad copy) as good.
    let mut recorded: BTreeMap<String, String> = BTreeMap::new();
    if let Some(rec) = read_record(&prep_path) {
        if rec.plan_fingerprint == plan.fingerprint && is_complete(out, &rec) && !run.force {
            let rows = shard::read_videos_table(&out.join(VIDEOS_FILE))?;
            let fresh = rows.len() == plan.items.len()
                && rows
                    .iter()
                    .enumerate()
                    .all(|(i, r)| stale.of(i, r).is_none());
            if fresh {
                return Ok(PrepSummary {
                    up_to_date: true,
                    resumed_videos: rec.counts.planned,
                    decoded_videos: 0,
                    copied_videos: 0,
                    changed_inputs: 0,
                    retried_failed: 0,
                    record: rec,
                });
            }
        }
        if rec.plan_fingerprint != plan.fingerprint && !run.force {
            if rec.libraries != plan.libraries {
                let show = |m: &BTreeMap<String, String>| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(Error::OutputMismatch {
                    path: out.to_owned(),
                    message: format!(
                        "was prepared with other decoding libraries ({}) than this vdg uses ({}); \
                         resuming would mix frames from both. Rerun with --force to redo it, \
                         or choose another --out",
                        show(&rec.libraries),
                        show(&plan.libraries)
                    ),
                });
            }
            return Err(mismatch("this folder"));
        }
        // Same plan but outputs missing, inputs changed or failures to retry: rebuild from
        // whatever shards still verify and hold nothing to redo.
        recorded = rec
            .shards
            .iter()
            .map(|s| (s.file.clone(), s.sha256.clone()))
            .collect();
        remove(&prep_path)?;
        remove(&out.join(VIDEOS_FILE))?;
    } else if prep_path.exists() && !run.force {
        return Err(Error::OutputMismatch {
            path: prep_path,
            message: "is not a prep.json this version can read; rerun with --force to replace it"
                .into(),
        });
    }

    // Resume from complete shards.
    let mut rows: Vec<VideoRow> = Vec::with_capacity(plan.items.len());
    let mut shards: Vec<ShardInfo> = Vec::new();
    let (mut changed, mut retried) = (0u64, 0u64);
    if !wipe {
        let mut keep = true;
        for (expected, (&index, path)) in existing.iter().enumerate() {
            if !keep {
                move_to_reuse(out, path)?;
                continue;
            }
            if index as usize != expected {
                return Err(Error::OutputMismatch {
                    path: path.clone(),
                    message: format!("shard {expected} is missing before it; rerun with --force"),
                });
            }
            let meta = shard::read_shard_meta(path)?;
            let pos = rows.len();
            let fits = meta.plan_fingerprint == plan.fingerprint
                && meta.first_position as usize == pos
                && meta.videos.len() <= plan.items.len() - pos
                && meta
                    .videos
                    .iter()
                    .zip(&plan.items[pos..])
                    .all(|(r, it)| r.video_id == it.row.video_id);
            if !fits {
                return Err(mismatch(&format!("{}", path.display())));
            }
            if meta
                .videos
                .iter()
                .enumerate()
                .any(|(k, r)| stale.of(pos + k, r).is_some())
            {
                // Something in it must be redone: it and every later shard are rebuilt, their
                // other videos copied rather than decoded again.
                keep = false;
                move_to_reuse(out, path)?;
                continue;
            }
            let bytes = std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .len();
            let file = shard::frames_file_name(index);
            let sha256 = sha256_file(path)?;
            if recorded.get(&file).is_some_and(|h| *h != sha256) {
                // Not reused either: its videos are decoded again; later shards are rebuilt.
                tracing::warn!(
                    "{}: its bytes changed since {PREP_FILE} recorded them; decoding its videos \
                     again",
                    path.display()
                );
                keep = false;
                remove(path)?;
                continue;
            }
            shards.push(ShardInfo {
                file,
                videos: meta.videos.len() as u64,
                frames: meta.videos.iter().map(|r| u64::from(r.num_frames)).sum(),
                bytes,
                sha256,
            });
            rows.extend(meta.videos);
        }
    } else {
        for path in existing.values() {
            remove(path)?;
        }
        remove(&prep_path)?;
        remove(&out.join(VIDEOS_FILE))?;
        remove(&out.join(INPUTS_FILE))?;
        remove_reuse(out)?;
        wipe = false;
    }
    // What the earlier shards hold that needs no redoing.
    let parts: &[PathBuf] = merge.as_ref().map_or(&[], |m| m.parts);
    let mut reuse = reusable(out, parts)?;
    reuse.retain(|id, r| {
        let pos = plan
            .items
            .binary_search_by(|it| it.row.video_id.as_str().cmp(id))
            .ok();
        match pos.map(|p| (p, stale.of(p, &r.row))) {
            Some((p, None)) if p >= rows.len() => true,
            Some((p, Some(why))) if p >= rows.len() => {
                match why {
                    Redo::Changed => changed += 1,
                    Redo::Failed => retried += 1,
                }
                false
            }
            _ => false,
        }
    });
    debug_assert!(!wipe);
    let resumed = rows.len() as u64;
    progress.event(&PrepEvent::Started {
        total_videos: plan.items.len() as u64,
        resumed_videos: resumed,
    });
    for r in &rows {
        progress.event(&PrepEvent::VideoDone { row: r });
    }
    let (mut decoded, mut copied) = (0u64, 0u64);
    if rows.len() < plan.items.len() {
        let start = rows.len();
        (decoded, copied) = write_remaining(
            plan,
            out,
            run,
            start,
            reuse,
            merge.is_some(),
            &mut rows,
            &mut shards,
            progress,
        )?;
    }

    // The videos table, then prep.json, last.
    let videos_path = out.join(VIDEOS_FILE);
    let committed = shard::write_videos_table(&videos_path, &rows)?;
    let videos_table = ShardInfo::videos_table(&rows, committed);
    let record = make_record(plan, &rows, shards, videos_table);
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Io {
        path: prep_path.clone(),
        source: std::io::Error::other(e),
    })?;
    let inputs: Identities = plan
        .items
        .iter()
        .zip(&stale.now)
        .map(|(it, m)| (it.row.video_id.clone(), (it.row.file_bytes, *m)))
        .collect();
    let inputs_json = serde_json::to_vec(&inputs).map_err(|e| Error::Io {
        path: out.join(INPUTS_FILE),
        source: std::io::Error::other(e),
    })?;
    AtomicFile::write_all(&out.join(INPUTS_FILE), &inputs_json)?;
    AtomicFile::write_all(&prep_path, &json)?;
    remove_reuse(out)?;
    Ok(PrepSummary {
        up_to_date: false,
        resumed_videos: resumed,
        decoded_videos: decoded,
        copied_videos: copied,
        changed_inputs: changed,
        retried_failed: retried,
        record,
    })
}

/// Moves a shard into [`REUSE_DIR`] under a name no earlier move used.
fn move_to_reuse(out: &Path, shard_path: &Path) -> Result<()> {
    let dir = out.join(REUSE_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let n = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .count();
    let name = shard_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let to = dir.join(format!("{n:05}-{name}"));
    std::fs::rename(shard_path, &to).map_err(|e| Error::io(shard_path, e))
}

fn remove_reuse(out: &Path) -> Result<()> {
    let dir = out.join(REUSE_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&dir, e)),
    }
}

fn make_record(
    plan: &Plan,
    rows: &[VideoRow],
    shards: Vec<ShardInfo>,
    videos_table: ShardInfo,
) -> PrepRecord {
    let mut counts = PrepCounts {
        planned: rows.len() as u64,
        skipped_out_of_benchmark: plan.skipped_out_of_benchmark.clone(),
        // A part lacks most classes by design; the whole plan's are named at merge.
        empty_classes: if plan.part.is_none() {
            plan.empty_classes()
        } else {
            Vec::new()
        },
        ungrouped: plan.ungrouped.clone(),
        ..PrepCounts::default()
    };
    let mut failed = Vec::new();
    for r in rows {
        match r.status {
            VideoStatus::Ok => counts.ok += 1,
            VideoStatus::Failed => {
                counts.failed += 1;
                failed.push(FailedVideo {
                    video_id: r.video_id.clone(),
                    error: r.error.clone().unwrap_or_default(),
                });
            }
        }
        counts.frames += u64::from(r.num_frames);
        *counts
            .per_domain_split
            .entry(format!("{}/{}", r.domain, r.source_split))
            .or_default() += 1;
    }
    let mut h = Sha256::new();
    for s in shards.iter().chain(std::iter::once(&videos_table)) {
        h.update(s.file.as_bytes());
        h.update(b"\0");
        h.update(s.sha256.as_bytes());
        h.update(b"\n");
    }
    let m = &plan.manifest;
    PrepRecord {
        tool: "videodg".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        schema_version: SHARD_SCHEMA_VERSION,
        benchmark: m.name.clone(),
        manifest_origin: m.origin.display().to_string(),
        manifest_sha256: vdg_data::atomic::hex(&Sha256::digest(m.text.as_bytes())),
        manifest_toml: m.text.clone(),
        options: serde_json::to_value(&plan.options).unwrap_or_default(),
        plan_fingerprint: plan.fingerprint.clone(),
        libraries: plan.libraries.clone(),
        part: plan.part.clone(),
        counts,
        failed,
        shards,
        videos_table,
        fingerprint: vdg_data::atomic::hex(&h.finalize()),
    }
}

/// A decoded, encoded video on its way to the writer.
struct Done {
    row: VideoRow,
    frames: FrameBuffer,
}

fn fill_ok(row: &mut VideoRow, s: &DecodeStats, fps: f64, kept: u32, decoded_in_clip: u64) {
    row.status = VideoStatus::Ok;
    row.num_frames = kept;
    row.decoded_frames = decoded_in_clip as u32;
    row.declared_frames = s.declared_frames;
    row.fps = (fps > 0.0).then_some(fps);
    row.source_fps = (s.source_fps > 0.0).then_some(s.source_fps);
    row.width = Some(s.width);
    row.height = Some(s.height);
    row.source_width = Some(s.source_width);
    row.source_height = Some(s.source_height);
    row.duration_secs = (s.source_fps > 0.0).then(|| decoded_in_clip as f64 / s.source_fps);
    row.colour_matrix = s.colour.map(|c| c.matrix.name().to_owned());
    row.colour_range = s.colour.map(|c| c.range_name().to_owned());
    row.colour_assumed = s.colour.map(|c| c.assumed);
    row.sample_aspect = Some(s.sample_aspect);
    row.rotation = Some(s.rotation);
    row.warning = s.warning.clone();
}

/// How a recording lost the frames before a clip's end: `at_start` before its first
/// decodable frame, `rejected` in packets the decoder rejected (`lost_at`, in order).
fn lost_how(at_start: u64, rejected: u64, lost_at: &[u64]) -> String {
    let mut how = Vec::new();
    if at_start > 0 {
        how.push(format!(
            "{at_start} at its start, before its first keyframe or parameter sets"
        ));
    }
    if rejected > 0 {
        how.push(format!(
            "{rejected} in packets the decoder rejected, the first after {} decoded frames",
            lost_at[0]
        ));
    }
    how.join("; ")
}

fn fail(row: &mut VideoRow, error: String) {
    row.status = VideoStatus::Failed;
    row.error = Some(error);
}

fn kept_fps(source_fps: f64, max_fps: Option<f64>) -> f64 {
    match max_fps {
        Some(m) if source_fps > m => m,
        _ => source_fps,
    }
}

/// Decodes and JPEG-encodes one unit of the plan: a single video, or every clip of one
/// recording in a single decoding pass. Never fails: a bad video becomes a failed row.
/// The unit holds at most `memory_frames` frames in memory; past that its buffers spill to
/// anonymous files in `spill_dir` ([`crate::buffer`]).
/// `watch`, when given, is beaten as decoding progresses and stops it once abandoned.
pub fn process_unit(
    items: &[PlanItem],
    opts: &ContentOptions,
    spill_dir: &Path,
    memory_frames: usize,
    watch: Option<&Arc<Watch>>,
) -> Vec<(VideoRow, FrameBuffer)> {
    let budget = std::sync::Arc::new(AtomicUsize::new(0));
    let mut out: Vec<(VideoRow, FrameBuffer)> = items
        .iter()
        .map(|it| {
            (
                it.row.clone(),
                FrameBuffer::new(budget.clone(), memory_frames, spill_dir),
            )
        })
        .collect();
    for (o, it) in out.iter_mut().zip(items) {
        if let Some(e) = &it.pre_error {
            fail(&mut o.0, e.clone());
        }
    }
    // (index into items, first frame, last frame) of the clips still to decode.
    let wanted: Vec<(usize, u64, u64)> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| it.pre_error.is_none())
        .map(|(i, it)| match &it.clip {
            Some(c) => (i, c.start, c.end),
            None => (i, 0, u64::MAX),
        })
        .collect();
    let Some(last) = wanted.iter().map(|w| w.2).max() else {
        return out;
    };
    let dopts = DecodeOptions {
        short_side: opts.short_side,
        strict_frame_count: opts.strict_frame_count,
        stop_after_frames: last.checked_add(1),
        require_rate: opts.max_fps.is_some(),
        yuv420: !opts.jpeg_via_rgb,
        lost_frames_per_clip: items.iter().any(|it| it.clip.is_some()),
    };
    let max_fps = opts.max_fps;
    let wants = |i: u64, fps: f64, &(_, start, end): &(usize, u64, u64)| {
        i >= start && i <= end && keep_frame(i - start, fps, max_fps)
    };
    let mut encoder = None;
    // Frames handed over that the decoder flagged as damaged (worded per clip below).
    let mut damaged_frames: Vec<u64> = Vec::new();
    let result = decode_video_watched(
        &items[wanted[0].0].abs_path,
        &dopts,
        watch,
        |i, fps| wanted.iter().any(|w| wants(i, fps, w)),
        |f| {
            let enc = match &mut encoder {
                Some(e) => e,
                None => encoder.insert(crate::jpeg::JpegEncoder::new(opts.jpeg_quality)?),
            };
            let mut jpeg = match f.pixels {
                Pixels::Rgb { data, stride } => enc.encode_rgb(data, f.width, f.height, stride)?,
                Pixels::Yuv420 { planes, strides } => {
                    enc.encode_yuv420(planes, strides, f.width, f.height)?
                }
            };
            let i = u64::from(f.source_frame);
            if f.damaged {
                damaged_frames.push(i);
            }
            // `f` is only handed over when some clip wants it; fps is known by then.
            let mut targets = wanted
                .iter()
                .filter(|w| i >= w.1 && i <= w.2)
                .map(|w| w.0)
                .peekable();
            while let Some(t) = targets.next() {
                // The last (usually the only) clip wanting the frame takes the bytes.
                let jpeg = if targets.peek().is_some() {
                    jpeg.clone()
                } else {
                    std::mem::take(&mut jpeg)
                };
                out[t].1.push(EncodedFrame {
                    source_frame: f.source_frame,
                    time_secs: f.time_secs,
                    jpeg,
                })?;
            }
            Ok(())
        },
    );
    match result {
        Ok(s) => {
            let fps = kept_fps(s.source_fps, max_fps);
            let decoded = u64::from(s.decoded_frames);
            for &(i, start, end) in &wanted {
                let (row, frames) = &mut out[i];
                // Frames were pushed for any frame in the clip; keep those its own thinning keeps.
                if max_fps.is_some()
                    && let Err(e) = frames.retain(|f| {
                        keep_frame(u64::from(f.source_frame) - start, s.source_fps, max_fps)
                    })
                {
                    frames.clear();
                    fail(row, e);
                    continue;
                }
                match &items[i].clip {
                    None => {
                        let kept = frames.len() as u32;
                        fill_ok(row, &s, fps, kept, decoded);
                    }
                    Some(c) if end >= decoded => {
                        frames.clear();
                        fail(
                            row,
                            format!(
                                "interval {start}-{end} ({}) runs past the end of the video ({decoded} frames)",
                                c.source
                            ),
                        );
                    }
                    Some(c) => {
                        // A frame lost before the clip's end shifts or removes its frames:
                        // the same tolerance as a shortfall, over the clip's length.
                        let rejected = s.lost_at.iter().filter(|&&at| at <= end).count() as u64;
                        let lost = s.lost_at_start + rejected;
                        let how = lost_how(s.lost_at_start, rejected, &s.lost_at);
                        let tolerated = if opts.strict_frame_count {
                            0
                        } else {
                            DEFAULT_FRAME_SHORTFALL_ABS.max(
                                ((end - start + 1) as f64 * DEFAULT_FRAME_SHORTFALL_FRAC) as u64,
                            )
                        };
                        if lost > tolerated {
                            frames.clear();
                            fail(
                                row,
                                format!(
                                    "truncated or damaged: {lost} frames of the recording lost before the \
                                     clip's end ({how}), so its frames no longer match interval \
                                     {start}-{end} ({}); {tolerated} may be lost",
                                    c.source
                                ),
                            );
                            continue;
                        }
                        let kept = frames.len() as u32;
                        fill_ok(row, &s, fps, kept, end - start + 1);
                        // The recording's warning, less what concerns other clips.
                        let mut notes = Vec::new();
                        if lost > 0 {
                            notes.push(format!(
                                "{lost} frames of the recording lost before the clip's end \
                                 ({how}); within the {tolerated} tolerated"
                            ));
                        }
                        let damaged: Vec<u64> = damaged_frames
                            .iter()
                            .copied()
                            .filter(|&d| {
                                (start..=end).contains(&d)
                                    && keep_frame(d - start, s.source_fps, max_fps)
                            })
                            .collect();
                        if let Some((_, msg)) = s.resized.as_ref().filter(|r| r.0 <= end) {
                            notes.push(msg.clone());
                        }
                        if let Some(first) = damaged.first() {
                            notes.push(format!(
                                "{} of the {kept} frames kept were decoded from damaged data, \
                                 the decoder concealing the errors (first: source frame {first})",
                                damaged.len()
                            ));
                        }
                        notes.extend(row.warning.take());
                        row.warning = (!notes.is_empty()).then(|| notes.join("; "));
                    }
                }
            }
        }
        Err(e) => {
            for &(i, _, _) in &wanted {
                out[i].1.clear();
                fail(&mut out[i].0, e.to_string());
            }
        }
    }
    out
}

struct Gate {
    state: Mutex<(usize, bool)>, // (next position to write, aborted)
    cv: Condvar,
}

impl Gate {
    /// Wakes every worker waiting for the writer and tells it to stop.
    fn abort(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.1 = true;
        }
        self.cv.notify_all();
    }
}

/// What the writer receives.
enum Msg {
    /// The video at this plan position, decoded, copied or failed.
    Video(usize, Box<Done>),
    /// The workers stopped the run ([`Shared::error`] says why).
    Stopped,
}

/// What the decoding workers share. Owned rather than borrowed: a worker stuck inside
/// FFmpeg is left behind when the stall watchdog gives up on it, and may outlive the run.
struct Shared {
    items: Arc<[PlanItem]>,
    options: ContentOptions,
    out: PathBuf,
    /// Units from the resume position on (a resumed unit may start mid-recording).
    units: Vec<std::ops::Range<usize>>,
    reuse: BTreeMap<String, Reusable>,
    /// A merge: a unit that cannot be copied stops the run rather than being decoded.
    copy_only: bool,
    /// Backpressure: a worker stays within this many units of the writer's.
    window: usize,
    next: AtomicUsize,
    gate: Gate,
    stop: AtomicBool,
    decoded: AtomicUsize,
    copied: AtomicUsize,
    /// Why the workers stopped the run (a merge that cannot copy a video, stalled videos).
    error: Mutex<Option<Error>>,
    /// The run's stop flag (a signal): it also stops the videos being decoded.
    interrupt: Option<Arc<AtomicBool>>,
    /// What the writer is inside of.
    writing: Writing,
    /// Notified when a worker's loop ends.
    ended: Condvar,
    ended_lock: Mutex<()>,
}

impl Shared {
    /// Stops the run with `e` (the first error is kept) and tells the writer.
    fn fail(&self, e: Error, tx: &mpsc::Sender<Msg>) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.gate.abort();
        let _ = tx.send(Msg::Stopped);
    }
}

/// What the writer is inside of, for the watchdog: the shard it writes while it writes a
/// video or closes a shard, that write's progress (a beat per frame), and whether the
/// watchdog has said so. A stalled write cannot be given up on; it is named in a warning.
#[derive(Default)]
struct Writing(Mutex<Option<(PathBuf, Arc<Watch>, bool)>>);

impl Writing {
    /// Marks the writer inside a write to `shard` until the guard is dropped.
    fn during(&self, shard: PathBuf) -> WritingGuard<'_> {
        let watch = Arc::new(Watch::new());
        if let Ok(mut w) = self.0.lock() {
            *w = Some((shard, watch.clone(), false));
        }
        WritingGuard(self, watch)
    }

    /// The shard and how long, if the writer has been inside one write for `after` and the
    /// watchdog has not said so yet.
    fn stalled(&self, after: std::time::Duration) -> Option<(PathBuf, std::time::Duration)> {
        let mut w = self.0.lock().ok()?;
        let (shard, watch, warned) = w.as_mut()?;
        let idle = watch.idle();
        if *warned || idle < after {
            return None;
        }
        *warned = true;
        Some((shard.clone(), idle))
    }
}

struct WritingGuard<'a>(&'a Writing, Arc<Watch>);

impl Drop for WritingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.0.lock() {
            *w = None;
        }
    }
}

/// One decoding worker as the stall watchdog sees it.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    /// The unit it is working on (index into [`Shared::units`]) and its progress.
    busy: Option<(usize, Arc<Watch>)>,
    /// The watchdog gave up on it: its unit was reported as failed, and what it returns, if
    /// it ever returns, is dropped.
    abandoned: bool,
    /// Its loop has ended.
    ended: bool,
    /// The unit the watchdog has already warned about.
    warned: Option<usize>,
}

impl Slot {
    fn is_abandoned(&self) -> bool {
        self.0.lock().map_or(true, |s| s.abandoned)
    }

    /// Neither ended nor given up on: the end of the run waits for it.
    fn is_live(&self) -> bool {
        self.0.lock().is_ok_and(|s| !s.abandoned && !s.ended)
    }

    /// The unit it was given up on in, while its thread is still inside it.
    fn stuck_in(&self) -> Option<usize> {
        let st = self.0.lock().ok()?;
        match &st.busy {
            Some((u, _)) if st.abandoned && !st.ended => Some(*u),
            _ => None,
        }
    }
}

struct Worker {
    slot: Arc<Slot>,
    handle: std::thread::JoinHandle<()>,
}

fn spawn_worker(shared: &Arc<Shared>, tx: &mpsc::Sender<Msg>, n: usize) -> Result<Worker> {
    let slot = Arc::new(Slot::default());
    let (sh, sl, tx) = (shared.clone(), slot.clone(), tx.clone());
    let handle = std::thread::Builder::new()
        .name(format!("vdg-decode-{n}"))
        .spawn(move || {
            let _ended = Ended(&sh, &sl, &tx);
            work(&sh, &sl, &tx);
        })
        .map_err(|e| Error::io(&shared.out, e))?;
    Ok(Worker { slot, handle })
}

/// Starts worker `n` and adds it to `workers`; if no thread can be started, stops the run
/// with that error and returns false.
fn add_worker(
    shared: &Arc<Shared>,
    workers: &Mutex<Vec<Worker>>,
    tx: &mpsc::Sender<Msg>,
    n: usize,
) -> bool {
    match spawn_worker(shared, tx, n) {
        Ok(w) => {
            if let Ok(mut ws) = workers.lock() {
                ws.push(w);
            }
            true
        }
        Err(e) => {
            shared.fail(e, tx);
            false
        }
    }
}

/// Marks a worker ended when its thread ends, and a panic outside the guarded decoding as
/// the run's error (the writer would otherwise wait for that unit for ever).
struct Ended<'a>(&'a Shared, &'a Slot, &'a mpsc::Sender<Msg>);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        let Ended(shared, slot, tx) = *self;
        if std::thread::panicking() {
            shared.fail(
                Error::io(
                    &shared.out,
                    std::io::Error::other(
                        "a decoding worker panicked (its message is above); shards completed \
                         before it are kept, rerun to resume",
                    ),
                ),
                tx,
            );
        }
        if let Ok(mut st) = slot.0.lock() {
            st.ended = true;
        }
        let _guard = shared.ended_lock.lock();
        shared.ended.notify_all();
    }
}

/// A worker's loop: takes the next unit, decodes (or copies) it and hands its videos to
/// the writer, until none is left or the run stops.
fn work(shared: &Shared, slot: &Slot, tx: &mpsc::Sender<Msg>) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let u = shared.next.fetch_add(1, Ordering::SeqCst);
        let Some(range) = shared.units.get(u) else {
            return;
        };
        // Backpressure: stay within `window` units of the one the writer is in.
        {
            let Ok(mut st) = shared.gate.state.lock() else {
                return;
            };
            while u >= shared.units.partition_point(|r| r.end <= st.0) + shared.window && !st.1 {
                st = match shared.gate.cv.wait(st) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            if st.1 {
                return;
            }
        }
        let items = &shared.items[range.clone()];
        let watch = Arc::new(Watch::stopped_by(shared.interrupt.clone()));
        match slot.0.lock() {
            Ok(mut st) => st.busy = Some((u, watch.clone())),
            Err(_) => return,
        }
        for it in items {
            injected_stall(&it.row.video_id, &watch);
        }
        let done = match copy_unit(items, &shared.reuse) {
            Some(d) => {
                shared.copied.fetch_add(d.len(), Ordering::Relaxed);
                d
            }
            None if shared.copy_only => {
                shared.fail(
                    Error::OutputMismatch {
                        path: shared.out.clone(),
                        message: format!(
                            "{}: no part folder holds a readable copy of it; rerun its part, \
                             then merge again",
                            items[0].row.video_id
                        ),
                    },
                    tx,
                );
                return;
            }
            None => {
                shared.decoded.fetch_add(items.len(), Ordering::Relaxed);
                process_unit_guarded(items, &shared.options, &shared.out, &watch)
            }
        };
        // Hand the unit over, unless the watchdog gave up on it meanwhile (it reported it).
        match slot.0.lock() {
            Ok(mut st) if !st.abandoned => st.busy = None,
            _ => return,
        }
        for (k, (row, frames)) in done.into_iter().enumerate() {
            if tx
                .send(Msg::Video(range.start + k, Box::new(Done { row, frames })))
                .is_err()
            {
                return;
            }
        }
    }
}

/// Gives up on a worker whose unit has made no progress for `timeout`: its videos are
/// recorded as failed, FFmpeg is asked to stop ([`Watch::abandon`]) and a fresh worker
/// takes its place. Past `jobs` such workers (each may hold a thread that never returns),
/// or at the first in a merge, the run stops with [`Error::Stalled`]. Runs until `wake` is
/// dropped.
fn watchdog(
    shared: &Arc<Shared>,
    workers: &Mutex<Vec<Worker>>,
    tx: mpsc::Sender<Msg>,
    timeout: std::time::Duration,
    wake: mpsc::Receiver<()>,
) {
    let poll = (timeout / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    // A merge promises the parts' bytes: it stops rather than record a video as failed.
    let cap = if shared.copy_only {
        0
    } else {
        workers.lock().map_or(1, |w| w.len()).max(1)
    };
    let warn_after = (timeout / 2).min(std::time::Duration::from_secs(60));
    let mut stalled: Vec<PathBuf> = Vec::new();
    while let Err(mpsc::RecvTimeoutError::Timeout) = wake.recv_timeout(poll) {
        if let Some((shard, idle)) = shared.writing.stalled(warn_after) {
            tracing::warn!(
                "{}: the shard writer has made no progress for {:.0} s (its file system may \
                 have stopped answering); the run waits for it",
                shard.display(),
                idle.as_secs_f64()
            );
        }
        let slots: Vec<Arc<Slot>> = match workers.lock() {
            Ok(w) => w.iter().map(|w| w.slot.clone()).collect(),
            Err(_) => return,
        };
        for slot in slots {
            let mut warn = None;
            let gave_up = match slot.0.lock() {
                Ok(mut st) => match st.busy.clone() {
                    Some((u, w)) if !st.abandoned && w.idle() >= timeout => {
                        st.abandoned = true;
                        w.abandon();
                        Some((u, w))
                    }
                    Some((u, w))
                        if !st.abandoned && st.warned != Some(u) && w.idle() >= warn_after =>
                    {
                        st.warned = Some(u);
                        warn = Some((u, w.idle()));
                        None
                    }
                    _ => None,
                },
                Err(_) => None,
            };
            if let Some((u, idle)) = warn {
                // Said while it is still waiting, so a stall on a file system that stopped
                // answering is seen before the timeout.
                tracing::warn!(
                    "{}: no packet read and no frame decoded for {:.0} s; given up on at {} s \
                     (--stall-timeout)",
                    shared.items[shared.units[u].start].abs_path.display(),
                    idle.as_secs_f64(),
                    timeout.as_secs_f64()
                );
            }
            let Some((u, w)) = gave_up else { continue };
            {
                let _guard = shared.ended_lock.lock();
                shared.ended.notify_all();
            }
            let range = shared.units[u].clone();
            let items = &shared.items[range.clone()];
            let path = items[0].abs_path.clone();
            let secs = timeout.as_secs_f64();
            stalled.push(path.clone());
            if stalled.len() > cap {
                shared.fail(
                    Error::Stalled {
                        path: shared.out.clone(),
                        files: std::mem::take(&mut stalled),
                        secs,
                        cap,
                    },
                    &tx,
                );
                return;
            }
            let message = format!(
                "{}: no progress for {secs} s, after {} packets read and frames decoded: a read \
                 that does not return (a file system that stopped answering?) or a decoder that \
                 does not return; given up on and marked failed (`--retry-failed` tries it \
                 again)",
                path.display(),
                w.beats()
            );
            for (k, it) in items.iter().enumerate() {
                let mut row = it.row.clone();
                fail(&mut row, message.clone());
                let done = Done {
                    row,
                    frames: FrameBuffer::from_vec(Vec::new()),
                };
                if tx
                    .send(Msg::Video(range.start + k, Box::new(done)))
                    .is_err()
                {
                    return;
                }
            }
            let n = workers.lock().map_or(0, |w| w.len());
            if !add_worker(shared, workers, &tx, n) {
                return;
            }
        }
    }
}

/// Decodes (or copies from `reuse`) and writes every video from `start` on; returns how many
/// were decoded and how many copied.
#[allow(clippy::too_many_arguments)]
fn write_remaining(
    plan: &Plan,
    out: &Path,
    run: &RunOptions,
    start: usize,
    reuse: BTreeMap<String, Reusable>,
    copy_only: bool,
    rows: &mut Vec<VideoRow>,
    shards: &mut Vec<ShardInfo>,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let jobs = if run.jobs == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        run.jobs
    };
    let shared = Arc::new(Shared {
        items: plan.items.clone(),
        options: plan.options.clone(),
        out: out.to_owned(),
        units: plan
            .units
            .iter()
            .filter(|u| u.end > start)
            .map(|u| u.start.max(start)..u.end)
            .collect(),
        reuse,
        copy_only,
        // Backpressure counts units, not videos: a PKU-MMD recording is one unit of ~20
        // clips, and a window of clips let only one recording decode at a time whatever
        // `jobs` was.
        window: 2 * jobs,
        next: AtomicUsize::new(0),
        gate: Gate {
            state: Mutex::new((start, false)),
            cv: Condvar::new(),
        },
        stop: AtomicBool::new(false),
        decoded: AtomicUsize::new(0),
        copied: AtomicUsize::new(0),
        error: Mutex::new(None),
        interrupt: run.interrupt.clone(),
        writing: Writing::default(),
        ended: Condvar::new(),
        ended_lock: Mutex::new(()),
    });
    let (tx, rx) = mpsc::channel::<Msg>();
    let workers: Mutex<Vec<Worker>> = Mutex::new(Vec::new());

    let result = std::thread::scope(|ts| {
        let writer = ts.spawn(|| {
            // A panic in the writer must stop the run with an error, not leave the workers
            // waiting for a position that never comes.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_in_order(
                    plan,
                    out,
                    start,
                    rx,
                    rows,
                    shards,
                    (&shared.gate, &shared.writing),
                    progress,
                    run.interrupt.as_deref(),
                )
            }))
            .unwrap_or_else(|p| {
                Err(Error::Io {
                    path: out.to_owned(),
                    source: std::io::Error::other(format!(
                        "the shard writer panicked ({}); shards completed before it are kept, \
                         rerun to resume",
                        panic_message(&p)
                    )),
                })
            });
            if r.is_err() {
                shared.stop.store(true, Ordering::SeqCst);
                shared.gate.abort();
            }
            r
        });
        for n in 0..jobs {
            if !add_worker(&shared, &workers, &tx, n) {
                break;
            }
        }
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        let dog = run.stall_timeout.map(|timeout| {
            let (shared, workers, tx) = (&shared, &workers, tx.clone());
            ts.spawn(move || watchdog(shared, workers, tx, timeout, wake_rx))
        });
        drop(tx);
        let r = match writer.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        // Nothing is left to decode (or the run failed): idle workers end. Wait for those
        // the watchdog has not given up on; it may still give up on one.
        shared.stop.store(true, Ordering::SeqCst);
        shared.gate.abort();
        // (Checked under `ended_lock`, which a worker takes to say it ended and the watchdog
        // to say it gave up on one, so no wake-up is missed.)
        let waiting = || {
            workers
                .lock()
                .is_ok_and(|ws| ws.iter().any(|w| w.slot.is_live()))
        };
        let mut g = shared.ended_lock.lock().unwrap_or_else(|e| e.into_inner());
        while waiting() {
            g = match shared
                .ended
                .wait_timeout(g, std::time::Duration::from_secs(1))
            {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        drop(g);
        drop(wake_tx);
        if let Some(dog) = dog
            && let Err(p) = dog.join()
        {
            std::panic::resume_unwind(p);
        }
        // Join every worker but those given up on (left behind, detached). A worker that
        // panicked has made its error the run's ([`Ended`]).
        let ws = std::mem::take(&mut *workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in ws {
            if !w.slot.is_abandoned() {
                let _ = w.handle.join();
            } else if let Some(u) = w.slot.stuck_in() {
                // A call blocked in the kernel can hold the process's exit back.
                tracing::warn!(
                    "{}: the worker given up on is still inside it; vdg may not exit until \
                     the system returns from that call",
                    shared.items[shared.units[u].start].abs_path.display()
                );
            }
        }
        r
    });
    result.map_err(
        |e| match shared.error.lock().ok().and_then(|mut c| c.take()) {
            Some(first) => first,
            None => e,
        },
    )?;
    Ok((
        shared.decoded.load(Ordering::Relaxed) as u64,
        shared.copied.load(Ordering::Relaxed) as u64,
    ))
}

/// The unit's videos as an earlier run stored them, when every one of them can be copied
/// (and every copy reads back); `None` means decode the unit.
fn copy_unit(
    items: &[PlanItem],
    reuse: &BTreeMap<String, Reusable>,
) -> Option<Vec<(VideoRow, FrameBuffer)>> {
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        let r = reuse.get(&it.row.video_id)?;
        let frames = match (r.row.status, r.row.first_row) {
            (VideoStatus::Ok, Some(first)) => {
                shard::read_video_frames(&r.shard, first, r.row.num_frames).ok()?
            }
            (VideoStatus::Ok, None) => return None,
            (VideoStatus::Failed, _) => Vec::new(),
        };
        let mut row = r.row.clone();
        row.shard = None;
        row.first_row = None;
        out.push((row, FrameBuffer::from_vec(frames)));
    }
    Some(out)
}

#[allow(clippy::too_many_arguments)]
fn write_in_order(
    plan: &Plan,
    out: &Path,
    start: usize,
    rx: mpsc::Receiver<Msg>,
    rows: &mut Vec<VideoRow>,
    shards: &mut Vec<ShardInfo>,
    (gate, writing): (&Gate, &Writing),
    progress: &dyn Progress,
    interrupt: Option<&AtomicBool>,
) -> Result<()> {
    let total = plan.items.len();
    let mut pending: BTreeMap<usize, Done> = BTreeMap::new();
    let mut pos = start;
    let mut current: Option<(FrameShardWriter, usize, Vec<VideoRow>)> = None;
    while pos < total {
        let Ok(Msg::Video(i, done)) = rx.recv() else {
            return Err(Error::Io {
                path: out.to_owned(),
                source: std::io::Error::other("decode workers stopped early"),
            });
        };
        pending.insert(i, *done);
        if interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) {
            // The shard being written is dropped (its temporary file is removed on rerun).
            return Err(Error::Interrupted {
                path: out.to_owned(),
                shards: shards.len(),
            });
        }
        while let Some(Done { mut row, frames }) = pending.remove(&pos) {
            if current.is_none() {
                let index = shards.len() as u32;
                current = Some((
                    FrameShardWriter::create(out, index, DEFAULT_MAX_ROW_GROUP_BYTES)?,
                    pos,
                    Vec::new(),
                ));
            }
            let Some((writer, _, shard_rows)) = current.as_mut() else {
                unreachable!("shard writer was just created")
            };
            let inside = writing.during(out.join(shard::frames_file_name(writer.index())));
            injected_delay(&row.video_id);
            if row.status == VideoStatus::Ok {
                injected_panic("writer", &row.video_id);
                let spill = |e: String| Error::Io {
                    path: out.to_owned(),
                    source: std::io::Error::other(format!("{}: {e}", row.video_id)),
                };
                let frames = frames.into_frames().map_err(spill)?.map(|f| {
                    inside.1.beat();
                    f.map_err(|e| vdg_data::Error::Io {
                        path: out.to_owned(),
                        source: std::io::Error::other(e),
                    })
                });
                let first = writer.write_video_iter(&row.video_id, frames)?;
                row.shard = Some(writer.index());
                row.first_row = Some(first);
            } else {
                drop(frames);
            }
            drop(inside);
            progress.event(&PrepEvent::VideoDone { row: &row });
            shard_rows.push(row.clone());
            rows.push(row);
            pos += 1;
            if let Ok(mut st) = gate.state.lock() {
                st.0 = pos;
            }
            gate.cv.notify_all();
            if (writer.bytes() >= plan.options.shard_target_bytes || pos == total)
                && let Some((w, first, videos)) = current.take()
            {
                let _inside = writing.during(out.join(shard::frames_file_name(w.index())));
                let info = finish_shard(plan, w, first, videos)?;
                progress.event(&PrepEvent::ShardWritten { info: &info });
                shards.push(info);
            }
        }
    }
    Ok(())
}

/// The text of a caught panic.
fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Test hook, honoured by debug builds only: `VDG_INJECT_PANIC=<stage>:<video id>` makes
/// `stage` (`decode` or `writer`) panic on that video, so tests can check that a panic never
/// hangs a run nor passes silently.
fn injected_panic(stage: &str, video_id: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("VDG_INJECT_PANIC").is_ok_and(|v| v == format!("{stage}:{video_id}")) {
        panic!("injected panic at {stage} of {video_id}");
    }
    #[cfg(not(debug_assertions))]
    let _ = (stage, video_id);
}

/// Test hook, honoured by debug builds only: `VDG_INJECT_DELAY_MS=<ms>` makes the writer
/// wait that long before each video, so tests can signal a run while it is writing;
/// `<ms>:<video id>` before that video only.
fn injected_delay(video_id: &str) {
    #[cfg(debug_assertions)]
    if let Ok(v) = std::env::var("VDG_INJECT_DELAY_MS") {
        let (ms, only) = match v.split_once(':') {
            Some((ms, id)) => (ms, Some(id)),
            None => (v.as_str(), None),
        };
        if let Ok(ms) = ms.parse::<u64>()
            && only.is_none_or(|id| id == video_id)
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = video_id;
}

/// Test hook, honoured by debug builds only: `VDG_INJECT_STALL=<video id>[,...]` makes
/// decoding those videos stop making progress until the watchdog gives up on them (then
/// they go on, as an FFmpeg read interrupted by the watch would); `<video id>:forever`
/// never returns, as a read blocked in the kernel.
fn injected_stall(video_id: &str, watch: &Watch) {
    #[cfg(debug_assertions)]
    if let Ok(v) = std::env::var("VDG_INJECT_STALL") {
        for entry in v.split(',') {
            let forever = entry.strip_suffix(":forever") == Some(video_id);
            if forever || entry == video_id {
                while forever || !watch.is_abandoned() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (video_id, watch);
}

/// [`process_unit`], with a panic in decoding turned into failed rows naming the files.
fn process_unit_guarded(
    items: &[PlanItem],
    opts: &ContentOptions,
    spill_dir: &Path,
    watch: &Arc<Watch>,
) -> Vec<(VideoRow, FrameBuffer)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for it in items {
            injected_panic("decode", &it.row.video_id);
        }
        process_unit(items, opts, spill_dir, memory_frames(), Some(watch))
    }))
    .unwrap_or_else(|p| {
        let msg = panic_message(&p);
        items
            .iter()
            .map(|it| {
                let mut row = it.row.clone();
                fail(
                    &mut row,
                    format!(
                        "{}: decoding panicked ({msg}); marked failed",
                        it.abs_path.display()
                    ),
                );
                (row, FrameBuffer::from_vec(Vec::new()))
            })
            .collect()
    })
}

/// Frames a unit may hold in memory: [`DEFAULT_MEMORY_FRAMES`], or `VDG_MEMORY_FRAMES` (for
/// tests and for machines with little memory).
fn memory_frames() -> usize {
    std::env::var("VDG_MEMORY_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(DEFAULT_MEMORY_FRAMES)
}

fn finish_shard(
    plan: &Plan,
    w: FrameShardWriter,
    first: usize,
    videos: Vec<VideoRow>,
) -> Result<ShardInfo> {
    let meta = ShardMeta {
        schema_version: SHARD_SCHEMA_VERSION,
        plan_fingerprint: plan.fingerprint.clone(),
        shard: w.index(),
        first_position: first as u64,
        videos,
    };
    let info = w.finish(&meta)?;
    tracing::info!(shard = %info.file, videos = info.videos, frames = info.frames, bytes = info.bytes, "shard written");
    Ok(info)
}
