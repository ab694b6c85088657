//! Layout scanners: walk a raw dataset folder exactly as its archive unpacks and list its
//! videos with their native class and split group.
//!
//! Listings are sorted (walkdir `sort_by_file_name`), so the same folder always scans the
//! same way. Files that are not where the layout puts videos are reported, not guessed at.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use crate::error::{Error, Result};

mod ntu;
mod pku_mmd;
pub mod ssv2;

pub use ntu::{parse_ntu_name, scan_ntu};
pub use pku_mmd::{LabelRow, PKU_ACTIONS, parse_label_rows, scan_pku_mmd};
pub use ssv2::scan_ssv2;

/// File extensions treated as videos.
pub const VIDEO_EXTENSIONS: &[&str] = &["avi", "mp4", "mkv", "webm", "mov", "mpg", "mpeg", "m4v"];

/// A video found in a raw layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawVideo {
    /// Dataset name (`ucf101`, `hmdb51`).
    pub dataset: String,
    /// Native class (the class folder).
    pub native_class: String,
    /// Path relative to the dataset root, `/`-separated.
    pub rel_path: String,
    /// Absolute path.
    pub abs_path: PathBuf,
    /// Split group, when the layout defines one.
    pub group: Option<String>,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Camera view, for layouts whose domains are views (`L`/`M`/`R`, `C001`...).
    pub view: Option<String>,
    /// The annotated interval, when this entry is one clip of a longer recording.
    pub clip: Option<Clip>,
    /// Known before decoding that this entry cannot be prepared (its file is missing...).
    pub pre_error: Option<String>,
    /// A side the dataset itself fixes (PKU-MMD's official cross-subject lists), which the
    /// split then keeps.
    pub fixed_split: Option<vdg_data::SourceSplit>,
}

/// An annotated interval of a recording: source frames `start..=end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clip {
    /// First frame (0-based index among decoded frames).
    pub start: u64,
    /// Last frame, inclusive.
    pub end: u64,
    /// Where the interval was annotated (`Label/0002-L.txt line 7`).
    pub source: String,
}

/// How much a passed-over path matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// An expected extra file (notes, other modalities): logged at debug level.
    Note,
    /// Bad or unusable annotation, a name that does not parse: a warning, skipped.
    Warning,
    /// Unreadable path: a warning, and prep exits with status 1.
    Error,
}

/// A path a scanner passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The path.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
    /// How much it matters.
    pub severity: Severity,
}

impl Ignored {
    pub(crate) fn new(
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
        severity: Severity,
    ) -> Self {
        Ignored {
            path: path.into(),
            reason: reason.into(),
            severity,
        }
    }
}

/// What scanning one dataset folder found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// The dataset (`ucf101`, `ssv2`, ...).
    pub dataset: String,
    /// The dataset root actually scanned.
    pub root: PathBuf,
    /// Videos, sorted by relative path.
    pub videos: Vec<RawVideo>,
    /// Native classes present (class folders), or all the layout defines.
    pub classes: BTreeSet<String>,
    /// `classes` is the complete list the dataset defines (from its annotation), so a
    /// manifest naming another class is wrong, not merely absent from a partial copy.
    pub classes_complete: bool,
    /// A group spans classes (an NTU performer, a PKU-MMD sequence), rather than being
    /// defined within one class (UCF101's `gNN`).
    pub groups_span_classes: bool,
    /// The layout names split groups; a video whose name does not parse into one is
    /// counted (it then forms a group of its own).
    pub has_groups: bool,
    /// Annotated videos of classes the scanner was told to leave out.
    pub skipped: BTreeMap<String, u64>,
    /// Paths passed over.
    pub ignored: Vec<Ignored>,
}

/// Reads an annotation file as text, without the byte-order mark Windows editors write. Only
/// a regular file (or a link to one) is opened: reading a named pipe waits for a writer.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if let Some(kind) = crate::decode::not_regular(&meta) {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file but {kind}"),
        );
        return Err(Error::io(path, e));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// `root/<name>` when the user pointed at the folder above the dataset's own folder.
pub(crate) fn resolve_root(root: &Path, inner: &str) -> Result<PathBuf> {
    let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::Layout {
            path: root.to_owned(),
            message: "not a folder".into(),
        });
    }
    let nested = root.join(inner);
    let root = if nested.is_dir() {
        nested
    } else {
        root.to_owned()
    };
    std::path::absolute(&root).map_err(|e| Error::io(&root, e))
}

