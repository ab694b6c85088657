//! End-to-end tests: tiny videos encoded by the tests in the datasets' real layouts, run
//! through the built `vdg` binary, and read back with independent readers (the `parquet`
//! crate's generic record-batch reader and the `zune-jpeg` decoder).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// Helpers: temp folders, running the CLI, writing raw layouts, reading shards back.
mod util;

// `vdg prep ucf-hmdb`: read-back, failures, determinism, resume, errors.
mod prep_ucf_hmdb;

// `vdg prep` on real-world files and folders: remuxed H.264, cut copies, partial
// downloads, wrong paths, hand-edited prep.json.
mod prep_real_world;

// `vdg prep ssv2`, `pku-mmd`, `ntu`: their layouts, annotations and bad cases.
mod prep_other;

// `vdg train`: run folder, resume after kill -9, every model, errors.
mod train;

// `vdg bench`: the run matrix, reports, resume.
mod bench;

// `vdg features` and `vdg train --features`: the cache, its resume, heads trained on it.
mod features;
