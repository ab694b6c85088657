//! Something-Something v2: `<id>.webm` files and the `labels.json`, `train.json`,
//! `validation.json` annotation (also the older `something-something-v2-*.json` names).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{Ignored, RawVideo, Scan, Severity};
use crate::error::{Error, Result};

/// Annotation files, current name first, then the older one.
const LABELS: [&str; 2] = ["labels.json", "something-something-v2-labels.json"];
const SPLITS: [[&str; 2]; 2] = [
    ["train.json", "something-something-v2-train.json"],
    ["validation.json", "something-something-v2-validation.json"],
];

fn find(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Layout {
            path: dir.to_owned(),
            message: format!("no {} here", names.join(" or ")),
        })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = super::read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Layout {
        path: path.to_owned(),
        message: format!("not valid JSON: {e}"),
    })
}

/// The class of an annotation entry: its `template` with the square brackets removed.
pub fn template_class(template: &str) -> String {
    template.replace(['[', ']'], "")
}

/// Scans Something-Something v2. The video pool is train + validation; `keep(class)` says
/// which classes the benchmark uses (others are only counted, their files never touched).
pub fn scan_ssv2(videos: &Path, labels: &Path, keep: impl Fn(&str) -> bool) -> Result<Scan> {
    let videos = std::path::absolute(videos).map_err(|e| Error::io(videos, e))?;
    if !videos.is_dir() {
        return Err(Error::Layout {
            path: videos,
            message: "not a folder (expected 20bn-something-something-v2/ with <id>.webm files)"
                .into(),
        });
    }
    let labels_path = find(labels, &LABELS)?;
    let classes: BTreeSet<String> = match read_json(&labels_path)? {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        _ => {
            return Err(Error::Layout {
                path: labels_path,
                message: "expected an object mapping class names to indices".into(),
            });
        }
    };
    let mut scan = Scan {
        dataset: "ssv2".into(),
        root: videos.clone(),
        classes,
        classes_complete: true,
        ..Scan::default()
    };
    let mut seen = BTreeSet::new();
    let mut found: BTreeMap<String, RawVideo> = BTreeMap::new();
    for names in SPLITS {
        let path = find(labels, &names)?;
        let serde_json::Value::Array(entries) = read_json(&path)? else {
            return Err(Error::Layout {
                path,
                message: "expected an array of {id, template, ...} objects".into(),
            });
        };
        for (i, e) in entries.iter().enumerate() {
            let id = match e.get("id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => {
                    scan.ignored.push(Ignored::new(
                        &path,
                        format!("entry {i}: no id"),
                        Severity::Warning,
                    ));
                    continue;
                }
            };
            let Some(template) = e.get("template").and_then(|t| t.as_str()) else {
                scan.ignored.push(Ignored::new(
                    &path,
                    format!("entry {i} (id {id}): no template"),
                    Severity::Warning,
                ));
                continue;
            };
            let class = template_class(template);
            if !scan.classes.contains(&class) {
                scan.ignored.push(Ignored::new(
                    &path,
                    format!(
                        "entry {i} (id {id}): class {class:?} is not in {}",
                        labels_path.display()
                    ),
                    Severity::Warning,
                ));
                continue;
            }
            if !seen.insert(id.clone()) {
                scan.ignored.push(Ignored::new(
                    &path,
                    format!("entry {i}: id {id} listed twice"),
                    Severity::Warning,
                ));
                continue;
            }
            if !keep(&class) {
                *scan.skipped.entry("ssv2".into()).or_default() += 1;
                continue;
            }
            let rel = format!("{id}.webm");
            let abs = videos.join(&rel);
            let (file_bytes, pre_error) = match std::fs::metadata(&abs) {
                Ok(m) => (m.len(), None),
                Err(e) => (
                    0,
                    Some(format!(
                        "video file {} is missing or unreadable: {e}",
                        abs.display()
                    )),
                ),
            };
            found.insert(
                rel.clone(),
                RawVideo {
                    dataset: "ssv2".into(),
                    native_class: class,
                    rel_path: rel,
                    abs_path: abs,
                    group: None,
                    file_bytes,
                    view: None,
                    clip: None,
                    pre_error,
                    fixed_split: None,
                },
            );
        }
    }
    scan.videos = found.into_values().collect();
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_with_a_byte_order_mark_and_unknown_fields_reads() {
        let d = tempfile::tempdir().unwrap();
        let bom = "\u{feff}";
        std::fs::write(
            d.path().join("labels.json"),
            format!("{bom}{{\"Pushing something\": \"0\", \"Pulling something\": \"1\"}}\r\n"),
        )
        .unwrap();
        std::fs::write(
            d.path().join("train.json"),
            format!(
                "{bom}[{{\"id\": \"7\", \"template\": \"Pushing [something]\", \"placeholders\": [], \"new\": 1}}]\r\n\r\n"
            ),
        )
        .unwrap();
        std::fs::write(d.path().join("validation.json"), "[]").unwrap();
        std::fs::write(d.path().join("7.webm"), b"v").unwrap();
        let s = scan_ssv2(d.path(), d.path(), |_| true).unwrap();
        assert_eq!(s.classes.len(), 2);
        assert_eq!(s.videos.len(), 1);
        assert_eq!(s.videos[0].native_class, "Pushing something");
        assert!(s.videos[0].pre_error.is_none());
    }
}
