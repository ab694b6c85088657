//! `vdg bench`: the arguments and the matrix live in [`vdg_bench`]; this file prepares the
//! synthetic data through `vdg prep`, shows progress and prints the leaderboard.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use vdg_bench::matrix::{
    BenchProgress, BenchRunArgs, Host, PLAN_FILE, PlannedCell, REPORT_FILES, collect,
    missing_cells, plan_matrix, run_matrix, write_reports,
};
use vdg_bench::report;
use vdg_data::Manifest;
use vdg_trainer::ada::AdaVariant;
use vdg_trainer::models::ModelKind;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Run the matrix (default: the embedded synthetic benchmark, TSN/TRN/APN without and
    /// with ADA, 8 seeds, small CNN, CPU), then write and print the leaderboard.
    Run(Box<BenchRunArgs>),
    /// Prepare the data, check every cell and write the numbered cell list (`plan.json`)
    /// without training: run it once, then start workers with `vdg bench run --cell K` or
    /// `--part I/N` (same options) on the shared folder, and `vdg bench report` at the end.
    Plan(Box<BenchRunArgs>),
    /// List the benchmarks, their directions, and the models.
    List,
    /// Write the leaderboard from the finished run folders of a bench output folder, and
    /// name the cells of its plan.json (if any) that have not finished.
    Report {
        /// The bench output folder.
        dir: PathBuf,
    },
}

