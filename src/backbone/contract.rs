//! What every backbone is and gives: the [`Backbone`] trait, the [`Sample`] it reads, the named
//! [`OutputSpec`]s it produces, the [`BackboneInfo`] that identifies it in caches and checkpoints,
//! the [`Compute`] it is loaded for, and the rule by which its forward runs a batch of any size as
//! passes of bounded size ([`rows_per_pass`], [`in_passes`]). The families (`clip`, `blip`,
//! `dinov2`, `sentence`, `composite`) build on it; [`super::load`] picks one from a spec.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::tensor_ops::{Kernels, Precision};

/// Where and how a frozen backbone computes: its device, the number type of its forward pass and
/// which kernels it runs. A `&Device` converts to one with the device's default precision
/// ([`Precision::default_for`]) and the fused kernels ([`Kernels::for_compute`]).
#[derive(Clone, Debug)]
pub struct Compute {
    pub device: Device,
    pub precision: Precision,
    pub kernels: Kernels,
}

impl Compute {
    /// `precision` on `device`, with the fused CPU kernels where they apply (bf16 products on
    /// the CPU for bf16).
    pub fn new(device: &Device, precision: Precision) -> Self {
        Self {
            device: device.clone(),
            precision,
            kernels: Kernels::for_compute(device, precision),
        }
    }

    /// The dtype of the weights and activations ([`Kernels::dtype`]).
    pub fn dtype(&self) -> DType {
        self.kernels.dtype(self.precision)
    }
}

impl From<&Device> for Compute {
    fn from(device: &Device) -> Self {
        Self::new(device, Precision::default_for(device))
    }
}

impl From<&Compute> for Compute {
    fn from(compute: &Compute) -> Self {
        compute.clone()
    }
}

/// Tokens (rows x tokens per row: image patches, or padded caption tokens) one forward pass
/// holds at most on the CPU: the matrix products are large enough for full speed, the activations
/// of a pass stay in cache-friendly megabytes.
const CPU_PASS_TOKENS: usize = 4096;

/// The same on a GPU: large enough to keep it busy (CLIP-L/14 at 224 pixels: 255 images per
/// pass), small enough that a pass's attention scores stay a few GB (BLIP-L at 384 pixels: 113
/// images, 2.4 GB of f32 scores per layer).
const GPU_PASS_TOKENS: usize = 65_536;

/// Most rows of `tokens_per_row` tokens each in one forward pass on `device` (at least 1): every
/// backbone runs a batch of any `--batch-size` as passes of this many rows, so that memory holds
/// one pass's activations, not a batch's.
pub fn rows_per_pass(device: &Device, tokens_per_row: usize) -> usize {
    let budget = if device.is_cpu() {
        CPU_PASS_TOKENS
    } else {
        GPU_PASS_TOKENS
    };
    (budget / tokens_per_row.max(1)).max(1)
}

/// `pass(start, len)` over consecutive ranges of `rows` rows, as few as hold at most `per_pass`
/// rows each, of sizes that differ by one at most (32 rows at 15 per pass: 11, 11, 10, not 15,
/// 15, 2: a small last pass is a slow one); its outputs (the same number each time) concatenated
/// along the rows. One pass when the rows fit.
pub fn in_passes(
    rows: usize,
    per_pass: usize,
    mut pass: impl FnMut(usize, usize) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    if rows <= per_pass {
        return pass(0, rows);
    }
    let count = rows.div_ceil(per_pass.max(1));
    let (size, longer) = (rows / count, rows % count);
    let mut passes = Vec::with_capacity(count);
    let mut start = 0;
    for i in 0..count {
        let len = size + usize::from(i < longer);
        passes.push(pass(start, len)?);
        start += len;
    }
    let outputs = passes.first().map_or(0, Vec::len);
    (0..outputs)
        .map(|i| {
            let parts: Vec<&Tensor> = passes.iter().map(|p| &p[i]).collect();
            Ok(Tensor::cat(&parts, 0)?)
        })
        .collect()
}

/// What a stored output holds: a float feature (f16/f32 in the cache) or a 0/1 mask (u8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    Feature,
    Mask,
}

/// One named output a backbone produces for every sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    /// Shape of ONE sample's value, e.g. `[384]` or `[50, 768]`.
    pub shape: Vec<usize>,
    pub kind: OutputKind,
}

