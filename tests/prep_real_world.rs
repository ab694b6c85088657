//! `vdg prep` on files and folders as users have them: H.264 remuxed into AVI, copies cut
//! short, partial downloads, wrong paths, hand-edited `prep.json`.

use std::path::Path;
use std::time::Duration;

use arrow_array::{Array, BooleanArray, StringArray, UInt32Array};
use vdg_pipeline::encode::{VideoWriter, pattern_frame, remux, write_pattern_video};

use crate::util::*;

fn prep(ucf: &Path, hmdb: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "prep",
        "ucf-hmdb",
        "--ucf101",
        ucf.to_str().unwrap(),
        "--hmdb51",
        hmdb.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// UCF-101 with Biking as H.264 remuxed into AVI (no re-encoding) plus a copy of it cut
/// short, and PullUps as MPEG-4 (one with damage the decoder conceals, one that loses frames
/// inside the stream); hmdb51 with two
/// ride_bike clips. Every other manifest
/// class has no videos (a partial download).
fn partial_layout(root: &Path) {
    let ucf = root.join("UCF-101");
    std::fs::create_dir_all(ucf.join("Biking")).unwrap();
    let nut = root.join("h264.nut");
    let mut w = VideoWriter::create_with_b_frames(&nut, "libx264", W, H, 25, 2).unwrap();
    for t in 0..50 {
        w.write_rgb(&pattern_frame(W, H, t, 5)).unwrap();
    }
    w.finish().unwrap();
    let avi = ucf.join("Biking/v_Biking_g01_c01.avi");
    remux(&nut, &avi, 0.0).unwrap();
    std::fs::remove_file(&nut).unwrap();
    let bytes = std::fs::read(&avi).unwrap();
    std::fs::write(
        ucf.join("Biking/v_Biking_g02_c01.avi"),
        &bytes[..bytes.len() * 6 / 10],
    )
    .unwrap();
    for g in 1..=2 {
        let p = ucf.join(format!("PullUps/v_PullUps_g{g:02}_c01.avi"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_pattern_video(&p, "mpeg4", W, H, 25, 20, g).unwrap();
    }
    // Eight bytes of the middle third flipped, a 24th of the file apart: every packet still
    // decodes, and the decoder fills the damaged macroblocks from their neighbours.
    let damaged = ucf.join("PullUps/v_PullUps_g03_c01.avi");
    write_pattern_video(&damaged, "mpeg4", 160, 120, 25, 50, 4).unwrap();
    let mut bytes = std::fs::read(&damaged).unwrap();
    let n = bytes.len();
    for i in (n / 3..2 * n / 3).step_by(n / 24) {
        bytes[i] ^= 0x5a;
    }
    std::fs::write(&damaged, bytes).unwrap();
    // Denser damage, every 97th byte of the middle third: ten packets the decoder rejects,
    // their frames lost inside a stream whose end is intact.
    let lossy = ucf.join("PullUps/v_PullUps_g04_c01.avi");
    write_pattern_video(&lossy, "mpeg4", 160, 120, 25, 50, 4).unwrap();
    let mut bytes = std::fs::read(&lossy).unwrap();
    let n = bytes.len();
    for i in (n / 3..2 * n / 3).step_by(97) {
        bytes[i] ^= 0x5a;
    }
    std::fs::write(&lossy, bytes).unwrap();
    // A name outside UCF101's v_<Class>_gGG_cCC pattern: kept, in a group of its own, counted.
    write_pattern_video(
        &ucf.join("PullUps/pullups extra.avi"),
        "mpeg4",
        W,
        H,
        25,
        20,
        7,
    )
    .unwrap();
    for (i, film) in ["Alpha", "Beta"].iter().enumerate() {
        let p = root.join(format!(
            "hmdb51/ride_bike/{film}_ride_bike_f_cm_np1_fr_med_{i}.avi"
        ));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_pattern_video(&p, "mpeg4", W, H, 30, 20, 10 + i as u32).unwrap();
    }
}

#[test]
fn h264_in_avi_is_kept_its_cut_copy_fails_and_empty_classes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    partial_layout(&raw);
    let out = tmp.path().join("out");

    // --strict: the partial download stops the run before anything is written.
    let o = prep(&raw, &raw, &out, &["--strict"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ucf/climb") && err.contains("hmdb/walk"),
        "{}",
        text(&o)
    );
    assert!(!out.join("prep.json").exists());

    let o = prep(&raw, &raw, &out, &[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the cut copy failed\n{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    // Named at the end of the run, not only in warnings at the start.
    let tail = err
        .rsplit("failed and were recorded")
        .next()
        .unwrap_or_default();
    assert!(
        tail.contains("have no videos") && tail.contains("ucf/climb"),
        "{}",
        text(&o)
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("prep.json")).unwrap()).unwrap();
    let empty: Vec<&str> = rec["counts"]["empty_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        empty.contains(&"ucf/climb") && empty.contains(&"hmdb/pullup"),
        "{empty:?}"
    );
    assert!(!empty.contains(&"ucf/ride_bike") && !empty.contains(&"ucf/pullup"));
    assert!(
        rec["libraries"]["libavcodec"].as_str().is_some(),
        "{}",
        rec["libraries"]
    );
    assert_eq!(rec["counts"]["ungrouped"]["ucf101"], 1, "{}", rec["counts"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("did not parse into a split group"),
        "{}",
        text(&o)
    );

    let vids = videos(&out);
    let by_id = |id: &str| vids.iter().find(|v| v.video_id == id).unwrap();
    let good = by_id("ucf101/Biking/v_Biking_g01_c01.avi");
    assert_eq!(
        (good.status.as_str(), good.num_frames),
        ("ok", 50),
        "{:?}",
        good.error
    );
    assert_eq!(good.warning, None);
    // Concealed damage: kept, and the row says how many stored frames it touched.
    let damaged = by_id("ucf101/PullUps/v_PullUps_g03_c01.avi");
    assert_eq!(damaged.status, "ok", "{:?}", damaged.error);
    assert!(
        damaged
            .warning
            .as_deref()
            .unwrap_or("")
            .contains("frames kept were decoded from damaged data"),
        "{:?}",
        damaged.warning
    );
    // Frames lost inside the stream, beyond max(2, 2 %): failed, the error says so.
    let lossy = by_id("ucf101/PullUps/v_PullUps_g04_c01.avi");
    assert_eq!(lossy.status, "failed");
    assert!(
        lossy
            .error
            .as_deref()
            .unwrap_or("")
            .contains("packets failed to decode, so their frames are lost inside the stream"),
        "{:?}",
        lossy.error
    );
    let cut = by_id("ucf101/Biking/v_Biking_g02_c01.avi");
    assert_eq!(cut.status, "failed");
    assert!(
        cut.error.as_deref().unwrap_or("").contains("truncated"),
        "{:?}",
        cut.error
    );

    // Colour and geometry are recorded for every stored video (read back independently).
    for b in batches(&out.join("videos.parquet")) {
        let status = col::<StringArray>(&b, "status");
        let matrix = col::<StringArray>(&b, "colour_matrix");
        let range = col::<StringArray>(&b, "colour_range");
        let assumed = col::<BooleanArray>(&b, "colour_assumed");
        let rotation = col::<UInt32Array>(&b, "rotation");
        for i in 0..b.num_rows() {
            if status.value(i) != "ok" {
                assert!(matrix.is_null(i));
                continue;
            }
            // Untagged SD sources: BT.601, limited range, assumed.
            assert_eq!(
                (
                    matrix.value(i),
                    range.value(i),
                    assumed.value(i),
                    rotation.value(i)
                ),
                ("bt601", "limited", true, 0)
            );
        }
    }
}

#[test]
fn a_wrong_dataset_path_stops_the_run_naming_what_was_searched() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    partial_layout(&raw);
    // An existing folder that holds no UCF-101 layout (the user pointed one level too high
    // or at the wrong download).
    let wrong = tmp.path().join("downloads");
    std::fs::create_dir_all(wrong.join("UCF101_extracted_elsewhere")).unwrap();
    let out = tmp.path().join("out");
    let o = prep(&wrong, &raw, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("domain \"ucf\"")
            && err.contains(wrong.to_str().unwrap())
            && err.contains("expected UCF-101/<Class>/"),
        "{}",
        text(&o)
    );
    assert!(!out.join("prep.json").exists());
}

#[test]
fn a_hand_edited_prep_json_never_panics_and_other_libraries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    partial_layout(&raw);
    let out = tmp.path().join("out");
    assert_eq!(prep(&raw, &raw, &out, &[]).status.code(), Some(1));
    let path = out.join("prep.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();

    // A short fingerprint string (it used to be sliced to 16 bytes).
    rec["fingerprint"] = "ab".into();
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    let o = prep(&raw, &raw, &out, &[]);
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("up to date"),
        "{}",
        text(&o)
    );

    // Made with other FFmpeg libraries: resuming is refused, naming both.
    rec["libraries"]["libavcodec"] = "0.0.1".into();
    rec["plan_fingerprint"] = "made-elsewhere".into();
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    let before = outputs(&out);
    let o = prep(&raw, &raw, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("other decoding libraries") && err.contains("libavcodec 0.0.1"),
        "{}",
        text(&o)
    );
    assert_eq!(outputs(&out), before, "a refused run changes nothing");
    assert_eq!(prep(&raw, &raw, &out, &["--force"]).status.code(), Some(1));

    // Not JSON at all: a clear error, no panic.
    std::fs::write(&path, b"{ not json").unwrap();
    let o = prep(&raw, &raw, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        text(&o)
    );
}

/// Asserts two prepared folders hold the same files byte for byte, naming any that differ.
fn assert_same_outputs(a: &Path, b: &Path) {
    let (x, y) = (outputs(a), outputs(b));
    let names =
        |m: &std::collections::BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&x), names(&y));
    let differ: Vec<&String> = x.keys().filter(|k| x[*k] != y[*k]).collect();
    assert!(
        differ.is_empty(),
        "{} and {} differ in {differ:?}",
        a.display(),
        b.display()
    );
}

#[test]
fn changed_inputs_and_retried_failures_are_redone_and_match_a_fresh_run() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let root = layout.root.as_path();
    let out = tmp.path().join("out");
    // Small shards, so a redo in the middle keeps the shards before it.
    let small = ["--shard-size", "20KiB", "--jobs", "2"];
    assert_eq!(prep(root, root, &out, &small).status.code(), Some(1));

    // A re-download replaces the truncated file: only it is decoded again.
    let rel = "hmdb51/ride_bike/Omega_ride_bike_f_cm_np1_fr_med_9.avi";
    write_pattern_video(&root.join(rel), "mpeg4", W, H, 30, 15, 77).unwrap();
    let o = prep(root, root, &out, &small);
    assert_eq!(
        o.status.code(),
        Some(1),
        "other failures remain\n{}",
        text(&o)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("1 changed on disk, 0 failed before"),
        "{}",
        text(&o)
    );
    let v = videos(&out);
    let row = v.iter().find(|v| v.video_id == rel).unwrap();
    assert_eq!((row.status.as_str(), row.num_frames), ("ok", 15));
    assert!(!out.join(".vdg-reuse").exists());
    // Byte for byte what a fresh run on today's files writes.
    let fresh = tmp.path().join("fresh");
    assert_eq!(prep(root, root, &fresh, &small).status.code(), Some(1));
    assert_same_outputs(&out, &fresh);

    // Only the modification time changes: that video is redone, the bytes stay the same.
    let touched = root.join("UCF-101/Biking/v_Biking_g02_c01.avi");
    std::fs::File::options()
        .write(true)
        .open(&touched)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30))
        .unwrap();
    let o = prep(root, root, &out, &small);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 changed on disk"),
        "{}",
        text(&o)
    );
    let o = prep(root, root, &out, &small);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("up to date"),
        "{}",
        text(&o)
    );

    // A transient failure (an injected panic stands in for an I/O error): kept as failed on
    // a plain rerun, redone with --retry-failed.
    let victim = "ucf101/PullUps/v_PullUps_g03_c02.avi";
    let flaky = tmp.path().join("flaky");
    let mut args = vec![
        "prep".to_owned(),
        "ucf-hmdb".into(),
        "--ucf101".into(),
        root.to_str().unwrap().into(),
        "--hmdb51".into(),
        root.to_str().unwrap().into(),
        "--out".into(),
        flaky.to_str().unwrap().into(),
    ];
    args.extend(small.iter().map(|s| s.to_string()));
    let o = vdg()
        .args(&args)
        .env("VDG_INJECT_PANIC", format!("decode:{victim}"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let failed = |dir: &Path| {
        videos(dir)
            .into_iter()
            .find(|v| v.video_id == victim)
            .unwrap()
            .status
    };
    assert_eq!(failed(&flaky), "failed");
    let o = prep(root, root, &flaky, &small);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("up to date"),
        "{}",
        text(&o)
    );
    assert_eq!(failed(&flaky), "failed");
    let mut retry = small.to_vec();
    retry.push("--retry-failed");
    let o = prep(root, root, &flaky, &retry);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(failed(&flaky), "ok");
    let fresh_now = tmp.path().join("fresh-now");
    assert_eq!(prep(root, root, &fresh_now, &small).status.code(), Some(1));
    assert_same_outputs(&flaky, &fresh_now);
}

