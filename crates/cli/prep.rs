//! `vdg prep ...` and `vdg sample ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use vdg_data::{Manifest, VideoStatus};
use vdg_pipeline::plan::{ContentOptions, DEFAULT_JPEG_QUALITY, build_plan};
use vdg_pipeline::prep::{
    OutputLock, PrepEvent, PrepSummary, Progress, RunOptions, lock_output, merge_parts,
    run_prep_locked,
};
use vdg_pipeline::scan::{
    Scan, Severity, scan_hmdb51, scan_ntu, scan_pku_mmd, scan_ssv2, scan_synthetic, scan_ucf101,
};

use crate::logging;

#[derive(Debug, Subcommand)]
pub enum PrepCommand {
    /// UCF-HMDB: the 12 classes shared by UCF101 and HMDB51 (manifests/ucf_hmdb.toml).
    #[command(name = "ucf-hmdb")]
    UcfHmdb {
        /// Unpacked UCF101: the `UCF-101` folder (`<Class>/v_<Class>_gGG_cCC.avi`) or its parent.
        #[arg(long, value_name = "DIR")]
        ucf101: PathBuf,
        /// Unpacked HMDB51: the `hmdb51` folder (`<class>/<clip>.avi`) or its parent.
        #[arg(long, value_name = "DIR")]
        hmdb51: PathBuf,
        #[command(flatten)]
        common: CommonPrep,
    },
    /// Something-Something: 20 basic categories, source = the action, target = pretending it
    /// (manifests/something_something.toml).
    Ssv2 {
        /// The folder of `<id>.webm` videos (20bn-something-something-v2/).
        #[arg(long, value_name = "DIR")]
        videos: PathBuf,
        /// The folder with labels.json, train.json and validation.json (or the older
        /// something-something-v2-*.json names).
        #[arg(long, value_name = "DIR")]
        labels: PathBuf,
        #[command(flatten)]
        common: CommonPrep,
    },
    /// PKU-MMD phase 1: every label row of every recording becomes one clip; domains are the
    /// camera views L, C (the files' M) and R (manifests/pku_mmd.toml).
    #[command(name = "pku-mmd")]
    PkuMmd {
        /// The folder holding RGB_VIDEO/ (NNNN-{L,M,R}.avi) and Label/ (NNNN-V.txt or .label).
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The label folder, when it is not <root>/Label or <root>/Train_Label_PKU_final.
        #[arg(long, value_name = "DIR")]
        labels: Option<PathBuf>,
        /// Index of the first frame in the label rows' start and end (0 or 1).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1))]
        frame_base: u64,
        #[command(flatten)]
        common: CommonPrep,
    },
    /// NTU RGB+D 60: domains are the cameras C002 = L, C001 = C, C003 = R
    /// (manifests/ntu.toml); splits keep each performer on one side.
    Ntu {
        /// The nturgb+d_rgb folder (SsssCcccPpppRrrrAaaa_rgb.avi), or a folder above it.
        #[arg(long, value_name = "DIR")]
        videos: PathBuf,
        #[command(flatten)]
        common: CommonPrep,
    },
    /// The embedded synthetic benchmark: generates its clips (into <out>/raw) and prepares
    /// them (manifests/synthetic.toml; --benchmark picks a variant). No download.
    Synthetic(SyntheticArgs),
    /// Merge the folders of `--part 0/N` .. `--part N-1/N` runs into one prepared folder,
    /// byte-identical to a single-machine prep; copies frames, never decodes.
    Merge {
        /// Output folder of the merged prep.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The part folders (all N of them, in any order).
        #[arg(required = true, value_name = "PART_DIR")]
        parts: Vec<PathBuf>,
        /// Copying threads (default: all cores). Does not change the output.
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
        /// Stop (exit 2, complete shards kept) when copying a video makes no progress for
        /// this many seconds, e.g. a part folder on a network file system that stopped
        /// answering. 0: wait for ever.
        #[arg(long, default_value_t = vdg_pipeline::prep::DEFAULT_STALL_TIMEOUT_SECS, value_name = "SECS")]
        stall_timeout: u64,
        /// Replace an existing prep of other inputs in --out.
        #[arg(long)]
        force: bool,
    },
    /// Check a prepared folder against its prep.json (or a feature folder of `vdg features`
    /// against its features.json): every shard and videos.parquet of the recorded size and
    /// SHA-256, no unlisted shard or leftover beside them. Exit 0 when all match, 2 naming
    /// each file that does not. Run it after copying a folder to another machine: reruns of
    /// `vdg prep` and `vdg features` check sizes only.
    Verify {
        /// The prepared folder, or a feature folder.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Hashing threads (default: all cores).
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
    },
}

