//! Image preprocessing identical to Hugging Face's PIL-backed image processors (`BitImageProcessorPil`,
//! `CLIPImageProcessorPil`, `BlipImageProcessorPil`...): resize with PIL's separable resampling in
//! 8-bit fixed point (bit-exact with Pillow's `Resample.c`), center crop with HF's rounding and zero
//! padding, rescale and normalise to a CHW f32 array.
//!
//! Shared by every image backbone: build an [`ImagePreprocess`] from `preprocessor_config.json`
//! ([`ImagePreprocess::from_hf_config`]) and call [`ImagePreprocess::batch`].

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::contract::Sample;

/// How the image is resized before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// The shorter side becomes this many pixels; the longer one keeps the aspect ratio
    /// (truncated, as HF's `get_resize_output_image_size`).
    ShortestSide(u32),
    /// Exactly this size.
    Exact { height: u32, width: u32 },
}

/// PIL resampling filters (the numbers are PIL's, as stored in `preprocessor_config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Filter {
    fn from_pil(code: u64) -> Result<Self> {
        match code {
            1 => Ok(Self::Lanczos),
            2 => Ok(Self::Bilinear),
            3 => Ok(Self::Bicubic),
            other => bail!(
                "resample {other} is not supported (supported: 1 lanczos, 2 bilinear, 3 bicubic)"
            ),
        }
    }

    /// Half-width of the filter kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// The kernel, as PIL defines it (bicubic with a = -0.5).
    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => (1.0 - x).max(0.0),
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        let px = x * std::f64::consts::PI;
                        px.sin() / px
                    }
                };
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// A complete image preprocessing recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImagePreprocess {
    pub resize: Option<Resize>,
    pub filter: Filter,
    /// Center crop to (height, width), zero-padding an image smaller than the crop.
    pub crop: Option<(u32, u32)>,
    /// Multiplier applied to the 0-255 values (usually 1/255), when rescaling.
    pub rescale: Option<f64>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub normalize: bool,
}

/// Fixed-point precision of PIL's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

impl ImagePreprocess {
    /// Reads a Hugging Face `preprocessor_config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&json).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the JSON of a Hugging Face `preprocessor_config.json`.
    pub fn from_hf_json(json: &Value) -> Result<Self> {
        let flag =
            |key: &str, default: bool| json.get(key).and_then(Value::as_bool).unwrap_or(default);
        let resize = if flag("do_resize", true) {
            let size = json
                .get("size")
                .context("`size` missing while do_resize is true")?;
            Some(parse_resize(size)?)
        } else {
            None
        };
        let filter = match json.get("resample") {
            None | Some(Value::Null) => Filter::Bilinear,
            Some(v) => Filter::from_pil(v.as_u64().context("`resample` must be an integer")?)?,
        };
        let crop = if flag("do_center_crop", false) {
            let size = json.get("crop_size").context("`crop_size` missing")?;
            Some(match parse_resize(size)? {
                Resize::Exact { height, width } => (height, width),
                Resize::ShortestSide(s) => (s, s),
            })
        } else {
            None
        };
        let rescale = if flag("do_rescale", true) {
            Some(
                json.get("rescale_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0 / 255.0),
            )
        } else {
            None
        };
        let triple = |key: &str| -> Result<[f32; 3]> {
            let values = json.get(key).with_context(|| format!("`{key}` missing"))?;
            let values: Vec<f32> = match values {
                Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_f64().map(|f| f as f32))
                    .collect::<Option<_>>()
                    .with_context(|| format!("`{key}` must hold numbers"))?,
                v => vec![
                    v.as_f64()
                        .with_context(|| format!("`{key}` must be a number"))?
                        as f32;
                    3
                ],
            };
            values.try_into().map_err(|v: Vec<f32>| {
                anyhow::anyhow!("`{key}` must hold 3 values, got {}", v.len())
            })
        };
        let normalize = flag("do_normalize", true);
        let (mean, std) = if normalize {
            (triple("image_mean")?, triple("image_std")?)
        } else {
            ([0.0; 3], [1.0; 3])
        };
        Ok(Self {
            resize,
            filter,
            crop,
            rescale,
            mean,
            std,
            normalize,
        })
    }

    /// (height, width) of the output for an input of the given size.
    pub fn output_size(&self, height: u32, width: u32) -> (u32, u32) {
        if let Some(crop) = self.crop {
            return crop;
        }
        match self.resize {
            Some(resize) => resized_size(resize, height, width),
            None => (height, width),
        }
    }

    /// Self-describing JSON for cache manifests.
    pub fn describe(&self) -> Value {
        serde_json::to_value(self).expect("preprocessing serialises")
    }

