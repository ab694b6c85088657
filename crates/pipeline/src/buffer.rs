//! Encoded frames on their way from a decoding worker to the shard writer, with memory
//! bounded by frames, not by videos.
//!
//! A video's verdict (complete or truncated) is only known once its file is read to the
//! end, so its frames must be held until then. A [`FrameBuffer`] keeps them in memory while
//! the frames buffered by its unit (one video, or every clip of one PKU-MMD recording)
//! stay within a budget; past it the buffer moves its frames to an anonymous temporary
//! file (removed by the OS however the process ends) and appends there, so an hour-long
//! stray file costs disk, not gigabytes of memory per worker.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vdg_data::EncodedFrame;

/// Frames a unit may hold in memory before its buffers spill to disk: with 256-pixel
/// JPEGs (15-40 KB) about 10-25 MB a worker.
pub const DEFAULT_MEMORY_FRAMES: usize = 640;

/// The frames one video produced, in memory or spilled to a temporary file.
#[derive(Debug)]
pub struct FrameBuffer {
    mem: Vec<EncodedFrame>,
    spill: Option<BufWriter<File>>,
    len: usize,
    budget: Arc<AtomicUsize>,
    cap: usize,
    dir: PathBuf,
}

impl FrameBuffer {
    /// An empty buffer sharing `budget` (frames in memory across its unit) up to `cap`,
    /// spilling into `dir`.
    pub fn new(budget: Arc<AtomicUsize>, cap: usize, dir: &Path) -> Self {
        FrameBuffer {
            mem: Vec::new(),
            spill: None,
            len: 0,
            budget,
            cap,
            dir: dir.to_owned(),
        }
    }

    /// A buffer of frames already in memory (that count against nothing).
    pub fn from_vec(frames: Vec<EncodedFrame>) -> Self {
        FrameBuffer {
            len: frames.len(),
            mem: frames,
            spill: None,
            budget: Arc::new(AtomicUsize::new(0)),
            cap: usize::MAX,
            dir: PathBuf::new(),
        }
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no frame is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the frames went to disk.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    /// Appends a frame.
    pub fn push(&mut self, frame: EncodedFrame) -> Result<(), String> {
        self.len += 1;
        if let Some(w) = &mut self.spill {
            return write_frame(w, &frame).map_err(|e| self.spill_error(e));
        }
        self.mem.push(frame);
        if self.budget.fetch_add(1, Ordering::SeqCst) + 1 > self.cap {
            self.spill_now()?;
        }
        Ok(())
    }

    fn spill_error(&self, e: std::io::Error) -> String {
        format!(
            "spilling frames to a temporary file in {}: {e}",
            self.dir.display()
        )
    }

    fn spill_now(&mut self) -> Result<(), String> {
        let file = tempfile::tempfile_in(&self.dir).map_err(|e| self.spill_error(e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        for f in &self.mem {
            write_frame(&mut w, f).map_err(|e| self.spill_error(e))?;
        }
        self.budget.fetch_sub(self.mem.len(), Ordering::SeqCst);
        self.mem = Vec::new();
        self.spill = Some(w);
        Ok(())
    }

    /// Drops every frame (a video that failed after some were buffered).
    pub fn clear(&mut self) {
        self.budget.fetch_sub(self.mem.len(), Ordering::SeqCst);
        self.mem = Vec::new();
        self.spill = None;
        self.len = 0;
    }

    /// Keeps the frames `keep` accepts (in memory only; a spilled buffer is read back).
    pub fn retain(&mut self, keep: impl Fn(&EncodedFrame) -> bool) -> Result<(), String> {
        if self.spill.is_none() {
            let before = self.mem.len();
            self.mem.retain(|f| keep(f));
            self.budget
                .fetch_sub(before - self.mem.len(), Ordering::SeqCst);
            self.len = self.mem.len();
            return Ok(());
        }
        let frames: Vec<EncodedFrame> = std::mem::replace(
            self,
            FrameBuffer::new(self.budget.clone(), self.cap, &self.dir.clone()),
        )
        .into_frames()?
        .collect::<Result<_, _>>()?;
        for f in frames.into_iter().filter(|f| keep(f)) {
            self.push(f)?;
        }
        Ok(())
    }

    /// The frames in order.
    pub fn into_frames(mut self) -> Result<Frames, String> {
        let n = self.len;
        match self.spill.take() {
            None => {
                self.budget.fetch_sub(self.mem.len(), Ordering::SeqCst);
                Ok(Frames::Mem(std::mem::take(&mut self.mem).into_iter()))
            }
            Some(w) => {
                let mut file = w
                    .into_inner()
                    .map_err(|e| format!("flushing spilled frames: {e}"))?;
                file.rewind()
                    .map_err(|e| format!("reading spilled frames: {e}"))?;
                Ok(Frames::Disk {
                    reader: BufReader::with_capacity(1 << 20, file),
                    left: n,
                })
            }
        }
    }
}

impl Drop for FrameBuffer {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.mem.len(), Ordering::SeqCst);
    }
}

/// The frames of a [`FrameBuffer`], in order.
#[derive(Debug)]
pub enum Frames {
    /// Held in memory.
    Mem(std::vec::IntoIter<EncodedFrame>),
    /// Read back from the spill file.
    Disk {
        /// The file.
        reader: BufReader<File>,
        /// Frames still to read.
        left: usize,
    },
}

impl Iterator for Frames {
    type Item = Result<EncodedFrame, String>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Frames::Mem(it) => it.next().map(Ok),
            Frames::Disk { reader, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                Some(read_frame(reader).map_err(|e| format!("reading spilled frames: {e}")))
            }
        }
    }
}