/// `vdg prep synthetic`'s own options.
#[derive(Debug, Args)]
pub struct SyntheticArgs {
    /// Size: tiny (4 clips per class and domain), small (48), full (120, what `vdg bench run`
    /// prepares by default), large (360).
    #[arg(long, default_value = "small")]
    pub scale: String,
    /// Which synthetic benchmark: synthetic (the embedded one, both shifts),
    /// synthetic_timing (the temporal shift alone), synthetic_appearance (the spatial shift
    /// alone), synthetic_onset / synthetic_speed (the appearance and one timing factor),
    /// synthetic_varied_source (the source varied within its family); datasets.md, "Which
    /// shift the gap comes from". --manifest replaces it with a file.
    #[arg(
        long,
        default_value = "synthetic",
        value_name = "NAME",
        conflicts_with = "manifest"
    )]
    pub benchmark: String,
    #[command(flatten)]
    pub common: CommonPrep,
}

impl SyntheticArgs {
    /// Options for `vdg bench run`'s own copy of the synthetic benchmark `benchmark`
    /// (`synthetic` or a `synthetic_*` variant) in `out` at `scale`, defaults otherwise.
    /// The folder is the bench's, which reaches it with other settings only on a fresh
    /// folder or under its own `--force` (it refuses a changed configuration before), so a
    /// prep of other settings there is replaced.
    pub fn new(out: &Path, benchmark: &str, scale: &str) -> Self {
        SyntheticArgs {
            scale: scale.to_owned(),
            benchmark: benchmark.to_owned(),
            common: CommonPrep {
                out: out.to_owned(),
                short_side: vdg_pipeline::decode::DEFAULT_SHORT_SIDE,
                max_fps: None,
                jpeg_quality: DEFAULT_JPEG_QUALITY,
                jobs: None,
                seed: 0,
                split_rule: None,
                manifest: None,
                shard_size: 512 << 20,
                strict_frame_count: false,
                jpeg_via_rgb: false,
                strict: false,
                retry_failed: false,
                stall_timeout: vdg_pipeline::prep::DEFAULT_STALL_TIMEOUT_SECS,
                part: None,
                force: true,
            },
        }
    }
}

