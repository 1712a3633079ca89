//! Checkpoints: the head's weights (fixed buffers included) as safetensors plus a JSON sidecar
//! saying what they are: head configuration, loss, label vocabulary, tuned thresholds, which cache
//! (backbone, weights hash, outputs) and split they were trained on, seed, hyper-parameters,
//! metrics and the per-epoch history.
//!
//! A checkpoint `NAME` is the pair `NAME.safetensors` + `NAME.json` in one folder. Names follow the
//! original project: `{head}_{backbone}_{loss}_v{N}_lr{lr}_bs{batch}_seed{seed}_{criterion}`;
//! saving never overwrites: the version is bumped to the first free one, and an explicit name that
//! exists is refused.

use super::TrainConfig;
use super::history::EpochRecord;
use crate::backbone::BackboneInfo;
use crate::cache::CacheReader;
use crate::heads::HeadConfig;
use crate::loss::Loss;
use crate::metrics::Metrics;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the sidecar layout, bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// One cache output as the head saw it: name, per-row shape and stored dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSignature {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Which features a checkpoint was trained on: enough to refuse a cache from another backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheIdentity {
    /// The backbone as the cache manifest records it (id, weight hashes, preprocessing, template).
    pub backbone: BackboneInfo,
    /// The cache outputs the head consumes.
    pub outputs: Vec<OutputSignature>,
}

