use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::{Array, FixedSizeListArray, Float32Array, Int32Array, StringArray};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vdg_trainer::loader::{eval_view, resample};
use vdg_trainer::models::blocks::{Backbone, BackboneKind};

use crate::util::*;

fn prepared_synthetic(root: &Path) -> PathBuf {
    let out = root.join("syn");
    let o = run(&[
        "prep",
        "synthetic",
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "tiny",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    out
}

fn features_args<'a>(data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "features",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--backbone",
        "small_cnn",
        "--input-size",
        "32",
        "--shard-videos",
        "10",
        "-q",
    ];
    if !extra.contains(&"--batch-frames") {
        args.extend_from_slice(&["--batch-frames", "7"]);
    }
    args.extend_from_slice(extra);
    args
}

fn features(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run(&features_args(data, out, extra))
}

/// Every feature row of a folder, read with the generic Parquet reader:
/// video id -> [(frame_index, source_frame, feature)].
fn read_features(dir: &Path) -> BTreeMap<String, Vec<(i32, i32, Vec<f32>)>> {
    let mut out: BTreeMap<String, Vec<(i32, i32, Vec<f32>)>> = BTreeMap::new();
    for s in 0.. {
        let p = dir.join(format!("features-{s:05}.parquet"));
        if !p.exists() {
            break;
        }
        for b in batches(&p) {
            let ids = col::<StringArray>(&b, "video_id");
            let idx = col::<Int32Array>(&b, "frame_index");
            let src = col::<Int32Array>(&b, "source_frame");
            let f = col::<FixedSizeListArray>(&b, "feature");
            for i in 0..b.num_rows() {
                let v = f.value(i);
                let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
                out.entry(ids.value(i).to_owned()).or_default().push((
                    idx.value(i),
                    src.value(i),
                    v.values().to_vec(),
                ));
            }
        }
    }
    out
}

