//! Forward and forward + backward of the lowered convolution on the layers of `cargo bench
//! --bench models -- conv` (the I3D-like 3-D layers, a ResNet-50 3x3 layer, the small CNN's),
//! the two alternated in one process, 15 rounds; prints the fastest and the median of each
//! and the ratio backward : forward from the fastest (the fastest is what a shared machine's
//! interruptions disturb least). `cargo run --release --example conv_costs [-- <filter>]`
//! (BENCHMARKS.md, "Convolution backward"); with a filter, only the layers whose name contains
//! it, e.g. `resnet`.

use std::time::Instant;

use candle_core::{DType, Device, Var};
use vdg_trainer::init::seeded_randn;
use vdg_trainer::nn3d::{Conv3dConfig, conv2d, conv3d};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    type Layer = Box<dyn Fn(&candle_core::Tensor, &candle_core::Tensor) -> candle_core::Tensor>;
    let mut layers: Vec<(String, Vec<usize>, Vec<usize>, Layer)> = Vec::new();
    for k in [[3, 3, 3], [3, 1, 1], [1, 3, 3]] {
        let cfg = Conv3dConfig::same(k, [1, 1, 1]);
        layers.push((
            format!(
                "conv3d {}x{}x{}, [2, 8, 64, 28, 28] -> 64",
                k[0], k[1], k[2]
            ),
            vec![2, 8, 64, 28, 28],
            vec![64, 64, k[0], k[1], k[2]],
            Box::new(move |x, w| conv3d(x, w, &cfg).expect("conv3d")),
        ));
    }
    for (name, [n, ci, h, co, stride]) in [
        (
            "conv2d resnet 3x3, [8, 64, 56, 56] -> 64",
            [8usize, 64, 56, 64, 1],
        ),
        (
            "conv2d small cnn 3x3/2, [80, 16, 16, 16] -> 32",
            [80, 16, 16, 32, 2],
        ),
    ] {
        layers.push((
            name.to_string(),
            vec![n, ci, h, h],
            vec![co, ci, 3, 3],
            Box::new(move |x, w| conv2d(x, w, 1, stride, 1).expect("conv2d")),
        ));
    }
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("layer | forward min / median ms | fwd+bwd min / median ms | bwd : fwd (min)");
    for (name, xs, ws, f) in layers.iter().filter(|l| l.0.contains(&filter)) {
        let x = Var::from_tensor(&seeded_randn(xs, 1, DType::F32, &dev)?)?;
        let w = Var::from_tensor(&seeded_randn(ws, 2, DType::F32, &dev)?)?;
        let (mut fwd, mut both) = (Vec::new(), Vec::new());
        for round in 0..16 {
            let t = Instant::now();
            let y = f(x.as_tensor(), w.as_tensor());
            drop(y);
            let a = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let y = f(x.as_tensor(), w.as_tensor());
            let grads = y.sum_all()?.backward()?;
            drop(grads);
            let b = t.elapsed().as_secs_f64() * 1e3;
            if round > 0 {
                fwd.push(a);
                both.push(b);
            }
        }
        let (f_min, f_med) = stats(fwd);
        let (b_min, b_med) = stats(both);
        println!(
            "{name} | {f_min:.2} / {f_med:.2} | {b_min:.2} / {b_med:.2} | {:.2}",
            (b_min - f_min) / f_min
        );
    }
    Ok(())
}
