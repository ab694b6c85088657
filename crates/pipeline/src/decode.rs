//! In-process decoding through ffmpeg-next: every frame, counted, resized, as packed RGB
//! (or, when asked and nothing but the range needs converting, as the decoder's 4:2:0 YUV
//! planes in JPEG's colour space: see [`DecodeOptions::yuv420`]).
//!
//! Frame counts come from decoding, never from the container alone. Whether a file is
//! complete is judged from evidence in the stream, not from one header field: FFmpeg ends
//! a truncated AVI, MP4 or WebM early without any error, so the decoded span (timestamps,
//! or frames over the frame rate) is compared with every duration the container declares
//! that is known to be exact for it (see [`declared_durations`]); a damaged last packet is
//! reported with it. A declared frame *count* is not such a truth: an AVI's header counts
//! time-base ticks (H.264 remuxed into AVI declares about twice its frames) and an MP4's
//! counts samples an edit list may cut. Packets are read with `Packet::read` rather than
//! the packet iterator, which ends silently on read errors.

use std::path::Path;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling::{Context as Scaler, Flags};
use ffmpeg::util::frame::video::Video as VideoFrame;
use ffmpeg_next as ffmpeg;

use crate::colour::{Colour, Matrix, expand_limited_range, rotate_rgb, rotation_of_display_matrix};
use crate::error::DecodeError;
use crate::stall::Watch;
use crate::unpack::Unpacker;

/// Default short side of stored frames, in pixels (smaller videos are never upscaled).
pub const DEFAULT_SHORT_SIDE: u32 = 256;

/// A decoded video may fall this far short of the container's declared duration before it
/// counts as truncated: `max(DEFAULT_FRAME_SHORTFALL_ABS frames,
/// DEFAULT_FRAME_SHORTFALL_FRAC x declared)`. Real AVI headers are occasionally off by a
/// frame or two (packed B-frames); truncation loses far more.
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

/// Versions of the libraries that decide the bytes prep writes: FFmpeg's (as loaded at run
/// time) and libjpeg-turbo's (as built against). They are part of the prep fingerprint, so
/// a resume never mixes shards from two decoders.
pub fn library_versions() -> std::collections::BTreeMap<String, String> {
    let v = |n: u32| format!("{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff);
    std::collections::BTreeMap::from([
        ("libavutil".to_owned(), v(ffmpeg::util::version())),
        ("libavcodec".to_owned(), v(ffmpeg::codec::version())),
        ("libavformat".to_owned(), v(ffmpeg::format::version())),
        (
            "libswscale".to_owned(),
            v(ffmpeg::software::scaling::version()),
        ),
        (
            "libjpeg-turbo".to_owned(),
            env!("VDG_LIBTURBOJPEG_VERSION").to_owned(),
        ),
    ])
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
    /// The caller needs the source frame rate (to thin frames with `--max-fps`): a file
    /// whose frame rate can be neither read nor derived fails instead of being kept whole.
    pub require_rate: bool,
    /// Hand a frame over as [`Pixels::Yuv420`] instead of RGB when that needs no
    /// conversion but the range: a 4:2:0 BT.601 source (tagged, or untagged below
    /// [`crate::colour::HD_MIN_HEIGHT`]) stored at its own size, square pixels, no rotation.
    /// Limited-range samples are expanded to full range, the rest is the decoder's own
    /// planes. JPEG stores exactly that colour space, so an encoder skips RGB altogether.
    pub yuv420: bool,
    /// The caller cuts clips out of the stream and judges the frames lost inside it clip by
    /// clip, from [`DecodeStats::lost_at`]: a loss shifts every later frame's index, so it
    /// concerns the clips from there on, not the others. Without it, losing more than
    /// max(2, 2 %) of the stream's packets fails the whole video. With it, the warning
    /// leaves out the lost frames, the damaged ones ([`Frame::damaged`]) and a change of
    /// resolution ([`DecodeStats::resized`]): the caller words them for each clip.
    pub lost_frames_per_clip: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            short_side: DEFAULT_SHORT_SIDE,
            strict_frame_count: false,
            stop_after_frames: None,
            require_rate: false,
            yuv420: false,
            lost_frames_per_clip: false,
        }
    }
}

/// A frame selector for [`decode_video`] that keeps every frame, or thins them to at most
/// `max_fps` per second.
pub fn select_max_fps(max_fps: Option<f64>) -> impl FnMut(u64, f64) -> bool {
    move |i, source_fps| keep_frame(i, source_fps, max_fps)
}

/// A frame handed to the caller.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Index among all decoded frames of the source.
    pub source_frame: u32,
    /// Presentation time in seconds, when the stream has timestamps.
    pub time_secs: Option<f64>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The decoder flagged the frame as decoded from damaged data (concealed errors, a
    /// missing reference, an invalid bitstream).
    pub damaged: bool,
    /// The pixels.
    pub pixels: Pixels<'a>,
}

/// A frame's pixels.
#[derive(Debug)]
pub enum Pixels<'a> {
    /// Packed RGB24 (full range), rows of `stride` bytes (at least `3 * width`).
    Rgb {
        /// The bytes, `stride` per row.
        data: &'a [u8],
        /// Bytes per row.
        stride: usize,
    },
    /// Planes Y, Cb, Cr of full-range BT.601 YCbCr (JPEG's colour space), the chroma
    /// planes `ceil(width / 2) x ceil(height / 2)`; rows of `strides[k]` bytes. Only with
    /// [`DecodeOptions::yuv420`].
    Yuv420 {
        /// Y, Cb, Cr.
        planes: [&'a [u8]; 3],
        /// Bytes per row of each plane.
        strides: [usize; 3],
    },
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
    /// Frame count declared by the container, when it declares one (informational: see the
    /// module docs for why it does not decide truncation).
    pub declared_frames: Option<u64>,
    /// The longest duration the container declares in a form exact for it, in seconds.
    pub declared_secs: Option<f64>,
    /// The span the decoded frames cover, in seconds (0 when the rate and timestamps are
    /// both unknown).
    pub decoded_secs: f64,
    /// Source frame rate (0 when neither declared nor derivable).
    pub source_fps: f64,
    /// Source size.
    pub source_width: u32,
    /// Source size.
    pub source_height: u32,
    /// Output size.
    pub width: u32,
    /// Output size.
    pub height: u32,
    /// The colour matrix and range the frames were converted with (of the first frame).
    pub colour: Option<Colour>,
    /// Sample (pixel) aspect ratio of the source; frames are resampled to square pixels.
    pub sample_aspect: f64,
    /// Clockwise rotation applied, from the stream's display matrix (0, 90, 180, 270).
    pub rotation: u32,
    /// Non-fatal problems (decoder errors on some packets).
    pub warning: Option<String>,
    /// How many of the frames handed over were [`Pixels::Yuv420`].
    pub yuv420_frames: u32,
    /// For each packet the decoder rejected (its frame lost), how many frames it had
    /// returned before: frame indices from there on are shifted by one more.
    pub lost_at: Vec<u64>,
    /// Frames lost at the stream's start without an error (packets before the first
    /// keyframe or parameter sets, which decoders drop silently): the smaller of the time
    /// from the first shown packet to the first decoded frame and the packets sent before
    /// it, less the decoder's reordering delay. Every frame index is shifted by this many.
    /// Not counted in [`DecodeStats::lost_at`].
    pub lost_at_start: u64,
    /// The first frame whose size differs from the first frame's, and the warning that
    /// says so.
    pub resized: Option<(u64, String)>,
}

