//! The on-disk layout that `vdg prep` writes and everything else reads.
//!
//! A prepared folder holds:
//! - `frames-NNNNN.parquet`: columns `video_id`, `frame_index`, `source_frame`, `time_secs`,
//!   `image` (JPEG bytes). Each video is one contiguous run of rows in plan order and starts
//!   a new row group (long videos span several row groups of at most
//!   [`DEFAULT_MAX_ROW_GROUP_BYTES`]). The image column is uncompressed, without dictionary
//!   or statistics. The footer's key-value metadata `vdg.shard` holds a [`ShardMeta`] (the
//!   video records the shard covers), so a shard describes itself and resume needs nothing
//!   else.
//! - `videos.parquet`: one [`VideoRow`] per planned video, failed ones included.
//! - `prep.json`: tool version, manifest, options, counts, shard list and fingerprints.
//!
//! Both Parquet files carry `vdg.schema_version` in their Arrow schema metadata.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int64Builder, StringBuilder, UInt32Builder};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, FixedSizeListArray, Float32Array, Float64Array,
    Int32Array, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use crate::atomic::{AtomicFile, Committed, HashingWriter};
use crate::error::{Error, Result};

/// Version of the shard and videos-table layout; bumped on any incompatible change.
pub const SHARD_SCHEMA_VERSION: u32 = 3;
/// Name of the videos table in a prepared folder.
pub const VIDEOS_FILE: &str = "videos.parquet";
/// Name of the summary written last by prep.
pub const PREP_FILE: &str = "prep.json";
/// Key of the [`ShardMeta`] JSON in a frame shard's footer.
pub const SHARD_META_KEY: &str = "vdg.shard";
/// Row groups of a long video are cut at this many buffered bytes.
pub const DEFAULT_MAX_ROW_GROUP_BYTES: usize = 64 << 20;
/// Frames per Arrow batch handed to the Parquet writer (also the data-page row limit).
const FRAMES_PER_BATCH: usize = 16;

/// File name of frame shard `index`.
pub fn frames_file_name(index: u32) -> String {
    format!("frames-{index:05}.parquet")
}

/// Parses `frames-NNNNN.parquet` back to its index.
pub fn parse_frames_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("frames-")?.strip_suffix(".parquet")?;
    if digits.len() == 5 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// `ok` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VideoStatus {
    /// Decoded and written.
    Ok,
    /// Could not be decoded; `error` says why and no frames were written.
    Failed,
}

impl VideoStatus {
    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            VideoStatus::Ok => "ok",
            VideoStatus::Failed => "failed",
        }
    }
}

/// One row of `videos.parquet`: a planned video, its labels and what decoding found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoRow {
    /// `<dataset>/<path relative to the dataset root>`; unique.
    pub video_id: String,
    /// Raw dataset (`ucf101`, `hmdb51`, ...).
    pub dataset: String,
    /// Path relative to the dataset root, `/`-separated.
    pub rel_path: String,
    /// Native class of the raw dataset (folder name).
    pub class_name: String,
    /// Benchmark label (0-based).
    pub label: u32,
    /// Benchmark class name.
    pub label_name: String,
    /// Benchmark domain.
    pub domain: String,
    /// Split group (clips of one group stay on one side), if the layout has one.
    pub group: Option<String>,
    /// `train` or `val` when this video's domain is the source.
    pub source_split: String,
    /// Size of the raw file in bytes.
    pub file_bytes: u64,
    /// First source frame of the clip, when the video is an annotated interval of a longer
    /// recording (PKU-MMD); `None` = the whole file.
    pub clip_start: Option<u64>,
    /// Last source frame of the clip (inclusive).
    pub clip_end: Option<u64>,
    /// `ok` or `failed`.
    pub status: VideoStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Something odd that did not fail it (decoder errors with all frames recovered, ...).
    pub warning: Option<String>,
    /// Frames written (after any `--max-fps` thinning).
    pub num_frames: u32,
    /// Frames decoded from the source.
    pub decoded_frames: u32,
    /// Frame count the container declares, when it declares one.
    pub declared_frames: Option<u64>,
    /// Frame rate of the stored frames.
    pub fps: Option<f64>,
    /// Frame rate of the source stream.
    pub source_fps: Option<f64>,
    /// Stored frame width in pixels.
    pub width: Option<u32>,
    /// Stored frame height in pixels.
    pub height: Option<u32>,
    /// Source width in pixels.
    pub source_width: Option<u32>,
    /// Source height in pixels.
    pub source_height: Option<u32>,
    /// Decoded duration: frames / source fps.
    pub duration_secs: Option<f64>,
    /// YUV to RGB matrix the frames were converted with (`bt601`, `bt709`, ...).
    #[serde(default)]
    pub colour_matrix: Option<String>,
    /// Range of the source's YUV: `limited` (16-235) or `full`.
    #[serde(default)]
    pub colour_range: Option<String>,
    /// The source did not tag its matrix; it was assumed from the height (BT.709 from 720
    /// lines up, BT.601 below).
    #[serde(default)]
    pub colour_assumed: Option<bool>,
    /// Sample (pixel) aspect ratio of the source; stored frames have square pixels.
    #[serde(default)]
    pub sample_aspect: Option<f64>,
    /// Clockwise rotation applied from the source's display matrix (0, 90, 180, 270).
    #[serde(default)]
    pub rotation: Option<u32>,
    /// Frame shard holding the frames.
    pub shard: Option<u32>,
    /// Row of the first frame within that shard.
    pub first_row: Option<u64>,
}

