//! `vdg-data`: what a videodg benchmark *is*, independent of how videos are decoded or
//! models trained.
//!
//! - [`manifest`]: benchmark manifests ([`Manifest`]) — classes, native-class maps,
//!   domains, directions, split rules — loaded from TOML and checked.
//! - [`split`]: the seeded, stratified, group-aware train/val assignment.
//! - [`shard`]: the Parquet layout `vdg prep` writes (`frames-NNNNN.parquet`,
//!   `videos.parquet`, `prep.json`), with its writer and reader.
//! - [`atomic`]: files written under a temporary name and renamed when complete.
//!
//! This crate links neither FFmpeg nor Candle, so the trainer and the tools depend on it
//! cheaply.
//!
//! ```
//! use vdg_data::Manifest;
//! let m = Manifest::builtin("ucf_hmdb")?;
//! assert_eq!(m.classes.len(), 12);
//! assert_eq!(m.native_map("ucf")["Biking"].name, "ride_bike");
//! # Ok::<(), vdg_data::Error>(())
//! ```

pub mod atomic;
pub mod error;
pub mod export;
pub mod manifest;
pub mod shard;
pub mod split;
pub mod verify;

pub use error::{Error, Result};
pub use manifest::{Manifest, SplitRule};
pub use shard::{EncodedFrame, ShardMeta, VideoRow, VideoStatus};
pub use split::SourceSplit;

/// Parses a `--part I/N` value: part I (0-based) of N, for job arrays.
pub fn parse_part(s: &str) -> std::result::Result<(u32, u32), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected I/N, as 0/4"))?;
    let i: u32 = i
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: I is not a number"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: N is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!("{s:?}: I must be 0..N-1 and N at least 1"));
    }
    Ok((i, n))
}
