use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow_array::{
    Array, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray, UInt32Array,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use vdg_pipeline::encode::{VideoWriter, pattern_frame, write_pattern_video};

pub const W: u32 = 64;
pub const H: u32 = 48;

/// Path of the built CLI.
pub fn vdg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vdg"))
}

/// Runs the CLI and returns its output; panics with the output if it could not start.
pub fn run(args: &[&str]) -> Output {
    vdg().args(args).output().expect("vdg runs")
}

/// Starts the CLI with `args` and `key=value` added to its environment, output piped.
pub fn spawn_with_env(args: &[&str], key: &str, value: &str) -> std::process::Child {
    vdg()
        .args(args)
        .env(key, value)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vdg starts")
}

/// Waits for `child` to end, at most `secs`: past that it is killed and the test fails,
/// naming `what`, instead of hanging.
pub fn wait_at_most(mut child: std::process::Child, secs: u64, what: &str) -> Output {
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("{what}: still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The first line of the CLI's output that contains `needle`; panics with the whole output
/// if none does.
pub fn log_line(o: &Output, needle: &str) -> String {
    let t = text(o);
    match t.lines().find(|l| l.contains(needle)) {
        Some(l) => l.to_string(),
        None => panic!("no line with {needle:?} in: {t}"),
    }
}

/// A raw layout written by [`write_layout`]: what was encoded where.
pub struct Layout {
    pub root: PathBuf,
    /// video id -> (frames encoded, pattern seed)
    pub good: BTreeMap<String, (u32, u32)>,
    /// video id -> expected substring of the error
    pub bad: BTreeMap<String, &'static str>,
}

fn clip(layout: &mut Layout, dataset: &str, rel: &str, frames: u32, seed: u32, fps: u32) {
    let root = match dataset {
        "ucf101" => layout.root.join("UCF-101"),
        _ => layout.root.join("hmdb51"),
    };
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    write_pattern_video(&p, "mpeg4", W, H, fps, frames, seed).unwrap();
    layout
        .good
        .insert(format!("{dataset}/{rel}"), (frames, seed));
}

/// UCF-101 and hmdb51 trees with good clips of three benchmark classes each, one class
/// outside the benchmark, and the bad cases: corrupt, truncated, empty, zero frames; plus
/// non-ASCII and shell-hostile names.
pub fn write_layout(root: &Path) -> Layout {
    let mut l = Layout {
        root: root.to_owned(),
        good: BTreeMap::new(),
        bad: BTreeMap::new(),
    };
    let mut seed = 0;
    for class in ["Biking", "PullUps", "BoxingSpeedBag"] {
        for g in 1..=4 {
            for c in 1..=2 {
                seed += 1;
                let rel = format!("{class}/v_{class}_g{g:02}_c{c:02}.avi");
                clip(&mut l, "ucf101", &rel, 10 + seed % 5, seed, 25);
            }
        }
    }
    for (class, films) in [
        ("ride_bike", ["Alpha", "Beta", "Gamma"]),
        ("pullup", ["Delta", "Eps", "Zeta"]),
    ] {
        for (k, film) in films.iter().enumerate() {
            for n in 0..2 {
                seed += 1;
                let rel = format!("{class}/{film}_{class}_f_cm_np1_fr_med_{}.avi", k * 2 + n);
                clip(&mut l, "hmdb51", &rel, 9 + seed % 4, seed, 30);
            }
        }
    }
    // Names that break naive tools: non-ASCII, spaces, quotes, shell characters.
    seed += 1;
    clip(
        &mut l,
        "hmdb51",
        "punch/Ünïcödé Fïlm №1_punch_u_nm_np1_fr_goo_0.avi",
        12,
        seed,
        30,
    );
    seed += 1;
    clip(
        &mut l,
        "hmdb51",
        "punch/It's \"a\" $film & more; (x)_punch_u_nm_np1_fr_goo_1.avi",
        11,
        seed,
        30,
    );
    // Outside the benchmark: skipped and counted.
    seed += 1;
    let p = root.join("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    write_pattern_video(&p, "mpeg4", W, H, 25, 8, seed).unwrap();
    // Bad files.
    let bad = root.join("UCF-101/Biking/v_Biking_g05_c01.avi");
    std::fs::write(
        &bad,
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    l.bad.insert(
        "ucf101/Biking/v_Biking_g05_c01.avi".into(),
        "cannot open as a video",
    );
    std::fs::write(root.join("UCF-101/PullUps/v_PullUps_g05_c01.avi"), b"").unwrap();
    l.bad.insert(
        "ucf101/PullUps/v_PullUps_g05_c01.avi".into(),
        "cannot open as a video",
    );
    // Truncated: a 75-frame AVI cut to 60 % of its bytes (FFmpeg reads it without an error).
    let full = root.join("full.tmpvideo.avi");
    write_pattern_video(&full, "mpeg4", W, H, 25, 75, 999).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    std::fs::remove_file(&full).unwrap();
    let trunc = root.join("hmdb51/ride_bike/Omega_ride_bike_f_cm_np1_fr_med_9.avi");
    std::fs::write(&trunc, &bytes[..bytes.len() * 6 / 10]).unwrap();
    l.bad.insert(
        "hmdb51/ride_bike/Omega_ride_bike_f_cm_np1_fr_med_9.avi".into(),
        "truncated",
    );
    // A valid container with no frames at all.
    let zero = root.join("hmdb51/pullup/Void_pullup_f_cm_np1_fr_med_9.avi");
    VideoWriter::create(&zero, "mpeg4", W, H, 30)
        .unwrap()
        .finish()
        .unwrap();
    l.bad.insert(
        "hmdb51/pullup/Void_pullup_f_cm_np1_fr_med_9.avi".into(),
        "no frames",
    );
    l
}

/// Reads every record batch of a Parquet file with the generic reader.
pub fn batches(path: &Path) -> Vec<RecordBatch> {
    let f = File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

pub fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("type of column {name}"))
}

/// One row of videos.parquet as plain values.
#[derive(Debug, Clone)]
pub struct Video {
    pub video_id: String,
    pub label: u32,
    pub label_name: String,
    pub domain: String,
    pub group: Option<String>,
    pub split: String,
    pub status: String,
    pub error: Option<String>,
    pub warning: Option<String>,
    pub num_frames: u32,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub shard: Option<u32>,
    pub first_row: Option<i64>,
}

pub fn videos(dir: &Path) -> Vec<Video> {
    let mut out = Vec::new();
    for b in batches(&dir.join("videos.parquet")) {
        let s = |n| col::<StringArray>(&b, n);
        let u = |n| col::<UInt32Array>(&b, n);
        for i in 0..b.num_rows() {
            let os = |a: &StringArray| (!a.is_null(i)).then(|| a.value(i).to_owned());
            let ou = |a: &UInt32Array| (!a.is_null(i)).then(|| a.value(i));
            let fr = col::<Int64Array>(&b, "first_row");
            out.push(Video {
                video_id: s("video_id").value(i).to_owned(),
                label: u("label").value(i),
                label_name: s("label_name").value(i).to_owned(),
                domain: s("domain").value(i).to_owned(),
                group: os(s("group")),
                split: s("source_split").value(i).to_owned(),
                status: s("status").value(i).to_owned(),
                error: os(s("error")),
                warning: os(s("warning")),
                num_frames: u("num_frames").value(i),
                width: ou(u("width")),
                height: ou(u("height")),
                shard: ou(u("shard")),
                first_row: (!fr.is_null(i)).then(|| fr.value(i)),
            });
        }
    }
    out
}

/// The JPEG bytes of a batch's `image` column: Hugging Face's `{bytes, path}` struct
/// (shard schema 3, `vdg export hf`).
pub fn image_bytes(b: &RecordBatch) -> &BinaryArray {
    col::<arrow_array::StructArray>(b, "image")
        .column_by_name("bytes")
        .unwrap()
        .as_any()
        .downcast_ref::<BinaryArray>()
        .unwrap()
}

/// All frames of all shards: video id -> [(frame_index, jpeg)] in row order.
pub fn frames(dir: &Path) -> BTreeMap<String, Vec<(i32, Vec<u8>)>> {
    let mut out: BTreeMap<String, Vec<(i32, Vec<u8>)>> = BTreeMap::new();
    for s in 0.. {
        let p = dir.join(format!("frames-{s:05}.parquet"));
        if !p.exists() {
            break;
        }
        for b in batches(&p) {
            let ids = col::<StringArray>(&b, "video_id");
            let idx = col::<Int32Array>(&b, "frame_index");
            let img = image_bytes(&b);
            for i in 0..b.num_rows() {
                out.entry(ids.value(i).to_owned())
                    .or_default()
                    .push((idx.value(i), img.value(i).to_vec()));
            }
        }
    }
    out
}

/// Decodes a JPEG with zune-jpeg: (width, height, RGB bytes).
pub fn decode_jpeg(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(bytes, opts);
    let px = d.decode().expect("valid JPEG");
    let info = d.info().unwrap();
    (info.width as usize, info.height as usize, px)
}

/// Mean absolute difference between a decoded frame and the pattern it was made from.
pub fn pattern_error(rgb: &[u8], t: u32, seed: u32) -> f64 {
    let want = pattern_frame(W, H, t, seed);
    assert_eq!(rgb.len(), want.len());
    rgb.iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / rgb.len() as f64
}

/// Every file of a prepared folder (lock file excluded) with its bytes.
pub fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}
