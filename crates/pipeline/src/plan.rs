//! Planning: from scanned raw videos and a manifest to the ordered list of videos prep
//! writes, with labels, domains, groups and source splits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vdg_data::split::{SplitItem, assign_splits};
use vdg_data::{Manifest, VideoRow, VideoStatus};

use crate::error::{Error, Result};
use crate::scan::{Clip, Ignored, Scan, Severity};

/// Options that change what prep writes (all of them go into the plan fingerprint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentOptions {
    /// Shorter side of stored frames (never upscaled).
    pub short_side: u32,
    /// Frame-rate cap; `None` keeps every frame.
    pub max_fps: Option<f64>,
    /// JPEG quality 1-100.
    pub jpeg_quality: u8,
    /// Seed of the split assignment.
    pub seed: u64,
    /// Name of the manifest split rule.
    pub split_rule: String,
    /// A frame shard is closed once it holds at least this many bytes.
    pub shard_target_bytes: u64,
    /// Fail on any shortfall against the container's declared frame count.
    pub strict_frame_count: bool,
    /// Encode every JPEG from RGB, even where the decoder's YUV planes can be stored as
    /// they are (4:2:0 BT.601 at its own size; see `DecodeOptions::yuv420`). Off by
    /// default; through RGB such frames come out about one level darker (swscale's
    /// unscaled conversion rounds down; datasets.md, "How exact the colours are").
    #[serde(default)]
    pub jpeg_via_rgb: bool,
}

/// Default JPEG quality.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;
/// Default shard size target: 512 MiB (the unit of resume after a crash).
pub const DEFAULT_SHARD_TARGET_BYTES: u64 = 512 << 20;

impl Default for ContentOptions {
    fn default() -> Self {
        ContentOptions {
            short_side: crate::decode::DEFAULT_SHORT_SIDE,
            max_fps: None,
            jpeg_quality: DEFAULT_JPEG_QUALITY,
            seed: 0,
            split_rule: "paper".into(),
            shard_target_bytes: DEFAULT_SHARD_TARGET_BYTES,
            strict_frame_count: false,
            jpeg_via_rgb: false,
        }
    }
}

/// One planned video: its future `videos.parquet` row and where to read it.
#[derive(Debug, Clone)]
pub struct PlanItem {
    /// The row, with decode fields still empty.
    pub row: VideoRow,
    /// Absolute path of the raw file.
    pub abs_path: std::path::PathBuf,
    /// The annotated interval, when the video is a clip of a longer recording.
    pub clip: Option<Clip>,
    /// Why it will fail without decoding (missing file...).
    pub pre_error: Option<String>,
    /// Key of its split group: items sharing it stay on one side.
    pub split_group: Option<String>,
    /// A side the dataset fixes (PKU-MMD's cross-subject lists).
    pub fixed_split: Option<vdg_data::SourceSplit>,
}

/// Everything prep will write, decided before any decoding.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The checked manifest.
    pub manifest: Manifest,
    /// Content options.
    pub options: ContentOptions,
    /// Videos in write order (sorted by video id); shared with prep's decoding workers.
    pub items: std::sync::Arc<[PlanItem]>,
    /// Units of decoding work: consecutive items that are clips of one recording (decoded
    /// once for all of them), or single videos.
    pub units: Vec<std::ops::Range<usize>>,
    /// Videos of classes outside the benchmark, per dataset.
    pub skipped_out_of_benchmark: BTreeMap<String, u64>,
    /// Paths the scanners passed over.
    pub ignored: Vec<Ignored>,
    /// `(domain, class, native)` of manifest classes with no folder in the raw data.
    pub missing_natives: Vec<(String, String, String)>,
    /// Planned videos, per dataset, whose names did not parse into the split group their
    /// layout defines (each is then a group of its own).
    pub ungrouped: BTreeMap<String, u64>,
    /// Versions of FFmpeg's libraries and libjpeg-turbo ([`crate::decode::library_versions`]).
    pub libraries: BTreeMap<String, String>,
    /// This plan is part `index` of `count` of a larger one (`vdg prep --part`).
    pub part: Option<PartInfo>,
    /// SHA-256 over tool and library versions, manifest, options and every planned row
    /// (ids, labels, domains, groups, splits; not file sizes, see `inputs.json`).
    pub fingerprint: String,
}

/// The closest of `candidates` to `name` (edit distance), for "did you mean" messages.
pub fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a String>,
) -> Option<&'a String> {
    candidates
        .into_iter()
        .min_by_key(|c| strsim::levenshtein(&name.to_lowercase(), &c.to_lowercase()))
}

