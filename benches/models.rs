//! The 3-D convolution against a matrix product of the same FLOPs, and training throughput of
//! the whole networks (TSM, I3D, Non-local) against TSN on the same ResNet-50 trunk.
//!
//! - `conv3d/*`: forward, and forward + backward, of `nn3d::conv3d` on I3D-like layers
//!   (`x [2, 8, 64, 28, 28]`); the peer `matmul_same_flops` multiplies `[B*T*H*W, C_in*k]` by
//!   `[C_in*k, C_out]`, the FLOPs of the 3x3x3 layer as one GEMM (an im2col lower bound).
//! - `conv2d/*`: the same for 2-D 3x3 convolutions (a ResNet-50 layer, the small CNN's).
//! - `networks/*`: one SGD step (forward, backward, momentum) on ResNet-50 at 64x64, B = 2:
//!   TSN and TSM on 8 segments, I3D and Non-local on 16-frame dense clips.
//!
//! Run: `cargo bench --bench models` (see BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vdg_trainer::init::{seeded_init, seeded_randn};
use vdg_trainer::models::blocks::resnet::is_frozen_bn;
use vdg_trainer::models::blocks::{Backbone, BackboneKind};
use vdg_trainer::models::{ModelConfig, ModelKind, VideoModel, build_head, build_network};
use vdg_trainer::nn::cross_entropy;
use vdg_trainer::nn3d::{Conv3dConfig, conv3d};
use vdg_trainer::optim::{SgdMomentum, SgdParams};

/// The allocator `vdg` runs with (crates/cli/main.rs): glibc's would add page faults on every
/// large temporary that `vdg` does not pay.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn conv(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (b, t, ci, h, w, co) = (2usize, 8usize, 64usize, 28usize, 28usize, 64usize);
    let x = seeded_randn(&[b, t, ci, h, w], 1, DType::F32, &dev).unwrap();
    let mut g = c.benchmark_group("conv3d");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for k in [[3, 3, 3], [3, 1, 1], [1, 3, 3]] {
        let taps: usize = k.iter().product();
        let flops = 2 * b * t * h * w * co * ci * taps;
        g.throughput(Throughput::Elements(flops as u64));
        let wt = seeded_randn(&[co, ci, k[0], k[1], k[2]], 2, DType::F32, &dev).unwrap();
        let cfg = Conv3dConfig::same(k, [1, 1, 1]);
        let name = format!("{}x{}x{}", k[0], k[1], k[2]);
        g.bench_function(format!("forward_{name}"), |bn| {
            bn.iter(|| conv3d(&x, &wt, &cfg).unwrap())
        });
        let a = Tensor::ones((b * t * h * w, ci * taps), DType::F32, &dev).unwrap();
        let m = Tensor::ones((ci * taps, co), DType::F32, &dev).unwrap();
        g.bench_function(format!("matmul_same_flops_{name}"), |bn| {
            bn.iter(|| a.matmul(&m).unwrap())
        });
        let xv = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&wt).unwrap();
        g.bench_function(format!("forward_backward_{name}"), |bn| {
            bn.iter(|| {
                let y = conv3d(xv.as_tensor(), wv.as_tensor(), &cfg).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    g.finish();
}

fn networks(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("networks");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(2));
    let y = Tensor::new(&[0u32, 1], &dev).unwrap();
    for kind in [
        ModelKind::Tsn,
        ModelKind::Tsm,
        ModelKind::I3d,
        ModelKind::NonLocal,
    ] {
        let cfg = ModelConfig {
            segments: 8,
            clip_frames: 16,
            ..ModelConfig::default()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let model = if kind.is_head() {
            VideoModel::frames(
                Backbone::new(BackboneKind::Resnet50, 256, 0.8, vb.pp("backbone")).unwrap(),
                build_head(kind, &cfg, 12, 0, vb.pp("head")).unwrap(),
                kind,
            )
        } else {
            VideoModel::network(
                build_network(kind, &cfg, BackboneKind::Resnet50, 12, vb.pp("backbone")).unwrap(),
                kind,
            )
        };
        seeded_init(&vm, 0).unwrap();
        let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |n| {
            !(n.contains("running") || is_frozen_bn(n))
        })
        .unwrap();
        let frames = kind.sampling(&cfg).frames();
        let x = seeded_randn(&[2, frames, 3, 64, 64], 1, DType::F32, &dev).unwrap();
        g.bench_function(format!("{}_resnet50_64px_step", kind.name()), |b| {
            b.iter(|| {
                let loss = cross_entropy(&model.forward_t(&x, true).unwrap().logits, &y).unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            })
        });
    }
    g.finish();
}

/// 2-D convolutions through `nn3d::conv2d`: a ResNet-50 3x3 layer (stage 1, 56x56) and the
/// small CNN's second layer on a bench batch (16 clips x 5 frames at 16x16, stride 2), forward
/// and forward + backward, with the matrix product of the same FLOPs as the peer.
fn conv2d(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("conv2d");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for (name, [n, ci, h, co, stride]) in [
        ("resnet_3x3_56px", [8usize, 64, 56, 64, 1]),
        ("small_cnn_3x3_s2", [80, 16, 16, 32, 2]),
    ] {
        let ho = (h + 2 - 3) / stride + 1;
        let flops = 2 * n * ho * ho * co * ci * 9;
        g.throughput(Throughput::Elements(flops as u64));
        let x = seeded_randn(&[n, ci, h, h], 1, DType::F32, &dev).unwrap();
        let wt = seeded_randn(&[co, ci, 3, 3], 2, DType::F32, &dev).unwrap();
        g.bench_function(format!("forward_{name}"), |bn| {
            bn.iter(|| vdg_trainer::nn3d::conv2d(&x, &wt, 1, stride, 1).unwrap())
        });
        let a = Tensor::ones((n * ho * ho, ci * 9), DType::F32, &dev).unwrap();
        let m = Tensor::ones((ci * 9, co), DType::F32, &dev).unwrap();
        g.bench_function(format!("matmul_same_flops_{name}"), |bn| {
            bn.iter(|| a.matmul(&m).unwrap())
        });
        let xv = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&wt).unwrap();
        g.bench_function(format!("forward_backward_{name}"), |bn| {
            bn.iter(|| {
                let y = vdg_trainer::nn3d::conv2d(xv.as_tensor(), wv.as_tensor(), 1, stride, 1)
                    .unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, conv, conv2d, networks);
criterion_main!(benches);
