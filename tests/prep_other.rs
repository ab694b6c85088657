use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use vdg_pipeline::encode::{VideoWriter, pattern_frame, remux_without_head, write_pattern_video};

use crate::util::*;

fn prep(args: &[&str]) -> std::process::Output {
    run(&[&["prep"], args].concat())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ssv2_layout(root: &Path, old_names: bool) -> BTreeMap<String, (u32, u32)> {
    let videos = root.join("20bn-something-something-v2");
    let labels = root.join("labels");
    std::fs::create_dir_all(&videos).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    let classes: Vec<&str> = include_str!("../crates/data/src/testdata/ssv2_classes.txt")
        .lines()
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::Value::String(i.to_string())))
        .collect();
    let entry = |id: u32, template: &str| serde_json::json!({"id": id.to_string(), "label": "x", "template": template, "placeholders": []});
    let mut good = BTreeMap::new();
    let mut train = Vec::new();
    let mut val = Vec::new();
    let templates = [
        "Putting [something] on a surface",
        "Pretending to put [something] on a surface",
        "Tearing [something] into two pieces",
        "Pretending to be tearing [something that is not tearable]",
    ];
    let mut id = 100;
    for (k, t) in templates.iter().enumerate() {
        for n in 0..3 {
            id += 1;
            let frames = 8 + (id % 4);
            write_pattern_video(
                &videos.join(format!("{id}.webm")),
                "libvpx-vp9",
                W,
                H,
                12,
                frames,
                id,
            )
            .unwrap();
            good.insert(format!("ssv2/{id}.webm"), (frames, id));
            if (k + n) % 3 == 0 {
                val.push(entry(id, t))
            } else {
                train.push(entry(id, t))
            }
        }
    }
    // Outside the benchmark (its file is never opened: it does not even exist).
    train.push(entry(900, "Approaching [something] with your camera"));
    // Listed but missing, and corrupt.
    train.push(entry(901, "Putting [something] on a surface"));
    std::fs::write(
        videos.join("902.webm"),
        b"\x1a\x45\xdf\xa3 not really a webm",
    )
    .unwrap();
    val.push(entry(902, "Pretending to put [something] on a surface"));
    let (l, t, v) = if old_names {
        (
            "something-something-v2-labels.json",
            "something-something-v2-train.json",
            "something-something-v2-validation.json",
        )
    } else {
        ("labels.json", "train.json", "validation.json")
    };
    std::fs::write(labels.join(l), serde_json::to_vec(&map).unwrap()).unwrap();
    std::fs::write(labels.join(t), serde_json::to_vec(&train).unwrap()).unwrap();
    std::fs::write(labels.join(v), serde_json::to_vec(&val).unwrap()).unwrap();
    good
}

