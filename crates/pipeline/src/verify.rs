//! `vdg prep verify`: every file of a prepared folder against what `prep.json` recorded when
//! it was written (size and SHA-256), and nothing else posing as part of it.
//!
//! A rerun of `vdg prep` checks only sizes before it calls a folder complete (hashing a
//! dataset on every run would cost minutes), so a shard damaged in place or copied
//! incompletely with its size intact would be used as it is; this is the check to run after
//! copying a folder to a cluster, or before a long training run.

use std::path::Path;

use vdg_data::shard::{PREP_FILE, ShardInfo};
pub use vdg_data::verify::{FileCheck, Verified};

use crate::error::{Error, Result};
use crate::prep::read_record;

/// Checks the prepared folder `dir` against its `prep.json` (frame shards, then
/// `videos.parquet`, in its order) on `jobs` threads (0: one per core), calling `done` with
/// each file checked and the number of files listed.
pub fn verify(
    dir: &Path,
    jobs: usize,
    done: &(dyn Fn(&FileCheck, usize) + Sync),
) -> Result<Verified> {
    let record_path = dir.join(PREP_FILE);
    let record = read_record(&record_path).ok_or_else(|| Error::OutputMismatch {
        path: record_path.clone(),
        message: "is missing or unreadable: not a finished prep (`vdg prep` writes it last; an \
                  interrupted run resumes when run again)"
            .into(),
    })?;
    let listed: Vec<&ShardInfo> = record
        .shards
        .iter()
        .chain(std::iter::once(&record.videos_table))
        .collect();
    Ok(vdg_data::verify::verify_listed(
        dir, PREP_FILE, &listed, "frames-", jobs, done,
    )?)
}
