//! Frame-level image operations shared by the loader and the feature cache: JPEG decoding,
//! the augmentation views (multi-scale crop at 13 fixed offsets, flip; the evaluation's scale
//! and centre crop) and resampling a view into normalised `S x S` floats.

use rand::Rng;

/// ImageNet channel means.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Multi-scale crop scales.
pub const CROP_SCALES: [f64; 4] = [1.0, 0.875, 0.75, 0.66];

/// The 13 fixed crop offsets (`more_fix_crop`) for a `cw x ch` crop of a `w x h` image.
pub fn fixed_offsets(w: usize, h: usize, cw: usize, ch: usize) -> Vec<(usize, usize)> {
    let (ws, hs) = ((w - cw) / 4, (h - ch) / 4);
    vec![
        (0, 0),
        (4 * ws, 0),
        (0, 4 * hs),
        (4 * ws, 4 * hs),
        (2 * ws, 2 * hs),
        (0, 2 * hs),
        (4 * ws, 2 * hs),
        (2 * ws, 4 * hs),
        (2 * ws, 0),
        (ws, hs),
        (3 * ws, hs),
        (ws, 3 * hs),
        (3 * ws, 3 * hs),
    ]
}

/// A crop box `(x, y, w, h)` and flip, chosen once per clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// Left.
    pub x: f64,
    /// Top.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
    /// Mirror horizontally.
    pub flip: bool,
}

/// The training view: multi-scale crop at a fixed offset, random flip when `flip` allows.
pub fn train_view(w: usize, h: usize, input: usize, flip: bool, rng: &mut impl Rng) -> View {
    let base = w.min(h) as f64;
    let sizes: Vec<usize> = CROP_SCALES
        .iter()
        .map(|s| {
            let c = (base * s) as usize;
            if c.abs_diff(input) < 3 {
                input.min(w.min(h))
            } else {
                c
            }
        })
        .collect();
    let mut pairs = Vec::new();
    for (i, &ch) in sizes.iter().enumerate() {
        for (j, &cw) in sizes.iter().enumerate() {
            if i.abs_diff(j) <= 1 {
                pairs.push((cw.min(w).max(1), ch.min(h).max(1)));
            }
        }
    }
    let (cw, ch) = pairs[rng.random_range(0..pairs.len())];
    let offsets = fixed_offsets(w, h, cw, ch);
    let (x, y) = offsets[rng.random_range(0..offsets.len())];
    View {
        x: x as f64,
        y: y as f64,
        w: cw as f64,
        h: ch as f64,
        flip: flip && rng.random_bool(0.5),
    }
}

/// The evaluation view: scale the shorter side to `input * 256 / 224`, centre crop.
pub fn eval_view(w: usize, h: usize, input: usize) -> View {
    let scale_size = input as f64 * 256.0 / 224.0;
    let s = scale_size / (w.min(h) as f64);
    // The centre `input x input` of the rescaled frame, in source pixels.
    let side = input as f64 / s;
    View {
        x: (w as f64 - side) / 2.0,
        y: (h as f64 - side) / 2.0,
        w: side,
        h: side,
        flip: false,
    }
}

/// Bilinear resampling of `view` of an RGB image to `out x out`, normalised, into `dst`
/// (planar CHW).
pub fn resample(rgb: &[u8], w: usize, h: usize, view: &View, out: usize, dst: &mut [f32]) {
    let plane = out * out;
    // The horizontal taps of every output column, computed once per image (not per row).
    let taps: Vec<(usize, usize, f64)> = (0..out)
        .map(|ox| {
            let px = if view.flip { out - 1 - ox } else { ox };
            let sx =
                (view.x + (px as f64 + 0.5) * view.w / out as f64 - 0.5).clamp(0.0, (w - 1) as f64);
            let (x0, fx) = (sx.floor() as usize, sx - sx.floor());
            (x0, (x0 + 1).min(w - 1), fx)
        })
        .collect();
    for oy in 0..out {
        let sy =
            (view.y + (oy as f64 + 0.5) * view.h / out as f64 - 0.5).clamp(0.0, (h - 1) as f64);
        let (y0, fy) = (sy.floor() as usize, sy - sy.floor());
        let y1 = (y0 + 1).min(h - 1);
        for (ox, &(x0, x1, fx)) in taps.iter().enumerate() {
            for c in 0..3 {
                let p = |x: usize, y: usize| f64::from(rgb[(y * w + x) * 3 + c]);
                let v = p(x0, y0) * (1.0 - fx) * (1.0 - fy)
                    + p(x1, y0) * fx * (1.0 - fy)
                    + p(x0, y1) * (1.0 - fx) * fy
                    + p(x1, y1) * fx * fy;
                dst[c * plane + oy * out + ox] =
                    ((v / 255.0) as f32 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }
}

/// Decodes a JPEG to RGB: (width, height, pixels).
pub fn decode_jpeg(bytes: &[u8]) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(bytes, opts);
    let px = d.decode().map_err(|e| e.to_string())?;
    let info = d.info().ok_or("no image info")?;
    Ok((usize::from(info.width), usize::from(info.height), px))
}