/// What a frame shard's footer says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// [`SHARD_SCHEMA_VERSION`] it was written with.
    pub schema_version: u32,
    /// Fingerprint of the prep plan (inputs, manifest, options, tool version).
    pub plan_fingerprint: String,
    /// Shard index.
    pub shard: u32,
    /// Position in the plan of its first video.
    pub first_position: u64,
    /// Every planned video from `first_position` on that this shard covers, failed ones too.
    pub videos: Vec<VideoRow>,
}

/// One stored frame.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedFrame {
    /// Index of the frame among all decoded frames of the source.
    pub source_frame: u32,
    /// Presentation time in seconds, if the stream has timestamps.
    pub time_secs: Option<f64>,
    /// JPEG bytes.
    pub jpeg: Vec<u8>,
}

pub(crate) fn schema_metadata(kind: &str) -> HashMap<String, String> {
    HashMap::from([
        (
            "vdg.schema_version".to_owned(),
            SHARD_SCHEMA_VERSION.to_string(),
        ),
        ("vdg.kind".to_owned(), kind.to_owned()),
    ])
}

/// The fields of the `image` struct: Hugging Face `datasets`' Image layout.
pub(crate) fn image_fields() -> arrow_schema::Fields {
    arrow_schema::Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// The `huggingface` schema metadata `datasets` reads to give the columns their features
/// (so `load_dataset("parquet", ...)` yields decoded images, no cast).
pub const HF_FRAMES_FEATURES: &str = r#"{"info":{"features":{"video_id":{"dtype":"string","_type":"Value"},"frame_index":{"dtype":"int32","_type":"Value"},"source_frame":{"dtype":"int32","_type":"Value"},"time_secs":{"dtype":"float64","_type":"Value"},"image":{"_type":"Image"}}}}"#;

/// Arrow schema of frame shards (version 3): the JPEG in `image.bytes`, a struct of
/// `bytes` and `path` as Hugging Face `datasets` stores images. Versions 1 and 2 stored it
/// as a plain binary `image` column; readers take both.
pub fn frames_schema() -> SchemaRef {
    let mut meta = schema_metadata("frames");
    meta.insert("huggingface".to_owned(), HF_FRAMES_FEATURES.to_owned());
    Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("video_id", DataType::Utf8, false),
            Field::new("frame_index", DataType::Int32, false),
            Field::new("source_frame", DataType::Int32, false),
            Field::new("time_secs", DataType::Float64, true),
            // Nullable as `datasets` declares it (it matches fields exactly, nullability
            // included, before it applies the `huggingface` features); never null here.
            Field::new("image", DataType::Struct(image_fields()), true),
        ],
        meta,
    ))
}

/// An `image` column of `n` JPEGs in the `{bytes, path}` layout (paths null).
pub(crate) fn image_array(bytes: BinaryArray) -> arrow_array::StructArray {
    let n = bytes.len();
    arrow_array::StructArray::new(
        image_fields(),
        vec![
            Arc::new(bytes) as ArrayRef,
            Arc::new(StringArray::new_null(n)) as ArrayRef,
        ],
        None,
    )
}

/// The JPEG bytes column of a frame batch: `image.bytes` (version 3) or `image` (1, 2).
pub fn image_bytes<'a>(path: &Path, batch: &'a RecordBatch) -> Result<&'a BinaryArray> {
    let col = batch
        .column_by_name("image")
        .ok_or_else(|| Error::bad_shard(path, "no image column"))?;
    if let Some(b) = col.as_any().downcast_ref::<BinaryArray>() {
        return Ok(b);
    }
    col.as_any()
        .downcast_ref::<arrow_array::StructArray>()
        .and_then(|s| s.column_by_name("bytes"))
        .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
        .ok_or_else(|| Error::bad_shard(path, "image column is neither binary nor {bytes, path}"))
}

/// Arrow schema of `videos.parquet`.
pub fn videos_schema() -> SchemaRef {
    use DataType::*;
    let f = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
    Arc::new(Schema::new_with_metadata(
        vec![
            f("video_id", Utf8, false),
            f("dataset", Utf8, false),
            f("rel_path", Utf8, false),
            f("class_name", Utf8, false),
            f("label", UInt32, false),
            f("label_name", Utf8, false),
            f("domain", Utf8, false),
            f("group", Utf8, true),
            f("source_split", Utf8, false),
            f("file_bytes", Int64, false),
            f("clip_start", Int64, true),
            f("clip_end", Int64, true),
            f("status", Utf8, false),
            f("error", Utf8, true),
            f("warning", Utf8, true),
            f("num_frames", UInt32, false),
            f("decoded_frames", UInt32, false),
            f("declared_frames", Int64, true),
            f("fps", Float64, true),
            f("source_fps", Float64, true),
            f("width", UInt32, true),
            f("height", UInt32, true),
            f("source_width", UInt32, true),
            f("source_height", UInt32, true),
            f("duration_secs", Float64, true),
            f("colour_matrix", Utf8, true),
            f("colour_range", Utf8, true),
            f("colour_assumed", Boolean, true),
            f("sample_aspect", Float64, true),
            f("rotation", UInt32, true),
            f("shard", UInt32, true),
            f("first_row", Int64, true),
        ],
        schema_metadata("videos"),
    ))
}