/// Runs `vdg prep ucf-hmdb` on `root` into `out` through `bash -c`, after `shell` (limits,
/// traps), so the limits apply to vdg alone.
fn prep_under(shell: &str, root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(format!("{shell}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_vdg"))
        .args(["prep", "ucf-hmdb", "--ucf101"])
        .arg(root)
        .arg("--hmdb51")
        .arg(root)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd.output().unwrap()
}

#[test]
fn a_full_disk_stops_the_run_naming_the_file_and_a_rerun_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let root = layout.root.as_path();
    let opts = ["--shard-size", "40KiB", "--jobs", "2"];
    let reference = tmp.path().join("ref");
    assert_eq!(prep(root, root, &reference, &opts).status.code(), Some(1));
    // No file may grow past 24 KiB: the first shard fills the "disk" part-way (EFBIG, as
    // ENOSPC would; SIGXFSZ is ignored so the write fails instead of killing vdg).
    let full = tmp.path().join("full");
    let o = prep_under("trap '' XFSZ; ulimit -f 24", root, &full, &opts);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("frames-00000.parquet") && err.contains("File too large"),
        "{}",
        text(&o)
    );
    assert!(!full.join("prep.json").exists());
    let o = prep(root, root, &full, &opts);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_same_outputs(&full, &reference);
}

