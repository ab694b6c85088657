//! Exports for the PyTorch code bases users already run: TSN/TRN/TSM-style and mmaction2
//! rawframe lists of a prepared folder, with its domains and source splits, and (on
//! request) the frames as JPEG folders those code bases read.
//!
//! Both formats are one line per video, `frame_dir num_frames label` (label 0-based); they
//! differ in where `frame_dir` points: mmaction2 joins it to its `data_prefix`, so it is
//! relative (`ucf101/Biking/v_Biking_g01_c01.avi`), while TSN-style loaders open it as
//! written, so it is the absolute folder under `--frames-dir`. Frames are
//! `img_00001.jpg`, `img_00002.jpg`, ... (1-based), mmaction2's and TSN's default template.
//! The JPEG bytes are copied from the shards, never re-encoded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::atomic::AtomicFile;
use crate::error::{Error, Result};
use crate::shard::{
    PREP_FILE, VIDEOS_FILE, frames_file_name, read_video_frames, read_videos_table,
};
use crate::{VideoRow, VideoStatus};

/// Which code base the lists are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// mmaction2's `RawframeDataset` (`frame_dir total_frames label`, `frame_dir` relative
    /// to `data_prefix`).
    Mmaction,
    /// TSN, TRN, TSM and VideoDG's `TSNDataSet` (`frame_dir num_frames label`, `frame_dir`
    /// as the loader opens it).
    Trn,
}

impl ListFormat {
    /// From its command-line name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "mmaction" | "mmaction2" => Some(ListFormat::Mmaction),
            "trn" | "tsn" | "tsm" => Some(ListFormat::Trn),
            _ => None,
        }
    }
}

/// `prep.json` of a prepared folder, as JSON.
fn read_prep_json(prep: &Path) -> Result<serde_json::Value> {
    let path = prep.join(PREP_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path, source: e })
}

/// The frame file name of 0-based frame `i` (`img_00001.jpg` for 0).
pub fn frame_file_name(i: usize) -> String {
    format!("img_{:05}.jpg", i + 1)
}

/// What [`export_lists`] wrote.
#[derive(Debug, Clone, Default)]
pub struct ListsSummary {
    /// List files written, with their line counts.
    pub lists: Vec<(PathBuf, usize)>,
    /// Videos whose frames were written as JPEG folders.
    pub frame_dirs: usize,
    /// Failed videos left out of every list.
    pub failed: usize,
}

