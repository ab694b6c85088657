//! Benchmark manifests: classes, native-class maps, domains, directions and split rules.
//!
//! A manifest is a TOML file in `manifests/` (see `datasets.md` for the format). It is parsed
//! into `Raw*` structs that reject unknown keys, then checked into a [`Manifest`] before any
//! work starts, so every later stage can rely on its invariants: labels are `0..n` without
//! gaps, every native class maps to exactly one label per domain, every direction names
//! declared domains, and the default split rule exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest format version this build reads.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

/// Built-in manifests, compiled into the binary so `vdg` works from any folder.
/// `(name, toml text)`.
pub const BUILTIN_MANIFESTS: &[(&str, &str)] = &[
    ("ucf_hmdb", include_str!("../../../manifests/ucf_hmdb.toml")),
    (
        "something_something",
        include_str!("../../../manifests/something_something.toml"),
    ),
    ("pku_mmd", include_str!("../../../manifests/pku_mmd.toml")),
    ("ntu", include_str!("../../../manifests/ntu.toml")),
    (
        "synthetic",
        include_str!("../../../manifests/synthetic.toml"),
    ),
    (
        "synthetic_timing",
        include_str!("../../../manifests/synthetic_timing.toml"),
    ),
    (
        "synthetic_appearance",
        include_str!("../../../manifests/synthetic_appearance.toml"),
    ),
    (
        "synthetic_varied_source",
        include_str!("../../../manifests/synthetic_varied_source.toml"),
    ),
    (
        "synthetic_onset",
        include_str!("../../../manifests/synthetic_onset.toml"),
    ),
    (
        "synthetic_speed",
        include_str!("../../../manifests/synthetic_speed.toml"),
    ),
];

/// Whether `name` is the embedded synthetic benchmark or one of its variants (`synthetic_*`):
/// such benchmarks get the embedded benchmark's CPU-sized training defaults, and `vdg bench
/// run` generates the built-in ones on demand.
pub fn is_synthetic_benchmark(name: &str) -> bool {
    name == "synthetic" || name.starts_with("synthetic_")
}

/// How `vdg prep synthetic` draws a synthetic benchmark's clips: the manifest's optional
/// `[generator]` table (datasets.md, "Synthetic"). Without the table every field has its
/// default, the embedded benchmark's generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generator {
    /// The target domain's own appearance (a disc of a random bright hue on noisy stripes);
    /// `false` draws the source's (a light square on flat grey), leaving the timing shift.
    #[serde(default = "yes")]
    pub target_appearance: bool,
    /// The target domain's own onset (a lead-in hold of 6-14 frames before the signature);
    /// `false`: the source's (the signature first).
    #[serde(default = "yes")]
    pub target_onset: bool,
    /// The target domain's own speed (6-7 frames a move); `false`: the source's (8). With
    /// `target_onset` the temporal shift: both `false` leave the appearance shift alone.
    #[serde(default = "yes")]
    pub target_speed: bool,
    /// The source domain varies within its own family: a square of grey 160-255 and
    /// half-side 4.5-6.5 px on a flat grey of 15-60, a lead-in of 0-3 frames, 8-9 frames a
    /// move (the default: grey 200-254, half-side 5, flat grey 30, no lead-in, 8 frames).
    #[serde(default)]
    pub source_variety: bool,
}

impl Default for Generator {
    fn default() -> Self {
        Generator {
            target_appearance: true,
            target_onset: true,
            target_speed: true,
            source_variety: false,
        }
    }
}

/// Key of a class's `native` table that applies to every domain.
pub const ALL_DOMAINS_KEY: &str = "all";

/// How per-stratum train counts are rounded from `n * train_fraction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Nearest integer, keeping at least one clip on each side when the stratum has two or more.
    Nearest,
    /// `max(floor(n * fraction), 1)`, the rule of the released VideoDG/TA3N lists.
    Floor,
}

