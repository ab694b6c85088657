//! JPEG encoding of RGB frames with the `jpeg-encoder` crate (pure Rust, SIMD).
//!
//! Quality follows the libjpeg scale (1-100, IJG tables) and chroma is always 4:2:0, as
//! libjpeg, PIL and `ffmpeg -q:v` extraction produce by default, so shard sizes match what
//! users know. (The crate's own default switches to 4:4:4 at quality >= 90.)

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

/// Encodes packed RGB24 as a baseline JPEG.
pub fn encode_rgb(rgb: &[u8], width: u32, height: u32, quality: u8) -> Result<Vec<u8>, String> {
    let (w, h) = (
        u16::try_from(width).map_err(|_| format!("frame width {width} exceeds 65535"))?,
        u16::try_from(height).map_err(|_| format!("frame height {height} exceeds 65535"))?,
    );
    let mut out = Vec::with_capacity(rgb.len() / 8);
    let mut enc = Encoder::new(&mut out, quality.clamp(1, 100));
    enc.set_sampling_factor(SamplingFactor::F_2_2);
    enc.encode(rgb, w, h, ColorType::Rgb)
        .map_err(|e| format!("JPEG encoding: {e}"))?;
    Ok(out)
}
