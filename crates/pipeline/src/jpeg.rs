//! JPEG encoding of RGB frames with libjpeg-turbo (the `turbojpeg` crate over the system's
//! TurboJPEG library).
//!
//! Quality is the libjpeg scale (1-100, IJG tables) and chroma is 4:2:0, as libjpeg, PIL and
//! `ffmpeg -q:v` extraction produce by default. BENCHMARKS.md has the measurement that chose
//! libjpeg-turbo over the pure-Rust `jpeg-encoder` crate.

use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};

/// A reusable JPEG encoder (one per worker: it holds a TurboJPEG handle).
pub struct JpegEncoder {
    compressor: Compressor,
}

impl JpegEncoder {
    /// An encoder at `quality` (clamped to 1-100), 4:2:0 chroma.
    pub fn new(quality: u8) -> Result<Self, String> {
        let mut compressor = Compressor::new().map_err(|e| format!("TurboJPEG: {e}"))?;
        compressor.set_quality(i32::from(quality.clamp(1, 100)));
        compressor.set_subsamp(Subsamp::Sub2x2);
        Ok(JpegEncoder { compressor })
    }

    /// Encodes RGB24 rows of `stride` bytes (at least `3 * width`).
    pub fn encode_rgb(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
        stride: usize,
    ) -> Result<Vec<u8>, String> {
        let need = stride * (height as usize).saturating_sub(1) + 3 * width as usize;
        if stride < 3 * width as usize || rgb.len() < need {
            return Err(format!(
                "RGB buffer of {} bytes, stride {stride}, is too small for {width}x{height}",
                rgb.len()
            ));
        }
        let image = Image {
            pixels: rgb,
            width: width as usize,
            pitch: stride,
            height: height as usize,
            format: PixelFormat::RGB,
        };
        self.compressor
            .compress_to_vec(image)
            .map_err(|e| format!("JPEG encoding: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_decodable_jpeg_with_padded_rows() {
        let (w, h, stride) = (5u32, 3u32, 32usize);
        let mut buf = vec![0u8; stride * h as usize];
        for y in 0..h as usize {
            for x in 0..w as usize {
                buf[y * stride + 3 * x] = 200;
            }
        }
        let jpeg = JpegEncoder::new(90)
            .unwrap()
            .encode_rgb(&buf, w, h, stride)
            .unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "SOI marker");
        assert_eq!(&jpeg[jpeg.len() - 2..], &[0xFF, 0xD9], "EOI marker");
        let img = turbojpeg::decompress(&jpeg, PixelFormat::RGB).unwrap();
        assert_eq!((img.width, img.height), (5, 3));
        assert!(
            img.pixels
                .chunks(3)
                .all(|p| p[0] > 180 && p[1] < 30 && p[2] < 30)
        );
        assert!(
            JpegEncoder::new(90)
                .unwrap()
                .encode_rgb(&buf[..10], w, h, stride)
                .is_err()
        );
    }
}
