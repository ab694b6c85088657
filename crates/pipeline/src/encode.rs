//! Encoding RGB frames into a video file through ffmpeg-next.
//!
//! prep never encodes video; this exists so tests, benchmarks and the built-in sample and
//! synthetic benchmarks can make real files in the real layouts (AVI/MPEG-4 like UCF101 and
//! HMDB51, WebM/VP9 like Something-Something v2) without shipping any video.

use std::path::Path;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling::{Context as Scaler, Flags};
use ffmpeg::util::frame::video::Video as VideoFrame;
use ffmpeg_next as ffmpeg;

use crate::decode::init;
use crate::error::{Error, Result};

/// Writes a video file frame by frame.
pub struct VideoWriter {
    octx: ffmpeg::format::context::Output,
    encoder: ffmpeg::encoder::Video,
    scaler: Scaler,
    rgb: VideoFrame,
    yuv: VideoFrame,
    enc_time_base: ffmpeg::Rational,
    stream_index: usize,
    frames: i64,
    width: u32,
    height: u32,
    path: std::path::PathBuf,
}

fn ff(path: &Path, what: &str, e: ffmpeg::Error) -> Error {
    Error::Encode {
        path: path.to_owned(),
        message: format!("{what}: {e}"),
    }
}

impl VideoWriter {
    /// Creates `path` (container from its extension) encoded with the FFmpeg encoder named
    /// `codec` (`mpeg4`, `libvpx-vp9`, `libx264`, `mjpeg`, ...) at `fps` frames per second.
    pub fn create(path: &Path, codec: &str, width: u32, height: u32, fps: u32) -> Result<Self> {
        Self::create_with_b_frames(path, codec, width, height, fps, 0)
    }

    /// [`VideoWriter::create`] with up to `b_frames` consecutive B-frames (reordered
    /// frames, as real H.264 and MPEG-4 files have).
    pub fn create_with_b_frames(
        path: &Path,
        codec: &str,
        width: u32,
        height: u32,
        fps: u32,
        b_frames: u32,
    ) -> Result<Self> {
        init();
        let mut octx = ffmpeg::format::output(path).map_err(|e| ff(path, "output", e))?;
        let global_header = octx
            .format()
            .flags()
            .contains(ffmpeg::format::Flags::GLOBAL_HEADER);
        let enc_codec = ffmpeg::encoder::find_by_name(codec).ok_or_else(|| Error::Encode {
            path: path.to_owned(),
            message: format!("this FFmpeg build has no encoder named {codec:?}"),
        })?;
        let mut ost = octx
            .add_stream(enc_codec)
            .map_err(|e| ff(path, "add stream", e))?;
        let stream_index = ost.index();
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(enc_codec)
            .encoder()
            .video()
            .map_err(|e| ff(path, "encoder", e))?;
        let pix = if codec == "mjpeg" {
            Pixel::YUVJ420P
        } else {
            Pixel::YUV420P
        };
        let time_base = ffmpeg::Rational(1, fps as i32);
        enc.set_width(width);
        enc.set_height(height);
        enc.set_format(pix);
        enc.set_time_base(time_base);
        enc.set_frame_rate(Some(ffmpeg::Rational(fps as i32, 1)));
        enc.set_gop(12);
        enc.set_max_b_frames(b_frames as usize);
        // About one bit per pixel: 320x240 at 25 fps gives 1.9 Mbit/s, like UCF101 clips.
        enc.set_bit_rate((width * height) as usize * fps as usize);
        if global_header {
            enc.set_flags(ffmpeg::codec::Flags::GLOBAL_HEADER);
        }
        let mut opts = ffmpeg::Dictionary::new();
        if codec == "libvpx-vp9" {
            opts.set("deadline", "realtime");
            opts.set("cpu-used", "8");
        }
        let encoder = enc
            .open_with(opts)
            .map_err(|e| ff(path, "open encoder", e))?;
        ost.set_parameters(&encoder);
        ost.set_time_base(time_base);
        ost.set_avg_frame_rate(ffmpeg::Rational(fps as i32, 1));
        ost.set_rate(ffmpeg::Rational(fps as i32, 1));
        octx.write_header()
            .map_err(|e| ff(path, "write header", e))?;
        let scaler = Scaler::get(
            Pixel::RGB24,
            width,
            height,
            pix,
            width,
            height,
            Flags::BILINEAR,
        )
        .map_err(|e| ff(path, "scaler", e))?;
        Ok(VideoWriter {
            octx,
            encoder,
            scaler,
            rgb: VideoFrame::new(Pixel::RGB24, width, height),
            yuv: VideoFrame::new(pix, width, height),
            enc_time_base: time_base,
            stream_index,
            frames: 0,
            width,
            height,
            path: path.to_owned(),
        })
    }

