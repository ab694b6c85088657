//! PKU-MMD phase 1: long recordings `RGB_VIDEO/NNNN-V.avi` (V = L, M, R) and label files
//! `Label/NNNN-V.txt` (or `.label`) with rows `action,start,end,confidence`. Each label row
//! becomes one clip; bad rows are reported with file and line and skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{Clip, Ignored, RawVideo, Scan, Severity};
use crate::error::{Error, Result};

/// Number of PKU-MMD phase 1 action ids (1-based).
pub const PKU_ACTIONS: u32 = 51;

/// Label folder names tried under the root, in order.
const LABEL_DIRS: [&str; 3] = ["Label", "Train_Label_PKU_final", "label"];

/// One usable row of a PKU-MMD label file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRow {
    /// Action id, 1..=[`PKU_ACTIONS`].
    pub action: u32,
    /// First frame, 0-based.
    pub start: u64,
    /// Last frame, 0-based, inclusive (`>= start`).
    pub end: u64,
    /// 1-based line number in the file.
    pub line: usize,
}

/// Parses the text of a label file (`action,start,end,confidence` rows; commas, spaces or
/// tabs between fields; extra fields ignored) with frame numbers counted from
/// `frame_base`. Returns the usable rows and, for every other non-blank line, its number
/// and why it was skipped. Never panics, whatever the text (fuzzed: FUZZING.md).
pub fn parse_label_rows(text: &str, frame_base: u64) -> (Vec<LabelRow>, Vec<(usize, String)>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (mut rows, mut problems) = (Vec::new(), Vec::new());
    let mut seen = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split([',', ' ', '\t'])
            .filter(|f| !f.is_empty())
            .collect();
        if fields.len() < 3 {
            problems.push((
                line_no,
                format!("expected action,start,end,confidence, got {line:?}"),
            ));
            continue;
        }
        let (Ok(action), Ok(start), Ok(end)) = (
            fields[0].parse::<u32>(),
            fields[1].parse::<u64>(),
            fields[2].parse::<u64>(),
        ) else {
            problems.push((line_no, format!("fields are not integers: {line:?}")));
            continue;
        };
        if !(1..=PKU_ACTIONS).contains(&action) {
            problems.push((
                line_no,
                format!("unknown action id {action} (PKU-MMD has 1..{PKU_ACTIONS})"),
            ));
            continue;
        }
        if start > end {
            problems.push((line_no, format!("start {start} is after end {end}")));
            continue;
        }
        if start < frame_base {
            problems.push((
                line_no,
                format!("start {start} is before the first frame ({frame_base})"),
            ));
            continue;
        }
        if !seen.insert((action, start, end)) {
            problems.push((line_no, format!("duplicate of an earlier row: {line:?}")));
            continue;
        }
        rows.push(LabelRow {
            action,
            start: start - frame_base,
            end: end - frame_base,
            line: line_no,
        });
    }
    (rows, problems)
}

/// `NNNN-V` -> (sequence, view).
fn parse_stem(stem: &str) -> Option<(&str, &str)> {
    let (seq, view) = stem.split_once('-')?;
    (seq.len() == 4 && seq.bytes().all(|b| b.is_ascii_digit()) && matches!(view, "L" | "M" | "R"))
        .then_some((seq, view))
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// The official cross-subject split, `<root>/Split/cross-subject.txt` ("Training videos:",
/// a line of comma-separated `NNNN-V` names, "Validation videos:", another): name -> side.
/// Subjects are not in the file names, so this list is what keeps a subject on one side.
/// Without it, a warning says subjects may straddle the split (grouped by sequence only).
fn read_cross_subject(
    root: &Path,
    scan: &mut Scan,
) -> Result<BTreeMap<String, vdg_data::SourceSplit>> {
    use vdg_data::SourceSplit;
    let path = ["Split", "split"]
        .iter()
        .map(|d| root.join(d).join("cross-subject.txt"))
        .find(|p| p.is_file());
    let Some(path) = path else {
        scan.ignored.push(Ignored::new(
            root.join("Split/cross-subject.txt"),
            "missing: without the official cross-subject list a subject can be on both \
             sides of the train/val split (videos are grouped by sequence only)",
            Severity::Warning,
        ));
        return Ok(BTreeMap::new());
    };
    let text = super::read_text(&path)?;
    let mut out = BTreeMap::new();
    let mut side = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("training") {
            side = Some(SourceSplit::Train);
        } else if lower.starts_with("validation") || lower.starts_with("testing") {
            side = Some(SourceSplit::Val);
        } else if let Some(s) = side {
            for name in line.split([',', ' ', '\t']).filter(|n| !n.is_empty()) {
                out.insert(name.to_owned(), s);
            }
        } else {
            scan.ignored.push(Ignored::new(
                &path,
                format!("names before a \"Training videos:\" line: {line:.40}"),
                Severity::Warning,
            ));
        }
    }
    Ok(out)
}