fn writer_properties(blob_column: Option<&str>) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::UNCOMPRESSED)
        .set_max_row_group_row_count(None)
        .set_max_row_group_bytes(None)
        .set_write_batch_size(FRAMES_PER_BATCH)
        .set_data_page_row_count_limit(FRAMES_PER_BATCH);
    if let Some(col) = blob_column {
        let path = ColumnPath::new(col.split('.').map(str::to_owned).collect());
        b = b
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    b.build()
}

/// Summary of a written frame shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name within the prepared folder.
    pub file: String,
    /// Videos covered (failed ones included).
    pub videos: u64,
    /// Frame rows.
    pub frames: u64,
    /// File size.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: String,
}

impl ShardInfo {
    /// The record of a `videos.parquet` just written with [`write_videos_table`].
    pub fn videos_table(rows: &[VideoRow], committed: Committed) -> Self {
        ShardInfo {
            file: VIDEOS_FILE.to_owned(),
            videos: rows.len() as u64,
            frames: rows.iter().map(|r| u64::from(r.num_frames)).sum(),
            bytes: committed.bytes,
            sha256: committed.sha256,
        }
    }
}

/// A shard file being written: Parquet into a temporary name, renamed on [`Self::finish`].
struct ShardFile {
    file: AtomicFile,
    writer: ArrowWriter<HashingWriter>,
    schema: SchemaRef,
    rows: u64,
    max_row_group_bytes: usize,
}

impl ShardFile {
    fn create(
        path: &Path,
        schema: SchemaRef,
        blob: &str,
        max_row_group_bytes: usize,
    ) -> Result<Self> {
        let mut file = AtomicFile::create(path)?;
        let writer = ArrowWriter::try_new(
            file.take_writer(),
            schema.clone(),
            Some(writer_properties(Some(blob))),
        )
        .map_err(|e| Error::parquet(file.tmp(), e))?;
        Ok(ShardFile {
            file,
            writer,
            schema,
            rows: 0,
            max_row_group_bytes,
        })
    }

    fn write(&mut self, cols: Vec<ArrayRef>) -> Result<()> {
        let tmp = self.file.tmp().to_owned();
        let batch =
            RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| Error::arrow(&tmp, e))?;
        self.writer
            .write(&batch)
            .map_err(|e| Error::parquet(&tmp, e))?;
        if self.writer.in_progress_size() >= self.max_row_group_bytes {
            self.writer.flush().map_err(|e| Error::parquet(&tmp, e))?;
        }
        Ok(())
    }

    /// Closes the row group of a video of `rows` rows; returns its first row.
    fn end_video(&mut self, rows: usize) -> Result<u64> {
        let tmp = self.file.tmp().to_owned();
        self.writer.flush().map_err(|e| Error::parquet(&tmp, e))?;
        let first = self.rows;
        self.rows += rows as u64;
        Ok(first)
    }

    fn bytes(&self) -> u64 {
        (self.writer.bytes_written() + self.writer.in_progress_size()) as u64
    }

    fn finish(mut self, meta: &ShardMeta) -> Result<ShardInfo> {
        let tmp = self.file.tmp().to_owned();
        let json = serde_json::to_string(meta).map_err(|e| Error::Json {
            path: tmp.clone(),
            source: e,
        })?;
        self.writer
            .append_key_value_metadata(KeyValue::new(SHARD_META_KEY.to_owned(), json));
        let inner = self
            .writer
            .into_inner()
            .map_err(|e| Error::parquet(&tmp, e))?;
        let Committed {
            path,
            bytes,
            sha256,
        } = self.file.commit(inner)?;
        Ok(ShardInfo {
            file: file_name(&path),
            videos: meta.videos.len() as u64,
            frames: self.rows,
            bytes,
            sha256,
        })
    }
}

/// Writes one frame shard; the file appears under its final name only after [`Self::finish`].
pub struct FrameShardWriter {
    inner: ShardFile,
    index: u32,
}

impl FrameShardWriter {
    /// Starts `dir/frames-<index>.parquet`.
    pub fn create(dir: &Path, index: u32, max_row_group_bytes: usize) -> Result<Self> {
        let path = dir.join(frames_file_name(index));
        Ok(FrameShardWriter {
            inner: ShardFile::create(&path, frames_schema(), "image.bytes", max_row_group_bytes)?,
            index,
        })
    }