/// Identity of a loaded backbone, recorded in the cache manifest and in checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackboneInfo {
    /// The spec the user gave, e.g. `dinov2:models/dinov2-small`.
    pub id: String,
    /// sha256 of each weight file, by file name.
    pub weights_sha256: Vec<(String, String)>,
    /// Preprocessing as a self-describing JSON value (sizes, mean/std, interpolation, max tokens...).
    pub preprocessing: serde_json::Value,
    /// Caption template (`{caption}` is replaced), when the backbone reads text.
    pub text_template: Option<String>,
}

/// One dataset row handed to a backbone: the decoded RGB image (when the backbone reads images)
/// and the caption.
pub struct Sample {
    pub id: String,
    pub image: Option<image::RgbImage>,
    pub caption: String,
}

/// A batch after CPU-side preprocessing; only the backbone that made it knows its contents.
pub type Prepared = Box<dyn std::any::Any + Send>;

/// A frozen encoder.
pub trait Backbone: Send + Sync {
    fn info(&self) -> BackboneInfo;
    /// The outputs of [`Backbone::forward`], in order.
    fn outputs(&self) -> Vec<OutputSpec>;
    fn needs_images(&self) -> bool;
    fn needs_text(&self) -> bool;
    /// CPU-side preprocessing of one batch (thread-safe; runs ahead of `forward`, on another
    /// thread). Large inputs (pixels) are copied to the backbone's device here, finished before it
    /// returns, so that the copy overlaps the forward of the previous batch.
    fn prepare(&self, batch: &[Sample]) -> Result<Prepared>;
    /// Runs the model on its device (in passes of [`rows_per_pass`]). Returns one f32 tensor per
    /// output of [`Backbone::outputs`], each shaped `[batch, ...shape]`, rows in the order of the
    /// batch given to `prepare`, on the backbone's device.
    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>>;
    /// Embeddings of free texts (label names) by the backbone's text encoder, as its pooled text
    /// output would hold them for captions equal to those texts; `None` for a backbone without
    /// one (images only). On the backbone's device, f32.
    fn embed_texts(&self, _texts: &[String]) -> Result<Option<TextEmbeddings>> {
        Ok(None)
    }
}

/// What [`Backbone::embed_texts`] gives: `[N, D]` f32 rows in the space of the pooled output
/// called `output` (e.g. `text`).
pub struct TextEmbeddings {
    pub output: String,
    pub values: Tensor,
}

/// Samples with these captions and no image (for a text encoder).
pub fn caption_samples(texts: &[String]) -> Vec<Sample> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| Sample {
            id: i.to_string(),
            image: None,
            caption: text.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_cover_every_row_in_order() -> Result<()> {
        let rows = Tensor::arange(0f32, 7.0, &Device::Cpu)?;
        let mut seen = Vec::new();
        let out = in_passes(7, 3, |start, len| {
            seen.push((start, len));
            let part = rows.narrow(0, start, len)?;
            Ok(vec![part.clone(), (part * 2.0)?])
        })?;
        assert_eq!(seen, [(0, 3), (3, 2), (5, 2)]);
        seen.clear();
        in_passes(8, 3, |start, len| {
            seen.push((start, len));
            Ok(vec![])
        })?;
        assert_eq!(seen, [(0, 3), (3, 3), (6, 2)]);
        assert_eq!(out[0].to_vec1::<f32>()?, rows.to_vec1::<f32>()?);
        assert_eq!(out[1].to_vec1::<f32>()?, (rows * 2.0)?.to_vec1::<f32>()?);
        assert_eq!(
            in_passes(2, 3, |_, len| Ok(vec![Tensor::zeros(
                len,
                DType::F32,
                &Device::Cpu
            )?]))?[0]
                .dims(),
            [2]
        );
        Ok(())
    }

    #[test]
    fn a_pass_holds_a_token_budget_and_at_least_one_row() {
        assert_eq!(rows_per_pass(&Device::Cpu, 257), CPU_PASS_TOKENS / 257);
        assert_eq!(rows_per_pass(&Device::Cpu, 100_000), 1);
        assert_eq!(rows_per_pass(&Device::Cpu, 0), CPU_PASS_TOKENS);
    }
}
