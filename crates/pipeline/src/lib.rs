//! `vdg-pipeline`: from raw dataset folders to Parquet frame shards.
//!
//! - [`scan`]: one scanner per raw layout ([`scan::scan_ucf101`], [`scan::scan_hmdb51`]),
//!   yielding [`scan::RawVideo`]s.
//! - [`plan`]: [`plan::build_plan`] maps them through a benchmark manifest to labels,
//!   domains and source splits, and fingerprints the result.
//! - [`decode`]: in-process FFmpeg decoding (ffmpeg-next) with frame counting, resize and
//!   truncation checks; [`colour`]: colour matrix, range, sample aspect and rotation;
//!   [`jpeg`]: JPEG encoding.
//! - [`prep`]: [`prep::run_prep`], the resumable, deterministic job runner; [`stall`]: the
//!   heartbeat its watchdog reads.
//! - [`encode`]: writing videos (tests, samples, synthetic data).
//!
//! This is the only videodg crate that links FFmpeg.

pub mod buffer;
pub mod colour;
pub mod decode;
pub mod encode;
pub mod error;
pub mod jpeg;
pub mod plan;
pub mod prep;
pub mod sample;
pub mod scan;
pub mod stall;
pub mod synthetic;
#[cfg(all(test, unix))]
mod testutil;
mod unpack;
pub mod verify;

pub use error::{DecodeError, Error, Result};