impl CacheIdentity {
    /// The identity of `reader`'s cache restricted to the outputs called `inputs`.
    pub fn of_cache(reader: &CacheReader, inputs: &[String]) -> Result<Self> {
        let outputs = inputs
            .iter()
            .map(|name| {
                let output = reader.output_spec(name)?;
                Ok(OutputSignature {
                    name: output.name.clone(),
                    shape: output.shape.clone(),
                    dtype: format!("{:?}", output.dtype).to_lowercase(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            backbone: reader.manifest().header.backbone.clone(),
            outputs,
        })
    }

    /// Fails with a message naming both sides when `reader`'s cache was made by another backbone,
    /// with other weights or preprocessing, or lacks one of this checkpoint's outputs with the
    /// same shape and dtype.
    pub fn ensure_compatible(&self, reader: &CacheReader) -> Result<()> {
        let cache_dir = reader.dir();
        let theirs = &reader.manifest().header.backbone;
        let ours = &self.backbone;
        if theirs.id != ours.id {
            bail!(
                "cache {} was extracted with backbone `{}`, but the checkpoint was trained on \
                 backbone `{}`: extract the data with the checkpoint's backbone",
                cache_dir.display(),
                theirs.id,
                ours.id
            );
        }
        if theirs.weights_sha256 != ours.weights_sha256 {
            bail!(
                "cache {} was extracted with backbone `{}` weights {}, but the checkpoint was \
                 trained on weights {}: extract the data with the checkpoint's weights",
                cache_dir.display(),
                theirs.id,
                weight_hashes(theirs),
                weight_hashes(ours)
            );
        }
        if theirs.preprocessing != ours.preprocessing || theirs.text_template != ours.text_template
        {
            bail!(
                "cache {} was extracted by `{}` with other preprocessing or text template than \
                 the checkpoint's cache (cache: {} / {:?}; checkpoint: {} / {:?})",
                cache_dir.display(),
                theirs.id,
                theirs.preprocessing,
                theirs.text_template,
                ours.preprocessing,
                ours.text_template
            );
        }
        for want in &self.outputs {
            let Ok(output) = reader.output_spec(&want.name) else {
                bail!(
                    "cache {} has no output `{}` (it has: {}), which the checkpoint's head consumes",
                    cache_dir.display(),
                    want.name,
                    reader
                        .outputs()
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            if output.shape != want.shape {
                bail!(
                    "cache {} output `{}` has per-row shape {:?}, but the checkpoint was trained \
                     on {:?}",
                    cache_dir.display(),
                    want.name,
                    output.shape,
                    want.shape
                );
            }
        }
        Ok(())
    }
}

fn weight_hashes(info: &BackboneInfo) -> String {
    info.weights_sha256
        .iter()
        .map(|(file, hash)| format!("{file}:{}", short_hash(hash)))
        .collect::<Vec<_>>()
        .join(",")
}

fn short_hash(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The split file the run used, with its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRef {
    pub path: PathBuf,
    pub sha256: String,
}

/// The sidecar `NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    /// The checkpoint's name (file stem).
    pub name: String,
    pub head: HeadConfig,
    pub loss: Loss,
    /// Label names in vocabulary order (logit k is label k).
    pub labels: Vec<String>,
    /// Per-label decision thresholds on probabilities, tuned on validation.
    pub thresholds: Vec<f32>,
    pub cache: CacheIdentity,
    /// The cache and dataset folders of the run (defaults for `evaluate`).
    pub cache_dir: PathBuf,
    pub data_dir: PathBuf,
    pub split: SplitRef,
    pub seed: u64,
    /// Every training setting (learning rate, batch size, schedule ...).
    pub training: TrainConfig,
    /// Validation metrics of the saved weights at the tuned thresholds.
    pub metrics: Metrics,
    pub val_loss: f64,
    /// Main-stage epoch (1-based) whose weights were saved.
    pub best_epoch: usize,
    pub history: Vec<EpochRecord>,
    /// The multiclip version that wrote it.
    pub written_by: String,
}

/// What goes into a checkpoint's name.
#[derive(Debug, Clone)]
pub struct NameParts<'a> {
    pub head: &'a str,
    pub backbone: &'a str,
    pub loss: &'a str,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
    pub criterion: &'a str,
}

impl NameParts<'_> {
    /// `{head}_{backbone}_{loss}_v{version}_lr{lr}_bs{batch}_seed{seed}_{criterion}`.
    pub fn name(&self, version: u32) -> String {
        format!(
            "{}_{}_{}_v{}_lr{}_bs{}_seed{}_{}",
            self.head,
            self.backbone,
            self.loss,
            version,
            self.lr,
            self.batch_size,
            self.seed,
            self.criterion
        )
    }
}

/// The short backbone name used in checkpoint names: the family of each part of a backbone id
/// (`dinov2:models/dinov2-small+sentence:models/minilm` -> `dinov2-sentence`); parts without a
/// family prefix contribute their last path component. Only `[a-z0-9.-]` survive.
pub fn backbone_short_name(id: &str) -> String {
    let parts: Vec<String> = id
        .split('+')
        .map(|part| {
            let family = match part.split_once(':') {
                Some((family, _)) => family,
                None => part.rsplit(['/', '\\']).next().unwrap_or(part),
            };
            family
                .to_ascii_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
                .collect()
        })
        .filter(|s: &String| !s.is_empty())
        .collect();
    if parts.is_empty() {
        "backbone".to_string()
    } else {
        parts.join("-")
    }
}

/// The two files of checkpoint `name` in `dir`.
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

/// A saved checkpoint: the sidecar and the tensors.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Saves under `dir` as `explicit_name` (refused if it exists) or as the first free version
    /// of `parts`; returns the sidecar's path. The sidecar is created exclusively first, so two
    /// runs cannot take the same name.
    pub fn save(
        &mut self,
        dir: &Path,
        explicit_name: Option<&str>,
        parts: &NameParts,
    ) -> Result<PathBuf> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating checkpoint folder {}", dir.display()))?;
        let (name, mut sidecar) = match explicit_name {
            Some(name) => match create_exclusive(dir, name)? {
                Some(file) => (name.to_string(), file),
                None => bail!(
                    "checkpoint `{name}` already exists in {}: choose another --name or remove it",
                    dir.display()
                ),
            },
            None => {
                let mut version = 1;
                loop {
                    let name = parts.name(version);
                    if let Some(file) = create_exclusive(dir, &name)? {
                        break (name, file);
                    }
                    version += 1;
                }
            }
        };
        let (weights_path, sidecar_path) = checkpoint_files(dir, &name);
        self.meta.name = name;
        let written = (|| -> Result<()> {
            let tmp = weights_path.with_extension("safetensors.tmp");
            candle_core::safetensors::save(&self.tensors, &tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(&tmp, &weights_path)
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
            let json = serde_json::to_string_pretty(&self.meta)?;
            sidecar
                .write_all(json.as_bytes())
                .with_context(|| format!("writing {}", sidecar_path.display()))?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&sidecar_path);
            return Err(e);
        }
        Ok(sidecar_path)
    }

    /// Loads `path` (`NAME`, `NAME.json` or `NAME.safetensors`) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let meta = Self::load_meta(path)?;
        let (weights_path, _) = resolve(path);
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .with_context(|| format!("reading checkpoint weights {}", weights_path.display()))?;
        Ok(Self { meta, tensors })
    }

    /// Reads only the sidecar.
    pub fn load_meta(path: &Path) -> Result<CheckpointMeta> {
        let (_, sidecar_path) = resolve(path);
        let text = fs::read_to_string(&sidecar_path).with_context(|| {
            format!(
                "reading checkpoint sidecar {} (give --checkpoint as NAME, NAME.json or \
                 NAME.safetensors)",
                sidecar_path.display()
            )
        })?;
        let meta: CheckpointMeta = serde_json::from_str(&text)
            .with_context(|| format!("parsing checkpoint sidecar {}", sidecar_path.display()))?;
        if meta.format_version != FORMAT_VERSION {
            bail!(
                "checkpoint {} has sidecar format {}, this multiclip reads format {}",
                sidecar_path.display(),
                meta.format_version,
                FORMAT_VERSION
            );
        }
        Ok(meta)
    }
}

/// Creates `dir/name.json` if neither it nor `dir/name.safetensors` exists.
fn create_exclusive(dir: &Path, name: &str) -> Result<Option<fs::File>> {
    let (weights, sidecar) = checkpoint_files(dir, name);
    if weights.exists() {
        return Ok(None);
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&sidecar)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e).with_context(|| format!("creating {}", sidecar.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> CacheIdentity {
        CacheIdentity {
            backbone: BackboneInfo {
                id: "dinov2:models/dinov2-small".into(),
                weights_sha256: vec![("model.safetensors".into(), "abc123".into())],
                preprocessing: serde_json::json!({"size": 224}),
                text_template: None,
            },
            outputs: vec![OutputSignature {
                name: "image".into(),
                shape: vec![384],
                dtype: "f16".into(),
            }],
        }
    }

    fn checkpoint() -> Checkpoint {
        let tensors = HashMap::from([(
            "fc.weight".to_string(),
            Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap(),
        )]);
        Checkpoint {
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                name: String::new(),
                head: "mlp".parse().unwrap(),
                loss: Loss::Bce,
                labels: vec!["1".into(), "2".into()],
                thresholds: vec![0.4, 0.6],
                cache: identity(),
                cache_dir: "cache/demo".into(),
                data_dir: "data/demo".into(),
                split: SplitRef {
                    path: "split.json".into(),
                    sha256: "00".into(),
                },
                seed: 3407,
                training: TrainConfig::default(),
                metrics: Metrics::compute(&[0.9f32, 0.1], &[1f32, 0.0], &[0.5, 0.5], true),
                val_loss: 0.1,
                best_epoch: 3,
                history: vec![],
                written_by: "test".into(),
            },
            tensors,
        }
    }

    fn parts() -> NameParts<'static> {
        NameParts {
            head: "mlp",
            backbone: "dinov2",
            loss: "bce",
            lr: 0.001,
            batch_size: 256,
            seed: 3407,
            criterion: "f1",
        }
    }

