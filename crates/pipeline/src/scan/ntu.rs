//! NTU RGB+D: `nturgb+d_rgb/SsssCcccPpppRrrrAaaa_rgb.avi` (setup, camera, performer,
//! replication, action; 1920x1080).

use std::path::Path;

use walkdir::WalkDir;

use super::{Ignored, RawVideo, Scan, Severity, VIDEO_EXTENSIONS, resolve_root};
use crate::error::{Error, Result};

/// The fields of an NTU RGB+D file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtuName {
    /// `S001`.
    pub setup: String,
    /// `C002`: the camera.
    pub camera: String,
    /// `P003`: the performer (subject).
    pub performer: String,
    /// `R002`: the replication.
    pub replication: String,
    /// `A013`: the action.
    pub action: String,
}

/// Parses `SsssCcccPpppRrrrAaaa` (with an optional `_rgb` suffix) from a file stem.
pub fn parse_ntu_name(stem: &str) -> Option<NtuName> {
    let s = stem.strip_suffix("_rgb").unwrap_or(stem);
    let b = s.as_bytes();
    if b.len() != 20 {
        return None;
    }
    let field = |at: usize, letter: u8| -> Option<String> {
        (b[at] == letter && b[at + 1..at + 4].iter().all(u8::is_ascii_digit))
            .then(|| s[at..at + 4].to_owned())
    };
    Some(NtuName {
        setup: field(0, b'S')?,
        camera: field(4, b'C')?,
        performer: field(8, b'P')?,
        replication: field(12, b'R')?,
        action: field(16, b'A')?,
    })
}

/// Scans NTU RGB+D RGB videos under `root` (the `nturgb+d_rgb` folder, its parent, or a
/// folder of per-setup archive folders), three levels deep at most.
pub fn scan_ntu(root: &Path) -> Result<Scan> {
    let root = resolve_root(root, "nturgb+d_rgb")?;
    let mut scan = Scan {
        dataset: "ntu".into(),
        root: root.clone(),
        classes: (1..=120).map(|a| format!("A{a:03}")).collect(),
        classes_complete: true,
        groups_span_classes: true,
        has_groups: true,
        ..Scan::default()
    };
    for entry in WalkDir::new(&root)
        .follow_links(true)
        .min_depth(1)
        .max_depth(3)
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
        if entry.file_type().is_dir() {
            continue;
        }
        let path = entry.path();
        let (Some(rel), Some(stem)) = (
            path.strip_prefix(&root).ok().and_then(|r| r.to_str()),
            path.file_stem().and_then(|s| s.to_str()),
        ) else {
            scan.ignored.push(Ignored::new(
                path,
                "file name is not valid UTF-8",
                Severity::Error,
            ));
            continue;
        };
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
        let Some(name) = parse_ntu_name(stem) else {
            scan.ignored.push(Ignored::new(
                path,
                "name does not parse as SsssCcccPpppRrrrAaaa_rgb.avi",
                Severity::Warning,
            ));
            continue;
        };
        let file_bytes = entry
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(path, e.into()))?;
        scan.videos.push(RawVideo {
            dataset: "ntu".into(),
            native_class: name.action,
            rel_path: rel.replace(std::path::MAIN_SEPARATOR, "/"),
            abs_path: path.to_owned(),
            group: Some(name.performer),
            file_bytes,
            view: Some(name.camera),
            clip: None,
            pre_error: None,
            fixed_split: None,
        });
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ntu_names() {
        let n = parse_ntu_name("S001C002P003R002A013_rgb").unwrap();
        assert_eq!(
            (
                n.setup.as_str(),
                n.camera.as_str(),
                n.performer.as_str(),
                n.replication.as_str(),
                n.action.as_str()
            ),
            ("S001", "C002", "P003", "R002", "A013")
        );
        assert!(parse_ntu_name("S001C002P003R002A013").is_some());
        assert!(parse_ntu_name("S001C002P003R002A13_rgb").is_none());
        assert!(parse_ntu_name("S001X002P003R002A013_rgb").is_none());
        assert!(parse_ntu_name("video_rgb").is_none());
    }

    proptest::proptest! {
        #[test]
        fn any_stem_parses_without_panic_and_names_round_trip(stem in ".{0,30}", n in (1u32..999, 1u32..999, 1u32..999, 1u32..999, 1u32..999)) {
            if let Some(p) = parse_ntu_name(&stem) {
                let joined = format!("{}{}{}{}{}", p.setup, p.camera, p.performer, p.replication, p.action);
                proptest::prop_assert_eq!(joined.as_str(), stem.strip_suffix("_rgb").unwrap_or(&stem));
            }
            let name = format!("S{:03}C{:03}P{:03}R{:03}A{:03}_rgb", n.0, n.1, n.2, n.3, n.4);
            let p = parse_ntu_name(&name).unwrap();
            proptest::prop_assert_eq!(p.performer, format!("P{:03}", n.2));
        }
    }
}