/// Options shared by every `vdg prep` benchmark.
#[derive(Debug, Args)]
pub struct CommonPrep {
    /// Output folder (created if needed; a rerun resumes or confirms it is up to date).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Resize frames so the shorter side is this many pixels (aspect kept; never upscales).
    #[arg(long, default_value_t = vdg_pipeline::decode::DEFAULT_SHORT_SIDE, value_name = "PX")]
    short_side: u32,
    /// Keep at most this many frames per second (default: every frame, native rate).
    #[arg(long, value_name = "FPS")]
    max_fps: Option<f64>,
    /// JPEG quality, 1-100 (libjpeg scale; 4:2:0 chroma).
    #[arg(long, default_value_t = DEFAULT_JPEG_QUALITY, value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,
    /// Decoding threads, one video each (default: all cores). Does not change the output.
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Seed of the train/val split of every source domain (and of the synthetic clips).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Split rule from the manifest (`paper`: 70/30 group-aware; `released-code`: 80/20 by clip).
    #[arg(long, value_name = "NAME")]
    split_rule: Option<String>,
    /// Use this manifest file instead of the built-in one.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Close a frame shard once it holds this much (the unit of resume after a crash);
    /// bytes, or with a unit: 200KiB, 512MiB, 1GiB.
    #[arg(long, default_value = "512MiB", value_parser = parse_size, value_name = "SIZE")]
    shard_size: u64,
    /// Fail a video on any shortfall (over half a frame) against the duration its container
    /// declares, or on any frame lost inside the stream (a packet the decoder rejects) or at
    /// its start (before its first keyframe);
    /// default tolerance of either: max(2 frames, 2 %).
    #[arg(long)]
    strict_frame_count: bool,
    /// Encode every JPEG from RGB. By default a 4:2:0 BT.601 source stored at its own size
    /// goes to JPEG straight from the decoder's planes (no RGB), exact to 0.1 level; through
    /// RGB such frames come out about one level darker (swscale's rounding; datasets.md).
    #[arg(long)]
    jpeg_via_rgb: bool,
    /// Stop (exit 2) when a manifest class has no videos in a domain (a partial download),
    /// instead of naming it in the summary and prep.json.
    #[arg(long)]
    strict: bool,
    /// Redo the videos recorded as failed (a transient I/O error, a fixed file) and keep
    /// the rest; videos whose file changed on disk (size or modification time) are redone
    /// on any rerun.
    #[arg(long)]
    retry_failed: bool,
    /// Give up on a video whose decoding makes no progress (no packet read, no frame
    /// decoded) for this many seconds, e.g. a file on a network file system that stopped
    /// answering: it is recorded as failed, with its path, and a fresh worker goes on with
    /// the rest; past one such video per worker the run stops (complete shards kept).
    /// 0: wait for ever.
    #[arg(long, default_value_t = vdg_pipeline::prep::DEFAULT_STALL_TIMEOUT_SECS, value_name = "SECS")]
    stall_timeout: u64,
    /// Decode only part I of N of the plan (0-based; balanced by file bytes, whole
    /// recordings together) into --out, for a job array; `vdg prep merge` joins the parts.
    #[arg(long, value_name = "I/N", value_parser = vdg_data::parse_part)]
    part: Option<(u32, u32)>,
    /// Replace an existing prep of other inputs or options in --out.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
pub enum SampleCommand {
    /// A tiny UCF101 + HMDB51 sample: `<out>/UCF-101/...` and `<out>/hmdb51/...`.
    #[command(name = "ucf-hmdb")]
    UcfHmdb {
        /// Output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Clips per native class.
        #[arg(long, default_value_t = 4)]
        clips_per_class: u32,
        /// Frames per clip.
        #[arg(long, default_value_t = 40)]
        frames: u32,
    },
}

pub fn sample(cmd: SampleCommand) -> Result<ExitCode> {
    match cmd {
        SampleCommand::UcfHmdb {
            out,
            clips_per_class,
            frames,
        } => {
            let s = vdg_pipeline::sample::write_ucf_hmdb_sample(&out, clips_per_class, frames)
                .with_context(|| format!("writing the sample into {}", out.display()))?;
            println!(
                "wrote {} UCF101 and {} HMDB51 clips under {}",
                s.ucf_clips,
                s.hmdb_clips,
                out.display()
            );
            println!(
                "next: vdg prep ucf-hmdb --ucf101 {0} --hmdb51 {0} --out <dir>",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Generates the synthetic raw clips of `manifest` (its generator) into `raw` unless a
/// complete set for this generator, scale and seed is there (a marker file written last
/// says so). Clips of other settings beside a finished prep (`out/prep.json`) are kept
/// unless `force`: prep would refuse the run anyway, and the folder's clips would no longer
/// be the ones its shards were made from.
fn ensure_synthetic(
    out: &Path,
    manifest: &Manifest,
    scale: vdg_pipeline::synthetic::Scale,
    scale_name: &str,
    seed: u64,
    force: bool,
) -> Result<()> {
    let raw = &out.join("raw");
    let marker = raw.join(".vdg-synthetic");
    let generator = manifest.generator.unwrap_or_default();
    // The default generator's marker is the one folders made before variants existed.
    let variant = if generator == vdg_pipeline::synthetic::Generator::default() {
        String::new()
    } else {
        format!(
            " target_appearance={} target_onset={} target_speed={} source_variety={}",
            generator.target_appearance,
            generator.target_onset,
            generator.target_speed,
            generator.source_variety
        )
    };
    let want = format!(
        "scale={scale_name} seed={seed} version={}{variant}\n",
        env!("CARGO_PKG_VERSION")
    );
    let found = std::fs::read_to_string(&marker);
    if found.as_ref().is_ok_and(|m| *m == want) {
        return Ok(());
    }
    if !force && out.join(vdg_data::shard::PREP_FILE).exists() {
        bail!(
            "{} holds a synthetic prep of other settings (its clips: {}; asked for: {}); \
             rerun with --force to replace it, or choose another --out",
            out.display(),
            found.as_deref().map_or("unknown", str::trim_end),
            want.trim_end()
        );
    }
    if raw.exists() {
        // Only a folder this command made (it carries the marker from the first write on,
        // an interrupted generation included) is cleared; anything else is the user's.
        let empty = std::fs::read_dir(raw)
            .with_context(|| format!("reading {}", raw.display()))?
            .next()
            .is_none();
        if !marker.exists() && !empty {
            bail!(
                "{} exists and was not made by `vdg prep synthetic` (no {} in it); it is left \
                 untouched: remove it yourself or choose another --out",
                raw.display(),
                marker
                    .file_name()
                    .map_or("marker".into(), |n| n.to_string_lossy())
            );
        }
        std::fs::remove_dir_all(raw).with_context(|| format!("clearing {}", raw.display()))?;
    }
    std::fs::create_dir_all(raw).with_context(|| format!("creating {}", raw.display()))?;
    // Claim the folder before writing into it.
    vdg_data::atomic::AtomicFile::write_all(&marker, b"generating\n")?;
    tracing::info!(
        "generating the synthetic clips of {} ({scale_name}, seed {seed}) into {}",
        manifest.name,
        raw.display()
    );
    let n = vdg_pipeline::synthetic::write_synthetic(raw, &generator, scale, seed)
        .with_context(|| format!("writing synthetic clips into {}", raw.display()))?;
    vdg_data::atomic::AtomicFile::write_all(&marker, want.as_bytes())?;
    tracing::info!("{n} synthetic clips written");
    Ok(())
}

fn load_manifest(builtin: &str, file: &Option<PathBuf>) -> Result<Manifest> {
    Ok(match file {
        Some(p) => Manifest::load(p)?,
        None => Manifest::builtin(builtin)?,
    })
}

pub fn run(cmd: PrepCommand, quiet: bool) -> Result<ExitCode> {
    match cmd {
        PrepCommand::UcfHmdb {
            ucf101,
            hmdb51,
            common,
        } => {
            let manifest = load_manifest("ucf_hmdb", &common.manifest)?;
            let ucf = scan_ucf101(&ucf101).context("scanning UCF101")?;
            let hmdb = scan_hmdb51(&hmdb51).context("scanning HMDB51")?;
            prep_with(&manifest, &[&ucf, &hmdb], &common, quiet)
        }
        PrepCommand::Ssv2 {
            videos,
            labels,
            common,
        } => {
            let manifest = load_manifest("something_something", &common.manifest)?;
            let wanted: std::collections::BTreeSet<String> = manifest
                .natives_of_dataset("ssv2")
                .into_iter()
                .map(|(_, n)| n)
                .collect();
            let scan = scan_ssv2(&videos, &labels, |c| wanted.contains(c))
                .context("scanning Something-Something v2")?;
            prep_with(&manifest, &[&scan], &common, quiet)
        }
        PrepCommand::PkuMmd {
            root,
            labels,
            frame_base,
            common,
        } => {
            let manifest = load_manifest("pku_mmd", &common.manifest)?;
            let scan =
                scan_pku_mmd(&root, labels.as_deref(), frame_base).context("scanning PKU-MMD")?;
            prep_with(&manifest, &[&scan], &common, quiet)
        }
        PrepCommand::Synthetic(args) => {
            let scale =
                vdg_pipeline::synthetic::Scale::from_name(&args.scale).with_context(|| {
                    format!(
                        "unknown scale {:?}; known: tiny, small, full, large",
                        args.scale
                    )
                })?;
            if !vdg_data::manifest::is_synthetic_benchmark(&args.benchmark) {
                let known: Vec<&str> = vdg_data::manifest::BUILTIN_MANIFESTS
                    .iter()
                    .map(|(n, _)| *n)
                    .filter(|n| vdg_data::manifest::is_synthetic_benchmark(n))
                    .collect();
                bail!(
                    "{:?} is not a synthetic benchmark; known: {}",
                    args.benchmark,
                    known.join(", ")
                );
            }
            let manifest = load_manifest(&args.benchmark, &args.common.manifest)?;
            if manifest.domains.iter().any(|d| d.dataset != "synthetic") {
                bail!(
                    "{}: `vdg prep synthetic` needs a manifest whose domains are all of dataset \
                     \"synthetic\"",
                    manifest.origin.display()
                );
            }
            // Lock the output folder before touching raw/ in it: two runs must never
            // generate or clear the same clips at once.
            let lock = lock_output(&args.common.out)
                .with_context(|| format!("preparing {}", args.common.out.display()))?;
            ensure_synthetic(
                &args.common.out,
                &manifest,
                scale,
                &args.scale,
                args.common.seed,
                args.common.force,
            )?;
            let scan = scan_synthetic(&args.common.out.join("raw"))
                .context("scanning the synthetic clips")?;
            prep_with_lock(&manifest, &[&scan], &args.common, quiet, Some(lock))
        }
        PrepCommand::Merge {
            out,
            parts,
            jobs,
            stall_timeout: stall_secs,
            force,
        } => {
            let lock =
                lock_output(&out).with_context(|| format!("merging into {}", out.display()))?;
            let reporter = Reporter::new(quiet);
            let stop = SignalStop::install()?;
            let run = RunOptions {
                jobs: jobs.unwrap_or(0),
                force,
                interrupt: Some(stop.flag.clone()),
                stall_timeout: stall_timeout(stall_secs),
                ..RunOptions::default()
            };
            let result = merge_parts(&parts, &lock, &run, &reporter);
            reporter.finish();
            let summary = result.with_context(|| format!("merging into {}", out.display()))?;
            print_summary(&summary, &out, 0, quiet);
            Ok(if summary.record.counts.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        PrepCommand::Ntu { videos, common } => {
            let manifest = load_manifest("ntu", &common.manifest)?;
            let scan = scan_ntu(&videos).context("scanning NTU RGB+D")?;
            prep_with(&manifest, &[&scan], &common, quiet)
        }
        PrepCommand::Verify { dir, jobs } => verify(&dir, jobs.unwrap_or(0), quiet),
    }
}

/// `vdg prep verify`: one line per file that does not match, then the verdict.
fn verify(dir: &Path, jobs: usize, quiet: bool) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let bar = logging::new_bar(quiet, "files");
    let done = |c: &vdg_pipeline::verify::FileCheck, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.inc(1);
        }
        if let Some(p) = &c.problem {
            logging::suspend(|| eprintln!("{}: {p}", c.path.display()));
        }
    };
    // A feature folder (`vdg features`) is checked against its features.json the same way.
    let features = if dir.join(vdg_data::shard::PREP_FILE).exists() {
        None
    } else {
        vdg_trainer::features::FeaturesRecord::open(dir)
            .with_context(|| format!("reading {}", dir.display()))?
    };
    let result = match &features {
        Some(record) => {
            let listed: Vec<&vdg_data::shard::ShardInfo> =
                record.shards.iter().chain(&record.videos_table).collect();
            vdg_data::verify::verify_listed(
                dir,
                vdg_trainer::features::FEATURES_FILE,
                &listed,
                "features-",
                jobs,
                &done,
            )
            .map_err(anyhow::Error::from)
        }
        None => vdg_pipeline::verify::verify(dir, jobs, &done).map_err(anyhow::Error::from),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    logging::set_bar(None);
    let v = result.with_context(|| format!("verifying {}", dir.display()))?;
    let record = v.record;
    let shards = if features.is_some() {
        "features-*.parquet"
    } else {
        "frames-*.parquet"
    };
    for p in &v.stray {
        eprintln!(
            "{}: not listed in {record} (a shard of another run, or the leftover of an \
             interrupted write); readers that glob {shards} would take it in",
            p.display()
        );
    }
    if features.as_ref().is_some_and(|f| f.videos_table.is_none()) {
        eprintln!(
            "note: {record} of this feature folder predates recording videos.parquet's hash; \
             that file was not checked (rerunning the same `vdg features` command records it \
             and keeps the complete shards)"
        );
    }
    let bytes: u64 = v.checked.iter().map(|c| c.bytes).sum();
    let bad = v.checked.iter().filter(|c| c.problem.is_some()).count();
    let what = format!(
        "{} file(s), {:.1} MB, of {} in {:.1} s",
        v.checked.len(),
        bytes as f64 / 1e6,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    if v.ok() {
        if !quiet {
            println!("verified {what}: all match {record}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "error: {bad} of {what} do not match {record}, {} stray file(s); copy the damaged \
         files again from where this folder came from, or rebuild it with the same `{}` \
         command and --force",
        v.stray.len(),
        if features.is_some() {
            "vdg features"
        } else {
            "vdg prep"
        }
    );
    Ok(ExitCode::from(2))
}

fn prep_with(
    manifest: &Manifest,
    scans: &[&Scan],
    c: &CommonPrep,
    quiet: bool,
) -> Result<ExitCode> {
    prep_with_lock(manifest, scans, c, quiet, None)
}

fn prep_with_lock(
    manifest: &Manifest,
    scans: &[&Scan],
    c: &CommonPrep,
    quiet: bool,
    lock: Option<OutputLock>,
) -> Result<ExitCode> {
    if c.short_side == 0 {
        bail!("--short-side must be at least 1");
    }
    if let Some(f) = c.max_fps
        && !(f > 0.0 && f.is_finite())
    {
        bail!("--max-fps must be a positive number, got {f}");
    }
    let options = ContentOptions {
        short_side: c.short_side,
        max_fps: c.max_fps,
        jpeg_quality: c.jpeg_quality,
        seed: c.seed,
        split_rule: c
            .split_rule
            .clone()
            .unwrap_or_else(|| manifest.default_split_rule.clone()),
        shard_target_bytes: c.shard_size,
        strict_frame_count: c.strict_frame_count,
        jpeg_via_rgb: c.jpeg_via_rgb,
    };
    let plan = build_plan(manifest, scans, &options)?;
    let empty = plan.empty_domains();
    if !empty.is_empty() {
        let lines: Vec<String> = empty
            .iter()
            .map(|d| {
                let searched = scans
                    .iter()
                    .find(|s| s.dataset == d.dataset)
                    .map_or_else(|| "?".into(), |s| s.root.display().to_string());
                format!(
                    "domain {:?} ({}) has no videos of the benchmark: searched {searched}, \
                     expected {}",
                    d.name,
                    d.dataset,
                    expected_layout(&d.dataset)
                )
            })
            .collect();
        bail!(
            "{}\n(check the path; a benchmark needs videos in every domain)",
            lines.join("\n")
        );
    }
    let empty_classes = plan.empty_classes();
    if !empty_classes.is_empty() {
        if c.strict {
            bail!(
                "--strict: {} manifest class(es) have no videos: {} (a partial download?)",
                empty_classes.len(),
                empty_classes.join(", ")
            );
        }
        tracing::warn!(
            "{} manifest class(es) have no videos (named again at the end and in prep.json): {}",
            empty_classes.len(),
            empty_classes.join(", ")
        );
    }
    let plan = match c.part {
        Some((i, n)) => {
            let p = plan.part(i, n)?;
            tracing::info!(
                "part {i}/{n}: {} of the {} videos (balanced by file bytes)",
                p.items.len(),
                plan.items.len()
            );
            p
        }
        None => plan,
    };
    for (domain, class, native) in &plan.missing_natives {
        tracing::warn!(
            "{}: classes.{class}.native.{domain}: class folder {native:?} is not in the raw data",
            manifest.origin.display()
        );
    }
    let problems: Vec<_> = plan.ignored_at_least(Severity::Error).collect();
    for i in &plan.ignored {
        match i.severity {
            Severity::Note => tracing::debug!("ignored {}: {}", i.path.display(), i.reason),
            Severity::Warning | Severity::Error => {
                tracing::warn!("{}: {}", i.path.display(), i.reason)
            }
        }
    }
    tracing::info!(
        "{}: {} videos planned ({}), {} out of the benchmark skipped",
        manifest.name,
        plan.items.len(),
        manifest
            .domains
            .iter()
            .map(|d| format!(
                "{}: {}",
                d.name,
                plan.items.iter().filter(|i| i.row.domain == d.name).count()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        plan.skipped_out_of_benchmark.values().sum::<u64>()
    );
    let reporter = Reporter::new(quiet);
    let stop = SignalStop::install()?;
    let run = RunOptions {
        jobs: c.jobs.unwrap_or(0),
        force: c.force,
        retry_failed: c.retry_failed,
        interrupt: Some(stop.flag.clone()),
        stall_timeout: stall_timeout(c.stall_timeout),
    };
    let lock = match lock {
        Some(l) => l,
        None => lock_output(&c.out).with_context(|| format!("preparing {}", c.out.display()))?,
    };
    let result = run_prep_locked(&plan, &lock, &run, &reporter);
    reporter.finish();
    let summary = result.with_context(|| format!("preparing {}", c.out.display()))?;
    print_summary(&summary, &c.out, problems.len(), quiet);
    let failed = summary.record.counts.failed > 0 || !problems.is_empty();
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// SIGINT (Ctrl-C) and SIGTERM (a batch scheduler's preemption) stop a prep at the next
/// video with a message (complete shards stay; a rerun resumes); a second signal ends the
/// process at once. Only while a prep runs: outside one (a `vdg bench run` training after
/// preparing its data), the signals keep their default action. The handlers are installed
/// once per process (signal-hook cannot restore a default handler once replaced, so it
/// emulates it while no prep is running). `vdg bench run --jobs` holds one too while its
/// workers run, so that it can stop them before it ends.
pub(crate) struct SignalStop {
    pub(crate) flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    idle: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SignalStop {
    pub(crate) fn install() -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, OnceLock};
        static FLAGS: OnceLock<std::io::Result<(Arc<AtomicBool>, Arc<AtomicBool>)>> =
            OnceLock::new();
        let flags = FLAGS.get_or_init(|| {
            let (flag, idle) = (
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicBool::new(true)),
            );
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                // In order: a second signal during a prep exits; the first sets the flag;
                // outside a prep the default action (terminate) runs.
                signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
                signal_hook::flag::register(sig, flag.clone())?;
                signal_hook::flag::register_conditional_default(sig, idle.clone())?;
            }
            Ok((flag, idle))
        });
        let (flag, idle) = match flags {
            Ok(f) => f.clone(),
            Err(e) => anyhow::bail!("installing the signal handler: {e}"),
        };
        flag.store(false, Ordering::SeqCst);
        idle.store(false, Ordering::SeqCst);
        Ok(SignalStop { flag, idle })
    }
}

impl Drop for SignalStop {
    fn drop(&mut self) {
        self.idle.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a dataset's videos are expected, for "no videos" errors.
fn expected_layout(dataset: &str) -> &'static str {
    match dataset {
        "ucf101" => "UCF-101/<Class>/v_<Class>_gGG_cCC.avi (the folder or its parent)",
        "hmdb51" => "hmdb51/<class>/<clip>.avi (the folder or its parent)",
        "ssv2" => "<id>.webm files named by the annotation's ids",
        "pku_mmd" => "RGB_VIDEO/NNNN-{L,M,R}.avi with label files for them",
        "ntu" => "SsssCcccPpppRrrrAaaa_rgb.avi files",
        "synthetic" => "<domain>/<class>/<clip>.avi made by vdg prep synthetic",
        _ => "the layout its scanner reads",
    }
}

fn print_summary(s: &PrepSummary, out: &Path, unreadable: usize, quiet: bool) {
    let r = &s.record;
    let c = &r.counts;
    if s.up_to_date {
        println!(
            "{} is up to date: {} videos, {} frames in {} shards (fingerprint {}); nothing to do",
            out.display(),
            c.planned,
            c.frames,
            r.shards.len(),
            r.fingerprint.get(..16).unwrap_or(&r.fingerprint)
        );
    } else if !quiet {
        let mut resumed = if s.resumed_videos > 0 {
            format!(" ({} resumed from an earlier run)", s.resumed_videos)
        } else {
            String::new()
        };
        if s.changed_inputs > 0 || s.retried_failed > 0 {
            resumed.push_str(&format!(
                "; redone: {} changed on disk, {} failed before",
                s.changed_inputs, s.retried_failed
            ));
        }
        if s.copied_videos > 0 {
            resumed.push_str(&format!(
                "; {} decoded, {} copied from earlier shards",
                s.decoded_videos, s.copied_videos
            ));
        }
        println!(
            "prepared {}: {} videos{resumed}, {} ok, {} failed, {} frames in {} shards -> {}",
            r.benchmark,
            c.planned,
            c.ok,
            c.failed,
            c.frames,
            r.shards.len(),
            out.display()
        );
        let splits: Vec<String> = c
            .per_domain_split
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("  splits: {}", splits.join(", "));
        if !c.skipped_out_of_benchmark.is_empty() {
            let sk: Vec<String> = c
                .skipped_out_of_benchmark
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "  skipped (classes outside the benchmark): {}",
                sk.join(", ")
            );
        }
        if !c.ungrouped.is_empty() {
            let u: Vec<String> = c
                .ungrouped
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "  names that did not parse into a split group (each kept alone): {}",
                u.join(", ")
            );
        }
        println!("  fingerprint {}", r.fingerprint);
    }
    if !r.failed.is_empty() {
        eprintln!(
            "{} video(s) failed and were recorded as failed in videos.parquet:",
            r.failed.len()
        );
        for f in &r.failed {
            eprintln!("  {}: {}", f.video_id, f.error);
        }
    }
    if unreadable > 0 {
        eprintln!("{unreadable} path(s) could not be read (see the warnings above)");
    }
    if !c.empty_classes.is_empty() {
        eprintln!(
            "{} manifest class(es) have no videos (recorded in prep.json; --strict makes this \
             an error): {}",
            c.empty_classes.len(),
            c.empty_classes.join(", ")
        );
    }
}

/// Turns prep events into an indicatif bar on a terminal, plain log lines otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
    state: Mutex<ReportState>,
    quiet: bool,
}

struct ReportState {
    start: Instant,
    last_line: Instant,
    done: u64,
    total: u64,
    frames: u64,
    failed: u64,
}

impl Reporter {
    fn new(quiet: bool) -> Self {
        let bar = logging::new_bar(quiet, "videos");
        Reporter {
            bar,
            state: Mutex::new(ReportState {
                start: Instant::now(),
                last_line: Instant::now(),
                done: 0,
                total: 0,
                frames: 0,
                failed: 0,
            }),
            quiet,
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        logging::set_bar(None);
    }
}

impl Progress for Reporter {
    fn event(&self, event: &PrepEvent<'_>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        match event {
            PrepEvent::Started {
                total_videos,
                resumed_videos,
            } => {
                st.total = *total_videos;
                st.start = Instant::now();
                if let Some(b) = &self.bar {
                    b.set_length(*total_videos);
                }
                if *resumed_videos > 0 {
                    tracing::info!(
                        "resuming: {resumed_videos} of {total_videos} videos are in complete shards"
                    );
                }
            }
            PrepEvent::VideoDone { row } => {
                st.done += 1;
                st.frames += u64::from(row.num_frames);
                if row.status == VideoStatus::Failed {
                    st.failed += 1;
                    tracing::warn!(
                        "{}: {}",
                        row.video_id,
                        row.error.as_deref().unwrap_or("failed")
                    );
                } else if let Some(w) = &row.warning {
                    tracing::warn!("{}: {w}", row.video_id);
                }
                let secs = st.start.elapsed().as_secs_f64().max(1e-3);
                let fps = st.frames as f64 / secs;
                if let Some(b) = &self.bar {
                    b.set_position(st.done);
                    b.set_message(format!("{:.0} frames/s, {} failed", fps, st.failed));
                } else if !self.quiet
                    && (st.last_line.elapsed() >= Duration::from_secs(10) || st.done == st.total)
                {
                    st.last_line = Instant::now();
                    tracing::info!(
                        "{}/{} videos, {} frames, {:.0} frames/s, {} failed",
                        st.done,
                        st.total,
                        st.frames,
                        fps,
                        st.failed
                    );
                }
            }
            PrepEvent::ShardWritten { .. } => {}
        }
    }
}

/// Parses `123`, `200KiB`, `512MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB` as binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if v == 0 {
        return Err("the shard size must be positive".into());
    }
    Ok(v)
}

/// `--stall-timeout` seconds as the run takes them (0: none).
fn stall_timeout(secs: u64) -> Option<std::time::Duration> {
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("200KiB"), Ok(200 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }
}
