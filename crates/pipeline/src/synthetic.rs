//! The embedded synthetic video DG benchmark: generated clips, no download.
//!
//! A clip shows one object moving through four sub-actions of equal length; a class is a
//! *signature*: two consecutive moves (e.g. right then up). The other two sub-actions are
//! "hold" (the object stays, jittering by a pixel). Domains differ in:
//! - appearance: `source` draws a light square on a flat dark background; `target` draws a
//!   disc of a random bright hue on low-contrast stripes with pixel noise;
//! - time (the paper's temporal domain shift): in `source` the signature comes first (early
//!   onset) at normal speed; in `target` it starts after a random lead-in hold of 6-14 frames
//!   and is faster (the moves cover the same distance in fewer frames).
//!
//! So the order of two adjacent moves (a local relation) identifies the class in both
//! domains, while "what happens at the start of the clip" (a global cue) misleads across
//! them. Every clip is a pure function of (seed, domain, class, index).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vdg_data::split::derive_seed;

use crate::encode::VideoWriter;
use crate::error::{Error, Result};

/// Elementary moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// +x.
    Right,
    /// -x.
    Left,
    /// -y.
    Up,
    /// +y.
    Down,
    /// No motion (a one-pixel jitter).
    Hold,
}

/// The classes: (name, first move, second move).
pub const CLASSES: [(&str, Move, Move); 6] = [
    ("right_then_up", Move::Right, Move::Up),
    ("up_then_right", Move::Up, Move::Right),
    ("left_then_down", Move::Left, Move::Down),
    ("down_then_left", Move::Down, Move::Left),
    ("right_then_down", Move::Right, Move::Down),
    ("up_then_left", Move::Up, Move::Left),
];

/// The domains (folder names of the raw layout, views of the manifest).
pub const DOMAINS: [&str; 2] = ["source", "target"];

/// Benchmark size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// 48 clips per class and domain.
    Small,
    /// 120 clips per class and domain (the default `vdg bench run`).
    Full,
    /// 360 clips per class and domain: three times `Full`'s training and target clips.
    Large,
    /// 4 clips per class and domain (tests).
    Tiny,
}

impl Scale {
    /// Clips per class and domain.
    pub fn clips(self) -> u32 {
        match self {
            Scale::Tiny => 4,
            Scale::Small => 48,
            Scale::Full => 120,
            Scale::Large => 360,
        }
    }

    /// Parses `tiny`, `small`, `full`, `large`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "tiny" => Some(Scale::Tiny),
            "small" => Some(Scale::Small),
            "full" => Some(Scale::Full),
            "large" => Some(Scale::Large),
            _ => None,
        }
    }
}

/// Frame size of synthetic clips.
pub const SIZE: u32 = 48;
/// Frames per clip.
pub const FRAMES: u32 = 32;
/// Frame rate.
pub const FPS: u32 = 25;

fn delta(m: Move) -> (f32, f32) {
    match m {
        Move::Right => (1.0, 0.0),
        Move::Left => (-1.0, 0.0),
        Move::Up => (0.0, -1.0),
        Move::Down => (0.0, 1.0),
        Move::Hold => (0.0, 0.0),
    }
}

/// The frames of one clip, RGB24, `SIZE x SIZE`.
pub fn clip_frames(domain: &str, class: usize, index: u32, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
        seed,
        &format!("synthetic/{domain}/{class}/{index}"),
    ));
    let target = domain == "target";
    let (_, a, b) = CLASSES[class % CLASSES.len()];
    // Sub-action schedule: (move, frames).
    let travel = 14.0f32; // pixels per move
    let schedule: Vec<(Move, u32)> = if target {
        // Later onset after a random lead-in hold, faster moves, a shorter hold after.
        let fast = 6 + rng.random_range(0..2);
        let lead = rng.random_range(6..=14);
        vec![
            (Move::Hold, lead),
            (a, fast),
            (b, fast),
            (Move::Hold, FRAMES - lead - 2 * fast),
        ]
    } else {
        let slow = 8;
        vec![
            (a, slow),
            (b, slow),
            (Move::Hold, slow),
            (Move::Hold, FRAMES - 3 * slow),
        ]
    };
    let size = SIZE as f32;
    // Start where the two moves stay inside the frame.
    let (da, db) = (delta(a), delta(b));
    let end = (travel * (da.0 + db.0), travel * (da.1 + db.1));
    let margin = 8.0;
    let lo_x = margin - end.0.min(0.0) - (travel * da.0).min(0.0);
    let hi_x = size - margin - end.0.max(0.0) - (travel * da.0).max(0.0);
    let lo_y = margin - end.1.min(0.0) - (travel * da.1).min(0.0);
    let hi_y = size - margin - end.1.max(0.0) - (travel * da.1).max(0.0);
    let mut x = rng.random_range(lo_x.min(hi_x)..=hi_x.max(lo_x));
    let mut y = rng.random_range(lo_y.min(hi_y)..=hi_y.max(lo_y));
    let colour: [u8; 3] = if target {
        // A random hue as bright as the source's object, so the object stays the salient
        // thing in the frame (appearance shift, not a vanishing object).
        let mut c = [
            rng.random_range(120..=255),
            rng.random_range(120..=255),
            rng.random_range(120..=255),
        ];
        c[rng.random_range(0..3)] = 255;
        c
    } else {
        let g = rng.random_range(200..255);
        [g, g, g]
    };
    let stripe = rng.random_range(4..9);
    let mut frames = Vec::with_capacity(FRAMES as usize);
    for (m, n) in schedule {
        let (dx, dy) = delta(m);
        for _ in 0..n {
            let (jx, jy) = if m == Move::Hold {
                (rng.random_range(-1.0..=1.0), rng.random_range(-1.0..=1.0))
            } else {
                (0.0, 0.0)
            };
            frames.push(draw(x + jx, y + jy, target, colour, stripe, &mut rng));
            x += dx * travel / n as f32;
            y += dy * travel / n as f32;
        }
    }
    frames.truncate(FRAMES as usize);
    frames
}