/// A rule that divides a source domain's videos into train and validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    /// Human-readable provenance of the rule.
    #[serde(default)]
    pub description: String,
    /// Fraction of each stratum's clips that go to train, in `(0, 1)`.
    pub train_fraction: f64,
    /// Keep clips that share a group (UCF101 `gNN`, HMDB51 source film) on one side.
    pub group_aware: bool,
    /// How the train count is rounded.
    pub rounding: Rounding,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    schema_version: u32,
    name: String,
    title: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    reference: String,
    segments: u32,
    #[serde(default = "yes")]
    horizontal_flip: bool,
    #[serde(default)]
    model_notes: BTreeMap<String, String>,
    domains: Vec<RawDomain>,
    directions: Vec<RawDirection>,
    split: RawSplit,
    classes: Vec<RawClass>,
    #[serde(default)]
    generator: Option<Generator>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    name: String,
    dataset: String,
    #[serde(default)]
    view: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirection {
    source: String,
    targets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    default: String,
    rules: BTreeMap<String, SplitRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    label: u32,
    name: String,
    native: BTreeMap<String, Vec<String>>,
}

/// A domain: a named population of videos drawn from one dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Domain {
    /// Short name used in directions and in the `domain` column (`ucf`, `hmdb`, ...).
    pub name: String,
    /// The raw dataset its videos come from (`ucf101`, `hmdb51`, ...).
    pub dataset: String,
    /// The camera view its videos were filmed from, as the layout names it (`L`, `C001`),
    /// for datasets whose domains are views; `None` = any.
    pub view: Option<String>,
    /// Free text.
    pub description: String,
}

/// A train-on-source, test-on-targets direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Direction {
    /// The training domain.
    pub source: String,
    /// The unseen test domains (one or more).
    pub targets: Vec<String>,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{}", self.source, self.targets.join(","))
    }
}

/// A benchmark class and the native dataset classes that map to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Class {
    /// 0-based label.
    pub label: u32,
    /// Benchmark class name.
    pub name: String,
    /// Domain name -> native class names (folder names, templates, action ids...); a
    /// manifest's `all` key is expanded to every domain.
    pub native: BTreeMap<String, Vec<String>>,
}

/// A checked benchmark manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    /// Where it was loaded from (a path or `builtin:<name>`).
    #[serde(skip)]
    pub origin: PathBuf,
    /// The exact TOML text, kept so prep can record it.
    #[serde(skip)]
    pub text: String,
    /// Benchmark name (`ucf_hmdb`).
    pub name: String,
    /// Display title.
    pub title: String,
    /// Free text.
    pub description: String,
    /// Provenance of the class lists and settings.
    pub reference: String,
    /// Number of temporal segments M the paper uses on this benchmark.
    pub segments: u32,
    /// Whether training may flip clips horizontally (`false` where left and right tell
    /// classes apart: Something-Something, as TRN's and TSM's code have it; the synthetic
    /// benchmark's motion classes).
    pub horizontal_flip: bool,
    /// Notes on models that leaderboards print beside their rows (model name -> text), e.g.
    /// the ceiling of an order-blind model on a benchmark whose classes differ only in order.
    pub model_notes: BTreeMap<String, String>,
    /// Domains in manifest order.
    pub domains: Vec<Domain>,
    /// Directions in manifest order.
    pub directions: Vec<Direction>,
    /// Name of the default split rule.
    pub default_split_rule: String,
    /// Split rules by name.
    pub split_rules: BTreeMap<String, SplitRule>,
    /// Classes ordered by label.
    pub classes: Vec<Class>,
    /// How `vdg prep synthetic` draws the clips (`[generator]`; only in manifests whose
    /// domains are all of dataset `synthetic`).
    pub generator: Option<Generator>,
}

