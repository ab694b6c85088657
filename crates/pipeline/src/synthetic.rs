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
//! them. A manifest's `[generator]` table ([`Generator`]) can leave out the target's
//! appearance, its onset or its speed, or vary the source within its family (the
//! `synthetic_*` variants; datasets.md, "Which shift the gap comes from"). Every clip is a pure function
//! of (generator, seed, domain, class, index).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
pub use vdg_data::manifest::Generator;
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

/// The frames of one clip, RGB24, `SIZE x SIZE`, drawn as `generator` says.
pub fn clip_frames(
    generator: &Generator,
    domain: &str,
    class: usize,
    index: u32,
    seed: u64,
) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
        seed,
        &format!("synthetic/{domain}/{class}/{index}"),
    ));
    let is_target = domain == "target";
    // The target's appearance and timing, each unless the generator leaves it out; the
    // source's variety within its own family.
    let target = is_target && generator.target_appearance;
    let varied = !is_target && generator.source_variety;
    let (_, a, b) = CLASSES[class % CLASSES.len()];
    let schedule = schedule(generator, is_target, a, b, &mut rng);
    let travel = 14.0f32; // pixels per move
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
    } else if varied {
        let g = rng.random_range(160..=255);
        [g, g, g]
    } else {
        let g = rng.random_range(200..255);
        [g, g, g]
    };
    let stripe = rng.random_range(4..9);
    // The source's square: half-side and background grey.
    let (half, ground) = if varied {
        let g = rng.random_range(15..=60u8);
        (rng.random_range(4.5f32..=6.5), [g, g, g])
    } else {
        (5.0, [30, 30, 30])
    };
    let look = Look {
        target,
        colour,
        stripe,
        half,
        ground,
    };
    let mut frames = Vec::with_capacity(FRAMES as usize);
    for (m, n) in schedule {
        let (dx, dy) = delta(m);
        for _ in 0..n {
            let (jx, jy) = if m == Move::Hold {
                (rng.random_range(-1.0..=1.0), rng.random_range(-1.0..=1.0))
            } else {
                (0.0, 0.0)
            };
            frames.push(draw(x + jx, y + jy, &look, &mut rng));
            x += dx * travel / n as f32;
            y += dy * travel / n as f32;
        }
    }
    frames.truncate(FRAMES as usize);
    frames
}

/// The clip's sub-actions, (move, frames), for the moves `a` then `b`, in the target domain
/// if `is_target`, as `generator` says.
fn schedule(
    generator: &Generator,
    is_target: bool,
    a: Move,
    b: Move,
    rng: &mut ChaCha8Rng,
) -> Vec<(Move, u32)> {
    let (onset, speed) = (
        is_target && generator.target_onset,
        is_target && generator.target_speed,
    );
    if !is_target && generator.source_variety {
        // The source's early onset and normal speed, varied a little.
        let slow = 8 + rng.random_range(0..2);
        let lead = rng.random_range(0..=3);
        vec![
            (Move::Hold, lead),
            (a, slow),
            (b, slow),
            (Move::Hold, FRAMES - lead - 2 * slow),
        ]
    } else if onset || speed {
        // Later onset after a random lead-in hold, faster moves, a shorter hold after (both
        // drawn, so that either alone leaves the other's draw unused, not the stream moved).
        let fast = 6 + rng.random_range(0..2);
        let lead = rng.random_range(6..=14);
        let (fast, lead) = (if speed { fast } else { 8 }, if onset { lead } else { 0 });
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
    }
}

/// How one clip's frames look.
#[derive(Clone, Copy)]
struct Look {
    /// The target's appearance: a disc on noisy stripes (else a square on flat grey).
    target: bool,
    /// The object's colour.
    colour: [u8; 3],
    /// Stripe width (target).
    stripe: u32,
    /// Half the square's side (source).
    half: f32,
    /// The flat background (source).
    ground: [u8; 3],
}