    /// Appends one frame of packed RGB24 (`width * height * 3` bytes).
    pub fn write_rgb(&mut self, rgb: &[u8]) -> Result<()> {
        self.write_rgb_at(rgb, self.frames)
    }

    /// Appends one frame shown at frame slot `pts` (after the previous frame's): skipping
    /// slots makes a variable-frame-rate stream, whose gaps AVI fills with empty chunks.
    pub fn write_rgb_at(&mut self, rgb: &[u8], pts: i64) -> Result<()> {
        let row = self.width as usize * 3;
        if rgb.len() != row * self.height as usize {
            return Err(Error::Encode {
                path: self.path.clone(),
                message: format!(
                    "frame of {} bytes, expected {}",
                    rgb.len(),
                    row * self.height as usize
                ),
            });
        }
        let stride = self.rgb.stride(0);
        let data = self.rgb.data_mut(0);
        for y in 0..self.height as usize {
            data[y * stride..y * stride + row].copy_from_slice(&rgb[y * row..(y + 1) * row]);
        }
        self.scaler
            .run(&self.rgb, &mut self.yuv)
            .map_err(|e| ff(&self.path, "scale", e))?;
        self.yuv.set_pts(Some(pts));
        self.frames = pts + 1;
        self.encoder
            .send_frame(&self.yuv)
            .map_err(|e| ff(&self.path, "encode", e))?;
        self.write_packets()
    }

    fn write_packets(&mut self) -> Result<()> {
        let ost_tb = self
            .octx
            .stream(self.stream_index)
            .map(|s| s.time_base())
            .unwrap_or(self.enc_time_base);
        let mut packet = ffmpeg::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(self.stream_index);
            packet.rescale_ts(self.enc_time_base, ost_tb);
            packet
                .write_interleaved(&mut self.octx)
                .map_err(|e| ff(&self.path, "write packet", e))?;
        }
        Ok(())
    }

    /// Flushes the encoder and writes the trailer.
    pub fn finish(mut self) -> Result<()> {
        self.encoder
            .send_eof()
            .map_err(|e| ff(&self.path, "flush encoder", e))?;
        self.write_packets()?;
        self.octx
            .write_trailer()
            .map_err(|e| ff(&self.path, "write trailer", e))
    }
}

fn no_video(path: &Path) -> Error {
    Error::Encode {
        path: path.to_owned(),
        message: "no video stream".into(),
    }
}

/// `src` opened, and the index of its best video stream.
fn open_video(src: &Path) -> Result<(ffmpeg::format::context::Input, usize)> {
    init();
    let ictx = ffmpeg::format::input(src).map_err(|e| ff(src, "open", e))?;
    let index = ictx
        .streams()
        .best(ffmpeg::media::Type::Video)
        .ok_or_else(|| no_video(src))?
        .index();
    Ok((ictx, index))
}

/// The next packet of any stream, `None` at the end (a new packet each time: `Packet::read`
/// does not unreference the old one).
fn next_packet(
    ictx: &mut ffmpeg::format::context::Input,
    src: &Path,
) -> Result<Option<ffmpeg::Packet>> {
    let mut packet = ffmpeg::Packet::empty();
    match packet.read(ictx) {
        Ok(()) => Ok(Some(packet)),
        Err(ffmpeg::Error::Eof) => Ok(None),
        Err(e) => Err(ff(src, "read", e)),
    }
}

/// Copies the video stream of `src` into `dst` (container from its extension) without
/// re-encoding, every timestamp moved `shift_secs` earlier (negative: later). This makes the
/// files real collections are full of: H.264 remuxed into AVI, an MP4 whose edit list cuts
/// its first frames (a positive shift gives them negative times), a stream that starts late.
pub fn remux(src: &Path, dst: &Path, shift_secs: f64) -> Result<()> {
    remux_packets(src, dst, shift_secs, 0)
}

/// Copies the video stream of `src` into `dst` without its first `skip` packets (in
/// decoding order), as a capture started or a download cut in the middle of a group of
/// pictures leaves it: the packets up to the next keyframe cannot be decoded.
pub fn remux_without_head(src: &Path, dst: &Path, skip: usize) -> Result<()> {
    remux_packets(src, dst, 0.0, skip)
}