    /// Shard index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.inner.rows
    }

    /// Bytes written or buffered so far.
    pub fn bytes(&self) -> u64 {
        self.inner.bytes()
    }

    /// Appends one video's frames as a run of rows starting a new row group; returns the row
    /// of its first frame.
    pub fn write_video(&mut self, video_id: &str, frames: &[EncodedFrame]) -> Result<u64> {
        self.write_video_iter(video_id, frames.iter().cloned().map(Ok))
    }

    /// [`Self::write_video`] from an iterator, holding at most one batch of frames at a
    /// time (a long video streamed from a spill file); the bytes written are the same. An
    /// error from the iterator stops the write and is returned (the shard is then unusable).
    pub fn write_video_iter(
        &mut self,
        video_id: &str,
        frames: impl Iterator<Item = Result<EncodedFrame>>,
    ) -> Result<u64> {
        let mut total = 0usize;
        let mut chunk: Vec<EncodedFrame> = Vec::with_capacity(FRAMES_PER_BATCH);
        let mut frames = frames.peekable();
        while frames.peek().is_some() {
            chunk.clear();
            for f in frames.by_ref().take(FRAMES_PER_BATCH) {
                chunk.push(f?);
            }
            let n = chunk.len();
            let base = total as i32;
            total += n;
            let chunk = &chunk;
            let ids = StringArray::from(vec![video_id; n]);
            let idx = Int32Array::from_iter_values((0..n as i32).map(|i| base + i));
            let src = Int32Array::from_iter_values(chunk.iter().map(|f| f.source_frame as i32));
            let t = Float64Array::from_iter(chunk.iter().map(|f| f.time_secs));
            let img = image_array(BinaryArray::from_iter_values(
                chunk.iter().map(|f| f.jpeg.as_slice()),
            ));
            self.inner.write(vec![
                Arc::new(ids),
                Arc::new(idx),
                Arc::new(src),
                Arc::new(t),
                Arc::new(img),
            ])?;
        }
        self.inner.end_video(total)
    }

    /// Writes the footer with `meta`, syncs and renames the shard into place.
    pub fn finish(self, meta: &ShardMeta) -> Result<ShardInfo> {
        self.inner.finish(meta)
    }
}

/// File name of feature shard `index`: `features-00000.parquet`.
pub fn features_file_name(index: u32) -> String {
    format!("features-{index:05}.parquet")
}

/// Arrow schema of feature shards (`vdg features`): `video_id`, `frame_index` (within the
/// cached frames of the video), `source_frame` (index among the prepared frames), `feature`
/// (`FixedSizeList<Float32>` of width `dim`).
pub fn features_schema(dim: usize) -> SchemaRef {
    Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("video_id", DataType::Utf8, false),
            Field::new("frame_index", DataType::Int32, false),
            Field::new("source_frame", DataType::Int32, false),
            Field::new(
                "feature",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float32, false)),
                    dim as i32,
                ),
                false,
            ),
        ],
        schema_metadata("features"),
    ))
}

/// Writes one feature shard; like [`FrameShardWriter`] (one row group per video, footer
/// metadata, atomic rename) with a feature column instead of JPEG bytes.
pub struct FeatureShardWriter {
    inner: ShardFile,
    dim: usize,
}

impl FeatureShardWriter {
    /// Starts `dir/features-<index>.parquet` for features of width `dim`.
    pub fn create(dir: &Path, index: u32, dim: usize) -> Result<Self> {
        let path = dir.join(features_file_name(index));
        Ok(FeatureShardWriter {
            inner: ShardFile::create(
                &path,
                features_schema(dim),
                "feature.list.item",
                DEFAULT_MAX_ROW_GROUP_BYTES,
            )?,
            dim,
        })
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.inner.rows
    }

    /// Bytes written or buffered so far.
    pub fn bytes(&self) -> u64 {
        self.inner.bytes()
    }

    /// Appends one video's features (`source_frames[i]` and `features[i * dim..]` per row) as
    /// a new row group; returns the row of its first feature.
    pub fn write_video(
        &mut self,
        video_id: &str,
        source_frames: &[u32],
        features: &[f32],
    ) -> Result<u64> {
        let n = source_frames.len();
        if features.len() != n * self.dim {
            return Err(Error::bad_shard(
                self.inner.file.tmp(),
                format!(
                    "{video_id}: {} values for {n} features of width {}",
                    features.len(),
                    self.dim
                ),
            ));
        }
        let ids = StringArray::from(vec![video_id; n]);
        let idx = Int32Array::from_iter_values(0..n as i32);
        let src = Int32Array::from_iter_values(source_frames.iter().map(|&f| f as i32));
        let values = Arc::new(Float32Array::from(features.to_vec()));
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let list = FixedSizeListArray::try_new(item, self.dim as i32, values, None)
            .map_err(|e| Error::arrow(self.inner.file.tmp(), e))?;
        self.inner.write(vec![
            Arc::new(ids),
            Arc::new(idx),
            Arc::new(src),
            Arc::new(list),
        ])?;
        self.inner.end_video(n)
    }

    /// Writes the footer with `meta`, syncs and renames the shard into place.
    pub fn finish(self, meta: &ShardMeta) -> Result<ShardInfo> {
        self.inner.finish(meta)
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads the [`ShardMeta`] from a frame shard's footer (cheap: footer only).
pub fn read_shard_meta(path: &Path) -> Result<ShardMeta> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = ArrowReaderMetadata::load(&file, Default::default())
        .map_err(|e| Error::parquet(path, e))?;
    let kv = meta
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == SHARD_META_KEY))
        .and_then(|k| k.value.clone())
        .ok_or_else(|| Error::bad_shard(path, format!("no {SHARD_META_KEY} footer metadata")))?;
    let m: ShardMeta = serde_json::from_str(&kv).map_err(|e| Error::Json {
        path: path.to_owned(),
        source: e,
    })?;
    if m.schema_version != SHARD_SCHEMA_VERSION {
        return Err(Error::bad_shard(
            path,
            format!(
                "schema version {} (this build reads {SHARD_SCHEMA_VERSION})",
                m.schema_version
            ),
        ));
    }
    Ok(m)
}

