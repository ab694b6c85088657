//! `vdg features`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use vdg_trainer::features::{FeaturesEvent, FeaturesOptions, run_features};
use vdg_trainer::models::blocks::BackboneKind;

use crate::logging;

/// Cache per-frame backbone features of a prepared folder, so temporal heads train on a CPU.
#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// A folder written by `vdg prep`.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Backbone: resnet50 (the paper's, 2048-d), resnet18 (512-d), small_cnn (256-d).
    #[arg(long, default_value = "resnet50")]
    backbone: String,
    /// ImageNet weights in safetensors with torchvision names (see README, "Weights").
    /// Without them the backbone is randomly initialised from --seed, which only makes sense
    /// for trying the tool.
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Output folder (features-*.parquet, videos.parquet, features.json); an interrupted
    /// run resumes here.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Input side: frames are resized (shorter side to S*256/224) and centre-cropped to S.
    #[arg(long, default_value_t = 224)]
    input_size: usize,
    /// Cache every N-th prepared frame (1 = all; 2 halves the time and the size).
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Frames per backbone forward pass.
    #[arg(long, default_value_t = 64)]
    batch_frames: usize,
    /// Videos per shard (the unit of resume).
    #[arg(long, default_value_t = 64)]
    shard_videos: usize,
    /// Seed of the random weights when no --weights are given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, or cuda[:N] (builds with the `cuda` feature only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Recompute into an --out that holds features of other inputs or options (deleting
    /// them) instead of refusing.
    #[arg(long)]
    force: bool,
    /// Stop with an error naming the shard when a read of its frames does not return for
    /// this many seconds (a network file system that stopped answering); a rerun resumes
    /// after the last finished shard. 0: wait for ever.
    #[arg(long, default_value_t = vdg_trainer::loader::DEFAULT_STALL_TIMEOUT_SECS, value_name = "SECS")]
    stall_timeout: u64,
}

/// Runs `vdg features`.
pub fn run(a: FeaturesArgs, quiet: bool) -> Result<ExitCode> {
    vdg_trainer::loader::set_stall_timeout(vdg_trainer::loader::stall_timeout_secs(
        a.stall_timeout,
    ));
    let backbone = BackboneKind::from_name(&a.backbone)?;
    let mut opts = FeaturesOptions::new(a.data.clone(), a.out.clone(), backbone);
    opts.weights = a.weights.clone();
    opts.input_size = a.input_size;
    opts.every = a.every;
    opts.batch_frames = a.batch_frames;
    opts.shard_videos = a.shard_videos;
    opts.seed = a.seed;
    opts.device = a.device.clone();
    opts.force = a.force;
    if opts.weights.is_none() {
        tracing::warn!(
            "no --weights: the {} backbone is randomly initialised (seed {}); such features are for trying the tool, not for results",
            a.backbone,
            a.seed
        );
    }
    let bar = logging::new_bar(quiet, "frames");
    let progress = |e: FeaturesEvent| match e {
        FeaturesEvent::Start {
            videos,
            frames,
            done_frames,
        } => {
            logging::suspend(|| {
                tracing::info!(
                    "{videos} videos, {frames} frames to cache ({done_frames} already done)"
                )
            });
            if let Some(b) = &bar {
                b.set_length(frames);
                b.set_position(done_frames);
            }
        }
        FeaturesEvent::Video { frames } => {
            if let Some(b) = &bar {
                b.inc(frames);
            }
        }
    };
    let result = run_features(&opts, &progress);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    logging::set_bar(None);
    let summary = result.with_context(|| format!("computing features into {}", a.out.display()))?;
    let r = &summary.record;
    println!(
        "{} videos, {} frames of {}-d {} features in {} shard(s) ({} kept from an earlier run): {}",
        r.videos,
        r.frames,
        r.feature_dim,
        r.backbone.name(),
        r.shards.len(),
        summary.resumed_shards,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