fn remux_packets(src: &Path, dst: &Path, shift_secs: f64, skip: usize) -> Result<()> {
    let (mut ictx, ist_index) = open_video(src)?;
    let ist = ictx.stream(ist_index).ok_or_else(|| no_video(src))?;
    let ist_tb = ist.time_base();
    let (rate, avg) = (ist.rate(), ist.avg_frame_rate());
    let mut octx = ffmpeg::format::output(dst).map_err(|e| ff(dst, "output", e))?;
    let mut ost = octx
        .add_stream(ffmpeg::encoder::find(ffmpeg::codec::Id::None))
        .map_err(|e| ff(dst, "add stream", e))?;
    ost.set_parameters(ist.parameters());
    ost.set_rate(rate);
    ost.set_avg_frame_rate(avg);
    // AVI counts time in frames of its time base; FFmpeg's own stream copy gives H.264 two
    // ticks a frame (hence the doubled frame count such files declare).
    let is_avi = dst
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("avi"));
    if is_avi && rate.numerator() > 0 {
        ost.set_time_base(ffmpeg::Rational(rate.denominator(), 2 * rate.numerator()));
    } else {
        ost.set_time_base(ist_tb);
    }
    octx.write_header()
        .map_err(|e| ff(dst, "write header", e))?;
    let ost_tb = octx.stream(0).map(|s| s.time_base()).unwrap_or(ist_tb);
    let shift = (shift_secs * f64::from(ist_tb).recip()).round() as i64;
    let mut seen = 0;
    while let Some(mut packet) = next_packet(&mut ictx, src)? {
        if packet.stream() != ist_index {
            continue;
        }
        seen += 1;
        if seen <= skip {
            continue;
        }
        packet.set_pts(packet.pts().map(|t| t - shift));
        packet.set_dts(packet.dts().map(|t| t - shift));
        packet.rescale_ts(ist_tb, ost_tb);
        packet.set_position(-1);
        packet.set_stream(0);
        packet
            .write_interleaved(&mut octx)
            .map_err(|e| ff(dst, "write packet", e))?;
    }
    octx.write_trailer()
        .map_err(|e| ff(dst, "write trailer", e))
}

/// Rewrites the MPEG-4 part 2 AVI `src` (B-frames, one VOP per chunk in decoding order) into
/// `dst` as DivX 5 wrote such streams, "packed B-frames": each P-VOP and the B-VOP after it
/// in one chunk, then a placeholder chunk (a not-coded VOP) where the B-VOP was, and a
/// `DivX503b1393p` user-data string in the first chunk that marks the stream packed. The
/// chunk count and the frames are the same; only their packaging differs. No encoder in
/// Debian's FFmpeg writes this, yet DivX-era collections are full of it. Returns how many
/// P- and B-VOP pairs were packed.
pub fn pack_b_frames(src: &Path, dst: &Path) -> Result<usize> {
    const VOP: [u8; 4] = [0, 0, 1, 0xB6];
    // The coding type of the first VOP in `data`: 0 I, 1 P, 2 B, 3 S.
    let vop_type = |data: &[u8]| data.windows(5).find(|w| w[..4] == VOP).map(|w| w[4] >> 6);
    let (mut chunks, rate, params) = video_chunks(src)?;
    let first_vop = chunks
        .first()
        .and_then(|c| c.windows(4).position(|w| w == VOP))
        .ok_or_else(|| Error::Encode {
            path: src.to_owned(),
            message: "no MPEG-4 VOP in the first packet".into(),
        })?;
    chunks[0].splice(
        first_vop..first_vop,
        [0, 0, 1, 0xB2].iter().chain(b"DivX503b1393p").copied(),
    );
    // A P-VOP, not coded: modulo time base 0, marker, a 5-bit time increment, marker,
    // vop_coded 0, stuffing to the byte. The decoder shows the buffered B-VOP instead.
    let placeholder = [0, 0, 1, 0xB6, 0b0101_0000, 0b0100_1111];
    let mut packed: Vec<Vec<u8>> = Vec::with_capacity(chunks.len());
    let mut pairs = 0;
    let mut it = chunks.into_iter().peekable();
    while let Some(c) = it.next() {
        if vop_type(&c) == Some(1) && it.peek().is_some_and(|n| vop_type(n) == Some(2)) {
            let b = it.next().unwrap_or_default();
            packed.push([c, b].concat());
            packed.push(placeholder.to_vec());
            pairs += 1;
        } else {
            packed.push(c);
        }
    }
    write_chunks(dst, params, rate, &packed, |_, c| vop_type(c) == Some(0))?;
    Ok(pairs)
}

/// Copies the H.264 stream (Annex B, as NUT or AVI hold it) of `src` into `dst` with the
/// parameter sets and SEI of its first packet in a packet of their own, one frame slot
/// before the first picture, as some AVI muxers write them. Returns the first packet's size.
pub fn split_parameter_sets(src: &Path, dst: &Path) -> Result<usize> {
    let (mut chunks, rate, params) = video_chunks(src)?;
    // The first slice NAL unit of an IDR picture (type 5), with its start code.
    let idr = |c: &[u8]| {
        c.windows(4)
            .position(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 5)
    };
    let slice = chunks
        .first()
        .and_then(|c| idr(c).map(|p| if p > 0 && c[p - 1] == 0 { p - 1 } else { p }))
        .ok_or_else(|| Error::Encode {
            path: src.to_owned(),
            message: "no H.264 IDR slice in the first packet".into(),
        })?;
    let first = chunks.remove(0);
    let (sets, picture) = first.split_at(slice);
    let size = sets.len();
    chunks.splice(0..0, [sets.to_vec(), picture.to_vec()]);
    write_chunks(dst, params, rate, &chunks, |i, c| {
        i == 0 || idr(c).is_some()
    })?;
    Ok(size)
}

