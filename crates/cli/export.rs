//! `vdg export ...`: a prepared folder in the forms other code bases read.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use vdg_data::export::{ListFormat, export_hf, export_lists};

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Rawframe lists (`frame_dir num_frames label`) per domain and source split, for
    /// mmaction2's RawframeDataset or TSN/TRN/TSM-style loaders; with --frames-dir, the
    /// frames as `<dir>/<video_id>/img_00001.jpg ...` (copied from the shards).
    Lists {
        /// A folder written by `vdg prep`.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// `mmaction` (frame_dir relative to data_prefix) or `trn` (TSN/TRN/TSM: frame_dir
        /// as the loader opens it, under --frames-dir when given).
        #[arg(long, value_name = "FORMAT")]
        format: String,
        /// Where the list files go.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Also write every listed video's frames as JPEG folders here (mmaction2's
        /// data_prefix).
        #[arg(long, value_name = "DIR")]
        frames_dir: Option<PathBuf>,
    },
    /// A Hugging Face `datasets` folder: one config per domain with `train` and
    /// `validation` splits, one row per frame with its label (a ClassLabel) and domain
    /// joined in: `load_dataset("<out>", "<domain>")`.
    Hf {
        /// A folder written by `vdg prep`.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The datasets folder to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub fn run(cmd: ExportCommand) -> Result<ExitCode> {
    match cmd {
        ExportCommand::Lists {
            data,
            format,
            out,
            frames_dir,
        } => {
            let f = ListFormat::from_name(&format)
                .with_context(|| format!("unknown --format {format:?}; known: mmaction, trn"))?;
            let s = export_lists(&data, f, &out, frames_dir.as_deref())
                .with_context(|| format!("exporting lists of {}", data.display()))?;
            for (path, n) in &s.lists {
                println!("{n:>7} videos  {}", path.display());
            }
            if let Some(d) = &frames_dir {
                println!("frames of {} videos under {}", s.frame_dirs, d.display());
            }
            if s.failed > 0 {
                println!("{} failed video(s) left out of every list", s.failed);
            }
            Ok(ExitCode::SUCCESS)
        }
        ExportCommand::Hf { data, out } => {
            let s = export_hf(&data, &out)
                .with_context(|| format!("exporting {} for datasets", data.display()))?;
            for (path, n) in &s.files {
                println!("{n:>8} frames  {}", path.display());
            }
            println!(
                "load it with datasets.load_dataset({:?}, \"<domain>\")",
                out.display().to_string()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