/// Writes `videos.parquet` atomically.
pub fn write_videos_table(path: &Path, rows: &[VideoRow]) -> Result<Committed> {
    let schema = videos_schema();
    let s = |f: &dyn Fn(&VideoRow) -> &str| {
        let mut b = StringBuilder::new();
        rows.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish()) as ArrayRef
    };
    let video_id = s(&|r| &r.video_id);
    let dataset = s(&|r| &r.dataset);
    let rel_path = s(&|r| &r.rel_path);
    let class_name = s(&|r| &r.class_name);
    let label_name = s(&|r| &r.label_name);
    let domain = s(&|r| &r.domain);
    let source_split = s(&|r| &r.source_split);
    let status = s(&|r| r.status.as_str());
    let opt_s = |f: &dyn Fn(&VideoRow) -> Option<&str>| {
        let mut b = StringBuilder::new();
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish()) as ArrayRef
    };
    let u32c = |f: &dyn Fn(&VideoRow) -> Option<u32>| {
        let mut b = UInt32Builder::new();
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish()) as ArrayRef
    };
    let i64c = |f: &dyn Fn(&VideoRow) -> Option<i64>| {
        let mut b = Int64Builder::new();
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish()) as ArrayRef
    };
    let f64c = |f: &dyn Fn(&VideoRow) -> Option<f64>| {
        let mut b = Float64Builder::new();
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish()) as ArrayRef
    };
    let cols: Vec<ArrayRef> = vec![
        video_id,
        dataset,
        rel_path,
        class_name,
        u32c(&|r| Some(r.label)),
        label_name,
        domain,
        opt_s(&|r| r.group.as_deref()),
        source_split,
        i64c(&|r| Some(r.file_bytes as i64)),
        i64c(&|r| r.clip_start.map(|v| v as i64)),
        i64c(&|r| r.clip_end.map(|v| v as i64)),
        status,
        opt_s(&|r| r.error.as_deref()),
        opt_s(&|r| r.warning.as_deref()),
        u32c(&|r| Some(r.num_frames)),
        u32c(&|r| Some(r.decoded_frames)),
        i64c(&|r| r.declared_frames.map(|v| v as i64)),
        f64c(&|r| r.fps),
        f64c(&|r| r.source_fps),
        u32c(&|r| r.width),
        u32c(&|r| r.height),
        u32c(&|r| r.source_width),
        u32c(&|r| r.source_height),
        f64c(&|r| r.duration_secs),
        opt_s(&|r| r.colour_matrix.as_deref()),
        opt_s(&|r| r.colour_range.as_deref()),
        Arc::new(
            rows.iter()
                .map(|r| r.colour_assumed)
                .collect::<BooleanArray>(),
        ) as ArrayRef,
        f64c(&|r| r.sample_aspect),
        u32c(&|r| r.rotation),
        u32c(&|r| r.shard),
        i64c(&|r| r.first_row.map(|v| v as i64)),
    ];
    let mut file = AtomicFile::create(path)?;
    let tmp = file.tmp().to_owned();
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::arrow(&tmp, e))?;
    let mut w = ArrowWriter::try_new(file.take_writer(), schema, Some(writer_properties(None)))
        .map_err(|e| Error::parquet(&tmp, e))?;
    w.write(&batch).map_err(|e| Error::parquet(&tmp, e))?;
    let inner = w.into_inner().map_err(|e| Error::parquet(&tmp, e))?;
    file.commit(inner)
}

fn column<'a, T: 'static>(path: &Path, batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::bad_shard(path, format!("missing or mistyped column {name:?}")))
}

fn opt<A: Array, T>(a: &A, i: usize, get: impl Fn(&A, usize) -> T) -> Option<T> {
    if a.is_null(i) { None } else { Some(get(a, i)) }
}

