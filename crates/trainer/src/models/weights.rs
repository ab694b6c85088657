//! Loading pretrained weights into the models: torchvision 2-D checkpoints (inflated into
//! 3-D kernels where a model needs them) and mmaction2's 3-D names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::error::{Error, Result};

/// The name a tensor of a 3-D checkpoint in mmaction2's layout has in ours
/// (`backbone.layer1.0.conv1.conv.weight` -> `layer1.0.conv1.weight`,
/// `...conv1.bn.bias` -> `...bn1.bias`, `downsample.conv`/`.bn` -> `downsample.0`/`.1`);
/// torchvision names come back unchanged.
pub fn canonical_name(key: &str) -> String {
    let k = key.strip_prefix("backbone.").unwrap_or(key);
    let k = k
        .replace("downsample.conv.", "downsample.0.")
        .replace("downsample.bn.", "downsample.1.");
    let parts: Vec<&str> = k.split('.').collect();
    if parts.len() >= 3 {
        let n = parts.len();
        let (owner, kind) = (parts[n - 3], parts[n - 2]);
        if let Some(idx) = owner
            .strip_prefix("conv")
            .filter(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
        {
            let head = parts[..n - 3].join(".");
            let sep = if head.is_empty() { "" } else { "." };
            match kind {
                "conv" => return format!("{head}{sep}conv{idx}.{}", parts[n - 1]),
                "bn" => return format!("{head}{sep}bn{idx}.{}", parts[n - 1]),
                _ => {}
            }
        }
    }
    k
}

/// Loads torchvision-named backbone weights (`conv1.weight`, `layer1.0.bn1.running_mean`,
/// ...) from a safetensors file into the `backbone.` variables; `fc.*` is ignored. Every
/// backbone variable except the projection must be present.
pub fn load_backbone_weights(vm: &VarMap, path: &Path) -> Result<()> {
    let raw = candle_core::safetensors::load(path, &Device::Cpu)?;
    let tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, v)| (canonical_name(&k), v))
        .collect();
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Config("poisoned VarMap".into()))?;
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| n.starts_with("backbone.") && !n.starts_with("backbone.new_fc"))
        .collect();
    names.sort();
    for name in names {
        let key = &name["backbone.".len()..];
        let var = &data[name];
        let Some(t) = tensors.get(key) else {
            // Non-local blocks are new: ImageNet and I3D checkpoints do not have them.
            if key.contains(".nonlocal.") {
                continue;
            }
            return Err(Error::Config(format!(
                "{}: no tensor {key:?} for the backbone",
                path.display()
            )));
        };
        let t = match (t.dims(), var.dims()) {
            // Inflation: a 2-D kernel [O, I, kh, kw] into a 3-D one [O, I, kt, kh, kw],
            // repeated over the temporal taps and divided by their number.
            (&[o, i, kh, kw], &[o3, i3, kt, kh3, kw3]) if (o, i, kh, kw) == (o3, i3, kh3, kw3) => {
                (t.unsqueeze(2)?.repeat((1, 1, kt, 1, 1))? / kt as f64)?
            }
            (a, b) if a == b => t.clone(),
            (a, b) => {
                return Err(Error::Config(format!(
                    "{}: {key} has shape {a:?}, the model expects {b:?}",
                    path.display()
                )));
            }
        };
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::load_backbone_weights;
    use crate::init::seeded_init;
    use crate::models::blocks::resnet::ResNet;
    use crate::models::blocks::{Backbone, BackboneKind};

    #[test]
    fn resnet_uses_torchvision_names_and_loads_a_converted_state_dict() {
        // ResNet-50's names, as torchvision's state_dict() has them.
        let vm50 = VarMap::new();
        ResNet::resnet50(VarBuilder::from_varmap(&vm50, DType::F32, &Device::Cpu)).unwrap();
        let names50: Vec<String> = vm50.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv3.weight",
            "layer1.0.downsample.1.running_mean",
            "layer3.5.bn2.bias",
            "layer4.2.conv2.weight",
        ] {
            assert!(names50.iter().any(|x| x == n), "no {n}");
        }
        // 53 convolutions (weights only), 53 BatchNorms (4 tensors each).
        assert_eq!(names50.len(), 53 + 53 * 4, "parameter and buffer count");

        // A "converted" ResNet-18 state dict written by the test (plus torchvision's fc).
        let dir = tempfile::tempdir().unwrap();
        let src = VarMap::new();
        ResNet::resnet18(VarBuilder::from_varmap(&src, DType::F32, &Device::Cpu)).unwrap();
        seeded_init(&src, 42).unwrap();
        let mut tensors: std::collections::HashMap<String, candle_core::Tensor> = src
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors.insert(
            "fc.weight".into(),
            candle_core::Tensor::zeros((1000, 512), DType::F32, &Device::Cpu).unwrap(),
        );
        let path = dir.path().join("resnet18.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let vm = VarMap::new();
        Backbone::new(
            BackboneKind::Resnet18,
            8,
            0.8,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("backbone"),
        )
        .unwrap();
        seeded_init(&vm, 1).unwrap();
        load_backbone_weights(&vm, &path).unwrap();
        let data = vm.data().lock().unwrap();
        for key in [
            "conv1.weight",
            "layer2.0.downsample.0.weight",
            "layer4.1.bn2.running_mean",
        ] {
            let got = data[&format!("backbone.{key}")]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = tensors[key]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, want, "{key}");
        }
        drop(data);
        // A missing tensor is an error naming it.
        let mut partial = tensors.clone();
        partial.remove("layer1.0.conv1.weight");
        candle_core::safetensors::save(&partial, &path).unwrap();
        let err = load_backbone_weights(&vm, &path).unwrap_err().to_string();
        assert!(err.contains("layer1.0.conv1.weight"), "{err}");
    }
}
