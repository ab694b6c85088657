//! Device checks (`vdg device parity` / `vdg device throughput`): every registered model on a
//! device against a CPU float64 reference, and the throughput of the steps that matter.
//!
//! Parity: each model is built once in float64 on the CPU with seeded weights; the device
//! copy gets the same weights cast to float32. Both run one training-mode forward (dropout is
//! 0 in [`ModelConfig::tiny`], relation subsets come from the same seed) and a backward of
//! the cross-entropy. The errors reported are relative L2 errors against the reference:
//! `||a - r|| / ||r||` for the logits and, per parameter, for the gradients (the worst one is
//! named). On the CPU this measures float32 rounding alone and is the baseline a GPU's
//! numbers are read against; [`PARITY_TOLERANCE`] is far above both (float32 kernels that
//! agree differ by 1e-7..1e-5 here) and far below what a wrong kernel gives (order 1).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use serde::Serialize;

use crate::ada::{AdaConfig, AdaVariant};
use crate::error::{Error, Result};
use crate::init::{seeded_init, seeded_randn};
use crate::models::blocks::{Backbone, BackboneKind};
use crate::models::{ModelConfig, ModelKind, VideoModel, build_head, build_network};
use crate::nn::cross_entropy;
use crate::optim::{SgdMomentum, SgdParams};
use crate::step::{AdaStep, At, Minimisation, Updater, iteration};
use crate::train::Precision;

/// Largest relative L2 error of logits or of any parameter's gradient that passes (float32).
pub const PARITY_TOLERANCE: f64 = 1e-3;

/// Mixed precision (trunk convolutions in bf16/f16: 8 or 11 significant bits): largest
/// relative L2 error of the logits.
pub const MIXED_PRECISION_TOLERANCE: f64 = 5e-2;

/// Mixed precision: largest relative L2 error of all gradients together. Rounding to 11 bits
/// in every trunk convolution, compounded over the layers and amplified by the network's
/// conditioning, measured 0.6-10 % in f16 on the CPU (Non-local the worst: its float32 row is
/// already 10-50x the others'); bf16 keeps 3 bits fewer. A wrong kernel gives errors of order 1.
pub const MIXED_PRECISION_GRADIENT_TOLERANCE: f64 = 0.25;

/// One model's parity result.
#[derive(Debug, Clone, Serialize)]
pub struct ParityRow {
    /// Registry name of the model.
    pub model: String,
    /// Its trunk.
    pub backbone: String,
    /// The device compared with the CPU float64 reference (`cpu`, `cuda:0`).
    pub device: String,
    /// Input shape `[B, T, 3, H, W]`.
    pub input: Vec<usize>,
    /// Relative L2 error of the logits.
    pub logits_error: f64,
    /// Relative L2 error of all parameter gradients together (one vector).
    pub gradient_error: f64,
    /// Worst relative L2 error of one parameter's gradient (large for half precision where
    /// a gradient nearly cancels, e.g. BatchNorm biases followed by BatchNorm).
    pub worst_gradient_error: f64,
    /// The parameter with that error.
    pub worst_parameter: String,
    /// Parameters with a reference gradient.
    pub parameters: usize,
    /// Parameters the reference has a gradient for and the device has none.
    pub missing_gradients: Vec<String>,
    /// Seconds the device's forward and backward took (first call: includes kernel loading).
    pub seconds: f64,
    /// Arithmetic of the device's trunk convolutions.
    pub precision: String,
    /// The tolerance applied to the logits.
    pub tolerance: f64,
    /// Mixed precision: the same model's errors in float32 on the same device (logits, all
    /// gradients together), which measure how much the model amplifies rounding.
    pub float32_errors: Option<(f64, f64)>,
}

/// A parity row's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within the tolerances, every gradient present.
    Ok,
    /// Outside a tolerance where the check can tell: a wrong result.
    Fail,
    /// Mixed precision outside a tolerance that the half type's rounding alone is expected to
    /// exceed at this model's conditioning ([`ParityRow::expected_half_errors`]): the check
    /// cannot tell rounding from a wrong kernel here, so it judges neither way.
    Unresolved,
}

impl Verdict {
    /// As printed: `ok`, `FAIL`, `unresolved`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Unresolved => "unresolved",
        }
    }
}

