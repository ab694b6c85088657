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
pub mod manifest;
pub mod shard;
pub mod split;

pub use error::{Error, Result};
pub use manifest::{Manifest, SplitRule};
pub use shard::{EncodedFrame, ShardMeta, VideoRow, VideoStatus};
pub use split::SourceSplit;
