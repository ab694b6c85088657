//! Plain APN training steps on cached features, nothing else: the `apn_step_plain` row of
//! `vdg device throughput` (2048-d features, projection to D = 256 with dropout 0.8, the APN
//! head, B = 40, M = 5, FFN 1024, 12 classes, through `step::iteration`) in a loop, for
//! profilers (BENCHMARKS.md, "The APN head as one operation").
//!
//! `cargo run --release --example apn_step [-- STEPS [ada]]`, or under `perf record -g`;
//! `ada` runs the `apn_step_ada_star` row instead (Algorithm 1, ascent on a detached twin).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vdg_trainer::ada::{AdaConfig, AdaVariant};
use vdg_trainer::init::{detached, seeded_init, seeded_randn};
use vdg_trainer::models::blocks::Backbone;
use vdg_trainer::models::{ModelConfig, ModelKind, VideoModel, build_head};
use vdg_trainer::optim::{SgdMomentum, SgdParams};
use vdg_trainer::step::{AdaStep, At, Minimisation, Updater, iteration};

/// The allocator `vdg` runs with (glibc's maps and unmaps the step's large buffers).
#[global_allocator]
static GLOBAL: vdg_trainer::memcheck::Counting<mimalloc::MiMalloc> =
    vdg_trainer::memcheck::Counting(mimalloc::MiMalloc);

fn main() -> anyhow::Result<()> {
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 30,
    };
    let ada = std::env::args().nth(2).as_deref() == Some("ada");
    let device = Device::Cpu;
    let cfg = ModelConfig::default();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &device);
    let head = build_head(ModelKind::Apn, &cfg, 12, 0, vb.pp("head"))?;
    let projection = Backbone::cached(2048, cfg.feature_dim, 0.8, vb.pp("backbone"))?;
    seeded_init(&vm, 0)?;
    let model = VideoModel::frames(projection, head, ModelKind::Apn);
    let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true)?;
    let x = seeded_randn(&[40, 5, 2048], 1, DType::F32, &device)?;
    let labels: Vec<u32> = (0..40u32).map(|i| i % 12).collect();
    let y = Tensor::new(labels.as_slice(), &device)?;
    let step = if ada {
        AdaStep {
            targets: AdaVariant::AdaStar.targets(ModelKind::Apn)?,
            cfg: AdaConfig::default(),
            minimisation: Minimisation::Sequential,
        }
    } else {
        AdaStep::plain()
    };
    let twin = || -> vdg_trainer::error::Result<VideoModel> {
        let vb = VarBuilder::from_tensors(detached(&vm)?, DType::F32, &device);
        let head = build_head(ModelKind::Apn, &cfg, 12, 0, vb.pp("head"))?;
        let projection = Backbone::cached(2048, cfg.feature_dim, 0.8, vb.pp("backbone"))?;
        Ok(VideoModel::frames(projection, head, ModelKind::Apn))
    };
    // Every step's time: on a shared machine the median and the fastest quarter say more
    // than the mean.
    let mut run = |n: usize| -> anyhow::Result<Vec<f64>> {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = std::time::Instant::now();
            let mut up = Updater {
                opt: &mut opt,
                clip_norm: 20.0,
            };
            let at = At { epoch: 0, batch: 0 };
            iteration(&model, &mut up, &x, &y, &step, Some(&twin), at)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    };
    run(2)?;
    let mut times = run(steps)?;
    let secs: f64 = times.iter().sum();
    if std::env::var_os("APN_STEP_TIMES").is_some() {
        let ms: Vec<String> = times.iter().map(|t| format!("{:.0}", t * 1e3)).collect();
        println!("{}", ms.join(" "));
    }
    times.sort_by(f64::total_cmp);
    let (median, quartile) = (times[steps / 2], times[steps / 4]);
    println!(
        "{:.1} clips/s ({steps} {} steps, {:.1} ms each; median {:.1} ms = {:.1} clips/s, \
         first quartile {:.1} ms)",
        40.0 * steps as f64 / secs,
        if ada { "ADA*" } else { "plain" },
        secs * 1e3 / steps as f64,
        median * 1e3,
        40.0 / median,
        quartile * 1e3
    );
    Ok(())
}
