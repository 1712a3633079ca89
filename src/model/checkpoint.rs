//! A checkpoint's files: `NAME.safetensors` (the head's weights and fixed buffers) and `NAME.json`
//! (the sidecar) in one folder, how a path names them, reading them back, and what ties them
//! together. What the sidecar holds is the [`ModelCard`], flattened into the training record
//! (`train::checkpoint`), and its [`Seal`].
//!
//! **The seal.** A sidecar records the sha256 of its weights file and a sha256 of its model card
//! (head, loss, labels, thresholds, inputs, seed: a canonical serialisation, with the weights'
//! hash). Loading checks both, so a damaged or replaced weights file (another run's) and an edited
//! card (a flipped `cosine`, a renamed label, a changed threshold) are refused instead of used.
//! Editing a card on purpose is allowed, explicitly: [`seal`] (`multiclip checkpoint seal`) checks
//! the edited card against the weights and seals it again. Sidecars written before seals existed
//! (format 1) are refused until sealed the same way: whoever seals vouches for the files.

use super::ModelCard;
use crate::files::{sha256_hex, write_atomic};
use crate::heads::shapes;
use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Version of the sidecar layout, bumped on incompatible changes (2: sealed).
pub const FORMAT_VERSION: u32 = 2;

/// The last format without a seal.
const UNSEALED_FORMAT: u32 = 1;

/// The two files of checkpoint `name` in `dir`: (weights, sidecar).
pub fn checkpoint_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.safetensors")),
        dir.join(format!("{name}.json")),
    )
}

/// Accepts `NAME`, `NAME.json` or `NAME.safetensors` and returns the (weights, sidecar) paths.
pub fn resolve(path: &Path) -> (PathBuf, PathBuf) {
    let stem = match path.extension().and_then(|e| e.to_str()) {
        Some("json" | "safetensors") => path.with_extension(""),
        _ => path.to_path_buf(),
    };
    let name = stem.file_name().map(|n| n.to_string_lossy().into_owned());
    let dir = stem.parent().unwrap_or(Path::new(""));
    checkpoint_files(dir, &name.unwrap_or_default())
}

/// What ties a sidecar to its weights, and its model card to itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// sha256 of the canonical JSON of the model card and `weights_sha256`.
    pub card_sha256: String,
}

impl Seal {
    /// The seal of `card` with the weights file holding `weights`.
    pub fn new(card: &ModelCard, weights: &[u8]) -> Result<Self> {
        let weights_sha256 = sha256_hex(weights);
        Ok(Self {
            card_sha256: card_sha256(card, &weights_sha256)?,
            weights_sha256,
        })
    }

