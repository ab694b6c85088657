//! `vdg device ...`: checks that a device computes what the CPU does, and how fast.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use vdg_data::atomic::AtomicFile;
use vdg_trainer::devcheck::{
    MIXED_PRECISION_GRADIENT_TOLERANCE, Scale, Verdict, parity, roundoff_ratio, step_phases,
    throughput,
};
use vdg_trainer::train::Precision;

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Every registered model on --device against a CPU float64 reference: one training
    /// forward and backward on a fixed small batch, relative L2 errors of the logits and of
    /// every parameter's gradient. Exit 1 when a model fails.
    Parity {
        /// `cpu` (float32 against float64: the rounding baseline) or `cuda[:N]`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Trunk convolutions in f32 (tolerance 1e-3), or bf16/f16 mixed precision
        /// (tolerances 5e-2 logits, 0.25 gradients; bf16 needs CUDA). A mixed-precision
        /// row is "unresolved" (not failed) where its float32 errors, scaled by how much
        /// coarser the half type rounds, already exceed the tolerances.
        #[arg(long, value_enum, default_value = "f32")]
        precision: Precision,
        /// Also write the rows as JSON here.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Clips or frames per second of the APN step on cached features (plain and ADA*),
    /// ResNet-50 inference and an I3D training step.
    Throughput {
        /// `cpu` or `cuda[:N]`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `paper` (224 x 224, I3D ResNet-50 on 32-frame clips; for GPUs) or `quick`
        /// (small shapes, seconds on a CPU).
        #[arg(long, default_value = "quick")]
        scale: String,
        /// Also write the rows as JSON here.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The plain APN step of `throughput` cut into phases (forward, loss read-back,
    /// backward, gradient clip, SGD step), the device synchronised after each: how long the
    /// host takes to issue each phase and how long the device then needs to finish it.
    Profile {
        /// `cpu` or `cuda[:N]`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Timed steps (after three untimed ones).
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Also write the rows as JSON here.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn write_json<T: serde::Serialize>(out: Option<&PathBuf>, rows: &T) -> Result<()> {
    if let Some(path) = out {
        let bytes = serde_json::to_vec_pretty(rows)?;
        AtomicFile::write_all(path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub fn run(cmd: DeviceCommand) -> Result<ExitCode> {
    match cmd {
        DeviceCommand::Parity {
            device,
            precision,
            out,
        } => {
            let dev = vdg_trainer::device::device(&device)?;
            let rows = parity(&dev, precision).context("parity check")?;
            println!(
                "{:<10} {:<10} {:>11} {:>11} {:>11}  {:<6} worst gradient",
                "model", "backbone", "logits", "gradients", "worst grad", "result"
            );
            for r in &rows {
                println!(
                    "{:<10} {:<10} {:>11.3e} {:>11.3e} {:>11.3e}  {:<6} {}{}",
                    r.model,
                    r.backbone,
                    r.logits_error,
                    r.gradient_error,
                    r.worst_gradient_error,
                    r.verdict().label(),
                    r.worst_parameter,
                    if r.missing_gradients.is_empty() {
                        String::new()
                    } else {
                        format!(" (no gradient: {})", r.missing_gradients.join(", "))
                    }
                );
            }
            // Each row with its verdict, as printed.
            #[derive(serde::Serialize)]
            struct Judged<'a> {
                #[serde(flatten)]
                row: &'a vdg_trainer::devcheck::ParityRow,
                verdict: Verdict,
            }
            let judged: Vec<Judged> = rows
                .iter()
                .map(|row| Judged {
                    row,
                    verdict: row.verdict(),
                })
                .collect();
            write_json(out.as_ref(), &judged)?;
            let count = |v: Verdict| rows.iter().filter(|r| r.verdict() == v).count();
            let (failed, unresolved) = (count(Verdict::Fail), count(Verdict::Unresolved));
            println!(
                "{} of {} models within {:e} of the CPU float64 reference on {device} ({})",
                count(Verdict::Ok),
                rows.len(),
                rows.first().map_or(0.0, |r| r.tolerance),
                precision.name()
            );
            for r in rows.iter().filter(|r| r.verdict() == Verdict::Unresolved) {
                let (logits, gradients) = r.expected_half_errors().unwrap_or_default();
                println!(
                    "{}: unresolved, not failed: its float32 errors ({:.1e} logits, {:.1e} \
                     gradients) times the {} rounding's {}x give {:.1e} and {:.1e}, beyond the \
                     tolerances ({:e}, {:e}): at this model's conditioning the check cannot \
                     tell {} rounding from a wrong kernel (its float32 row judges the kernels)",
                    r.model,
                    r.float32_errors.map_or(0.0, |e| e.0),
                    r.float32_errors.map_or(0.0, |e| e.1),
                    precision.name(),
                    roundoff_ratio(precision),
                    logits,
                    gradients,
                    r.tolerance,
                    MIXED_PRECISION_GRADIENT_TOLERANCE,
                    precision.name()
                );
            }
            if unresolved > 0 {
                println!("{unresolved} unresolved, {failed} failed");
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        DeviceCommand::Throughput { device, scale, out } => {
            let dev = vdg_trainer::device::device(&device)?;
            let scale = match scale.as_str() {
                "paper" => Scale::Paper,
                "quick" => Scale::Quick,
                other => anyhow::bail!("unknown --scale {other:?}; known: paper, quick"),
            };
            let rows = throughput(&dev, scale).context("throughput")?;
            for r in &rows {
                println!(
                    "{:<20} {:>10.1} {}/s  ({}; {} iterations on {})",
                    r.work, r.per_second, r.unit, r.shapes, r.iterations, r.device
                );
            }
            write_json(out.as_ref(), &rows)?;
            Ok(ExitCode::SUCCESS)
        }
        DeviceCommand::Profile {
            device,
            iterations,
            out,
        } => {
            let dev = vdg_trainer::device::device(&device)?;
            let rows = step_phases(&dev, iterations).context("profile")?;
            println!(
                "plain APN step on {device} (B=40, M=5, 2048-d features, D=256), ms per step, \
                 mean of {iterations}:"
            );
            println!("{:<46} {:>9} {:>9}", "phase", "issue", "wait");
            for r in &rows {
                println!("{:<46} {:>9.2} {:>9.2}", r.phase, r.issue_ms, r.wait_ms);
            }
            let (issue, wait) = rows
                .iter()
                .fold((0.0, 0.0), |(i, w), r| (i + r.issue_ms, w + r.wait_ms));
            println!("{:<46} {:>9.2} {:>9.2}", "all phases", issue, wait);
            write_json(out.as_ref(), &rows)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
