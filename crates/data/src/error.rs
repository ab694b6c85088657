//! The error type of `vdg-data`.

use std::path::PathBuf;

/// Errors raised while loading manifests or reading and writing shards.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A manifest could not be parsed as TOML of the expected shape.
    #[error("{path}: {message}")]
    ManifestParse {
        /// The manifest file (or `builtin:<name>`).
        path: PathBuf,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// A manifest parsed but breaks a rule (duplicate class, unknown domain, ...).
    #[error("{path}: {key}: {message}")]
    ManifestInvalid {
        /// The manifest file (or `builtin:<name>`).
        path: PathBuf,
        /// The offending key, e.g. `classes[3].native.hmdb`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// No built-in manifest has that name.
    #[error("unknown benchmark {name:?}; built-in benchmarks: {known}")]
    UnknownBenchmark {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A Parquet error on a named file.
    #[error("{path}: {source}")]
    Parquet {
        /// The Parquet file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// An Arrow error while building or reading record batches of a named file.
    #[error("{path}: {source}")]
    Arrow {
        /// The Parquet file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: arrow_schema::ArrowError,
    },
    /// A shard or table does not have the layout this version writes.
    #[error("{path}: {message}")]
    BadShard {
        /// The Parquet file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// JSON (de)serialisation of shard metadata failed.
    #[error("{path}: {source}")]
    Json {
        /// The file whose metadata was being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
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
    pub(crate) fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn arrow(path: impl Into<PathBuf>, source: arrow_schema::ArrowError) -> Self {
        Error::Arrow {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn bad_shard(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::BadShard {
            path: path.into(),
            message: message.into(),
        }
    }
}