/// How many times coarser a half type's rounding is than float32's: unit roundoffs 2^-8
/// (bf16, 8 significant bits), 2^-11 (f16) and 2^-24 (float32).
pub fn roundoff_ratio(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1.0,
        Precision::Bf16 => 65536.0,
        Precision::F16 => 8192.0,
    }
}

impl ParityRow {
    /// Within the tolerances, with every gradient present: float32 judges the logits and
    /// every parameter's gradient against [`PARITY_TOLERANCE`]; mixed precision the logits
    /// against [`MIXED_PRECISION_TOLERANCE`] and all gradients together against
    /// [`MIXED_PRECISION_GRADIENT_TOLERANCE`].
    pub fn passed(&self) -> bool {
        let grads_ok = if self.precision == Precision::F32.name() {
            self.worst_gradient_error <= PARITY_TOLERANCE
        } else {
            self.gradient_error <= MIXED_PRECISION_GRADIENT_TOLERANCE
        };
        self.logits_error <= self.tolerance && grads_ok && self.missing_gradients.is_empty()
    }

    /// Mixed precision: the errors (logits, all gradients) the half type's rounding alone
    /// would give, estimated as the model's float32 errors times [`roundoff_ratio`]. Rough
    /// (within about 10x either way on the models here: BENCHMARKS.md, "GPU (CUDA)"), but an
    /// estimate above a tolerance says the model amplifies rounding past what the check
    /// can resolve at this precision.
    pub fn expected_half_errors(&self) -> Option<(f64, f64)> {
        let ratio = roundoff_ratio(self.precision_kind()?);
        let (logits, gradients) = self.float32_errors?;
        Some((logits * ratio, gradients * ratio))
    }

    fn precision_kind(&self) -> Option<Precision> {
        [Precision::F32, Precision::Bf16, Precision::F16]
            .into_iter()
            .find(|p| p.name() == self.precision)
    }

    /// [`Verdict::Ok`] when [`Self::passed`]; a mixed-precision row that is out of a
    /// tolerance only where [`Self::expected_half_errors`] is out of it too (with every
    /// gradient present) is [`Verdict::Unresolved`]; anything else fails.
    pub fn verdict(&self) -> Verdict {
        if self.passed() {
            return Verdict::Ok;
        }
        let Some((logits, gradients)) = self.expected_half_errors() else {
            return Verdict::Fail;
        };
        let logits_explained = self.logits_error <= self.tolerance || logits > self.tolerance;
        let gradients_explained = self.gradient_error <= MIXED_PRECISION_GRADIENT_TOLERANCE
            || gradients > MIXED_PRECISION_GRADIENT_TOLERANCE;
        if self.missing_gradients.is_empty() && logits_explained && gradients_explained {
            Verdict::Unresolved
        } else {
            Verdict::Fail
        }
    }
}

/// The name of `device` as the CLI spells it.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn build(
    kind: ModelKind,
    cfg: &ModelConfig,
    classes: usize,
    vb: VarBuilder,
) -> Result<(VideoModel, BackboneKind)> {
    if kind.is_head() {
        let backbone = Backbone::new(
            BackboneKind::SmallCnn,
            cfg.feature_dim,
            0.0,
            vb.pp("backbone"),
        )?;
        let head = build_head(kind, cfg, classes, 3, vb.pp("head"))?;
        Ok((
            VideoModel::frames(backbone, head, kind),
            BackboneKind::SmallCnn,
        ))
    } else {
        let net = build_network(
            kind,
            cfg,
            BackboneKind::Resnet18,
            classes,
            vb.pp("backbone"),
        )?;
        Ok((VideoModel::network(net, kind), BackboneKind::Resnet18))
    }
}

/// Squared L2 norms of `a - reference` and of `reference`.
fn sq_diff(a: &Tensor, reference: &Tensor) -> Result<(f64, f64)> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let r = reference.to_dtype(DType::F64)?;
    let diff = (&a - &r)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = r.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff, norm))
}

fn ratio((diff, norm): (f64, f64)) -> f64 {
    // A gradient that is zero in the reference is compared absolutely.
    if norm > 1e-24 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    }
}

fn rel_l2(a: &Tensor, reference: &Tensor) -> Result<f64> {
    Ok(ratio(sq_diff(a, reference)?))
}

