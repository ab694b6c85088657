//! Frames per second of the ResNet-50 trunk in inference, as `vdg features` runs it (the
//! frozen trunk: channels-last on the CPU, BatchNorms folded once): batch 16, 224 x 224,
//! random weights; the peer is `../shared/peers/resnet50_torch.py` (same shapes). Three timed
//! calls after one untimed; `--graph` times candle's graph path (`trunk_features(x, false)`)
//! instead, `--batch N` another batch (`vdg features` runs up to 64 frames at a time). `cargo run --release --example
//! resnet50_inference` (BENCHMARKS.md, "ResNet-50 inference").

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use vdg_trainer::init::{seeded_init, seeded_randn};
use vdg_trainer::models::blocks::{Backbone, BackboneKind};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let trunk = Backbone::new(BackboneKind::Resnet50, 256, 0.0, vb)?;
    seeded_init(&vm, 0)?;
    let args: Vec<String> = std::env::args().collect();
    let graph = args.iter().any(|a| a == "--graph");
    let batch = match args.iter().position(|a| a == "--batch") {
        Some(i) => args.get(i + 1).map_or(Ok(16), |b| b.parse())?,
        None => 16,
    };
    let x = seeded_randn(&[batch, 3, 224, 224], 1, DType::F32, &dev)?;
    let t = Instant::now();
    let frozen = trunk.frozen(&dev)?;
    println!("fold: {:.3} s", t.elapsed().as_secs_f64());
    let run = || -> anyhow::Result<()> {
        if graph {
            trunk.trunk_features(&x, false)?;
        } else {
            frozen.features(&x)?;
        }
        Ok(())
    };
    run()?;
    for _ in 0..3 {
        let t = Instant::now();
        run()?;
        println!("{:.2} frames/s", batch as f64 / t.elapsed().as_secs_f64());
    }
    Ok(())
}
