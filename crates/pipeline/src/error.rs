//! Errors of `vdg-pipeline`.

use std::path::PathBuf;

/// Why one video could not be decoded. Recorded in `videos.parquet` as text; the run goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The file could not be opened as a media file (corrupt, empty, not a video).
    #[error("cannot open as a video: {0}")]
    Open(String),
    /// The path is not a regular file (or a link to one): opening a named pipe waits for a
    /// writer, and a device may never end, so it is not opened at all.
    #[error("not a regular file but {0}: only regular files are read")]
    NotAFile(&'static str),
    /// The container has no video stream.
    #[error("no video stream")]
    NoVideoStream,
    /// No decoder for the stream, or it would not open.
    #[error("cannot open the video decoder: {0}")]
    Codec(String),
    /// Decoding or scaling failed.
    #[error("decoding failed: {0}")]
    Decode(String),
    /// Not a single frame could be decoded.
    #[error("no frames could be decoded{0}")]
    NoFrames(String),
    /// `--max-fps` was asked for, but the file neither declares a frame rate nor has what
    /// it takes to derive one.
    #[error("the file declares no frame rate and none can be derived, so --max-fps cannot thin it")]
    NoFrameRate,
    /// The decoded frames cover far less than the container declares: truncated or damaged.
    #[error("truncated or damaged: {0}")]
    Truncated(String),
    /// Reading the file failed part-way.
    #[error("read error {0}")]
    Read(String),
    /// The frame consumer (JPEG encoding) failed.
    #[error("{0}")]
    Sink(String),
    /// Prep's stall watchdog gave up on the video ([`crate::stall::Watch::abandon`]), or the
    /// run was asked to stop.
    #[error("given up on: no progress within the stall timeout, or the run was stopped")]
    Abandoned,
}

/// Fatal errors of scanning and prep (a single bad video is a [`DecodeError`], not this).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing shards, manifests, tables.
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
    /// A raw dataset folder is not usable.
    #[error("{path}: {message}")]
    Layout {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The output folder holds a prep of other inputs or options.
    #[error("{path}: {message}")]
    OutputMismatch {
        /// The output folder or file.
        path: PathBuf,
        /// What differs, and what to do.
        message: String,
    },
    /// A signal (SIGINT, SIGTERM) asked the run to stop; complete shards are kept.
    #[error(
        "{path}: interrupted by a signal; {shards} complete shard(s) kept, the shard being \
         written was dropped. Rerun the same command to resume"
    )]
    Interrupted {
        /// The output folder.
        path: PathBuf,
        /// Complete shards in it.
        shards: usize,
    },
    /// Another prep is writing to the same output folder.
    #[error("{path}: another vdg prep is writing to this folder (lock held)")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// Encoding a video (tests, samples, synthetic data) failed.
    #[error("{path}: {message}")]
    Encode {
        /// The video being written.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// More videos made no progress than a run goes past (one per worker; none in a merge,
    /// which must copy every video): their files may be on a file system that stopped
    /// answering.
    #[error(
        "{path}: no progress for {secs} s on {} video(s) ({}); a run goes past at most {cap} \
         (one per worker; a merge none), so it stops: their files may be on a file system that \
         stopped answering. Complete shards are kept; rerun the same command to resume \
         (`--stall-timeout` sets the wait)",
        files.len(),
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Stalled {
        /// The output folder.
        path: PathBuf,
        /// The videos given up on, in order.
        files: Vec<PathBuf>,
        /// The stall timeout.
        secs: f64,
        /// How many a run goes past.
        cap: usize,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