fn write_frame(w: &mut impl Write, f: &EncodedFrame) -> std::io::Result<()> {
    w.write_all(&f.source_frame.to_le_bytes())?;
    match f.time_secs {
        Some(t) => {
            w.write_all(&[1])?;
            w.write_all(&t.to_le_bytes())?;
        }
        None => w.write_all(&[0; 9])?,
    }
    w.write_all(&(f.jpeg.len() as u64).to_le_bytes())?;
    w.write_all(&f.jpeg)
}

fn read_frame(r: &mut impl Read) -> std::io::Result<EncodedFrame> {
    let mut b4 = [0u8; 4];
    let mut b8 = [0u8; 8];
    let mut b1 = [0u8; 1];
    r.read_exact(&mut b4)?;
    let source_frame = u32::from_le_bytes(b4);
    r.read_exact(&mut b1)?;
    r.read_exact(&mut b8)?;
    let time_secs = (b1[0] == 1).then(|| f64::from_le_bytes(b8));
    r.read_exact(&mut b8)?;
    let mut jpeg = vec![0u8; u64::from_le_bytes(b8) as usize];
    r.read_exact(&mut jpeg)?;
    Ok(EncodedFrame {
        source_frame,
        time_secs,
        jpeg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u32) -> EncodedFrame {
        EncodedFrame {
            source_frame: i,
            time_secs: (!i.is_multiple_of(3)).then(|| f64::from(i) / 25.0),
            jpeg: vec![i as u8; (i as usize % 7) * 100 + 1],
        }
    }

    #[test]
    fn frames_past_the_budget_spill_and_read_back_in_order() {
        let d = tempfile::tempdir().unwrap();
        let budget = Arc::new(AtomicUsize::new(0));
        let mut a = FrameBuffer::new(budget.clone(), 10, d.path());
        let mut b = FrameBuffer::new(budget.clone(), 10, d.path());
        for i in 0..6 {
            a.push(frame(i)).unwrap();
        }
        for i in 0..6 {
            b.push(frame(100 + i)).unwrap();
        }
        // 12 frames against a budget of 10: the buffer that crossed it went to disk.
        assert!(b.spilled() && !a.spilled());
        assert!(budget.load(Ordering::SeqCst) <= 10);
        for i in 6..50 {
            b.push(frame(100 + i)).unwrap();
        }
        assert_eq!(
            budget.load(Ordering::SeqCst),
            6,
            "only a's frames are in memory"
        );
        let got: Vec<EncodedFrame> = b.into_frames().unwrap().map(Result::unwrap).collect();
        assert_eq!(got, (100..150).map(frame).collect::<Vec<_>>());
        a.retain(|f| f.source_frame % 2 == 0).unwrap();
        assert_eq!(budget.load(Ordering::SeqCst), 3);
        drop(a);
        assert_eq!(budget.load(Ordering::SeqCst), 0);
        // No file is left behind: spill files are anonymous.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn retain_and_clear_on_a_spilled_buffer() {
        let d = tempfile::tempdir().unwrap();
        let budget = Arc::new(AtomicUsize::new(0));
        let mut b = FrameBuffer::new(budget.clone(), 4, d.path());
        for i in 0..20 {
            b.push(frame(i)).unwrap();
        }
        assert!(b.spilled());
        b.retain(|f| f.source_frame % 5 == 0).unwrap();
        let got: Vec<u32> = b
            .into_frames()
            .unwrap()
            .map(|f| f.unwrap().source_frame)
            .collect();
        assert_eq!(got, [0, 5, 10, 15]);
        let mut c = FrameBuffer::new(budget.clone(), 4, d.path());
        for i in 0..9 {
            c.push(frame(i)).unwrap();
        }
        c.clear();
        assert!(c.is_empty() && c.into_frames().unwrap().next().is_none());
        assert_eq!(budget.load(Ordering::SeqCst), 0);
    }
}