/// Checks the manifest's native classes against what the scans found: an unknown class is an
/// error (naming the closest known one) when a scan knows its dataset's complete class list,
/// and a warning (returned) when it only saw a possibly partial copy.
pub fn check_natives(
    manifest: &Manifest,
    scans: &[&Scan],
) -> Result<Vec<(String, String, String)>> {
    let mut missing = Vec::new();
    let mut datasets: BTreeMap<&str, Vec<&Scan>> = BTreeMap::new();
    for s in scans {
        datasets.entry(s.dataset.as_str()).or_default().push(s);
    }
    for d in &manifest.domains {
        let Some(found) = datasets.get(d.dataset.as_str()) else {
            continue;
        };
        for c in &manifest.classes {
            for n in c.native.get(&d.name).into_iter().flatten() {
                if found.iter().any(|s| s.classes.contains(n)) {
                    continue;
                }
                if let Some(s) = found.iter().find(|s| s.classes_complete) {
                    let hint = closest(n, &s.classes)
                        .map(|c| format!("; did you mean {c:?}?"))
                        .unwrap_or_default();
                    return Err(Error::Data(vdg_data::Error::ManifestInvalid {
                        path: manifest.origin.clone(),
                        key: format!("classes (label {}).native.{}", c.label, d.name),
                        message: format!("{n:?} is not a class of {}{hint}", d.dataset),
                    }));
                }
                missing.push((d.name.clone(), c.name.clone(), n.clone()));
            }
        }
    }
    Ok(missing)
}

/// Builds the plan from the scans of a benchmark's datasets.
pub fn build_plan(manifest: &Manifest, scans: &[&Scan], options: &ContentOptions) -> Result<Plan> {
    let rule = manifest.split_rule(&options.split_rule)?.clone();
    let missing_natives = check_natives(manifest, scans)?;
    let mut items = Vec::new();
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut ignored = Vec::new();
    let mut ungrouped: BTreeMap<String, u64> = BTreeMap::new();
    for scan in scans {
        ignored.extend(scan.ignored.iter().cloned());
        for (k, n) in &scan.skipped {
            *skipped.entry(k.clone()).or_default() += n;
        }
        for v in &scan.videos {
            let Some((domain, class)) =
                manifest.classify(&v.dataset, v.view.as_deref(), &v.native_class)
            else {
                *skipped.entry(v.dataset.clone()).or_default() += 1;
                continue;
            };
            let video_id = match &v.clip {
                None => format!("{}/{}", v.dataset, v.rel_path),
                Some(c) => format!(
                    "{}/{}/{:06}-{:06}-a{:0>2}",
                    v.dataset, v.rel_path, c.start, c.end, v.native_class
                ),
            };
            if scan.has_groups && v.group.is_none() {
                *ungrouped.entry(v.dataset.clone()).or_default() += 1;
            }
            let split_group = v.group.as_ref().map(|g| {
                if scan.groups_span_classes {
                    format!("{}/{g}", domain.name)
                } else {
                    format!("{}/{}/{g}", domain.name, v.native_class)
                }
            });
            items.push(PlanItem {
                abs_path: v.abs_path.clone(),
                clip: v.clip.clone(),
                pre_error: v.pre_error.clone(),
                split_group,
                fixed_split: v.fixed_split,
                row: VideoRow {
                    video_id,
                    dataset: v.dataset.clone(),
                    rel_path: v.rel_path.clone(),
                    class_name: v.native_class.clone(),
                    label: class.label,
                    label_name: class.name.clone(),
                    domain: domain.name.clone(),
                    group: v.group.clone(),
                    source_split: String::new(),
                    file_bytes: v.file_bytes,
                    clip_start: v.clip.as_ref().map(|c| c.start),
                    clip_end: v.clip.as_ref().map(|c| c.end),
                    status: VideoStatus::Failed,
                    error: None,
                    warning: None,
                    num_frames: 0,
                    decoded_frames: 0,
                    declared_frames: None,
                    fps: None,
                    source_fps: None,
                    width: None,
                    height: None,
                    source_width: None,
                    source_height: None,
                    duration_secs: None,
                    colour_matrix: None,
                    colour_range: None,
                    colour_assumed: None,
                    sample_aspect: None,
                    rotation: None,
                    shard: None,
                    first_row: None,
                },
            });
        }
    }
    items.sort_by(|a, b| a.row.video_id.cmp(&b.row.video_id));
    if let Some(w) = items
        .windows(2)
        .find(|w| w[0].row.video_id == w[1].row.video_id)
    {
        return Err(Error::Layout {
            path: w[0].abs_path.clone(),
            message: format!("two videos share the id {:?}", w[0].row.video_id),
        });
    }
    let strata: Vec<String> = items
        .iter()
        .map(|it| format!("{}/{}", it.row.domain, it.row.class_name))
        .collect();
    let split_items: Vec<SplitItem<'_>> = items
        .iter()
        .enumerate()
        .map(|(i, it)| SplitItem {
            key: &it.row.video_id,
            stratum: &strata[i],
            group: items[i].split_group.as_deref(),
            fixed: items[i].fixed_split,
        })
        .collect();
    let splits = assign_splits(&split_items, &rule, options.seed);
    for (it, s) in items.iter_mut().zip(splits) {
        it.row.source_split = s.as_str().to_owned();
    }
    let libraries = crate::decode::library_versions();
    let fingerprint = plan_fingerprint(manifest, options, &libraries, &items);
    let units = units_of(&items);
    Ok(Plan {
        manifest: manifest.clone(),
        options: options.clone(),
        items: items.into(),
        units,
        skipped_out_of_benchmark: skipped,
        ignored,
        missing_natives,
        ungrouped,
        libraries,
        part: None,
        fingerprint,
    })
}