/// Runs every registered model on `device` (trunk convolutions in `precision`) and on the
/// CPU float64 reference; one row per model, and one more for TSM with its residual blocks
/// recomputed in backward (`--recompute`, [`crate::recompute`]) on the device.
///
/// Mixed precision also runs the float32 comparison on `device` first and records its errors
/// in each row ([`ParityRow::float32_errors`]), for [`ParityRow::verdict`].
pub fn parity(device: &Device, precision: Precision) -> Result<Vec<ParityRow>> {
    let float32 = if precision == Precision::F32 {
        None
    } else {
        Some(parity(device, Precision::F32)?)
    };
    let cfg = ModelConfig::tiny();
    let classes = 4;
    let mut rows = Vec::new();
    let runs = <ModelKind as clap::ValueEnum>::value_variants()
        .iter()
        .map(|&k| (k, false))
        .chain([(ModelKind::Tsm, true)]);
    for (kind, recompute) in runs {
        let vm_ref = VarMap::new();
        let (reference, backbone) = build(
            kind,
            &cfg,
            classes,
            VarBuilder::from_varmap(&vm_ref, DType::F64, &Device::Cpu),
        )?;
        seeded_init(&vm_ref, 7)?;
        // Non-local blocks start as the identity (zero scale); give them a scale so every
        // path carries gradient.
        {
            let data = vm_ref.data().lock().map_err(|_| poisoned())?;
            for var in data
                .iter()
                .filter(|(name, _)| name.ends_with("zero_bn.weight"))
                .map(|(_, v)| v)
            {
                var.set(&(var.as_tensor().ones_like()? * 0.5)?)?;
            }
        }
        let vm_dev = VarMap::new();
        let (model, _) = build(
            kind,
            &cfg,
            classes,
            VarBuilder::from_varmap(&vm_dev, DType::F32, device),
        )?;
        let model = model
            .with_trunk_dtype(precision.trunk_dtype())
            .with_recompute(recompute);
        let ref_data = vm_ref.data().lock().map_err(|_| poisoned())?;
        let dev_data = vm_dev.data().lock().map_err(|_| poisoned())?;
        let mut names: Vec<&String> = dev_data.keys().collect();
        names.sort();
        for name in names {
            let var = &dev_data[name];
            let src = ref_data.get(name).ok_or_else(|| {
                Error::Config(format!("{}: {name} missing in the reference", kind.name()))
            })?;
            var.set(&src.as_tensor().to_dtype(DType::F32)?.to_device(device)?)?;
        }
        let frames = kind.sampling(&cfg).frames();
        // 32 x 32: every ResNet stage keeps more than one position (BatchNorm in training
        // mode over one value per channel would be degenerate).
        let batch = 2;
        let shape = vec![batch, frames, 3, 32, 32];
        let x_ref = seeded_randn(&shape, 11, DType::F64, &Device::Cpu)?;
        let x_dev = x_ref.to_dtype(DType::F32)?.to_device(device)?;
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % classes as u32).collect();
        let y_ref = Tensor::new(labels.as_slice(), &Device::Cpu)?;
        let y_dev = y_ref.to_device(device)?;

        let out_ref = reference.forward_t(&x_ref, true)?;
        let g_ref = cross_entropy(&out_ref.logits, &y_ref)?.backward()?;
        let start = Instant::now();
        let out_dev = model.forward_t(&x_dev, true)?;
        let g_dev = cross_entropy(&out_dev.logits, &y_dev)?.backward()?;
        device.synchronize()?;
        let seconds = start.elapsed().as_secs_f64();

        let logits_error = rel_l2(&out_dev.logits, &out_ref.logits)?;
        let (mut worst_gradient_error, mut worst, mut parameters) = (0.0f64, String::new(), 0);
        let (mut diff_all, mut norm_all) = (0.0, 0.0);
        let mut missing = Vec::new();
        let mut names: Vec<&String> = ref_data.keys().collect();
        names.sort();
        for name in names {
            let Some(gr) = g_ref.get(ref_data[name].as_tensor()) else {
                continue;
            };
            parameters += 1;
            match g_dev.get(dev_data[name].as_tensor()) {
                None => missing.push(name.clone()),
                Some(gd) => {
                    let (d, n) = sq_diff(gd, gr)?;
                    diff_all += d;
                    norm_all += n;
                    let e = ratio((d, n));
                    if e > worst_gradient_error || !e.is_finite() {
                        worst_gradient_error = e;
                        worst = name.clone();
                    }
                }
            }
        }
        // The float32 run went through the same models in the same order.
        let float32_errors = float32
            .as_ref()
            .map(|f| (f[rows.len()].logits_error, f[rows.len()].gradient_error));
        rows.push(ParityRow {
            model: if recompute {
                format!("{} --recompute", kind.name())
            } else {
                kind.name().into()
            },
            backbone: backbone.name().into(),
            device: device_name(device),
            input: shape,
            logits_error,
            gradient_error: ratio((diff_all, norm_all)),
            worst_gradient_error,
            worst_parameter: worst,
            parameters,
            missing_gradients: missing,
            seconds,
            precision: precision.name().into(),
            tolerance: match precision {
                Precision::F32 => PARITY_TOLERANCE,
                Precision::Bf16 | Precision::F16 => MIXED_PRECISION_TOLERANCE,
            },
            float32_errors,
        });
    }
    Ok(rows)
}