/// Reads `videos.parquet` back into rows, selecting columns by name.
pub fn read_videos_table(path: &Path) -> Result<Vec<VideoRow>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::parquet(path, e))?
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| Error::arrow(path, e))?;
        let s = |n: &str| column::<StringArray>(path, &b, n);
        let u = |n: &str| column::<UInt32Array>(path, &b, n);
        let l = |n: &str| column::<Int64Array>(path, &b, n);
        let f = |n: &str| column::<Float64Array>(path, &b, n);
        let (video_id, dataset, rel_path, class_name) = (
            s("video_id")?,
            s("dataset")?,
            s("rel_path")?,
            s("class_name")?,
        );
        let (label_name, domain, group, source_split) = (
            s("label_name")?,
            s("domain")?,
            s("group")?,
            s("source_split")?,
        );
        let (status, error, warning) = (s("status")?, s("error")?, s("warning")?);
        let (label, num_frames, decoded_frames) =
            (u("label")?, u("num_frames")?, u("decoded_frames")?);
        let (width, height, sw, sh, shard) = (
            u("width")?,
            u("height")?,
            u("source_width")?,
            u("source_height")?,
            u("shard")?,
        );
        let (file_bytes, declared, first_row) =
            (l("file_bytes")?, l("declared_frames")?, l("first_row")?);
        let (fps, sfps, dur) = (f("fps")?, f("source_fps")?, f("duration_secs")?);
        let (clip_start, clip_end) = (l("clip_start")?, l("clip_end")?);
        // Columns added in version 2: absent from version-1 tables, read as nulls.
        let optional = |n: &str| b.column_by_name(n).is_some();
        let matrix = optional("colour_matrix")
            .then(|| s("colour_matrix"))
            .transpose()?;
        let range = optional("colour_range")
            .then(|| s("colour_range"))
            .transpose()?;
        let rotation = optional("rotation").then(|| u("rotation")).transpose()?;
        let assumed = optional("colour_assumed")
            .then(|| column::<BooleanArray>(path, &b, "colour_assumed"))
            .transpose()?;
        let sar = optional("sample_aspect")
            .then(|| f("sample_aspect"))
            .transpose()?;
        for i in 0..b.num_rows() {
            let os = |a: &StringArray| opt(a, i, |a, i| a.value(i).to_owned());
            rows.push(VideoRow {
                video_id: video_id.value(i).to_owned(),
                dataset: dataset.value(i).to_owned(),
                rel_path: rel_path.value(i).to_owned(),
                class_name: class_name.value(i).to_owned(),
                label: label.value(i),
                label_name: label_name.value(i).to_owned(),
                domain: domain.value(i).to_owned(),
                group: os(group),
                source_split: source_split.value(i).to_owned(),
                file_bytes: file_bytes.value(i) as u64,
                clip_start: opt(clip_start, i, |a, i| a.value(i) as u64),
                clip_end: opt(clip_end, i, |a, i| a.value(i) as u64),
                status: match status.value(i) {
                    "ok" => VideoStatus::Ok,
                    "failed" => VideoStatus::Failed,
                    other => {
                        return Err(Error::bad_shard(path, format!("unknown status {other:?}")));
                    }
                },
                error: os(error),
                warning: os(warning),
                num_frames: num_frames.value(i),
                decoded_frames: decoded_frames.value(i),
                declared_frames: opt(declared, i, |a, i| a.value(i) as u64),
                fps: opt(fps, i, |a, i| a.value(i)),
                source_fps: opt(sfps, i, |a, i| a.value(i)),
                width: opt(width, i, |a, i| a.value(i)),
                height: opt(height, i, |a, i| a.value(i)),
                source_width: opt(sw, i, |a, i| a.value(i)),
                source_height: opt(sh, i, |a, i| a.value(i)),
                duration_secs: opt(dur, i, |a, i| a.value(i)),
                colour_matrix: matrix.and_then(os),
                colour_range: range.and_then(os),
                colour_assumed: assumed.and_then(|a| opt(a, i, |a, i| a.value(i))),
                sample_aspect: sar.and_then(|a| opt(a, i, |a, i| a.value(i))),
                rotation: rotation.and_then(|a| opt(a, i, |a, i| a.value(i))),
                shard: opt(shard, i, |a, i| a.value(i)),
                first_row: opt(first_row, i, |a, i| a.value(i) as u64),
            });
        }
    }
    Ok(rows)
}

/// Reads the frames of one video from a shard, using its row group boundaries.
///
/// `row` is the video's [`VideoRow::first_row`] and `count` its [`VideoRow::num_frames`].
pub fn read_video_frames(path: &Path, row: u64, count: u32) -> Result<Vec<EncodedFrame>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    // Select the row groups that overlap [row, row + count).
    let mut groups = Vec::new();
    let mut start = 0u64;
    let mut skip = 0u64;
    for (g, rg) in builder.metadata().row_groups().iter().enumerate() {
        let n = rg.num_rows() as u64;
        if start + n > row && start < row + count as u64 {
            if groups.is_empty() {
                skip = row - start;
            }
            groups.push(g);
        }
        start += n;
    }
    let reader = builder
        .with_row_groups(groups)
        .with_offset(skip as usize)
        .with_limit(count as usize)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    let mut out = Vec::with_capacity(count as usize);
    for batch in reader {
        let b = batch.map_err(|e| Error::arrow(path, e))?;
        let src = column::<Int32Array>(path, &b, "source_frame")?;
        let t = column::<Float64Array>(path, &b, "time_secs")?;
        let img = image_bytes(path, &b)?;
        for i in 0..b.num_rows() {
            out.push(EncodedFrame {
                source_frame: src.value(i) as u32,
                time_secs: opt(t, i, |a, i| a.value(i)),
                jpeg: img.value(i).to_vec(),
            });
        }
    }
    if out.len() != count as usize {
        return Err(Error::bad_shard(
            path,
            format!("expected {count} frames from row {row}, read {}", out.len()),
        ));
    }
    Ok(out)
}

/// Reads the JPEG bytes of chosen frames of one video: `indices` are frame indices within
/// the video (0-based, any order, repeats allowed), `first_row` its [`VideoRow::first_row`].
/// Only the row groups and pages holding those rows are read.
pub fn read_frames_at(path: &Path, first_row: u64, indices: &[u32]) -> Result<Vec<Vec<u8>>> {
    read_rows_at(path, first_row, indices, "image", &|b, out| {
        let img = image_bytes(path, b)?;
        out.extend((0..b.num_rows()).map(|i| img.value(i).to_vec()));
        Ok(())
    })
}

/// Reads the cached features of chosen frames of one video from a feature shard, like
/// [`read_frames_at`].
pub fn read_features_at(path: &Path, first_row: u64, indices: &[u32]) -> Result<Vec<Vec<f32>>> {
    read_rows_at(path, first_row, indices, "feature", &|b, out| {
        let list = column::<FixedSizeListArray>(path, b, "feature")?;
        let values = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| Error::bad_shard(path, "feature values are not Float32"))?;
        let d = list.value_length() as usize;
        out.extend((0..b.num_rows()).map(|i| {
            let off = list.value_offset_at(i);
            values.values()[off..off + d].to_vec()
        }));
        Ok(())
    })
}