/// The size frames are stored at: the source `w x h` with its sample aspect ratio made
/// square (the width stretched or the height, whichever grows) and its rotation applied,
/// then [`output_size`]. Returns the stored size and the size the scaler produces
/// (before rotation).
pub fn stored_size(
    w: u32,
    h: u32,
    sar: f64,
    rotation: u32,
    short_side: u32,
) -> ((u32, u32), (u32, u32)) {
    let (mut dw, mut dh) = (w, h);
    if sar.is_finite() && sar > 0.0 && (sar - 1.0).abs() > 1e-6 {
        if sar > 1.0 {
            dw = ((w as f64 * sar).round() as u32).max(1);
        } else {
            dh = ((h as f64 / sar).round() as u32).max(1);
        }
    }
    if rotation % 180 == 90 {
        std::mem::swap(&mut dw, &mut dh);
    }
    let out = output_size(dw, dh, short_side);
    let scaled = if rotation % 180 == 90 {
        (out.1, out.0)
    } else {
        out
    };
    (out, scaled)
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

fn positive(r: ffmpeg::Rational) -> Option<f64> {
    (r.numerator() > 0 && r.denominator() > 0).then(|| f64::from(r))
}

/// The frame rate of a stream as `av_guess_frame_rate` picks it: the real base rate
/// (`r_frame_rate`) unless it is implausibly high while the average is plausible. The
/// average alone misleads: H.264 remuxed into AVI averages ticks, not frames (50 for 25).
pub fn guess_frame_rate(r_frame_rate: ffmpeg::Rational, avg_frame_rate: ffmpeg::Rational) -> f64 {
    match (positive(r_frame_rate), positive(avg_frame_rate)) {
        (Some(r), Some(avg)) if r > 210.0 && avg < 70.0 => avg,
        (Some(r), _) => r,
        (None, Some(avg)) => avg,
        (None, None) => 0.0,
    }
}

/// A duration a container declares, and where it says so.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    /// Seconds.
    pub secs: f64,
    /// Where it comes from, for messages (`"the AVI header"`).
    pub source: &'static str,
    /// A container-wide duration of a file with other streams, which may outlast the video:
    /// only a large shortfall against it counts.
    pub loose: bool,
}

/// Parses Matroska's per-track `DURATION` tag (`HH:MM:SS.nnnnnnnnn`), as FFmpeg's muxer and
/// others write it.
pub fn parse_tag_duration(text: &str) -> Option<f64> {
    let mut parts = text.trim().split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || h < 0.0 || m < 0.0 || s < 0.0 {
        return None;
    }
    let secs = h * 3600.0 + m * 60.0 + s;
    (secs.is_finite() && secs > 0.0).then_some(secs)
}

/// What a container says about the video stream's length.
#[derive(Debug, Clone, Default)]
pub struct ContainerFacts<'a> {
    /// FFmpeg's demuxer name (`avi`, `matroska,webm`, `mov,mp4,m4a,3gp,3g2,mj2`).
    pub format_name: &'a str,
    /// Streams in the file.
    pub nb_streams: usize,
    /// The stream's duration, in seconds.
    pub stream_secs: Option<f64>,
    /// The stream's declared frame count.
    pub frames: Option<u64>,
    /// The stream's time base, in seconds.
    pub time_base: f64,
    /// Matroska's per-track `DURATION` tag, in seconds.
    pub tag_secs: Option<f64>,
    /// The container's duration, in seconds.
    pub container_secs: Option<f64>,
    /// The frame rate.
    pub fps: f64,
}

/// Every duration the container declares for the video stream that is exact for that
/// container:
/// - the stream duration (an MP4's honours its edit list; an AVI's is rebuilt from what is
///   present when the index is gone, so it is not enough on its own);
/// - for AVI, the header's length, which counts time-base ticks (`frames x time_base`) from
///   time 0;
/// - Matroska/WebM's per-track `DURATION` tag, else the segment duration (loose when the
///   file has other streams, which may be longer than the video);
/// - a frame count over the frame rate, only where nothing else is declared.
///
/// AVI and Matroska durations run from time 0, so a stream that starts late declares its
/// gap too: every declaration is compared with the time the last decoded frame ends
/// (never less than the span the decoded frames cover).
pub fn declared_durations(c: &ContainerFacts<'_>) -> Vec<Declared> {
    let is = |name: &str| c.format_name.split(',').any(|n| n == name);
    let mut out = Vec::new();
    let mut push = |secs: f64, source: &'static str, loose: bool| {
        if secs.is_finite() && secs > 0.0 {
            out.push(Declared {
                secs,
                source,
                loose,
            });
        }
    };
    if let Some(s) = c.stream_secs {
        push(s, "the stream duration", false);
    }
    if is("avi")
        && let Some(n) = c.frames
    {
        push(n as f64 * c.time_base, "the AVI header", false);
    }
    if let Some(s) = c.tag_secs {
        push(s, "the track's DURATION tag", false);
    }
    if c.stream_secs.is_none()
        && c.tag_secs.is_none()
        && let Some(s) = c.container_secs
    {
        push(s, "the container duration", c.nb_streams > 1);
    }
    if c.stream_secs.is_none()
        && c.tag_secs.is_none()
        && c.container_secs.is_none()
        && c.fps > 0.0
        && let Some(n) = c.frames
    {
        push(n as f64 / c.fps, "the declared frame count", false);
    }
    out
}

/// Sends a packet with `send`; when the decoder answers EAGAIN (its output is full),
/// drains it with `drain` and sends again, so no packet is ever dropped. Any other send
/// error is returned inside `Ok`; a drain error as `Err`.
pub fn send_with_retry<T, S, D, E>(
    ctx: &mut T,
    mut send: S,
    mut drain: D,
) -> Result<Result<(), ffmpeg::Error>, E>
where
    S: FnMut(&mut T) -> Result<(), ffmpeg::Error>,
    D: FnMut(&mut T) -> Result<(), E>,
{
    for _ in 0..64 {
        match send(ctx) {
            Err(e) if is_eagain(&e) => drain(ctx)?,
            r => return Ok(r),
        }
    }
    Ok(Err(ffmpeg::Error::Other {
        errno: ffmpeg::util::error::EAGAIN,
    }))
}

struct Converter {
    scaler: Scaler,
    src: (Pixel, u32, u32),
    out: VideoFrame,
    rotated: Vec<u8>,
}

/// Decodes every frame of `path` in order; frames for which `select(index, source_fps)`
/// is true are resized, converted to RGB (or to full-range YUV, see
/// [`DecodeOptions::yuv420`]) and handed to `on_frame` (the others cost only their
/// decoding).
///
/// Every frame is scaled to the output size of the first: a stream whose resolution
/// changes part-way keeps one size (a warning says so).
///
/// Fails unless `path` is a regular file or a link to one. A named pipe or a character
/// device with a video's name would otherwise be opened: the open of a pipe waits for a writer
/// forever, and no signal ends a run stuck in it (the stop flag is checked between videos).
fn regular_file(path: &Path) -> Result<(), DecodeError> {
    let meta = std::fs::metadata(path).map_err(|e| DecodeError::Open(e.to_string()))?;
    match not_regular(&meta) {
        None => Ok(()),
        Some(kind) => Err(DecodeError::NotAFile(kind)),
    }
}

/// What a path is when it is not a regular file ("a named pipe", "a device"...), or `None`.
pub(crate) fn not_regular(meta: &std::fs::Metadata) -> Option<&'static str> {
    if meta.is_file() {
        return None;
    }
    let ft = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return Some("a named pipe");
        }
        if ft.is_socket() {
            return Some("a socket");
        }
        if ft.is_char_device() || ft.is_block_device() {
            return Some("a device");
        }
    }
    Some(if ft.is_dir() {
        "a folder"
    } else {
        "another kind of file"
    })
}

