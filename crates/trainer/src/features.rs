//! The feature cache (`vdg features`): per-frame backbone features of a prepared folder,
//! written once so that temporal heads train on a CPU without running the backbone.
//!
//! A feature folder holds:
//! - `features-NNNNN.parquet`: columns `video_id`, `frame_index`, `source_frame`, `feature`
//!   (`FixedSizeList<Float32>` of the trunk width: 2048 for ResNet-50, before the
//!   projection), one row group per video, a `vdg.shard` footer listing the videos it covers
//!   (the same resume design as frame shards, see `vdg_data::shard`).
//! - `videos.parquet`: the prepared folder's table, with `shard`/`first_row` pointing into
//!   the feature shards and `num_frames` the number of cached frames.
//! - `features.json`: [`FeaturesRecord`] (backbone, weights and their SHA-256, input size,
//!   frame stride, the prepared folder's `prep.json`, the shards' and `videos.parquet`'s
//!   sizes and hashes, fingerprint); `vdg prep verify` checks a folder against it.
//!
//! Frames are read with the evaluation view (shorter side to `S * 256 / 224`, centre `S x S`
//! crop, no flip) and the backbone runs in evaluation mode: the cache is deterministic, and
//! training on it has no crop or flip augmentation (a documented deviation, like ADA in
//! feature space). Shards are written in order by one writer; a rerun keeps complete shards
//! whose fingerprint matches, deletes temporary files and continues, so an interrupted run
//! resumes to the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use vdg_data::shard::{
    FeatureShardWriter, PREP_FILE, ShardInfo, ShardMeta, VIDEOS_FILE, frames_path, read_frames_at,
    read_shard_meta, read_videos_table, write_videos_table,
};
use vdg_data::{VideoRow, VideoStatus};

use crate::error::{Error, Result};
use crate::frames::{decode_jpeg, eval_view, resample};
use crate::init::seeded_init;
use crate::models::blocks::{Backbone, BackboneKind, FrozenTrunk};

pub use vdg_data::shard::features_file_name;

/// Name of the record file of a feature folder.
pub const FEATURES_FILE: &str = "features.json";

/// Version of the feature folder layout.
pub const FEATURES_SCHEMA_VERSION: u32 = 1;

const LOCK_FILE: &str = ".vdg-features.lock";

/// What `vdg features` does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturesOptions {
    /// Prepared folder (`vdg prep`).
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Backbone.
    pub backbone: BackboneKind,
    /// torchvision weights in safetensors; `None` = seeded random weights (for tests).
    pub weights: Option<PathBuf>,
    /// Input side S.
    pub input_size: usize,
    /// Cache every `every`-th prepared frame (1 = all).
    pub every: usize,
    /// Frames per backbone forward.
    pub batch_frames: usize,
    /// Videos per shard.
    pub shard_videos: usize,
    /// Seed of the random weights when `weights` is `None`.
    pub seed: u64,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// Delete an earlier run's shards in `out` instead of refusing other inputs or options.
    pub force: bool,
}

impl FeaturesOptions {
    /// Defaults: input 224, every frame, 64 frames per forward, 64 videos per shard.
    pub fn new(data: PathBuf, out: PathBuf, backbone: BackboneKind) -> Self {
        FeaturesOptions {
            data,
            out,
            backbone,
            weights: None,
            input_size: 224,
            every: 1,
            batch_frames: 64,
            shard_videos: 64,
            seed: 0,
            device: "cpu".into(),
            force: false,
        }
    }
}

/// `features.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturesRecord {
    /// Layout version ([`FEATURES_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Tool version.
    pub tool_version: String,
    /// Backbone.
    pub backbone: BackboneKind,
    /// Weights file, as given.
    pub weights: Option<String>,
    /// SHA-256 of the weights file (`None`: seeded random weights).
    pub weights_sha256: Option<String>,
    /// Seed of random weights (only meaningful without a weights file).
    pub seed: u64,
    /// Input side S.
    pub input_size: usize,
    /// Frame stride.
    pub every: usize,
    /// Width of each feature.
    pub feature_dim: usize,
    /// Videos with features.
    pub videos: usize,
    /// Cached frames.
    pub frames: u64,
    /// The shards.
    pub shards: Vec<ShardInfo>,
    /// `videos.parquet` (size and SHA-256; absent in folders written before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub videos_table: Option<ShardInfo>,
    /// The prepared folder's `prep.json`, verbatim (manifest, fingerprint).
    pub prep: serde_json::Value,
    /// Hash of everything that determines the bytes (prep fingerprint, backbone, weights,
    /// size, stride, tool version).
    pub fingerprint: String,
}

