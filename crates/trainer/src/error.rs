//! Errors of `vdg-trainer`.

use std::path::PathBuf;

/// Errors of model building, training and evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading shards or the videos table failed.
    #[error(transparent)]
    Data(#[from] vdg_data::Error),
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is not usable.
    #[error("{0}")]
    Config(String),
    /// The device asked for is not available in this build or on this machine.
    #[error("{0}")]
    Device(String),
    /// No batch came from the loader within the stall timeout.
    #[error(
        "no batch read for {seconds:.0} s (--stall-timeout): the loader is stuck reading {}: a read that does not return (a file system that stopped answering?); stopping",
        if files.is_empty() { "its input".to_string() } else { files.join(", ") }
    )]
    Stalled {
        /// The timeout that passed.
        seconds: f64,
        /// The files of the batch being read.
        files: Vec<String>,
    },
    /// The loss became NaN or infinite.
    #[error(
        "the loss is {value} at epoch {epoch}, batch {batch}; stopping (lower the learning rate or check the data)"
    )]
    NonFiniteLoss {
        /// The loss value.
        value: f32,
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
    },
    /// The gradient norm became NaN or infinite (the parameters were not updated).
    #[error(
        "the gradient norm is {norm} at epoch {epoch}, batch {batch}; stopping (lower the learning rate or check the data)"
    )]
    NonFiniteGradient {
        /// The norm.
        norm: f64,
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
    },
    /// A frame could not be decoded.
    #[error("{video_id}: frame {frame}: {message}")]
    Frame {
        /// The video.
        video_id: String,
        /// The frame index.
        frame: usize,
        /// What went wrong.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
