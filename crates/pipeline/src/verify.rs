//! `vdg prep verify`: every file of a prepared folder against what `prep.json` recorded when
//! it was written (size and SHA-256), and nothing else posing as part of it.
//!
//! A rerun of `vdg prep` checks only sizes before it calls a folder complete (hashing a
//! dataset on every run would cost minutes), so a shard damaged in place or copied
//! incompletely with its size intact would be used as it is; this is the check to run after
//! copying a folder to a cluster, or before a long training run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use vdg_data::atomic::{TMP_SUFFIX, sha256_file};
use vdg_data::shard::{PREP_FILE, ShardInfo};

use crate::error::{Error, Result};
use crate::prep::read_record;

/// One file `prep.json` lists, and what is wrong with it (`None`: it matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// The file.
    pub path: PathBuf,
    /// Its size as recorded.
    pub bytes: u64,
    /// What does not match.
    pub problem: Option<String>,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The files `prep.json` lists (frame shards, then `videos.parquet`), in its order.
    pub checked: Vec<FileCheck>,
    /// Frame shards `prep.json` does not list, and leftovers of interrupted writes: readers
    /// that glob `frames-*.parquet` (DuckDB, Polars, `datasets`) would take them in.
    pub stray: Vec<PathBuf>,
}

impl Verified {
    /// Whether every listed file matches and nothing stray is there.
    pub fn ok(&self) -> bool {
        self.stray.is_empty() && self.checked.iter().all(|c| c.problem.is_none())
    }
}

/// Checks the prepared folder `dir` against its `prep.json` on `jobs` threads (0: one per
/// core), calling `done` with each file checked and the number of files listed.
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
                    let c = check(dir, info);
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
        let shard = name.starts_with("frames-") && name.ends_with(".parquet");
        if (shard && !names.contains(name.as_str())) || name.ends_with(TMP_SUFFIX) {
            stray.push(entry.path());
        }
    }
    stray.sort();
    Ok(Verified { checked, stray })
}

/// One listed file against its record.
fn check(dir: &Path, info: &ShardInfo) -> FileCheck {
    let path = dir.join(&info.file);
    let problem = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing".to_owned()),
        Err(e) => Some(format!("unreadable: {e}")),
        Ok(m) if m.len() != info.bytes => Some(format!(
            "{} bytes where prep.json records {} (cut short or replaced)",
            m.len(),
            info.bytes
        )),
        Ok(_) => match sha256_file(&path) {
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(h) if h != info.sha256 => Some(
                "same size, but its SHA-256 is not the one prep.json records: its bytes \
                 changed after prep wrote them"
                    .to_owned(),
            ),
            Ok(_) => None,
        },
    };
    FileCheck {
        path,
        bytes: info.bytes,
        problem,
    }
}