    #[test]
    fn backbone_short_names_keep_the_families() {
        assert_eq!(
            backbone_short_name("dinov2:models/dinov2-small+sentence:models/minilm"),
            "dinov2-sentence"
        );
        assert_eq!(backbone_short_name("models/CLIP_B32"), "clipb32");
        assert_eq!(backbone_short_name(""), "backbone");
    }

    #[test]
    fn names_follow_the_original_pattern() {
        assert_eq!(
            parts().name(2),
            "mlp_dinov2_bce_v2_lr0.001_bs256_seed3407_f1"
        );
    }

    #[test]
    fn saving_twice_bumps_the_version_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let first = checkpoint().save(dir.path(), None, &parts()).unwrap();
        let second = checkpoint().save(dir.path(), None, &parts()).unwrap();
        assert!(first.ends_with("mlp_dinov2_bce_v1_lr0.001_bs256_seed3407_f1.json"));
        assert!(second.ends_with("mlp_dinov2_bce_v2_lr0.001_bs256_seed3407_f1.json"));
        let loaded = Checkpoint::load(&second.with_extension("safetensors"), &Device::Cpu).unwrap();
        assert_eq!(
            loaded.meta.name,
            "mlp_dinov2_bce_v2_lr0.001_bs256_seed3407_f1"
        );
        assert_eq!(loaded.meta.thresholds, vec![0.4, 0.6]);
        assert_eq!(
            loaded.tensors["fc.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
    }

    #[test]
    fn an_existing_explicit_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        checkpoint()
            .save(dir.path(), Some("mine"), &parts())
            .unwrap();
        let err = checkpoint()
            .save(dir.path(), Some("mine"), &parts())
            .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