#[test]
fn sigterm_mid_run_keeps_complete_shards_and_a_rerun_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let root = layout.root.as_path();
    let opts = ["--shard-size", "20KiB", "--jobs", "1"];
    let reference = tmp.path().join("ref");
    assert_eq!(prep(root, root, &reference, &opts).status.code(), Some(1));
    // Twice: once after the first shard, once after the third.
    for shards_done in [1usize, 3] {
        let out = tmp.path().join(format!("term-{shards_done}"));
        let child = vdg()
            .args(["prep", "ucf-hmdb", "--ucf101"])
            .arg(root)
            .arg("--hmdb51")
            .arg(root)
            .arg("--out")
            .arg(&out)
            .args(opts)
            // Debug builds only: the writer waits 40 ms before each video, so the run is
            // still writing when the signal comes.
            .env("VDG_INJECT_DELAY_MS", "40")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let shard = out.join(format!("frames-{:05}.parquet", shards_done - 1));
        let t0 = std::time::Instant::now();
        while !shard.exists() && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(130), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("interrupted by a signal") && err.contains("Rerun"),
            "{}",
            text(&o)
        );
        assert!(!out.join("prep.json").exists());
        assert!(shard.exists(), "complete shards are kept");
        let o = prep(root, root, &out, &opts);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("resumed"),
            "{}",
            text(&o)
        );
        assert_same_outputs(&out, &reference);
    }
}

