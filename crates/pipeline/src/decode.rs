//! In-process decoding through ffmpeg-next: every frame, counted, resized, as packed RGB.
//!
//! Frame counts come from decoding, never from the container alone, and are compared with
//! what the container declares: FFmpeg ends a truncated AVI early without any error, so a
//! shortfall against the declared count is the only sign of it. Packets are read with
//! `Packet::read` rather than the packet iterator, which ends silently on read errors.

use std::path::Path;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling::{Context as Scaler, Flags};
use ffmpeg::util::frame::video::Video as VideoFrame;
use ffmpeg_next as ffmpeg;

use crate::error::DecodeError;

/// Default short side of stored frames, in pixels (smaller videos are never upscaled).
pub const DEFAULT_SHORT_SIDE: u32 = 256;

/// A decoded video may fall this far short of the container's declared frame count before it
/// counts as truncated: `max(DEFAULT_FRAME_SHORTFALL_ABS, declared * DEFAULT_FRAME_SHORTFALL_FRAC)`.
/// Real AVI headers are occasionally off by a frame or two (packed B-frames); truncation loses
/// far more.
pub const DEFAULT_FRAME_SHORTFALL_ABS: u64 = 2;
/// See [`DEFAULT_FRAME_SHORTFALL_ABS`].
pub const DEFAULT_FRAME_SHORTFALL_FRAC: f64 = 0.02;

/// Initialises FFmpeg once and silences its own logging (errors are reported through ours).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if ffmpeg::init().is_ok() {
            ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Quiet);
        }
    });
}

/// How frames are resized and how much of the file is read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeOptions {
    /// Resize so the shorter side is at most this (aspect kept, never upscaled).
    pub short_side: u32,
    /// Fail when decoding yields fewer frames than declared beyond the default tolerance;
    /// with `strict_frame_count`, any shortfall fails.
    pub strict_frame_count: bool,
    /// Stop once this many frames are decoded (the rest of the file is not needed). The
    /// truncation check then only applies if the file ends before that.
    pub stop_after_frames: Option<u64>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            short_side: DEFAULT_SHORT_SIDE,
            strict_frame_count: false,
            stop_after_frames: None,
        }
    }
}

/// A frame selector for [`decode_video`] that keeps every frame, or thins them to at most
/// `max_fps` per second.
pub fn select_max_fps(max_fps: Option<f64>) -> impl FnMut(u64, f64) -> bool {
    move |i, source_fps| keep_frame(i, source_fps, max_fps)
}

/// A frame handed to the caller: RGB24 rows of `stride` bytes (at least `3 * width`).
#[derive(Debug)]
pub struct RgbFrame<'a> {
    /// Index among all decoded frames of the source.
    pub source_frame: u32,
    /// Presentation time in seconds, when the stream has timestamps.
    pub time_secs: Option<f64>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per row in `rgb`.
    pub stride: usize,
    /// RGB bytes, `stride` per row.
    pub rgb: &'a [u8],
}

/// What decoding a whole video found.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeStats {
    /// Frames decoded from the source.
    pub decoded_frames: u32,
    /// Frames handed to the caller.
    pub kept_frames: u32,
    /// Whether the whole file was read (false when `stop_after_frames` ended it early).
    pub reached_end: bool,
    /// Frame count declared by the container, when it declares one.
    pub declared_frames: Option<u64>,
    /// Source frame rate.
    pub source_fps: f64,
    /// Source size.
    pub source_width: u32,
    /// Source size.
    pub source_height: u32,
    /// Output size.
    pub width: u32,
    /// Output size.
    pub height: u32,
    /// Non-fatal problems (decoder errors on some packets).
    pub warning: Option<String>,
}

/// Output size for a source of `w x h`: shorter side at most `short_side`, aspect kept.
pub fn output_size(w: u32, h: u32, short_side: u32) -> (u32, u32) {
    let short = w.min(h);
    if short <= short_side || short == 0 {
        return (w, h);
    }
    let scale = short_side as f64 / short as f64;
    let r = |v: u32| ((v as f64 * scale).round() as u32).max(1);
    if w <= h {
        (short_side, r(h))
    } else {
        (r(w), short_side)
    }
}

