//! Shared pieces: per-frame backbones ([`Backbone`]): a small CNN for CPU runs and ResNet-18/50
//! with torchvision's parameter names, each followed by the paper's `Dropout(0.8)` and
//! `Linear(-> D)` projection.

pub mod resnet;

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, VarBuilder, batch_norm, conv2d_no_bias};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::dropout;
use crate::rowops::{Linear, linear};

/// The per-frame backbones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// Three strided 3x3 conv + BN + ReLU layers (16, 32, 64 channels) and average pooling to
    /// a 2x2 grid (256 values, so the feature keeps where things are): for CPU runs on small
    /// frames.
    SmallCnn,
    /// torchvision ResNet-18.
    Resnet18,
    /// torchvision ResNet-50 (the paper's backbone).
    Resnet50,
}

impl BackboneKind {
    /// The snake_case name (`small_cnn`, `resnet18`, `resnet50`).
    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::SmallCnn => "small_cnn",
            BackboneKind::Resnet18 => "resnet18",
            BackboneKind::Resnet50 => "resnet50",
        }
    }

    /// Parses `small_cnn`, `resnet18`, `resnet50`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "small_cnn" => Ok(BackboneKind::SmallCnn),
            "resnet18" => Ok(BackboneKind::Resnet18),
            "resnet50" => Ok(BackboneKind::Resnet50),
            other => Err(Error::Config(format!(
                "unknown backbone {other:?}; known: small_cnn, resnet18, resnet50"
            ))),
        }
    }
}

/// The released code's dropout before the projection.
pub const PROJECTION_DROPOUT: f32 = 0.8;

/// The small CNN.
#[derive(Debug, Clone)]
pub struct SmallCnn {
    convs: Vec<(Conv2d, BatchNorm)>,
}

/// Channels of the small CNN's layers.
pub const SMALL_CNN_CHANNELS: [usize; 3] = [16, 32, 64];

impl SmallCnn {
    /// Weights `conv{i}`, `bn{i}` under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let mut convs = Vec::new();
        let mut cin = 3;
        for (i, &c) in SMALL_CNN_CHANNELS.iter().enumerate() {
            let cfg = Conv2dConfig {
                stride: 2,
                padding: 1,
                ..Default::default()
            };
            convs.push((
                conv2d_no_bias(cin, c, 3, cfg, vb.pp(format!("conv{i}")))?,
                batch_norm(c, 1e-5, vb.pp(format!("bn{i}")))?,
            ));
            cin = c;
        }
        Ok(SmallCnn { convs })
    }

    /// Output width: the last layer's channels on a 2x2 grid.
    pub fn out_dim(&self) -> usize {
        SMALL_CNN_CHANNELS[2] * 4
    }
}

impl ModuleT for SmallCnn {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (conv, bn) in &self.convs {
            // Through nn3d (CPU: the im2col lowering; mixed precision: the convolution in
            // bf16/f16, BatchNorm in float32).
            let cfg = conv.config();
            let y = crate::nn3d::conv2d(&x, conv.weight(), cfg.padding, cfg.stride, 1)
                .map_err(candle_core::Error::wrap)?;
            x = crate::batchnorm::forward_relu(bn, &y, train).map_err(candle_core::Error::wrap)?;
        }
        // Average over a 2x2 grid of cells (the last cells absorb odd remainders).
        let (n, c, h, w) = x.dims4()?;
        let (h2, w2) = ((h / 2).max(1), (w / 2).max(1));
        let mut cells = Vec::with_capacity(4);
        for (y0, hh) in [(0, h2), (h2, h - h2)] {
            for (x0, ww) in [(0, w2), (w2, w - w2)] {
                let (hh, ww) = (hh.max(1), ww.max(1));
                let y0 = y0.min(h - hh);
                let x0 = x0.min(w - ww);
                cells.push(x.narrow(2, y0, hh)?.narrow(3, x0, ww)?.mean((2, 3))?);
            }
        }
        Tensor::stack(&cells, 2)?.reshape((n, c * 4))
    }
}

enum Trunk {
    Small(SmallCnn),
    Resnet(resnet::ResNet),
    /// Precomputed trunk features (`vdg features`): the input already is `[N, dim]`.
    Cached(usize),
}

/// A backbone plus the projection to `D`.
pub struct Backbone {
    trunk: Trunk,
    projection: Linear,
    dropout: f32,
}

