//! Speed of `vdg prep` against its peers, on the same generated clips in one run.
//!
//! Clips: 320x240, 25 fps, MPEG-4 in AVI (UCF101's format), in the UCF101 layout.
//! Measured, all single-core so they compare per core, throughput in frames:
//! - `vdg_prep_jobs1`: the whole `vdg prep` (scan, plan, decode, JPEG q90, Parquet, tables).
//! - `vdg_prep_all_cores`: the same with one worker per core.
//! - `two_independent_jobs1_at_once`: two single-worker preps of the same clips into two
//!   folders at once (frames of both counted): what the cores give independent work, the
//!   ceiling for `vdg_prep_all_cores` on a 2-core machine.
//! - `vdg_prep_jobs1_via_rgb`, `vdg_prep_all_cores_via_rgb`: the same with `--jpeg-via-rgb`
//!   (every JPEG encoded from RGB, prep's route before the YUV planes were stored directly).
//! - `decode_only`: the ceiling: ffmpeg-next decoding every frame, nothing else.
//! - `decode_rgb`: decoding plus conversion to packed RGB (the RGB route's encoder input).
//! - `decode_yuv420`: decoding plus range expansion of the planes (the YUV route's input).
//! - `jpeg_encode_turbojpeg`: JPEG-encoding as many 320x240 RGB frames (libjpeg-turbo, q90).
//! - `jpeg_encode_turbojpeg_from_yuv`: the same frames from full-range 4:2:0 planes.
//! - `jpeg_encode_jpeg_encoder_crate`: the same with the pure-Rust `jpeg-encoder` crate.
//! - `ffmpeg_cli_jpeg`: what users do today, one `ffmpeg` process per clip:
//!   `ffmpeg -threads 1 -i clip.avi -vf scale=-2:240 -q:v 2 dir/%06d.jpg` (skipped when no
//!   `ffmpeg` program is installed).
//!
//! A second group, `pku_1080p_intervals`, cuts six annotated intervals (210 frames) from one
//! 300-frame 1920x1080 recording: prep's single decoding pass vs decoding from the start for
//! each interval, vs decoding the recording once (all throughputs in clip frames).
//!
//! Run: `cargo bench --bench prep` (see BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ffmpeg_next as ffmpeg;
use vdg_data::Manifest;
use vdg_pipeline::decode::{DecodeOptions, decode_video};
use vdg_pipeline::encode::{pattern_frame, write_pattern_video};
use vdg_pipeline::plan::{ContentOptions, build_plan};
use vdg_pipeline::prep::{PrepEvent, RunOptions, run_prep};
use vdg_pipeline::scan::{Scan, scan_ucf101};

const CLIPS: u32 = 12;
const FRAMES: u32 = 150;
const WIDTH: u32 = 320;
const HEIGHT: u32 = 240;

fn make_clips(root: &Path) -> Vec<PathBuf> {
    let classes = ["Biking", "PullUps", "Archery"];
    let mut out = Vec::new();
    for i in 0..CLIPS {
        let class = classes[(i % 3) as usize];
        let dir = root.join("UCF-101").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("v_{class}_g{:02}_c01.avi", i + 1));
        write_pattern_video(&p, "mpeg4", WIDTH, HEIGHT, 25, FRAMES, i + 1).unwrap();
        out.push(p);
    }
    out
}

fn prep_once(manifest: &Manifest, scan: &Scan, out: &Path, jobs: usize, jpeg_via_rgb: bool) {
    let _ = std::fs::remove_dir_all(out);
    let options = ContentOptions {
        jpeg_via_rgb,
        ..Default::default()
    };
    let plan = build_plan(manifest, &[scan], &options).unwrap();
    let quiet = |_: &PrepEvent<'_>| {};
    let s = run_prep(
        &plan,
        out,
        &RunOptions {
            jobs,
            ..Default::default()
        },
        &quiet,
    )
    .unwrap();
    assert_eq!(s.record.counts.frames, u64::from(CLIPS * FRAMES));
}

fn decode_only(path: &Path) -> u64 {
    let mut ictx = ffmpeg::format::input(path).unwrap();
    let stream = ictx.streams().best(ffmpeg::media::Type::Video).unwrap();
    let index = stream.index();
    let mut ctx = ffmpeg::codec::context::Context::from_parameters(stream.parameters()).unwrap();
    ctx.set_threading(ffmpeg::codec::threading::Config::count(1));
    let mut dec = ctx.decoder().video().unwrap();
    let mut frame = ffmpeg::util::frame::video::Video::empty();
    let mut n = 0;
    for (s, packet) in ictx.packets() {
        if s.index() == index {
            dec.send_packet(&packet).unwrap();
            while dec.receive_frame(&mut frame).is_ok() {
                n += 1;
            }
        }
    }
    dec.send_eof().unwrap();
    while dec.receive_frame(&mut frame).is_ok() {
        n += 1;
    }
    n
}