/// Which part of a larger plan a part plan is (`vdg prep --part I/N`), as `prep.json`
/// records it for `vdg prep merge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// 0-based part index.
    pub index: u32,
    /// Number of parts.
    pub count: u32,
    /// Fingerprint of the whole plan.
    pub whole_fingerprint: String,
    /// Videos in the whole plan.
    pub whole_videos: u64,
    /// Videos in this part.
    pub videos: u64,
}

/// The units of `plan` that part `index` of `count` decodes: units (whole recordings
/// stay together) are dealt out largest first (by file bytes, then id) to the part with the
/// fewest bytes so far, so parts take about equal work whatever the order of the files.
/// Same plan, same assignment, on every machine.
pub fn part_units(plan: &Plan, count: u32) -> Vec<u32> {
    let bytes = |u: &std::ops::Range<usize>| -> u64 {
        // A recording's clips share one file: count it once.
        plan.items[u.start].row.file_bytes.max(1)
    };
    let mut order: Vec<usize> = (0..plan.units.len()).collect();
    order.sort_by(|&a, &b| {
        bytes(&plan.units[b])
            .cmp(&bytes(&plan.units[a]))
            .then_with(|| {
                plan.items[plan.units[a].start]
                    .row
                    .video_id
                    .cmp(&plan.items[plan.units[b].start].row.video_id)
            })
    });
    let mut load = vec![0u64; count.max(1) as usize];
    let mut owner = vec![0u32; plan.units.len()];
    for u in order {
        let (k, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(k, l)| (**l, *k))
            .unwrap_or((0, &0));
        load[k] += bytes(&plan.units[u]);
        owner[u] = k as u32;
    }
    owner
}

impl Plan {
    /// Part `index` of `count` of this plan ([`part_units`]): its videos in plan order,
    /// split, labelled and fingerprinted as in the whole plan, so `vdg prep merge` of all
    /// the parts writes what one machine would.
    pub fn part(&self, index: u32, count: u32) -> Result<Plan> {
        if count == 0 || index >= count {
            return Err(Error::Layout {
                path: self.manifest.origin.clone(),
                message: format!("--part {index}/{count}: the index must be below the count"),
            });
        }
        let owner = part_units(self, count);
        let mut items = Vec::new();
        for (u, range) in self.units.iter().enumerate() {
            if owner[u] == index {
                items.extend(self.items[range.clone()].iter().cloned());
            }
        }
        let units = units_of(&items);
        let mut h = Sha256::new();
        h.update(b"videodg-part\0");
        h.update(self.fingerprint.as_bytes());
        h.update(format!("\0{index}/{count}\0").as_bytes());
        for it in &items {
            h.update(it.row.video_id.as_bytes());
            h.update(b"\0");
        }
        Ok(Plan {
            part: Some(PartInfo {
                index,
                count,
                whole_fingerprint: self.fingerprint.clone(),
                whole_videos: self.items.len() as u64,
                videos: items.len() as u64,
            }),
            fingerprint: vdg_data::atomic::hex(&h.finalize()),
            items: items.into(),
            units,
            ..self.clone()
        })
    }