/// Writes one list per domain and source split (`<benchmark>_<domain>_<split>.txt`) and one
/// per domain with all its videos (`<benchmark>_<domain>_all.txt`, for testing on it as a
/// target) into `out`, and, with `frames_dir`, every listed video's frames as
/// `<frames_dir>/<video_id>/img_NNNNN.jpg`. Failed videos are left out (and counted).
/// A frame folder that already holds the right number of frames is not written again.
pub fn export_lists(
    prep: &Path,
    format: ListFormat,
    out: &Path,
    frames_dir: Option<&Path>,
) -> Result<ListsSummary> {
    let record = read_prep_json(prep)?;
    let benchmark = record["benchmark"]
        .as_str()
        .unwrap_or("benchmark")
        .to_owned();
    let rows = read_videos_table(&prep.join(VIDEOS_FILE))?;
    let mut summary = ListsSummary {
        failed: rows
            .iter()
            .filter(|r| r.status == VideoStatus::Failed)
            .count(),
        ..ListsSummary::default()
    };
    let ok: Vec<&VideoRow> = rows
        .iter()
        .filter(|r| r.status == VideoStatus::Ok && r.num_frames > 0)
        .collect();
    if let Some(dir) = frames_dir {
        for r in &ok {
            write_frame_dir(prep, dir, r)?;
            summary.frame_dirs += 1;
        }
    }
    let frame_dir_of = |r: &VideoRow| -> String {
        match (format, frames_dir) {
            (ListFormat::Trn, Some(d)) => d.join(&r.video_id).display().to_string(),
            _ => r.video_id.clone(),
        }
    };
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &ok {
        let line = format!("{} {} {}", frame_dir_of(r), r.num_frames, r.label);
        lists
            .entry(format!("{benchmark}_{}_{}.txt", r.domain, r.source_split))
            .or_default()
            .push(line.clone());
        lists
            .entry(format!("{benchmark}_{}_all.txt", r.domain))
            .or_default()
            .push(line);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (name, lines) in lists {
        let path = out.join(&name);
        let mut text = lines.join("\n");
        text.push('\n');
        AtomicFile::write_all(&path, text.as_bytes())?;
        summary.lists.push((path, lines.len()));
    }
    Ok(summary)
}

fn write_frame_dir(prep: &Path, frames_dir: &Path, r: &VideoRow) -> Result<()> {
    let dir = frames_dir.join(&r.video_id);
    let n = r.num_frames as usize;
    if dir.join(frame_file_name(n - 1)).exists() && !dir.join(frame_file_name(n)).exists() {
        return Ok(());
    }
    let (Some(shard), Some(first)) = (r.shard, r.first_row) else {
        return Err(Error::bad_shard(
            prep.join(VIDEOS_FILE),
            format!("{}: an ok video without a shard position", r.video_id),
        ));
    };
    let frames = read_video_frames(&prep.join(frames_file_name(shard)), first, r.num_frames)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for (i, f) in frames.iter().enumerate() {
        // The last frame is written last, so a folder holding it is complete.
        AtomicFile::write_all(&dir.join(frame_file_name(i)), &f.jpeg)?;
    }
    Ok(())
}

/// What [`export_hf`] wrote.
#[derive(Debug, Clone, Default)]
pub struct HfSummary {
    /// Parquet files written, with their frame rows.
    pub files: Vec<(PathBuf, usize)>,
}

/// Rows a file of [`export_hf`] holds before the next one starts.
const HF_ROWS_PER_FILE: usize = 50_000;

/// A Hugging Face `datasets` folder of a prepared folder: one config per domain, a `train`
/// and a `validation` split each (the source splits; a target is tested on both), one row
/// per frame with `video_id`, `frame_index`, `label` (a `ClassLabel` with the benchmark's
/// class names), `domain` and `image` (an `Image`), and a `README.md` whose `configs`
/// header tells `load_dataset(<out>, "<domain>")` where each split is. Frames are copied
/// from the shards; failed videos are left out.
pub fn export_hf(prep: &Path, out: &Path) -> Result<HfSummary> {
    use std::sync::Arc;

    use arrow_array::{BinaryArray, Int32Array, Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;

    let record = read_prep_json(prep)?;
    let manifest = crate::Manifest::from_toml(
        record["manifest_toml"].as_str().unwrap_or_default(),
        &prep.join(PREP_FILE),
    )?;
    let names: Vec<String> = manifest.classes.iter().map(|c| c.name.clone()).collect();
    let features = serde_json::json!({"info": {"features": {
        "video_id": {"dtype": "string", "_type": "Value"},
        "frame_index": {"dtype": "int32", "_type": "Value"},
        "label": {"names": names, "_type": "ClassLabel"},
        "domain": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
    }}});
    let mut meta = crate::shard::schema_metadata("hf-export");
    meta.insert("huggingface".to_owned(), features.to_string());
    let schema = Arc::new(Schema::new_with_metadata(
        vec![
            Field::new("video_id", DataType::Utf8, true),
            Field::new("frame_index", DataType::Int32, true),
            Field::new("label", DataType::Int64, true),
            Field::new("domain", DataType::Utf8, true),
            Field::new(
                "image",
                DataType::Struct(crate::shard::image_fields()),
                true,
            ),
        ],
        meta,
    ));
    let rows = read_videos_table(&prep.join(VIDEOS_FILE))?;
    let mut groups: BTreeMap<(String, String), Vec<&VideoRow>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.status == VideoStatus::Ok && r.num_frames > 0)
    {
        let split = if r.source_split == "train" {
            "train"
        } else {
            "validation"
        };
        groups
            .entry((r.domain.clone(), split.to_owned()))
            .or_default()
            .push(r);
    }
    let mut summary = HfSummary::default();
    let mut card = String::from("---\nconfigs:\n");
    let mut last_domain = String::new();
    for ((domain, split), videos) in &groups {
        if *domain != last_domain {
            card.push_str(&format!("- config_name: {domain}\n  data_files:\n"));
            last_domain = domain.clone();
        }
        card.push_str(&format!(
            "  - split: {split}\n    path: {domain}/{split}-*.parquet\n"
        ));
        let dir = out.join(domain);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // One open file at a time; one batch per video; a new file every
        // HF_ROWS_PER_FILE rows. Row groups of 1,024 rows keep memory to about a video.
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(1024))
            .build();
        type Open = (
            PathBuf,
            AtomicFile,
            ArrowWriter<crate::atomic::HashingWriter>,
            usize,
        );
        let mut open: Option<Open> = None;
        let mut file_no = 0usize;
        let close = |o: Open, summary: &mut HfSummary| -> Result<()> {
            let (path, file, w, n) = o;
            let inner = w.into_inner().map_err(|e| Error::parquet(file.tmp(), e))?;
            file.commit(inner)?;
            summary.files.push((path, n));
            Ok(())
        };
        for r in videos {
            let (Some(shard), Some(first)) = (r.shard, r.first_row) else {
                continue;
            };
            let frames =
                read_video_frames(&prep.join(frames_file_name(shard)), first, r.num_frames)?;
            let n = frames.len();
            if open.is_none() {
                let path = dir.join(format!("{split}-{file_no:05}.parquet"));
                file_no += 1;
                let mut file = AtomicFile::create(&path)?;
                let w =
                    ArrowWriter::try_new(file.take_writer(), schema.clone(), Some(props.clone()))
                        .map_err(|e| Error::parquet(file.tmp(), e))?;
                open = Some((path, file, w, 0));
            }
            let Some((path, _, w, rows_in_file)) = open.as_mut() else {
                unreachable!("a file was just opened")
            };
            let image = crate::shard::image_array(BinaryArray::from_iter_values(
                frames.iter().map(|x| x.jpeg.as_slice()),
            ));
            let batch = arrow_array::RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                        r.video_id.as_str(),
                        n,
                    ))),
                    Arc::new(Int32Array::from_iter_values(0..n as i32)),
                    Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                        i64::from(r.label),
                        n,
                    ))),
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                        domain.as_str(),
                        n,
                    ))),
                    Arc::new(image),
                ],
            )
            .map_err(|e| Error::arrow(path.as_path(), e))?;
            w.write(&batch)
                .map_err(|e| Error::parquet(path.as_path(), e))?;
            *rows_in_file += n;
            if *rows_in_file >= HF_ROWS_PER_FILE
                && let Some(o) = open.take()
            {
                close(o, &mut summary)?;
            }
        }
        if let Some(o) = open.take() {
            close(o, &mut summary)?;
        }
    }
    card.push_str(&format!(
        "---\n\n# {}\n\nFrames of the `{}` benchmark prepared by videodg (`vdg export hf`). \
         One config per domain; `train` and `validation` are its source splits (a target \
         domain is tested on both). `label` is a ClassLabel of the benchmark's classes.\n",
        manifest.title, manifest.name
    ));
    AtomicFile::write_all(&out.join("README.md"), card.as_bytes())?;
    Ok(summary)
}
