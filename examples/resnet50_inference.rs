//! Frames per second of the ResNet-50 trunk in inference, as `vdg features` runs it: batch
//! 16, 224 x 224, random weights; the peer is `../shared/peers/resnet50_torch.py` (same
//! shapes). Three timed calls after one untimed. `cargo run --release --example
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
    let x = seeded_randn(&[16, 3, 224, 224], 1, DType::F32, &dev)?;
    trunk.trunk_features(&x, false)?;
    for _ in 0..3 {
        let t = Instant::now();
        trunk.trunk_features(&x, false)?;
        println!("{:.2} frames/s", 16.0 / t.elapsed().as_secs_f64());
    }
    Ok(())
}