/// The bytes of every packet of `src`'s video stream, its average frame rate and its codec
/// parameters.
fn video_chunks(src: &Path) -> Result<(Vec<Vec<u8>>, ffmpeg::Rational, ffmpeg::codec::Parameters)> {
    let (mut ictx, index) = open_video(src)?;
    let ist = ictx.stream(index).ok_or_else(|| no_video(src))?;
    let (rate, params) = (ist.avg_frame_rate(), ist.parameters());
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    while let Some(packet) = next_packet(&mut ictx, src)? {
        if packet.stream() == index {
            chunks.push(packet.data().unwrap_or_default().to_vec());
        }
    }
    Ok((chunks, rate, params))
}

/// Writes `chunks` as the video stream of `dst`, one per frame slot at `rate`, the ones
/// `key` picks (by index and bytes) flagged as keyframes.
fn write_chunks(
    dst: &Path,
    params: ffmpeg::codec::Parameters,
    rate: ffmpeg::Rational,
    chunks: &[Vec<u8>],
    key: impl Fn(usize, &[u8]) -> bool,
) -> Result<()> {
    let mut octx = ffmpeg::format::output(dst).map_err(|e| ff(dst, "output", e))?;
    let mut ost = octx
        .add_stream(ffmpeg::encoder::find(ffmpeg::codec::Id::None))
        .map_err(|e| ff(dst, "add stream", e))?;
    ost.set_parameters(params);
    let tb = ffmpeg::Rational(rate.denominator(), rate.numerator());
    ost.set_time_base(tb);
    ost.set_rate(rate);
    ost.set_avg_frame_rate(rate);
    octx.write_header()
        .map_err(|e| ff(dst, "write header", e))?;
    let ost_tb = octx.stream(0).map(|s| s.time_base()).unwrap_or(tb);
    for (i, c) in chunks.iter().enumerate() {
        let mut packet = ffmpeg::Packet::copy(c);
        packet.set_pts(Some(i as i64));
        packet.set_dts(Some(i as i64));
        packet.rescale_ts(tb, ost_tb);
        packet.set_stream(0);
        if key(i, c) {
            packet.set_flags(ffmpeg::codec::packet::Flags::KEY);
        }
        packet
            .write_interleaved(&mut octx)
            .map_err(|e| ff(dst, "write packet", e))?;
    }
    octx.write_trailer()
        .map_err(|e| ff(dst, "write trailer", e))
}

/// A deterministic test pattern: a gradient background with a square that moves with `t`.
/// Distinct `seed`s give distinct colours; the content varies enough to be JPEG-realistic.
pub fn pattern_frame(width: u32, height: u32, t: u32, seed: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut buf = vec![0u8; w * h * 3];
    let side = (w.min(h) / 4).max(2);
    let span_x = w.saturating_sub(side).max(1);
    let x0 = (t as usize * 7 + seed as usize * 13) % span_x;
    let y0 = (t as usize * 3 + seed as usize * 5) % h.saturating_sub(side).max(1);
    let (r0, g0, b0) = (
        (seed.wrapping_mul(97) % 256) as u8,
        (seed.wrapping_mul(57) % 256) as u8,
        (seed.wrapping_mul(31) % 256) as u8,
    );
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            let inside = x >= x0 && x < x0 + side && y >= y0 && y < y0 + side;
            if inside {
                buf[i] = 255 - r0;
                buf[i + 1] = 255 - g0;
                buf[i + 2] = 255 - b0;
            } else {
                buf[i] = ((x * 255) / w.max(1)) as u8 ^ r0;
                buf[i + 1] = ((y * 255) / h.max(1)) as u8 ^ g0;
                buf[i + 2] = (((x + y + t as usize) * 4) % 256) as u8 ^ b0;
            }
        }
    }
    buf
}

/// Encodes `frames` frames of [`pattern_frame`] to `path`.
pub fn write_pattern_video(
    path: &Path,
    codec: &str,
    width: u32,
    height: u32,
    fps: u32,
    frames: u32,
    seed: u32,
) -> Result<()> {
    let mut w = VideoWriter::create(path, codec, width, height, fps)?;
    for t in 0..frames {
        w.write_rgb(&pattern_frame(width, height, t, seed))?;
    }
    w.finish()
}
