//! Files that appear under their final name only when complete.
//!
//! [`AtomicFile`] writes to `<name>.tmp`, hashes every byte on the way (SHA-256), and on
//! [`AtomicFile::commit`] flushes, `fsync`s, renames to the final name and `fsync`s the
//! folder. Dropped without a commit (an error, a full disk), it removes the temporary file,
//! so a crash leaves at most a `.tmp` file that the next run deletes.
//!
//! A large file is written back while it grows: every [`BACKGROUND_SYNC_BYTES`] a helper
//! thread `fdatasync`s what has been written so far, so the `fsync` of the commit has
//! little left to do. Without it, closing a 512 MiB frame shard stalled the writer (and
//! through its backpressure every decoder) for the whole write-back, about a second.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Suffix of files being written.
pub const TMP_SUFFIX: &str = ".tmp";

/// A file being written is synced in the background each time this many more bytes have
/// been written (see the module docs).
pub const BACKGROUND_SYNC_BYTES: u64 = 32 << 20;

/// A `Write` that counts and hashes what passes through.
pub struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
    sync_every: u64,
    next_sync: u64,
    syncer: Option<Syncer>,
}

/// A thread that `fdatasync`s a file (through its own handle) whenever asked, while the
/// owner keeps writing. Requests made while one is pending are merged.
struct Syncer {
    tx: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    done: Arc<AtomicU64>,
}

impl Syncer {
    fn start(file: File) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let done = Arc::new(AtomicU64::new(0));
        let count = done.clone();
        let thread = std::thread::Builder::new()
            .name("vdg-sync".into())
            .spawn(move || {
                for () in rx {
                    file.sync_data()?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
            done,
        })
    }

    /// Asks for a sync unless one is already waiting.
    fn request(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(());
        }
    }

    /// Waits for the thread; the first error of a background sync, if any.
    fn finish(&mut self) -> std::io::Result<()> {
        drop(self.tx.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the background sync thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        if self.bytes >= self.next_sync {
            self.next_sync = self.bytes + self.sync_every;
            if self.syncer.is_none() {
                // Without a second handle the commit's fsync does all of it, as before.
                self.syncer = self
                    .inner
                    .get_ref()
                    .try_clone()
                    .and_then(Syncer::start)
                    .ok();
            }
            if let Some(s) = &self.syncer {
                s.request();
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl HashingWriter {
    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Background syncs completed so far.
    pub fn background_syncs(&self) -> u64 {
        self.syncer
            .as_ref()
            .map_or(0, |s| s.done.load(Ordering::Relaxed))
    }
}

/// A file written under a temporary name and renamed into place when complete.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<HashingWriter>,
}

/// What a committed file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Final path.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

/// The temporary name used while `path` is written.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

impl AtomicFile {
    /// Starts writing `path` (as `path.tmp`, truncating any leftover).
    pub fn create(path: &Path) -> Result<Self> {
        Self::create_syncing_every(path, BACKGROUND_SYNC_BYTES)
    }

    /// [`Self::create`], syncing in the background every `bytes` written.
    pub fn create_syncing_every(path: &Path, bytes: u64) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let sync_every = bytes.max(1);
        Ok(AtomicFile {
            path: path.to_owned(),
            tmp,
            writer: Some(HashingWriter {
                inner: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                bytes: 0,
                sync_every,
                next_sync: sync_every,
                syncer: None,
            }),
        })
    }

    /// The temporary path being written.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Takes the writer out (to hand to a format writer); give it back with [`Self::commit`].
    pub fn take_writer(&mut self) -> HashingWriter {
        #[allow(clippy::expect_used)]
        self.writer
            .take()
            .expect("AtomicFile writer taken twice (programming error)")
    }

    /// Flushes, syncs and renames `writer`'s content into place.
    pub fn commit(mut self, writer: HashingWriter) -> Result<Committed> {
        let HashingWriter {
            inner,
            hasher,
            bytes,
            syncer,
            ..
        } = writer;
        if let Some(mut s) = syncer {
            // An error a background sync saw may not be reported to the next fsync.
            s.finish().map_err(|e| Error::io(&self.tmp, e))?;
        }
        let file = inner
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        sync_dir(&self.path);
        let sha256 = hex(&hasher.finalize());
        // Committed: nothing to clean up on drop.
        self.tmp = PathBuf::new();
        Ok(Committed {
            path: std::mem::take(&mut self.path),
            bytes,
            sha256,
        })
    }

    /// Writes `bytes` to `path` atomically.
    pub fn write_all(path: &Path, bytes: &[u8]) -> Result<Committed> {
        let mut f = AtomicFile::create(path)?;
        let mut w = f.take_writer();
        w.write_all(bytes).map_err(|e| Error::io(f.tmp(), e))?;
        f.commit(w)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            drop(self.writer.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn sync_dir(path: &Path) {
    // Best effort: make the rename durable. Not every platform can open a folder.
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of bytes, as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of a file's content, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        let c = AtomicFile::write_all(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        assert!(!tmp_path(&p).exists());
        assert_eq!(
            c.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(c.sha256, sha256_file(&p).unwrap());
    }

    #[test]
    fn large_files_are_synced_in_the_background_and_commit_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = AtomicFile::create_syncing_every(&p, 16 << 10).unwrap();
        let mut w = f.take_writer();
        for chunk in data.chunks(10_000) {
            w.write_all(chunk).unwrap();
        }
        w.flush().unwrap();
        // 12 thresholds crossed; requests merge while one is pending.
        let start = std::time::Instant::now();
        while w.background_syncs() == 0 && start.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let syncs = w.background_syncs();
        let c = f.commit(w).unwrap();
        assert!((1..=12).contains(&syncs), "{syncs}");
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert_eq!(c.sha256, sha256_hex(&data));
        assert_eq!(c.bytes, data.len() as u64);
        // A small file never starts the thread.
        let mut f = AtomicFile::create(&dir.path().join("small.bin")).unwrap();
        let mut w = f.take_writer();
        w.write_all(&data).unwrap();
        assert_eq!(w.background_syncs(), 0);
        assert!(w.syncer.is_none());
        f.commit(w).unwrap();
    }

    #[test]
    fn drop_without_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bin");
        {
            let mut f = AtomicFile::create(&p).unwrap();
            let mut w = f.take_writer();
            w.write_all(b"partial").unwrap();
            assert!(tmp_path(&p).exists());
        }
        assert!(!tmp_path(&p).exists());
        assert!(!p.exists());
    }
}
