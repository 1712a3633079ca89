//! Live classification: a checkpoint's model on the outputs of the backbone it was trained on,
//! run on decoded images and captions instead of read from a cache.
//!
//! The checkpoint records its backbone (the spec, e.g.
//! `dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2`, the sha256 of every weight file
//! and the preprocessing). [`Classifier::load`] loads that spec with each relative location
//! resolved under a backbone root ([`locate`]) and refuses a backbone whose weights, preprocessing
//! or text template differ from the record, or that lacks one of the head's inputs at its shape.
//!
//! Each feature the head reads is rounded to the dtype its cache stored it in (f16 by default)
//! before the head runs, as the head saw it in training: the live path then gives exactly the
//! probabilities of extract + predict on the same forward-pass batches (see [`rows`]), whatever
//! the cache dtype. Masks are 0/1 and need no rounding.
//!
//! [`rows`] labels dataset rows (`multiclip predict --data`); `multiclip serve` batches requests
//! into [`Classifier::classify`].

pub mod rows;

use crate::backbone::source::parse_spec;
use crate::backbone::{self, Backbone, BackboneInfo, OutputKind, Prepared, Sample};
use crate::cache::StoredDtype;
use crate::heads::Inputs;
use crate::model::{Card, Model, OutputSignature};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A checkpoint's head, thresholds and labels on top of its live backbone.
pub struct Classifier {
    model: Model,
    backbone: Box<dyn Backbone>,
    /// Each input of the head: its position among the backbone's outputs, and its signature.
    inputs: Vec<(usize, OutputSignature)>,
}

/// Where the files of a backbone location recorded in a checkpoint are: an absolute path as it
/// is; a relative one under `root` when it exists there; otherwise the location itself (a Hub repo
/// id, or a folder that the backbone loader reports missing).
pub fn locate(location: &str, root: &Path) -> String {
    let path = Path::new(location);
    if path.is_absolute() {
        return location.to_string();
    }
    let under_root = root.join(path);
    if under_root.exists() {
        under_root.to_string_lossy().into_owned()
    } else {
        location.to_string()
    }
}

impl Classifier {
    /// Loads the checkpoint at `checkpoint` and its recorded backbone, relative locations resolved
    /// under `backbone_root` (see [`locate`]), both onto `device`; fails naming the file and both
    /// hashes when the weights found are not the ones the checkpoint was trained on.
    pub fn load(checkpoint: &Path, backbone_root: &Path, device: &Device) -> Result<Self> {
        let model = Model::load(checkpoint, device)?;
        let spec = model.card.inputs.backbone.id.clone();
        let locate_under_root = |location: &str| locate(location, backbone_root);
        let backbone =
            backbone::load_located(&spec, &locate_under_root, device).with_context(|| {
                format!(
                    "loading backbone `{spec}`, recorded in checkpoint {}, with relative locations \
                     under the backbone root {}",
                    model.card.name,
                    backbone_root.display()
                )
            })?;
        Self::new(model, backbone, &locate_under_root)
    }