/// An error from `on_frame` stops decoding and is returned as [`DecodeError::Sink`].
pub fn decode_video<S, F>(
    path: &Path,
    opts: &DecodeOptions,
    select: S,
    on_frame: F,
) -> Result<DecodeStats, DecodeError>
where
    S: FnMut(u64, f64) -> bool,
    F: FnMut(&Frame<'_>) -> Result<(), String>,
{
    decode_video_watched(path, opts, None, select, on_frame)
}

/// [`decode_video`], beating `watch` for every packet read and every frame decoded, and
/// giving up with [`DecodeError::Abandoned`] once it is abandoned: FFmpeg polls it around
/// its reads (its interrupt callback), this loop between packets.
pub fn decode_video_watched<S, F>(
    path: &Path,
    opts: &DecodeOptions,
    watch: Option<&std::sync::Arc<Watch>>,
    mut select: S,
    mut on_frame: F,
) -> Result<DecodeStats, DecodeError>
where
    S: FnMut(u64, f64) -> bool,
    F: FnMut(&Frame<'_>) -> Result<(), String>,
{
    init();
    regular_file(path)?;
    let abandoned = || watch.is_some_and(|w| w.is_abandoned());
    let opened = match watch {
        Some(w) => {
            let w = w.clone();
            ffmpeg::format::input_with_interrupt(path, move || w.is_abandoned())
        }
        None => ffmpeg::format::input(path),
    };
    let mut ictx = match opened {
        Ok(c) => c,
        Err(_) if abandoned() => return Err(DecodeError::Abandoned),
        Err(e) => return Err(DecodeError::Open(e.to_string())),
    };
    let beat = || {
        if let Some(w) = watch {
            w.beat();
        }
    };
    beat();
    let nb_streams = ictx.nb_streams() as usize;
    let format_name = ictx.format().name().to_owned();
    let container_secs = (ictx.duration() > 0)
        .then(|| ictx.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE));
    let stream = ictx
        .streams()
        .best(ffmpeg::media::Type::Video)
        .ok_or(DecodeError::NoVideoStream)?;
    let stream_index = stream.index();
    let declared = u64::try_from(stream.frames()).ok().filter(|&n| n > 0);
    let time_base = f64::from(stream.time_base());
    let stream_secs = (stream.duration() > 0).then(|| stream.duration() as f64 * time_base);
    let tag_duration = stream_tag(&stream, c"DURATION").and_then(|v| parse_tag_duration(&v));
    let rotation = stream
        .side_data()
        .find(|d| d.kind() == ffmpeg::codec::packet::side_data::Type::DisplayMatrix)
        .and_then(|d| rotation_of_display_matrix(d.data()))
        .unwrap_or(0);
    let mut rate = guess_frame_rate(stream.rate(), stream.avg_frame_rate());
    if rate <= 0.0
        && let (Some(n), Some(secs)) = (declared, stream_secs.or(container_secs))
    {
        rate = n as f64 / secs;
    }
    if opts.require_rate && rate <= 0.0 {
        return Err(DecodeError::NoFrameRate);
    }
    let declared_list = declared_durations(&ContainerFacts {
        format_name: &format_name,
        nb_streams,
        stream_secs,
        frames: declared,
        time_base,
        tag_secs: tag_duration,
        container_secs,
        fps: rate,
    });
    let nal_units = NalUnits::of(stream.parameters().id(), &extradata(&stream.parameters()));
    // MPEG-4 Part 2 goes through FFmpeg's unpacker of packed B-frames ([`crate::unpack`]).
    let mut unpacker = (stream.parameters().id() == ffmpeg::codec::Id::MPEG4)
        .then(|| Unpacker::new(&stream.parameters(), stream.time_base()))
        .transpose()
        .map_err(DecodeError::Codec)?;
    let mut cctx = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| DecodeError::Codec(e.to_string()))?;
    // One decoding thread per video: prep runs one video per core.
    cctx.set_threading(ffmpeg::codec::threading::Config::count(1));
    let mut decoder = cctx
        .decoder()
        .video()
        .map_err(|e| DecodeError::Codec(e.to_string()))?;

    struct State {
        conv: Option<Converter>,
        decoded: u64,
        kept: u32,
        out_size: (u32, u32),
        src_size: (u32, u32),
        scaled_size: (u32, u32),
        first_ts: Option<f64>,
        /// The very first decoded frame's time (`None` when it has none).
        head_ts: Option<f64>,
        /// Packets meant to be shown sent so far, and how many when the first frame came.
        shown_sent: u64,
        shown_sent_at_head: u64,
        last_ts: Option<f64>,
        resized: Option<(u64, String)>,
        colour: Option<Colour>,
        sar: f64,
        /// Full-range planes of the current frame, when its source is limited-range.
        yuv: [Vec<u8>; 3],
        yuv_frames: u32,
        /// Kept frames FFmpeg decoded from damaged data, and the first one's index.
        damaged: u32,
        first_damaged: Option<u64>,
    }
    let mut st = State {
        conv: None,
        decoded: 0,
        kept: 0,
        out_size: (0, 0),
        src_size: (0, 0),
        scaled_size: (0, 0),
        first_ts: None,
        head_ts: None,
        shown_sent: 0,
        shown_sent_at_head: 0,
        last_ts: None,
        resized: None,
        colour: None,
        sar: 1.0,
        yuv: Default::default(),
        yuv_frames: 0,
        damaged: 0,
        first_damaged: None,
    };
    let mut first_packet_error: Option<String> = None;
    // The stream's packets handed to the decoder, and how many frames it had returned when
    // each rejected one was sent.
    let mut packets_sent = 0u64;
    let mut lost_at: Vec<u64> = Vec::new();
    let mut read_error: Option<String> = None;
    // The last packet of the stream was cut short or failed to decode.
    let mut tail_damage: Option<String> = None;
    // Latest packet time: frames of H.264 in AVI carry none of their own.
    let mut last_packet_ts: Option<f64> = None;
    // Earliest time of a packet meant to be shown (an edit list's pre-roll is flagged
    // discard: decoded for reference, never shown).
    let mut first_packet_ts: Option<f64> = None;
    let mut frame = VideoFrame::empty();

    let mut drain = |decoder: &mut ffmpeg::decoder::Video,
                     st: &mut State|
     -> Result<(), DecodeError> {
        loop {
            match decoder.receive_frame(&mut frame) {
                Ok(()) => {}
                Err(e) if is_eagain(&e) => return Ok(()),
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(e) => return Err(DecodeError::Decode(e.to_string())),
            }
            beat();
            let i = st.decoded;
            st.decoded += 1;
            let time_secs = frame.timestamp().map(|t| t as f64 * time_base);
            if i == 0 {
                st.head_ts = time_secs;
                st.shown_sent_at_head = st.shown_sent;
            }
            if let Some(t) = time_secs {
                st.first_ts.get_or_insert(t);
                st.last_ts = Some(st.last_ts.map_or(t, |l: f64| l.max(t)));
            }
            let (fw, fh, fmt) = (frame.width(), frame.height(), frame.format());
            if fw == 0 || fh == 0 {
                return Err(DecodeError::Decode(format!("frame {i} has size {fw}x{fh}")));
            }
            if st.src_size.0 == 0 {
                st.src_size = (fw, fh);
                let sar = frame.aspect_ratio();
                st.sar = if sar.numerator() > 0 && sar.denominator() > 0 {
                    f64::from(sar)
                } else {
                    1.0
                };
                (st.out_size, st.scaled_size) =
                    stored_size(fw, fh, st.sar, rotation, opts.short_side);
                st.colour = Some(Colour::of(
                    frame.color_space(),
                    frame.color_range(),
                    fmt,
                    fh,
                ));
            } else if st.resized.is_none() && (fw, fh) != st.src_size {
                st.resized = Some((
                    i,
                    format!(
                        "resolution changes at frame {i} from {}x{} to {fw}x{fh}; every frame is \
                     scaled to {}x{}",
                        st.src_size.0, st.src_size.1, st.out_size.0, st.out_size.1
                    ),
                ));
            }
            if !select(i, rate) {
                continue;
            }
            let is_damaged = damaged(&frame);
            if is_damaged {
                st.damaged += 1;
                st.first_damaged.get_or_insert(i);
            }
            let direct = opts.yuv420
                && rotation == 0
                && (fw, fh) == st.scaled_size
                && matches!(fmt, Pixel::YUV420P | Pixel::YUVJ420P)
                && st.colour.is_some_and(|c| c.matrix == Matrix::Bt601);
            if direct {
                let (cw, ch) = (fw.div_ceil(2) as usize, fh.div_ceil(2) as usize);
                let (w, h) = (fw as usize, fh as usize);
                let full = st.colour.is_some_and(|c| c.full_range);
                let pixels = if full {
                    Pixels::Yuv420 {
                        planes: [frame.data(0), frame.data(1), frame.data(2)],
                        strides: [frame.stride(0), frame.stride(1), frame.stride(2)],
                    }
                } else {
                    for (k, (pw, ph)) in [(w, h), (cw, ch), (cw, ch)].into_iter().enumerate() {
                        expand_limited_range(
                            frame.data(k),
                            frame.stride(k),
                            pw,
                            ph,
                            k == 0,
                            &mut st.yuv[k],
                        );
                    }
                    Pixels::Yuv420 {
                        planes: [&st.yuv[0], &st.yuv[1], &st.yuv[2]],
                        strides: [w, cw, cw],
                    }
                };
                on_frame(&Frame {
                    source_frame: i as u32,
                    time_secs,
                    width: fw,
                    height: fh,
                    damaged: is_damaged,
                    pixels,
                })
                .map_err(DecodeError::Sink)?;
                st.kept += 1;
                st.yuv_frames += 1;
                continue;
            }
            if st.conv.as_ref().is_none_or(|c| c.src != (fmt, fw, fh)) {
                let (ow, oh) = st.scaled_size;
                let mut scaler = Scaler::get(fmt, fw, fh, Pixel::RGB24, ow, oh, Flags::BILINEAR)
                    .map_err(|e| DecodeError::Decode(format!("scaler {fw}x{fh} {fmt:?}: {e}")))?;
                if let Some(c) = st.colour {
                    c.apply(&mut scaler).map_err(DecodeError::Decode)?;
                }
                st.conv = Some(Converter {
                    scaler,
                    src: (fmt, fw, fh),
                    out: VideoFrame::empty(),
                    rotated: Vec::new(),
                });
            }
            let Some(c) = st.conv.as_mut() else {
                return Err(DecodeError::Decode("no scaler".into()));
            };
            c.scaler
                .run(&frame, &mut c.out)
                .map_err(|e| DecodeError::Decode(format!("scaling frame {i}: {e}")))?;
            let frame_out = if rotation == 0 {
                Frame {
                    source_frame: i as u32,
                    time_secs,
                    width: c.out.width(),
                    height: c.out.height(),
                    damaged: is_damaged,
                    pixels: Pixels::Rgb {
                        data: c.out.data(0),
                        stride: c.out.stride(0),
                    },
                }
            } else {
                let (w, h) = (c.out.width() as usize, c.out.height() as usize);
                let (rgb, rw, rh) = rotate_rgb(c.out.data(0), w, h, c.out.stride(0), rotation);
                c.rotated = rgb;
                Frame {
                    source_frame: i as u32,
                    time_secs,
                    width: rw as u32,
                    height: rh as u32,
                    damaged: is_damaged,
                    pixels: Pixels::Rgb {
                        data: &c.rotated,
                        stride: rw * 3,
                    },
                }
            };
            on_frame(&frame_out).map_err(DecodeError::Sink)?;
            st.kept += 1;
        }
    };

    let mut stopped_early = false;
    loop {
        if opts.stop_after_frames.is_some_and(|n| st.decoded >= n) {
            stopped_early = true;
            break;
        }
        // A new packet each time: ffmpeg-next's `Packet::read` does not unreference the
        // packet it reads into, so reusing one leaked every packet's data (memory grew with
        // the file: 200 MB for a 20-minute clip).
        let mut packet = ffmpeg::Packet::empty();
        let read = packet.read(&mut ictx);
        if abandoned() {
            return Err(DecodeError::Abandoned);
        }
        beat();
        match read {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(e) if is_eagain(&e) => continue,
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
        // An empty packet carries no frame; FFmpeg's own tool skips them too (sent, one with
        // no data would start the decoder's draining and lose the rest of the stream).
        if packet.stream() != stream_index || packet.size() == 0 {
            continue;
        }
        let packets = match unpacker.as_mut() {
            Some(u) => u.filter(packet).map_err(DecodeError::Decode)?,
            None => vec![packet],
        };
        for packet in packets {
            // Before the first frame, a packet of parameter sets or SEI alone (some AVI
            // muxers give them a chunk) is no picture: it neither starts the stream's time
            // nor is a frame lost if the decoder rejects it.
            let picture = st.decoded > 0
                || nal_units.is_none_or(|n| n.holds_picture(packet.data().unwrap_or_default()));
            let shown = picture && !discarded(&packet);
            if let Some(t) = packet.pts().or(packet.dts()) {
                let t = t as f64 * time_base;
                last_packet_ts = Some(last_packet_ts.map_or(t, |l| l.max(t)));
                if shown {
                    first_packet_ts = Some(first_packet_ts.map_or(t, |f| f.min(t)));
                }
            }
            packets_sent += 1;
            if shown {
                st.shown_sent += 1;
            }
            tail_damage = packet
                .is_corrupt()
                .then(|| "the last packet is cut short".to_owned());
            let sent = send_with_retry(
                &mut (&mut decoder, &mut st),
                |(d, _)| d.send_packet(&packet),
                |(d, s)| drain(d, s),
            )?;
            match sent {
                Ok(()) => {}
                Err(_) if !picture => {}
                Err(e) => {
                    // A damaged packet: FFmpeg's own tools log and go on; so do we, and the
                    // count of such packets below decides whether too many frames were lost.
                    lost_at.push(st.decoded);
                    first_packet_error.get_or_insert_with(|| e.to_string());
                    tail_damage = Some(format!("the last packet fails to decode ({e})"));
                }
            }
            drain(&mut decoder, &mut st)?;
        }
    }
    let _ = decoder.send_eof();
    drain(&mut decoder, &mut st)?;

    let decoded = st.decoded;
    let packet_errors = lost_at.len() as u64;
    if decoded == 0 {
        let why = read_error
            .or(first_packet_error)
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(DecodeError::NoFrames(why));
    }
    let interval = if rate > 0.0 { 1.0 / rate } else { 0.0 };
    let by_count = decoded as f64 * interval;
    let by_time = match (st.first_ts, st.last_ts) {
        (Some(a), Some(b)) if b >= a => b - a + interval,
        _ => 0.0,
    };
    let decoded_secs = by_count.max(by_time);
    // When the last frame ends, counted from time 0.
    let decoded_end = st
        .last_ts
        .into_iter()
        .chain(last_packet_ts)
        .fold(decoded_secs, |e, t| e.max(t + interval));
    let declared_secs = declared_list
        .iter()
        .filter(|d| !d.loose)
        .map(|d| d.secs)
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
    if !stopped_early && decoded_secs > 0.0 {
        let tolerance = |d: &Declared| {
            let base = if opts.strict_frame_count {
                0.5 * interval
            } else {
                (DEFAULT_FRAME_SHORTFALL_ABS as f64 * interval)
                    .max(d.secs * DEFAULT_FRAME_SHORTFALL_FRAC)
            };
            if d.loose {
                base.max(1.0).max(0.1 * d.secs)
            } else {
                base
            }
        };
        if let Some(d) = declared_list
            .iter()
            .filter(|d| decoded_end + tolerance(d) < d.secs)
            .max_by(|a, b| a.secs.total_cmp(&b.secs))
        {
            let mut msg = format!(
                "decoded {decoded} frames ending at {decoded_end:.2} s of the {:.2} s {} declares",
                d.secs, d.source
            );
            if let Some(t) = &tail_damage {
                msg.push_str(&format!("; {t}"));
            }
            if let Some(e) = read_error.as_ref().or(first_packet_error.as_ref()) {
                msg.push_str(&format!("; first error: {e}"));
            }
            return Err(DecodeError::Truncated(msg));
        }
    }
    if !stopped_early
        && declared_list.is_empty()
        && let Some(t) = &tail_damage
    {
        // Nothing declared to measure against: a damaged tail is the only evidence.
        return Err(DecodeError::Truncated(format!(
            "{t} after {decoded} frames, and the container declares no duration"
        )));
    }
    if let Some(e) = read_error {
        return Err(DecodeError::Read(format!("after {decoded} frames: {e}")));
    }
    // Frames lost inside the stream: a packet the decoder rejects outright yields no frame,
    // wherever it sits, and the duration check above only sees the end. Counted in packets,
    // not by timestamps, so the gaps of a variable-frame-rate source are not losses.
    let lost_tolerance = if opts.strict_frame_count {
        0
    } else {
        DEFAULT_FRAME_SHORTFALL_ABS
            .max((packets_sent as f64 * DEFAULT_FRAME_SHORTFALL_FRAC).floor() as u64)
    };
    // Frames lost at the start without an error: a stream cut before its first keyframe or
    // parameter sets decodes from the first point it can, and FFmpeg drops what comes
    // before. Measured twice, and the smaller taken, so that neither measure's blind spot
    // makes a loss of a good file: in time, from the first shown packet to the first
    // decoded frame (an AVI muxer can put a late stream's first packet at time 0), and in
    // packets, those sent before the first frame came (two fields of an interlaced frame
    // come in two packets). Each less the decoder's reordering delay (a frame of a stream
    // without presentation times, as AVI's, takes the time of the packet that completed
    // it, up to that many frames late) and the packets it rejected before any frame
    // (counted above).
    // SAFETY: `decoder` wraps a live, opened codec context; the field is a plain integer.
    #[allow(unsafe_code)]
    let reorder_delay = unsafe { (*decoder.as_ptr()).has_b_frames }.max(0) as u64;
    let rejected_first = lost_at.iter().take_while(|&&at| at == 0).count() as u64;
    let by_time = match (st.head_ts, first_packet_ts) {
        (Some(f), Some(p)) if rate > 0.0 && f > p => ((f - p) * rate).round() as u64,
        _ => 0,
    };
    let by_packets = st.shown_sent_at_head.saturating_sub(1);
    let lost_at_start = by_time
        .min(by_packets)
        .saturating_sub(reorder_delay)
        .saturating_sub(rejected_first);
    let head_note = match (st.head_ts, first_packet_ts) {
        (Some(f), Some(p)) if lost_at_start > 0 => Some(format!(
            "the stream's first {lost_at_start} frames could not be decoded (its first frame \
             is at {f:.2} s, its first packet at {p:.2} s: cut before a keyframe or the \
             parameter sets?)"
        )),
        _ => None,
    };
    if !opts.lost_frames_per_clip && packet_errors + lost_at_start > lost_tolerance {
        let rule = if opts.strict_frame_count {
            "--strict-frame-count".to_owned()
        } else {
            format!(
                "max({DEFAULT_FRAME_SHORTFALL_ABS}, {} %)",
                DEFAULT_FRAME_SHORTFALL_FRAC * 100.0
            )
        };
        let mut why: Vec<String> = head_note.into_iter().collect();
        if packet_errors > 0 {
            why.push(format!(
                "{packet_errors} of the stream's {packets_sent} packets failed to decode, so \
                 their frames are lost inside the stream (the first after {} decoded frames: {})",
                lost_at[0],
                first_packet_error.unwrap_or_default(),
            ));
        }
        return Err(DecodeError::Truncated(format!(
            "{}; {lost_tolerance} may be lost ({rule})",
            why.join("; ")
        )));
    }
    let mut warnings = Vec::new();
    if let Some(h) = head_note.filter(|_| !opts.lost_frames_per_clip) {
        warnings.push(format!("{h}; within the {lost_tolerance} tolerated"));
    }
    if packet_errors > 0 {
        if !opts.lost_frames_per_clip {
            warnings.push(format!(
                "{packet_errors} of the stream's {packets_sent} packets failed to decode (first, \
                 after {} decoded frames: {}), their frames lost; within the {lost_tolerance} \
                 tolerated",
                lost_at[0],
                first_packet_error.unwrap_or_default()
            ));
        }
    } else if let Some(t) = &tail_damage {
        warnings.push(format!("{t}; the decoded duration still matches"));
    }
    if st.damaged > 0 && !opts.lost_frames_per_clip {
        warnings.push(format!(
            "{} of the {} frames kept were decoded from damaged data, the decoder concealing \
             the errors (first: source frame {})",
            st.damaged,
            st.kept,
            st.first_damaged.unwrap_or_default()
        ));
    }
    if !opts.lost_frames_per_clip {
        warnings.extend(st.resized.as_ref().map(|r| r.1.clone()));
    }
    Ok(DecodeStats {
        decoded_frames: decoded as u32,
        kept_frames: st.kept,
        reached_end: !stopped_early,
        declared_frames: declared,
        declared_secs,
        decoded_secs,
        source_fps: rate,
        source_width: st.src_size.0,
        source_height: st.src_size.1,
        width: st.out_size.0,
        height: st.out_size.1,
        colour: st.colour,
        sample_aspect: st.sar,
        rotation,
        warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
        yuv420_frames: st.yuv_frames,
        lost_at,
        lost_at_start,
        resized: st.resized,
    })
}

/// How an H.264 or HEVC stream's packets delimit their NAL units: start codes (Annex B:
/// AVI, MPEG-TS, raw streams) or a big-endian length of this many bytes (MP4, Matroska, and
/// AVIs remuxed from them, whose extradata is an `avcC`/`hvcC` record, version byte 1).
#[derive(Debug, Clone, Copy, PartialEq)]
enum NalUnits {
    AnnexB { hevc: bool },
    Sized { hevc: bool, len: usize },
}

impl NalUnits {
    /// The framing of a stream of `codec` with `extradata`; `None` for other codecs.
    fn of(codec: ffmpeg::codec::Id, extradata: &[u8]) -> Option<NalUnits> {
        let hevc = match codec {
            ffmpeg::codec::Id::H264 => false,
            ffmpeg::codec::Id::HEVC => true,
            _ => return None,
        };
        // The length size's field: byte 4 of `avcC`, byte 21 of `hvcC`.
        let at = if hevc { 21 } else { 4 };
        Some(match extradata {
            [1, ..] if extradata.len() > at => NalUnits::Sized {
                hevc,
                len: usize::from(extradata[at] & 3) + 1,
            },
            _ => NalUnits::AnnexB { hevc },
        })
    }

    /// Whether `data` holds a coded picture (a VCL NAL unit) rather than only parameter
    /// sets or SEI. Anything it cannot parse counts as a picture.
    fn holds_picture(self, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        let vcl = |hevc: bool, header: u8| {
            if hevc {
                (header >> 1) & 0x3f < 32
            } else {
                (1..=5).contains(&(header & 0x1f))
            }
        };
        match self {
            NalUnits::AnnexB { hevc } => {
                if !(data.starts_with(&[0, 0, 1]) || data.starts_with(&[0, 0, 0, 1])) {
                    return true;
                }
                data.windows(4)
                    .filter(|w| w[..3] == [0, 0, 1])
                    .any(|w| vcl(hevc, w[3]))
            }
            NalUnits::Sized { hevc, len } => {
                let mut at = 0;
                while at < data.len() {
                    let Some(size) = data.get(at..at + len) else {
                        return true;
                    };
                    let size = size.iter().fold(0usize, |n, &b| n << 8 | usize::from(b));
                    let Some(&header) = data.get(at + len) else {
                        return true;
                    };
                    if size == 0 || vcl(hevc, header) {
                        return true;
                    }
                    at += len + size;
                }
                false
            }
        }
    }
}

/// The codec parameters' extradata (empty when there is none).
#[allow(unsafe_code)]
fn extradata(params: &ffmpeg::codec::Parameters) -> Vec<u8> {
    // SAFETY: `params` wraps live codec parameters; `extradata` holds `extradata_size`
    // bytes when it is not null. The bytes are copied out.
    unsafe {
        let p = params.as_ptr();
        let (data, size) = ((*p).extradata, (*p).extradata_size);
        if data.is_null() || size <= 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data, size as usize).to_vec()
        }
    }
}

