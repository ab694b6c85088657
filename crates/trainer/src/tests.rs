//! Numerical tests: gradients against finite differences, shapes, the registry, ADA, and a
//! tiny overfit.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};

use crate::ada::{AdaConfig, AdaVariant, adversarial_copies, objective};
use crate::gradcheck::{check_input_gradient, project};
use crate::init::{seeded_init, seeded_randn};
use crate::models::{ModelConfig, ModelKind, build_head};
use crate::nn::{AttentionBlock, LAYER_NORM_EPS, LayerNorm, cross_entropy};
use crate::optim::{SgdMomentum, SgdParams};

const TOL: f64 = 1e-5;

/// The largest absolute difference between two tensors of one shape (any float dtype).
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| {
            d.abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()
        })
        .expect("tensors of one shape")
}

/// The temporal heads of the registry (the whole networks are tested in `networks`).
const HEADS: [ModelKind; 4] = [
    ModelKind::Tsn,
    ModelKind::Trn,
    ModelKind::TrnAttn,
    ModelKind::Apn,
];

#[test]
fn the_registry_is_heads_plus_networks() {
    let heads: Vec<ModelKind> = ModelKind::ALL.into_iter().filter(|k| k.is_head()).collect();
    assert_eq!(heads, HEADS);
    let nets: Vec<ModelKind> = ModelKind::ALL
        .into_iter()
        .filter(|k| !k.is_head())
        .collect();
    assert_eq!(nets, networks::NETWORKS);
}

fn vb_f64(vm: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu)
}

#[test]
fn layer_norm_gradients_match_finite_differences() {
    let vm = VarMap::new();
    let ln = LayerNorm::new(8, LAYER_NORM_EPS, vb_f64(&vm)).unwrap();
    let err = check_input_gradient(&[3, 8], 1, 24, &|x| project(&ln.forward(x)?, 2)).unwrap();
    assert!(err < TOL, "relative error {err}");
}

