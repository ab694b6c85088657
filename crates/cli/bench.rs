//! `vdg bench`: the arguments and the matrix live in [`vdg_bench`]; this file prepares the
//! synthetic data through `vdg prep`, shows progress and prints the leaderboard.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;
use vdg_bench::matrix::{
    BenchProgress, BenchRunArgs, Host, PLAN_FILE, REPORT_FILES, collect, missing_cells,
    plan_matrix, run_matrix, write_reports,
};
use vdg_bench::report;
use vdg_data::Manifest;
use vdg_trainer::ada::AdaVariant;
use vdg_trainer::models::ModelKind;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Run the matrix (default: the embedded synthetic benchmark, TSN/TRN/APN without and
    /// with ADA, 3 seeds, small CNN, CPU), then write and print the leaderboard.
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
            for (name, text) in vdg_data::manifest::BUILTIN_MANIFESTS {
                let m = Manifest::from_toml(text, Path::new(name))?;
                let dirs: Vec<String> = m.directions.iter().map(|d| d.to_string()).collect();
                println!(
                    "{name:<20} {:<22} {} classes, M = {}, directions: {}",
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
        BenchCommand::Run(a) => bench_run(&a, quiet),
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

fn prepare_synthetic(dir: &Path, scale: &str) -> Result<()> {
    let prep = crate::prep::PrepCommand::Synthetic(crate::prep::SyntheticArgs::new(dir, scale));
    let code = crate::prep::run(prep, true)?;
    if code != ExitCode::SUCCESS {
        bail!("preparing the synthetic benchmark failed");
    }
    Ok(())
}

fn bench_run(a: &BenchRunArgs, quiet: bool) -> Result<ExitCode> {
    let bar = Bar(crate::logging::new_bar(quiet, "runs"));
    let host = Host {
        git_revision: env!("VDG_GIT_REV"),
        prepare_synthetic: &prepare_synthetic,
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
        outcome.wall_secs,
        REPORT_FILES
            .map(|f| outcome.out.join(f).display().to_string())
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