#[test]
fn ssv2_webm_prep_reads_back_with_domains_by_sub_category() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ss");
    let good = ssv2_layout(&root, false);
    let out = tmp.path().join("out");
    let (video_dir, label_dir) = (
        root.join("20bn-something-something-v2"),
        root.join("labels"),
    );
    let o = prep(&[
        "ssv2",
        "--videos",
        s(&video_dir),
        "--labels",
        s(&label_dir),
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ssv2/901.webm") && err.contains("missing"),
        "{}",
        text(&o)
    );
    assert!(
        err.contains("ssv2/902.webm") && err.contains("cannot open"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ssv2 1"),
        "one skipped: {}",
        text(&o)
    );
    let vids = videos(&out);
    let frames = frames(&out);
    assert_eq!(vids.len(), good.len() + 2);
    for v in &vids {
        let want = match v.label_name.as_str() {
            "putting_on_surface" => 8,
            "tearing" => 18,
            other => panic!("unexpected class {other}"),
        };
        assert_eq!(v.label, want);
        let n: u32 = v
            .video_id
            .trim_start_matches("ssv2/")
            .trim_end_matches(".webm")
            .parse()
            .unwrap();
        let pretending = matches!((n - 101) / 3, 1 | 3) || n == 902;
        assert_eq!(
            v.domain,
            if pretending { "target" } else { "source" },
            "{v:?}"
        );
        if let Some((count, seed)) = good.get(&v.video_id) {
            assert_eq!(v.status, "ok");
            assert_eq!(v.num_frames, *count, "frames counted by decoding the WebM");
            let fr = &frames[&v.video_id];
            let (_, _, rgb) = decode_jpeg(&fr[1].1);
            let e = pattern_error(&rgb, 1, *seed);
            assert!(
                e < 20.0 && e < pattern_error(&rgb, 1, seed + 1),
                "{}: error {e}",
                v.video_id
            );
        }
    }
    // The older annotation file names work the same.
    let root2 = tmp.path().join("ss-old");
    ssv2_layout(&root2, true);
    let out2 = tmp.path().join("out2");
    let o = prep(&[
        "ssv2",
        "--videos",
        s(&root2.join("20bn-something-something-v2")),
        "--labels",
        s(&root2.join("labels")),
        "--out",
        s(&out2),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(videos(&out2).len(), vids.len());
}

#[test]
fn ssv2_manifest_with_an_unknown_class_names_the_closest_match() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ss");
    ssv2_layout(&root, false);
    let manifest = tmp.path().join("ss.toml");
    let text_ok = vdg_data::Manifest::builtin("something_something")
        .unwrap()
        .text;
    std::fs::write(
        &manifest,
        text_ok.replace(
            "\"Putting something on a surface\"",
            "\"Putting something on a surfac\"",
        ),
    )
    .unwrap();
    let o = prep(&[
        "ssv2",
        "--videos",
        s(&root.join("20bn-something-something-v2")),
        "--labels",
        s(&root.join("labels")),
        "--out",
        s(&tmp.path().join("out")),
        "--manifest",
        s(&manifest),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ss.toml") && err.contains("native.source"),
        "{}",
        text(&o)
    );
    assert!(
        err.contains("did you mean \"Putting something on a surface\""),
        "{}",
        text(&o)
    );
}

#[test]
fn pku_mmd_label_rows_become_clips_with_exact_frame_ranges() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pku");
    std::fs::create_dir_all(root.join("RGB_VIDEO")).unwrap();
    std::fs::create_dir_all(root.join("Label")).unwrap();
    let seeds = [
        ("0001-L", 120u32, 1u32),
        ("0001-M", 120, 2),
        ("0002-R", 100, 3),
        ("0003-L", 30, 4),
    ];
    for (stem, frames, seed) in seeds {
        write_pattern_video(
            &root.join(format!("RGB_VIDEO/{stem}.avi")),
            "mpeg4",
            W,
            H,
            30,
            frames,
            seed,
        )
        .unwrap();
    }
    std::fs::write(
        root.join("Label/0001-L.txt"),
        "8,10,29,1\n1,30,59,2\n12,60,70,1\n9,80,200,1\n5,50,40,1\n77,1,2,1\n",
    )
    .unwrap();
    std::fs::write(root.join("Label/0001-M.txt"), "8,0,19,1\r\n3,10,39,1\r\n").unwrap();
    std::fs::write(root.join("Label/0002-R.label"), "2,5,25,1\n").unwrap();
    std::fs::write(root.join("Label/0004-L.txt"), "2,5,25,1\n").unwrap();
    let out = tmp.path().join("out");
    let o = prep(&[
        "pku-mmd",
        "--root",
        s(&root),
        "--out",
        s(&out),
        "--jobs",
        "2",
    ]);
    // One clip runs past the end of its video: failed, so exit 1.
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "0001-L.txt: line 5: start 50 is after end 40",
        "0001-L.txt: line 6: unknown action id 77",
        "0004-L.txt: label file without its video",
        "0003-L.avi: video without a label file",
        "Label/0001-L.txt line 4",
    ] {
        assert!(
            err.contains(needle),
            "stderr lacks {needle:?}\n{}",
            text(&o)
        );
    }
    let vids = videos(&out);
    let ids: Vec<&str> = vids.iter().map(|v| v.video_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "pku_mmd/RGB_VIDEO/0001-L.avi/000010-000029-a08",
            "pku_mmd/RGB_VIDEO/0001-L.avi/000030-000059-a01",
            "pku_mmd/RGB_VIDEO/0001-L.avi/000080-000200-a09",
            "pku_mmd/RGB_VIDEO/0001-M.avi/000000-000019-a08",
            "pku_mmd/RGB_VIDEO/0001-M.avi/000010-000039-a03",
            "pku_mmd/RGB_VIDEO/0002-R.avi/000005-000025-a02",
        ],
        "the interaction (12) is outside the benchmark; bad rows are skipped"
    );
    let frames = frames(&out);
    let seed_of = |id: &str| seeds.iter().find(|(st, _, _)| id.contains(st)).unwrap().2;
    for v in &vids {
        let domain = match &v.video_id[23..24] {
            "L" => "L",
            "M" => "C",
            _ => "R",
        };
        assert_eq!(v.domain, domain);
        assert_eq!(v.group.as_deref(), Some(&v.video_id[18..22]));
        if v.video_id.contains("000080-000200") {
            assert_eq!(v.status, "failed");
            assert!(
                v.error.as_deref().unwrap().contains("past the end"),
                "{v:?}"
            );
            continue;
        }
        assert_eq!(v.status, "ok", "{v:?}");
        let range = &v.video_id[v.video_id.len() - 17..v.video_id.len() - 4];
        let (a, b) = range.split_once('-').unwrap();
        let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(v.num_frames, b - a + 1);
        // The stored frames are exactly the source frames a..=b, in order.
        let fr = &frames[&v.video_id];
        assert_eq!(fr.len() as u32, b - a + 1);
        for (k, (_, jpeg)) in fr.iter().enumerate() {
            let t = a + k as u32;
            let (_, _, rgb) = decode_jpeg(jpeg);
            let e = pattern_error(&rgb, t, seed_of(&v.video_id));
            assert!(
                e < 20.0 && e < pattern_error(&rgb, t + 1, seed_of(&v.video_id)),
                "{} frame {k} is not source frame {t} (error {e:.1})",
                v.video_id
            );
        }
    }
    // Shards that end in the middle of a recording's clips: same bytes whatever the jobs,
    // and a crash between them resumes mid-recording to the same bytes.
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let oa = prep(&[
        "pku-mmd",
        "--root",
        s(&root),
        "--out",
        s(&a),
        "--jobs",
        "1",
        "--shard-size",
        "20KiB",
    ]);
    let ob = prep(&[
        "pku-mmd",
        "--root",
        s(&root),
        "--out",
        s(&b),
        "--jobs",
        "3",
        "--shard-size",
        "20KiB",
    ]);
    assert_eq!(
        (oa.status.code(), ob.status.code()),
        (Some(1), Some(1)),
        "{}",
        text(&ob)
    );
    let want = outputs(&a);
    assert!(
        want.keys().filter(|k| k.starts_with("frames-")).count() >= 3,
        "{:?}",
        want.keys()
    );
    assert_eq!(outputs(&b), want);
    let c = tmp.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(
        c.join("frames-00000.parquet"),
        &want["frames-00000.parquet"],
    )
    .unwrap();
    let oc = prep(&[
        "pku-mmd",
        "--root",
        s(&root),
        "--out",
        s(&c),
        "--shard-size",
        "20KiB",
    ]);
    assert_eq!(oc.status.code(), Some(1), "{}", text(&oc));
    assert_eq!(outputs(&c), want);

    // Clip ranges are recorded, and 1-based labels shift them by one.
    let out1 = tmp.path().join("out1");
    let o = prep(&[
        "pku-mmd",
        "--root",
        s(&root),
        "--out",
        s(&out1),
        "--frame-base",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        videos(&out1)[0].video_id,
        "pku_mmd/RGB_VIDEO/0001-L.avi/000009-000028-a08"
    );
}

#[test]
fn damage_inside_a_recording_concerns_the_clips_from_there_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pku");
    std::fs::create_dir_all(root.join("RGB_VIDEO")).unwrap();
    std::fs::create_dir_all(root.join("Label")).unwrap();
    // 300 frames with every `step`-th byte of 45-52 % of the file flipped: packets near the
    // middle of the recording are damaged; the decoder conceals some and rejects others,
    // whose frames are lost, and every later frame's index shifts.
    let damaged_recording = |stem: &str, step: usize| {
        let video = root.join(format!("RGB_VIDEO/{stem}.avi"));
        write_pattern_video(&video, "mpeg4", 160, 120, 30, 300, 1).unwrap();
        let mut bytes = std::fs::read(&video).unwrap();
        let n = bytes.len();
        for i in (n * 45 / 100..n * 52 / 100).step_by(step) {
            bytes[i] ^= 0x5a;
        }
        std::fs::write(&video, bytes).unwrap();
    };
    damaged_recording("0001-L", 23);
    damaged_recording("0001-M", 197);
    std::fs::write(root.join("Label/0001-M.txt"), "8,10,99,1\n1,120,180,1\n").unwrap();
    // Every domain needs a recording: a clean one in the third view.
    write_pattern_video(&root.join("RGB_VIDEO/0001-R.avi"), "mpeg4", W, H, 30, 30, 2).unwrap();
    std::fs::write(root.join("Label/0001-R.txt"), "8,0,19,1\n").unwrap();
    // Before the damage, across it, after it.
    std::fs::write(
        root.join("Label/0001-L.txt"),
        "8,10,99,1\n1,120,180,1\n3,200,240,1\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = prep(&["pku-mmd", "--root", s(&root), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let vids = videos(&out);
    let status = |range: &str| {
        let v = vids.iter().find(|v| v.video_id.contains(range)).unwrap();
        (v.status.clone(), v.error.clone().unwrap_or_default())
    };
    let (before, e) = status("0001-L.avi/000010-000099");
    assert_eq!(before, "ok", "{e}");
    // The damage lies after this clip: its row says nothing of it.
    let row = vids
        .iter()
        .find(|v| v.video_id.contains("000010-000099"))
        .unwrap();
    assert_eq!(row.warning, None);
    assert_eq!(
        frames(&out)["pku_mmd/RGB_VIDEO/0001-L.avi/000010-000099-a08"].len(),
        90
    );
    for range in ["0001-L.avi/000120-000180", "0001-L.avi/000200-000240"] {
        let (st, e) = status(range);
        assert_eq!(st, "failed", "{range}");
        assert!(e.contains("lost before the clip's end"), "{range}: {e}");
    }
    // Lighter damage: kept, and only the clip it concerns says so.
    for v in vids.iter().filter(|v| v.video_id.contains("0001-M")) {
        assert_eq!(v.status, "ok", "{v:?}");
        let w = v.warning.as_deref().unwrap_or_default();
        if v.video_id.contains("000010-000099") {
            assert_eq!(w, "", "{}", v.video_id);
        } else {
            assert!(
                w.contains("frames kept were decoded from damaged data"),
                "{w}"
            );
        }
    }
}

/// A recording cut before its first keyframe (a capture started mid-stream) decodes from
/// the next one, FFmpeg dropping the frames before without an error: every frame index
/// shifts, so every clip fails, naming the frames lost at the start.
#[test]
fn a_recording_cut_before_its_first_keyframe_fails_its_clips() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pku");
    std::fs::create_dir_all(root.join("RGB_VIDEO")).unwrap();
    std::fs::create_dir_all(root.join("Label")).unwrap();
    // H.264 with B-frames, its first 3 packets cut: the next keyframe is frame 12, and the
    // 9 packets before it that are left cannot be decoded.
    let whole = tmp.path().join("whole.nut");
    let mut w = VideoWriter::create_with_b_frames(&whole, "libx264", 96, 64, 25, 2).unwrap();
    for t in 0..150 {
        w.write_rgb(&pattern_frame(96, 64, t, 3)).unwrap();
    }
    w.finish().unwrap();
    remux_without_head(&whole, &root.join("RGB_VIDEO/0001-L.avi"), 3).unwrap();
    std::fs::write(root.join("Label/0001-L.txt"), "8,10,59,1\n1,70,119,1\n").unwrap();
    for (view, seed) in [("M", 2), ("R", 3)] {
        write_pattern_video(
            &root.join(format!("RGB_VIDEO/0001-{view}.avi")),
            "mpeg4",
            W,
            H,
            30,
            30,
            seed,
        )
        .unwrap();
        std::fs::write(root.join(format!("Label/0001-{view}.txt")), "8,0,19,1\n").unwrap();
    }
    let out = tmp.path().join("out");
    let o = prep(&["pku-mmd", "--root", s(&root), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let vids = videos(&out);
    for v in &vids {
        let e = v.error.clone().unwrap_or_default();
        if v.video_id.contains("0001-L") {
            assert_eq!(v.status, "failed", "{}", v.video_id);
            assert!(
                e.contains("lost before the clip's end")
                    && e.contains("at its start, before its first keyframe"),
                "{e}"
            );
        } else {
            assert_eq!(v.status, "ok", "{}: {e}", v.video_id);
        }
    }
}

#[test]
fn ntu_cameras_are_domains_and_performers_never_straddle_the_split() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nturgb+d_rgb");
    std::fs::create_dir_all(&dir).unwrap();
    let mut seed = 0;
    for p in 1..=4 {
        for c in 1..=3 {
            for a in [1, 13] {
                seed += 1;
                let name = format!("S001C{c:03}P{p:03}R001A{a:03}_rgb.avi");
                write_pattern_video(&dir.join(name), "mpeg4", W, H, 30, 6, seed).unwrap();
            }
        }
    }
    write_pattern_video(
        &dir.join("S018C001P008R001A061_rgb.avi"),
        "mpeg4",
        W,
        H,
        30,
        6,
        99,
    )
    .unwrap();
    write_pattern_video(
        &dir.join("S001C001P001R001A01_rgb.avi"),
        "mpeg4",
        W,
        H,
        30,
        6,
        98,
    )
    .unwrap();
    let out = tmp.path().join("out");
    // Point at the parent folder: the scanner finds nturgb+d_rgb/ itself.
    let o = prep(&["ntu", "--videos", s(tmp.path()), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("S001C001P001R001A01_rgb.avi") && err.contains("does not parse"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ntu 1"),
        "A061 skipped: {}",
        text(&o)
    );
    let vids = videos(&out);
    assert_eq!(vids.len(), 24);
    let mut sides: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for v in &vids {
        let camera = &v.video_id[v.video_id.len() - 24..v.video_id.len() - 20];
        let want = match camera {
            "C002" => "L",
            "C001" => "C",
            "C003" => "R",
            other => panic!("camera {other}"),
        };
        assert_eq!(v.domain, want, "{}", v.video_id);
        assert_eq!(
            v.label_name,
            if v.video_id.contains("A001") {
                "drink water"
            } else {
                "tear up paper"
            }
        );
        assert_eq!(v.num_frames, 6);
        sides
            .entry((v.domain.clone(), v.group.clone().unwrap()))
            .or_default()
            .insert(v.split.clone());
    }
    assert!(
        sides.values().all(|s| s.len() == 1),
        "a performer straddles: {sides:?}"
    );
    assert!(vids.iter().any(|v| v.split == "val") && vids.iter().any(|v| v.split == "train"));
}

/// `vdg prep synthetic` clears and regenerates only a `raw/` folder it made itself (marked
/// from its first write on); a folder of the user's under that name is left untouched.
#[test]
fn synthetic_prep_never_deletes_a_folder_it_did_not_make() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("syn");
    let raw = out.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::write(raw.join("thesis.tex"), "precious").unwrap();
    let o = prep(&["synthetic", "--out", s(&out), "--scale", "tiny", "-q"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("was not made by `vdg prep synthetic`"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(raw.join("thesis.tex")).unwrap(),
        "precious"
    );
    // Its own folder is regenerated when the options change (another seed).
    let mine = tmp.path().join("mine");
    let into_mine = |extra: &[&str]| {
        let mut args = vec!["synthetic", "--out", s(&mine), "--scale", "tiny", "-q"];
        args.extend_from_slice(extra);
        prep(&args)
    };
    let o = into_mine(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = into_mine(&["--seed", "3", "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let marker = std::fs::read_to_string(mine.join("raw/.vdg-synthetic")).unwrap();
    assert!(marker.contains("seed=3"), "{marker}");
    // Other settings without --force are refused before the clips are touched: they are
    // the ones the folder's shards were made from.
    let o = into_mine(&["--benchmark", "synthetic_timing"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("holds a synthetic prep of other settings"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("raw/.vdg-synthetic")).unwrap(),
        marker
    );
    let o = into_mine(&["--seed", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("nothing to do"), "{}", text(&o));
    // While another run holds the folder's lock, raw/ is not touched (not even a folder
    // this command made and would regenerate for another seed).
    let lock = std::fs::File::create(mine.join(".vdg-prep.lock")).unwrap();
    lock.try_lock().unwrap();
    let before = std::fs::read_dir(mine.join("raw/source"))
        .map(|d| d.count())
        .ok();
    let o = into_mine(&["--seed", "4", "--force"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("lock"), "{}", text(&o));
    let marker = std::fs::read_to_string(mine.join("raw/.vdg-synthetic")).unwrap();
    assert!(
        marker.contains("seed=3"),
        "raw/ was regenerated under a held lock: {marker}"
    );
    assert_eq!(
        std::fs::read_dir(mine.join("raw/source"))
            .map(|d| d.count())
            .ok(),
        before
    );
    drop(lock);
}

/// A video whose decoding stops making progress is given up on after `--stall-timeout`: it
/// is recorded as failed with its file named, a fresh worker goes on with the rest, and the
/// run ends, whether the stuck call returns once given up on (an FFmpeg read, interrupted)
/// or never does (a read blocked in the kernel). More such videos than workers stop the run
/// with an error naming them; a rerun then resumes from the complete shards, and with
/// `--retry-failed` ends with the bytes of a run that never stalled. (Stalls injected
/// through the debug build's `VDG_INJECT_STALL` hook.)
#[test]
fn a_video_that_stops_making_progress_never_hangs_a_prep() {
    let tmp = tempfile::tempdir().unwrap();
    let small = ["--scale", "tiny", "--shard-size", "20KiB", "-q"];
    let clean = tmp.path().join("clean");
    let mut args = vec!["synthetic", "--out", s(&clean)];
    args.extend(small);
    let o = prep(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows =
        vdg_data::shard::read_videos_table(&clean.join(vdg_data::shard::VIDEOS_FILE)).unwrap();
    let (victim, second) = (rows[5].video_id.clone(), rows[30].video_id.clone());
    let name = |id: &str| {
        Path::new(id)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let run_with = |inject: &str, jobs: &str, out: &Path, extra: &[&str]| {
        let child = vdg()
            .args(["prep", "synthetic", "--out", s(out), "-j", jobs])
            .args(small)
            .args(extra)
            .env("VDG_INJECT_STALL", inject)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_at_most(child, 120, &format!("prep with {inject} stalled"))
    };
    let stored = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("frames-") || n == vdg_data::shard::VIDEOS_FILE)
            .map(|n| (n.clone(), std::fs::read(dir.join(n)).unwrap()))
            .collect()
    };
    let want = frames(&clean);

    // One stalled video, never returning (one worker) or returning once given up on (two).
    for (inject, jobs) in [(format!("{victim}:forever"), "1"), (victim.clone(), "2")] {
        let out = tmp.path().join(format!("stall-{jobs}"));
        let o = run_with(&inject, jobs, &out, &["--stall-timeout", "1"]);
        assert_eq!(o.status.code(), Some(1), "{inject}: {}", text(&o));
        // Said while it waits, naming the file, then when it gives up; at the end, if
        // its thread is still inside it.
        let waiting = log_line(&o, "no packet read and no frame decoded for");
        assert!(
            waiting.contains(&name(&victim)) && waiting.contains("given up on at 1 s"),
            "{waiting}"
        );
        if inject.ends_with(":forever") {
            assert!(
                log_line(&o, "the worker given up on is still inside it").contains(&name(&victim)),
                "{}",
                text(&o)
            );
        }
        let rows =
            vdg_data::shard::read_videos_table(&out.join(vdg_data::shard::VIDEOS_FILE)).unwrap();
        assert_eq!(rows.len(), want.len());
        for r in &rows {
            if r.video_id == victim {
                assert_eq!(r.status, vdg_data::VideoStatus::Failed);
                let e = r.error.clone().unwrap_or_default();
                assert!(
                    e.contains("no progress for 1 s") && e.contains(&name(&victim)),
                    "{e}"
                );
            } else {
                assert_eq!(r.status, vdg_data::VideoStatus::Ok, "{}", r.video_id);
            }
        }
        // Read back independently: every other video's frames as the clean run stored them.
        let got = frames(&out);
        assert!(!got.contains_key(&victim));
        for (id, f) in &want {
            if *id != victim {
                assert_eq!(got.get(id), Some(f), "{id}");
            }
        }
    }

    // A writer that makes no progress cannot be given up on, but is named while it waits.
    let out = tmp.path().join("slow-writer");
    let child = vdg()
        .args([
            "prep",
            "synthetic",
            "--out",
            s(&out),
            "--stall-timeout",
            "1",
        ])
        .args(small)
        .env("VDG_INJECT_DELAY_MS", format!("1500:{victim}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 120, "prep with a slow writer");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        log_line(&o, "the shard writer has made no progress for").contains("frames-00005.parquet"),
        "{}",
        text(&o)
    );
    assert_eq!(stored(&out), stored(&clean));

    // Two stalled videos, one worker: the second stops the run, naming both.
    let out = tmp.path().join("two");
    let o = run_with(
        &format!("{victim}:forever,{second}:forever"),
        "1",
        &out,
        &["--stall-timeout", "1"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("no progress for 1 s on 2 video(s)")
            && t.contains(&name(&victim))
            && t.contains(&name(&second)),
        "{t}"
    );
    assert!(!out.join(vdg_data::shard::PREP_FILE).exists());
    let kept = stored(&out).len();
    assert!(kept >= 5, "{kept} complete shards kept");
    // A rerun resumes (the first one stays failed, as recorded in a complete shard) ...
    let o = run_with("", "1", &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // ... and retrying it gives what a run that never stalled wrote, byte for byte.
    let o = run_with("", "1", &out, &["--retry-failed"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stored(&out), stored(&clean));
}

/// SIGTERM stops a video being decoded at once, not when it ends (a PKU-MMD recording takes
/// half a minute; a scheduler kills a job 30 s after SIGTERM by default): shown with a video
/// whose decoding makes no progress until the run stops (the debug build's
/// `VDG_INJECT_STALL` hook, which ends when the video's watch says so, as FFmpeg's reads
/// do). Complete shards are kept and a rerun gives the bytes of an uninterrupted run.
#[test]
fn sigterm_stops_the_videos_being_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let small = ["--scale", "tiny", "--shard-size", "20KiB", "-q", "-j", "1"];
    let clean = tmp.path().join("clean");
    let mut args = vec!["synthetic", "--out", s(&clean)];
    args.extend(small);
    assert_eq!(prep(&args).status.code(), Some(0));
    let rows =
        vdg_data::shard::read_videos_table(&clean.join(vdg_data::shard::VIDEOS_FILE)).unwrap();
    let out = tmp.path().join("out");
    let child = vdg()
        .args(["prep", "synthetic", "--out", s(&out)])
        .args(small)
        .env("VDG_INJECT_STALL", &rows[20].video_id)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the shards before it are written, the run stuck on it.
    let shard = out.join("frames-00019.parquet");
    let t0 = std::time::Instant::now();
    while !shard.exists() && t0.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!out.join("frames-00020.parquet").exists());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    // The stall timeout is the default 600 s: only the signal can end it.
    let o = wait_at_most(child, 60, "prep stopped by SIGTERM while decoding");
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("interrupted by a signal"), "{}", text(&o));
    assert!(shard.exists(), "complete shards are kept");
    let mut args = vec!["synthetic", "--out", s(&out)];
    args.extend(small);
    let o = prep(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(frames(&out), frames(&clean));
    for name in [
        "frames-00000.parquet",
        "frames-00047.parquet",
        "videos.parquet",
    ] {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(clean.join(name)).unwrap(),
            "{name}"
        );
    }
}

/// A panic while decoding one video makes that video a failed row naming its file; a panic
/// in the shard writer stops the run with an error. Neither hangs (injected through the
/// debug build's `VDG_INJECT_PANIC` hook).
#[test]
fn panics_in_a_worker_or_the_writer_never_hang_a_prep() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let o = prep(&["synthetic", "--out", s(&clean), "--scale", "tiny", "-q"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows =
        vdg_data::shard::read_videos_table(&clean.join(vdg_data::shard::VIDEOS_FILE)).unwrap();
    let victim = rows[5].video_id.clone();
    let run_with = |stage: &str, out: &Path| {
        let child = vdg()
            .args([
                "prep",
                "synthetic",
                "--out",
                s(out),
                "--scale",
                "tiny",
                "-q",
            ])
            .env("VDG_INJECT_PANIC", format!("{stage}:{victim}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_at_most(child, 120, &format!("prep with a {stage} panic"))
    };
    // Decoder: that video fails, named with its file; every other one is stored.
    let out = tmp.path().join("decode");
    let o = run_with("decode", &out);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let rows = vdg_data::shard::read_videos_table(&out.join(vdg_data::shard::VIDEOS_FILE)).unwrap();
    for r in &rows {
        if r.video_id == victim {
            assert_eq!(r.status, vdg_data::VideoStatus::Failed);
            let e = r.error.clone().unwrap_or_default();
            assert!(e.contains("decoding panicked") && e.contains(".avi"), "{e}");
        } else {
            assert_eq!(r.status, vdg_data::VideoStatus::Ok, "{}", r.video_id);
        }
    }
    // Writer: an error, not a hang, and no prep.json claiming completion.
    let out = tmp.path().join("writer");
    let o = run_with("writer", &out);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("shard writer panicked"), "{}", text(&o));
    assert!(!out.join(vdg_data::shard::PREP_FILE).exists());
}