#[test]
fn attention_block_gradients_match_finite_differences_and_reach_every_weight() {
    let vm = VarMap::new();
    let cfg = ModelConfig::tiny().attention;
    let block = AttentionBlock::new(cfg, vb_f64(&vm)).unwrap();
    seeded_init(&vm, 3).unwrap();
    let err = check_input_gradient(&[2, 3, 16], 4, 30, &|x| {
        // Encoder input = a slice of x, decoder input = x: both paths are differentiated.
        let enc = x.narrow(1, 0, 2)?;
        project(&block.forward_t(&enc, x, false)?, 5)
    })
    .unwrap();
    assert!(err < TOL, "relative error {err}");
    // Every parameter receives a gradient (a fused op would silently cut some off).
    let x = seeded_randn(&[2, 3, 16], 6, DType::F64, &Device::Cpu).unwrap();
    let loss = project(&block.forward_t(&x, &x, false).unwrap(), 7).unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn every_head_has_correct_input_gradients() {
    for kind in HEADS {
        let vm = VarMap::new();
        let cfg = ModelConfig::tiny();
        let head = build_head(kind, &cfg, 4, 0, vb_f64(&vm)).unwrap();
        seeded_init(&vm, 8).unwrap();
        let err = check_input_gradient(&[2, 3, 16], 9, 24, &|x| {
            project(&head.forward_t(x, false)?.logits, 10)
        })
        .unwrap();
        assert!(err < TOL, "{}: relative error {err}", kind.name());
        // The cross-entropy loss, w.r.t. the input, too.
        let labels = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
        let err = check_input_gradient(&[2, 3, 16], 11, 24, &|x| {
            Ok(cross_entropy(&head.forward_t(x, false)?.logits, &labels)?)
        })
        .unwrap();
        assert!(err < TOL, "{} loss: relative error {err}", kind.name());
    }
}

#[test]
fn registry_builds_every_kind_with_its_features_and_one_step_changes_weights() {
    let dev = Device::Cpu;
    for kind in HEADS {
        let vm = VarMap::new();
        let cfg = ModelConfig::tiny();
        let head = build_head(
            kind,
            &cfg,
            5,
            0,
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )
        .unwrap();
        seeded_init(&vm, 1).unwrap();
        let x = seeded_randn(&[4, 3, 16], 2, DType::F32, &dev).unwrap();
        let out = head.forward_t(&x, true).unwrap();
        assert_eq!(out.logits.dims(), &[4, 5], "{}", kind.name());
        let finite = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(finite.iter().all(|v| v.is_finite()), "{}", kind.name());
        for f in kind.features() {
            let t = out.feature(f).unwrap();
            assert_eq!(t.dim(0).unwrap(), 4, "{} feature {f}", kind.name());
        }
        let before: Vec<(String, Vec<f32>)> = {
            let d = vm.data().lock().unwrap();
            let mut v: Vec<_> = d
                .iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        t.as_tensor()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    )
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let mut opt = SgdMomentum::from_varmap(
            &vm,
            SgdParams {
                lr: 0.1,
                ..SgdParams::default()
            },
            |_| true,
        )
        .unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
        let loss = cross_entropy(&out.logits, &labels).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let d = vm.data().lock().unwrap();
        let changed = before
            .iter()
            .filter(|(n, v)| {
                d[n].as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    != *v
            })
            .count();
        assert!(
            changed * 10 >= before.len() * 9,
            "{}: only {changed} of {} parameters moved",
            kind.name(),
            before.len()
        );
    }
}

#[test]
fn ada_raises_the_adversarial_objective_and_keeps_labels() {
    let dev = Device::Cpu;
    for kind in HEADS {
        let vm = VarMap::new();
        let cfg = ModelConfig::tiny();
        let head = build_head(
            kind,
            &cfg,
            4,
            0,
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )
        .unwrap();
        seeded_init(&vm, 3).unwrap();
        let x = seeded_randn(&[4, 3, 16], 4, DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
        let variant = if kind == ModelKind::Tsn {
            AdaVariant::Ada
        } else {
            AdaVariant::AdaStar
        };
        let targets = variant.targets(kind).unwrap();
        let cfg = AdaConfig {
            eta: 0.5,
            t_max: 3,
            gamma: 0.01,
            ..AdaConfig::default()
        };
        // Evaluation-mode forward so the objective is a fixed function of the input.
        let fwd = |t: &Tensor| head.forward_t(t, false);
        let copies = adversarial_copies(&fwd, &x, &labels, &targets, &cfg).unwrap();
        assert_eq!(copies.len(), targets.len());
        let clean = head.forward_t(&x, false).unwrap();
        for (t, adv) in targets.iter().zip(&copies) {
            assert_eq!(adv.dims(), x.dims());
            let r0 = clean.feature(t).unwrap().detach();
            let before = objective(&clean, t, &labels, &r0, &cfg)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let after_out = head.forward_t(adv, false).unwrap();
            let after = objective(&after_out, t, &labels, &r0, &cfg)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                after > before,
                "{} {t}: objective {before} -> {after}",
                kind.name()
            );
        }
    }
    assert!(AdaVariant::AdaStar.targets(ModelKind::Tsn).is_err());
    assert_eq!(
        AdaVariant::Level2Only.targets(ModelKind::Apn).unwrap(),
        ["level2"]
    );
}

#[test]
fn a_tiny_set_overfits_to_full_accuracy() {
    let dev = Device::Cpu;
    for kind in HEADS {
        let vm = VarMap::new();
        let cfg = ModelConfig::tiny();
        let head = build_head(
            kind,
            &cfg,
            4,
            0,
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )
        .unwrap();
        seeded_init(&vm, 5).unwrap();
        let x = seeded_randn(&[8, 3, 16], 6, DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 3], &dev).unwrap();
        let mut opt = SgdMomentum::from_varmap(
            &vm,
            SgdParams {
                lr: 0.05,
                weight_decay: 0.0,
                ..SgdParams::default()
            },
            |_| true,
        )
        .unwrap();
        for _ in 0..150 {
            let loss = cross_entropy(&head.forward_t(&x, true).unwrap().logits, &labels).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let pred = head
            .forward_t(&x, false)
            .unwrap()
            .logits
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(
            pred,
            labels.to_vec1::<u32>().unwrap(),
            "{} did not overfit",
            kind.name()
        );
    }
}

#[test]
fn a_pixel_model_overfits_a_tiny_set() {
    use crate::models::VideoModel;
    use crate::models::blocks::{Backbone, BackboneKind};
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = ModelConfig::tiny();
    let model = VideoModel::frames(
        Backbone::new(
            BackboneKind::SmallCnn,
            cfg.feature_dim,
            0.0,
            vb.pp("backbone"),
        )
        .unwrap(),
        build_head(ModelKind::Tsn, &cfg, 4, 0, vb.pp("head")).unwrap(),
        ModelKind::Tsn,
    );
    seeded_init(&vm, 5).unwrap();
    let x = seeded_randn(&[8, 3, 3, 16, 16], 6, DType::F32, &dev).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 3], &dev).unwrap();
    let mut opt = SgdMomentum::from_varmap(
        &vm,
        SgdParams {
            lr: 0.05,
            weight_decay: 0.0,
            ..SgdParams::default()
        },
        |n| !n.contains("running"),
    )
    .unwrap();
    let mut first = 0.0;
    let mut last = 0.0;
    for i in 0..150 {
        let loss = cross_entropy(&model.forward_t(&x, true).unwrap().logits, &labels).unwrap();
        let v = loss.to_scalar::<f32>().unwrap();
        if i == 0 {
            first = v;
        }
        last = v;
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    let pred = model
        .forward_t(&x, false)
        .unwrap()
        .logits
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    assert_eq!(
        pred,
        labels.to_vec1::<u32>().unwrap(),
        "loss {first} -> {last}"
    );
}

