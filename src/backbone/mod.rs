//! Frozen encoders (stage 1). A backbone turns a batch of samples (decoded image and/or caption)
//! into named per-sample outputs such as `image` [D], `text` [D] or `multimodal_tokens` [T, D].
//!
//! Work is split in two so the extractor can overlap them: [`Backbone::prepare`] is the CPU-side
//! preprocessing (resize, normalise, tokenize), run on worker threads ahead of time, which also
//! copies the pixels to the device; [`Backbone::forward`] runs the model on the prepared batch on
//! the backbone's device, in the precision it was loaded with ([`Compute`]).

use anyhow::{Context, Result, bail};

pub mod activation;
pub mod attention;
pub mod blip;
pub mod blip_text;
pub mod clip;
pub mod composite;
pub mod contract;
pub mod cpu_ops;
pub mod dinov2;
pub mod layers;
pub mod options;
pub mod preprocess;
pub mod sentence;
pub mod source;
pub mod text;

pub use contract::{
    Backbone, BackboneInfo, Compute, OutputKind, OutputSpec, Prepared, Sample, TextEmbeddings,
};

/// Loads a backbone from a spec: `family:location[:key=value,...]`, or several joined by `+`
/// (`dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2`), whose outputs are combined.
/// Families: `clip`, `blip`, `dinov2`, `sentence`. A location is a directory in the Hugging Face
/// layout or a Hub repo id; the options are the family's (see [`options`]). `compute` is a
/// [`Compute`] or a `&Device` (its default precision).
pub fn load(spec: &str, compute: impl Into<Compute>) -> Result<Box<dyn Backbone>> {
    load_located(spec, &|location| location.to_string(), compute)
}

/// [`load`] with each part's files looked for at `locate(location)` (e.g. a relative location
/// resolved under another folder); ids, and so the [`BackboneInfo`], stay as `spec` writes them.
pub fn load_located(
    spec: &str,
    locate: &dyn Fn(&str) -> String,
    compute: impl Into<Compute>,
) -> Result<Box<dyn Backbone>> {
    let compute = compute.into();
    let parts = source::parse_spec(spec)?;
    let mut loaded = parts
        .iter()
        .map(|part| {
            load_one(&part.id, &locate(&part.location), part, &compute)
                .with_context(|| format!("cannot load backbone {}", part.id))
        })
        .collect::<Result<Vec<_>>>()?;
    // The weights were copied on this thread's CUDA stream: finished, any thread may use them.
    compute.device.synchronize()?;
    if loaded.len() == 1 {
        return Ok(loaded.remove(0));
    }
    Ok(Box::new(composite::CompositeBackbone::new(spec, loaded)?))
}

fn load_one(
    id: &str,
    location: &str,
    part: &source::BackboneSpec,
    compute: &Compute,
) -> Result<Box<dyn Backbone>> {
    let options = &part.options;
    let dir = source::ModelDir::resolve(location)?;
    Ok(match part.family.as_str() {
        "clip" => Box::new(clip::ClipBackbone::load(id, &dir, options, compute)?),
        "blip" => Box::new(blip::BlipBackbone::load(id, &dir, options, compute)?),
        "dinov2" => Box::new(dinov2::Dinov2Backbone::load(id, &dir, options, compute)?),
        "sentence" => Box::new(sentence::SentenceBackbone::load(
            id, &dir, options, compute,
        )?),
        other => bail!("unknown backbone family `{other}` (known: clip, blip, dinov2, sentence)"),
    })
}
