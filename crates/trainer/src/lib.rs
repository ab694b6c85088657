//! `vdg-trainer`: the models and training of videodg, on Candle.
//!
//! - [`models`]: the registry ([`models::ModelKind`]): temporal heads (TSN, TRN, TRN-ATTN,
//!   APN) over a per-frame [`models::blocks::Backbone`] (small CNN, ResNet-18/50 with
//!   torchvision names), and whole networks (TSM, I3D, Non-local); every model returns
//!   logits and the named features ADA targets.
//! - [`nn`]: layers whose gradients candle's fused kernels drop (layer norm, softmax,
//!   the APN attention block), built from differentiable primitives; [`block`]: the APN
//!   block and pyramid as single CPU ops with hand-written backward passes, on [`cpu_gemm`].
//! - [`nn3d`], [`im2col`]: 3-D convolution and pooling with gradients (Candle has none), and
//!   the CPU convolution lowering every ResNet trunk uses; [`recompute`]: residual blocks
//!   recomputed in backward instead of kept (`vdg train --recompute`).
//! - [`infer`]: ResNet inference in channels-last layout for frozen trunks (`vdg features`),
//!   on [`cpu_gemm`] (the trainer's one wrapper of raw-pointer code).
//! - [`features`]: the per-frame feature cache (`vdg features`); [`frames`]: JPEG decoding
//!   and the augmentation views the loader and the cache share; [`loader`]: clips to tensors.
//!
//! Dependencies point down: `train` -> `step`, `image_ada`, `checkpoint`, `evaluate` ->
//! `loader` -> `features` -> `frames`, `models` -> `nn`, `nn3d`, `im2col`.
//! - [`ada`]: the adversarial ascent (Algorithm 1, lines 6-12) and its variants;
//!   [`step`]: one training iteration (the clean update and ADA's minimisation);
//!   [`image_ada`]: the original image ADA of the baselines (maximisation phases).
//! - [`train`]: the epoch loop; [`checkpoint`]: one atomic checkpoint per epoch;
//!   [`evaluate`]: predictions, metrics, the members' combination.
//! - [`optim`]: SGD with momentum and weight decay, gradient-norm clipping.
//! - [`init`]: seeded parameter initialisation (candle's CPU RNG cannot be seeded).
//! - [`device`]: CPU, or CUDA behind the `cuda` feature, never a silent fallback.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use vdg_trainer::models::{ModelConfig, ModelKind, build_head};
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let cfg = ModelConfig::tiny();
//! let head = build_head(ModelKind::Apn, &cfg, 4, 0, vb)?;
//! vdg_trainer::init::seeded_init(&vm, 0)?;
//! let x = vdg_trainer::init::seeded_randn(&[2, 3, 16], 1, DType::F32, &Device::Cpu)?;
//! let out = head.forward_t(&x, false)?;
//! assert_eq!(out.logits.dims(), &[2, 4]);
//! # Ok::<(), vdg_trainer::Error>(())
//! ```

pub mod ada;
pub mod attention;
pub mod batchnorm;
pub mod block;
pub mod checkpoint;
pub mod cpu_gemm;
pub mod devcheck;
pub mod device;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod frames;
pub mod fused;
pub mod im2col;
pub mod image_ada;
pub mod infer;
pub mod init;
pub mod loader;
pub mod memcheck;
pub mod models;
pub mod nn;
pub mod nn3d;
pub mod optim;
pub mod recompute;
pub mod rowops;
pub mod step;
pub mod train;

pub use error::{Error, Result};

#[cfg(test)]
mod gradcheck;
#[cfg(test)]
mod tests;
