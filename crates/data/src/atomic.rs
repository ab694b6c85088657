//! Files that appear under their final name only when complete.
//!
//! [`AtomicFile`] writes to `<name>.tmp`, hashes every byte on the way (SHA-256), and on
//! [`AtomicFile::commit`] flushes, `fsync`s, renames to the final name and `fsync`s the
//! folder. Dropped without a commit (an error, a full disk), it removes the temporary file,
//! so a crash leaves at most a `.tmp` file that the next run deletes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Suffix of files being written.
pub const TMP_SUFFIX: &str = ".tmp";

/// A `Write` that counts and hashes what passes through.
pub struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
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
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            tmp,
            writer: Some(HashingWriter {
                inner: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                bytes: 0,
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
        } = writer;
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
