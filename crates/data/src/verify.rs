//! Checking a finished folder against the record its writer left (`prep.json` of `vdg prep`,
//! `features.json` of `vdg features`): every listed file of the recorded size and SHA-256,
//! and nothing else posing as part of it.
//!
//! Reruns of `vdg prep` and `vdg features` check only sizes before they call a folder
//! complete (hashing a dataset on every run would cost minutes), so a file damaged in place
//! or copied incompletely with its size intact would be used as it is; this is the check to
//! run after copying a folder to a cluster, or before a long training run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::atomic::{TMP_SUFFIX, sha256_file};
use crate::error::{Error, Result};
use crate::shard::ShardInfo;

/// One listed file, and what is wrong with it (`None`: it matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// The file.
    pub path: PathBuf,
    /// Its size as recorded.
    pub bytes: u64,
    /// What does not match.
    pub problem: Option<String>,
}

/// What [`verify_listed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The record the files were checked against (`prep.json`, `features.json`).
    pub record: &'static str,
    /// The files the record lists, in its order.
    pub checked: Vec<FileCheck>,
    /// Shards the record does not list, and leftovers of interrupted writes: readers that
    /// glob the shards (DuckDB, Polars, `datasets`) would take them in.
    pub stray: Vec<PathBuf>,
}

impl Verified {
    /// Whether every listed file matches and nothing stray is there.
    pub fn ok(&self) -> bool {
        self.stray.is_empty() && self.checked.iter().all(|c| c.problem.is_none())
    }
}

/// Checks the files `listed` (from the record `record` in `dir`) on `jobs` threads (0: one
/// per core), calling `done` with each file checked and the number listed; files named
/// `<shard_prefix>*.parquet` that are not listed, and `*.tmp` leftovers, are stray.
pub fn verify_listed(
    dir: &Path,
    record: &'static str,
    listed: &[&ShardInfo],
    shard_prefix: &str,
    jobs: usize,
    done: &(dyn Fn(&FileCheck, usize) + Sync),
) -> Result<Verified> {
    let results: Mutex<Vec<Option<FileCheck>>> = Mutex::new(vec![None; listed.len()]);
    let next = AtomicUsize::new(0);
    let threads = match jobs {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(listed.len())
    .max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(info) = listed.get(i) else { break };
                    let c = check(dir, record, info);
                    done(&c, listed.len());
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(c);
                    }
                }
            });
        }
    });
    // A thread that panicked has already made `scope` panic; the lock cannot be poisoned here.
    let checked: Vec<FileCheck> = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .into_iter()
        .flatten()
        .collect();
    let names: BTreeSet<&str> = listed.iter().map(|i| i.file.as_str()).collect();
    let mut stray = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let shard = name.starts_with(shard_prefix) && name.ends_with(".parquet");
        if (shard && !names.contains(name.as_str())) || name.ends_with(TMP_SUFFIX) {
            stray.push(entry.path());
        }
    }
    stray.sort();
    Ok(Verified {
        record,
        checked,
        stray,
    })
}

/// One listed file against its record.
fn check(dir: &Path, record: &str, info: &ShardInfo) -> FileCheck {
    let path = dir.join(&info.file);
    let problem = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing".to_owned()),
        Err(e) => Some(format!("unreadable: {e}")),
        Ok(m) if m.len() != info.bytes => Some(format!(
            "{} bytes where {record} records {} (cut short or replaced)",
            m.len(),
            info.bytes
        )),
        Ok(_) => match sha256_file(&path) {
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(h) if h != info.sha256 => Some(format!(
                "same size, but its SHA-256 is not the one {record} records: its bytes \
                 changed after they were written"
            )),
            Ok(_) => None,
        },
    };
    FileCheck {
        path,
        bytes: info.bytes,
        problem,
    }
}