/// The value of the stream's tag `key` (matched as FFmpeg matches, ignoring ASCII case), its
/// bytes read as UTF-8 with the invalid ones replaced. Tags hold whatever the muxer wrote
/// (HMDB51's AVIs are known to carry text that is not UTF-8), and ffmpeg-next's dictionary
/// hands every entry out as a `&str` without checking it, so no entry goes through it.
#[allow(unsafe_code)]
fn stream_tag(stream: &ffmpeg::format::stream::Stream<'_>, key: &std::ffi::CStr) -> Option<String> {
    // SAFETY: `stream` wraps a live AVStream of the open input; `av_dict_get` only reads its
    // metadata (null when there is none) and returns an entry of it or null; the entry's value
    // is a NUL-terminated string owned by the dictionary, copied out before returning.
    unsafe {
        let entry = ffmpeg::ffi::av_dict_get(
            (*stream.as_ptr()).metadata,
            key.as_ptr(),
            std::ptr::null(),
            0,
        );
        (!entry.is_null() && !(*entry).value.is_null()).then(|| {
            std::ffi::CStr::from_ptr((*entry).value)
                .to_string_lossy()
                .into_owned()
        })
    }
}

/// Whether the demuxer flagged `packet` to be decoded but not shown (the pre-roll before an
/// MP4 edit list's start). ffmpeg-next's packet flags leave this one out.
#[allow(unsafe_code)]
fn discarded(packet: &ffmpeg::Packet) -> bool {
    // SAFETY: `packet` wraps a live AVPacket just read; the field is a plain integer.
    use ffmpeg::packet::Ref;
    unsafe { (*packet.as_ptr()).flags & ffmpeg::ffi::AV_PKT_FLAG_DISCARD != 0 }
}