/// `vdg bench ...`.
pub fn run(cmd: BenchCommand, quiet: bool) -> Result<ExitCode> {
    match cmd {
        BenchCommand::List => {
            let manifests = vdg_data::manifest::BUILTIN_MANIFESTS
                .iter()
                .map(|(name, text)| Ok((*name, Manifest::from_toml(text, Path::new(name))?)))
                .collect::<Result<Vec<_>>>()?;
            let name_w = manifests.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
            let title_w = manifests
                .iter()
                .map(|(_, m)| m.title.chars().count())
                .max()
                .unwrap_or(0);
            for (name, m) in &manifests {
                let dirs: Vec<String> = m.directions.iter().map(|d| d.to_string()).collect();
                println!(
                    "{name:<name_w$}  {:<title_w$}  {} classes, M = {}, directions: {}",
                    m.title,
                    m.classes.len(),
                    m.segments,
                    dirs.join("; ")
                );
            }
            let models: Vec<&str> = ModelKind::ALL.iter().map(|k| k.name()).collect();
            println!("models: {}", models.join(", "));
            let adas: Vec<&str> = AdaVariant::ALL.iter().map(|v| v.name()).collect();
            println!(
                "ada: {} (and `default`: the paper's Table 1, ada_star for apn, ada otherwise)",
                adas.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Report { dir } => {
            let lb = collect(&dir, env!("VDG_GIT_REV"))?;
            write_reports(&dir, &lb)?;
            print!("{}", report::render_markdown(&lb));
            if let Some(missing) = missing_cells(&dir)? {
                if missing.is_empty() {
                    println!(
                        "every cell of {} has finished",
                        dir.join(PLAN_FILE).display()
                    );
                } else {
                    println!(
                        "{} cell(s) of {} have not finished (the leaderboard leaves them out):",
                        missing.len(),
                        dir.join(PLAN_FILE).display()
                    );
                    for c in &missing {
                        println!("  cell {}: {}", c.cell, c.run);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Plan(a) => {
            let bar = Bar(None);
            let host = Host {
                git_revision: env!("VDG_GIT_REV"),
                prepare_synthetic: &prepare_synthetic,
                progress: &bar,
            };
            let outcome = plan_matrix(&a, &host)?;
            println!(
                "{} cells planned in {} (cells 0..{}); start workers with `vdg bench run \
                 --cell K` or `--part I/N` and the same options, then `vdg bench report {}`",
                outcome.cells,
                outcome.out.join(PLAN_FILE).display(),
                outcome.cells.saturating_sub(1),
                outcome.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Run(a) => {
            vdg_trainer::loader::set_stall_timeout(vdg_trainer::loader::stall_timeout_secs(
                a.stall_timeout,
            ));
            bench_run(&a, quiet)
        }
    }
}

struct Bar(Option<indicatif::ProgressBar>);

impl BenchProgress for Bar {
    fn start(&self, total: usize) {
        if let Some(b) = &self.0 {
            b.set_length(total as u64);
        }
    }

    fn cell_done(&self) {
        if let Some(b) = &self.0 {
            b.inc(1);
        }
    }
}

fn prepare_synthetic(dir: &Path, benchmark: &str, scale: &str) -> Result<()> {
    let prep =
        crate::prep::PrepCommand::Synthetic(crate::prep::SyntheticArgs::new(dir, benchmark, scale));
    let code = crate::prep::run(prep, true)?;
    if code != ExitCode::SUCCESS {
        bail!("preparing the synthetic benchmark failed");
    }
    Ok(())
}

fn bench_run(a: &BenchRunArgs, quiet: bool) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let jobs = vdg_bench::matrix::jobs(a)?;
    let workers = jobs > 1 && a.cell.is_empty() && a.part.is_none();
    if workers {
        run_workers(a, jobs, quiet)?;
    }
    // With workers every cell is done by now: this pass finds them and writes the reports.
    // The workers' plan pass prepared the synthetic data a moment ago (and said so).
    let prepared = |_: &Path, _: &str, _: &str| Ok(());
    let bar = Bar(crate::logging::new_bar(quiet, "runs"));
    let host = Host {
        git_revision: env!("VDG_GIT_REV"),
        prepare_synthetic: if workers {
            &prepared
        } else {
            &prepare_synthetic
        },
        progress: &bar,
    };
    let outcome = run_matrix(a, &host);
    if let Some(b) = &bar.0 {
        b.finish_and_clear();
    }
    crate::logging::set_bar(None);
    let outcome = outcome?;
    let Some(leaderboard) = &outcome.leaderboard else {
        println!(
            "{} of the {} cells ran or were done in {:.0} s; when every worker has finished, \
             `vdg bench report {}` writes the leaderboard",
            outcome.ran,
            outcome.cells,
            outcome.wall_secs,
            outcome.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    if quiet {
        // The one-line summary per benchmark is printed even with -q.
        for line in report::summary(leaderboard) {
            println!("{line}");
        }
    } else {
        print!("{}", report::render_markdown(leaderboard));
    }
    println!(
        "{} runs in {:.0} s; reports: {}",
        outcome.cells,
        started.elapsed().as_secs_f64(),
        REPORT_FILES
            .map(|f| outcome.out.join(f).display().to_string())
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// `--jobs N`: plans the bench, then trains its unfinished cells in `N` worker processes of
/// this program (`vdg bench run --cell <all> --jobs 1`, one thread each), which share the
/// cells through the run folders' locks, and shows their progress.
fn run_workers(a: &BenchRunArgs, jobs: usize, quiet: bool) -> Result<()> {
    let silent = Bar(None);
    let host = Host {
        git_revision: env!("VDG_GIT_REV"),
        prepare_synthetic: &prepare_synthetic,
        progress: &silent,
    };
    let planned = plan_matrix(a, &host)?;
    let out = planned.out;
    let missing = missing_cells(&out)?.unwrap_or_default();
    if missing.is_empty() {
        return Ok(());
    }
    let cells: Vec<String> = costly_first(&missing)
        .iter()
        .map(|c| c.cell.to_string())
        .collect();
    let jobs = jobs.min(missing.len());
    tracing::info!(
        "training {} cells in {jobs} worker processes, one thread each",
        missing.len()
    );
    let args = worker_args(std::env::args_os().skip(1), &cells.join(","));
    let exe = std::env::current_exe().context("finding the vdg executable for the workers")?;
    // Ctrl-C or SIGTERM stops the workers with the bench (finished cells stay; a rerun
    // resumes), then ends this process as the signal would have. While `stop` lives, the
    // signals do not end this process at once (the prep's handlers, see `SignalStop`).
    let stop = crate::prep::SignalStop::install()?;
    let signals = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    let caught: Vec<Arc<AtomicBool>> = signals.iter().map(|_| Arc::default()).collect();
    let ids = signals
        .iter()
        .zip(&caught)
        .map(|(&sig, flag)| signal_hook::flag::register(sig, flag.clone()))
        .collect::<std::io::Result<Vec<_>>>()
        .context("installing the signal handlers")?;
    let mut children = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RAYON_NUM_THREADS", "1")
            .env("CANDLE_NUM_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting a worker ({})", exe.display()))?;
        children.push(child);
    }
    let bar = crate::logging::new_bar(quiet, "runs");
    if let Some(b) = &bar {
        b.set_length(planned.cells as u64);
    }
    let mut failed = Vec::new();
    let mut running: Vec<Option<std::process::Child>> = children.into_iter().map(Some).collect();
    while running.iter().any(Option::is_some) {
        if let Some(i) = caught.iter().position(|f| f.load(Ordering::SeqCst)) {
            for child in running.iter_mut().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            for id in &ids {
                signal_hook::low_level::unregister(*id);
            }
            drop(stop);
            signal_hook::low_level::emulate_default_handler(signals[i])
                .context("stopping after a signal")?;
            bail!("interrupted by a signal");
        }
        for (i, slot) in running.iter_mut().enumerate() {
            if let Some(child) = slot
                && let Some(status) = child.try_wait().context("waiting for a worker")?
            {
                if !status.success() {
                    failed.push(format!("worker {i}: {status}"));
                }
                *slot = None;
            }
        }
        if let Some(b) = &bar {
            let left = missing_cells(&out)?.map_or(0, |m| m.len());
            b.set_position(planned.cells.saturating_sub(left) as u64);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    crate::logging::set_bar(None);
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
    drop(stop);
    if !failed.is_empty() {
        bail!(
            "{} of the {jobs} bench workers failed ({}); their errors are above. Finished cells \
             are kept: rerun the same command to train the rest",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// The cells in the order the workers take them: with ADA first (their steps cost several
/// plain ones: on the embedded benchmark an APN + ADA* cell took about four times an APN
/// cell: BENCHMARKS.md, "Cells in parallel"), so that no long cell starts last while the other workers idle; plan order otherwise.
fn costly_first(cells: &[PlannedCell]) -> Vec<&PlannedCell> {
    let mut out: Vec<&PlannedCell> = cells.iter().collect();
    out.sort_by_key(|c| c.variant == "none" || c.variant.starts_with("oracle"));
    out
}

/// A worker's command line: the user's arguments without `--jobs`, `-q` and `-v`, then
/// `-q`, one job and the cells.
fn worker_args(
    args: impl Iterator<Item = std::ffi::OsString>,
    cells: &str,
) -> Vec<std::ffi::OsString> {
    let mut out: Vec<std::ffi::OsString> = vec!["-q".into()];
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        if text == "--jobs" {
            skip_value = true;
            continue;
        }
        let verbosity = text == "--quiet"
            || text == "--verbose"
            || (text.len() > 1
                && text.starts_with('-')
                && !text.starts_with("--")
                && text[1..].chars().all(|c| c == 'v' || c == 'q'));
        if text.starts_with("--jobs=") || verbosity {
            continue;
        }
        out.push(arg);
    }
    out.extend(["--jobs", "1", "--cell", cells].map(std::ffi::OsString::from));
    out
}

#[cfg(test)]
mod tests {
    use super::{PlannedCell, costly_first, worker_args};

    #[test]
    fn workers_take_the_ada_cells_first_and_keep_plan_order_otherwise() {
        let cell = |k: usize, variant: &str| PlannedCell {
            cell: k,
            run: format!("runs/{k}"),
            direction: "a->b".into(),
            model: "trn".into(),
            variant: variant.into(),
            seed: 0,
        };
        let plan = [
            cell(0, "none"),
            cell(1, "ada"),
            cell(2, "oracle-b"),
            cell(3, "none"),
            cell(4, "ada_star"),
        ];
        let order: Vec<usize> = costly_first(&plan).iter().map(|c| c.cell).collect();
        assert_eq!(order, [1, 4, 0, 2, 3]);
    }

    #[test]
    fn worker_arguments_drop_jobs_and_verbosity_and_add_the_cells() {
        let args = [
            "-vv", "bench", "run", "--jobs", "4", "--seeds", "2", "--jobs=3", "-q", "--out", "o",
        ]
        .map(std::ffi::OsString::from);
        let got = worker_args(args.into_iter(), "0,2,5");
        let got: Vec<String> = got
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "-q", "bench", "run", "--seeds", "2", "--out", "o", "--jobs", "1", "--cell",
                "0,2,5"
            ]
        );
    }
}
