//! How decoded YUV becomes the RGB a viewer sees: the colour matrix and range of the source,
//! its sample aspect ratio and its rotation.
//!
//! swscale converts with BT.601 limited-range coefficients unless told otherwise; a BT.709
//! source (every HD camera: PKU-MMD and NTU RGB+D at 1080p) then comes out with shifted
//! hues. ffmpeg-next does not expose `sws_setColorspaceDetails`, so this module calls it
//! through `ffmpeg-sys-next`: the only unsafe code in the pipeline.
#![allow(unsafe_code)]

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling::Context as Scaler;
use ffmpeg::util::color::{Range, Space};
use ffmpeg_next as ffmpeg;

/// A YUV to RGB matrix swscale knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matrix {
    /// ITU-R BT.601 (SD video; also SMPTE 170M and BT.470BG).
    Bt601,
    /// ITU-R BT.709 (HD video).
    Bt709,
    /// SMPTE 240M.
    Smpte240m,
    /// FCC.
    Fcc,
    /// ITU-R BT.2020 (non-constant luminance).
    Bt2020,
}

impl Matrix {
    /// The name stored in `videos.parquet` (`bt601`, `bt709`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Matrix::Bt601 => "bt601",
            Matrix::Bt709 => "bt709",
            Matrix::Smpte240m => "smpte240m",
            Matrix::Fcc => "fcc",
            Matrix::Bt2020 => "bt2020",
        }
    }

    fn sws(self) -> std::ffi::c_int {
        use ffmpeg::ffi;
        match self {
            Matrix::Bt601 => ffi::SWS_CS_ITU601,
            Matrix::Bt709 => ffi::SWS_CS_ITU709,
            Matrix::Smpte240m => ffi::SWS_CS_SMPTE240M,
            Matrix::Fcc => ffi::SWS_CS_FCC,
            Matrix::Bt2020 => ffi::SWS_CS_BT2020,
        }
    }
}

/// Sources at least this tall are HD: an untagged one is taken as BT.709, as players do.
pub const HD_MIN_HEIGHT: u32 = 720;

/// The colour interpretation of a source: what it says, or what is assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour {
    /// The matrix used.
    pub matrix: Matrix,
    /// Full range (0-255, JPEG) rather than limited (16-235, broadcast).
    pub full_range: bool,
    /// The matrix was not tagged in the file and was assumed from the height.
    pub assumed: bool,
}

impl Colour {
    /// From a frame's tags: an untagged matrix is BT.709 from [`HD_MIN_HEIGHT`] up and
    /// BT.601 below; an untagged range is full only for the JPEG pixel formats.
    pub fn of(space: Space, range: Range, format: Pixel, height: u32) -> Colour {
        let tagged = match space {
            Space::BT709 => Some(Matrix::Bt709),
            Space::BT470BG | Space::SMPTE170M => Some(Matrix::Bt601),
            Space::SMPTE240M => Some(Matrix::Smpte240m),
            Space::FCC => Some(Matrix::Fcc),
            Space::BT2020NCL | Space::BT2020CL => Some(Matrix::Bt2020),
            _ => None,
        };
        let matrix = tagged.unwrap_or(if height >= HD_MIN_HEIGHT {
            Matrix::Bt709
        } else {
            Matrix::Bt601
        });
        let full_range = match range {
            Range::JPEG => true,
            Range::MPEG => false,
            _ => matches!(
                format,
                Pixel::YUVJ420P | Pixel::YUVJ422P | Pixel::YUVJ444P | Pixel::YUVJ440P
            ),
        };
        Colour {
            matrix,
            full_range,
            assumed: tagged.is_none(),
        }
    }

    /// `"limited"` or `"full"`, as stored in `videos.parquet`.
    pub fn range_name(self) -> &'static str {
        if self.full_range { "full" } else { "limited" }
    }

    /// Makes `scaler` convert with this matrix and range, to full-range RGB.
    pub fn apply(self, scaler: &mut Scaler) -> Result<(), String> {
        // SAFETY: `scaler` owns a live SwsContext; sws_getCoefficients returns a pointer to
        // a static table for any argument; sws_setColorspaceDetails only reads the tables.
        let r = unsafe {
            let table = ffmpeg::ffi::sws_getCoefficients(self.matrix.sws());
            let rgb = ffmpeg::ffi::sws_getCoefficients(ffmpeg::ffi::SWS_CS_DEFAULT);
            ffmpeg::ffi::sws_setColorspaceDetails(
                scaler.as_mut_ptr(),
                table,
                std::ffi::c_int::from(self.full_range),
                rgb,
                1,
                0,
                1 << 16,
                1 << 16,
            )
        };
        if r < 0 {
            return Err(format!(
                "swscale refused the {} {} range conversion",
                self.matrix.name(),
                self.range_name()
            ));
        }
        Ok(())
    }
}

