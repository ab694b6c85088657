//! Peak memory and time of one pixel training step, as `vdg train --model tsn --backbone
//! resnet18` runs it at the paper's shapes: 40 clips x 5 frames at 224 x 224, SGD with
//! momentum, random weights, vdg's allocator (mimalloc). The peer is
//! `../shared/peers/resnet_train_torch.py --arch resnet18 --images 200` (BENCHMARKS.md,
//! "Training memory").
//!
//! `cargo run --release --example train_step_memory -- [resnet18|resnet50] [clips] [size] [steps] [recompute]`
//!
//! `recompute` as the fifth argument: `vdg train --recompute on` (residual blocks recomputed in
//! backward).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use vdg_trainer::init::{seeded_init, seeded_randn};
use vdg_trainer::models::blocks::resnet::is_frozen_bn;
use vdg_trainer::models::blocks::{Backbone, BackboneKind};
use vdg_trainer::models::{ModelConfig, ModelKind, VideoModel, build_head};
use vdg_trainer::nn::cross_entropy;
use vdg_trainer::optim::{SgdMomentum, SgdParams};

#[global_allocator]
static GLOBAL: vdg_trainer::memcheck::Counting<mimalloc::MiMalloc> =
    vdg_trainer::memcheck::Counting(mimalloc::MiMalloc);

/// The process's peak resident set (VmHWM), in GB.
fn peak_rss_gb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1e6)
}

/// Peak bytes of large allocations alive at once (what `vdg train`'s memory check probes),
/// in GB.
fn peak_counted_gb() -> f64 {
    vdg_trainer::memcheck::counted().map_or(f64::NAN, |(_, peak)| peak as f64 / 1e9)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = args.first().map_or("resnet18", String::as_str);
    let clips: usize = args.get(1).map_or(Ok(40), |v| v.parse())?;
    let size: usize = args.get(2).map_or(Ok(224), |v| v.parse())?;
    let steps: usize = args.get(3).map_or(Ok(2), |v| v.parse())?;
    let recompute = args.get(4).is_some_and(|v| v == "recompute");
    let kind = match arch {
        "resnet50" => BackboneKind::Resnet50,
        _ => BackboneKind::Resnet18,
    };
    let dev = Device::Cpu;
    let cfg = ModelConfig::default();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let model = VideoModel::frames(
        Backbone::new(kind, 256, 0.8, vb.pp("backbone"))?,
        build_head(ModelKind::Tsn, &cfg, 12, 0, vb.pp("head"))?,
        ModelKind::Tsn,
    )
    .with_recompute(recompute);
    seeded_init(&vm, 0)?;
    let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |n| {
        !(n.contains("running") || is_frozen_bn(n))
    })?;
    let frames = cfg.segments;
    let x = seeded_randn(&[clips, frames, 3, size, size], 1, DType::F32, &dev)?;
    let y = Tensor::new((0..clips as u32).map(|i| i % 12).collect::<Vec<_>>(), &dev)?;
    println!(
        "before the first step: peak RSS {:.2} GB, allocated at once {:.2} GB",
        peak_rss_gb(),
        peak_counted_gb()
    );
    for step in 0..steps {
        let t = Instant::now();
        let loss = cross_entropy(&model.forward_t(&x, true)?.logits, &y)?;
        opt.step(&loss.backward()?)?;
        println!(
            "step {step}: {:.1} s, peak RSS so far {:.2} GB, allocated at once {:.2} GB",
            t.elapsed().as_secs_f64(),
            peak_rss_gb(),
            peak_counted_gb()
        );
    }
    println!(
        "vdg {arch} TSN{}, {clips} clips x {frames} frames = {} images {size}x{size}: peak RSS {:.2} GB",
        if recompute { " (recompute)" } else { "" },
        clips * frames,
        peak_rss_gb()
    );
    Ok(())
}