type Extract<'a, T> = &'a dyn Fn(&RecordBatch, &mut Vec<T>) -> Result<()>;

/// Shards whose parsed footers [`cached_metadata`] keeps (a training run reads a few at a
/// time; an SSv2 shard's footer, ~1,000 row groups, is about a megabyte).
const METADATA_CACHE_SHARDS: usize = 32;

/// The parsed footer (with the page index) of the shard at `path`, parsed once per process
/// and kept while the file keeps its size and modification time. The loader reads a few
/// frames of one video per sample; parsing the whole footer each time was most of its cost.
fn cached_metadata(path: &Path, file: &File) -> Result<ArrowReaderMetadata> {
    use std::sync::{Mutex, OnceLock};
    type Entry = (
        PathBuf,
        u64,
        Option<std::time::SystemTime>,
        ArrowReaderMetadata,
    );
    static CACHE: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    let stat = file.metadata().map_err(|e| Error::io(path, e))?;
    let (len, mtime) = (stat.len(), stat.modified().ok());
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    if let Ok(mut c) = cache.lock()
        && let Some(k) = c
            .iter()
            .position(|e| e.0 == path && e.1 == len && e.2 == mtime)
    {
        // Most recently used last.
        let e = c.remove(k);
        let meta = e.3.clone();
        c.push(e);
        return Ok(meta);
    }
    // The offset index lets a read of 5 frames skip the pages of the others.
    let options = parquet::arrow::arrow_reader::ArrowReaderOptions::new()
        .with_offset_index_policy(parquet::file::metadata::PageIndexPolicy::Optional);
    let meta = ArrowReaderMetadata::load(file, options).map_err(|e| Error::parquet(path, e))?;
    if let Ok(mut c) = cache.lock() {
        c.retain(|e| e.0 != path);
        if c.len() >= METADATA_CACHE_SHARDS {
            c.remove(0);
        }
        c.push((path.to_owned(), len, mtime, meta.clone()));
    }
    Ok(meta)
}

/// Rows `first_row + indices[i]` of `column`, in the order of `indices`; only the row groups
/// and pages holding them are read.
fn read_rows_at<T: Clone>(
    path: &Path,
    first_row: u64,
    indices: &[u32],
    column_name: &str,
    extract: Extract<'_, T>,
) -> Result<Vec<T>> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
    if indices.is_empty() {
        return Ok(Vec::new());
    }
    let mut wanted: Vec<u64> = indices.iter().map(|&i| first_row + u64::from(i)).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = cached_metadata(path, &file)?;
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta);
    // Row groups overlapping the wanted rows, and the selection relative to them.
    let mut groups = Vec::new();
    let mut selectors = Vec::new();
    let mut start = 0u64;
    for (g, rg) in builder.metadata().row_groups().iter().enumerate() {
        let n = rg.num_rows() as u64;
        let inside: Vec<u64> = wanted
            .iter()
            .copied()
            .filter(|r| *r >= start && *r < start + n)
            .collect();
        if !inside.is_empty() {
            groups.push(g);
            let mut pos = start;
            for r in inside {
                if r > pos {
                    selectors.push(RowSelector::skip((r - pos) as usize));
                }
                selectors.push(RowSelector::select(1));
                pos = r + 1;
            }
            if start + n > pos {
                selectors.push(RowSelector::skip((start + n - pos) as usize));
            }
        }
        start += n;
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), [column_name]);
    let reader = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_row_selection(RowSelection::from(selectors))
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    let mut got: Vec<T> = Vec::with_capacity(wanted.len());
    for batch in reader {
        let b = batch.map_err(|e| Error::arrow(path, e))?;
        extract(&b, &mut got)?;
    }
    if got.len() != wanted.len() {
        return Err(Error::bad_shard(
            path,
            format!("asked for {} rows, read {}", wanted.len(), got.len()),
        ));
    }
    indices
        .iter()
        .map(|&i| {
            let row = first_row + u64::from(i);
            let k = wanted
                .binary_search(&row)
                .map_err(|_| Error::bad_shard(path, "row lookup"))?;
            Ok(got[k].clone())
        })
        .collect()
}

