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
    for kind in ModelKind::ALL {
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
    for kind in ModelKind::ALL {
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
    for kind in ModelKind::ALL {
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
        };
        // Evaluation-mode forward so the objective is a fixed function of the input.
        let fwd = |t: &Tensor, _train: bool| head.forward_t(t, false);
        let copies = adversarial_copies(&fwd, &x, &labels, &targets, &cfg).unwrap();
        assert_eq!(copies.len(), targets.len());
        let clean = head.forward_t(&x, false).unwrap();
        for (t, adv) in targets.iter().zip(&copies) {
            assert_eq!(adv.dims(), x.dims());
            let r0 = clean.feature(t).unwrap().detach();
            let before = objective(&clean, t, &labels, &r0, cfg.gamma)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let after_out = head.forward_t(adv, false).unwrap();
            let after = objective(&after_out, t, &labels, &r0, cfg.gamma)
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
    for kind in ModelKind::ALL {
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
    let model = VideoModel {
        backbone: Backbone::new(
            BackboneKind::SmallCnn,
            cfg.feature_dim,
            0.0,
            vb.pp("backbone"),
        )
        .unwrap(),
        head: build_head(ModelKind::Tsn, &cfg, 4, 0, vb.pp("head")).unwrap(),
        kind: ModelKind::Tsn,
    };
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
