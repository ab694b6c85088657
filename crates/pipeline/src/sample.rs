//! A tiny raw UCF101 + HMDB51 sample in the datasets' real layouts, made of generated clips.
//!
//! It lets a newcomer run `vdg prep ucf-hmdb` with no download, and gives tests and
//! benchmarks real AVI/MPEG-4 files where the datasets put them. Clips are moving-square
//! patterns, not actions: they exercise the pipeline, not a model.

use std::path::Path;

use vdg_data::Manifest;

use crate::encode::write_pattern_video;
use crate::error::{Error, Result};

/// What [`write_ucf_hmdb_sample`] made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleSummary {
    /// Clips written under `UCF-101/`.
    pub ucf_clips: u32,
    /// Clips written under `hmdb51/`.
    pub hmdb_clips: u32,
}

/// Size of sample clips.
pub const SAMPLE_WIDTH: u32 = 160;
/// Size of sample clips.
pub const SAMPLE_HEIGHT: u32 = 120;
/// Frame rate of sample clips (UCF101's).
pub const SAMPLE_FPS: u32 = 25;

/// Writes `out/UCF-101/<Class>/v_<Class>_gGG_cCC.avi` (groups of two clips) and
/// `out/hmdb51/<class>/<film>_<class>_<tags>_<n>.avi` for every native class of the
/// `ucf_hmdb` manifest, plus one class of each dataset outside the benchmark.
pub fn write_ucf_hmdb_sample(
    out: &Path,
    clips_per_class: u32,
    frames: u32,
) -> Result<SampleSummary> {
    let m = Manifest::builtin("ucf_hmdb")?;
    let mut summary = SampleSummary::default();
    let mut seed = 0u32;
    let mut ucf: Vec<String> = m
        .classes
        .iter()
        .flat_map(|c| c.native["ucf"].clone())
        .collect();
    ucf.push("ApplyEyeMakeup".into());
    let mut hmdb: Vec<String> = m
        .classes
        .iter()
        .flat_map(|c| c.native["hmdb"].clone())
        .collect();
    hmdb.push("brush_hair".into());
    for class in &ucf {
        let dir = out.join("UCF-101").join(class);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for k in 0..clips_per_class {
            let (g, c) = (k / 2 + 1, k % 2 + 1);
            let p = dir.join(format!("v_{class}_g{g:02}_c{c:02}.avi"));
            seed += 1;
            write_pattern_video(
                &p,
                "mpeg4",
                SAMPLE_WIDTH,
                SAMPLE_HEIGHT,
                SAMPLE_FPS,
                frames,
                seed,
            )?;
            summary.ucf_clips += 1;
        }
    }
    for class in &hmdb {
        let dir = out.join("hmdb51").join(class);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for k in 0..clips_per_class {
            let film = ["Film_A", "Film_B", "Film_C"][(k % 3) as usize];
            let p = dir.join(format!("{film}_{class}_f_cm_np1_fr_med_{k}.avi"));
            seed += 1;
            write_pattern_video(&p, "mpeg4", SAMPLE_WIDTH, SAMPLE_HEIGHT, 30, frames, seed)?;
            summary.hmdb_clips += 1;
        }
    }
    Ok(summary)
}