/// Full-range BT.601 4:2:0 planes of a packed RGB frame (chroma averaged over 2x2).
fn to_yuv420(rgb: &[u8]) -> [Vec<u8>; 3] {
    let (w, h) = (WIDTH as usize, HEIGHT as usize);
    let px = |x: usize, y: usize| {
        let p = &rgb[3 * (y * w + x)..];
        (f64::from(p[0]), f64::from(p[1]), f64::from(p[2]))
    };
    let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let mut luma = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            luma.push(clamp(0.299 * r + 0.587 * g + 0.114 * b));
        }
    }
    let (mut cb, mut cr) = (Vec::new(), Vec::new());
    for y in (0..h).step_by(2) {
        for x in (0..w).step_by(2) {
            let (mut r, mut g, mut b) = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = px((x + dx).min(w - 1), (y + dy).min(h - 1));
                (r, g, b) = (r + p.0 / 4.0, g + p.1 / 4.0, b + p.2 / 4.0);
            }
            cb.push(clamp(128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b));
            cr.push(clamp(128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b));
        }
    }
    [luma, cb, cr]
}

fn has_ffmpeg() -> bool {
    Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bench(c: &mut Criterion) {
    vdg_pipeline::decode::init();
    let tmp = tempfile::tempdir().unwrap();
    let clips = make_clips(tmp.path());
    let manifest = Manifest::builtin("ucf_hmdb").unwrap();
    let scan = scan_ucf101(tmp.path()).unwrap();
    let total = u64::from(CLIPS * FRAMES);
    let mut g = c.benchmark_group("prep_320x240_mpeg4");
    g.throughput(Throughput::Elements(total));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    g.warm_up_time(Duration::from_secs(2));

    let out = tmp.path().join("out");
    g.bench_function("vdg_prep_jobs1", |b| {
        b.iter(|| prep_once(&manifest, &scan, &out, 1, false))
    });
    g.bench_function("vdg_prep_all_cores", |b| {
        b.iter(|| prep_once(&manifest, &scan, &out, 0, false))
    });
    // What two cores give two independent single-worker preps (each its own output, the
    // same input), run at once: the machine's own ceiling for `--jobs 2`. Throughput
    // counts both runs' frames.
    let out2 = tmp.path().join("out2");
    g.throughput(Throughput::Elements(2 * total));
    g.bench_function("two_independent_jobs1_at_once", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                s.spawn(|| prep_once(&manifest, &scan, &out, 1, false));
                s.spawn(|| prep_once(&manifest, &scan, &out2, 1, false));
            })
        })
    });
    g.throughput(Throughput::Elements(total));
    // The route before JPEG was encoded from the decoder's planes (`--jpeg-via-rgb`).
    g.bench_function("vdg_prep_jobs1_via_rgb", |b| {
        b.iter(|| prep_once(&manifest, &scan, &out, 1, true))
    });
    g.bench_function("vdg_prep_all_cores_via_rgb", |b| {
        b.iter(|| prep_once(&manifest, &scan, &out, 0, true))
    });
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            let n: u64 = clips.iter().map(|p| decode_only(p)).sum();
            assert_eq!(n, total);
        })
    });
    // Decoding plus what the encoder gets: packed RGB, or the range-expanded YUV planes.
    for (name, yuv420) in [("decode_rgb", false), ("decode_yuv420", true)] {
        let opts = DecodeOptions {
            yuv420,
            ..Default::default()
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0u64;
                for p in &clips {
                    decode_video(
                        p,
                        &opts,
                        |_, _| true,
                        |_| {
                            n += 1;
                            Ok(())
                        },
                    )
                    .unwrap();
                }
                assert_eq!(n, total);
            })
        });
    }
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|t| pattern_frame(WIDTH, HEIGHT, t, 1))
        .collect();
    g.bench_function("jpeg_encode_turbojpeg", |b| {
        let mut enc = vdg_pipeline::jpeg::JpegEncoder::new(90).unwrap();
        b.iter(|| {
            for _ in 0..CLIPS {
                for f in &frames {
                    let j = enc
                        .encode_rgb(f, WIDTH, HEIGHT, 3 * WIDTH as usize)
                        .unwrap();
                    std::hint::black_box(j);
                }
            }
        })
    });
    // The same frames as full-range 4:2:0 planes (what `decode_yuv420` hands over).
    let planes: Vec<[Vec<u8>; 3]> = frames.iter().map(|f| to_yuv420(f)).collect();
    g.bench_function("jpeg_encode_turbojpeg_from_yuv", |b| {
        let mut enc = vdg_pipeline::jpeg::JpegEncoder::new(90).unwrap();
        let (w, cw) = (WIDTH as usize, WIDTH.div_ceil(2) as usize);
        b.iter(|| {
            for _ in 0..CLIPS {
                for [y, u, v] in &planes {
                    let j = enc
                        .encode_yuv420([y, u, v], [w, cw, cw], WIDTH, HEIGHT)
                        .unwrap();
                    std::hint::black_box(j);
                }
            }
        })
    });
    // The pure-Rust alternative prep used before (same quality, 4:2:0).
    g.bench_function("jpeg_encode_jpeg_encoder_crate", |b| {
        b.iter(|| {
            for _ in 0..CLIPS {
                for f in &frames {
                    let mut out = Vec::new();
                    let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
                    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
                    enc.encode(f, WIDTH as u16, HEIGHT as u16, jpeg_encoder::ColorType::Rgb)
                        .unwrap();
                    std::hint::black_box(out);
                }
            }
        })
    });
    if has_ffmpeg() {
        let jpg = tmp.path().join("jpg");
        g.bench_function("ffmpeg_cli_jpeg", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_dir_all(&jpg);
                    let start = Instant::now();
                    for (i, p) in clips.iter().enumerate() {
                        let dir = jpg.join(i.to_string());
                        std::fs::create_dir_all(&dir).unwrap();
                        let st = Command::new("ffmpeg")
                            .args(["-nostdin", "-loglevel", "error", "-threads", "1", "-i"])
                            .arg(p)
                            .args(["-filter_threads", "1", "-vf", "scale=-2:240", "-q:v", "2"])
                            .arg(dir.join("%06d.jpg"))
                            .status()
                            .unwrap();
                        assert!(st.success());
                    }
                    spent += start.elapsed();
                }
                spent
            })
        });
    } else {
        eprintln!("ffmpeg_cli_jpeg skipped: no `ffmpeg` program on PATH (apt-get install ffmpeg)");
    }
    g.finish();
}