#[test]
fn features_match_the_backbone_resume_to_the_same_bytes_and_refuse_other_options() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_synthetic(tmp.path());
    let out = tmp.path().join("feat");
    let o = features(&data, &out, &["--every", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // Read back independently: one row per second prepared frame, in order, 256 wide.
    let feats = read_features(&out);
    let prepared = videos(&data);
    let ok: Vec<&Video> = prepared.iter().filter(|v| v.status == "ok").collect();
    assert_eq!(feats.len(), ok.len());
    let cached = videos(&out);
    for v in &ok {
        let rows = &feats[&v.video_id];
        assert_eq!(
            rows.len() as u32,
            v.num_frames.div_ceil(2),
            "{}",
            v.video_id
        );
        for (k, (idx, src, f)) in rows.iter().enumerate() {
            assert_eq!((*idx, *src), (k as i32, 2 * k as i32));
            assert_eq!(f.len(), 256);
        }
        let c = cached.iter().find(|c| c.video_id == v.video_id).unwrap();
        assert_eq!(c.num_frames as usize, rows.len());
        assert_eq!((c.label, &c.domain), (v.label, &v.domain));
    }

    // The values are the small CNN's (seed 0) on the evaluation view of the stored JPEGs.
    let vm = VarMap::new();
    let backbone = Backbone::new(
        BackboneKind::SmallCnn,
        1,
        0.0,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("backbone"),
    )
    .unwrap();
    vdg_trainer::init::seeded_init(&vm, 0).unwrap();
    let jpegs = frames(&data);
    let v = ok[3];
    let (w, h, rgb) = decode_jpeg(&jpegs[&v.video_id][4].1);
    let mut px = vec![0f32; 3 * 32 * 32];
    resample(&rgb, w, h, &eval_view(w, h, 32), 32, &mut px);
    let x = Tensor::from_vec(px, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let want = backbone
        .trunk_features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = &feats[&v.video_id][2].2;
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }

    // Resume: lose a shard, leave a half-written file; the rerun restores the same bytes.
    let before = outputs(&out);
    std::fs::remove_file(out.join("features-00002.parquet")).unwrap();
    std::fs::remove_file(out.join("features.json")).unwrap();
    std::fs::write(out.join("features-00003.parquet.tmp"), b"partial").unwrap();
    let o = features(&data, &out, &["--every", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("kept from an earlier run"),
        "{}",
        text(&o)
    );
    assert_eq!(outputs(&out), before, "resumed folder differs");

    // The batch size of the backbone passes does not change a byte (so it is not part of
    // the fingerprint, and a resume may use another one).
    let other = tmp.path().join("feat-b64");
    let o = features(&data, &other, &["--every", "2", "--batch-frames", "64"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(outputs(&other), before, "--batch-frames changed the output");

    // Other options into the same folder: refused, naming a shard, nothing changed.
    let o = features(&data, &out, &["--every", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("features-00000.parquet"), "{}", text(&o));
    assert_eq!(outputs(&out), before);
    // ... unless --force: then it is the folder a fresh run would write.
    let o = features(&data, &out, &["--every", "1", "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let fresh = tmp.path().join("feat-every1");
    let o = features(&data, &fresh, &["--every", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(outputs(&out), outputs(&fresh));
}

/// A read of the prepared frames that does not return (debug hook
/// `VDG_INJECT_LOADER_DELAY_MS`) stops `vdg features` within `--stall-timeout`, naming the
/// shard, instead of hanging; the rerun gives the features of a run that never stalled.
/// A feature folder verifies against its features.json (shards and videos.parquet); a shard
/// changed in place at its size is named by verify, and a rerun of `vdg features` computes it
/// again (it used to keep it and record its new hash as good) to the bytes of a clean run.
#[test]
fn verify_checks_a_feature_folder_and_a_rerun_recomputes_a_changed_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_synthetic(tmp.path());
    let out = tmp.path().join("feat");
    let o = features(&data, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let verify = || run(&["prep", "verify", out.to_str().unwrap()]);
    let o = verify();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("all match features.json"), "{}", text(&o));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("features.json")).unwrap()).unwrap();
    assert_eq!(record["videos_table"]["file"], "videos.parquet");
    let shards = record["shards"].as_array().unwrap().len();
    assert!(
        text(&o).contains(&format!("verified {} file(s)", shards + 1)),
        "{}",
        text(&o)
    );
    let clean = std::fs::read(out.join("features-00001.parquet")).unwrap();

    // One bit of the middle of a shard, its size unchanged; a stray shard beside it.
    let mut bytes = clean.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(out.join("features-00001.parquet"), &bytes).unwrap();
    std::fs::write(out.join("features-00042.parquet"), b"PAR1").unwrap();
    let o = verify();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    for want in [
        "features-00001.parquet: same size, but its SHA-256 is not the one features.json records",
        "features-00042.parquet: not listed in features.json",
        "vdg features",
    ] {
        assert!(text(&o).contains(want), "{want}: {}", text(&o));
    }
    assert!(
        !text(&o).contains("features-00000.parquet:"),
        "{}",
        text(&o)
    );

    // The rerun computes the changed shard again: the clean bytes, and verify passes.
    std::fs::remove_file(out.join("features-00042.parquet")).unwrap();
    let o = features(&data, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("features-00001.parquet: its bytes changed"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(out.join("features-00001.parquet")).unwrap(),
        clean
    );
    let o = verify();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn a_read_that_does_not_return_stops_features_naming_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_synthetic(tmp.path());
    let clean = tmp.path().join("clean");
    let o = features(&data, &clean, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = tmp.path().join("feat");
    let args = features_args(&data, &out, &["--stall-timeout", "1"]);
    let started = std::time::Instant::now();
    let child = spawn_with_env(&args, "VDG_INJECT_LOADER_DELAY_MS", "20000");
    let o = wait_at_most(child, 60, "a features run whose read stalls");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let line = log_line(&o, "no batch read for 1 s");
    assert!(
        line.contains(&format!("{}/frames-00000.parquet", data.display())),
        "{line}"
    );
    let o = features(&data, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(read_features(&out), read_features(&clean));
}

/// `vdg bench run --features` trains every cell on the cache, and the reports mark the frozen
/// backbone.
#[test]
fn bench_runs_on_a_feature_cache_and_marks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_synthetic(tmp.path());
    let feat = tmp.path().join("feat");
    let o = features(&data, &feat, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = tmp.path().join("bench");
    let o = run(&[
        "bench",
        "run",
        "--features",
        feat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--models",
        "apn",
        "--ada",
        "none",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--directions",
        "source->target",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let config = std::fs::read_to_string(
        out.join("runs/synthetic/source_to_target/apn/none/seed-0/config.toml"),
    )
    .unwrap();
    assert!(config.contains("ada_space = \"features\""), "{config}");
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    assert!(
        md.contains("| APN † |") && md.contains("frozen backbone"),
        "{md}"
    );
}

#[test]
fn every_head_trains_on_cached_features_and_networks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_synthetic(tmp.path());
    let feat = tmp.path().join("feat");
    let o = features(&data, &feat, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let f = feat.to_str().unwrap();
    for (model, ada) in [
        ("tsn", "ada"),
        ("trn", "ada_star"),
        ("trn_attn", "none"),
        ("apn", "ada_star"),
    ] {
        let out = tmp.path().join(model);
        let o = run(&[
            "train",
            "--features",
            f,
            "--direction",
            "source->target",
            "--model",
            model,
            "--ada",
            ada,
            "--gammas",
            "0.1",
            "--ada-steps",
            "1",
            "--epochs",
            "1",
            "--feature-dim",
            "16",
            "--batch-size",
            "8",
            "--out",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert_eq!(o.status.code(), Some(0), "{model}: {}", text(&o));
        let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
        assert!(
            config.contains("ada_space = \"features\"") && config.contains("small_cnn"),
            "{config}"
        );
        // Only the projection and the head were trained: no trunk weights in checkpoints.
        let ckpt = candle_core::safetensors::load(
            out.join("member-0/ckpt-000001/best.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        assert!(ckpt.keys().any(|k| k.starts_with("backbone.new_fc")));
        assert!(
            !ckpt.keys().any(|k| k.starts_with("backbone.cnn")),
            "{:?}",
            ckpt.keys()
        );
    }
    let o = run(&[
        "train",
        "--features",
        f,
        "--direction",
        "source->target",
        "--model",
        "i3d",
        "--out",
        tmp.path().join("i3d").to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("cannot train on cached features"),
        "{}",
        text(&o)
    );
    // Not a feature folder: a clear error.
    let o = run(&[
        "train",
        "--features",
        data.to_str().unwrap(),
        "--direction",
        "source->target",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("features.json"), "{}", text(&o));
}