fn poisoned() -> Error {
    Error::Config("poisoned VarMap".into())
}

/// One throughput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    /// What was measured.
    pub work: String,
    /// Device name.
    pub device: String,
    /// Shapes, in words.
    pub shapes: String,
    /// Items per second.
    pub per_second: f64,
    /// What an item is (`clips`, `frames`).
    pub unit: String,
    /// Timed iterations (after one untimed warm-up).
    pub iterations: usize,
}

/// Sizes of the throughput workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The paper's shapes (ResNet-50 at 224 x 224, I3D on 32-frame clips): for GPUs.
    Paper,
    /// Small shapes that finish in seconds on a CPU (same code paths).
    Quick,
}

fn timed(
    device: &Device,
    min_seconds: f64,
    max_iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, usize)> {
    f()?;
    device.synchronize()?;
    let start = Instant::now();
    let mut n = 0;
    while n < max_iters && (n == 0 || start.elapsed().as_secs_f64() < min_seconds) {
        f()?;
        n += 1;
    }
    device.synchronize()?;
    Ok((start.elapsed().as_secs_f64() / n as f64, n))
}

/// The APN head on 256-d features, B = 40, M = 5 (BENCHMARKS.md's shapes), as `vdg train
/// --features` runs it on a ResNet-50 cache: 2048-d trunk features, the projection to D
/// (dropout 0.8), the head; the shapes of ../shared/peers/apn_torch.py's `apn-feat`
/// configurations.
struct ApnOnFeatures {
    cfg: ModelConfig,
    vm: VarMap,
    model: VideoModel,
    opt: SgdMomentum,
    x: Tensor,
    y: Tensor,
}

impl ApnOnFeatures {
    fn new(device: &Device) -> Result<Self> {
        let cfg = ModelConfig::default();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
        let head = build_head(ModelKind::Apn, &cfg, 12, 0, vb.pp("head"))?;
        let projection = Backbone::cached(2048, cfg.feature_dim, 0.8, vb.pp("backbone"))?;
        seeded_init(&vm, 0)?;
        let model = VideoModel::frames(projection, head, ModelKind::Apn);
        let opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true)?;
        let x = seeded_randn(&[40, 5, 2048], 1, DType::F32, device)?;
        let labels: Vec<u32> = (0..40u32).map(|i| i % 12).collect();
        let y = Tensor::new(labels.as_slice(), device)?;
        Ok(ApnOnFeatures {
            cfg,
            vm,
            model,
            opt,
            x,
            y,
        })
    }
}

/// One phase of the plain APN step, as [`step_phases`] times it.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRow {
    /// The phase.
    pub phase: String,
    /// Milliseconds per step until the host had issued the phase's work (its call returned;
    /// on a CPU, the whole phase).
    pub issue_ms: f64,
    /// Milliseconds more until the device had finished it (`synchronize`).
    pub wait_ms: f64,
}