/// The clockwise rotation, in degrees (0, 90, 180 or 270), a display matrix asks for, as
/// the `ffmpeg` program's autorotation reads it; `None` for other angles or a bad matrix.
pub fn rotation_of_display_matrix(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < 36 {
        return None;
    }
    let m = |i: usize| {
        let b = [
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ];
        f64::from(i32::from_le_bytes(b)) / 65536.0
    };
    let (s0, s1) = (m(0).hypot(m(3)), m(1).hypot(m(4)));
    if s0 == 0.0 || s1 == 0.0 {
        return None;
    }
    // av_display_rotation_get: the counter-clockwise angle; autorotation turns it back.
    let ccw = -(m(1) / s1).atan2(m(0) / s0).to_degrees();
    let cw = (-ccw).round().rem_euclid(360.0);
    let r = cw as u32;
    [0, 90, 180, 270].contains(&r).then_some(r)
}

/// Rotates packed RGB rows (`stride` bytes each) of a `w x h` image clockwise by
/// `degrees` (0, 90, 180 or 270); returns the packed result and its size.
pub fn rotate_rgb(
    rgb: &[u8],
    w: usize,
    h: usize,
    stride: usize,
    degrees: u32,
) -> (Vec<u8>, usize, usize) {
    let (ow, oh) = if degrees % 180 == 90 { (h, w) } else { (w, h) };
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            // Source pixel shown at (x, y) after turning the image clockwise.
            let (sx, sy) = match degrees {
                90 => (y, h - 1 - x),
                180 => (w - 1 - x, h - 1 - y),
                270 => (w - 1 - y, x),
                _ => (x, y),
            };
            let s = sy * stride + sx * 3;
            let d = (y * ow + x) * 3;
            out[d..d + 3].copy_from_slice(&rgb[s..s + 3]);
        }
    }
    (out, ow, oh)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A display matrix turning by `deg` (16.16 fixed point, as in the MP4 `tkhd` box);
    /// which way is anchored to the `ffmpeg` program by the test on a real file below.
    fn matrix(deg: f64) -> Vec<u8> {
        let (s, c) = (-deg).to_radians().sin_cos();
        let fp = |v: f64| ((v * 65536.0).round() as i32).to_le_bytes();
        // av_display_rotation_set's layout.
        let vals = [
            fp(c),
            fp(-s),
            fp(0.0),
            fp(s),
            fp(c),
            fp(0.0),
            fp(0.0),
            fp(0.0),
            (1i32 << 30).to_le_bytes(),
        ];
        vals.concat()
    }

    #[test]
    fn display_matrix_angles() {
        assert_eq!(rotation_of_display_matrix(&matrix(0.0)), Some(0));
        assert_eq!(rotation_of_display_matrix(&matrix(90.0)), Some(90));
        assert_eq!(rotation_of_display_matrix(&matrix(-90.0)), Some(270));
        assert_eq!(rotation_of_display_matrix(&matrix(180.0)), Some(180));
        assert_eq!(rotation_of_display_matrix(&matrix(33.0)), None);
        assert_eq!(rotation_of_display_matrix(&[0u8; 8]), None);
    }

    #[test]
    fn rotations_compose_and_turn_clockwise() {
        // 3x2 image, pixel value = its index.
        let img: Vec<u8> = (0..6u8).flat_map(|i| [i, i, i]).collect();
        let (r90, w, h) = rotate_rgb(&img, 3, 2, 9, 90);
        assert_eq!((w, h), (2, 3));
        // Clockwise: the bottom-left pixel (3) goes to the top-left.
        let px: Vec<u8> = r90.chunks(3).map(|p| p[0]).collect();
        assert_eq!(px, [3, 0, 4, 1, 5, 2]);
        let (r180, ..) = rotate_rgb(&r90, 2, 3, 6, 90);
        assert_eq!(r180, rotate_rgb(&img, 3, 2, 9, 180).0);
        let (r270, ..) = rotate_rgb(&img, 3, 2, 9, 270);
        let (back, ..) = rotate_rgb(&r270, 2, 3, 6, 90);
        assert_eq!(back, img);
    }

    #[test]
    fn untagged_sources_follow_their_height() {
        let c = Colour::of(Space::Unspecified, Range::Unspecified, Pixel::YUV420P, 1080);
        assert_eq!(
            (c.matrix, c.full_range, c.assumed),
            (Matrix::Bt709, false, true)
        );
        let c = Colour::of(Space::Unspecified, Range::Unspecified, Pixel::YUVJ420P, 240);
        assert_eq!((c.matrix, c.full_range), (Matrix::Bt601, true));
        let c = Colour::of(Space::BT709, Range::MPEG, Pixel::YUV420P, 240);
        assert_eq!((c.matrix, c.assumed), (Matrix::Bt709, false));
    }

    /// Runs the `ffmpeg` program (scripts/setup installs it) with `args`.
    fn ffmpeg_cli(args: &[&str]) {
        let out = std::process::Command::new("ffmpeg")
            .args(["-y", "-loglevel", "error"])
            .args(args)
            .output()
            .expect("the ffmpeg program is needed for this test (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "ffmpeg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Our frames of `video` (packed RGB, frame after frame) and their size.
    fn ours(video: &std::path::Path) -> (Vec<u8>, u32, u32, crate::decode::DecodeStats) {
        let mut all = Vec::new();
        let mut size = (0, 0);
        let stats = crate::decode::decode_video(
            video,
            &crate::decode::DecodeOptions::default(),
            |_, _| true,
            |f| {
                size = (f.width, f.height);
                for y in 0..f.height as usize {
                    all.extend_from_slice(
                        &f.rgb[y * f.stride..y * f.stride + 3 * f.width as usize],
                    );
                }
                Ok(())
            },
        )
        .unwrap();
        (all, size.0, size.1, stats)
    }

    /// The `ffmpeg` program's frames of `video` as packed RGB, through `filter`.
    fn theirs(video: &std::path::Path, filter: &str) -> Vec<u8> {
        let raw = video.with_extension(format!("{}.rgb", filter.len()));
        let mut args = vec!["-i", video.to_str().unwrap()];
        if !filter.is_empty() {
            args.extend(["-vf", filter]);
        }
        args.extend([
            "-sws_flags",
            "bilinear",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            raw.to_str().unwrap(),
        ]);
        ffmpeg_cli(&args);
        std::fs::read(raw).unwrap()
    }

    fn mean_abs(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.len() as f64
    }

    /// A 1 s, 320x240 H.264 clip of FFmpeg's colourful test pattern, made by `extra` args.
    fn source(dir: &std::path::Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut args = vec![
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25",
            "-t",
            "1",
        ];
        args.extend(extra);
        args.extend(["-c:v", "libx264", p.to_str().unwrap()]);
        ffmpeg_cli(&args);
        p
    }

    #[test]
    fn tagged_bt709_and_full_range_sources_match_the_ffmpeg_program() {
        let d = tempfile::tempdir().unwrap();
        let bt709 = source(
            d.path(),
            "bt709.mp4",
            &[
                "-vf",
                "format=yuv420p",
                "-colorspace",
                "bt709",
                "-color_range",
                "tv",
            ],
        );
        let (rgb, w, h, s) = ours(&bt709);
        assert_eq!((w, h), (320, 240));
        let c = s.colour.unwrap();
        assert_eq!(
            (c.matrix, c.full_range, c.assumed),
            (Matrix::Bt709, false, false)
        );
        let e709 = mean_abs(&rgb, &theirs(&bt709, ""));
        let e601 = mean_abs(&rgb, &theirs(&bt709, "scale=in_color_matrix=bt601"));
        eprintln!(
            "bt709 source: mean |ours - ffmpeg| {e709:.3}; against a BT.601 reading {e601:.3}"
        );
        assert!(e709 < 1.0, "{e709}");
        assert!(
            e601 > 3.0 * e709.max(0.3),
            "the test must tell the matrices apart: {e601}"
        );

        let full = source(
            d.path(),
            "full.mp4",
            &["-vf", "format=yuvj420p", "-color_range", "pc"],
        );
        let (rgb, ..) = ours(&full);
        let e = mean_abs(&rgb, &theirs(&full, ""));
        let e_limited = mean_abs(&rgb, &theirs(&full, "scale=in_range=tv"));
        eprintln!("full-range source: {e:.3}; against a limited-range reading {e_limited:.3}");
        assert!(e < 1.0, "{e}");
        assert!(e_limited > 3.0 * e.max(0.3), "{e_limited}");
    }

    #[test]
    fn rotation_and_sample_aspect_match_the_ffmpeg_program() {
        let d = tempfile::tempdir().unwrap();
        let plain = source(d.path(), "plain.mp4", &["-vf", "format=yuv420p"]);
        let rot = d.path().join("rot.mp4");
        ffmpeg_cli(&[
            "-i",
            plain.to_str().unwrap(),
            "-c",
            "copy",
            "-metadata:s:v:0",
            "rotate=90",
            rot.to_str().unwrap(),
        ]);
        let (rgb, w, h, s) = ours(&rot);
        // FFmpeg 5.1's MP4 muxer stores `rotate=90` as a display matrix that its own
        // autorotation undoes with a quarter turn counter-clockwise.
        assert_eq!((w, h, s.rotation), (240, 320, 270));
        let e = mean_abs(&rgb, &theirs(&rot, ""));
        eprintln!("rotated source: {e:.3}");
        assert!(e < 1.0, "{e}");

        let sar = source(d.path(), "sar.mp4", &["-vf", "format=yuv420p,setsar=2/1"]);
        let (rgb, w, h, s) = ours(&sar);
        assert_eq!((w, h), (640, 240));
        assert_eq!(s.sample_aspect, 2.0);
        let e = mean_abs(&rgb, &theirs(&sar, "scale=iw*sar:ih"));
        eprintln!("2:1 pixels: {e:.3}");
        assert!(e < 2.0, "{e}");
    }
}