impl FeaturesRecord {
    /// Reads `dir/features.json`, or `None` when `dir` is not a feature folder.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(FEATURES_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        let r: FeaturesRecord = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if r.schema_version != FEATURES_SCHEMA_VERSION {
            return Err(Error::Config(format!(
                "{}: schema version {} (this build reads {FEATURES_SCHEMA_VERSION})",
                path.display(),
                r.schema_version
            )));
        }
        Ok(Some(r))
    }
}

/// Progress of a feature run.
#[derive(Debug, Clone, Copy)]
pub enum FeaturesEvent {
    /// The plan: videos and frames to compute, and how many were already cached.
    Start {
        /// Videos with frames.
        videos: usize,
        /// Frames to cache in all.
        frames: u64,
        /// Frames already in complete shards.
        done_frames: u64,
    },
    /// One video's frames were computed.
    Video {
        /// Its frames.
        frames: u64,
    },
}

/// Summary of a run.
#[derive(Debug, Clone)]
pub struct FeaturesSummary {
    /// The record written.
    pub record: FeaturesRecord,
    /// Shards kept from an earlier run.
    pub resumed_shards: usize,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: e,
    }
}

/// The cached frame indices of a video of `n` prepared frames.
pub fn cached_frames(n: u32, every: usize) -> Vec<u32> {
    (0..n).step_by(every.max(1)).collect()
}