/// Scans PKU-MMD under `root` (holding `RGB_VIDEO/` and a label folder), with label files
/// from `labels` when given. `frame_base` is the index of the first frame in the label
/// rows (0 or 1); stored clip ranges are 0-based.
pub fn scan_pku_mmd(root: &Path, labels: Option<&Path>, frame_base: u64) -> Result<Scan> {
    let root = std::path::absolute(root).map_err(|e| Error::io(root, e))?;
    let video_dir = root.join("RGB_VIDEO");
    if !video_dir.is_dir() {
        return Err(Error::Layout {
            path: root,
            message: "no RGB_VIDEO/ folder here (expected RGB_VIDEO/NNNN-{L,M,R}.avi)".into(),
        });
    }
    let label_dir = match labels {
        Some(l) => l.to_owned(),
        None => LABEL_DIRS
            .iter()
            .map(|d| root.join(d))
            .find(|p| p.is_dir())
            .ok_or_else(|| Error::Layout {
                path: root.clone(),
                message: format!(
                    "no label folder here (tried {}); pass --labels",
                    LABEL_DIRS.join(", ")
                ),
            })?,
    };
    let mut scan = Scan {
        dataset: "pku_mmd".into(),
        root: root.clone(),
        classes: (1..=PKU_ACTIONS).map(|a| a.to_string()).collect(),
        classes_complete: true,
        groups_span_classes: true,
        has_groups: true,
        ..Scan::default()
    };
    let mut videos: BTreeMap<String, (PathBuf, u64)> = BTreeMap::new();
    for path in list_files(&video_dir)? {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let is_avi = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("avi"));
        if !is_avi {
            scan.ignored
                .push(Ignored::new(path, "not an .avi file", Severity::Note));
        } else if parse_stem(&stem).is_none() {
            scan.ignored.push(Ignored::new(
                path,
                "name does not parse as NNNN-{L,M,R}.avi",
                Severity::Warning,
            ));
        } else {
            let bytes = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            videos.insert(stem, (path, bytes));
        }
    }
    let mut label_files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in list_files(&label_dir)? {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if ext != "txt" && ext != "label" {
            scan.ignored.push(Ignored::new(
                path,
                "not a .txt or .label file",
                Severity::Note,
            ));
            continue;
        }
        if parse_stem(&stem).is_none() {
            scan.ignored.push(Ignored::new(
                path,
                "name does not parse as NNNN-{L,M,R}",
                Severity::Warning,
            ));
            continue;
        }
        if let Some(prev) = label_files.get(&stem) {
            scan.ignored.push(Ignored::new(
                &path,
                format!("second label file for {stem} (using {})", prev.display()),
                Severity::Warning,
            ));
            continue;
        }
        label_files.insert(stem, path);
    }
    for (stem, (path, _)) in &videos {
        if !label_files.contains_key(stem) {
            scan.ignored.push(Ignored::new(
                path,
                "video without a label file",
                Severity::Warning,
            ));
        }
    }
    let xsub = read_cross_subject(&root, &mut scan)?;
    let label_dir_name = label_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("Label")
        .to_owned();
    for (stem, label_path) in &label_files {
        let Some((video_path, bytes)) = videos.get(stem) else {
            scan.ignored.push(Ignored::new(
                label_path,
                "label file without its video",
                Severity::Warning,
            ));
            continue;
        };
        let Some((seq, view)) = parse_stem(stem) else {
            continue;
        };
        let text = super::read_text(label_path)?;
        let label_name = format!(
            "{label_dir_name}/{}",
            label_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
        );
        let (rows, problems) = parse_label_rows(&text, frame_base);
        for (line_no, why) in problems {
            scan.ignored.push(Ignored::new(
                label_path,
                format!("line {line_no}: {why}"),
                Severity::Warning,
            ));
        }
        for r in rows {
            scan.videos.push(RawVideo {
                dataset: "pku_mmd".into(),
                native_class: r.action.to_string(),
                rel_path: format!("RGB_VIDEO/{stem}.avi"),
                abs_path: video_path.clone(),
                group: Some(seq.to_owned()),
                file_bytes: *bytes,
                view: Some(view.to_owned()),
                clip: Some(Clip {
                    start: r.start,
                    end: r.end,
                    source: format!("{label_name} line {}", r.line),
                }),
                pre_error: None,
                fixed_split: xsub.get(stem).or_else(|| xsub.get(seq)).copied(),
            });
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(parse_stem("0002-L"), Some(("0002", "L")));
        assert_eq!(parse_stem("0002-M"), Some(("0002", "M")));
        assert_eq!(parse_stem("0002-X"), None);
        assert_eq!(parse_stem("02-L"), None);
    }

    #[test]
    fn bad_rows_are_reported_with_file_and_line_and_skipped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("RGB_VIDEO")).unwrap();
        std::fs::create_dir_all(d.path().join("Label")).unwrap();
        std::fs::write(d.path().join("RGB_VIDEO/0001-L.avi"), b"v").unwrap();
        std::fs::write(d.path().join("RGB_VIDEO/0009-R.avi"), b"v").unwrap();
        std::fs::write(
            d.path().join("Label/0001-L.txt"),
            "8,10,20,1\r\n9,30,25,2\n99,1,5,1\nx,y,z\n\n8,10,20,1\n13, 40, 50, 2\n",
        )
        .unwrap();
        std::fs::write(d.path().join("Label/0003-M.label"), "1,1,2,1\n").unwrap();
        let s = scan_pku_mmd(d.path(), None, 0).unwrap();
        let clips: Vec<(String, u64, u64, String)> = s
            .videos
            .iter()
            .map(|v| {
                let c = v.clip.clone().unwrap();
                (v.native_class.clone(), c.start, c.end, c.source)
            })
            .collect();
        assert_eq!(
            clips,
            [
                ("8".into(), 10, 20, "Label/0001-L.txt line 1".into()),
                ("13".into(), 40, 50, "Label/0001-L.txt line 7".into())
            ]
        );
        let reasons: Vec<String> = s
            .ignored
            .iter()
            .map(|i| format!("{}: {}", i.path.display(), i.reason))
            .collect();
        let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
        assert!(
            has("0001-L.txt: line 2: start 30 is after end 25"),
            "{reasons:#?}"
        );
        assert!(has("line 3: unknown action id 99"), "{reasons:#?}");
        assert!(
            has("line 4: fields are not integers") || has("line 4: expected"),
            "{reasons:#?}"
        );
        assert!(has("line 6: duplicate"), "{reasons:#?}");
        assert!(
            has("0003-M.label: label file without its video"),
            "{reasons:#?}"
        );
        assert!(
            has("0009-R.avi: video without a label file"),
            "{reasons:#?}"
        );
        // 1-based labels shift to 0-based clip ranges.
        let s1 = scan_pku_mmd(d.path(), None, 1).unwrap();
        assert_eq!(
            s1.videos[0].clip.as_ref().map(|c| (c.start, c.end)),
            Some((9, 19))
        );
    }

    #[test]
    fn hand_edited_label_files_parse() {
        // A byte-order mark, CRLF, an upper-case extension, extra columns and trailing blank
        // lines: every row is kept.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("RGB_VIDEO")).unwrap();
        std::fs::create_dir_all(d.path().join("Label")).unwrap();
        std::fs::write(d.path().join("RGB_VIDEO/0001-L.AVI"), b"v").unwrap();
        std::fs::write(
            d.path().join("Label/0001-L.TXT"),
            "\u{feff}8,10,20,1\r\n13,40,50,2,extra,columns\r\n\r\n\n  \n",
        )
        .unwrap();
        let s = scan_pku_mmd(d.path(), None, 0).unwrap();
        let clips: Vec<(String, u64)> = s
            .videos
            .iter()
            .map(|v| (v.native_class.clone(), v.clip.as_ref().unwrap().start))
            .collect();
        assert_eq!(clips, [("8".into(), 10), ("13".into(), 40)]);
        assert!(
            s.ignored
                .iter()
                .all(|i| i.severity == Severity::Note || i.reason.contains("cross-subject")),
            "{:?}",
            s.ignored
        );
    }

    #[test]
    fn the_official_cross_subject_list_fixes_the_sides() {
        use vdg_data::SourceSplit;
        let d = tempfile::tempdir().unwrap();
        for dir in ["RGB_VIDEO", "Label", "Split"] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
        }
        for stem in ["0002-L", "0002-M", "0003-L", "0004-R"] {
            std::fs::write(d.path().join(format!("RGB_VIDEO/{stem}.avi")), b"v").unwrap();
            std::fs::write(d.path().join(format!("Label/{stem}.txt")), "8,10,20,1\n").unwrap();
        }
        // Without the list: a warning, no fixed sides.
        let s = scan_pku_mmd(d.path(), None, 0).unwrap();
        assert!(s.videos.iter().all(|v| v.fixed_split.is_none()));
        assert!(s.ignored.iter().any(|i| i.reason.contains("cross-subject")));
        std::fs::write(
            d.path().join("Split/cross-subject.txt"),
            "Training videos:\r\n0002-L, 0002-M, 0004-R,\r\nValidation videos:\r\n0003-L,\r\n",
        )
        .unwrap();
        let s = scan_pku_mmd(d.path(), None, 0).unwrap();
        let sides: Vec<(&str, Option<SourceSplit>)> = s
            .videos
            .iter()
            .map(|v| (v.rel_path.as_str(), v.fixed_split))
            .collect();
        assert_eq!(
            sides,
            [
                ("RGB_VIDEO/0002-L.avi", Some(SourceSplit::Train)),
                ("RGB_VIDEO/0002-M.avi", Some(SourceSplit::Train)),
                ("RGB_VIDEO/0003-L.avi", Some(SourceSplit::Val)),
                ("RGB_VIDEO/0004-R.avi", Some(SourceSplit::Train)),
            ]
        );
        assert!(!s.ignored.iter().any(|i| i.reason.contains("cross-subject")));
    }

    proptest::proptest! {
        #[test]
        fn any_label_text_parses_without_panic(text in ".{0,400}") {
            let (rows, problems) = parse_label_rows(&text, 1);
            for r in &rows {
                proptest::prop_assert!((1..=PKU_ACTIONS).contains(&r.action) && r.start <= r.end);
            }
            proptest::prop_assert!(rows.len() + problems.len() <= text.lines().count());
        }

        #[test]
        fn written_rows_read_back(rows in proptest::collection::vec((1u32..=51, 0u64..100_000, 0u64..500, 1u8..=2), 0..30), crlf: bool) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let text: String = rows
                .iter()
                .map(|(a, s, len, c)| format!("{a},{s},{},{c}{nl}", s + len))
                .collect();
            let (got, _) = parse_label_rows(&text, 0);
            let mut want: Vec<(u32, u64, u64)> = Vec::new();
            for (a, s, len, _) in &rows {
                if !want.contains(&(*a, *s, s + len)) {
                    want.push((*a, *s, s + len));
                }
            }
            let got: Vec<(u32, u64, u64)> = got.iter().map(|r| (r.action, r.start, r.end)).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