/// Whether decoded frame `i` is kept when thinning `source_fps` to at most `max_fps`.
pub fn keep_frame(i: u64, source_fps: f64, max_fps: Option<f64>) -> bool {
    match max_fps {
        Some(max) if source_fps > max && max > 0.0 => {
            let r = max / source_fps;
            i == 0 || ((i as f64) * r).floor() != ((i - 1) as f64 * r).floor()
        }
        _ => true,
    }
}

fn is_eagain(e: &ffmpeg::Error) -> bool {
    matches!(e, ffmpeg::Error::Other { errno } if *errno == ffmpeg::util::error::EAGAIN)
}

struct Converter {
    scaler: Scaler,
    src: (Pixel, u32, u32),
    out: VideoFrame,
}

/// Decodes every frame of `path` in order; frames for which `select(index, source_fps)`
/// is true are resized, converted to RGB and handed to `on_frame` (the others cost only
/// their decoding).
///
/// An error from `on_frame` stops decoding and is returned as [`DecodeError::Sink`].
pub fn decode_video<S, F>(
    path: &Path,
    opts: &DecodeOptions,
    mut select: S,
    mut on_frame: F,
) -> Result<DecodeStats, DecodeError>
where
    S: FnMut(u64, f64) -> bool,
    F: FnMut(&RgbFrame<'_>) -> Result<(), String>,
{
    init();
    let mut ictx = ffmpeg::format::input(path).map_err(|e| DecodeError::Open(e.to_string()))?;
    let stream = ictx
        .streams()
        .best(ffmpeg::media::Type::Video)
        .ok_or(DecodeError::NoVideoStream)?;
    let stream_index = stream.index();
    let declared = u64::try_from(stream.frames()).ok().filter(|&n| n > 0);
    let time_base = f64::from(stream.time_base());
    let rate = {
        let avg = stream.avg_frame_rate();
        if avg.numerator() > 0 && avg.denominator() > 0 {
            f64::from(avg)
        } else {
            let r = stream.rate();
            if r.numerator() > 0 && r.denominator() > 0 {
                f64::from(r)
            } else {
                0.0
            }
        }
    };
    let mut cctx = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| DecodeError::Codec(e.to_string()))?;
    // One decoding thread per video: prep runs one video per core.
    cctx.set_threading(ffmpeg::codec::threading::Config::count(1));
    let mut decoder = cctx
        .decoder()
        .video()
        .map_err(|e| DecodeError::Codec(e.to_string()))?;

    let mut conv: Option<Converter> = None;
    let mut decoded: u64 = 0;
    let mut kept: u32 = 0;
    let mut out_size = (0u32, 0u32);
    let mut src_size = (0u32, 0u32);
    let mut packet_errors = 0u32;
    let mut first_packet_error: Option<String> = None;
    let mut read_error: Option<String> = None;
    let mut frame = VideoFrame::empty();

    let mut drain = |decoder: &mut ffmpeg::decoder::Video,
                     conv: &mut Option<Converter>,
                     decoded: &mut u64,
                     kept: &mut u32,
                     out_size: &mut (u32, u32),
                     src_size: &mut (u32, u32)|
     -> Result<(), DecodeError> {
        loop {
            match decoder.receive_frame(&mut frame) {
                Ok(()) => {}
                Err(e) if is_eagain(&e) => return Ok(()),
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(e) => return Err(DecodeError::Decode(e.to_string())),
            }
            let i = *decoded;
            *decoded += 1;
            if !select(i, rate) {
                continue;
            }
            let (fw, fh, fmt) = (frame.width(), frame.height(), frame.format());
            if fw == 0 || fh == 0 {
                return Err(DecodeError::Decode(format!("frame {i} has size {fw}x{fh}")));
            }
            if conv.as_ref().is_none_or(|c| c.src != (fmt, fw, fh)) {
                let (ow, oh) = output_size(fw, fh, opts.short_side);
                let scaler = Scaler::get(fmt, fw, fh, Pixel::RGB24, ow, oh, Flags::BILINEAR)
                    .map_err(|e| DecodeError::Decode(format!("scaler {fw}x{fh} {fmt:?}: {e}")))?;
                *conv = Some(Converter {
                    scaler,
                    src: (fmt, fw, fh),
                    out: VideoFrame::empty(),
                });
                if src_size.0 == 0 {
                    *src_size = (fw, fh);
                    *out_size = (ow, oh);
                }
            }
            let Some(c) = conv.as_mut() else {
                return Err(DecodeError::Decode("no scaler".into()));
            };
            c.scaler
                .run(&frame, &mut c.out)
                .map_err(|e| DecodeError::Decode(format!("scaling frame {i}: {e}")))?;
            let time_secs = frame.timestamp().map(|t| t as f64 * time_base);
            on_frame(&RgbFrame {
                source_frame: i as u32,
                time_secs,
                width: c.out.width(),
                height: c.out.height(),
                stride: c.out.stride(0),
                rgb: c.out.data(0),
            })
            .map_err(DecodeError::Sink)?;
            *kept += 1;
        }
    };

    let mut packet = ffmpeg::Packet::empty();
    let mut stopped_early = false;
    loop {
        if opts.stop_after_frames.is_some_and(|n| decoded >= n) {
            stopped_early = true;
            break;
        }
        match packet.read(&mut ictx) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(e) if is_eagain(&e) => continue,
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
        if packet.stream() != stream_index {
            continue;
        }
        match decoder.send_packet(&packet) {
            Ok(()) => {}
            Err(e) if is_eagain(&e) => {}
            Err(e) => {
                // A damaged packet: FFmpeg's own tools log and go on; so do we, and the frame
                // count check below decides whether too much was lost.
                packet_errors += 1;
                first_packet_error.get_or_insert_with(|| e.to_string());
            }
        }
        drain(
            &mut decoder,
            &mut conv,
            &mut decoded,
            &mut kept,
            &mut out_size,
            &mut src_size,
        )?;
    }
    let _ = decoder.send_eof();
    drain(
        &mut decoder,
        &mut conv,
        &mut decoded,
        &mut kept,
        &mut out_size,
        &mut src_size,
    )?;

    if decoded == 0 {
        let why = read_error
            .or(first_packet_error)
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(DecodeError::NoFrames(why));
    }
    if let Some(d) = declared.filter(|_| !stopped_early) {
        let tolerance = if opts.strict_frame_count {
            0
        } else {
            DEFAULT_FRAME_SHORTFALL_ABS.max((d as f64 * DEFAULT_FRAME_SHORTFALL_FRAC) as u64)
        };
        if decoded + tolerance < d {
            let mut msg = format!("decoded {decoded} of {d} frames the container declares");
            if let Some(e) = read_error.as_ref().or(first_packet_error.as_ref()) {
                msg.push_str(&format!("; first error: {e}"));
            }
            return Err(DecodeError::Truncated(msg));
        }
    }
    if let Some(e) = read_error {
        return Err(DecodeError::Read(format!("after {decoded} frames: {e}")));
    }
    let warning = (packet_errors > 0).then(|| {
        format!(
            "{packet_errors} packet(s) failed to decode (first: {}); frame count still matches",
            first_packet_error.unwrap_or_default()
        )
    });
    Ok(DecodeStats {
        decoded_frames: decoded as u32,
        kept_frames: kept,
        reached_end: !stopped_early,
        declared_frames: declared,
        source_fps: rate,
        source_width: src_size.0,
        source_height: src_size.1,
        width: out_size.0,
        height: out_size.1,
        warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_keeps_aspect_and_never_upscales() {
        assert_eq!(output_size(320, 240, 256), (320, 240));
        assert_eq!(output_size(1920, 1080, 256), (455, 256));
        assert_eq!(output_size(1080, 1920, 256), (256, 455));
        assert_eq!(output_size(400, 300, 256), (341, 256));
        assert_eq!(output_size(100, 50, 256), (100, 50));
    }

    #[test]
    fn keep_frame_thins_to_max_fps() {
        let kept = (0..300)
            .filter(|&i| keep_frame(i, 30.0, Some(10.0)))
            .count();
        assert_eq!(kept, 100);
        let kept = (0..250)
            .filter(|&i| keep_frame(i, 25.0, Some(12.0)))
            .count();
        assert_eq!(kept, 120);
        assert!((0..50).all(|i| keep_frame(i, 25.0, None)));
        assert!((0..50).all(|i| keep_frame(i, 25.0, Some(30.0))));
    }
}