impl Manifest {
    /// Loads one of [`BUILTIN_MANIFESTS`] by name.
    pub fn builtin(name: &str) -> Result<Self> {
        let Some((_, text)) = BUILTIN_MANIFESTS.iter().find(|(n, _)| *n == name) else {
            return Err(Error::UnknownBenchmark {
                name: name.to_owned(),
                known: BUILTIN_MANIFESTS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        Self::from_toml(text, Path::new(&format!("builtin:{name}")))
    }

    /// Loads and checks a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // A byte-order mark (Windows editors) is not TOML.
        Self::from_toml(text.strip_prefix('\u{feff}').unwrap_or(&text), path)
    }

    /// Parses and checks manifest text; `origin` is used in error messages.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| Error::ManifestParse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let invalid = |key: String, message: String| Error::ManifestInvalid {
            path: origin.to_owned(),
            key,
            message,
        };
        if raw.schema_version != MANIFEST_SCHEMA_VERSION {
            return Err(invalid(
                "schema_version".into(),
                format!(
                    "version {} is not supported (this build reads {MANIFEST_SCHEMA_VERSION})",
                    raw.schema_version
                ),
            ));
        }
        if raw.name.is_empty() {
            return Err(invalid("name".into(), "must not be empty".into()));
        }
        if raw.segments == 0 {
            return Err(invalid("segments".into(), "must be at least 1".into()));
        }
        if raw.domains.is_empty() {
            return Err(invalid(
                "domains".into(),
                "at least one domain is needed".into(),
            ));
        }
        let mut domain_names = BTreeSet::new();
        for (i, d) in raw.domains.iter().enumerate() {
            if d.name.is_empty() || d.dataset.is_empty() {
                return Err(invalid(
                    format!("domains[{i}]"),
                    "name and dataset must not be empty".into(),
                ));
            }
            if !domain_names.insert(d.name.as_str()) {
                return Err(invalid(
                    format!("domains[{i}].name"),
                    format!("duplicate domain {:?}", d.name),
                ));
            }
        }
        for (i, dir) in raw.directions.iter().enumerate() {
            if !domain_names.contains(dir.source.as_str()) {
                return Err(invalid(
                    format!("directions[{i}].source"),
                    format!("unknown domain {:?}", dir.source),
                ));
            }
            if dir.targets.is_empty() {
                return Err(invalid(
                    format!("directions[{i}].targets"),
                    "at least one target domain is needed".into(),
                ));
            }
            for (j, t) in dir.targets.iter().enumerate() {
                if !domain_names.contains(t.as_str()) {
                    return Err(invalid(
                        format!("directions[{i}].targets[{j}]"),
                        format!("unknown domain {t:?}"),
                    ));
                }
                if *t == dir.source {
                    return Err(invalid(
                        format!("directions[{i}].targets[{j}]"),
                        format!("{t:?} is also the source domain"),
                    ));
                }
            }
        }
        if raw.generator.is_some() && raw.domains.iter().any(|d| d.dataset != "synthetic") {
            return Err(invalid(
                "generator".into(),
                "only a synthetic benchmark (every domain of dataset \"synthetic\") has a \
                 generator"
                    .into(),
            ));
        }
        if !raw.split.rules.contains_key(&raw.split.default) {
            return Err(invalid(
                "split.default".into(),
                format!("no rule named {:?} under [split.rules]", raw.split.default),
            ));
        }
        for (name, rule) in &raw.split.rules {
            if !(rule.train_fraction > 0.0 && rule.train_fraction < 1.0) {
                return Err(invalid(
                    format!("split.rules.{name}.train_fraction"),
                    format!("{} is not in (0, 1)", rule.train_fraction),
                ));
            }
        }
        let mut classes = raw.classes;
        classes.sort_by_key(|c| c.label);
        for c in &mut classes {
            if let Some(list) = c.native.remove(ALL_DOMAINS_KEY) {
                if let Some(other) = c.native.keys().next() {
                    return Err(invalid(
                        format!("classes (label {}).native.{other}", c.label),
                        format!("cannot be combined with `{ALL_DOMAINS_KEY}`"),
                    ));
                }
                for d in &raw.domains {
                    c.native.insert(d.name.clone(), list.clone());
                }
            }
        }
        // Domains of one dataset and view are told apart by their native classes alone:
        // those must not overlap.
        for (i, a) in raw.domains.iter().enumerate() {
            for b in &raw.domains[i + 1..] {
                if a.dataset != b.dataset
                    || (a.view.is_some() && b.view.is_some() && a.view != b.view)
                {
                    continue;
                }
                for c in &classes {
                    let (Some(na), Some(nb)) = (c.native.get(&a.name), c.native.get(&b.name))
                    else {
                        continue;
                    };
                    if let Some(n) = na.iter().find(|n| nb.contains(n)) {
                        return Err(invalid(
                            format!("classes (label {}).native", c.label),
                            format!(
                                "native class {n:?} is in domains {:?} and {:?} of the same dataset and view, \
                                 so its videos could belong to either",
                                a.name, b.name
                            ),
                        ));
                    }
                }
            }
        }
        let mut names = BTreeMap::new();
        // (domain, native) -> class name, to reject a native class mapped twice.
        let mut natives: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        for (i, c) in classes.iter().enumerate() {
            if c.label as usize != i {
                return Err(invalid(
                    format!("classes (label {})", c.label),
                    format!(
                        "labels must be 0..{} without gaps or duplicates; expected label {i}",
                        classes.len()
                    ),
                ));
            }
            if let Some(prev) = names.insert(c.name.as_str(), c.label) {
                return Err(invalid(
                    format!("classes (label {}).name", c.label),
                    format!("duplicate class {:?} (also label {prev})", c.name),
                ));
            }
            if c.native.is_empty() {
                return Err(invalid(
                    format!("classes (label {}).native", c.label),
                    "maps no native class".into(),
                ));
            }
            for (domain, list) in &c.native {
                if !domain_names.contains(domain.as_str()) {
                    return Err(invalid(
                        format!("classes (label {}).native.{domain}", c.label),
                        format!("unknown domain {domain:?}"),
                    ));
                }
                for n in list {
                    if let Some(other) = natives.insert((domain, n), &c.name) {
                        return Err(invalid(
                            format!("classes (label {}).native.{domain}", c.label),
                            format!("native class {n:?} is already mapped to class {other:?}"),
                        ));
                    }
                }
            }
        }
        Ok(Manifest {
            origin: origin.to_owned(),
            text: text.to_owned(),
            name: raw.name,
            title: raw.title,
            description: raw.description,
            reference: raw.reference,
            segments: raw.segments,
            horizontal_flip: raw.horizontal_flip,
            model_notes: raw.model_notes,
            generator: raw.generator,
            domains: raw
                .domains
                .into_iter()
                .map(|d| Domain {
                    name: d.name,
                    dataset: d.dataset,
                    view: d.view,
                    description: d.description,
                })
                .collect(),
            directions: raw
                .directions
                .into_iter()
                .map(|d| Direction {
                    source: d.source,
                    targets: d.targets,
                })
                .collect(),
            default_split_rule: raw.split.default,
            split_rules: raw.split.rules,
            classes: classes
                .into_iter()
                .map(|c| Class {
                    label: c.label,
                    name: c.name,
                    native: c.native,
                })
                .collect(),
        })
    }