/// Path of frame shard `index` in `dir`.
pub fn frames_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(frames_file_name(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: VideoStatus) -> VideoRow {
        VideoRow {
            video_id: id.into(),
            dataset: "ucf101".into(),
            rel_path: "A/a.avi".into(),
            class_name: "A".into(),
            label: 3,
            label_name: "a".into(),
            domain: "ucf".into(),
            group: Some("A/g01".into()),
            source_split: "train".into(),
            file_bytes: 1234,
            clip_start: Some(5),
            clip_end: None,
            status,
            error: (status == VideoStatus::Failed).then(|| "boom".into()),
            warning: None,
            num_frames: 3,
            decoded_frames: 3,
            declared_frames: Some(3),
            fps: Some(25.0),
            source_fps: Some(25.0),
            width: Some(4),
            height: Some(2),
            source_width: None,
            source_height: Some(240),
            duration_secs: Some(0.12),
            colour_matrix: Some("bt601".into()),
            colour_range: Some("limited".into()),
            colour_assumed: Some(true),
            sample_aspect: Some(1.0),
            rotation: Some(0),
            shard: Some(0),
            first_row: Some(0),
        }
    }

    #[test]
    fn videos_table_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(VIDEOS_FILE);
        let rows = vec![
            row("ucf101/A/a.avi", VideoStatus::Ok),
            row("x", VideoStatus::Failed),
        ];
        write_videos_table(&p, &rows).unwrap();
        assert_eq!(read_videos_table(&p).unwrap(), rows);
    }

    #[test]
    fn shard_round_trips_videos_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let frames = |n: u32, tag: u8| -> Vec<EncodedFrame> {
            (0..n)
                .map(|i| EncodedFrame {
                    source_frame: i * 2,
                    time_secs: Some(i as f64 / 10.0),
                    jpeg: vec![tag; 10 + i as usize],
                })
                .collect()
        };
        // Tiny row-group cap: long videos span several row groups.
        let mut w = FrameShardWriter::create(dir.path(), 7, 100).unwrap();
        let a = frames(40, 1);
        let b = frames(5, 2);
        assert_eq!(w.write_video("a", &a).unwrap(), 0);
        assert_eq!(w.write_video("b", &b).unwrap(), 40);
        let meta = ShardMeta {
            schema_version: SHARD_SCHEMA_VERSION,
            plan_fingerprint: "fp".into(),
            shard: 7,
            first_position: 12,
            videos: vec![row("a", VideoStatus::Ok)],
        };
        let info = w.finish(&meta).unwrap();
        assert_eq!(info.file, "frames-00007.parquet");
        assert_eq!(info.frames, 45);
        let p = frames_path(dir.path(), 7);
        assert_eq!(read_shard_meta(&p).unwrap(), meta);
        assert_eq!(read_video_frames(&p, 0, 40).unwrap(), a);
        assert_eq!(read_video_frames(&p, 40, 5).unwrap(), b);
        // Chosen frames, any order, across row groups.
        let picked = read_frames_at(&p, 0, &[39, 0, 17, 17]).unwrap();
        assert_eq!(
            picked,
            vec![
                a[39].jpeg.clone(),
                a[0].jpeg.clone(),
                a[17].jpeg.clone(),
                a[17].jpeg.clone()
            ]
        );
        assert_eq!(
            read_frames_at(&p, 40, &[4, 1]).unwrap(),
            vec![b[4].jpeg.clone(), b[1].jpeg.clone()]
        );
        // Row groups never mix videos.
        let file = File::open(&p).unwrap();
        let md = ArrowReaderMetadata::load(&file, Default::default()).unwrap();
        let sizes: Vec<i64> = md
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert!(sizes.len() > 2, "{sizes:?}");
        assert_eq!(*sizes.last().unwrap(), 5);
        assert_eq!(sizes.iter().sum::<i64>(), 45);
    }

    #[test]
    fn frames_file_names_round_trip() {
        assert_eq!(parse_frames_file_name(&frames_file_name(42)), Some(42));
        assert_eq!(parse_frames_file_name("frames-1.parquet"), None);
        assert_eq!(parse_frames_file_name("frames-00001.parquet.tmp"), None);
    }

    /// Folders prepared by version 1 (a binary `image` column; a videos table without the
    /// colour and geometry columns) still read.
    #[test]
    fn version_1_shards_and_tables_still_read() {
        let d = tempfile::tempdir().unwrap();
        // A frame shard as version 1 wrote it.
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("video_id", DataType::Utf8, false),
                Field::new("frame_index", DataType::Int32, false),
                Field::new("source_frame", DataType::Int32, false),
                Field::new("time_secs", DataType::Float64, true),
                Field::new("image", DataType::Binary, false),
            ],
            schema_metadata("frames"),
        ));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["v", "v", "v"])),
                Arc::new(Int32Array::from(vec![0, 1, 2])),
                Arc::new(Int32Array::from(vec![0, 2, 4])),
                Arc::new(Float64Array::from(vec![Some(0.0), None, Some(0.16)])),
                Arc::new(BinaryArray::from_iter_values([
                    b"a".as_slice(),
                    b"bb",
                    b"ccc",
                ])),
            ],
        )
        .unwrap();
        let p = d.path().join("frames-00000.parquet");
        let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let frames = read_video_frames(&p, 0, 3).unwrap();
        assert_eq!(frames[2].jpeg, b"ccc");
        assert_eq!(frames[1].time_secs, None);
        assert_eq!(
            read_frames_at(&p, 0, &[2, 0]).unwrap(),
            [b"ccc".to_vec(), b"a".to_vec()]
        );

        // A videos table without the version-2 columns.
        let full = d.path().join("full.parquet");
        write_videos_table(&full, &[row("a", VideoStatus::Ok)]).unwrap();
        let file = File::open(&full).unwrap();
        let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let old_cols = [
            "colour_matrix",
            "colour_range",
            "colour_assumed",
            "sample_aspect",
            "rotation",
        ];
        let b = &batches[0];
        let keep: Vec<usize> = (0..b.num_columns())
            .filter(|&c| !old_cols.contains(&b.schema().field(c).name().as_str()))
            .collect();
        let v1 = b.project(&keep).unwrap();
        let old = d.path().join("videos-v1.parquet");
        let mut w = ArrowWriter::try_new(File::create(&old).unwrap(), v1.schema(), None).unwrap();
        w.write(&v1).unwrap();
        w.close().unwrap();
        let rows = read_videos_table(&old).unwrap();
        assert_eq!(rows[0].video_id, "a");
        assert_eq!(
            (rows[0].colour_matrix.clone(), rows[0].rotation),
            (None, None)
        );
    }
}