    /// Resize and crop in uint8, as the HF processor does before rescaling. Only the resized
    /// pixels that the crop keeps are computed (the same values): time and memory follow the
    /// crop, not the resized image, which a thin image makes huge (1 x 400,000 pixels resize to
    /// 256 x 102 million).
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let Some(resize) = self.resize else {
            return match self.crop {
                Some((h, w)) => center_crop(image, h, w),
                None => image.clone(),
            };
        };
        let (h, w) = resized_size(resize, image.height(), image.width());
        let Some((crop_h, crop_w)) = self.crop else {
            return resample(image, w, h, self.filter);
        };
        let (top, left) = center_crop_offsets((h, w), (crop_h, crop_w));
        let kept = |offset: i64, crop: u32, size: u32| {
            offset.clamp(0, size as i64) as usize
                ..(offset + crop as i64).clamp(0, size as i64) as usize
        };
        let (rows, cols) = (kept(top, crop_h, h), kept(left, crop_w, w));
        let (row0, col0) = (rows.start as i64, cols.start as i64);
        let window = resample_window(image, (w, h), self.filter, rows, cols);
        crop_at(&window, (top - row0, left - col0), (crop_h, crop_w))
    }

    /// Full preprocessing of one image: CHW f32 values, with its (height, width).
    pub fn apply(&self, image: &RgbImage) -> (Vec<f32>, (u32, u32)) {
        let cropped = self.resize_and_crop(image);
        let (w, h) = cropped.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in cropped.pixels().enumerate() {
            for c in 0..3 {
                // HF rescales in f64 then casts to f32, then normalises in f32.
                let mut v = match self.rescale {
                    Some(scale) => (px.0[c] as f64 * scale) as f32,
                    None => px.0[c] as f32,
                };
                if self.normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * plane + i] = v;
            }
        }
        (out, (h, w))
    }

    /// Preprocesses the images of a batch (every sample must have one) in parallel into one
    /// `[batch, 3, H, W]` f32 tensor on `device` (copied there before it returns). All images must
    /// come out the same size (always true with a crop or an exact resize).
    pub fn batch(&self, samples: &[Sample], device: &Device) -> Result<Tensor> {
        let images = samples
            .iter()
            .map(|s| {
                s.image
                    .as_ref()
                    .with_context(|| format!("sample {} has no image", s.id))
            })
            .collect::<Result<Vec<_>>>()?;
        let processed: Vec<(Vec<f32>, (u32, u32))> =
            images.par_iter().map(|image| self.apply(image)).collect();
        let Some((_, (h, w))) = processed.first() else {
            bail!("cannot preprocess an empty batch of images");
        };
        let (h, w) = (*h, *w);
        let mut data = Vec::with_capacity(processed.len() * 3 * (h * w) as usize);
        for (values, size) in processed {
            if size != (h, w) {
                bail!(
                    "images of one batch preprocess to different sizes ({h}x{w} and {}x{}); \
                     this preprocessing has no fixed output size",
                    size.0,
                    size.1
                );
            }
            data.extend_from_slice(&values);
        }
        let n = images.len();
        let pixels = Tensor::from_vec(data, (n, 3, h as usize, w as usize), device)?;
        // On CUDA the copy ran on this thread's stream (candle uses CUDA's per-thread default
        // streams), concurrently with the forward on the model thread's: it must be finished
        // before the batch is handed over.
        device.synchronize()?;
        Ok(pixels)
    }
}

fn parse_resize(size: &Value) -> Result<Resize> {
    let field = |key: &str| size.get(key).and_then(Value::as_u64).map(|v| v as u32);
    if let Some(s) = size.as_u64() {
        return Ok(Resize::ShortestSide(s as u32));
    }
    if let (Some(height), Some(width)) = (field("height"), field("width")) {
        return Ok(Resize::Exact { height, width });
    }
    if let Some(s) = field("shortest_edge") {
        if size.get("longest_edge").is_some_and(|v| !v.is_null()) {
            bail!("size with both shortest_edge and longest_edge is not supported: {size}");
        }
        return Ok(Resize::ShortestSide(s));
    }
    bail!("unsupported size {size} (expected an integer, {{height, width}} or {{shortest_edge}})")
}