/// PKU-MMD: clips cut from one long 1080p recording, decoded once for all its intervals.
fn bench_pku(c: &mut Criterion) {
    vdg_pipeline::decode::init();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pku");
    std::fs::create_dir_all(root.join("RGB_VIDEO")).unwrap();
    std::fs::create_dir_all(root.join("Label")).unwrap();
    let video = root.join("RGB_VIDEO/0001-L.avi");
    const LONG: u32 = 300;
    write_pattern_video(&video, "mpeg4", 1920, 1080, 30, LONG, 7).unwrap();
    // Six intervals covering 210 of the 300 frames, as PKU-MMD's ~20 per recording do.
    let intervals = [
        (0u64, 39u64),
        (45, 79),
        (85, 124),
        (140, 169),
        (180, 219),
        (250, 289),
    ];
    let label: String = intervals
        .iter()
        .enumerate()
        .map(|(k, (a, b))| format!("{},{a},{b},1\n", [1, 2, 3, 5, 6, 7][k]))
        .collect();
    std::fs::write(root.join("Label/0001-L.txt"), label).unwrap();
    let clip_frames: u64 = intervals.iter().map(|(a, b)| b - a + 1).sum();
    let manifest = Manifest::builtin("pku_mmd").unwrap();
    let scan = vdg_pipeline::scan::scan_pku_mmd(&root, None, 0).unwrap();
    let out = tmp.path().join("out");

    let mut g = c.benchmark_group("pku_1080p_intervals");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.warm_up_time(Duration::from_secs(2));
    // Throughput in frames written (the clips' frames).
    g.throughput(Throughput::Elements(clip_frames));
    g.bench_function("vdg_prep_one_pass_jobs1", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&out);
            let plan = build_plan(&manifest, &[&scan], &ContentOptions::default()).unwrap();
            let quiet = |_: &PrepEvent<'_>| {};
            let s = run_prep(
                &plan,
                &out,
                &RunOptions {
                    jobs: 1,
                    ..Default::default()
                },
                &quiet,
            )
            .unwrap();
            assert_eq!(s.record.counts.frames, clip_frames);
        })
    });
    g.finish();

    // Several recordings of many clips each (PKU-MMD's shape, smaller frames): the job runner
    // must decode recordings in parallel.
    let multi = tmp.path().join("pku4");
    std::fs::create_dir_all(multi.join("RGB_VIDEO")).unwrap();
    std::fs::create_dir_all(multi.join("Label")).unwrap();
    let mut multi_frames = 0u64;
    for r in 1..=4u32 {
        let name = format!("{r:04}-L");
        write_pattern_video(
            &multi.join(format!("RGB_VIDEO/{name}.avi")),
            "mpeg4",
            640,
            360,
            30,
            600,
            r,
        )
        .unwrap();
        // 20 intervals of 25 frames, 5 frames apart.
        let label: String = (0..20u64)
            .map(|k| format!("{},{},{},1\n", 1 + k % 7, k * 30, k * 30 + 24))
            .collect();
        multi_frames += 20 * 25;
        std::fs::write(multi.join(format!("Label/{name}.txt")), label).unwrap();
    }
    let multi_scan = vdg_pipeline::scan::scan_pku_mmd(&multi, None, 0).unwrap();
    let multi_out = tmp.path().join("out4");
    let mut g = c.benchmark_group("pku_4_recordings_x_20_clips");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(multi_frames));
    for jobs in [1usize, 2] {
        g.bench_function(format!("vdg_prep_jobs{jobs}"), |b| {
            b.iter(|| {
                let _ = std::fs::remove_dir_all(&multi_out);
                let plan =
                    build_plan(&manifest, &[&multi_scan], &ContentOptions::default()).unwrap();
                let quiet = |_: &PrepEvent<'_>| {};
                let s = run_prep(
                    &plan,
                    &multi_out,
                    &RunOptions {
                        jobs,
                        ..Default::default()
                    },
                    &quiet,
                )
                .unwrap();
                assert_eq!(s.record.counts.frames, multi_frames);
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("pku_1080p_intervals");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(clip_frames));
    // The same clips cut the naive way: decode the recording from its start for each interval.
    g.bench_function("decode_once_per_interval", |b| {
        b.iter(|| {
            for (a, e) in intervals {
                let opts = DecodeOptions {
                    stop_after_frames: Some(e + 1),
                    ..DecodeOptions::default()
                };
                decode_video(&video, &opts, |i, _| i >= a, |_| Ok(())).unwrap();
            }
        })
    });
    // The ceiling: decoding the whole recording once, nothing else.
    g.bench_function("decode_only_whole_video", |b| {
        b.iter(|| assert_eq!(decode_only(&video), u64::from(LONG)))
    });
    g.finish();
}

/// The loader's read path on an SSv2-shaped shard: 1,000 short videos in one shard (a
/// row group each, a footer of about a megabyte), 5 frames sampled from each video in
/// turn, as `vdg train` reads them (`read_frames_at`).
fn bench_loader(c: &mut Criterion) {
    use vdg_data::EncodedFrame;
    use vdg_data::shard::{
        DEFAULT_MAX_ROW_GROUP_BYTES, FrameShardWriter, ShardMeta, read_frames_at,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut w = FrameShardWriter::create(dir.path(), 0, DEFAULT_MAX_ROW_GROUP_BYTES).unwrap();
    let (videos, frames) = (1000u32, 40u32);
    let mut firsts = Vec::new();
    for v in 0..videos {
        let f: Vec<EncodedFrame> = (0..frames)
            .map(|i| EncodedFrame {
                source_frame: i,
                time_secs: Some(f64::from(i) / 12.0),
                jpeg: vec![(v + i) as u8; 3000],
            })
            .collect();
        firsts.push(w.write_video(&format!("ssv2/{v}.webm"), &f).unwrap());
    }
    let path = dir.path().join(vdg_data::shard::frames_file_name(0));
    w.finish(&ShardMeta {
        schema_version: vdg_data::shard::SHARD_SCHEMA_VERSION,
        plan_fingerprint: "bench".into(),
        shard: 0,
        first_position: 0,
        videos: Vec::new(),
    })
    .unwrap();
    let mut g = c.benchmark_group("loader_ssv2_shard_1000_videos");
    g.throughput(Throughput::Elements(100));
    g.bench_function("read_frames_at_100_clips_of_5", |b| {
        let mut k = 0usize;
        b.iter(|| {
            for _ in 0..100 {
                let first = firsts[k % firsts.len()];
                k = k.wrapping_add(7919);
                let got = read_frames_at(&path, first, &[4, 12, 20, 28, 36]).unwrap();
                assert_eq!(got.len(), 5);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_pku, bench_loader);
criterion_main!(benches);