fn draw(cx: f32, cy: f32, look: &Look, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let Look {
        target,
        colour,
        stripe,
        half,
        ground,
    } = *look;
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
                fx.abs() <= half && fy.abs() <= half
            };
            let mut p = if inside {
                colour
            } else if target {
                let band = ((px + py) as u32 / stripe).is_multiple_of(2);
                if band { [55, 60, 45] } else { [30, 35, 55] }
            } else {
                ground
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
/// (MPEG-4 AVI) drawn as `generator` says; returns the number of clips.
pub fn write_synthetic(root: &Path, generator: &Generator, scale: Scale, seed: u64) -> Result<u32> {
    let mut n = 0;
    for domain in DOMAINS {
        for (c, (name, _, _)) in CLASSES.iter().enumerate() {
            let dir = root.join(domain).join(name);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            for i in 0..scale.clips() {
                let path = dir.join(format!("{domain}_{name}_{i:03}.avi"));
                let tmp = path.with_extension("avi.part.avi");
                let mut w = VideoWriter::create(&tmp, "mpeg4", SIZE, SIZE, FPS)?;
                for f in clip_frames(generator, domain, c, i, seed) {
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
        let g = Generator::default();
        let a = clip_frames(&g, "target", 2, 3, 7);
        assert_eq!(a.len(), FRAMES as usize);
        assert!(a.iter().all(|f| f.len() == (SIZE * SIZE * 3) as usize));
        assert_eq!(a, clip_frames(&g, "target", 2, 3, 7));
        assert_ne!(a, clip_frames(&g, "target", 2, 4, 7));
        assert_eq!(clip_frames(&g, "source", 0, 0, 1).len(), FRAMES as usize);
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
        let f = clip_frames(&Generator::default(), "source", 0, 0, 3);
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

    /// The object's centre: the mean position of pixels with a channel above 100 (objects
    /// have one at 255 or a grey of at least 160; backgrounds stay under 73).
    fn centre(f: &[u8]) -> (f64, f64) {
        let s = SIZE as usize;
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for y in 0..s {
            for x in 0..s {
                let i = (y * s + x) * 3;
                if f[i..i + 3].iter().any(|&c| c > 100) {
                    sx += x as f64;
                    sy += y as f64;
                    n += 1.0;
                }
            }
        }
        (sx / n, sy / n)
    }

    /// How far the object moved over the first `n` frames, in pixels.
    fn moved(f: &[Vec<u8>], n: usize) -> f64 {
        let (a, b) = (centre(&f[0]), centre(&f[n]));
        ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt()
    }

    #[test]
    fn the_generator_leaves_out_the_shift_it_is_told_to() {
        let corner = |f: &[u8]| [f[0], f[1], f[2]];
        let timing_only = Generator {
            target_appearance: false,
            ..Generator::default()
        };
        let appearance_only = Generator {
            target_onset: false,
            target_speed: false,
            ..Generator::default()
        };
        for i in 0..4 {
            // The default target: noisy stripes, a hold of at least 6 frames first.
            let t = clip_frames(&Generator::default(), "target", 1, i, 5);
            assert!(t.iter().any(|f| corner(f) != corner(&t[0])), "clip {i}");
            assert!(moved(&t, 5) < 3.5, "clip {i}: {}", moved(&t, 5));
            // Timing only: the source's flat grey without noise, the target's late onset.
            let t = clip_frames(&timing_only, "target", 1, i, 5);
            assert!(t.iter().all(|f| corner(f) == [30, 30, 30]), "clip {i}");
            assert!(moved(&t, 5) < 3.5, "clip {i}: {}", moved(&t, 5));
            // Appearance only: noisy stripes, but the signature from the first frame on.
            let t = clip_frames(&appearance_only, "target", 1, i, 5);
            assert!(t.iter().any(|f| corner(f) != corner(&t[0])), "clip {i}");
            assert!(moved(&t, 5) > 6.0, "clip {i}: {}", moved(&t, 5));
            // The source is the same clip under every one of the three.
            let s = clip_frames(&Generator::default(), "source", 1, i, 5);
            assert_eq!(s, clip_frames(&timing_only, "source", 1, i, 5));
            assert_eq!(s, clip_frames(&appearance_only, "source", 1, i, 5));
        }
    }

    #[test]
    fn a_varied_source_varies_within_its_family() {
        let varied = Generator {
            source_variety: true,
            ..Generator::default()
        };
        let grounds: std::collections::BTreeSet<u8> = (0..8)
            .map(|i| {
                let f = clip_frames(&varied, "source", 0, i, 2);
                let g = f[0][0];
                // Flat and grey, in every frame.
                assert!(f.iter().all(|x| x[..3] == [g, g, g]), "clip {i}");
                assert!((15..=60).contains(&g), "clip {i}: {g}");
                g
            })
            .collect();
        assert!(grounds.len() > 1, "{grounds:?}");
        // The target is the default generator's.
        assert_eq!(
            clip_frames(&varied, "target", 3, 1, 2),
            clip_frames(&Generator::default(), "target", 3, 1, 2)
        );
    }

    #[test]
    fn each_timing_factor_is_left_out_alone() {
        let with = |onset: bool, speed: bool| Generator {
            target_onset: onset,
            target_speed: speed,
            ..Generator::default()
        };
        let (a, b) = (Move::Right, Move::Up);
        for i in 0..20u64 {
            let rng = || ChaCha8Rng::seed_from_u64(i);
            let both = schedule(&with(true, true), true, a, b, &mut rng());
            let onset = schedule(&with(true, false), true, a, b, &mut rng());
            let speed = schedule(&with(false, true), true, a, b, &mut rng());
            let neither = schedule(&with(false, false), true, a, b, &mut rng());
            let (lead, fast) = (both[0].1, both[1].1);
            assert!(
                (6..=14).contains(&lead) && (6..=7).contains(&fast),
                "{both:?}"
            );
            // The same draws, each factor kept or set to the source's.
            assert_eq!(
                onset[..3],
                [(Move::Hold, lead), (a, 8), (b, 8)],
                "{onset:?}"
            );
            assert_eq!(
                speed[..3],
                [(Move::Hold, 0), (a, fast), (b, fast)],
                "{speed:?}"
            );
            assert_eq!(
                neither,
                schedule(&with(true, true), false, a, b, &mut rng())
            );
            for s in [&both, &onset, &speed, &neither] {
                assert_eq!(s.iter().map(|(_, n)| n).sum::<u32>(), FRAMES, "{s:?}");
            }
        }
    }
}
