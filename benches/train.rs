//! Training throughput on CPU (clips per second), and the shard loader alone.
//!
//! - `apn_head_features_plain` / `apn_head_features_ada_star`: one SGD step of the APN head on
//!   precomputed 256-d frame features, B = 40, M = 5, 12 classes; plain, and with video ADA*
//!   (level II + level III copies, T_max = 5 ascent steps each, then the released code's
//!   joint step on 3 x 40 clips); `..._ada_star_sequential`: Algorithm 1 as written (the
//!   clean step, the ascent, one step per copy through its own classifier);
//!   `..._sequential_input_grads`: the same with the ascent on detached weights, so its
//!   backward passes compute only the input's gradient (what `vdg train` runs).
//! - `small_cnn_pixels_plain`: one step of small CNN + APN on 64x64 pixels, B = 8, M = 5.
//! - `loader_train_224` / `loader_eval_224`: batches of 8 clips x 5 frames decoded from
//!   prepared 320x240 shards, augmented to 224x224 (both cores).
//! - `loader_features_b40`: batches of 40 clips x 5 cached 256-d frame features
//!   (`vdg features` output) for `vdg train --features`.
//!
//! Run: `cargo bench --bench train` (see BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vdg_trainer::ada::{AdaConfig, AdaVariant, adversarial_copies};
use vdg_trainer::init::{seeded_init, seeded_randn};
use vdg_trainer::loader::{ClipSet, LoaderConfig, make_batch};
use vdg_trainer::models::blocks::{Backbone, BackboneKind};
use vdg_trainer::models::{ModelConfig, ModelKind, Sampling, VideoModel, build_head};
use vdg_trainer::nn::cross_entropy;
use vdg_trainer::optim::{SgdMomentum, SgdParams};

fn head_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let cfg = ModelConfig::default();
    let vm = VarMap::new();
    let head = build_head(
        ModelKind::Apn,
        &cfg,
        12,
        0,
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )
    .unwrap();
    seeded_init(&vm, 0).unwrap();
    let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true).unwrap();
    let x = seeded_randn(&[40, 5, 256], 1, DType::F32, &dev).unwrap();
    let y = Tensor::new(
        (0..40u32).map(|i| i % 12).collect::<Vec<_>>().as_slice(),
        &dev,
    )
    .unwrap();
    let mut g = c.benchmark_group("train_cpu");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(40));
    g.bench_function("apn_head_features_plain", |b| {
        b.iter(|| {
            let loss = cross_entropy(&head.forward_t(&x, true).unwrap().logits, &y).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        })
    });
    let targets = AdaVariant::AdaStar.targets(ModelKind::Apn).unwrap();
    let ada = AdaConfig::default();
    // The released code's joint minimisation: one step on the clean batch and both copies.
    g.bench_function("apn_head_features_ada_star", |b| {
        b.iter(|| {
            let fwd = |t: &Tensor| head.forward_t(t, true);
            let copies = adversarial_copies(&fwd, &x, &y, &targets, &ada).unwrap();
            let xs: Vec<Tensor> = std::iter::once(x.clone()).chain(copies).collect();
            let xx = Tensor::cat(&xs, 0).unwrap();
            let yy = Tensor::cat(&[y.clone(), y.clone(), y.clone()], 0).unwrap();
            let loss = cross_entropy(&head.forward_t(&xx, true).unwrap().logits, &yy).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        })
    });
    // Algorithm 1 as written: the clean step, the ascent, then one step per copy through
    // its own classifier (h(R^II), h(R^III)).
    g.bench_function("apn_head_features_ada_star_sequential", |b| {
        b.iter(|| {
            let loss = cross_entropy(&head.forward_t(&x, true).unwrap().logits, &y).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let fwd = |t: &Tensor| head.forward_t(t, true);
            let copies = adversarial_copies(&fwd, &x, &y, &targets, &ada).unwrap();
            for (t, copy) in targets.iter().zip(&copies) {
                let out = head.forward_t(copy, true).unwrap();
                let loss = cross_entropy(out.logits_for(t), &y).unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
        })
    });
    // The same, with the ascent on detached weights (input gradients only), as `vdg train`
    // runs it: the twin is rebuilt from the current values every iteration.
    g.bench_function("apn_head_features_ada_star_sequential_input_grads", |b| {
        b.iter(|| {
            let loss = cross_entropy(&head.forward_t(&x, true).unwrap().logits, &y).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let tensors = vdg_trainer::init::detached(&vm).unwrap();
            let twin = build_head(
                ModelKind::Apn,
                &cfg,
                12,
                0,
                VarBuilder::from_tensors(tensors, DType::F32, &dev),
            )
            .unwrap();
            let fwd = |t: &Tensor| twin.forward_t(t, true);
            let copies = adversarial_copies(&fwd, &x, &y, &targets, &ada).unwrap();
            for (t, copy) in targets.iter().zip(&copies) {
                let out = head.forward_t(copy, true).unwrap();
                let loss = cross_entropy(out.logits_for(t), &y).unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
        })
    });
    // Pixels through the small CNN.
    let vm2 = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm2, DType::F32, &dev);
    let model = VideoModel::frames(
        Backbone::new(BackboneKind::SmallCnn, 256, 0.8, vb.pp("backbone")).unwrap(),
        build_head(ModelKind::Apn, &cfg, 12, 0, vb.pp("head")).unwrap(),
        ModelKind::Apn,
    );
    seeded_init(&vm2, 0).unwrap();
    let mut opt2 = SgdMomentum::from_varmap(&vm2, SgdParams::default(), |_| true).unwrap();
    let px = seeded_randn(&[8, 5, 3, 64, 64], 2, DType::F32, &dev).unwrap();
    let py = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &dev).unwrap();
    g.throughput(Throughput::Elements(8));
    g.bench_function("small_cnn_pixels_plain", |b| {
        b.iter(|| {
            let loss = cross_entropy(&model.forward_t(&px, true).unwrap().logits, &py).unwrap();
            opt2.step(&loss.backward().unwrap()).unwrap();
        })
    });
    g.finish();
}