/// Computes the features of `opts.data` into `opts.out` (resuming what is there).
pub fn run_features(
    opts: &FeaturesOptions,
    progress: &(dyn Fn(FeaturesEvent) + Sync),
) -> Result<FeaturesSummary> {
    if opts.every == 0 || opts.input_size == 0 || opts.shard_videos == 0 {
        return Err(Error::Config(
            "--every, --input-size and --shard-videos must be at least 1".into(),
        ));
    }
    let prep_path = opts.data.join(PREP_FILE);
    let prep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prep_path).map_err(|e| io(&prep_path, e))?)
            .map_err(|e| Error::Config(format!("{}: {e}", prep_path.display())))?;
    let rows = read_videos_table(&opts.data.join(VIDEOS_FILE))?;
    let device = crate::device::device(&opts.device)?;
    let weights_sha256 = match &opts.weights {
        Some(w) => Some(vdg_data::atomic::sha256_file(w)?),
        None => None,
    };
    let fingerprint = vdg_data::atomic::sha256_hex(
        serde_json::json!({
            "prep": prep["fingerprint"],
            "backbone": opts.backbone,
            "weights": weights_sha256,
            "seed": if opts.weights.is_none() { Some(opts.seed) } else { None },
            "input_size": opts.input_size,
            "every": opts.every,
            "schema": FEATURES_SCHEMA_VERSION,
            "tool_version": env!("CARGO_PKG_VERSION"),
            // The CPU's channels-last ResNet path rounds differently from the graph's.
            "channels_last": FrozenTrunk::channels_last(opts.backbone, &device),
        })
        .to_string()
        .as_bytes(),
    );
    std::fs::create_dir_all(&opts.out).map_err(|e| io(&opts.out, e))?;
    let lock_path = opts.out.join(LOCK_FILE);
    let lock = std::fs::File::create(&lock_path).map_err(|e| io(&lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::Config(format!(
                "{}: another vdg features is writing this folder",
                opts.out.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path, e)),
    }

    // The plan: usable videos in table order, `shard_videos` per shard.
    let usable: Vec<&VideoRow> = rows
        .iter()
        .filter(|r| r.status == VideoStatus::Ok && r.num_frames > 0 && r.shard.is_some())
        .collect();
    let chunks: Vec<&[&VideoRow]> = usable.chunks(opts.shard_videos).collect();
    let total_frames: u64 = usable
        .iter()
        .map(|r| cached_frames(r.num_frames, opts.every).len() as u64)
        .sum();

    // Resume: keep complete shards of this fingerprint; remove temporary files. A shard that
    // the last finished run recorded must still hash as recorded: kept as it is, its changed
    // bytes (bit rot, a bad copy) would be recorded as good in the new features.json.
    let recorded: BTreeMap<String, String> = match FeaturesRecord::open(&opts.out) {
        Ok(Some(r)) if r.fingerprint == fingerprint => {
            r.shards.into_iter().map(|s| (s.file, s.sha256)).collect()
        }
        _ => BTreeMap::new(),
    };
    let mut kept: BTreeMap<u32, (ShardMeta, ShardInfo)> = BTreeMap::new();
    let mut paths = std::fs::read_dir(&opts.out)
        .map_err(|e| io(&opts.out, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| io(&opts.out, e)))
        .collect::<Result<Vec<PathBuf>>>()?;
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".tmp") {
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            continue;
        }
        let Some(index) = name
            .strip_prefix("features-")
            .and_then(|r| r.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let meta = read_shard_meta(&path)?;
        if meta.plan_fingerprint != fingerprint && opts.force {
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            continue;
        }
        if meta.plan_fingerprint != fingerprint {
            return Err(Error::Config(format!(
                "{}: written with other inputs or options (fingerprint {} vs {}); use another \
                 --out, or --force to recompute",
                path.display(),
                &meta.plan_fingerprint[..12.min(meta.plan_fingerprint.len())],
                &fingerprint[..12]
            )));
        }
        let planned: Vec<&str> = chunks
            .get(index as usize)
            .map(|c| c.iter().map(|r| r.video_id.as_str()).collect())
            .unwrap_or_default();
        let has: Vec<&str> = meta.videos.iter().map(|r| r.video_id.as_str()).collect();
        if planned != has && opts.force {
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            continue;
        }
        if planned != has {
            return Err(Error::Config(format!(
                "{}: covers other videos than the plan (was --shard-videos changed?); \
                 --force recomputes",
                path.display()
            )));
        }
        let info = ShardInfo {
            file: name.clone(),
            videos: meta.videos.len() as u64,
            frames: meta.videos.iter().map(|r| u64::from(r.num_frames)).sum(),
            bytes: std::fs::metadata(&path).map_err(|e| io(&path, e))?.len(),
            sha256: vdg_data::atomic::sha256_file(&path)?,
        };
        if recorded.get(&name).is_some_and(|h| *h != info.sha256) {
            tracing::warn!(
                "{}: its bytes changed since {FEATURES_FILE} recorded them; computing it again",
                path.display()
            );
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            continue;
        }
        kept.insert(index, (meta, info));
    }
    let done_frames: u64 = kept.values().map(|(_, i)| i.frames).sum();
    progress(FeaturesEvent::Start {
        videos: usable.len(),
        frames: total_frames,
        done_frames,
    });

    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &device);
    let backbone = Backbone::new(opts.backbone, 1, 0.0, vb.pp("backbone"))?;
    seeded_init(&vm, opts.seed)?;
    if let Some(w) = &opts.weights {
        crate::models::weights::load_backbone_weights(&vm, w)?;
    }
    let dim = backbone.trunk_dim();
    let trunk = backbone.frozen(&device)?;

    let mut shards = Vec::with_capacity(chunks.len());
    let mut out_rows: BTreeMap<String, VideoRow> = BTreeMap::new();
    let resumed_shards = kept.len();
    let mut position = 0u64;
    for (index, chunk) in chunks.iter().enumerate() {
        let index = index as u32;
        if let Some((meta, info)) = kept.remove(&index) {
            for r in meta.videos {
                out_rows.insert(r.video_id.clone(), r);
            }
            shards.push(info);
            position += chunk.len() as u64;
            continue;
        }
        let mut writer = FeatureShardWriter::create(&opts.out, index, dim)?;
        let mut metas = Vec::with_capacity(chunk.len());
        let frames: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| cached_frames(r.num_frames, opts.every))
            .collect();
        shard_features(
            &opts.data,
            chunk,
            &frames,
            &trunk,
            dim,
            opts,
            &device,
            |i, feats| {
                let (row, frames) = (chunk[i], &frames[i]);
                let first = writer.write_video(&row.video_id, frames, &feats)?;
                let mut r = row.clone();
                r.shard = Some(index);
                r.first_row = Some(first);
                r.num_frames = frames.len() as u32;
                metas.push(r);
                progress(FeaturesEvent::Video {
                    frames: frames.len() as u64,
                });
                Ok(())
            },
        )?;
        let meta = ShardMeta {
            schema_version: vdg_data::shard::SHARD_SCHEMA_VERSION,
            plan_fingerprint: fingerprint.clone(),
            shard: index,
            first_position: position,
            videos: metas.clone(),
        };
        shards.push(writer.finish(&meta)?);
        for r in metas {
            out_rows.insert(r.video_id.clone(), r);
        }
        position += chunk.len() as u64;
    }

    // The videos table: the prepared rows in their order, usable ones pointing at features.
    let table: Vec<VideoRow> = rows
        .iter()
        .map(|r| match out_rows.get(&r.video_id) {
            Some(f) => f.clone(),
            None => VideoRow {
                shard: None,
                first_row: None,
                num_frames: 0,
                ..r.clone()
            },
        })
        .collect();
    let committed = write_videos_table(&opts.out.join(VIDEOS_FILE), &table)?;
    let videos_table = ShardInfo::videos_table(&table, committed);
    let record = FeaturesRecord {
        schema_version: FEATURES_SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        backbone: opts.backbone,
        weights: opts.weights.as_ref().map(|w| w.display().to_string()),
        weights_sha256,
        seed: opts.seed,
        input_size: opts.input_size,
        every: opts.every,
        feature_dim: dim,
        videos: usable.len(),
        frames: total_frames,
        shards,
        videos_table: Some(videos_table),
        prep,
        fingerprint,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Config(e.to_string()))?;
    vdg_data::atomic::AtomicFile::write_all(&opts.out.join(FEATURES_FILE), &json)?;
    drop(lock);
    let _ = std::fs::remove_file(&lock_path);
    Ok(FeaturesSummary {
        record,
        resumed_shards,
    })
}