fn draw(
    cx: f32,
    cy: f32,
    target: bool,
    colour: [u8; 3],
    stripe: u32,
    rng: &mut ChaCha8Rng,
) -> Vec<u8> {
    let s = SIZE as usize;
    let mut buf = vec![0u8; s * s * 3];
    let r = 5.0f32;
    for py in 0..s {
        for px in 0..s {
            let i = (py * s + px) * 3;
            let (fx, fy) = (px as f32 + 0.5 - cx, py as f32 + 0.5 - cy);
            let inside = if target {
                fx * fx + fy * fy <= r * r
            } else {
                fx.abs() <= r && fy.abs() <= r
            };
            let mut p = if inside {
                colour
            } else if target {
                let band = ((px + py) as u32 / stripe).is_multiple_of(2);
                if band { [55, 60, 45] } else { [30, 35, 55] }
            } else {
                [30, 30, 30]
            };
            if target {
                for c in &mut p {
                    *c = (i32::from(*c) + rng.random_range(-12..=12)).clamp(0, 255) as u8;
                }
            }
            buf[i..i + 3].copy_from_slice(&p);
        }
    }
    buf
}

/// Writes the raw synthetic layout `root/<domain>/<class>/<domain>_<class>_<NNN>.avi`
/// (MPEG-4 AVI); returns the number of clips.
pub fn write_synthetic(root: &Path, scale: Scale, seed: u64) -> Result<u32> {
    let mut n = 0;
    for domain in DOMAINS {
        for (c, (name, _, _)) in CLASSES.iter().enumerate() {
            let dir = root.join(domain).join(name);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            for i in 0..scale.clips() {
                let path = dir.join(format!("{domain}_{name}_{i:03}.avi"));
                let tmp = path.with_extension("avi.part.avi");
                let mut w = VideoWriter::create(&tmp, "mpeg4", SIZE, SIZE, FPS)?;
                for f in clip_frames(domain, c, i, seed) {
                    w.write_rgb(&f)?;
                }
                w.finish()?;
                std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_are_deterministic_and_sized() {
        let a = clip_frames("target", 2, 3, 7);
        assert_eq!(a.len(), FRAMES as usize);
        assert!(a.iter().all(|f| f.len() == (SIZE * SIZE * 3) as usize));
        assert_eq!(a, clip_frames("target", 2, 3, 7));
        assert_ne!(a, clip_frames("target", 2, 4, 7));
        assert_eq!(clip_frames("source", 0, 0, 1).len(), FRAMES as usize);
    }

    /// The object's centroid moves along the class signature.
    #[test]
    fn motion_follows_the_signature() {
        let centroid = |f: &[u8]| {
            let s = SIZE as usize;
            let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
            for y in 0..s {
                for x in 0..s {
                    if f[(y * s + x) * 3] > 150 {
                        sx += x as f64;
                        sy += y as f64;
                        n += 1.0;
                    }
                }
            }
            (sx / n, sy / n)
        };
        // Source "right_then_up": frames 0..8 move right, 8..16 move up.
        let f = clip_frames("source", 0, 0, 3);
        let (p0, p8, p15) = (centroid(&f[0]), centroid(&f[8]), centroid(&f[15]));
        assert!(
            p8.0 - p0.0 > 8.0 && (p8.1 - p0.1).abs() < 2.0,
            "{p0:?} {p8:?}"
        );
        assert!(
            p8.1 - p15.1 > 8.0 && (p15.0 - p8.0).abs() < 2.0,
            "{p8:?} {p15:?}"
        );
    }
}
