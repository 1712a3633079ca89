//! Frozen encoders (stage 1). A backbone turns a batch of samples (decoded image and/or caption)
//! into named per-sample outputs such as `image` [D], `text` [D] or `multimodal_tokens` [T, D].
//!
//! Work is split in two so the extractor can overlap them: [`Backbone::prepare`] is the CPU-side
//! preprocessing (resize, normalise, tokenize), run on worker threads ahead of time;
//! [`Backbone::forward`] runs the model on the prepared batch on the backbone's device.

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub mod attention;
pub mod blip;
pub mod blip_text;
pub mod clip;
pub mod composite;
pub mod cpu_ops;
pub mod dinov2;
pub mod layers;
pub mod options;
pub mod preprocess;
pub mod sentence;
pub mod source;

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

/// Loads a backbone from a spec: `family:location[:key=value,...]`, or several joined by `+`
/// (`dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2`), whose outputs are combined.
/// Families: `clip`, `blip`, `dinov2`, `sentence`. A location is a directory in the Hugging Face
/// layout or a Hub repo id; the options are the family's (see [`options`]).
pub fn load(spec: &str, device: &Device) -> Result<Box<dyn Backbone>> {
    let parts = source::parse_spec(spec)?;
    let mut loaded = parts
        .iter()
        .map(|part| {
            load_one(&part.id, part, device)
                .with_context(|| format!("cannot load backbone {}", part.id))
        })
        .collect::<Result<Vec<_>>>()?;
    if loaded.len() == 1 {
        return Ok(loaded.remove(0));
    }
    Ok(Box::new(composite::CompositeBackbone::new(spec, loaded)?))
}

fn load_one(id: &str, part: &source::BackboneSpec, device: &Device) -> Result<Box<dyn Backbone>> {
    let options = &part.options;
    let dir = source::ModelDir::resolve(&part.location)?;
    Ok(match part.family.as_str() {
        "clip" => Box::new(clip::ClipBackbone::load(id, &dir, options, device)?),
        "blip" => Box::new(blip::BlipBackbone::load(id, &dir, options, device)?),
        "dinov2" => {
            options.check_known("dinov2 backbone", &[])?;
            Box::new(dinov2::Dinov2Backbone::load(id, &dir, device)?)
        }
        "sentence" => {
            options.check_known("sentence backbone", &[])?;
            Box::new(sentence::SentenceBackbone::load(id, &dir, device)?)
        }
        other => bail!("unknown backbone family `{other}` (known: clip, blip, dinov2, sentence)"),
    })
}