#[test]
fn registry_names_agree_between_serde_clap_and_name() {
    use clap::ValueEnum;
    for kind in ModelKind::ALL {
        let serde = serde_json::to_string(&kind).unwrap();
        assert_eq!(serde, format!("\"{}\"", kind.name()));
        assert_eq!(kind.to_possible_value().unwrap().get_name(), kind.name());
        assert_eq!(ModelKind::from_name(kind.name()).unwrap(), kind);
    }
    for v in AdaVariant::ALL {
        assert_eq!(v.to_possible_value().unwrap().get_name(), v.name());
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            format!("\"{}\"", v.name())
        );
    }
}

/// TSM, I3D and Non-local: whole networks on pixels, on a ResNet-18 trunk at a tiny size.
mod networks {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::{Optimizer, VarBuilder, VarMap};

    use crate::ada::{AdaConfig, AdaVariant, adversarial_copies, objective};
    use crate::gradcheck::{check_input_gradient, project};
    use crate::init::{seeded_init, seeded_randn};
    use crate::models::blocks::BackboneKind;
    use crate::models::blocks::resnet::is_frozen_bn;
    use crate::models::{ModelConfig, ModelKind, Network, build_network};
    use crate::nn::cross_entropy;
    use crate::optim::{SgdMomentum, SgdParams};

    pub(super) const NETWORKS: [ModelKind; 3] =
        [ModelKind::Tsm, ModelKind::I3d, ModelKind::NonLocal];

    fn trainable(name: &str) -> bool {
        !(name.contains("running") || is_frozen_bn(name))
    }