/// The trunk features of `frames[i]` of each video `rows[i]` (`[frames[i].len() * dim]`),
/// handed to `done(i, ..)` in order as each video completes. Frames of consecutive videos
/// share backbone passes of `opts.batch_frames` (a video of a few cached frames would
/// otherwise run the trunk on a batch of a few: ResNet-50 runs about 30 % slower per frame
/// on 4 than on 16; BENCHMARKS.md); a frame's features do not depend on its batch.
#[allow(clippy::too_many_arguments)]
fn shard_features(
    data: &Path,
    rows: &[&VideoRow],
    frames: &[Vec<u32>],
    trunk: &FrozenTrunk<'_>,
    dim: usize,
    opts: &FeaturesOptions,
    device: &Device,
    mut done: impl FnMut(usize, Vec<f32>) -> Result<()>,
) -> Result<()> {
    let s = opts.input_size;
    // Every (video, frame) in order; videos without a shard contribute nothing.
    let items: Vec<(usize, u32)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.shard.is_some() && r.first_row.is_some())
        .flat_map(|(i, _)| frames[i].iter().map(move |&f| (i, f)))
        .collect();
    let mut feats: Vec<Vec<f32>> = vec![Vec::new(); rows.len()];
    let mut next = 0usize;
    let mut flush = |upto: usize, feats: &mut Vec<Vec<f32>>| -> Result<()> {
        while next < upto {
            done(next, std::mem::take(&mut feats[next]))?;
            next += 1;
        }
        Ok(())
    };
    for batch in items.chunks(opts.batch_frames.max(1)) {
        let mut jpegs = Vec::with_capacity(batch.len());
        for run in batch.chunk_by(|a, b| a.0 == b.0) {
            let row = rows[run[0].0];
            let (Some(shard), Some(first)) = (row.shard, row.first_row) else {
                continue;
            };
            let wanted: Vec<u32> = run.iter().map(|&(_, f)| f).collect();
            let path = frames_path(data, shard);
            // Waited for at most --stall-timeout (a file system that stopped answering).
            jpegs.extend(crate::loader::read_watched(
                vec![path.clone()],
                move || Ok(read_frames_at(&path, first, &wanted)?),
            )?);
        }
        let pixels: Vec<Vec<f32>> = jpegs
            .par_iter()
            .zip(batch)
            .map(|(jpeg, &(i, f))| {
                let (w, h, rgb) = decode_jpeg(jpeg).map_err(|message| Error::Frame {
                    video_id: rows[i].video_id.clone(),
                    frame: f as usize,
                    message,
                })?;
                let mut px = vec![0f32; 3 * s * s];
                resample(&rgb, w, h, &eval_view(w, h, s), s, &mut px);
                Ok(px)
            })
            .collect::<Result<_>>()?;
        let n = pixels.len();
        let x = Tensor::from_vec(pixels.concat(), (n, 3, s, s), device)?;
        let f = trunk
            .features(&x)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (&(i, _), row) in batch.iter().zip(f.chunks_exact(dim)) {
            feats[i].extend_from_slice(row);
        }
        // Every video before the batch's last one is complete.
        flush(batch[batch.len() - 1].0, &mut feats)?;
    }
    flush(rows.len(), &mut feats)
}
