//! End-to-end tests: tiny videos encoded by the tests in the datasets' real layouts, run
//! through the built `vdg` binary, and read back with independent readers (the `parquet`
//! crate's generic record-batch reader and the `zune-jpeg` decoder).

// Helpers: temp folders, running the CLI, writing raw layouts, reading shards back.
mod util;

// `vdg prep ucf-hmdb`: read-back, failures, determinism, resume, errors.
mod prep_ucf_hmdb;