    fn build(kind: ModelKind, dtype: DType, seed: u64) -> (VarMap, Box<dyn Network>, Vec<usize>) {
        let vm = VarMap::new();
        let cfg = ModelConfig::tiny();
        let net = build_network(
            kind,
            &cfg,
            BackboneKind::Resnet18,
            4,
            VarBuilder::from_varmap(&vm, dtype, &Device::Cpu),
        )
        .unwrap();
        seeded_init(&vm, seed).unwrap();
        // Non-local blocks start as the identity (zero scale); give them a scale so that
        // every path carries gradient.
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            if name.ends_with("zero_bn.weight") {
                let half = (var.as_tensor().ones_like().unwrap() * 0.5).unwrap();
                var.set(&half).unwrap();
            }
        }
        drop(data);
        let t = kind.sampling(&cfg).frames();
        (vm, net, vec![2, t, 3, 16, 16])
    }

    #[test]
    fn every_network_has_its_shapes_features_and_correct_input_gradients() {
        for kind in NETWORKS {
            let (_vm, net, shape) = build(kind, DType::F64, 1);
            let x = seeded_randn(&shape, 2, DType::F64, &Device::Cpu).unwrap();
            let out = net.forward_t(&x, false).unwrap();
            assert_eq!(out.logits.dims(), &[2, 4], "{}", kind.name());
            for f in kind.features() {
                assert_eq!(out.feature(f).unwrap().dim(0).unwrap(), 2, "{f}");
            }
            let v = out.logits.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}", kind.name());
            let err = check_input_gradient(&shape, 3, 16, &|x| {
                project(&net.forward_t(x, false)?.logits, 4)
            })
            .unwrap();
            assert!(err < super::TOL, "{}: relative error {err}", kind.name());
        }
    }

    #[test]
    fn every_trainable_parameter_gets_a_gradient_and_ada_raises_its_objective() {
        let dev = Device::Cpu;
        for kind in NETWORKS {
            let (vm, net, mut shape) = build(kind, DType::F32, 5);
            // 8 frames of 32x32: res3 is 2x4x4 and res4 2x2x2, so every non-local block
            // attends over more than one subsampled position (with one, softmax is constant
            // and phi has no gradient).
            shape[1] = 8;
            shape[3] = 32;
            shape[4] = 32;
            let x = seeded_randn(&shape, 6, DType::F32, &dev).unwrap();
            let labels = Tensor::new(&[1u32, 3], &dev).unwrap();
            let loss = cross_entropy(&net.forward_t(&x, true).unwrap().logits, &labels).unwrap();
            let grads = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().filter(|n| trainable(n)).collect();
            names.sort();
            assert!(names.len() > 20, "{}", kind.name());
            for name in names {
                let g = grads
                    .get(data[name].as_tensor())
                    .unwrap_or_else(|| panic!("{}: no gradient for {name}", kind.name()));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // phi's bias adds theta_i . b to every score of row i: softmax cancels it,
                // so its gradient is exactly zero (true of the original block too).
                if name.ends_with("nonlocal.phi.bias") {
                    continue;
                }
                assert!(norm > 0.0, "{}: zero gradient for {name}", kind.name());
            }
            drop(data);
            for variant in [AdaVariant::Ada, AdaVariant::AdaStar] {
                let targets = variant.targets(kind).unwrap();
                let cfg = AdaConfig {
                    eta: 0.5,
                    t_max: 2,
                    gamma: 0.01,
                    ..AdaConfig::default()
                };
                let fwd = |t: &Tensor| net.forward_t(t, false);
                let copies = adversarial_copies(&fwd, &x, &labels, &targets, &cfg).unwrap();
                let clean = net.forward_t(&x, false).unwrap();
                for (t, adv) in targets.iter().zip(&copies) {
                    let r0 = clean.feature(t).unwrap().detach();
                    let before = objective(&clean, t, &labels, &r0, &cfg).unwrap();
                    let after_out = net.forward_t(adv, false).unwrap();
                    let after = objective(&after_out, t, &labels, &r0, &cfg).unwrap();
                    let (b, a) = (
                        before.to_scalar::<f32>().unwrap(),
                        after.to_scalar::<f32>().unwrap(),
                    );
                    assert!(a > b, "{} {t}: objective {b} -> {a}", kind.name());
                }
            }
        }
    }

    #[test]
    fn every_network_overfits_a_tiny_set() {
        let dev = Device::Cpu;
        for kind in NETWORKS {
            let (vm, net, mut shape) = build(kind, DType::F32, 7);
            shape[0] = 4;
            let x = seeded_randn(&shape, 8, DType::F32, &dev).unwrap();
            let labels = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
            let mut opt = SgdMomentum::from_varmap(
                &vm,
                SgdParams {
                    lr: 0.05,
                    weight_decay: 0.0,
                    ..SgdParams::default()
                },
                trainable,
            )
            .unwrap();
            let (mut first, mut last) = (0.0, 0.0);
            for i in 0..20 {
                let loss =
                    cross_entropy(&net.forward_t(&x, true).unwrap().logits, &labels).unwrap();
                last = loss.to_scalar::<f32>().unwrap();
                if i == 0 {
                    first = last;
                }
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            let pred = net
                .forward_t(&x, false)
                .unwrap()
                .logits
                .argmax(1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(
                pred,
                [0, 1, 2, 3],
                "{}: loss {first} -> {last}",
                kind.name()
            );
        }
    }

    #[test]
    fn two_d_weights_inflate_into_i3d_and_mmaction_names_map_to_ours() {
        use crate::models::blocks::resnet::ResNet;
        use crate::models::weights::{canonical_name, load_backbone_weights};
        let dev = Device::Cpu;
        // A "converted" 2-D ResNet-18 written by the test.
        let src = VarMap::new();
        ResNet::resnet18(VarBuilder::from_varmap(&src, DType::F32, &dev)).unwrap();
        seeded_init(&src, 11).unwrap();
        let tensors: HashMap<String, Tensor> = src
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r18.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        for kind in [ModelKind::I3d, ModelKind::NonLocal] {
            let vm = VarMap::new();
            build_network(
                kind,
                &ModelConfig::tiny(),
                BackboneKind::Resnet18,
                4,
                VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("backbone"),
            )
            .unwrap();
            seeded_init(&vm, 1).unwrap();
            load_backbone_weights(&vm, &path).unwrap();
            let data = vm.data().lock().unwrap();
            let w3 = data["backbone.conv1.weight"].as_tensor().clone();
            assert_eq!(w3.dims(), &[64, 3, 5, 7, 7]);
            let w2 = &tensors["conv1.weight"];
            for tap in 0..5 {
                let slice = w3.narrow(2, tap, 1).unwrap().squeeze(2).unwrap();
                let diff = (slice - (w2 / 5.0).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-7, "tap {tap}: {diff}");
            }
            // 3x1x1 and 1x3x3 kernels too; BatchNorm statistics copied.
            assert_eq!(
                data["backbone.layer1.0.conv1.weight"].dims(),
                &[64, 64, 3, 3, 3]
            );
            let rm = data["backbone.layer2.0.bn1.running_var"]
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                rm,
                tensors["layer2.0.bn1.running_var"]
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
        // A "Kinetics" I3D checkpoint (5-D kernels) in mmaction2's names loads as it is.
        let i3d = |seed: u64| {
            let vm = VarMap::new();
            build_network(
                ModelKind::I3d,
                &ModelConfig::tiny(),
                BackboneKind::Resnet18,
                4,
                VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("backbone"),
            )
            .unwrap();
            seeded_init(&vm, seed).unwrap();
            vm
        };
        let kinetics = i3d(21);
        let mm_name = |ours: &str| -> String {
            let k = ours
                .strip_prefix("backbone.")
                .unwrap()
                .replace("downsample.0.", "downsample.conv.")
                .replace("downsample.1.", "downsample.bn.");
            let mut parts: Vec<String> = k.split('.').map(str::to_owned).collect();
            let n = parts.len();
            if n >= 2 {
                let digits = |i: &&str| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit());
                if let Some(i) = parts[n - 2]
                    .strip_prefix("conv")
                    .filter(digits)
                    .map(str::to_owned)
                {
                    parts[n - 2] = format!("conv{i}.conv");
                } else if let Some(i) = parts[n - 2]
                    .strip_prefix("bn")
                    .filter(digits)
                    .map(str::to_owned)
                {
                    parts[n - 2] = format!("conv{i}.bn");
                }
            }
            format!("backbone.{}", parts.join("."))
        };
        let mm: HashMap<String, Tensor> = kinetics
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.contains("new_fc"))
            .map(|(k, v)| (mm_name(k), v.as_tensor().clone()))
            .collect();
        assert!(mm.contains_key("backbone.layer1.0.conv1.conv.weight"));
        assert!(mm.contains_key("backbone.conv1.bn.running_var"));
        let path3d = dir.path().join("i3d_kinetics.safetensors");
        candle_core::safetensors::save(&mm, &path3d).unwrap();
        let fresh = i3d(1);
        load_backbone_weights(&fresh, &path3d).unwrap();
        let (a, b) = (
            kinetics.data().lock().unwrap(),
            fresh.data().lock().unwrap(),
        );
        let mut names: Vec<&String> = a.keys().filter(|k| !k.contains("new_fc")).collect();
        names.sort();
        for name in names {
            let (x, y) = (a[name].as_tensor(), b[name].as_tensor());
            let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap();
            let d = d.max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{name}");
        }
        drop((a, b));
        assert_eq!(
            canonical_name("backbone.layer1.0.conv1.conv.weight"),
            "layer1.0.conv1.weight"
        );
        assert_eq!(
            canonical_name("backbone.layer3.2.conv2.bn.running_mean"),
            "layer3.2.bn2.running_mean"
        );
        assert_eq!(canonical_name("backbone.conv1.bn.bias"), "bn1.bias");
        assert_eq!(
            canonical_name("backbone.layer2.0.downsample.conv.weight"),
            "layer2.0.downsample.0.weight"
        );
        assert_eq!(canonical_name("layer4.1.bn2.weight"), "layer4.1.bn2.weight");
    }
}
