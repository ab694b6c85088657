use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::*;

/// A prepared tiny UCF-HMDB sample (generated clips, the real layout).
fn prepared(root: &Path) -> PathBuf {
    let raw = root.join("raw");
    vdg_pipeline::sample::write_ucf_hmdb_sample(&raw, 2, 10).unwrap();
    let out = root.join("prep");
    let r = raw.to_str().unwrap();
    let o = run(&[
        "prep",
        "ucf-hmdb",
        "--ucf101",
        r,
        "--hmdb51",
        r,
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    out
}

fn train_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--data",
        data,
        "--direction",
        "ucf->hmdb",
        "--out",
        out,
        "--backbone",
        "small_cnn",
        "--input-size",
        "32",
        "--feature-dim",
        "16",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "-q",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn train_writes_a_run_folder_and_resumes_after_kill_to_the_same_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let d = data.to_str().unwrap();
    let extra = [
        "--model",
        "apn",
        "--ada",
        "ada_star",
        "--gammas",
        "0.01,1",
        "--ada-steps",
        "2",
        "--epochs",
        "3",
    ];
    let a = tmp.path().join("a");
    let o = run(&train_args(d, a.to_str().unwrap(), &extra));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ucf -> hmdb: top-1"),
        "{}",
        text(&o)
    );
    for f in [
        "config.toml",
        "train.log",
        "metrics.json",
        "member-0/last.safetensors",
        "member-0/best.safetensors",
        "member-1/last.json",
    ] {
        assert!(a.join(f).exists(), "missing {f}");
    }
    let config = std::fs::read_to_string(a.join("config.toml")).unwrap();
    for needle in [
        "git_revision",
        "data_fingerprint",
        "seed = 0",
        "ada = \"ada_star\"",
        "direction = \"ucf->hmdb\"",
    ] {
        assert!(
            config.contains(needle),
            "config.toml lacks {needle}:\n{config}"
        );
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(
        metrics["members"].as_array().unwrap().len(),
        2,
        "one member per gamma"
    );
    assert_eq!(metrics["members"][0]["epochs"].as_array().unwrap().len(), 3);
    let hmdb = &metrics["targets"]["hmdb"];
    assert_eq!(hmdb["clips"], 24);
    assert_eq!(hmdb["confusion"].as_array().unwrap().len(), 12);
    let total: u64 = hmdb["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 24);

    // Same arguments, killed (-9) once the first epoch's checkpoint exists, then resumed.
    let b = tmp.path().join("b");
    let mut child = vdg()
        .args(train_args(d, b.to_str().unwrap(), &extra))
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !b.join("member-0/last.json").exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut resume_args = train_args(d, b.to_str().unwrap(), &extra);
    resume_args.push("--resume");
    let o = run(&resume_args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        std::fs::read(b.join("metrics.json")).unwrap(),
        std::fs::read(a.join("metrics.json")).unwrap(),
        "resumed run differs from the uninterrupted one"
    );
    // Without --resume an existing run folder is refused; with other arguments too.
    let o = run(&train_args(d, b.to_str().unwrap(), &extra));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--resume"),
        "{}",
        text(&o)
    );
    let mut other = train_args(d, b.to_str().unwrap(), &["--model", "tsn", "--epochs", "3"]);
    other.push("--resume");
    let o = run(&other);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn every_model_trains_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let d = data.to_str().unwrap();
    for (model, ada) in [
        ("tsn", "ada"),
        ("trn", "ada_star"),
        ("trn_attn", "none"),
        ("apn", "level2_only"),
    ] {
        let out = tmp.path().join(model);
        let o = run(&train_args(
            d,
            out.to_str().unwrap(),
            &[
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
            ],
        ));
        assert_eq!(o.status.code(), Some(0), "{model}: {}", text(&o));
        assert!(out.join("metrics.json").exists());
    }
    // The whole networks, on a ResNet-18 trunk; I3D and Non-local read dense 8-frame clips.
    for (model, ada) in [("tsm", "ada_star"), ("i3d", "ada"), ("non_local", "none")] {
        let out = tmp.path().join(model);
        let o_str = out.to_str().unwrap().to_owned();
        let mut args = train_args(
            d,
            &o_str,
            &[
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
                "--clip-frames",
                "8",
            ],
        );
        let b = args.iter().position(|a| *a == "--backbone").unwrap();
        args[b + 1] = "resnet18";
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "{model}: {}", text(&o));
        let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
        assert!(
            config.contains("model = \"") && config.contains(model),
            "{config}"
        );
        assert!(out.join("metrics.json").exists());
    }
    // A whole network needs a ResNet trunk: a clear error, not a panic.
    let out = tmp.path().join("tsm-small");
    let o = run(&train_args(
        d,
        out.to_str().unwrap(),
        &["--model", "tsm", "--epochs", "1"],
    ));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("resnet18 or resnet50"), "{}", text(&o));
}

#[test]
fn bad_training_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let d = data.to_str().unwrap();
    let out = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    // A diverging run stops on the first non-finite loss, naming epoch and batch.
    let o1 = out("nan");
    let mut args = train_args(d, &o1, &["--model", "tsn", "--epochs", "2"]);
    let lr = args.iter().position(|a| *a == "--lr").unwrap();
    args[lr + 1] = "1e30";
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("at epoch 1, batch"), "{}", text(&o));
    // CUDA in a CPU build: an error, not a silent CPU run.
    let o2 = out("cuda");
    let o = run(&train_args(
        d,
        &o2,
        &["--model", "tsn", "--device", "cuda", "--epochs", "1"],
    ));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("without CUDA"),
        "{}",
        text(&o)
    );
    // Unknown direction and model.
    let o3 = out("dir");
    let mut args = train_args(d, &o3, &["--model", "tsn"]);
    args[4] = "hmdb->kinetics";
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ucf->hmdb, hmdb->ucf"),
        "{}",
        text(&o)
    );
    let o4 = out("model");
    let o = run(&train_args(d, &o4, &["--model", "i4d"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("possible values: tsn, trn, trn_attn, apn"),
        "{}",
        text(&o)
    );
    // ADA* on TSN has no multilayer features.
    let o5 = out("tsnstar");
    let o = run(&train_args(
        d,
        &o5,
        &["--model", "tsn", "--ada", "ada_star", "--epochs", "1"],
    ));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("use `ada`"),
        "{}",
        text(&o)
    );
}