impl Backbone {
    /// Builds `kind` under `vb` (`vb.pp("new_fc")` holds the projection, as the released code
    /// names it).
    pub fn new(
        kind: BackboneKind,
        feature_dim: usize,
        dropout: f32,
        vb: VarBuilder,
    ) -> Result<Self> {
        let trunk = match kind {
            BackboneKind::SmallCnn => Trunk::Small(SmallCnn::new(vb.pp("cnn"))?),
            BackboneKind::Resnet18 | BackboneKind::Resnet50 => {
                Trunk::Resnet(resnet::ResNet::of_kind(kind, vb.clone())?)
            }
        };
        Self::with_trunk(trunk, feature_dim, dropout, vb)
    }

    /// Only the projection, for inputs that are cached trunk features of width `dim`
    /// (`vdg train --features`): the trunk is frozen by not being there.
    pub fn cached(dim: usize, feature_dim: usize, dropout: f32, vb: VarBuilder) -> Result<Self> {
        Self::with_trunk(Trunk::Cached(dim), feature_dim, dropout, vb)
    }

    fn with_trunk(trunk: Trunk, feature_dim: usize, dropout: f32, vb: VarBuilder) -> Result<Self> {
        let out = match &trunk {
            Trunk::Small(s) => s.out_dim(),
            Trunk::Resnet(r) => r.out_dim(),
            Trunk::Cached(d) => *d,
        };
        Ok(Backbone {
            projection: linear(out, feature_dim, vb.pp("new_fc"))?,
            trunk,
            dropout,
        })
    }

    /// Width of the trunk's output (before the projection): 256, 512 or 2048.
    pub fn trunk_dim(&self) -> usize {
        match &self.trunk {
            Trunk::Small(s) => s.out_dim(),
            Trunk::Resnet(r) => r.out_dim(),
            Trunk::Cached(d) => *d,
        }
    }

    /// The trunk alone: `frames [N, 3, H, W]` -> `[N, trunk_dim]` (what `vdg features`
    /// caches).
    pub fn trunk_features(&self, frames: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match &self.trunk {
            Trunk::Small(s) => s.forward_t(frames, train)?,
            Trunk::Resnet(r) => r.forward_t(frames, train)?,
            Trunk::Cached(_) => frames.clone(),
        })
    }

    /// The trunk with its current weights frozen, for inference (`vdg features`): see
    /// [`FrozenTrunk`].
    pub fn frozen(&self, device: &candle_core::Device) -> Result<FrozenTrunk<'_>> {
        let engine = match &self.trunk {
            // The rule of `FrozenTrunk::channels_last`: a ResNet on the CPU.
            Trunk::Resnet(r) if device.is_cpu() => Some(crate::infer::ResnetInference::new(r)?),
            _ => None,
        };
        Ok(FrozenTrunk {
            backbone: self,
            engine,
        })
    }

    /// # Shapes
    /// `frames [N, 3, H, W]` (or `[N, trunk_dim]` for a cached trunk) -> `[N, D]`.
    pub fn forward_t(&self, frames: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.trunk_features(frames, train)?;
        Ok(self
            .projection
            .forward(&dropout(&f, self.dropout, train)?)?)
    }
}

/// A trunk whose weights no longer change, for inference only (its outputs carry no
/// gradient): a ResNet on the CPU runs channels-last outside candle's graph
/// ([`crate::infer`], BatchNorms folded once, buffers kept between calls); any other trunk
/// or device runs [`Backbone::trunk_features`] in evaluation mode. The two give the same
/// function to float32 rounding.
pub struct FrozenTrunk<'a> {
    backbone: &'a Backbone,
    engine: Option<crate::infer::ResnetInference>,
}

impl FrozenTrunk<'_> {
    /// Whether `kind` on `device` runs the channels-last engine (part of `vdg features`'
    /// fingerprint: the two paths round differently).
    pub fn channels_last(kind: BackboneKind, device: &candle_core::Device) -> bool {
        device.is_cpu() && matches!(kind, BackboneKind::Resnet18 | BackboneKind::Resnet50)
    }

    /// `frames [N, 3, H, W]` -> `[N, trunk_dim]`.
    pub fn features(&self, frames: &Tensor) -> Result<Tensor> {
        match &self.engine {
            Some(e) => e.forward(frames),
            None => self.backbone.trunk_features(frames, false),
        }
    }
}