/// A named pipe with a video's name (a half-set-up mirror, a streaming tool's output) is a
/// failed video naming what it is; before, the run opened it and waited for a writer forever,
/// deaf to SIGTERM. Run under a watchdog, so that a regression fails instead of hanging.
#[cfg(unix)]
#[test]
fn a_named_pipe_among_the_videos_fails_that_video_and_the_run_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("raw");
    for (i, rel) in [
        "UCF-101/PullUps/v_PullUps_g01_c01.avi",
        "hmdb51/pullup/Clip_pullup_f_cm_np1_fr_med_0.avi",
    ]
    .iter()
    .enumerate()
    {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_pattern_video(&p, "mpeg4", W, H, 25, 10, i as u32).unwrap();
    }
    let fifo = root.join("UCF-101/PullUps/v_PullUps_g02_c01.avi");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let out = tmp.path().join("out");
    let child = vdg()
        .args(["prep", "ucf-hmdb", "--ucf101"])
        .arg(&root)
        .arg("--hmdb51")
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 120, "vdg prep with a named pipe among the videos");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("v_PullUps_g02_c01.avi") && err.contains("a named pipe"),
        "{}",
        text(&o)
    );
    let vids = videos(&out);
    let by_id = |id: &str| vids.iter().find(|v| v.video_id == id).unwrap();
    let pipe = by_id("ucf101/PullUps/v_PullUps_g02_c01.avi");
    assert_eq!(pipe.status, "failed");
    assert!(
        pipe.error
            .as_deref()
            .unwrap_or("")
            .contains("not a regular file but a named pipe"),
        "{:?}",
        pipe.error
    );
    let good = by_id("ucf101/PullUps/v_PullUps_g01_c01.avi");
    assert_eq!((good.status.as_str(), good.num_frames), ("ok", 10));
}

#[cfg(unix)]
#[test]
fn a_read_only_output_folder_is_a_clear_error_and_nothing_changes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let root = layout.root.as_path();
    let out = tmp.path().join("out");
    assert_eq!(prep(root, root, &out, &[]).status.code(), Some(1));
    let before = outputs(&out);
    // Read-only for everyone; root ignores permission bits, so as root the run is made as
    // `nobody` (which can still read the inputs and the binary).
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    chmod(tmp.path(), 0o755);
    chmod(&out, 0o555);
    let as_root = std::fs::metadata(&out).unwrap().uid() == 0;
    let run_ro = |extra: &[&str]| {
        let mut cmd = vdg();
        cmd.args(["prep", "ucf-hmdb", "--ucf101"])
            .arg(root)
            .arg("--hmdb51")
            .arg(root)
            .arg("--out")
            .arg(&out)
            .args(extra);
        if as_root {
            cmd.uid(65534).gid(65534);
        }
        cmd.output().unwrap()
    };
    let o = run_ro(&["--retry-failed"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(out.to_str().unwrap()) && err.contains("ermission denied"),
        "{}",
        text(&o)
    );
    assert_eq!(outputs(&out), before, "a refused run changes nothing");
    chmod(&out, 0o755);
}

#[test]
fn frames_spilled_to_disk_give_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let root = layout.root.as_path();
    let reference = tmp.path().join("ref");
    assert_eq!(prep(root, root, &reference, &[]).status.code(), Some(1));
    // A budget of 3 frames a unit: every video longer than that goes through a spill file.
    let spilled = tmp.path().join("spilled");
    let o = vdg()
        .args(["prep", "ucf-hmdb", "--ucf101"])
        .arg(root)
        .arg("--hmdb51")
        .arg(root)
        .arg("--out")
        .arg(&spilled)
        .args(["--jobs", "2"])
        .env("VDG_MEMORY_FRAMES", "3")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_same_outputs(&spilled, &reference);
    let left: Vec<_> = std::fs::read_dir(&spilled)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `vdg prep --part I/N` as a job array runs it (N processes at once), then `vdg prep
/// merge`: the same bytes as one machine, and the merge decodes nothing.
#[test]
fn parts_merged_give_the_bytes_of_one_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let root = layout.root.as_path();
    let opts = ["--shard-size", "30KiB", "--jobs", "1"];
    let whole = tmp.path().join("whole");
    assert_eq!(prep(root, root, &whole, &opts).status.code(), Some(1));
    for n in [1u32, 3, 64] {
        let parts: Vec<std::path::PathBuf> = (0..n)
            .map(|i| tmp.path().join(format!("parts-{n}/part-{i}")))
            .collect();
        let children: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                vdg()
                    .args(["prep", "ucf-hmdb", "--ucf101"])
                    .arg(root)
                    .arg("--hmdb51")
                    .arg(root)
                    .arg("--out")
                    .arg(dir)
                    .args(opts)
                    .args(["--part", &format!("{i}/{n}"), "-q"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let o = c.wait_with_output().unwrap();
            assert!(matches!(o.status.code(), Some(0 | 1)), "{}", text(&o));
        }
        // The parts hold every video once.
        let total: usize = parts.iter().map(|p| videos(p).len()).sum();
        assert_eq!(total, videos(&whole).len());
        let merged = tmp.path().join(format!("merged-{n}"));
        let mut args: Vec<std::ffi::OsString> = vec![
            "prep".into(),
            "merge".into(),
            "--out".into(),
            merged.clone().into(),
        ];
        // Any order.
        args.extend(parts.iter().rev().map(|p| p.clone().into_os_string()));
        let o = vdg().args(&args).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "the failed videos stay failed\n{}",
            text(&o)
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains(" 0 decoded, 42 copied"), "{}", text(&o));
        assert_same_outputs(&merged, &whole);
    }
    // A missing part, and a part of another prep, are refused by name.
    let p3: Vec<std::path::PathBuf> = (0..3)
        .map(|i| tmp.path().join(format!("parts-3/part-{i}")))
        .collect();
    let o = vdg()
        .args(["prep", "merge", "--out"])
        .arg(tmp.path().join("m-missing"))
        .arg(&p3[0])
        .arg(&p3[2])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("1/3"),
        "{}",
        text(&o)
    );
    let o = vdg()
        .args(["prep", "merge", "--out"])
        .arg(tmp.path().join("m-foreign"))
        .arg(&p3[0])
        .arg(&p3[1])
        .arg(tmp.path().join("parts-1/part-0"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another prep"),
        "{}",
        text(&o)
    );
    // A copy that makes no progress stops the merge, which never records a video the parts
    // hold as failed (stall injected through the debug build's hook); merging again gives
    // the bytes of one machine.
    let stuck = videos(&p3[1])
        .into_iter()
        .find(|v| v.status == "ok")
        .unwrap()
        .video_id;
    let m = tmp.path().join("m-stalled");
    let child = vdg()
        .args(["prep", "merge", "--stall-timeout", "1", "--out"])
        .arg(&m)
        .args(&p3)
        .env("VDG_INJECT_STALL", format!("{stuck}:forever"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 120, "a merge with a stalled copy");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let name = Path::new(&stuck).file_name().unwrap().to_string_lossy();
    assert!(
        text(&o).contains("no progress for 1 s on 1 video(s)") && text(&o).contains(&*name),
        "{}",
        text(&o)
    );
    assert!(!m.join(vdg_data::shard::PREP_FILE).exists());
    let o = vdg()
        .args(["prep", "merge", "--out"])
        .arg(&m)
        .args(&p3)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_same_outputs(&m, &whole);

    // A part whose shard changed at its size on the way (a bad copy between machines) is
    // refused by name: the merge would copy its bytes and record them as good. Restored, the
    // merge goes through.
    let shard = p3[1].join("frames-00000.parquet");
    let good = std::fs::read(&shard).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 1;
    std::fs::write(&shard, &bad).unwrap();
    let merged = tmp.path().join("m-damaged");
    let merge = || {
        vdg()
            .args(["prep", "merge", "--out"])
            .arg(&merged)
            .args(&p3)
            .output()
            .unwrap()
    };
    let o = merge();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("does not match its prep.json (frames-00000.parquet: same size"),
        "{}",
        text(&o)
    );
    assert!(!merged.join("prep.json").exists());
    std::fs::write(&shard, &good).unwrap();
    let o = merge();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_same_outputs(&merged, &whole);
}