/// Scans `<root>/<Class>/<clip>.<ext>`; `group` derives a clip's group from its class and
/// file stem.
pub fn scan_class_folders(
    root: &Path,
    inner: &str,
    dataset: &str,
    group: impl Fn(&str, &str) -> Option<String>,
) -> Result<Scan> {
    let root = resolve_root(root, inner)?;
    let mut scan = Scan {
        dataset: dataset.to_owned(),
        root: root.clone(),
        ..Scan::default()
    };
    // Datasets are often symlinked from shared storage: links are followed, and a link
    // back up the tree is reported (walkdir detects the loop), never walked forever.
    for entry in WalkDir::new(&root)
        .follow_links(true)
        .min_depth(1)
        .max_depth(2)
        .sort_by_file_name()
    {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().map(Path::to_owned).unwrap_or_else(|| root.clone());
                scan.ignored.push(Ignored::new(
                    path,
                    format!("unreadable: {e}"),
                    Severity::Error,
                ));
                continue;
            }
        };
        let path = entry.path();
        let Ok(rel) = path.strip_prefix(&root) else {
            continue;
        };
        let Some(rel_str) = rel.to_str() else {
            scan.ignored.push(Ignored::new(
                path,
                "file name is not valid UTF-8",
                Severity::Error,
            ));
            continue;
        };
        let ft = entry.file_type();
        match entry.depth() {
            1 if ft.is_dir() => {
                scan.classes.insert(rel_str.to_owned());
            }
            1 => scan.ignored.push(Ignored::new(
                path,
                "not inside a class folder",
                Severity::Note,
            )),
            _ if ft.is_dir() => scan.ignored.push(Ignored::new(
                path,
                "nested folder (the layout has none)",
                Severity::Note,
            )),
            _ => {
                let ext = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase)
                    .unwrap_or_default();
                if !VIDEO_EXTENSIONS.contains(&ext.as_str()) {
                    scan.ignored.push(Ignored::new(
                        path,
                        "not a video file extension",
                        Severity::Note,
                    ));
                    continue;
                }
                let class = rel_str.split('/').next().unwrap_or_default().to_owned();
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_owned();
                let file_bytes = match entry.metadata() {
                    Ok(m) => m.len(),
                    Err(e) => {
                        scan.ignored.push(Ignored::new(
                            path,
                            format!("unreadable: {e}"),
                            Severity::Error,
                        ));
                        continue;
                    }
                };
                scan.videos.push(RawVideo {
                    dataset: dataset.to_owned(),
                    group: group(&class, &stem),
                    native_class: class,
                    rel_path: rel_str.replace(std::path::MAIN_SEPARATOR, "/"),
                    abs_path: path.to_owned(),
                    file_bytes,
                    view: None,
                    clip: None,
                    pre_error: None,
                    fixed_split: None,
                });
            }
        }
    }
    Ok(scan)
}

/// UCF101's group of `v_<Class>_gGG_cCC`: `gGG`.
pub fn ucf101_group(_class: &str, stem: &str) -> Option<String> {
    let mut parts = stem.rsplitn(3, '_');
    let c = parts.next()?;
    let g = parts.next()?;
    let ok = |s: &str, p: char| {
        s.len() >= 2 && s.starts_with(p) && s[1..].bytes().all(|b| b.is_ascii_digit())
    };
    (ok(c, 'c') && ok(g, 'g') && parts.next()?.starts_with("v_")).then(|| g.to_owned())
}

/// HMDB51's group of `<film title>_<class>_<body>_<cam>_<people>_<view>_<quality>_<n>`:
/// the film title, which several clips of a class share.
pub fn hmdb51_group(class: &str, stem: &str) -> Option<String> {
    let tokens: Vec<&str> = stem.split('_').collect();
    let class_tokens: Vec<&str> = class.split('_').collect();
    if tokens.len() < 6 + class_tokens.len() + 1 {
        return None;
    }
    let head = &tokens[..tokens.len() - 6];
    let title_len = head.len().checked_sub(class_tokens.len())?;
    (head[title_len..] == class_tokens[..] && title_len > 0).then(|| head[..title_len].join("_"))
}

/// Scans the synthetic benchmark's raw layout `root/<domain>/<class>/<clip>.avi`
/// ([`crate::synthetic::write_synthetic`]): the domain folder is the view.
pub fn scan_synthetic(root: &Path) -> Result<Scan> {
    let mut all = Scan {
        dataset: "synthetic".into(),
        root: root.to_owned(),
        ..Scan::default()
    };
    for domain in crate::synthetic::DOMAINS {
        let s = scan_class_folders(&root.join(domain), "", "synthetic", |_, _| None)?;
        all.classes.extend(s.classes);
        all.ignored.extend(s.ignored);
        all.videos.extend(s.videos.into_iter().map(|mut v| {
            v.rel_path = format!("{domain}/{}", v.rel_path);
            v.view = Some(domain.to_owned());
            v
        }));
    }
    Ok(all)
}

/// Scans an unpacked UCF101 (`UCF-101/<Class>/v_<Class>_gGG_cCC.avi`); `root` may be the
/// `UCF-101` folder or the folder holding it.
pub fn scan_ucf101(root: &Path) -> Result<Scan> {
    let mut s = scan_class_folders(root, "UCF-101", "ucf101", ucf101_group)?;
    s.has_groups = true;
    Ok(s)
}

