//! `vdg train`: the arguments are [`vdg_bench::cell::TrainArgs`]; this file reports progress.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use vdg_bench::cell::{TrainArgs, prepare_run_folder, random_init_problem, resolve};
use vdg_trainer::ada::AdaVariant;
use vdg_trainer::train::{Selection, TrainEvent, TrainProgress, train};

use crate::logging;

struct Reporter {
    bar: Option<ProgressBar>,
    log: Mutex<Option<std::fs::File>>,
    losses: Mutex<(f64, usize)>,
}

impl Reporter {
    fn line(&self, s: &str) {
        if let Ok(mut f) = self.log.lock()
            && let Some(f) = f.as_mut()
        {
            let _ = writeln!(f, "{s}");
        }
        logging::suspend(|| tracing::info!("{s}"));
    }
}

impl TrainProgress for Reporter {
    fn event(&self, e: &TrainEvent<'_>) {
        match e {
            TrainEvent::Member {
                index,
                gamma,
                start_epoch,
                epochs,
                batches,
            } => {
                self.line(&format!(
                    "member {index} (gamma {gamma}): epochs {}..{epochs}, {batches} batches each",
                    start_epoch + 1
                ));
                if let Some(b) = &self.bar {
                    b.set_length(((epochs - start_epoch) * batches) as u64);
                    b.set_position(0);
                }
            }
            TrainEvent::Batch { epoch, loss } => {
                if let Ok(mut l) = self.losses.lock() {
                    l.0 += f64::from(*loss);
                    l.1 += 1;
                    if let Some(b) = &self.bar {
                        b.inc(1);
                        b.set_message(format!("epoch {} loss {:.3}", epoch + 1, l.0 / l.1 as f64));
                    }
                }
            }
            TrainEvent::Epoch { record } => {
                if let Ok(mut l) = self.losses.lock() {
                    *l = (0.0, 0);
                }
                self.line(&format!(
                    "epoch {}: loss {:.4}, lr {:.2e}, source val top-1 {:.2}%",
                    record.epoch, record.loss, record.lr, record.source_val_top1
                ));
            }
        }
    }
}

/// Runs `vdg train`.
pub fn run(a: TrainArgs, quiet: bool) -> Result<ExitCode> {
    vdg_trainer::loader::set_stall_timeout(vdg_trainer::loader::stall_timeout_secs(
        a.stall_timeout,
    ));
    let (record, spec) = resolve(&a, env!("VDG_GIT_REV"))?;
    if let Some(w) = random_init_problem(&record.train, &record.benchmark, a.features.is_some()) {
        tracing::warn!("{w}");
    }
    prepare_run_folder(&a.out, &record, a.resume)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.out.join("train.log"))
        .ok();
    let bar = logging::new_bar(quiet, "batches");
    let reporter = Reporter {
        bar: bar.clone(),
        log: Mutex::new(log),
        losses: Mutex::new((0.0, 0)),
    };
    reporter.line(&format!(
        "train {} {} ada={} on {} ({}), run folder {}",
        record.benchmark,
        record.direction,
        record.train.ada.name(),
        record.data,
        &record.data_fingerprint.get(..16).unwrap_or(""),
        a.out.display()
    ));
    if record.train.ada != AdaVariant::None {
        reporter.line(&format!("ADA: {}", record.ada_method));
    }
    for d in &record.deviations {
        reporter.line(&format!("deviation from the paper: {d}"));
    }
    let result = train(&spec, &record.train, a.resume, &reporter);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    logging::set_bar(None);
    let metrics = result.with_context(|| format!("training into {}", a.out.display()))?;
    for (t, m) in &metrics.targets {
        println!(
            "{} -> {t}: top-1 {:.2}% on {} clips",
            spec.source, m.top1, m.clips
        );
    }
    if metrics.selection == Selection::TargetTest {
        println!(
            "note: epochs were selected on target-test accuracy (the released code's oracle protocol)"
        );
    }
    println!("metrics: {}", a.out.join("metrics.json").display());
    Ok(ExitCode::SUCCESS)
}