/// The plain APN training step of `vdg device throughput` (2048-d features, B = 40) cut into
/// its phases, with the device synchronised after each: how long the host takes to issue each
/// phase and how long the device then takes to finish it. Where issuing dominates, the step
/// is bound by the host's op-by-op graph, not by the device's arithmetic.
pub fn step_phases(device: &Device, iterations: usize) -> Result<Vec<PhaseRow>> {
    let ApnOnFeatures {
        vm: _vm,
        model,
        mut opt,
        x,
        y,
        ..
    } = ApnOnFeatures::new(device)?;
    const PHASES: [&str; 5] = [
        "forward (projection with dropout, APN head)",
        "loss, read back to the host",
        "backward",
        "gradient-norm clip (norm read back)",
        "SGD step",
    ];
    let mut issue = [0.0f64; PHASES.len()];
    let mut wait = [0.0f64; PHASES.len()];
    let mut timed_phase = |i: usize, counting: bool, f: &mut dyn FnMut() -> Result<()>| {
        let t0 = Instant::now();
        f()?;
        let t1 = Instant::now();
        device.synchronize()?;
        if counting {
            issue[i] += (t1 - t0).as_secs_f64();
            wait[i] += t1.elapsed().as_secs_f64();
        }
        Ok::<(), Error>(())
    };
    // Three untimed steps first (kernels loaded, memory pools warm).
    for n in 0..iterations + 3 {
        let counting = n >= 3;
        let mut out = None;
        timed_phase(0, counting, &mut || {
            out = Some(model.forward_t(&x, true)?);
            Ok(())
        })?;
        let logits = out
            .take()
            .map(|o| o.logits)
            .ok_or_else(|| Error::Device("the forward pass returned nothing".into()))?;
        let mut loss = None;
        timed_phase(1, counting, &mut || {
            let l = cross_entropy(&logits, &y)?;
            l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            loss = Some(l);
            Ok(())
        })?;
        let loss = loss.ok_or_else(|| Error::Device("no loss".into()))?;
        let mut grads = None;
        timed_phase(2, counting, &mut || {
            grads = Some(loss.backward()?);
            Ok(())
        })?;
        let mut grads = grads.ok_or_else(|| Error::Device("no gradients".into()))?;
        timed_phase(3, counting, &mut || {
            crate::optim::clip_grad_norm(&mut grads, opt.vars(), 20.0)?;
            Ok(())
        })?;
        timed_phase(4, counting, &mut || {
            opt.step(&grads)?;
            Ok(())
        })?;
    }
    let per = |t: f64| 1e3 * t / iterations.max(1) as f64;
    Ok(PHASES
        .iter()
        .enumerate()
        .map(|(i, phase)| PhaseRow {
            phase: (*phase).into(),
            issue_ms: per(issue[i]),
            wait_ms: per(wait[i]),
        })
        .collect())
}

