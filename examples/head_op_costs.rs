//! Costs behind BENCHMARKS.md, "The APN step in fewer graph nodes": candle's CPU matrix
//! product at the APN head's shapes (GFLOP/s), and candle's ReLU forward + backward against
//! a plain product on `[200, 1024]` (what the fused ReLU of `rowops::Linear` replaces).
//! `cargo run --release --example head_op_costs`; `RAYON_NUM_THREADS=1` for one thread.

use std::time::Instant;

use candle_core::{DType, Device, Var};
use vdg_trainer::init::seeded_randn;

/// Best wall time of `f` over 30 calls after 3 warm-up calls, in seconds.
fn best<F: FnMut() -> anyhow::Result<()>>(mut f: F) -> anyhow::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut best = f64::MAX;
    for _ in 0..30 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [(200, 256, 1024), (200, 1024, 256), (200, 256, 256)] {
        let x = seeded_randn(&[m, k], 1, DType::F32, &dev)?;
        let w = seeded_randn(&[n, k], 2, DType::F32, &dev)?;
        let s = best(|| {
            x.matmul(&w.t()?)?;
            Ok(())
        })?;
        let flop = 2.0 * (m * k * n) as f64;
        println!(
            "x [{m}, {k}] W^T [{k}, {n}]: {:.3} ms, {:.1} GFLOP/s",
            s * 1e3,
            flop / s / 1e9
        );
    }
    let h = Var::from_tensor(&seeded_randn(&[200, 1024], 3, DType::F32, &dev)?)?;
    let g = seeded_randn(&[200, 1024], 4, DType::F32, &dev)?;
    let relu = best(|| {
        (h.as_tensor().relu()? * &g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let product = best(|| {
        (h.as_tensor() * &g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    println!(
        "[200, 1024] forward + backward: candle relu then product {:.3} ms, product alone {:.3} ms",
        relu * 1e3,
        product * 1e3
    );
    Ok(())
}
