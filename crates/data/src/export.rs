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
    let record: serde_json::Value = {
        let path = prep.join(PREP_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Json { path, source: e })?
    };
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