/// Measures the APN step on cached features (plain, and Algorithm 1's ADA* with both copies
/// and 5 ascent steps each), ResNet-50 inference as `vdg features` runs it, and an I3D
/// training step, on `device`.
pub fn throughput(device: &Device, scale: Scale) -> Result<Vec<ThroughputRow>> {
    let mut rows = Vec::new();
    let min_seconds: f64 = if scale == Scale::Paper { 5.0 } else { 2.0 };
    let name = if !device.is_cpu() && crate::device::tf32_from_env() {
        format!("{} (TF32)", device_name(device))
    } else {
        device_name(device)
    };

    // What one small operation costs (an add on a 40 x 256 float32 tensor: a new tensor, one
    // kernel): on a GPU the floor of a graph of many small ops, which the host issues one by
    // one.
    let a = seeded_randn(&[40, 256], 4, DType::F32, device)?;
    let b = seeded_randn(&[40, 256], 5, DType::F32, device)?;
    const CHAIN: usize = 1000;
    let (secs, n) = timed(device, min_seconds.min(2.0), 100, || {
        let mut x = a.clone();
        for _ in 0..CHAIN {
            x = (&x + &b)?;
        }
        Ok(())
    })?;
    rows.push(ThroughputRow {
        work: "small_op".into(),
        device: name.clone(),
        shapes: format!("add of two 40x256 float32 tensors, chains of {CHAIN}"),
        per_second: CHAIN as f64 / secs,
        unit: "ops".into(),
        iterations: n,
    });

    let ApnOnFeatures {
        cfg,
        vm,
        model,
        mut opt,
        x,
        y,
    } = ApnOnFeatures::new(device)?;
    let labels: Vec<u32> = (0..40u32).map(|i| i % 12).collect();
    let ada = AdaStep {
        targets: AdaVariant::AdaStar.targets(ModelKind::Apn)?,
        cfg: AdaConfig::default(),
        minimisation: Minimisation::Sequential,
    };
    // The ascent runs on a detached twin (input gradients only), as `vdg train` does.
    let twin = || -> Result<VideoModel> {
        let vb = VarBuilder::from_tensors(crate::init::detached(&vm)?, DType::F32, device);
        let head = build_head(ModelKind::Apn, &cfg, 12, 0, vb.pp("head"))?;
        let projection = Backbone::cached(2048, cfg.feature_dim, 0.8, vb.pp("backbone"))?;
        Ok(VideoModel::frames(projection, head, ModelKind::Apn))
    };
    for (work, step) in [
        ("apn_step_plain", AdaStep::plain()),
        ("apn_step_ada_star", ada),
    ] {
        let (secs, n) = timed(device, min_seconds, 200, || {
            let mut up = Updater {
                opt: &mut opt,
                clip_norm: 20.0,
            };
            let at = At { epoch: 0, batch: 0 };
            iteration(&model, &mut up, &x, &y, &step, Some(&twin), at)?;
            Ok(())
        })?;
        rows.push(ThroughputRow {
            work: work.into(),
            device: name.clone(),
            shapes: "B=40, M=5, 2048-d features, D=256, FFN 1024, 12 classes".into(),
            per_second: 40.0 / secs,
            unit: "clips".into(),
            iterations: n,
        });
    }

    // ResNet-50 inference (eval mode), as `vdg features` batches frames.
    let (side, batch) = match scale {
        Scale::Paper => (224, 64),
        Scale::Quick => (112, 8),
    };
    let vm = VarMap::new();
    let trunk = Backbone::new(
        BackboneKind::Resnet50,
        256,
        0.0,
        VarBuilder::from_varmap(&vm, DType::F32, device),
    )?;
    seeded_init(&vm, 0)?;
    let frames = seeded_randn(&[batch, 3, side, side], 2, DType::F32, device)?;
    let frozen = trunk.frozen(device)?;
    let (secs, n) = timed(device, min_seconds, 100, || {
        frozen.features(&frames)?;
        Ok(())
    })?;
    rows.push(ThroughputRow {
        work: "resnet50_inference".into(),
        device: name.clone(),
        shapes: format!("{batch} frames of {side}x{side}"),
        per_second: batch as f64 / secs,
        unit: "frames".into(),
        iterations: n,
    });

    // An I3D (ResNet-50) training step on dense clips.
    let (backbone, t, side, batch) = match scale {
        Scale::Paper => (BackboneKind::Resnet50, 32, 224, 4),
        Scale::Quick => (BackboneKind::Resnet18, 8, 64, 2),
    };
    let icfg = ModelConfig {
        clip_frames: t,
        ..ModelConfig::default()
    };
    let vm = VarMap::new();
    let net = build_network(
        ModelKind::I3d,
        &icfg,
        backbone,
        12,
        VarBuilder::from_varmap(&vm, DType::F32, device),
    )?;
    seeded_init(&vm, 0)?;
    let model = VideoModel::network(net, ModelKind::I3d);
    let mut opt = SgdMomentum::from_varmap(&vm, SgdParams::default(), |_| true)?;
    let clips = seeded_randn(&[batch, t, 3, side, side], 3, DType::F32, device)?;
    let y = Tensor::new(&labels[..batch], device)?;
    let (secs, n) = timed(device, min_seconds, 50, || {
        let mut up = Updater {
            opt: &mut opt,
            clip_norm: 20.0,
        };
        let at = At { epoch: 0, batch: 0 };
        iteration(&model, &mut up, &clips, &y, &AdaStep::plain(), None, at)?;
        Ok(())
    })?;
    rows.push(ThroughputRow {
        work: "i3d_train_step".into(),
        device: name,
        shapes: format!(
            "{} I3D, {batch} clips x {t} frames of {side}x{side}",
            backbone.name()
        ),
        per_second: batch as f64 / secs,
        unit: "clips".into(),
        iterations: n,
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_matches_the_float64_reference_on_the_cpu() {
        let rows = parity(&Device::Cpu, Precision::F32).unwrap();
        assert_eq!(
            rows.len(),
            <ModelKind as clap::ValueEnum>::value_variants().len() + 1
        );
        for r in &rows {
            assert!(r.passed(), "{r:?}");
            assert!(r.parameters > 5, "{r:?}");
            // float32 against float64 is not exact: the comparison measures something.
            assert!(r.logits_error > 0.0 && r.gradient_error > 0.0, "{r:?}");
        }
        // On the CPU, recomputed blocks give TSM's float32 numbers to the last bit.
        let row = |m: &str| rows.iter().find(|r| r.model == m).unwrap();
        let (plain, recomputed) = (row("tsm"), row("tsm --recompute"));
        assert_eq!(plain.logits_error, recomputed.logits_error);
        assert_eq!(plain.gradient_error, recomputed.gradient_error);
        assert_eq!(plain.parameters, recomputed.parameters);
    }

    #[test]
    fn mixed_precision_is_measurably_coarser_and_within_its_tolerance() {
        let full = parity(&Device::Cpu, Precision::F32).unwrap();
        let half = parity(&Device::Cpu, Precision::F16).unwrap();
        for (f, h) in full.iter().zip(&half) {
            assert!(h.passed(), "{h:?}");
            // The half-precision rows carry the float32 run's errors on the same device.
            assert_eq!(
                h.float32_errors,
                Some((f.logits_error, f.gradient_error)),
                "{h:?}"
            );
            // The trunk really ran in f16: its error is far above float32's.
            assert!(h.logits_error > 10.0 * f.logits_error, "{f:?} {h:?}");
        }
    }

    #[test]
    fn a_half_precision_row_is_unresolved_only_where_rounding_explains_it() {
        // Non-local's bf16 row on an H200 (BENCHMARKS.md, "GPU (CUDA)") and its float32 row.
        let row =
            |errors: (f64, f64), float32: Option<(f64, f64)>, precision: Precision| ParityRow {
                model: "non_local".into(),
                backbone: "resnet18".into(),
                device: "cuda:0".into(),
                input: vec![2, 8, 3, 32, 32],
                logits_error: errors.0,
                gradient_error: errors.1,
                worst_gradient_error: errors.1,
                worst_parameter: String::new(),
                parameters: 10,
                missing_gradients: Vec::new(),
                seconds: 0.0,
                precision: precision.name().into(),
                tolerance: MIXED_PRECISION_TOLERANCE,
                float32_errors: float32,
            };
        // Non-local's float32 logits error; its gradients' rounded down from 3.0e-5.
        let ill = Some((7.5e-6, 2.0e-5));
        let well = Some((3.2e-7, 3.1e-7));
        assert_eq!(
            row((6.5e-2, 0.57), ill, Precision::Bf16).verdict(),
            Verdict::Unresolved
        );
        // f16 rounds 8x finer: 2.0e-5 x 8192 = 0.16 is within the gradient tolerance, so
        // its 0.57 is not the rounding's (bf16: 2.0e-5 x 65536 = 1.3, beyond it).
        assert_eq!(
            row((6.5e-2, 0.57), ill, Precision::F16).verdict(),
            Verdict::Fail
        );
        // A well-conditioned model (I3D's float32 row) out of tolerance fails.
        assert_eq!(
            row((6.5e-2, 0.57), well, Precision::Bf16).verdict(),
            Verdict::Fail
        );
        // Without its float32 row, or with a gradient missing, nothing is excused.
        assert_eq!(
            row((6.5e-2, 0.57), None, Precision::Bf16).verdict(),
            Verdict::Fail
        );
        let mut missing = row((6.5e-2, 0.57), ill, Precision::Bf16);
        missing.missing_gradients.push("w".into());
        assert_eq!(missing.verdict(), Verdict::Fail);
        // Within the tolerances is ok whatever the conditioning.
        assert_eq!(
            row((1e-3, 1e-2), well, Precision::Bf16).verdict(),
            Verdict::Ok
        );
        // Out of the logits tolerance with logits the rounding does not explain: fails even
        // where the gradients would be excused.
        assert_eq!(
            row((6.5e-2, 0.57), Some((1e-8, 2.0e-5)), Precision::Bf16).verdict(),
            Verdict::Fail
        );
    }

    #[test]
    fn a_wrong_weight_fails_parity() {
        // The comparison itself: a reference against a perturbed copy is far off.
        let dev = Device::Cpu;
        let a = seeded_randn(&[4, 8], 1, DType::F64, &dev).unwrap();
        let b = (&a * 1.01).unwrap();
        let e = rel_l2(&b, &a).unwrap();
        assert!((e - 0.01).abs() < 1e-9, "{e}");
        assert!(e > PARITY_TOLERANCE);
    }
}
