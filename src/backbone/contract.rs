//! What every backbone is and gives: the [`Backbone`] trait, the [`Sample`] it reads, the named
//! [`OutputSpec`]s it produces and the [`BackboneInfo`] that identifies it in caches and
//! checkpoints. The families (`clip`, `blip`, `dinov2`, `sentence`, `composite`) build on it;
//! [`super::load`] picks one from a spec.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

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
    /// CPU-side preprocessing of one batch (thread-safe; runs ahead of `forward`).
    fn prepare(&self, batch: &[Sample]) -> Result<Prepared>;
    /// Runs the model. Returns one f32 tensor per output of [`Backbone::outputs`], each shaped
    /// `[batch, ...shape]`, rows in the order of the batch given to `prepare`.
    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>>;
}
