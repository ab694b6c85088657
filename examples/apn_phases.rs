//! Wall time of the APN head's training step by phase (forward, backward, SGD) and of an
//! evaluation forward, on 256-d features, B = 40, M = 5, 12 classes (BENCHMARKS.md, "Where
//! the APN step's time goes"). `cargo run --release --example apn_phases`; set
//! `CANDLE_NUM_THREADS=1` for one thread.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use vdg_trainer::init::{seeded_init, seeded_randn};
use vdg_trainer::models::{ModelConfig, ModelKind, build_head};
use vdg_trainer::nn::cross_entropy;
use vdg_trainer::optim::{SgdMomentum, SgdParams};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let head = build_head(ModelKind::Apn, &ModelConfig::default(), 12, 0, vb)?;
    seeded_init(&vm, 0)?;
    let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true)?;
    let x = seeded_randn(&[40, 5, 256], 1, DType::F32, &dev)?;
    let labels: Vec<u32> = (0..40).map(|i| i % 12).collect();
    let y = Tensor::new(labels.as_slice(), &dev)?;
    let (warm, steps) = (2, 10);
    let mut t = [0.0f64; 4];
    for i in 0..warm + steps {
        let t0 = Instant::now();
        let loss = cross_entropy(&head.forward_t(&x, true)?.logits, &y)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        head.forward_t(&x, false)?
            .logits
            .sum_all()?
            .to_scalar::<f32>()?;
        let t4 = Instant::now();
        if i >= warm {
            for (acc, (a, b)) in t.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)]) {
                *acc += (b - a).as_secs_f64();
            }
        }
    }
    let ms = |s: f64| s * 1e3 / steps as f64;
    println!(
        "per step: forward {:.1} ms, backward {:.1} ms, SGD {:.1} ms; evaluation forward {:.1} ms",
        ms(t[0]),
        ms(t[1]),
        ms(t[2]),
        ms(t[3])
    );
    Ok(())
}