/// `vdg prep verify`: a prep verifies; a shard changed in place at its size (which a rerun
/// of `vdg prep` calls up to date), a cut videos table, an unlisted shard, a leftover and a
/// missing prep.json are each named (exit 2); `--force` rebuilds the same bytes, which verify;
/// a rerun that rebuilds decodes a changed shard's videos again rather than keep it.
#[test]
fn verify_names_every_file_that_differs_from_prep_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, out) = prep_for_job_files(tmp.path());
    let verify = |extra: &[&str]| {
        let mut args = vec!["prep", "verify", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&args)
    };
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("all match prep.json"), "{}", text(&o));
    let before = std::fs::read(out.join("frames-00001.parquet")).unwrap();

    // One bit of a shard's JPEG bytes, its size unchanged.
    let mut bytes = before.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(out.join("frames-00001.parquet"), &bytes).unwrap();
    let rerun = prep(&layout.root, &layout.root, &out, &JOB_FILE_PREP_OPTIONS);
    assert!(text(&rerun).contains("nothing to do"), "{}", text(&rerun));
    let o = verify(&["-j", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("frames-00001.parquet: same size, but its SHA-256 is not"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("frames-00000.parquet:"), "{}", text(&o));

    // A cut videos table, an unlisted shard and a leftover of an interrupted write.
    let table = std::fs::read(out.join("videos.parquet")).unwrap();
    std::fs::write(out.join("videos.parquet"), &table[..table.len() - 10]).unwrap();
    std::fs::write(out.join("frames-00099.parquet"), b"PAR1").unwrap();
    std::fs::write(out.join("frames-00002.parquet.tmp"), b"").unwrap();
    let o = verify(&["-q"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    for want in [
        "videos.parquet: ",
        "bytes where prep.json records",
        "frames-00099.parquet: not listed in prep.json",
        "frames-00002.parquet.tmp: not listed in prep.json",
        "2 of ",
        "2 stray file(s)",
    ] {
        assert!(text(&o).contains(want), "{want}: {}", text(&o));
    }

    // Rebuilt with --force (the strays removed by hand): the first bytes again.
    std::fs::remove_file(out.join("frames-00099.parquet")).unwrap();
    std::fs::remove_file(out.join("frames-00002.parquet.tmp")).unwrap();
    let mut forced = JOB_FILE_PREP_OPTIONS.to_vec();
    forced.push("--force");
    prep(&layout.root, &layout.root, &out, &forced);
    assert_eq!(
        std::fs::read(out.join("frames-00001.parquet")).unwrap(),
        before
    );
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // A rerun that is not "nothing to do" (the videos table lost) with a shard changed at its
    // size: its videos are decoded again (it used to be kept, its new hash recorded as good).
    std::fs::write(out.join("frames-00001.parquet"), &bytes).unwrap();
    std::fs::remove_file(out.join("videos.parquet")).unwrap();
    let rerun = prep(&layout.root, &layout.root, &out, &JOB_FILE_PREP_OPTIONS);
    assert!(
        text(&rerun).contains("frames-00001.parquet: its bytes changed since prep.json"),
        "{}",
        text(&rerun)
    );
    assert_eq!(
        std::fs::read(out.join("frames-00001.parquet")).unwrap(),
        before
    );
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    std::fs::remove_file(out.join("prep.json")).unwrap();
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("prep.json: is missing"), "{}", text(&o));
}

/// The prep options of the job-file tests (small shards, so the parts hold several).
const JOB_FILE_PREP_OPTIONS: [&str; 2] = ["--shard-size", "30KiB"];

/// The test layout under `dir/raw` and its single-machine prep in `dir/whole` (with failed
/// videos: exit 1), which the job files' parts must merge into.
fn prep_for_job_files(dir: &Path) -> (Layout, std::path::PathBuf) {
    let layout = write_layout(&dir.join("raw"));
    let whole = dir.join("whole");
    let o = prep(&layout.root, &layout.root, &whole, &JOB_FILE_PREP_OPTIONS);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    (layout, whole)
}

/// `bash script` with what the job files of these tests read (the vdg under test, the
/// benchmark and its options, the parts and merged folders), output captured; with `clean`,
/// nothing of this process's environment but `PATH`, as a scheduler starts a task.
fn job_file_command(
    script: &Path,
    clean: bool,
    root: &str,
    parts: &Path,
    merged: &Path,
) -> std::process::Command {
    let mut c = std::process::Command::new("bash");
    c.arg(script);
    if clean {
        c.env_clear().env("PATH", std::env::var_os("PATH").unwrap());
    }
    c.env("VDG", env!("CARGO_BIN_EXE_vdg"))
        .env(
            "BENCHMARK_ARGS",
            format!("ucf-hmdb --ucf101 {root} --hmdb51 {root}"),
        )
        .env("PREP_OPTIONS", JOB_FILE_PREP_OPTIONS.join(" "))
        .env("PARTS", parts)
        .env("OUT", merged)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

/// The shipped Slurm job files, run as a 3-task array would run them (three processes at
/// once with the array's environment), then the merge job: the bytes of one machine. The
/// dry run prints each task's command.
#[test]
fn the_slurm_job_files_prep_in_parts_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, whole) = prep_for_job_files(tmp.path());
    let root = layout.root.to_str().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let parts = tmp.path().join("parts");
    let merged = tmp.path().join("merged");
    let job = |script: &str, index: Option<u32>| {
        let script = repo.join("deploy/slurm").join(script);
        let mut c = job_file_command(&script, false, root, &parts, &merged);
        c.env("SLURM_ARRAY_TASK_COUNT", "3")
            .env("SLURM_CPUS_PER_TASK", "1");
        if let Some(i) = index {
            c.env("SLURM_ARRAY_TASK_ID", i.to_string());
        }
        c
    };
    let tasks: Vec<_> = (0..3)
        .map(|i| job("prep.sbatch", Some(i)).spawn().unwrap())
        .collect();
    for t in tasks {
        let o = t.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "a task with failed videos succeeds\n{}",
            text(&o)
        );
    }
    let o = job("merge.sbatch", None).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_same_outputs(&merged, &whole);

    let o = std::process::Command::new("bash")
        .arg(repo.join("deploy/slurm/submit-prep.sh"))
        .args(["2", "/o", "/p", "--", "ntu", "--videos", "/d"])
        .env("DRY_RUN", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(
        printed.contains("prep ntu --videos /d --out /p/part-1 --part 1/2")
            && printed.contains("prep merge --out /o"),
        "{printed}"
    );
    // The bench array: plan, one `--part` per task, report.
    let o = std::process::Command::new("bash")
        .arg(repo.join("deploy/slurm/submit-bench.sh"))
        .args(["2", "/b", "--", "--scale", "tiny"])
        .env("DRY_RUN", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let printed = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 4, "{printed}");
    assert!(
        lines[0].contains("bench plan --out /b --scale tiny"),
        "{printed}"
    );
    assert!(
        lines[2].contains("bench run --out /b --part 1/2 --scale tiny"),
        "{printed}"
    );
    assert!(lines[3].contains("bench report /b"), "{printed}");
}

/// `deploy/array/vdg-task.sh`, the job file for any scheduler: a 3-task Grid Engine array
/// (indices from 1) preps the parts and the merge gives the bytes of one machine; each other
/// scheduler's variables give the right part and cores; a task that cannot know its place
/// in the array is refused, naming what to set.
#[test]
fn the_job_file_for_any_scheduler_finds_its_part_and_merges_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, whole) = prep_for_job_files(tmp.path());
    let root = layout.root.to_str().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/array/vdg-task.sh");
    let parts = tmp.path().join("parts");
    let merged = tmp.path().join("merged");
    // A scheduler starts the task with its own variables and little else.
    let task = |vars: &[(&str, &str)]| {
        let mut c = job_file_command(&script, true, root, &parts, &merged);
        c.envs(vars.iter().copied());
        c
    };
    let sge = |i: u32| {
        let id = i.to_string();
        let vars = [
            ("TASK", "prep"),
            ("SGE_TASK_ID", id.as_str()),
            ("SGE_TASK_FIRST", "1"),
            ("SGE_TASK_LAST", "3"),
            ("SGE_TASK_STEPSIZE", "1"),
            ("NSLOTS", "1"),
        ];
        task(&vars).spawn().unwrap()
    };
    let tasks: Vec<_> = (1..=3).map(sge).collect();
    for t in tasks {
        let o = t.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    for i in 0..3 {
        assert!(parts.join(format!("part-{i}/videos.parquet")).is_file());
    }
    let o = task(&[("TASK", "merge"), ("NSLOTS", "1")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_same_outputs(&merged, &whole);

    // Each scheduler's numbering and core count, as the command a task would run.
    let p = parts.display();
    let cases: &[(&[(&str, &str)], String)] = &[
        (
            &[("SLURM_ARRAY_TASK_ID", "6"), ("SLURM_ARRAY_TASK_MIN", "2")],
            format!("--out {p}/part-2 --part 2/3 --jobs 5"),
        ),
        (
            &[("PBS_ARRAY_INDEX", "2"), ("NCPUS", "4")],
            format!("--out {p}/part-2 --part 2/3 --jobs 4"),
        ),
        (
            &[("PBS_ARRAYID", "0"), ("PBS_NUM_PPN", "3")],
            format!("--out {p}/part-0 --part 0/3 --jobs 3"),
        ),
        (
            &[("LSB_JOBINDEX", "3"), ("LSB_DJOB_NUMPROC", "2")],
            format!("--out {p}/part-2 --part 2/3 --jobs 2"),
        ),
        (
            &[("JOB_COMPLETION_INDEX", "1")],
            format!("--out {p}/part-1 --part 1/3 --jobs 0"),
        ),
    ];
    for (vars, want) in cases {
        let mut c = task(vars);
        c.env("TASK", "prep")
            .env("DRY_RUN", "1")
            .env("ARRAY_SIZE", "3");
        if vars[0].0.starts_with("SLURM") {
            c.env("SLURM_ARRAY_TASK_STEP", "2")
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .env("SLURM_CPUS_PER_TASK", "5");
        }
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{vars:?}: {}", text(&o));
        let printed = String::from_utf8_lossy(&o.stdout);
        assert!(
            printed.contains(&format!(
                "prep ucf-hmdb --ucf101 {root} --hmdb51 {root} {want}"
            )) && printed.trim_end().ends_with("--shard-size 30KiB"),
            "{vars:?}: {printed}"
        );
    }
    let o = task(&[
        ("TASK", "bench"),
        ("DRY_RUN", "1"),
        ("LSB_JOBINDEX", "2"),
        ("ARRAY_SIZE", "2"),
        ("BENCH_OPTIONS", "--scale tiny"),
    ])
    .output()
    .unwrap();
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(
        printed.contains(&format!(
            "bench run --out {} --part 1/2 --scale tiny",
            merged.display()
        )),
        "{printed}"
    );

    // Refused, exit 2, naming what is wrong: no array, LSF's 0 for a job outside an array,
    // no size where the scheduler gives none, a size that contradicts the scheduler's, an
    // index outside the array (an array counted from 1 where 0 was expected), no TASK.
    let refused: &[(&[(&str, &str)], &str)] = &[
        (&[("TASK", "prep")], "none of SLURM_ARRAY_TASK_ID"),
        (
            &[("TASK", "prep"), ("LSB_JOBINDEX", "0")],
            "none of SLURM_ARRAY_TASK_ID",
        ),
        (
            &[("TASK", "prep"), ("PBS_ARRAY_INDEX", "1")],
            "set ARRAY_SIZE",
        ),
        (
            &[
                ("TASK", "prep"),
                ("ARRAY_SIZE", "4"),
                ("SGE_TASK_ID", "1"),
                ("SGE_TASK_FIRST", "1"),
                ("SGE_TASK_LAST", "3"),
            ],
            "ARRAY_SIZE=4, but the scheduler runs 3 tasks",
        ),
        (
            &[("TASK", "prep"), ("ARRAY_SIZE", "3"), ("PBS_ARRAYID", "3")],
            "task 3 is outside 0..2",
        ),
        (
            &[("TASK", "train")],
            "expected prep, merge, bench or report",
        ),
        (&[], "set TASK"),
    ];
    for (vars, want) in refused {
        let o = task(vars).env("DRY_RUN", "1").output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{vars:?}: {}", text(&o));
        assert!(o.stdout.is_empty(), "{vars:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{vars:?}: {}", text(&o));
    }
}

/// `scripts/bundle`: the binary and the libraries it links, outside the C runtime, in one
/// folder; its wrapper runs a prep with none of the caller's environment, loading FFmpeg
/// from the bundle, and gives the bytes of the installed binary.
#[test]
fn a_bundled_vdg_preps_with_its_own_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("raw"));
    let whole = tmp.path().join("whole");
    let expected = prep(&layout.root, &layout.root, &whole, &[]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = tmp.path().join("bundle");
    let o = std::process::Command::new("bash")
        .arg(repo.join("scripts/bundle"))
        .args(["--bin", env!("CARGO_BIN_EXE_vdg"), "--out"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let manifest = std::fs::read_to_string(bundle.join("MANIFEST")).unwrap();
    for lib in ["libavcodec.so.", "libavformat.so.", "libturbojpeg.so."] {
        assert!(
            manifest.lines().any(|l| l.starts_with(lib)),
            "{lib} not bundled:\n{manifest}"
        );
    }
    // The C runtime stays the machine's.
    assert!(
        !manifest.lines().any(|l| l.starts_with("libc.so")),
        "{manifest}"
    );
    assert!(manifest.contains("glibc >= 2."), "{manifest}");

    let out = tmp.path().join("bundled");
    let root = layout.root.to_str().unwrap();
    let o = std::process::Command::new(bundle.join("bin/vdg"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LD_DEBUG", "libs")
        .current_dir(tmp.path())
        .args([
            "prep", "ucf-hmdb", "--ucf101", root, "--hmdb51", root, "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), expected.status.code(), "{}", text(&o));
    let loaded = String::from_utf8_lossy(&o.stderr);
    let from_bundle = format!(
        "calling init: {}/bin/../lib/libavcodec.so.",
        bundle.display()
    );
    assert!(
        loaded.contains(&from_bundle),
        "FFmpeg not loaded from the bundle: {}",
        loaded
            .lines()
            .filter(|l| l.contains("libavcodec"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_same_outputs(&out, &whole);
}

/// The test layout (`write_layout`) under `root/raw`, prepared into `root/prep` (some of
/// its videos fail by design: exit 1).
fn prepared_layout(root: &Path) -> std::path::PathBuf {
    let layout = write_layout(&root.join("raw"));
    let prepped = root.join("prep");
    assert_eq!(
        prep(&layout.root, &layout.root, &prepped, &[])
            .status
            .code(),
        Some(1)
    );
    prepped
}

/// `vdg export lists`: the rawframe lists of mmaction2 and TSN/TRN/TSM, with the frames as
/// JPEG folders those loaders read, byte for byte the JPEGs of the shards.
#[test]
fn export_lists_for_mmaction_and_trn_with_frame_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let prepped = prepared_layout(tmp.path());
    let vids = videos(&prepped);
    let shard_frames = frames(&prepped);
    let frames_dir = tmp.path().join("rawframes");
    for format in ["trn", "mmaction"] {
        let lists = tmp.path().join(format!("lists-{format}"));
        let o = vdg()
            .args(["export", "lists", "--data"])
            .arg(&prepped)
            .args(["--format", format, "--out"])
            .arg(&lists)
            .arg("--frames-dir")
            .arg(&frames_dir)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert!(
            text(&o).contains("4 failed video(s) left out"),
            "{}",
            text(&o)
        );
        for domain in ["ucf", "hmdb"] {
            for split in ["train", "val", "all"] {
                let want: Vec<&Video> = vids
                    .iter()
                    .filter(|v| {
                        v.status == "ok"
                            && v.domain == domain
                            && (split == "all" || v.split == split)
                    })
                    .collect();
                let body =
                    std::fs::read_to_string(lists.join(format!("ucf_hmdb_{domain}_{split}.txt")))
                        .unwrap();
                let lines: Vec<&str> = body.lines().collect();
                assert_eq!(lines.len(), want.len(), "{format} {domain} {split}");
                for (line, v) in lines.iter().zip(&want) {
                    let parts: Vec<&str> = line.rsplitn(3, ' ').collect();
                    let (label, n, dir) = (parts[0], parts[1], parts[2]);
                    assert_eq!(label, v.label.to_string());
                    assert_eq!(n, v.num_frames.to_string());
                    let folder = if format == "trn" {
                        std::path::PathBuf::from(dir)
                    } else {
                        frames_dir.join(dir)
                    };
                    assert_eq!(folder, frames_dir.join(&v.video_id), "{line}");
                    // The loaders' template: img_00001.jpg .. img_NNNNN.jpg, the shard's JPEGs.
                    for (i, (_, jpeg)) in shard_frames[&v.video_id].iter().enumerate() {
                        let file = folder.join(format!("img_{:05}.jpg", i + 1));
                        assert_eq!(&std::fs::read(&file).unwrap(), jpeg, "{}", file.display());
                    }
                    assert!(
                        !folder
                            .join(format!("img_{:05}.jpg", v.num_frames + 1))
                            .exists()
                    );
                }
            }
        }
    }
}

/// `vdg export hf`: per domain and split, one row per frame with its label and domain joined
/// in, the shards' JPEGs in `image.bytes`, and the `datasets` metadata (ClassLabel names in
/// label order, Image) and dataset card that `load_dataset(<out>, "<domain>")` reads.
#[test]
fn export_hf_writes_labelled_frames_per_domain_and_split() {
    let tmp = tempfile::tempdir().unwrap();
    let prepped = prepared_layout(tmp.path());
    let out = tmp.path().join("hf");
    let o = vdg()
        .args(["export", "hf", "--data"])
        .arg(&prepped)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let vids = videos(&prepped);
    let shard_frames = frames(&prepped);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for domain in ["ucf", "hmdb"] {
        for (split, side) in [("train", "train"), ("validation", "val")] {
            assert!(
                card.contains(&format!("path: {domain}/{split}-*.parquet")),
                "{card}"
            );
            let mut got: Vec<(String, i32, i64, Vec<u8>)> = Vec::new();
            let file = out.join(format!("{domain}/{split}-00000.parquet"));
            let schema = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&file).unwrap(),
            )
            .unwrap()
            .schema()
            .clone();
            let meta = schema.metadata().get("huggingface").cloned().unwrap();
            assert!(
                meta.contains(r#""_type":"ClassLabel""#) && meta.contains(r#""_type":"Image""#),
                "{meta}"
            );
            for b in batches(&file) {
                let ids = col::<StringArray>(&b, "video_id");
                let idx = col::<arrow_array::Int32Array>(&b, "frame_index");
                let label = col::<arrow_array::Int64Array>(&b, "label");
                let img = image_bytes(&b);
                for i in 0..b.num_rows() {
                    got.push((
                        ids.value(i).to_owned(),
                        idx.value(i),
                        label.value(i),
                        img.value(i).to_vec(),
                    ));
                }
            }
            let want: Vec<(String, i32, i64, Vec<u8>)> = vids
                .iter()
                .filter(|v| v.status == "ok" && v.domain == domain && v.split == side)
                .flat_map(|v| {
                    shard_frames[&v.video_id]
                        .iter()
                        .enumerate()
                        .map(|(i, (_, jpeg))| {
                            (
                                v.video_id.clone(),
                                i as i32,
                                i64::from(v.label),
                                jpeg.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(got.len(), want.len(), "{domain} {split}");
            assert!(got == want, "{domain} {split}: rows differ");
        }
    }
}