    /// The domain with this name.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.iter().find(|d| d.name == name)
    }

    /// Domains drawn from `dataset`.
    pub fn domains_of_dataset<'a>(&'a self, dataset: &'a str) -> impl Iterator<Item = &'a Domain> {
        self.domains.iter().filter(move |d| d.dataset == dataset)
    }

    /// The domain and class of a video of `dataset`, filmed from `view`, of native class
    /// `native`; `None` when the benchmark does not use it.
    pub fn classify(
        &self,
        dataset: &str,
        view: Option<&str>,
        native: &str,
    ) -> Option<(&Domain, &Class)> {
        self.domains
            .iter()
            .filter(|d| d.dataset == dataset)
            .filter(|d| d.view.is_none() || d.view.as_deref() == view)
            .find_map(|d| {
                self.classes
                    .iter()
                    .find(|c| {
                        c.native
                            .get(&d.name)
                            .is_some_and(|l| l.iter().any(|n| n == native))
                    })
                    .map(|c| (d, c))
            })
    }

    /// Every native class of `dataset`'s domains, with the key naming it in the manifest.
    pub fn natives_of_dataset(&self, dataset: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for c in &self.classes {
            for d in self.domains.iter().filter(|d| d.dataset == dataset) {
                for n in c.native.get(&d.name).into_iter().flatten() {
                    out.push((
                        format!("classes (label {}).native.{}", c.label, d.name),
                        n.clone(),
                    ));
                }
            }
        }
        out
    }

    /// Native class name -> class, for one domain.
    pub fn native_map(&self, domain: &str) -> BTreeMap<&str, &Class> {
        let mut map = BTreeMap::new();
        for c in &self.classes {
            if let Some(list) = c.native.get(domain) {
                for n in list {
                    map.insert(n.as_str(), c);
                }
            }
        }
        map
    }

    /// The split rule with this name, or an error listing the known ones.
    pub fn split_rule(&self, name: &str) -> Result<&SplitRule> {
        self.split_rules
            .get(name)
            .ok_or_else(|| Error::ManifestInvalid {
                path: self.origin.clone(),
                key: "split.rules".into(),
                message: format!(
                    "no split rule named {name:?}; known: {}",
                    self.split_rules
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Warns about native classes of `domain` that `available` does not contain (a class
    /// folder missing from the raw dataset). Returns the missing `(class, native)` pairs.
    pub fn missing_natives(
        &self,
        domain: &str,
        available: &BTreeSet<String>,
    ) -> Vec<(String, String)> {
        let mut missing = Vec::new();
        for c in &self.classes {
            for n in c.native.get(domain).into_iter().flatten() {
                if !available.contains(n) {
                    missing.push((c.name.clone(), n.clone()));
                }
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Manifest> {
        Manifest::from_toml(text, Path::new("test.toml"))
    }

    const MINI: &str = r#"
schema_version = 1
name = "mini"
title = "Mini"
segments = 3
[[domains]]
name = "a"
dataset = "ucf101"
[[domains]]
name = "b"
dataset = "hmdb51"
[[directions]]
source = "a"
targets = ["b"]
[split]
default = "paper"
[split.rules.paper]
train_fraction = 0.7
group_aware = true
rounding = "nearest"
[[classes]]
label = 1
name = "y"
native = { a = ["Y1", "Y2"], b = ["y"] }
[[classes]]
label = 0
name = "x"
native = { a = ["X"], b = ["x"] }
"#;

    #[test]
    fn the_synthetic_variants_differ_from_the_embedded_benchmark_in_their_generator_only() {
        let base = Manifest::builtin("synthetic").unwrap();
        assert_eq!(base.generator, None);
        for (name, g) in [
            (
                "synthetic_timing",
                Generator {
                    target_appearance: false,
                    ..Generator::default()
                },
            ),
            (
                "synthetic_appearance",
                Generator {
                    target_onset: false,
                    target_speed: false,
                    ..Generator::default()
                },
            ),
            (
                "synthetic_onset",
                Generator {
                    target_speed: false,
                    ..Generator::default()
                },
            ),
            (
                "synthetic_speed",
                Generator {
                    target_onset: false,
                    ..Generator::default()
                },
            ),
            (
                "synthetic_varied_source",
                Generator {
                    source_variety: true,
                    ..Generator::default()
                },
            ),
        ] {
            let m = Manifest::builtin(name).unwrap();
            assert!(is_synthetic_benchmark(&m.name), "{name}");
            assert_eq!((m.name.as_str(), m.generator), (name, Some(g)));
            assert_eq!(m.classes, base.classes, "{name}");
            assert_eq!(m.directions, base.directions, "{name}");
            assert_eq!(m.split_rules, base.split_rules, "{name}");
            assert_eq!(
                (m.segments, m.horizontal_flip, &m.model_notes),
                (base.segments, base.horizontal_flip, &base.model_notes),
                "{name}"
            );
        }
        assert!(!is_synthetic_benchmark("ucf_hmdb") && !is_synthetic_benchmark("synth"));
        // Only a synthetic benchmark has a generator, and its keys are checked.
        let e = load(&format!("{MINI}\n[generator]\ntarget_speed = false\n")).unwrap_err();
        assert!(e.to_string().contains("generator"), "{e}");
        let text = Manifest::builtin("synthetic").unwrap().text;
        let e = load(&format!("{text}\n[generator]\ntarget_timimg = false\n")).unwrap_err();
        assert!(e.to_string().contains("target_timimg"), "{e}");
    }

    #[test]
    fn a_manifest_file_with_a_byte_order_mark_and_crlf_loads() {
        let d = tempfile::tempdir().unwrap();
        let text = include_str!("../../../manifests/ucf_hmdb.toml").replace('\n', "\r\n");
        let p = d.path().join("m.toml");
        std::fs::write(&p, format!("\u{feff}{text}\r\n\r\n")).unwrap();
        let m = Manifest::load(&p).unwrap();
        assert_eq!(m.classes.len(), 12);
    }

    #[test]
    fn builtin_ucf_hmdb_matches_dataset_facts() {
        let m = Manifest::builtin("ucf_hmdb").unwrap();
        assert_eq!(m.classes.len(), 12);
        assert_eq!(m.segments, 5);
        let ucf: usize = m.classes.iter().map(|c| c.native["ucf"].len()).sum();
        let hmdb: usize = m.classes.iter().map(|c| c.native["hmdb"].len()).sum();
        assert_eq!((ucf, hmdb), (15, 12));
        assert_eq!(m.native_map("ucf")["BoxingSpeedBag"].name, "punch");
        assert_eq!(m.native_map("hmdb")["walk"].label, 11);
        let dirs: Vec<String> = m.directions.iter().map(|d| d.to_string()).collect();
        assert_eq!(dirs, ["ucf->hmdb", "hmdb->ucf"]);
        assert_eq!(m.default_split_rule, "paper");
        let paper = m.split_rule("paper").unwrap();
        assert!((paper.train_fraction - 0.7).abs() < 1e-12 && paper.group_aware);
        let released = m.split_rule("released-code").unwrap();
        assert_eq!(released.rounding, Rounding::Floor);
        assert!(!released.group_aware);
    }

    #[test]
    fn builtin_manifests_of_the_other_benchmarks() {
        let ss = Manifest::builtin("something_something").unwrap();
        assert_eq!((ss.classes.len(), ss.segments), (20, 5));
        // Every native name is a Something-Something v2 class (labels.json keys, facts 3.4).
        let ssv2: BTreeSet<&str> = include_str!("testdata/ssv2_classes.txt").lines().collect();
        assert_eq!(ssv2.len(), 174);
        for (key, n) in ss.natives_of_dataset("ssv2") {
            assert!(
                ssv2.contains(n.as_str()),
                "{key}: {n:?} is not an SSv2 class"
            );
        }
        assert_eq!(
            ss.classify(
                "ssv2",
                None,
                "Pretending to be tearing something that is not tearable"
            )
            .map(|(d, c)| (d.name.as_str(), c.name.as_str())),
            Some(("target", "tearing"))
        );
        let pku = Manifest::builtin("pku_mmd").unwrap();
        assert_eq!((pku.classes.len(), pku.segments), (43, 3));
        assert_eq!(pku.classify("pku_mmd", Some("M"), "8").unwrap().0.name, "C");
        assert!(
            pku.classify("pku_mmd", Some("L"), "12").is_none(),
            "interaction excluded"
        );
        let ntu = Manifest::builtin("ntu").unwrap();
        assert_eq!((ntu.classes.len(), ntu.segments), (60, 3));
        let (d, c) = ntu.classify("ntu", Some("C001"), "A013").unwrap();
        assert_eq!(
            (d.name.as_str(), c.name.as_str(), c.label),
            ("C", "tear up paper", 12)
        );
        for m in [&pku, &ntu] {
            let dirs: Vec<String> = m.directions.iter().map(|d| d.to_string()).collect();
            assert_eq!(dirs, ["L->C,R", "C->L,R", "R->L,C"]);
        }
    }

    #[test]
    fn sorts_classes_by_label() {
        let m = load(MINI).unwrap();
        assert_eq!(m.classes[0].name, "x");
        assert_eq!(m.native_map("a")["Y2"].label, 1);
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_and_key() {
        let text = MINI.replace("segments = 3", "segments = 3\nsegmnets = 4");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:"), "{err}");
        assert!(err.contains("segmnets"), "{err}");
    }

    #[test]
    fn duplicate_class_name_is_an_error() {
        let text = MINI.replace("name = \"y\"", "name = \"x\"");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("duplicate class \"x\""), "{err}");
    }

    #[test]
    fn native_mapped_twice_is_an_error() {
        let text = MINI.replace("a = [\"X\"]", "a = [\"Y1\"]");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("native.a"), "{err}");
        assert!(err.contains("\"Y1\" is already mapped"), "{err}");
    }

    #[test]
    fn label_gap_unknown_domain_and_bad_fraction_are_errors() {
        let gap = MINI.replace("label = 1", "label = 2");
        assert!(load(&gap).unwrap_err().to_string().contains("without gaps"));
        let dom = MINI.replace("targets = [\"b\"]", "targets = [\"c\"]");
        let err = load(&dom).unwrap_err().to_string();
        assert!(
            err.contains("directions[0].targets[0]") && err.contains("\"c\""),
            "{err}"
        );
        let frac = MINI.replace("train_fraction = 0.7", "train_fraction = 1.5");
        let err = load(&frac).unwrap_err().to_string();
        assert!(err.contains("split.rules.paper.train_fraction"), "{err}");
        let def = MINI.replace("default = \"paper\"", "default = \"nope\"");
        assert!(
            load(&def)
                .unwrap_err()
                .to_string()
                .contains("split.default")
        );
    }

    #[test]
    fn all_key_expands_and_same_view_domains_must_not_share_natives() {
        let text = MINI.replace(
            "native = { a = [\"X\"], b = [\"x\"] }",
            "native = { all = [\"X\"] }",
        );
        let m = load(&text).unwrap();
        assert_eq!(m.classes[0].native["a"], ["X"]);
        assert_eq!(m.classes[0].native["b"], ["X"]);
        assert_eq!(m.classify("hmdb51", None, "X").unwrap().0.name, "b");
        // Same dataset, no views: the shared native class is ambiguous.
        let same = text.replace("dataset = \"hmdb51\"", "dataset = \"ucf101\"");
        let err = load(&same).unwrap_err().to_string();
        assert!(err.contains("same dataset and view"), "{err}");
        // Views tell them apart.
        let views = same
            .replace(
                "name = \"a\"\ndataset = \"ucf101\"",
                "name = \"a\"\ndataset = \"ucf101\"\nview = \"L\"",
            )
            .replace(
                "name = \"b\"\ndataset = \"ucf101\"",
                "name = \"b\"\ndataset = \"ucf101\"\nview = \"R\"",
            );
        let m = load(&views).unwrap();
        assert_eq!(m.classify("ucf101", Some("R"), "X").unwrap().0.name, "b");
        assert!(m.classify("ucf101", Some("M"), "X").is_none());
        let mixed = MINI.replace(
            "native = { a = [\"X\"], b = [\"x\"] }",
            "native = { all = [\"X\"], b = [\"x\"] }",
        );
        assert!(
            load(&mixed)
                .unwrap_err()
                .to_string()
                .contains("cannot be combined")
        );
    }

    #[test]
    fn missing_natives_are_reported() {
        let m = load(MINI).unwrap();
        let have: BTreeSet<String> = ["X".to_string(), "Y1".to_string()].into();
        assert_eq!(
            m.missing_natives("a", &have),
            vec![("y".to_string(), "Y2".to_string())]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]

        #[test]
        fn any_text_loads_or_errs_without_panic(text in ".{0,300}") {
            let _ = Manifest::from_toml(&text, Path::new("prop.toml"));
        }

        #[test]
        fn a_damaged_real_manifest_loads_or_errs_without_panic(
            edits in proptest::collection::vec((0usize..4000, proptest::char::any()), 1..6)
        ) {
            let mut text: Vec<char> = include_str!("../../../manifests/ucf_hmdb.toml").chars().collect();
            for (at, c) in edits {
                let at = at % text.len();
                text[at] = c;
            }
            let text: String = text.into_iter().collect();
            let _ = Manifest::from_toml(&text, Path::new("prop.toml"));
        }
    }
}
