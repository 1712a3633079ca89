//! A checkpoint's files: `NAME.safetensors` (the head's weights and fixed buffers) and `NAME.json`
//! (the sidecar) in one folder, how a path names them, and reading them back. What the sidecar
//! holds is the [`ModelCard`](super::ModelCard), flattened into the training record
//! (`train::checkpoint`).

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Version of the sidecar layout, bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

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

/// Reads the sidecar of the checkpoint at `path` (`NAME`, `NAME.json` or `NAME.safetensors`) as
/// `T` (the model card alone, or the whole training record); refuses another format version.
pub fn read_sidecar<T: DeserializeOwned>(path: &Path) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let (_, sidecar_path) = resolve(path);
    let text = std::fs::read_to_string(&sidecar_path).with_context(|| {
        format!(
            "reading checkpoint sidecar {} (give --checkpoint as NAME, NAME.json or \
             NAME.safetensors)",
            sidecar_path.display()
        )
    })?;
    let parse_error = || format!("parsing checkpoint sidecar {}", sidecar_path.display());
    let version: Version = serde_json::from_str(&text).with_context(parse_error)?;
    if version.format_version != FORMAT_VERSION {
        bail!(
            "checkpoint {} has sidecar format {}, this multiclip reads format {}",
            sidecar_path.display(),
            version.format_version,
            FORMAT_VERSION
        );
    }
    serde_json::from_str(&text).with_context(parse_error)
}

/// Reads the weights (and fixed buffers) of the checkpoint at `path` onto `device`.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let (weights_path, _) = resolve(path);
    candle_core::safetensors::load(&weights_path, device)
        .with_context(|| format!("reading checkpoint weights {}", weights_path.display()))
}
