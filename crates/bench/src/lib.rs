//! `vdg-bench`: runs and leaderboards of videodg, callable from Rust.
//!
//! - [`cell`]: one training run: its arguments (`vdg train`'s), their resolution against a
//!   prepared folder into the run record (`config.toml`: the resolved configuration, the ADA
//!   method, every deviation from the paper's protocol), the run folder.
//! - [`matrix`]: `vdg bench run`'s matrix (benchmark x direction x model x ADA x seed):
//!   configuration, resumable cells, collecting finished runs.
//! - [`report`]: the leaderboard (aggregates over seeds, paper reference rows per variant)
//!   and its JSON, Markdown, CSV and HTML renderings.
//!
//! ```no_run
//! use clap::Parser;
//! use vdg_bench::matrix::{BenchRunArgs, Host, Silent, run_matrix};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     run: BenchRunArgs,
//! }
//! let cli = Cli::parse_from(["bench", "--data", "out/synthetic", "--out", "bench-out"]);
//! let host = Host {
//!     git_revision: "unknown",
//!     prepare_synthetic: &|_, _, _| anyhow::bail!("prepare it with `vdg prep synthetic`"),
//!     progress: &Silent,
//! };
//! let outcome = run_matrix(&cli.run, &host)?;
//! if let Some(lb) = &outcome.leaderboard {
//!     print!("{}", vdg_bench::report::render_markdown(lb));
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod cell;
pub mod matrix;
pub mod report;