    /// Joins `model` and a loaded `backbone` after checking that the backbone is the one the model
    /// was trained on; `locate` maps a recorded location to where its files were read (for
    /// messages).
    pub fn new(
        model: Model,
        backbone: Box<dyn Backbone>,
        locate: &dyn Fn(&str) -> String,
    ) -> Result<Self> {
        let name = model.card.name.clone();
        ensure_same_backbone(&model.card.inputs.backbone, &backbone.info(), locate)
            .with_context(|| format!("checkpoint {name}"))?;
        let outputs = backbone.outputs();
        let inputs = model
            .card
            .inputs
            .outputs
            .iter()
            .map(|want| {
                let Some(position) = outputs.iter().position(|o| o.name == want.name) else {
                    bail!(
                        "checkpoint {name} reads `{}`, which backbone `{}` does not produce (it \
                         produces: {})",
                        want.name,
                        model.card.inputs.backbone.id,
                        outputs
                            .iter()
                            .map(|o| o.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                };
                let output = &outputs[position];
                let stored_as_mask = want.dtype == StoredDtype::U8;
                if output.shape != want.shape || stored_as_mask != (output.kind == OutputKind::Mask)
                {
                    bail!(
                        "checkpoint {name} reads `{}` of per-row shape {:?} stored as {:?}, but \
                         the backbone gives {:?} ({:?})",
                        want.name,
                        want.shape,
                        want.dtype,
                        output.shape,
                        output.kind
                    );
                }
                Ok((position, want.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            backbone,
            inputs,
        })
    }

    /// The model card: name, labels, thresholds, head, inputs.
    pub fn card(&self) -> &Card {
        &self.model.card
    }

    pub fn needs_images(&self) -> bool {
        self.backbone.needs_images()
    }

    pub fn needs_text(&self) -> bool {
        self.backbone.needs_text()
    }

    /// CPU-side preprocessing of a batch (resize, normalise, tokenize).
    pub fn prepare(&self, samples: &[Sample]) -> Result<Prepared> {
        self.backbone.prepare(samples)
    }

    /// The head's inputs for a prepared batch: the backbone's forward pass, each feature rounded
    /// to the dtype its cache stored it in. Fails on a non-finite feature, naming its row of the
    /// batch.
    pub fn features(&self, prepared: Prepared) -> Result<Inputs> {
        let outputs = self.backbone.forward(prepared)?;
        self.inputs
            .iter()
            .map(|(position, signature)| {
                let output = outputs
                    .get(*position)
                    .context("the backbone returned fewer outputs than it declares")?;
                let value = match signature.dtype {
                    StoredDtype::F16 => output.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
                    StoredDtype::F32 | StoredDtype::U8 => output.clone(),
                };
                ensure_finite(&signature.name, &value)?;
                Ok((signature.name.clone(), value))
            })
            .collect()
    }

    /// Probabilities `[rows, labels]`, row-major, of the head on `features`.
    pub fn probabilities(&self, features: &Inputs) -> Result<Vec<f32>> {
        let probabilities = self.model.probabilities(features)?;
        Ok(probabilities.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Probabilities `[samples, labels]`, row-major, of decoded samples in one forward pass.
    pub fn classify(&self, samples: &[Sample]) -> Result<Vec<f32>> {
        let features = self.features(self.prepare(samples)?)?;
        self.probabilities(&features)
    }

    /// The labels chosen for `probabilities` at the tuned thresholds (see
    /// [`Model::decisions`]).
    pub fn decisions(&self, probabilities: &[f32], at_least_one: bool) -> Vec<bool> {
        self.model.decisions(probabilities, at_least_one)
    }
}

/// Fails when `value` (`[rows, ...]`) holds a NaN or infinity, naming the output and the row.
fn ensure_finite(name: &str, value: &Tensor) -> Result<()> {
    let rows = value.dim(0)?.max(1);
    let values = value.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "backbone output `{name}` of row {} of the batch is {} (beyond what its cache could \
             store)",
            i / (values.len() / rows).max(1),
            values[i]
        );
    }
    Ok(())
}

/// Fails, naming the weight file and both hashes (or the preprocessing), when the loaded
/// backbone `live` is not the `recorded` one.
fn ensure_same_backbone(
    recorded: &BackboneInfo,
    live: &BackboneInfo,
    locate: &dyn Fn(&str) -> String,
) -> Result<()> {
    for (file, want) in &recorded.weights_sha256 {
        let path = weight_file_path(&recorded.id, file, locate);
        match live.weights_sha256.iter().find(|(f, _)| f == file) {
            Some((_, have)) if have == want => {}
            Some((_, have)) => bail!(
                "backbone weights {path} have sha256 {have}, but the checkpoint was trained on \
                 sha256 {want} (`{file}` in its record): these are other weights"
            ),
            None => bail!(
                "the checkpoint records backbone weights `{file}` (sha256 {want}), but the \
                 backbone loaded from {path} has none (it has: {})",
                live.weights_sha256
                    .iter()
                    .map(|(f, _)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    if let Some((file, _)) = live
        .weights_sha256
        .iter()
        .find(|(f, _)| !recorded.weights_sha256.iter().any(|(r, _)| r == f))
    {
        bail!(
            "the loaded backbone has weights `{file}`, which the checkpoint does not record \
             (it records: {})",
            recorded
                .weights_sha256
                .iter()
                .map(|(f, _)| f.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if live.preprocessing != recorded.preprocessing || live.text_template != recorded.text_template
    {
        bail!(
            "backbone `{}` preprocesses with {} / template {:?}, but the checkpoint was trained \
             with {} / template {:?}",
            recorded.id,
            live.preprocessing,
            live.text_template,
            recorded.preprocessing,
            recorded.text_template
        );
    }
    Ok(())
}

/// Where a weight file of a recorded backbone was read: `file` is `model.safetensors` for a
/// single backbone, `PART/model.safetensors` (PART the part's spec) for one of several.
fn weight_file_path(spec: &str, file: &str, locate: &dyn Fn(&str) -> String) -> String {
    let parts = parse_spec(spec).unwrap_or_default();
    let found = match parts.as_slice() {
        [single] => Some((single, file)),
        _ => parts.iter().find_map(|part| {
            file.strip_prefix(&part.id)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|rest| (part, rest))
        }),
    };
    match found {
        Some((part, name)) => Path::new(&locate(&part.location))
            .join(name)
            .display()
            .to_string(),
        None => file.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locations_resolve_under_the_root_when_there() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("models/m")).unwrap();
        let under = root.path().join("models/m").display().to_string();
        assert_eq!(locate("models/m", root.path()), under);
        assert_eq!(locate("org/repo", root.path()), "org/repo");
        assert_eq!(locate("/abs/dir", root.path()), "/abs/dir");
    }

    #[test]
    fn weight_files_are_named_by_where_they_were_read() {
        let locate = |location: &str| format!("/root/{location}");
        assert_eq!(
            weight_file_path("dinov2:models/d", "model.safetensors", &locate),
            "/root/models/d/model.safetensors"
        );
        assert_eq!(
            weight_file_path(
                "dinov2:models/d+sentence:models/s",
                "sentence:models/s/model.safetensors",
                &locate
            ),
            "/root/models/s/model.safetensors"
        );
    }

    #[test]
    fn other_weights_are_refused_naming_file_and_both_hashes() {
        let info = |hash: &str| BackboneInfo {
            id: "dinov2:models/d".into(),
            weights_sha256: vec![("model.safetensors".into(), hash.into())],
            preprocessing: serde_json::json!({"size": 224}),
            text_template: None,
        };
        let locate = |location: &str| format!("/root/{location}");
        assert!(ensure_same_backbone(&info("aa"), &info("aa"), &locate).is_ok());
        let err = ensure_same_backbone(&info("aa"), &info("bb"), &locate)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/root/models/d/model.safetensors")
                && err.contains("sha256 bb")
                && err.contains("sha256 aa"),
            "{err}"
        );
        let mut other = info("aa");
        other.preprocessing = serde_json::json!({"size": 256});
        let err = ensure_same_backbone(&info("aa"), &other, &locate)
            .unwrap_err()
            .to_string();
        assert!(err.contains("256") && err.contains("224"), "{err}");
    }
}
