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

fn parse_json(text: &str) -> std::result::Result<serde_json::Value, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

/// The class names of `labels.json` (an object mapping names to indices).
pub fn parse_labels(text: &str) -> std::result::Result<BTreeSet<String>, String> {
    match parse_json(text)? {
        serde_json::Value::Object(m) => Ok(m.keys().cloned().collect()),
        _ => Err("expected an object mapping class names to indices".into()),
    }
}

/// Whether `id` can name a video file: SSv2 ids are numbers; letters, `-` and `_` are
/// allowed too, anything that could leave the video folder (`/`, `..`) is not.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One annotation entry: `(id, class)`, or why it is unusable.
pub type Entry = std::result::Result<(String, String), String>;

/// The entries of `train.json` / `validation.json` (an array of `{id, template, ...}`):
/// each `(id, class)`, or why entry `i` is unusable. Never panics, whatever the text
/// (fuzzed: FUZZING.md).
pub fn parse_entries(text: &str) -> std::result::Result<Vec<Entry>, String> {
    let serde_json::Value::Array(entries) = parse_json(text)? else {
        return Err("expected an array of {id, template, ...} objects".into());
    };
    Ok(entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let id = match e.get("id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => return Err(format!("entry {i}: no id")),
            };
            if !is_safe_id(&id) {
                return Err(format!(
                    "entry {i}: id {:?} is not a file name",
                    id.chars().take(40).collect::<String>()
                ));
            }
            let Some(template) = e.get("template").and_then(|t| t.as_str()) else {
                return Err(format!("entry {i} (id {id}): no template"));
            };
            Ok((id, template_class(template)))
        })
        .collect())
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
    let classes =
        parse_labels(&super::read_text(&labels_path)?).map_err(|message| Error::Layout {
            path: labels_path.clone(),
            message,
        })?;
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
        let entries =
            parse_entries(&super::read_text(&path)?).map_err(|message| Error::Layout {
                path: path.clone(),
                message,
            })?;
        for (i, e) in entries.into_iter().enumerate() {
            let (id, class) = match e {
                Ok(e) => e,
                Err(why) => {
                    scan.ignored
                        .push(Ignored::new(&path, why, Severity::Warning));
                    continue;
                }
            };
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

    proptest::proptest! {
        #[test]
        fn any_annotation_text_parses_without_panic(text in ".{0,300}") {
            let _ = parse_labels(&text);
            if let Ok(entries) = parse_entries(&text) {
                for (id, _) in entries.into_iter().flatten() {
                    proptest::prop_assert!(is_safe_id(&id));
                }
            }
        }

        #[test]
        fn ids_that_could_leave_the_folder_are_refused(id in "[a-z0-9./]{1,12}") {
            let text = format!("[{{\"id\": {id:?}, \"template\": \"Pushing [something]\"}}]");
            let entries = parse_entries(&text).unwrap();
            let ok = entries[0].is_ok();
            proptest::prop_assert_eq!(ok, !id.contains('/') && !id.contains('.'));
        }
    }
}