    /// The whole plan again from the rows that its parts wrote (for `vdg prep merge`): same
    /// items, units and fingerprint as the plan they were cut from, without the raw files.
    pub fn from_rows(
        manifest: Manifest,
        options: ContentOptions,
        libraries: BTreeMap<String, String>,
        mut rows: Vec<VideoRow>,
        skipped_out_of_benchmark: BTreeMap<String, u64>,
        ungrouped: BTreeMap<String, u64>,
    ) -> Plan {
        rows.sort_by(|a, b| a.video_id.cmp(&b.video_id));
        let items: Vec<PlanItem> = rows
            .into_iter()
            .map(|row| PlanItem {
                // Only to group a recording's clips into one unit, as the scan did.
                abs_path: std::path::PathBuf::from(format!("{}/{}", row.dataset, row.rel_path)),
                clip: match (row.clip_start, row.clip_end) {
                    (Some(start), Some(end)) => Some(Clip {
                        start,
                        end,
                        source: String::new(),
                    }),
                    _ => None,
                },
                pre_error: None,
                split_group: None,
                fixed_split: None,
                row,
            })
            .collect();
        let fingerprint = plan_fingerprint(&manifest, &options, &libraries, &items);
        let units = units_of(&items);
        Plan {
            manifest,
            options,
            items: items.into(),
            units,
            skipped_out_of_benchmark,
            ignored: Vec::new(),
            missing_natives: Vec::new(),
            ungrouped,
            libraries,
            part: None,
            fingerprint,
        }
    }
}

/// Groups consecutive clips of one recording into one unit; every other item is its own.
pub fn units_of(items: &[PlanItem]) -> Vec<std::ops::Range<usize>> {
    let mut units: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        match units.last_mut() {
            Some(u)
                if it.clip.is_some()
                    && items[u.start].clip.is_some()
                    && items[u.start].abs_path == it.abs_path =>
            {
                u.end = i + 1
            }
            _ => units.push(i..i + 1),
        }
    }
    units
}

impl Plan {
    /// Manifest domains with no planned video at all (a wrong path, an empty download).
    pub fn empty_domains(&self) -> Vec<&vdg_data::manifest::Domain> {
        self.manifest
            .domains
            .iter()
            .filter(|d| !self.items.iter().any(|it| it.row.domain == d.name))
            .collect()
    }

    /// `"<domain>/<class>"` of every manifest class that maps native classes in a domain
    /// but has no planned video there (a partial download), in manifest order.
    pub fn empty_classes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.manifest.domains {
            for c in &self.manifest.classes {
                let mapped = c.native.get(&d.name).is_some_and(|n| !n.is_empty());
                let has = self
                    .items
                    .iter()
                    .any(|it| it.row.domain == d.name && it.row.label == c.label);
                if mapped && !has {
                    out.push(format!("{}/{}", d.name, c.name));
                }
            }
        }
        out
    }

    /// Paths passed over at or above `severity`.
    pub fn ignored_at_least(&self, severity: Severity) -> impl Iterator<Item = &Ignored> {
        self.ignored.iter().filter(move |i| i.severity >= severity)
    }
}

fn plan_fingerprint(
    manifest: &Manifest,
    options: &ContentOptions,
    libraries: &BTreeMap<String, String>,
    items: &[PlanItem],
) -> String {
    let mut h = Sha256::new();
    h.update(b"videodg-plan\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"\0");
    for (k, v) in libraries {
        h.update(format!("{k}={v}\0").as_bytes());
    }
    h.update(vdg_data::shard::SHARD_SCHEMA_VERSION.to_le_bytes());
    h.update(manifest.text.as_bytes());
    h.update(b"\0");
    h.update(
        serde_json::to_string(options)
            .unwrap_or_default()
            .as_bytes(),
    );
    for it in items {
        let r = &it.row;
        for field in [
            r.video_id.as_str(),
            r.class_name.as_str(),
            r.domain.as_str(),
            r.group.as_deref().unwrap_or(""),
            r.source_split.as_str(),
        ] {
            h.update(field.as_bytes());
            h.update(b"\0");
        }
        h.update(r.label.to_le_bytes());
        // Not the file's size or whether it is missing: a changed input redoes its video
        // on rerun (prep.rs, `inputs.json`) instead of refusing the folder.
    }
    vdg_data::atomic::hex(&h.finalize())
}