    /// Fails unless `weights` and `card` are those this seal was made for; `path` names the
    /// checkpoint in the message.
    pub fn check(&self, card: &ModelCard, weights: &[u8], path: &Path) -> Result<()> {
        let (weights_path, sidecar_path) = resolve(path);
        let actual = sha256_hex(weights);
        if actual != self.weights_sha256 {
            bail!(
                "checkpoint weights {} do not match their sidecar {} (sha256 {}, the sidecar \
                 records {}): the file was damaged or replaced, e.g. by another run's weights. \
                 Put the checkpoint's own weights back, or train again",
                weights_path.display(),
                sidecar_path.display(),
                short(&actual),
                short(&self.weights_sha256)
            );
        }
        if card_sha256(card, &self.weights_sha256)? != self.card_sha256 {
            bail!(
                "the model card of checkpoint {} (head, loss, labels, thresholds, inputs, seed) \
                 was changed after it was written: its seal does not match. If you edited it on \
                 purpose, run `multiclip checkpoint seal {}` to check the edit and accept it",
                sidecar_path.display(),
                path.display()
            );
        }
        Ok(())
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// sha256 of the canonical JSON (keys sorted, no spaces) of `{"card": card, "weights_sha256"}`.
fn card_sha256(card: &ModelCard, weights_sha256: &str) -> Result<String> {
    let value = serde_json::json!({
        "card": serde_json::to_value(card)?,
        "weights_sha256": weights_sha256,
    });
    let mut text = String::new();
    canonical_json(&value, &mut text);
    Ok(sha256_hex(text.as_bytes()))
}

/// `value` as JSON with object keys sorted at every level, whatever order it was read in.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The text of the sidecar of the checkpoint at `path`, and the sidecar's path.
fn sidecar_text(path: &Path) -> Result<(String, PathBuf)> {
    let (_, sidecar_path) = resolve(path);
    let text = std::fs::read_to_string(&sidecar_path).with_context(|| {
        format!(
            "reading checkpoint sidecar {} (give --checkpoint as NAME, NAME.json or \
             NAME.safetensors)",
            sidecar_path.display()
        )
    })?;
    Ok((text, sidecar_path))
}

/// Reads the sidecar of the checkpoint at `path` (`NAME`, `NAME.json` or `NAME.safetensors`) as
/// `T` (the model card, the sealed card, or the whole training record); refuses another format
/// version, and an unsealed one with the way to seal it.
pub fn read_sidecar<T: DeserializeOwned>(path: &Path) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let (text, sidecar_path) = sidecar_text(path)?;
    let parse_error = || format!("parsing checkpoint sidecar {}", sidecar_path.display());
    let version: Version = serde_json::from_str(&text).with_context(parse_error)?;
    match version.format_version {
        FORMAT_VERSION => {}
        UNSEALED_FORMAT => bail!(
            "checkpoint {} was written before checkpoints were sealed (sidecar format 1), so \
             nothing shows that its weights and model card are the ones training wrote: if you \
             trust its files, run `multiclip checkpoint seal {}` once",
            sidecar_path.display(),
            path.display()
        ),
        other => bail!(
            "checkpoint {} has sidecar format {other}, this multiclip reads format \
             {FORMAT_VERSION}",
            sidecar_path.display(),
        ),
    }
    serde_json::from_str(&text).with_context(parse_error)
}

/// The bytes of the weights file of the checkpoint at `path`.
pub fn read_weights(path: &Path) -> Result<Vec<u8>> {
    let (weights_path, _) = resolve(path);
    std::fs::read(&weights_path)
        .with_context(|| format!("reading checkpoint weights {}", weights_path.display()))
}

/// Fails listing every difference between the tensors of `weights` (a safetensors file's
/// bytes) and those the head of `card` needs: a missing tensor, another shape or dtype, a tensor
/// the head does not use. Reads only the file's header; builds the head over stand-ins.
pub fn check_tensors(card: &ModelCard, weights: &[u8], path: &Path) -> Result<()> {
    let (weights_path, sidecar_path) = resolve(path);
    let file = SafeTensors::deserialize(weights)
        .with_context(|| format!("{} is not a safetensors file", weights_path.display()))?;
    let ctx = card.inputs.head_context(card.labels.len(), card.seed);
    let file_shapes = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let planned = shapes::plan_for_file(&card.head, &ctx, file_shapes)
        .with_context(|| format!("the head of checkpoint {}", sidecar_path.display()))?;
    let mut problems = Vec::new();
    for (name, shape) in &planned.tensors {
        match file.tensor(name) {
            Err(_) => problems.push(format!("tensor `{name}` {shape:?} is missing")),
            Ok(view) if view.shape() != shape.as_slice() => problems.push(format!(
                "tensor `{name}` has shape {:?}, the head needs {shape:?}",
                view.shape()
            )),
            Ok(view) if view.dtype() != safetensors::Dtype::F32 => problems.push(format!(
                "tensor `{name}` is {:?}, checkpoints hold F32",
                view.dtype()
            )),
            Ok(_) => {}
        }
    }
    let mut extra: Vec<&str> = file
        .names()
        .into_iter()
        .filter(|name| !planned.tensors.contains_key(*name))
        .collect();
    extra.sort_unstable();
    for name in extra {
        let shape = file
            .tensor(name)
            .map(|v| v.shape().to_vec())
            .unwrap_or_default();
        problems.push(format!("tensor `{name}` {shape:?} is not used by the head"));
    }
    if !problems.is_empty() {
        bail!(
            "checkpoint weights {} do not fit the head its sidecar {} describes ({}): {}",
            weights_path.display(),
            sidecar_path.display(),
            card.head,
            problems.join("; ")
        );
    }
    Ok(())
}

/// Seals the checkpoint at `path` as it is now (`multiclip checkpoint seal`): after a deliberate
/// edit of its model card, or once for a checkpoint written before seals. The card is validated
/// and checked against the weights first; the rest of the sidecar is kept as it is, the format
/// raised to [`FORMAT_VERSION`], and the sidecar replaced atomically.
pub fn seal(path: &Path) -> Result<Seal> {
    let (text, sidecar_path) = sidecar_text(path)?;
    let context = || format!("sealing checkpoint {}", sidecar_path.display());
    let mut value: Value = serde_json::from_str(&text).with_context(context)?;
    let Some(sidecar) = value.as_object_mut() else {
        bail!("{} is not a checkpoint sidecar", sidecar_path.display());
    };
    match sidecar.get("format_version").and_then(Value::as_u64) {
        Some(v) if v == u64::from(FORMAT_VERSION) || v == u64::from(UNSEALED_FORMAT) => {}
        other => bail!(
            "checkpoint {} has sidecar format {other:?}, this multiclip seals formats \
             {UNSEALED_FORMAT} and {FORMAT_VERSION}",
            sidecar_path.display()
        ),
    }
    sidecar.insert("format_version".into(), FORMAT_VERSION.into());
    sidecar.remove("seal");
    let card: ModelCard = serde_json::from_value(value.clone()).with_context(context)?;
    card.validate()
        .with_context(|| format!("checkpoint {}", sidecar_path.display()))?;
    let weights = read_weights(path)?;
    check_tensors(&card, &weights, path)?;
    let seal = Seal::new(&card, &weights)?;
    value["seal"] = serde_json::to_value(&seal)?;
    let mut json = serde_json::to_string_pretty(&value)?;
    json.push('\n');
    write_atomic(&sidecar_path, json.as_bytes())?;
    Ok(seal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1, {"y": 2, "x": 0.5}], "a": null}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a": null, "b": [1, {"x": 0.5, "y": 2}]}"#).unwrap();
        let (mut ta, mut tb) = (String::new(), String::new());
        canonical_json(&a, &mut ta);
        canonical_json(&b, &mut tb);
        assert_eq!(ta, r#"{"a":null,"b":[1,{"x":0.5,"y":2}]}"#);
        assert_eq!(ta, tb);
    }
}
