use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::util::*;

fn prep(layout: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let root = layout.to_str().unwrap();
    let mut args = vec![
        "prep",
        "ucf-hmdb",
        "--ucf101",
        root,
        "--hmdb51",
        root,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn prep_writes_shards_that_read_back_independently() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let out = tmp.path().join("out");
    let o = prep(&layout.root, &out, &["--jobs", "2"]);
    // Some videos failed: exit code 1, each failed file named.
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    for id in layout.bad.keys() {
        assert!(
            stderr.contains(id.as_str()),
            "stderr does not name {id}\n{}",
            text(&o)
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("skipped (classes outside the benchmark): ucf101 1"),
        "{}",
        text(&o)
    );

    let vids = videos(&out);
    let ids: BTreeSet<&str> = vids.iter().map(|v| v.video_id.as_str()).collect();
    let expected: BTreeSet<&str> = layout
        .good
        .keys()
        .chain(layout.bad.keys())
        .map(String::as_str)
        .collect();
    assert_eq!(ids, expected, "exactly the benchmark's videos are planned");
    let sorted: Vec<&str> = vids.iter().map(|v| v.video_id.as_str()).collect();
    assert!(
        sorted.windows(2).all(|w| w[0] < w[1]),
        "rows in video-id order"
    );

    // Labels and domains follow the manifest (dataset-facts 2.1).
    let want_label = |id: &str| -> (u32, &str, &str) {
        let class = id.split('/').nth(1).unwrap();
        match class {
            "Biking" => (7, "ride_bike", "ucf"),
            "PullUps" => (4, "pullup", "ucf"),
            "BoxingSpeedBag" => (5, "punch", "ucf"),
            "ride_bike" => (7, "ride_bike", "hmdb"),
            "pullup" => (4, "pullup", "hmdb"),
            "punch" => (5, "punch", "hmdb"),
            other => panic!("unexpected class {other}"),
        }
    };
    for v in &vids {
        let (label, name, domain) = want_label(&v.video_id);
        assert_eq!(
            (v.label, v.label_name.as_str(), v.domain.as_str()),
            (label, name, domain),
            "{v:?}"
        );
        assert!(v.split == "train" || v.split == "val");
    }

    // Failed videos: recorded with their reason and no frames.
    for (id, why) in &layout.bad {
        let v = vids.iter().find(|v| &v.video_id == id).unwrap();
        assert_eq!(v.status, "failed");
        let err = v.error.as_deref().unwrap_or_default();
        assert!(
            err.contains(why),
            "{id}: error {err:?} should mention {why:?}"
        );
        assert_eq!(v.num_frames, 0);
        assert_eq!(v.shard, None);
    }

    // Good videos: every encoded frame is there, in order, and decodes to the right picture.
    let frames = frames(&out);
    assert_eq!(
        frames.len(),
        layout.good.len(),
        "only good videos have frames"
    );
    for (id, (n, seed)) in &layout.good {
        let v = vids.iter().find(|v| &v.video_id == id).unwrap();
        assert_eq!(v.status, "ok", "{v:?}");
        assert_eq!(v.num_frames, *n, "{id}");
        let fr = &frames[id];
        assert_eq!(fr.len(), *n as usize, "{id}");
        for (t, (idx, jpeg)) in fr.iter().enumerate() {
            assert_eq!(*idx as usize, t);
            let (w, h, rgb) = decode_jpeg(jpeg);
            assert_eq!(
                (w as u32, h as u32),
                (W, H),
                "no upscaling of a {W}x{H} video"
            );
            assert_eq!((v.width, v.height), (Some(W), Some(H)));
            // The right picture: close to its source frame, and closer to it than to the
            // next frame or to another clip's frame.
            let e = pattern_error(&rgb, t as u32, *seed);
            let next = pattern_error(&rgb, t as u32 + 1, *seed);
            let other = pattern_error(&rgb, t as u32, *seed + 1);
            assert!(
                e < 20.0 && e < next && e < other,
                "{id} frame {t}: mean abs error {e:.1} (next frame {next:.1}, other clip {other:.1})"
            );
        }
    }

    // Source splits: group-aware (no UCF group or HMDB film on both sides), both sides used.
    let mut sides: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for v in vids.iter().filter(|v| v.group.is_some()) {
        let class = v.video_id.split('/').nth(1).unwrap().to_owned();
        sides
            .entry((class, v.group.clone().unwrap()))
            .or_default()
            .insert(v.split.clone());
    }
    assert!(
        sides.values().all(|s| s.len() == 1),
        "a group straddles train and val: {sides:?}"
    );
    let ucf_val = vids
        .iter()
        .filter(|v| v.domain == "ucf" && v.split == "val")
        .count();
    assert!(ucf_val > 0 && ucf_val < vids.iter().filter(|v| v.domain == "ucf").count());

    // prep.json agrees with the tables.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("prep.json")).unwrap()).unwrap();
    assert_eq!(rec["counts"]["failed"], layout.bad.len());
    assert_eq!(rec["counts"]["ok"], layout.good.len());
    let total: u32 = layout.good.values().map(|(n, _)| n).sum();
    assert_eq!(rec["counts"]["frames"], total);
    assert_eq!(rec["benchmark"], "ucf_hmdb");
    assert_eq!(rec["options"]["jpeg_quality"], 90);

    // No temporary files left; a rerun does no work and says so (same exit code).
    assert!(
        std::fs::read_dir(&out).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );
    let before = outputs(&out);
    let again = prep(&layout.root, &out, &[]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("up to date"),
        "{}",
        text(&again)
    );
    assert_eq!(outputs(&out), before);
}

#[test]
fn output_is_byte_identical_whatever_the_jobs_and_shards_split_videos_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    // Small shards so the run spans several.
    let oa = prep(&layout.root, &a, &["--jobs", "1", "--shard-size", "40KiB"]);
    let ob = prep(&layout.root, &b, &["--jobs", "3", "--shard-size", "40KiB"]);
    assert_eq!(oa.status.code(), Some(1), "{}", text(&oa));
    assert_eq!(ob.status.code(), Some(1), "{}", text(&ob));
    let fa = outputs(&a);
    assert!(
        fa.keys().filter(|k| k.starts_with("frames-")).count() >= 3,
        "{:?}",
        fa.keys()
    );
    assert_eq!(
        fa,
        outputs(&b),
        "outputs differ between --jobs 1 and --jobs 3"
    );
    // Each video's rows are contiguous, in one shard, where videos.parquet says.
    let vids = videos(&a);
    for s in 0.. {
        let p = a.join(format!("frames-{s:05}.parquet"));
        if !p.exists() {
            break;
        }
        let mut row = 0i64;
        for batch in batches(&p) {
            let ids = col::<arrow_array::StringArray>(&batch, "video_id");
            for i in 0..batch.num_rows() {
                let v = vids.iter().find(|v| v.video_id == ids.value(i)).unwrap();
                assert_eq!(v.shard, Some(s));
                let first = v.first_row.unwrap();
                assert!(row >= first && row < first + v.num_frames as i64);
                row += 1;
            }
        }
    }
}

#[test]
fn resume_after_a_crash_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let reference = tmp.path().join("ref");
    let o = prep(&layout.root, &reference, &["--shard-size", "40KiB"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let want = outputs(&reference);
    let shard_names: Vec<&String> = want.keys().filter(|k| k.starts_with("frames-")).collect();
    assert!(shard_names.len() >= 3);

    // The state a crash leaves: two complete shards, a half-written next shard, no tables.
    let crashed = tmp.path().join("crashed");
    std::fs::create_dir_all(&crashed).unwrap();
    for name in &shard_names[..2] {
        std::fs::write(crashed.join(name), &want[*name]).unwrap();
    }
    let next = shard_names[2];
    std::fs::write(
        crashed.join(format!("{next}.tmp")),
        &want[next][..want[next].len() / 2],
    )
    .unwrap();
    let o = prep(
        &layout.root,
        &crashed,
        &["--shard-size", "40KiB", "--jobs", "2"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("resumed"),
        "{}",
        text(&o)
    );
    assert_eq!(
        outputs(&crashed),
        want,
        "resumed output differs from an uninterrupted run"
    );

    // Killed before prep.json (all shards and videos.parquet done): same result.
    std::fs::remove_file(crashed.join("prep.json")).unwrap();
    let o = prep(&layout.root, &crashed, &["--shard-size", "40KiB"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(outputs(&crashed), want);

    // A real kill -9 at several moments: whatever it interrupts, the rerun converges.
    for delay_ms in [0u64, 30, 80, 200] {
        let killed = tmp.path().join(format!("killed-{delay_ms}"));
        let root = layout.root.to_str().unwrap();
        let mut child = vdg()
            .args([
                "prep", "ucf-hmdb", "--ucf101", root, "--hmdb51", root, "--out",
            ])
            .arg(&killed)
            .args(["--shard-size", "40KiB", "-q"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let o = prep(&layout.root, &killed, &["--shard-size", "40KiB"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert_eq!(outputs(&killed), want, "after kill at {delay_ms} ms");
    }
}

#[test]
fn other_options_on_a_prepared_folder_are_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let out = tmp.path().join("out");
    assert_eq!(prep(&layout.root, &out, &[]).status.code(), Some(1));
    let before = outputs(&out);
    let o = prep(&layout.root, &out, &["--seed", "9"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{}",
        text(&o)
    );
    assert_eq!(outputs(&out), before, "a refused run changes nothing");
    let o = prep(&layout.root, &out, &["--seed", "9", "--force"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_ne!(outputs(&out)["videos.parquet"], before["videos.parquet"]);
}

#[test]
fn released_code_split_rule_and_options_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let out = tmp.path().join("out");
    let o = prep(
        &layout.root,
        &out,
        &[
            "--split-rule",
            "released-code",
            "--short-side",
            "24",
            "--max-fps",
            "10",
            "--jpeg-quality",
            "70",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("prep.json")).unwrap()).unwrap();
    assert_eq!(rec["options"]["split_rule"], "released-code");
    let vids = videos(&out);
    // 80/20 floor per class: 8 Biking clips (one failed still counts as planned) -> 7 train.
    let biking_train = vids
        .iter()
        .filter(|v| v.video_id.starts_with("ucf101/Biking/") && v.split == "train")
        .count();
    assert_eq!(biking_train, 7);
    let fr = frames(&out);
    for v in vids.iter().filter(|v| v.status == "ok") {
        // 64x48 -> short side 24 keeps the aspect: 32x24.
        assert_eq!((v.width, v.height), (Some(32), Some(24)));
        let (w, h, _) = decode_jpeg(&fr[&v.video_id][0].1);
        assert_eq!((w, h), (32, 24));
        let (n, _) = layout.good[&v.video_id];
        let fps = if v.domain == "ucf" { 25.0 } else { 30.0 };
        let expected = (0..n as u64)
            .filter(|&i| vdg_pipeline::decode::keep_frame(i, fps, Some(10.0)))
            .count();
        assert_eq!(v.num_frames as usize, expected, "{}", v.video_id);
    }
}

#[test]
fn bad_manifest_and_missing_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(raw.join("UCF-101/Biking")).unwrap();
    std::fs::create_dir_all(raw.join("hmdb51/climb")).unwrap();
    let out = tmp.path().join("out");
    let o = prep(&tmp.path().join("nope"), &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        text(&o)
    );

    let bad = tmp.path().join("bad.toml");
    let text_ok = vdg_data::manifest::BUILTIN_MANIFESTS[0].1;
    std::fs::write(
        &bad,
        text_ok.replace("segments = 5", "segments = 5\nsegmnets = 3"),
    )
    .unwrap();
    let o = prep(&raw, &out, &["--manifest", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("segmnets"),
        "{}",
        text(&o)
    );

    // Class folders present but no videos: an error, not an empty dataset.
    let o = prep(&raw, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no videos"),
        "{}",
        text(&o)
    );
    assert!(!out.join("prep.json").exists());
}