fn loader(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    // 320x240 clips like UCF101's, 50 frames each, two classes.
    for (k, class) in ["Biking", "PullUps"].iter().enumerate() {
        let dir = raw.join("UCF-101").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..8u32 {
            let p = dir.join(format!("v_{class}_g{:02}_c01.avi", i + 1));
            vdg_pipeline::encode::write_pattern_video(
                &p,
                "mpeg4",
                320,
                240,
                25,
                50,
                i + 10 * k as u32,
            )
            .unwrap();
        }
    }
    let manifest = vdg_data::Manifest::builtin("ucf_hmdb").unwrap();
    let scan = vdg_pipeline::scan::scan_ucf101(&raw).unwrap();
    let plan = vdg_pipeline::plan::build_plan(&manifest, &[&scan], &Default::default()).unwrap();
    let out = tmp.path().join("prep");
    let quiet = |_: &vdg_pipeline::prep::PrepEvent<'_>| {};
    vdg_pipeline::prep::run_prep(
        &plan,
        &out,
        &vdg_pipeline::prep::RunOptions {
            jobs: 0,
            ..Default::default()
        },
        &quiet,
    )
    .unwrap();
    let set = ClipSet::open(&out, &["ucf".to_string()], None).unwrap();
    let mut g = c.benchmark_group("loader");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(8));
    for train in [true, false] {
        let cfg = LoaderConfig {
            sampling: Sampling::Segments(5),
            input_size: 224,
            train,
            batch_size: 8,
            flip: true,
            seed: 0,
        };
        let name = if train {
            "loader_train_224"
        } else {
            "loader_eval_224"
        };
        let mut epoch = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                epoch += 1;
                let idx: Vec<usize> = (0..8).map(|i| (i + epoch) % set.len()).collect();
                make_batch(&set, &idx, &cfg, epoch, &Device::Cpu).unwrap()
            })
        });
    }
    // Cached features (small CNN, 256-d) of the same videos: the loader of
    // `vdg train --features`, batches of 40 clips x 5 segments like the APN head step above.
    let feat = tmp.path().join("features");
    let mut fo = vdg_trainer::features::FeaturesOptions::new(
        out.clone(),
        feat.clone(),
        BackboneKind::SmallCnn,
    );
    fo.input_size = 112;
    vdg_trainer::features::run_features(&fo, &|_| {}).unwrap();
    let fset = ClipSet::open(&feat, &["ucf".to_string()], None).unwrap();
    g.throughput(Throughput::Elements(40));
    let cfg = LoaderConfig {
        sampling: Sampling::Segments(5),
        input_size: 224,
        train: true,
        batch_size: 40,
        flip: true,
        seed: 0,
    };
    let mut epoch = 0;
    g.bench_function("loader_features_b40", |b| {
        b.iter(|| {
            epoch += 1;
            let idx: Vec<usize> = (0..40).map(|i| (i + epoch) % fset.len()).collect();
            make_batch(&fset, &idx, &cfg, epoch, &Device::Cpu).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, head_step, loader);
criterion_main!(benches);