/// Scans an unpacked HMDB51 (`hmdb51/<class>/<clip>.avi`); `root` may be the `hmdb51`
/// folder or the folder holding it.
pub fn scan_hmdb51(root: &Path) -> Result<Scan> {
    let mut s = scan_class_folders(root, "hmdb51", "hmdb51", hmdb51_group)?;
    s.has_groups = true;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn an_annotation_file_that_is_a_named_pipe_is_an_error_not_a_wait() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("labels.txt");
        crate::testutil::mkfifo(&fifo);
        let got = crate::testutil::within(60, "reading a named pipe", move || {
            read_text(&fifo).map_err(|e| e.to_string())
        });
        let err = got.expect_err("a named pipe is not read");
        assert!(
            err.contains("labels.txt") && err.contains("not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn ucf_groups() {
        assert_eq!(
            ucf101_group("Biking", "v_Biking_g01_c03").as_deref(),
            Some("g01")
        );
        assert_eq!(
            ucf101_group("PushUps", "v_PushUps_g25_c04").as_deref(),
            Some("g25")
        );
        assert_eq!(ucf101_group("X", "clip"), None);
        assert_eq!(ucf101_group("X", "v_X_gA1_c01"), None);
    }

    #[test]
    fn hmdb_groups() {
        assert_eq!(
            hmdb51_group("brush_hair", "April_09_brush_hair_u_nm_np1_ba_goo_0").as_deref(),
            Some("April_09")
        );
        assert_eq!(
            hmdb51_group("climb", "Rock_Climbing_Overhang_climb_f_cm_np1_ba_med_3").as_deref(),
            Some("Rock_Climbing_Overhang")
        );
        assert_eq!(hmdb51_group("climb", "climb_f_cm_np1_ba_med_3"), None);
        assert_eq!(hmdb51_group("climb", "weird"), None);
    }

    #[test]
    fn scans_sorted_and_reports_strays() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("UCF-101");
        std::fs::create_dir_all(root.join("Biking")).unwrap();
        std::fs::create_dir_all(root.join("Archery/nested")).unwrap();
        std::fs::write(root.join("Biking/v_Biking_g02_c01.avi"), b"x").unwrap();
        std::fs::write(root.join("Biking/v_Biking_g01_c01.avi"), b"xy").unwrap();
        std::fs::write(root.join("Biking/notes.txt"), b"").unwrap();
        std::fs::write(root.join("stray.avi"), b"").unwrap();
        // The parent folder works too.
        let s = scan_ucf101(d.path()).unwrap();
        let rel: Vec<&str> = s.videos.iter().map(|v| v.rel_path.as_str()).collect();
        assert_eq!(
            rel,
            ["Biking/v_Biking_g01_c01.avi", "Biking/v_Biking_g02_c01.avi"]
        );
        assert_eq!(s.videos[0].file_bytes, 2);
        assert_eq!(s.videos[0].group.as_deref(), Some("g01"));
        assert_eq!(
            s.classes.iter().cloned().collect::<Vec<_>>(),
            ["Archery", "Biking"]
        );
        assert_eq!(s.ignored.len(), 3, "{:?}", s.ignored);
        assert!(s.ignored.iter().all(|i| i.severity == Severity::Note));
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let err = scan_hmdb51(Path::new("/no/such/hmdb"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/hmdb"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_class_folders_are_followed_and_a_loop_is_reported() {
        let d = tempfile::tempdir().unwrap();
        // The real files live elsewhere (shared storage); the dataset folder links to them.
        let store = d.path().join("store/Biking");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("v_Biking_g01_c01.avi"), b"x").unwrap();
        let root = d.path().join("UCF-101");
        std::fs::create_dir_all(root.join("Archery")).unwrap();
        std::os::unix::fs::symlink(&store, root.join("Biking")).unwrap();
        std::fs::write(root.join("Archery/v_Archery_g01_c01.avi"), b"x").unwrap();
        std::os::unix::fs::symlink(
            d.path().join("store/Biking/v_Biking_g01_c01.avi"),
            root.join("Archery/v_Archery_g02_c01.avi"),
        )
        .unwrap();
        let s = scan_ucf101(&root).unwrap();
        let rel: Vec<&str> = s.videos.iter().map(|v| v.rel_path.as_str()).collect();
        assert_eq!(
            rel,
            [
                "Archery/v_Archery_g01_c01.avi",
                "Archery/v_Archery_g02_c01.avi",
                "Biking/v_Biking_g01_c01.avi"
            ]
        );
        // A link back up the tree: reported as an error, the scan still ends.
        std::os::unix::fs::symlink(&root, root.join("Archery/loop")).unwrap();
        let s = scan_ucf101(&root).unwrap();
        assert_eq!(s.videos.len(), 3);
        assert!(
            s.ignored
                .iter()
                .any(|i| i.severity == Severity::Error && i.reason.contains("loop")),
            "{:?}",
            s.ignored
        );
    }
}