/// Output (height, width) of a resize, with HF's truncation of the long side.
fn resized_size(resize: Resize, height: u32, width: u32) -> (u32, u32) {
    match resize {
        Resize::Exact { height, width } => (height, width),
        Resize::ShortestSide(s) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_long = (s as f64 * long as f64 / short as f64) as u32;
            if width <= height {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// HF `center_crop`: offsets `(size - crop) // 2` (floor), zero padding (centred, rounded up on
/// the top/left) when the image is smaller than the crop.
pub fn center_crop(image: &RgbImage, height: u32, width: u32) -> RgbImage {
    let offsets = center_crop_offsets((image.height(), image.width()), (height, width));
    crop_at(image, offsets, (height, width))
}

/// (top, left) of a center crop of `crop` (height, width) in an image of `size`: floor of half
/// the difference, negative when the crop is larger (the image then moves by ceil(pad / 2)
/// inside a zero canvas).
fn center_crop_offsets(size: (u32, u32), crop: (u32, u32)) -> (i64, i64) {
    (
        (size.0 as i64 - crop.0 as i64).div_euclid(2),
        (size.1 as i64 - crop.1 as i64).div_euclid(2),
    )
}

/// The `size` (height, width) window of `image` whose top-left pixel is `offset` (row, column),
/// zero outside the image.
fn crop_at(image: &RgbImage, offset: (i64, i64), size: (u32, u32)) -> RgbImage {
    let (in_w, in_h) = (image.width() as i64, image.height() as i64);
    let mut out = RgbImage::new(size.1, size.0);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let (sy, sx) = (y as i64 + offset.0, x as i64 + offset.1);
        if (0..in_h).contains(&sy) && (0..in_w).contains(&sx) {
            *px = *image.get_pixel(sx as u32, sy as u32);
        }
    }
    out
}

/// Per-output-pixel source window and fixed-point weights of one resampling pass (PIL's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Coefficients {
    /// (first source index, count) per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output index.
    weights: Vec<i32>,
    ksize: usize,
}

/// The coefficients of the output indices `range` (of `out_size`), in order.
fn coefficients(
    in_size: usize,
    out_size: usize,
    filter: Filter,
    range: std::ops::Range<usize>,
) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(range.len());
    let mut weights = vec![0i32; range.len() * ksize];
    let mut k = vec![0f64; ksize];
    let first = range.start;
    for xx in range {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // PIL truncates toward zero after adding 0.5 (C cast).
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax - xmin;
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(count) {
            *w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        for x in 0..count {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[(xx - first) * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

/// Rounds and clamps a fixed-point accumulator to 0..=255 (PIL's `clip8`).
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like `PIL.Image.resize((width, height), resample)` with `reducing_gap=None` on an RGB
/// image: a horizontal pass, then a vertical pass, each rounded to uint8.
pub fn resample(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    resample_window(
        image,
        (width, height),
        filter,
        0..height as usize,
        0..width as usize,
    )
}

/// The pixels `rows` x `cols` of [`resample`] to `size` (width, height), computed alone: the
/// horizontal pass runs on the columns `cols` of the source rows the vertical pass reads for
/// `rows`, each output pixel from the same coefficients as in the whole image.
fn resample_window(
    image: &RgbImage,
    size: (u32, u32),
    filter: Filter,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (size.0 as usize, size.1 as usize);
    let (win_w, win_h) = (cols.len(), rows.len());
    let src = image.as_raw();
    let rounding = 1i32 << (PRECISION_BITS - 1);
    let vertical = (in_h != out_h).then(|| coefficients(in_h, out_h, filter, rows.clone()));
    // The source rows the vertical pass reads (all of `rows` when there is none).
    let (first_row, last_row) = match &vertical {
        Some(v) => (
            v.bounds.first().map_or(0, |b| b.0),
            v.bounds.last().map_or(0, |&(start, n)| start + n),
        ),
        None => (rows.start, rows.end),
    };
    let temp_rows = first_row..last_row;
    let mut temp = vec![0u8; temp_rows.len() * win_w * 3];
    if in_w != out_w {
        let horizontal = coefficients(in_w, out_w, filter, cols.clone());
        for (r, row_out) in temp.chunks_exact_mut(win_w * 3).enumerate() {
            let row_in = &src[(first_row + r) * in_w * 3..(first_row + r + 1) * in_w * 3];
            for (xx, &(xmin, count)) in horizontal.bounds.iter().enumerate() {
                let k = &horizontal.weights[xx * horizontal.ksize..][..count];
                let mut acc = [rounding; 3];
                for (x, &w) in k.iter().enumerate() {
                    let p = &row_in[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i32 * w;
                    }
                }
                for c in 0..3 {
                    row_out[xx * 3 + c] = clip8(acc[c]);
                }
            }
        }
    } else {
        for (r, row_out) in temp.chunks_exact_mut(win_w * 3).enumerate() {
            let row = (first_row + r) * in_w * 3;
            row_out.copy_from_slice(&src[row + cols.start * 3..row + cols.end * 3]);
        }
    }
    let Some(vertical) = vertical else {
        return RgbImage::from_raw(win_w as u32, win_h as u32, temp).expect("buffer size matches");
    };
    let mut out = vec![0u8; win_h * win_w * 3];
    for (yy, row_out) in out.chunks_exact_mut(win_w * 3).enumerate() {
        let (ymin, count) = vertical.bounds[yy];
        let k = &vertical.weights[yy * vertical.ksize..][..count];
        for (i, value) in row_out.iter_mut().enumerate() {
            let mut acc = rounding;
            for (y, &w) in k.iter().enumerate() {
                acc += temp[(ymin - first_row + y) * win_w * 3 + i] as i32 * w;
            }
            *value = clip8(acc);
        }
    }
    RgbImage::from_raw(win_w as u32, win_h as u32, out).expect("buffer size matches")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_side_truncates_long_side() {
        assert_eq!(
            resized_size(Resize::ShortestSide(256), 480, 640),
            (256, 341)
        );
        assert_eq!(
            resized_size(Resize::ShortestSide(256), 333, 200),
            (426, 256)
        );
        assert_eq!(
            resized_size(Resize::ShortestSide(256), 100, 100),
            (256, 256)
        );
    }

    #[test]
    fn center_crop_pads_small_images_with_zeros() {
        let image = RgbImage::from_pixel(3, 2, image::Rgb([9, 9, 9]));
        let out = center_crop(&image, 4, 5);
        // HF: top_pad = ceil(2 / 2) = 1, left_pad = ceil(2 / 2) = 1.
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 1).0, [9, 9, 9]);
        assert_eq!(out.get_pixel(3, 2).0, [9, 9, 9]);
        assert_eq!(out.get_pixel(4, 2).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 3).0, [0, 0, 0]);
    }

    #[test]
    fn reads_dinov2_and_clip_style_configs() {
        let dinov2 = serde_json::json!({
            "crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
            "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}
        });
        let p = ImagePreprocess::from_hf_json(&dinov2).unwrap();
        assert_eq!(p.resize, Some(Resize::ShortestSide(256)));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.filter, Filter::Bicubic);
        assert_eq!(p.output_size(500, 300), (224, 224));
        let blip = serde_json::json!({"size": {"height": 384, "width": 384}, "resample": 3,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]});
        let p = ImagePreprocess::from_hf_json(&blip).unwrap();
        assert_eq!(
            p.resize,
            Some(Resize::Exact {
                height: 384,
                width: 384
            })
        );
        assert_eq!(p.crop, None);
        assert!(ImagePreprocess::from_hf_json(&serde_json::json!({"size": "big"})).is_err());
    }

    /// A deterministic image with detail in both directions.
    fn pattern(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let v = (x * 37 + y * 91 + x * y * 7) as u8;
            image::Rgb([v, v.wrapping_mul(3), (x ^ y) as u8])
        })
    }

    fn preprocess(resize: Resize, crop: (u32, u32)) -> ImagePreprocess {
        ImagePreprocess {
            resize: Some(resize),
            filter: Filter::Bicubic,
            crop: Some(crop),
            rescale: None,
            mean: [0.0; 3],
            std: [1.0; 3],
            normalize: false,
        }
    }

    #[test]
    fn resizing_only_the_cropped_pixels_gives_the_whole_resize_cropped() {
        let resizes = [
            Resize::ShortestSide(8),
            Resize::ShortestSide(13),
            Resize::Exact {
                height: 9,
                width: 20,
            },
        ];
        for (w, h) in [(1, 300), (300, 1), (17, 11), (8, 8), (5, 40), (64, 3)] {
            let image = pattern(w, h);
            for resize in resizes {
                for crop in [(6, 6), (8, 11), (15, 4), (30, 30)] {
                    let p = preprocess(resize, crop);
                    let (rh, rw) = resized_size(resize, h, w);
                    let whole = center_crop(&resample(&image, rw, rh, p.filter), crop.0, crop.1);
                    assert_eq!(
                        p.resize_and_crop(&image),
                        whole,
                        "{w}x{h} {resize:?} {crop:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_thin_image_costs_its_crop_not_its_resize() {
        // Resized whole, 1 x 400,000 pixels would be 256 x 102,400,000 (79 GB).
        let image = pattern(1, 400_000);
        let start = std::time::Instant::now();
        let out = preprocess(Resize::ShortestSide(256), (224, 224)).resize_and_crop(&image);
        assert_eq!(out.dimensions(), (224, 224));
        assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
    }

    #[test]
    fn resampling_a_constant_image_keeps_it_constant() {
        let image = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 255]));
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let out = resample(&image, 11, 50, filter);
            assert!(out.pixels().all(|p| p.0 == [200, 10, 255]), "{filter:?}");
        }
    }
}
