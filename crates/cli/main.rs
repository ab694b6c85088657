//! `vdg`: the videodg command line.
//!
//! Exit codes: 0 = done; 1 = finished, but some videos failed or some files could not be
//! read; 2 = fatal error (nothing half-written is left under a final name).

mod bench;
mod device;
mod export;
mod features;
mod logging;
mod prep;
mod train;

use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: training allocates and frees many large tensors
/// per step, which glibc serves with mmap/munmap (measured: over half of a small-CNN APN
/// run's wall time was system time; BENCHMARKS.md). Wrapped in a counter of the large
/// allocations, which `vdg train`'s memory check measures its probe steps by.
#[global_allocator]
static GLOBAL: vdg_trainer::memcheck::Counting<mimalloc::MiMalloc> =
    vdg_trainer::memcheck::Counting(mimalloc::MiMalloc);

use clap::{Parser, Subcommand};

/// videodg: reproducible video domain generalization benchmarks.
#[derive(Debug, Parser)]
#[command(name = "vdg", version, about, long_about = None)]
struct Cli {
    /// Print only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More detail (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decode a raw dataset into Parquet frame shards with the benchmark's domain splits.
    #[command(subcommand)]
    Prep(prep::PrepCommand),
    /// Write a tiny raw dataset sample (generated clips in the real layout), for trying prep.
    #[command(subcommand)]
    Sample(prep::SampleCommand),
    /// Cache per-frame backbone features of a prepared folder (for `vdg train --features`).
    Features(Box<features::FeaturesArgs>),
    /// Train a model on one direction of a prepared benchmark and test it on the targets.
    Train(Box<vdg_bench::cell::TrainArgs>),
    /// Export a prepared folder for other code bases (mmaction2, TSN/TRN/TSM lists).
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Run a benchmark matrix and write leaderboards (`vdg bench run` with no arguments runs
    /// the embedded synthetic benchmark).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check a device (GPU) against the CPU, and measure its throughput.
    #[command(subcommand)]
    Device(device::DeviceCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.quiet, cli.verbose);
    let result = match cli.command {
        Command::Prep(cmd) => prep::run(cmd, cli.quiet),
        Command::Sample(cmd) => prep::sample(cmd),
        Command::Features(args) => features::run(*args, cli.quiet),
        Command::Train(args) => train::run(*args, cli.quiet),
        Command::Bench(cmd) => bench::run(cmd, cli.quiet),
        Command::Export(cmd) => export::run(cmd),
        Command::Device(cmd) => device::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            logging::suspend(|| eprintln!("error: {e:#}"));
            let interrupted = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<vdg_pipeline::Error>(),
                    Some(vdg_pipeline::Error::Interrupted { .. })
                )
            });
            // 130: stopped by a signal (as shells report Ctrl-C); 2: any other fatal error.
            ExitCode::from(if interrupted { 130 } else { 2 })
        }
    }
}
