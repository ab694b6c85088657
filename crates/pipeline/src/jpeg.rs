//! JPEG encoding with libjpeg-turbo: from packed RGB (the `turbojpeg` crate over the
//! system's TurboJPEG library) or straight from a decoder's 4:2:0 YUV planes
//! (`tjCompressFromYUVPlanes`, which the crate does not wrap: called here through
//! `turbojpeg-sys`, the crate's own bindings).
//!
//! Quality is the libjpeg scale (1-100, IJG tables) and chroma is 4:2:0, as libjpeg, PIL and
//! `ffmpeg -q:v` extraction produce by default. BENCHMARKS.md has the measurement that chose
//! libjpeg-turbo over the pure-Rust `jpeg-encoder` crate, and the one of the YUV route.
//!
//! From YUV planes, nothing is converted: the planes must already be what JPEG (JFIF)
//! stores, full-range BT.601 YCbCr with chroma halved both ways. No RGB is computed, and
//! TurboJPEG's own RGB to YCbCr conversion and chroma downsampling are skipped.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_ulong};

use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};
use turbojpeg_sys as tj;

/// A reusable JPEG encoder (one per worker: it holds TurboJPEG handles).
pub struct JpegEncoder {
    compressor: Compressor,
    quality: c_int,
    /// A second compressor, for YUV input.
    yuv: YuvCompressor,
    /// Output buffer of the YUV route, reused from frame to frame.
    out: Vec<u8>,
}

/// A TurboJPEG compressor handle of our own (the crate's `Compressor` keeps its handle
/// private).
struct YuvCompressor(tj::tjhandle);

impl YuvCompressor {
    fn new() -> Result<Self, String> {
        // SAFETY: tjInitCompress takes no arguments and returns a new handle or null.
        let h = unsafe { tj::tjInitCompress() };
        if h.is_null() {
            return Err("TurboJPEG: cannot create a compressor".into());
        }
        Ok(YuvCompressor(h))
    }

    fn error(&self) -> String {
        // SAFETY: the handle is live; tjGetErrorStr2 returns a NUL-terminated string owned
        // by the handle (or a static one), valid until the next call on it.
        unsafe {
            let p = tj::tjGetErrorStr2(self.0);
            if p.is_null() {
                "unknown TurboJPEG error".into()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }
}

impl Drop for YuvCompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitCompress and is destroyed once.
        unsafe {
            tj::tjDestroy(self.0);
        }
    }
}

impl JpegEncoder {
    /// An encoder at `quality` (clamped to 1-100), 4:2:0 chroma.
    pub fn new(quality: u8) -> Result<Self, String> {
        let quality = c_int::from(quality.clamp(1, 100));
        let mut compressor = Compressor::new().map_err(|e| format!("TurboJPEG: {e}"))?;
        compressor.set_quality(quality);
        compressor.set_subsamp(Subsamp::Sub2x2);
        Ok(JpegEncoder {
            compressor,
            quality,
            yuv: YuvCompressor::new()?,
            out: Vec::new(),
        })
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

    /// Encodes 4:2:0 planes (Y, Cb, Cr; rows of `strides[k]` bytes; the chroma planes
    /// `ceil(width / 2) x ceil(height / 2)`) that already hold full-range BT.601 YCbCr.
    pub fn encode_yuv420(
        &mut self,
        planes: [&[u8]; 3],
        strides: [usize; 3],
        width: u32,
        height: u32,
    ) -> Result<Vec<u8>, String> {
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let too_big = c_int::try_from(w.max(h)).is_err();
        if w == 0 || h == 0 || too_big {
            return Err(format!("cannot encode a {width}x{height} image"));
        }
        let mut c_strides = [0 as c_int; 3];
        for (k, ((plane, &stride), (pw, ph))) in planes
            .iter()
            .zip(&strides)
            .zip([(w, h), (cw, ch), (cw, ch)])
            .enumerate()
        {
            if stride < pw || plane.len() < stride * (ph - 1) + pw {
                return Err(format!(
                    "plane {k} of {} bytes, stride {stride}, is too small for {pw}x{ph}",
                    plane.len()
                ));
            }
            c_strides[k] = c_int::try_from(stride).map_err(|_| format!("stride {stride}"))?;
        }
        let yuv = &self.yuv;
        let subsamp = tj::TJSAMP_TJSAMP_420 as c_int;
        // SAFETY: plain arithmetic on its arguments.
        let bound = unsafe { tj::tjBufSize(w as c_int, h as c_int, subsamp) };
        if bound == c_ulong::MAX || bound == 0 {
            return Err(yuv.error());
        }
        self.out.resize(bound as usize, 0);
        let mut out_ptr = self.out.as_mut_ptr();
        let mut out_len: c_ulong = bound;
        let mut src = [planes[0].as_ptr(), planes[1].as_ptr(), planes[2].as_ptr()];
        // SAFETY: the handle is live; the three planes were checked above to hold
        // `stride * (rows - 1) + width` bytes each for TurboJPEG's 4:2:0 plane sizes; the
        // output buffer holds tjBufSize bytes, the documented worst case, and
        // TJFLAG_NOREALLOC forbids TurboJPEG to reallocate or free it.
        let r = unsafe {
            tj::tjCompressFromYUVPlanes(
                yuv.0,
                src.as_mut_ptr(),
                w as c_int,
                c_strides.as_ptr(),
                h as c_int,
                subsamp,
                &mut out_ptr,
                &mut out_len,
                self.quality,
                tj::TJFLAG_NOREALLOC as c_int,
            )
        };
        if r != 0 {
            return Err(format!("JPEG encoding: {}", yuv.error()));
        }
        let len = usize::try_from(out_len).unwrap_or(usize::MAX);
        if out_ptr != self.out.as_mut_ptr() || len > self.out.len() {
            return Err("JPEG encoding: TurboJPEG moved the output buffer".into());
        }
        Ok(self.out[..len].to_vec())
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

    #[test]
    fn encodes_yuv_planes_of_odd_size_with_padded_rows() {
        // 5x3: chroma planes 3x2. Full-range BT.601 red is Y 76, Cb 85, Cr 255.
        let (w, h) = (5u32, 3u32);
        let y = vec![76u8; 8 * 3];
        let cb = vec![85u8; 4 * 2];
        let cr = vec![255u8; 4 * 2];
        let mut enc = JpegEncoder::new(95).unwrap();
        let jpeg = enc.encode_yuv420([&y, &cb, &cr], [8, 4, 4], w, h).unwrap();
        let img = turbojpeg::decompress(&jpeg, PixelFormat::RGB).unwrap();
        assert_eq!((img.width, img.height), (5, 3));
        for p in img.pixels.chunks(3) {
            assert!(p[0] > 245 && p[1] < 10 && p[2] < 10, "{p:?}");
        }
        // Planes too small for the size are refused, not read past their end.
        assert!(
            enc.encode_yuv420([&y, &cb[..5], &cr], [8, 4, 4], w, h)
                .is_err()
        );
        assert!(enc.encode_yuv420([&y, &cb, &cr], [4, 4, 4], w, h).is_err());
        assert!(enc.encode_yuv420([&y, &cb, &cr], [8, 4, 4], 0, h).is_err());
    }
}
