//! How decoded YUV becomes the RGB a viewer sees: the colour matrix and range of the source,
//! its sample aspect ratio and its rotation.
//!
//! swscale converts with BT.601 limited-range coefficients unless told otherwise; a BT.709
//! source (every HD camera: PKU-MMD and NTU RGB+D at 1080p) then comes out with shifted
//! hues. ffmpeg-next does not expose `sws_setColorspaceDetails`, so this module calls it
//! through `ffmpeg-sys-next` (with `jpeg.rs` and `decode::damaged`, the only unsafe code in the
//! pipeline).
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

/// Expands a plane of limited-range ("TV", 16-235 luma, 16-240 chroma) samples to full
/// range (0-255, JPEG's), as BT.601 defines them: luma `(y - 16) * 255 / 219`, chroma
/// `(c - 128) * 255 / 224 + 128`, rounded to nearest and clamped. `src` has rows of `stride`
/// bytes; `dst` becomes `width x height` packed rows.
pub fn expand_limited_range(
    src: &[u8],
    stride: usize,
    width: usize,
    height: usize,
    luma: bool,
    dst: &mut Vec<u8>,
) {
    dst.resize(width * height, 0);
    let rows = dst
        .chunks_exact_mut(width.max(1))
        .zip(src.chunks(stride.max(1)));
    // `(d * scale + 2^15) >> 16` with `scale` = 255/219 or 255/224 in 16-bit fixed point is
    // `d + ((d * frac + 2^15) >> 16)`, `frac` the scale's fraction (10,773 or 9,070).
    // `d * frac >> 8` is the high half of the 16-bit product `(d << 8) * frac`, and
    // `((d * frac >> 8) + 128) >> 8` rounds it exactly as above: every step fits 16-bit
    // lanes (`pmulhuw` / `pmulhw`), where 32-bit products have no single SSE2 instruction.
    // Same bytes as the 32-bit formula for all 256 inputs (test below), three times faster.
    if luma {
        for (d, s) in rows {
            for (o, &v) in d.iter_mut().zip(&s[..width]) {
                // Below 16 the result clamps to 0, as `d = 0` gives.
                let d = u16::from(v.saturating_sub(16));
                let high = ((u32::from(d << 8) * 10_773) >> 16) as u16;
                *o = (d + ((high + 128) >> 8)).min(255) as u8;
            }
        }
    } else {
        for (d, s) in rows {
            for (o, &v) in d.iter_mut().zip(&s[..width]) {
                let d = i16::from(v) - 128;
                let high = ((i32::from(d << 8) * 9_070) >> 16) as i16;
                *o = (d + ((high + 128) >> 8) + 128).clamp(0, 255) as u8;
            }
        }
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
    fn limited_range_expansion_is_bt601_rounded_and_clamped() {
        let all: Vec<u8> = (0..=255).collect();
        for luma in [true, false] {
            let mut out = Vec::new();
            // Four rows of 64 out of a 70-byte stride.
            let src: Vec<u8> = all
                .chunks(64)
                .flat_map(|r| r.iter().copied().chain([7; 6]))
                .collect();
            expand_limited_range(&src, 70, 64, 4, luma, &mut out);
            assert_eq!(out.len(), 256);
            for (v, &o) in all.iter().zip(&out) {
                let v = f64::from(*v);
                let want = if luma {
                    (v - 16.0) * 255.0 / 219.0
                } else {
                    (v - 128.0) * 255.0 / 224.0 + 128.0
                };
                // Nearest (either neighbour of an exact tie, e.g. chroma 16 -> -0.5 + 1).
                let want = want.clamp(0.0, 255.0);
                assert!(
                    (f64::from(o) - want).abs() <= 0.5 + 1e-9,
                    "{v} (luma {luma}): {o} vs {want}"
                );
            }
        }
        // Byte for byte the 32-bit fixed-point formula of earlier versions (unchanged shards).
        for (luma, offset, scale, centre) in [(true, 16, 76_309, 0), (false, 128, 74_606, 128)] {
            let mut out = Vec::new();
            expand_limited_range(&all, 256, 256, 1, luma, &mut out);
            for (&v, &o) in all.iter().zip(&out) {
                let x = ((i32::from(v) - offset) * scale + (1 << 15)) >> 16;
                assert_eq!(
                    i32::from(o),
                    (x + centre).clamp(0, 255),
                    "{v} (luma {luma})"
                );
            }
        }
        let mut out = Vec::new();
        expand_limited_range(&[16, 235, 240], 3, 3, 1, true, &mut out);
        assert_eq!(out, [0, 255, 255]);
        expand_limited_range(&[16, 128, 240], 3, 3, 1, false, &mut out);
        assert_eq!(out, [0, 128, 255]);
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
                let crate::decode::Pixels::Rgb { data, stride } = f.pixels else {
                    return Err("not RGB".into());
                };
                for y in 0..f.height as usize {
                    all.extend_from_slice(&data[y * stride..y * stride + 3 * f.width as usize]);
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
        clip(dir, name, &[extra, &["-c:v", "libx264"]].concat())
    }

    /// A 1 s, 320x240, 25 fps clip of FFmpeg's colourful test pattern, encoded by `args`.
    fn clip(dir: &std::path::Path, name: &str, args: &[&str]) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut all = vec![
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25",
            "-t",
            "1",
        ];
        all.extend(args);
        all.push(p.to_str().unwrap());
        ffmpeg_cli(&all);
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

    /// Files as users have them beyond the datasets' own formats (phone and screen recordings,
    /// re-encoded downloads): 10-bit and 4:4:4 H.264 at an odd size, HEVC, VP9, AV1, PNG
    /// frames (RGB) and motion JPEG (full range) decode to the `ffmpeg` program's pixels, every
    /// frame, at their own size.
    #[test]
    fn uncommon_codecs_and_pixel_formats_decode_to_the_ffmpeg_programs_pixels() {
        let d = tempfile::tempdir().unwrap();
        let cases: [(&str, &[&str], (u32, u32)); 7] = [
            (
                "h264_10bit.mp4",
                &["-pix_fmt", "yuv420p10le", "-c:v", "libx264"],
                (320, 240),
            ),
            (
                "h264_444_odd.mp4",
                &[
                    "-vf",
                    "scale=321:241",
                    "-pix_fmt",
                    "yuv444p",
                    "-c:v",
                    "libx264",
                ],
                (321, 241),
            ),
            (
                "hevc.mp4",
                &[
                    "-c:v",
                    "libx265",
                    "-preset",
                    "ultrafast",
                    "-x265-params",
                    "log-level=error",
                ],
                (320, 240),
            ),
            (
                "vp9.webm",
                &[
                    "-c:v",
                    "libvpx-vp9",
                    "-deadline",
                    "realtime",
                    "-cpu-used",
                    "8",
                ],
                (320, 240),
            ),
            (
                "av1.mkv",
                &["-c:v", "libaom-av1", "-cpu-used", "8"],
                (320, 240),
            ),
            (
                "png_rgb.avi",
                &["-c:v", "png", "-pix_fmt", "rgb24"],
                (320, 240),
            ),
            (
                "mjpeg_full.avi",
                &["-c:v", "mjpeg", "-pix_fmt", "yuvj420p"],
                (320, 240),
            ),
        ];
        for (name, args, size) in cases {
            let v = clip(d.path(), name, args);
            let (rgb, w, h, s) = ours(&v);
            assert_eq!((w, h), size, "{name}");
            assert_eq!((s.decoded_frames, s.kept_frames), (25, 25), "{name}: {s:?}");
            let theirs = theirs(&v, "");
            assert_eq!(rgb.len(), theirs.len(), "{name}");
            let e = mean_abs(&rgb, &theirs);
            eprintln!("{name}: mean |ours - ffmpeg| {e:.3}");
            assert!(e < 1.0, "{name}: {e}");
        }
    }

    /// `video` through prep's encoder (JPEG q90) and back to packed RGB, with the decoder
    /// handing over YUV planes where it can (`yuv420`) or RGB only.
    fn through_jpeg(video: &std::path::Path, yuv420: bool) -> (Vec<u8>, u32) {
        let mut enc = crate::jpeg::JpegEncoder::new(90).unwrap();
        let mut all = Vec::new();
        let opts = crate::decode::DecodeOptions {
            yuv420,
            ..Default::default()
        };
        let stats = crate::decode::decode_video(
            video,
            &opts,
            |_, _| true,
            |f| {
                let jpeg = match f.pixels {
                    crate::decode::Pixels::Rgb { data, stride } => {
                        enc.encode_rgb(data, f.width, f.height, stride)?
                    }
                    crate::decode::Pixels::Yuv420 { planes, strides } => {
                        enc.encode_yuv420(planes, strides, f.width, f.height)?
                    }
                };
                let img = turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB)
                    .map_err(|e| e.to_string())?;
                assert_eq!(img.pitch, 3 * img.width);
                all.extend_from_slice(&img.pixels);
                Ok(())
            },
        )
        .unwrap();
        (all, stats.yuv420_frames)
    }

    /// Packed RGB frames of `w x h` encoded as JPEG q90 (from RGB) and decoded again.
    fn jpeg_round_trip(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
        let mut enc = crate::jpeg::JpegEncoder::new(90).unwrap();
        let frame = 3 * (w * h) as usize;
        rgb.chunks(frame)
            .flat_map(|f| {
                let jpeg = enc.encode_rgb(f, w, h, 3 * w as usize).unwrap();
                turbojpeg::decompress(&jpeg, turbojpeg::PixelFormat::RGB)
                    .unwrap()
                    .pixels
            })
            .collect()
    }

    #[test]
    fn jpeg_from_yuv_planes_matches_the_rgb_route_and_the_ffmpeg_program() {
        let d = tempfile::tempdir().unwrap();
        // (name, ffmpeg arguments, YUV route expected, a wrong reading of the source)
        let cases: [(&str, &[&str], bool, &str); 4] = [
            (
                "limited601.mp4",
                &["-vf", "format=yuv420p"],
                true,
                "scale=in_range=pc",
            ),
            // A limited-range reading of this one differs too little to test against (the
            // planes are checked exactly below).
            (
                "full601.mp4",
                &["-vf", "format=yuvj420p", "-color_range", "pc"],
                true,
                "",
            ),
            (
                "bt709.mp4",
                &["-vf", "format=yuv420p", "-colorspace", "bt709"],
                false,
                "scale=in_color_matrix=bt601",
            ),
            (
                "yuv422.mp4",
                &["-vf", "format=yuv422p"],
                false,
                "scale=in_range=pc",
            ),
        ];
        for (name, args, direct, wrong) in cases {
            let v = source(d.path(), name, args);
            let (via_yuv, n_yuv) = through_jpeg(&v, true);
            let (via_rgb, n_rgb) = through_jpeg(&v, false);
            assert_eq!(n_rgb, 0);
            assert_eq!(n_yuv, if direct { 25 } else { 0 }, "{name}");
            let reference = theirs(&v, "");
            let (e_yuv, e_rgb) = (
                mean_abs(&via_yuv, &reference),
                mean_abs(&via_rgb, &reference),
            );
            // The routes against each other, and against the `ffmpeg` program's wrong
            // reading of the source put through the same JPEG encoder (so JPEG's own loss,
            // a few levels on this sharp pattern, is on both sides).
            let between = mean_abs(&via_yuv, &via_rgb);
            let e_wrong = if wrong.is_empty() {
                f64::NAN
            } else {
                mean_abs(&via_yuv, &jpeg_round_trip(&theirs(&v, wrong), 320, 240))
            };
            eprintln!(
                "{name}: mean |jpeg - ffmpeg| via YUV {e_yuv:.3}, via RGB {e_rgb:.3}; \
                 YUV vs RGB route {between:.3}; against a wrong reading {e_wrong:.3}"
            );
            assert!(e_yuv <= e_rgb + 0.25, "{name}: {e_yuv} vs {e_rgb}");
            assert!(between < 1.5, "{name}: {between}");
            if !wrong.is_empty() {
                assert!(
                    e_wrong > 2.0 * between.max(0.5),
                    "{name}: {e_wrong} vs {between}"
                );
            }
            if !direct {
                assert_eq!(via_yuv, via_rgb, "{name}: not eligible, so the same bytes");
            }
        }
    }

    /// The planes decoding hands over with `yuv420` (Y, Cb, Cr of each frame, packed).
    fn our_planes(video: &std::path::Path) -> Vec<u8> {
        let mut all = Vec::new();
        let opts = crate::decode::DecodeOptions {
            yuv420: true,
            ..Default::default()
        };
        crate::decode::decode_video(
            video,
            &opts,
            |_, _| true,
            |f| {
                let crate::decode::Pixels::Yuv420 { planes, strides } = f.pixels else {
                    return Err("not YUV".into());
                };
                let (w, h) = (f.width as usize, f.height as usize);
                for (k, (pw, ph)) in [
                    (w, h),
                    (w.div_ceil(2), h.div_ceil(2)),
                    (w.div_ceil(2), h.div_ceil(2)),
                ]
                .into_iter()
                .enumerate()
                {
                    for y in 0..ph {
                        all.extend_from_slice(&planes[k][y * strides[k]..y * strides[k] + pw]);
                    }
                }
                Ok(())
            },
        )
        .unwrap();
        all
    }

    #[test]
    fn yuv_planes_are_the_decoders_own_in_full_range() {
        let d = tempfile::tempdir().unwrap();
        for (name, format, limited) in [("l.mp4", "yuv420p", true), ("f.mp4", "yuvj420p", false)] {
            let fmt = format!("format={format}");
            let mut args = vec!["-vf", fmt.as_str()];
            if !limited {
                args.extend(["-color_range", "pc"]);
            }
            let v = source(d.path(), name, &args);
            let raw = v.with_extension("yuv");
            ffmpeg_cli(&[
                "-i",
                v.to_str().unwrap(),
                "-vf",
                &fmt,
                "-f",
                "rawvideo",
                raw.to_str().unwrap(),
            ]);
            let theirs = std::fs::read(&raw).unwrap();
            let ours = our_planes(&v);
            assert_eq!(ours.len(), theirs.len(), "{name}");
            if limited {
                // Plane by plane of every frame (the raw file is Y, Cb, Cr of each frame).
                let mut want = Vec::new();
                let mut off = 0;
                while off < theirs.len() {
                    for (pw, ph, luma) in [(320, 240, true), (160, 120, false), (160, 120, false)] {
                        let mut out = Vec::new();
                        expand_limited_range(
                            &theirs[off..off + pw * ph],
                            pw,
                            pw,
                            ph,
                            luma,
                            &mut out,
                        );
                        want.extend(out);
                        off += pw * ph;
                    }
                }
                assert!(
                    ours == want,
                    "{name}: planes differ from FFmpeg's, expanded"
                );
                assert!(
                    ours != theirs,
                    "{name}: the expansion must change something"
                );
            } else {
                assert!(
                    ours == theirs,
                    "{name}: full-range planes are handed over as decoded"
                );
            }
        }
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