/// Whether the decoder flagged `frame` as decoded from damaged data (`decode_error_flags`:
/// an invalid bitstream, a missing reference, or errors it concealed, e.g. an MPEG-4 frame
/// whose damaged macroblocks it filled from their neighbours). FFmpeg outputs such frames
/// without an error; ffmpeg-next has no accessor for the field.
#[allow(unsafe_code)]
fn damaged(frame: &VideoFrame) -> bool {
    // SAFETY: `frame` wraps a live AVFrame the decoder has just filled; the field is a
    // plain integer read in place.
    unsafe { (*frame.as_ptr()).decode_error_flags != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named pipe or a link to a device with a video's name fails at once, naming what it
    /// is, instead of blocking the decoder (run on a helper thread, so that a regression
    /// fails the test rather than hanging it).
    #[cfg(unix)]
    #[test]
    fn a_named_pipe_or_a_device_is_refused_without_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("v_Punch_g01_c01.avi");
        crate::testutil::mkfifo(&fifo);
        let dev = dir.path().join("v_Punch_g02_c01.avi");
        std::os::unix::fs::symlink("/dev/zero", &dev).unwrap();
        for (path, kind) in [(fifo, "a named pipe"), (dev, "a device")] {
            let got = crate::testutil::within(60, &format!("decoding {kind}"), move || {
                decode_video(&path, &DecodeOptions::default(), |_, _| true, |_| Ok(()))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            let err = got.expect_err(kind);
            assert!(
                err.contains(kind) && err.contains("not a regular file"),
                "{err}"
            );
        }
    }

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

    use crate::encode::{
        VideoWriter, pattern_frame, remux, remux_without_head, write_pattern_video,
    };

    fn decode_all(path: &Path) -> Result<DecodeStats, DecodeError> {
        decode_video(path, &DecodeOptions::default(), |_, _| false, |_| Ok(()))
    }

    /// The first `frac` of `src`'s bytes, as a download or copy cut short leaves it.
    fn cut(src: &Path, frac: f64) -> std::path::PathBuf {
        let bytes = std::fs::read(src).unwrap();
        let dst = src.with_file_name(format!(
            "cut-{}",
            src.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&dst, &bytes[..(bytes.len() as f64 * frac) as usize]).unwrap();
        dst
    }

    /// A clean H.264 stream with B-frames (100 frames at 25 fps) in `ext`: NUT stores the
    /// encoder's packets as they are (Annex B, as AVI needs them), Matroska as MP4 needs.
    fn h264_source(dir: &Path, ext: &str) -> std::path::PathBuf {
        let p = dir.join(format!("clean.{ext}"));
        let mut w = VideoWriter::create_with_b_frames(&p, "libx264", 96, 64, 25, 2).unwrap();
        for t in 0..100 {
            w.write_rgb(&pattern_frame(96, 64, t, 3)).unwrap();
        }
        w.finish().unwrap();
        p
    }

    /// Tags that are not UTF-8 (HMDB51's AVIs are known to carry such text) are read with the
    /// bad bytes replaced, found whatever the case of their key, and such a video decodes
    /// whole; Matroska's DURATION tag is read through the same path.
    #[test]
    fn tags_that_are_not_utf8_are_read_lossily_and_the_video_is_complete() {
        use std::os::unix::ffi::OsStrExt;
        init();
        let d = tempfile::tempdir().unwrap();
        let src = h264_source(d.path(), "mkv");
        for (ext, codec) in [("mkv", "copy"), ("avi", "mpeg4")] {
            let out = d.path().join(format!("latin1.{ext}"));
            let ok = std::process::Command::new("ffmpeg")
                .args(["-v", "error", "-y", "-i"])
                .arg(&src)
                .args(["-c:v", codec, "-metadata:s:v:0"])
                .arg(std::ffi::OsStr::from_bytes(b"title=caf\xe9 \xff"))
                .arg(&out)
                .status()
                .unwrap()
                .success();
            assert!(ok, "ffmpeg could not write {ext}");
            let input = ffmpeg::format::input(&out).unwrap();
            let stream = input.streams().best(ffmpeg::media::Type::Video).unwrap();
            assert_eq!(
                stream_tag(&stream, c"title").as_deref(),
                Some("caf\u{fffd} \u{fffd}"),
                "{ext}"
            );
            assert_eq!(stream_tag(&stream, c"TITLE"), stream_tag(&stream, c"title"));
            assert_eq!(stream_tag(&stream, c"no-such-tag"), None);
            if ext == "mkv" {
                let secs = stream_tag(&stream, c"duration").and_then(|v| parse_tag_duration(&v));
                assert!(secs.is_some_and(|s| (s - 4.0).abs() < 0.05), "{secs:?}");
            }
            let stats = decode_all(&out).unwrap();
            assert_eq!(
                (stats.decoded_frames, stats.reached_end),
                (100, true),
                "{ext}"
            );
        }
    }

    #[test]
    fn a_watched_decode_beats_as_it_goes_and_stops_once_abandoned() {
        use crate::stall::Watch;
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.avi");
        write_pattern_video(&p, "mpeg4", 64, 48, 25, 30, 0).unwrap();
        let opts = DecodeOptions::default();

        // Every packet read and every frame decoded is a beat.
        let w = Arc::new(Watch::new());
        let s = decode_video_watched(&p, &opts, Some(&w), |_, _| true, |_| Ok(())).unwrap();
        assert_eq!(s.decoded_frames, 30);
        assert!(w.beats() >= 60, "{} beats", w.beats());

        // Abandoned part-way: decoding stops at the next packet, with its own error.
        let w = Arc::new(Watch::new());
        let mut frames = 0;
        let err = decode_video_watched(
            &p,
            &opts,
            Some(&w),
            |_, _| true,
            |_| {
                frames += 1;
                if frames == 5 {
                    w.abandon();
                }
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err, DecodeError::Abandoned);
        assert!(
            frames < 8,
            "{frames} frames handed over after abandoning at 5"
        );

        // Abandoned before it starts: FFmpeg's own reads give up (its interrupt callback),
        // so the file is not even opened (no beat, which follows the opening).
        let w = Arc::new(Watch::new());
        w.abandon();
        let err = decode_video_watched(&p, &opts, Some(&w), |_, _| true, |_| Ok(())).unwrap_err();
        assert_eq!(err, DecodeError::Abandoned);
        assert_eq!(w.beats(), 0);
    }

    #[test]
    fn frames_lost_at_the_start_of_the_stream_are_counted() {
        let d = tempfile::tempdir().unwrap();
        // Annex B for AVI, as MP4 and Matroska need it otherwise.
        let (annex_b, mp4_style) = (h264_source(d.path(), "nut"), h264_source(d.path(), "mkv"));
        let strict = DecodeOptions {
            strict_frame_count: true,
            ..DecodeOptions::default()
        };
        let per_clip = DecodeOptions {
            lost_frames_per_clip: true,
            ..DecodeOptions::default()
        };
        for ext in ["avi", "mp4", "mkv"] {
            let src = if ext == "avi" { &annex_b } else { &mp4_style };
            // Whole: nothing lost, even under --strict-frame-count (AVI's frames take the
            // time of the packet that completed them, two B-frames late here).
            let whole = d.path().join(format!("whole.{ext}"));
            remux(src, &whole, 0.0).unwrap();
            let s = decode_video(&whole, &strict, |_, _| false, |_| Ok(())).unwrap();
            assert_eq!(
                (s.decoded_frames, s.lost_at_start),
                (100, 0),
                "{ext}: {s:?}"
            );
            assert!(s.warning.is_none(), "{ext}: {s:?}");

            // Cut after its first keyframe: the packets up to the next one are dropped by
            // the decoder without an error, and counted now.
            let cut = d.path().join(format!("head.{ext}"));
            remux_without_head(src, &cut, 3).unwrap();
            let s = decode_video(&cut, &per_clip, |_, _| false, |_| Ok(())).unwrap();
            // Frames 12-99 decode (the next keyframe is frame 12): 9 of the 97 packets left
            // cannot be. Counted 9 here in AVI, 8 in MP4 and Matroska: the allowance for the
            // decoder's reordering (two frames) may take up to that many off.
            assert_eq!(s.decoded_frames, 88, "{ext}: {s:?}");
            assert!((7..=9).contains(&s.lost_at_start), "{ext}: {s:?}");
            assert!(s.warning.is_none(), "{ext}: {s:?}");
            let err = decode_all(&cut).unwrap_err();
            assert!(
                matches!(&err, DecodeError::Truncated(m)
                    if m.contains(&format!("first {} frames could not be decoded", s.lost_at_start))),
                "{ext}: {err}"
            );
        }
    }

    #[test]
    fn nal_units_tell_pictures_from_parameter_sets_in_both_framings() {
        use ffmpeg::codec::Id;
        let annex_b = NalUnits::of(Id::H264, &[]).unwrap();
        assert_eq!(annex_b, NalUnits::AnnexB { hevc: false });
        // SPS (7), PPS (8), SEI (6): no picture; with an IDR slice (5) or a slice (1): one.
        let sets = [
            &[0, 0, 0, 1, 0x67, 9, 9][..],
            &[0, 0, 1, 0x68, 9],
            &[0, 0, 1, 0x06, 9],
        ]
        .concat();
        assert!(!annex_b.holds_picture(&sets));
        assert!(annex_b.holds_picture(&[&sets[..], &[0, 0, 1, 0x65, 9]].concat()));
        assert!(annex_b.holds_picture(&[0, 0, 1, 0x41, 9]));
        // Length-prefixed (`avcC`, 4-byte lengths): a length of 256-511 bytes begins with
        // 00 00 01, which must not be read as a start code.
        let sized = NalUnits::of(Id::H264, &[1, 0x64, 0, 0x1f, 0xff, 0xe1]).unwrap();
        assert_eq!(
            sized,
            NalUnits::Sized {
                hevc: false,
                len: 4
            }
        );
        let mut slice = vec![0, 0, 1, 0x2c, 0x41];
        slice.resize(4 + 0x12c, 0);
        assert!(sized.holds_picture(&slice));
        let mut sei = vec![0, 0, 1, 0x2c, 0x06];
        sei.resize(4 + 0x12c, 0);
        assert!(!sized.holds_picture(&sei));
        assert!(sized.holds_picture(&[sei.clone(), slice.clone()].concat()));
        // HEVC: VPS (32), SPS (33) no picture; an IDR slice (19) one. Other codecs: none.
        let hevc = NalUnits::of(Id::HEVC, &[]).unwrap();
        assert!(!hevc.holds_picture(&[0, 0, 1, 32 << 1, 1, 0, 0, 1, 33 << 1, 1]));
        assert!(hevc.holds_picture(&[0, 0, 1, 19 << 1, 1]));
        assert_eq!(NalUnits::of(Id::MPEG4, &[]), None);
    }

    /// Parameter sets in an AVI chunk of their own: the decoder rejects that chunk (no
    /// picture in it), but no frame is lost, at the start or inside the stream.
    #[test]
    fn parameter_sets_in_a_chunk_of_their_own_lose_no_frame() {
        let d = tempfile::tempdir().unwrap();
        let strict = DecodeOptions {
            strict_frame_count: true,
            ..DecodeOptions::default()
        };
        for b_frames in [0, 2] {
            let nut = d.path().join(format!("src{b_frames}.nut"));
            let mut w =
                VideoWriter::create_with_b_frames(&nut, "libx264", 96, 64, 25, b_frames).unwrap();
            for t in 0..100 {
                w.write_rgb(&pattern_frame(96, 64, t, 3)).unwrap();
            }
            w.finish().unwrap();
            let avi = d.path().join(format!("split{b_frames}.avi"));
            let sets = crate::encode::split_parameter_sets(&nut, &avi).unwrap();
            assert!(sets > 0);
            let s = decode_video(&avi, &strict, |_, _| false, |_| Ok(()))
                .unwrap_or_else(|e| panic!("{b_frames} B-frames: {e}"));
            assert_eq!(s.decoded_frames, 100, "{s:?}");
            assert!(s.lost_at.is_empty() && s.lost_at_start == 0, "{s:?}");
            assert!(s.warning.is_none(), "{s:?}");
        }
    }

    #[test]
    fn h264_remuxed_into_avi_is_complete_and_its_cut_copy_is_truncated() {
        let d = tempfile::tempdir().unwrap();
        let avi = d.path().join("remux.avi");
        remux(&h264_source(d.path(), "nut"), &avi, 0.0).unwrap();
        let s = decode_all(&avi).unwrap();
        assert_eq!(s.decoded_frames, 100);
        // The trap: the header counts time-base ticks, about twice the frames.
        assert!(s.declared_frames.unwrap() >= 190, "{s:?}");
        assert_eq!(s.source_fps, 25.0, "the average rate counts ticks too");
        assert!((s.decoded_secs - 4.0).abs() < 1e-6, "{s:?}");
        assert!(s.warning.is_none(), "{s:?}");
        let err = decode_all(&cut(&avi, 0.6)).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Truncated(m) if m.contains("AVI header")),
            "{err}"
        );
    }

    #[test]
    fn webm_cut_where_the_demuxer_sees_a_clean_end_is_truncated() {
        let d = tempfile::tempdir().unwrap();
        let webm = d.path().join("clip.webm");
        write_pattern_video(&webm, "libvpx-vp9", 96, 64, 25, 100, 1).unwrap();
        let s = decode_all(&webm).unwrap();
        assert_eq!((s.decoded_frames, s.declared_frames), (100, None));
        let err = decode_all(&cut(&webm, 0.6)).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated(_)), "{err}");
    }

    #[test]
    fn mp4_edit_list_that_drops_frames_is_complete_and_a_cut_copy_is_not() {
        let d = tempfile::tempdir().unwrap();
        let src = h264_source(d.path(), "mkv");
        // Moving every timestamp 1 s earlier gives the first 25 frames negative times: the
        // MP4 muxer writes an edit list that starts the presentation at 0, and the sample
        // table still counts all 100.
        let mp4 = d.path().join("edit.mp4");
        remux(&src, &mp4, 1.0).unwrap();
        let s = decode_all(&mp4).unwrap();
        assert!(s.decoded_frames < 100, "{s:?}");
        assert_eq!(s.declared_frames, Some(100));
        assert!(s.warning.is_none(), "{s:?}");
        // A plain MP4 with its index in front, cut short: the index still declares 4 s.
        let mp4 = d.path().join("plain.mp4");
        remux(&src, &mp4, 0.0).unwrap();
        assert_eq!(decode_all(&mp4).unwrap().decoded_frames, 100);
    }

    #[test]
    fn frames_decoded_from_damaged_data_are_kept_and_named_in_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let avi = d.path().join("clip.avi");
        write_pattern_video(&avi, "mpeg4", 160, 120, 25, 50, 4).unwrap();
        let clean = decode_all(&avi).unwrap();
        assert!(clean.warning.is_none(), "{clean:?}");
        // Eight bytes of the middle third flipped, a 24th of the file apart: the packets still
        // decode, the decoder conceals the damaged macroblocks and says so only in the
        // frames' flags. (Denser damage, every 97th byte, makes packets fail outright.)
        let mut bytes = std::fs::read(&avi).unwrap();
        let n = bytes.len();
        for i in (n / 3..2 * n / 3).step_by(n / 24) {
            bytes[i] ^= 0x5a;
        }
        let damaged = d.path().join("damaged.avi");
        std::fs::write(&damaged, bytes).unwrap();
        let keep_all =
            |p: &Path| decode_video(p, &DecodeOptions::default(), |_, _| true, |_| Ok(()));
        assert!(keep_all(&avi).unwrap().warning.is_none());
        let s = keep_all(&damaged).unwrap();
        let w = s.warning.unwrap_or_default();
        assert!(
            w.contains("frames kept were decoded from damaged data"),
            "{w:?} ({} frames)",
            s.decoded_frames
        );
        // Only kept frames count: a pass that keeps none has nothing to say.
        assert!(decode_all(&damaged).unwrap().warning.is_none());
    }

    #[test]
    fn frames_lost_inside_the_stream_fail_the_video_beyond_the_tolerance() {
        let d = tempfile::tempdir().unwrap();
        let avi = d.path().join("clip.avi");
        write_pattern_video(&avi, "mpeg4", 160, 120, 25, 50, 4).unwrap();
        let bytes = std::fs::read(&avi).unwrap();
        // Every `step`-th byte of the middle third flipped: the end of the stream is intact,
        // so only the packets the decoder rejects say that frames are missing.
        let damage = |step: usize| {
            let mut b = bytes.clone();
            let n = b.len();
            for i in (n / 3..2 * n / 3).step_by(step) {
                b[i] ^= 0x5a;
            }
            let p = d.path().join(format!("damaged-{step}.avi"));
            std::fs::write(&p, b).unwrap();
            p
        };
        let heavy = damage(97);
        let err = decode_all(&heavy).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Truncated(m) if m.contains("lost inside the stream")),
            "{err}"
        );
        // One rejected packet is within the default tolerance: kept, and the warning says so;
        // `strict_frame_count` tolerates none.
        let light = damage(197);
        let s = decode_all(&light).unwrap();
        let w = s.warning.unwrap_or_default();
        assert!(
            w.contains("1 of the stream's") && w.contains("packets failed to decode"),
            "{w}"
        );
        let strict = DecodeOptions {
            strict_frame_count: true,
            ..DecodeOptions::default()
        };
        let err = decode_video(&light, &strict, |_, _| false, |_| Ok(())).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated(_)), "{err}");
        // The gaps of a variable-frame-rate stream are not losses: 20 of 100 frames dropped
        // at the encoder, the AVI muxer writing empty chunks in their place.
        let vfr = d.path().join("vfr.avi");
        let mut w = VideoWriter::create(&vfr, "mpeg4", 96, 64, 25).unwrap();
        for t in (0..100).filter(|t| t % 5 != 2) {
            w.write_rgb_at(&pattern_frame(96, 64, t, 3), t as i64)
                .unwrap();
        }
        w.finish().unwrap();
        let s = decode_all(&vfr).unwrap();
        assert_eq!(s.decoded_frames, 80, "{s:?}");
        assert!(s.warning.is_none(), "{s:?}");
    }

    #[test]
    fn divx_packed_b_frames_decode_to_the_same_frames_marked_or_not() {
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain.avi");
        let mut w = VideoWriter::create_with_b_frames(&plain, "mpeg4", 96, 64, 25, 1).unwrap();
        for t in 0..60 {
            w.write_rgb(&pattern_frame(96, 64, t, 5)).unwrap();
        }
        w.finish().unwrap();
        let packed = d.path().join("packed.avi");
        // I P B P B ...: every P-VOP but the last of a group of 12 takes its B-VOP along.
        let pairs = crate::encode::pack_b_frames(&plain, &packed).unwrap();
        assert!(pairs >= 20, "{pairs} pairs packed");
        let frames = |p: &Path| {
            let mut all = Vec::new();
            let s = decode_video(
                p,
                &DecodeOptions::default(),
                |_, _| true,
                |f| {
                    if let Pixels::Rgb { data, stride } = f.pixels {
                        for row in data.chunks(stride).take(f.height as usize) {
                            all.extend_from_slice(&row[..3 * f.width as usize]);
                        }
                    }
                    Ok(())
                },
            )
            .unwrap();
            (s, all)
        };
        let (a, pixels_a) = frames(&plain);
        let (b, pixels_b) = frames(&packed);
        assert_eq!((a.decoded_frames, b.decoded_frames), (60, 60));
        assert!(b.warning.is_none() && b.lost_at.is_empty(), "{b:?}");
        assert!(
            pixels_a == pixels_b,
            "the packed file decodes to other frames"
        );
        // Without DivX's marker FFmpeg's decoder does not unpack (35 of the 60 frames, no
        // error); the bitstream filter in front of it does.
        let bytes = std::fs::read(&packed).unwrap();
        let at = bytes
            .windows(13)
            .position(|w| w == b"DivX503b1393p")
            .unwrap();
        let mut unmarked = bytes.clone();
        unmarked[at + 12] = b'x';
        let unmarked_path = d.path().join("unmarked.avi");
        std::fs::write(&unmarked_path, unmarked).unwrap();
        let (c, pixels_c) = frames(&unmarked_path);
        assert_eq!(c.decoded_frames, 60, "{c:?}");
        assert!(c.warning.is_none() && c.lost_at.is_empty(), "{c:?}");
        assert!(
            pixels_a == pixels_c,
            "the unmarked packed file decodes to other frames"
        );
    }

    #[test]
    fn a_late_start_is_not_a_shortfall() {
        let d = tempfile::tempdir().unwrap();
        let (nut, mkv) = (h264_source(d.path(), "nut"), h264_source(d.path(), "mkv"));
        for ext in ["mkv", "mp4", "avi"] {
            let late = d.path().join(format!("late.{ext}"));
            let src = if ext == "avi" { &nut } else { &mkv };
            remux(src, &late, -1.5).unwrap();
            let s = decode_all(&late).unwrap_or_else(|e| panic!("{ext}: {e}"));
            assert_eq!(s.decoded_frames, 100, "{ext}");
        }
    }

    #[test]
    fn a_mid_stream_resolution_change_keeps_the_first_size_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.h264"), d.path().join("b.h264"));
        write_pattern_video(&a, "libx264", 96, 64, 25, 20, 1).unwrap();
        write_pattern_video(&b, "libx264", 64, 96, 25, 20, 2).unwrap();
        let joined = d.path().join("joined.h264");
        let mut bytes = std::fs::read(&a).unwrap();
        bytes.extend(std::fs::read(&b).unwrap());
        std::fs::write(&joined, bytes).unwrap();
        let mut sizes = std::collections::BTreeSet::new();
        let s = decode_video(
            &joined,
            &DecodeOptions::default(),
            |_, _| true,
            |f| {
                sizes.insert((f.width, f.height));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(s.decoded_frames, 40);
        assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [(96, 64)]);
        let w = s.warning.unwrap_or_default();
        assert!(w.contains("resolution changes at frame 20"), "{w}");
    }

    #[test]
    fn send_with_retry_drains_and_resends_on_eagain() {
        let eagain = || ffmpeg::Error::Other {
            errno: ffmpeg::util::error::EAGAIN,
        };
        // (sends tried, drains done); the decoder takes the packet once drained twice.
        let mut st = (0u32, 0u32);
        let r = send_with_retry(
            &mut st,
            |s| {
                s.0 += 1;
                if s.1 < 2 { Err(eagain()) } else { Ok(()) }
            },
            |s| {
                s.1 += 1;
                Ok::<(), ()>(())
            },
        );
        assert_eq!(r, Ok(Ok(())));
        assert_eq!(st, (3, 2));
        // A real error is handed back, not retried.
        let r = send_with_retry(
            &mut (),
            |_| Err(ffmpeg::Error::InvalidData),
            |_| Ok::<(), ()>(()),
        );
        assert_eq!(r, Ok(Err(ffmpeg::Error::InvalidData)));
    }

    #[test]
    fn frame_rate_guess_and_declared_durations() {
        use ffmpeg::Rational as R;
        assert_eq!(guess_frame_rate(R(25, 1), R(50, 1)), 25.0);
        assert_eq!(guess_frame_rate(R(90000, 1), R(30, 1)), 30.0);
        assert_eq!(guess_frame_rate(R(0, 1), R(24, 1)), 24.0);
        assert_eq!(guess_frame_rate(R(0, 1), R(0, 0)), 0.0);
        assert_eq!(parse_tag_duration("00:01:02.500000000"), Some(62.5));
        assert_eq!(parse_tag_duration("garbage"), None);
        // AVI: the header counts time-base ticks; an MKV tag beats the segment duration.
        let facts = |format_name, nb_streams| ContainerFacts {
            format_name,
            nb_streams,
            time_base: 0.02,
            fps: 25.0,
            ..ContainerFacts::default()
        };
        let avi = declared_durations(&ContainerFacts {
            stream_secs: Some(2.4),
            frames: Some(200),
            ..facts("avi", 1)
        });
        assert!(
            avi.iter()
                .any(|d| d.secs == 4.0 && d.source == "the AVI header")
        );
        let mkv = declared_durations(&ContainerFacts {
            tag_secs: Some(5.5),
            container_secs: Some(6.0),
            ..facts("matroska,webm", 2)
        });
        assert_eq!(mkv.len(), 1);
        assert!(!mkv[0].loose);
        let loose = declared_durations(&ContainerFacts {
            container_secs: Some(6.0),
            ..facts("matroska,webm", 2)
        });
        assert!(loose[0].loose);
        // A frame count only counts where nothing else is declared.
        let mp4 = declared_durations(&ContainerFacts {
            stream_secs: Some(2.9),
            frames: Some(100),
            container_secs: Some(2.9),
            ..facts("mov,mp4,m4a,3gp,3g2,mj2", 1)
        });
        assert_eq!(mp4.len(), 1);
        let bare = declared_durations(&ContainerFacts {
            frames: Some(100),
            ..facts("h264", 1)
        });
        assert_eq!(bare[0].secs, 4.0);
    }
}
