//! Writing checkpoints: the head's weights (fixed buffers included) as safetensors plus a JSON
//! sidecar saying what they are: the model card (head configuration, loss, label vocabulary, tuned
//! thresholds, the inputs' backbone and outputs, seed; see [`crate::model`], which reads them
//! back) and the record of the run: cache, data and split it was trained on, hyper-parameters,
//! metrics and the per-epoch history.
//!
//! A checkpoint `NAME` is the pair `NAME.safetensors` + `NAME.json` in one folder
//! ([`crate::model::checkpoint`]). Names follow the
//! original project: `{head}_{backbone}_{loss}_v{N}_lr{lr}_bs{batch}_seed{seed}_{criterion}`;
//! saving never overwrites: a name is taken when any file of a run of that name exists (the
//! checkpoint pair, or the report written beside it, [`RUN_FILE_EXTENSIONS`]); the version is then
//! bumped to the first free one, and an explicit name that is taken is refused. The sidecar is
//! written last, atomically and sealed ([`crate::model::checkpoint::Seal`]).

use super::TrainConfig;
use super::budget::HeadSize;
use super::folds::FoldRef;
use super::history::EpochRecord;
use crate::files::write_atomic;
use crate::heads::Head;
use crate::metrics::Metrics;
use crate::model::ModelCard;
use crate::model::checkpoint::{Seal, checkpoint_files, read_sidecar};
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Extension of the run report beside a checkpoint (`NAME.report.html`, `crate::report`).
pub const REPORT_EXTENSION: &str = "report.html";
/// Extension of the report's numbers (`NAME.metrics.json`).
pub const METRICS_EXTENSION: &str = "metrics.json";
/// Every file a training run writes for checkpoint `NAME`, as `NAME.<extension>`.
pub const RUN_FILE_EXTENSIONS: [&str; 4] =
    ["safetensors", "json", REPORT_EXTENSION, METRICS_EXTENSION];

/// The split file the run used, with its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRef {
    pub path: PathBuf,
    pub sha256: String,
}

/// The sidecar `NAME.json`: the model card and the record of the run that trained it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Head, loss, labels, thresholds, inputs, seed: what using the model needs.
    #[serde(flatten)]
    pub model: ModelCard,
    /// The cache and dataset folders of the run (defaults for `evaluate`).
    pub cache_dir: PathBuf,
    pub data_dir: PathBuf,
    pub split: SplitRef,
    /// Every training setting (learning rate, batch size, schedule ...).
    pub training: TrainConfig,
    /// Validation metrics of the saved weights at the tuned thresholds.
    pub metrics: Metrics,
    pub val_loss: f64,
    /// Main-stage epoch (1-based) whose weights were saved.
    pub best_epoch: usize,
    pub history: Vec<EpochRecord>,
    /// Trainable parameters and saved bytes (0 in sidecars written before they were recorded).
    #[serde(default)]
    pub size: HeadSize,
    /// The fold this member of a k-fold ensemble validated on (absent for a plain run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<FoldRef>,
    /// The multiclip version that wrote it.
    pub written_by: String,
}

/// What any sidecar (a head's or an ensemble's) says about the data it was trained on: the
/// defaults of `evaluate`.
#[derive(Debug, Clone, Deserialize)]
pub struct RunRecord {
    pub cache_dir: PathBuf,
    pub data_dir: PathBuf,
    pub split: SplitRef,
    /// Set for k-fold ensembles and their members.
    #[serde(default)]
    pub fold: Option<FoldRef>,
}

/// What goes into a checkpoint's name.
#[derive(Debug, Clone)]
pub struct NameParts {
    pub head: String,
    pub backbone: String,
    pub loss: String,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
    pub criterion: String,
}

impl NameParts {
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

/// A saved checkpoint: the sidecar and the tensors.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Saves under `dir` as `explicit_name` (refused if taken) or as the first free version of
    /// `parts`; returns the sidecar's path. The name is reserved by creating the sidecar
    /// exclusively, so two runs cannot take the same name; on failure nothing is left behind.
    pub fn save(
        &mut self,
        dir: &Path,
        explicit_name: Option<&str>,
        parts: &NameParts,
    ) -> Result<PathBuf> {
        let name = reserve_name(dir, explicit_name, |version| parts.name(version))?;
        let (weights_path, sidecar_path) = checkpoint_files(dir, &name);
        self.meta.model.name = name;
        let tmp = weights_path.with_extension("safetensors.tmp");
        let written = (|| -> Result<()> {
            candle_core::safetensors::save(&self.tensors, &tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(&tmp, &weights_path)
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
            let weights = fs::read(&weights_path)
                .with_context(|| format!("reading back {}", weights_path.display()))?;
            let mut sidecar = serde_json::to_value(&self.meta)?;
            sidecar["seal"] = serde_json::to_value(Seal::new(&self.meta.model, &weights)?)?;
            let mut json = serde_json::to_string_pretty(&sidecar)?;
            json.push('\n');
            write_atomic(&sidecar_path, json.as_bytes())
        })();
        if let Err(e) = written {
            for path in [&tmp, &weights_path, &sidecar_path] {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
        Ok(sidecar_path)
    }

    /// Reads only the sidecar.
    pub fn load_meta(path: &Path) -> Result<CheckpointMeta> {
        read_sidecar(path)
    }
}

/// Everything a checkpoint of `head` holds: the trainable variables of `varmap` and the head's
/// buffers, by full name (save with `candle_core::safetensors::save`).
pub fn checkpoint_tensors(varmap: &VarMap, head: &dyn Head) -> Result<HashMap<String, Tensor>> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?;
    let mut tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    for (name, tensor) in head.buffers() {
        if tensors.insert(name.clone(), tensor).is_some() {
            bail!("buffer `{name}` clashes with a trainable variable");
        }
    }
    Ok(tensors)
}

/// Reserves a run's name in `dir`: `explicit` (refused, naming the file, if taken) or the first
/// free `default(version)` for versions 1, 2, ... The sidecar `NAME.json` is created empty and
/// exclusively, so two runs cannot take the same name until the run replaces it.
pub(crate) fn reserve_name(
    dir: &Path,
    explicit: Option<&str>,
    default: impl Fn(u32) -> String,
) -> Result<String> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating checkpoint folder {}", dir.display()))?;
    if let Some(name) = explicit {
        if let Some(taken) = reserve(dir, name)? {
            bail!(
                "checkpoint `{name}` is taken in {}: {} exists (nothing is overwritten); \
                 choose another --name or remove it",
                dir.display(),
                taken.display()
            );
        }
        return Ok(name.to_string());
    }
    for version in 1.. {
        let name = default(version);
        if reserve(dir, &name)?.is_none() {
            return Ok(name);
        }
    }
    unreachable!("versions never run out")
}

/// Reserves the name `name` in `dir` by creating `dir/name.json` exclusively, unless a file of
/// a run of that name exists ([`RUN_FILE_EXTENSIONS`]): returns that file, or `None` when the
/// name is now reserved.
fn reserve(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let files = RUN_FILE_EXTENSIONS.map(|ext| dir.join(format!("{name}.{ext}")));
    // `symlink_metadata`: a dangling link is taken too.
    if let Some(taken) = files.iter().find(|f| f.symlink_metadata().is_ok()) {
        return Ok(Some(taken.clone()));
    }
    let (_, sidecar) = checkpoint_files(dir, name);
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&sidecar)
    {
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Some(sidecar)),
        Err(e) => Err(e).with_context(|| format!("creating {}", sidecar.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::BackboneInfo;
    use crate::cache::StoredDtype;
    use crate::loss::Loss;
    use crate::model::checkpoint::FORMAT_VERSION;
    use crate::model::{InputSignature, OutputSignature};
    use candle_core::Device;

    fn identity() -> InputSignature {
        InputSignature {
            backbone: BackboneInfo {
                id: "dinov2:models/dinov2-small".into(),
                weights_sha256: vec![("model.safetensors".into(), "abc123".into())],
                preprocessing: serde_json::json!({"size": 224}),
                text_template: None,
            },
            outputs: vec![OutputSignature {
                name: "image".into(),
                shape: vec![384],
                dtype: StoredDtype::F16,
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
                model: ModelCard {
                    format_version: FORMAT_VERSION,
                    name: String::new(),
                    head: "mlp".parse().unwrap(),
                    loss: Loss::Bce,
                    labels: vec!["1".into(), "2".into()],
                    thresholds: vec![0.4, 0.6],
                    inputs: identity(),
                    seed: 3407,
                },
                cache_dir: "cache/demo".into(),
                data_dir: "data/demo".into(),
                split: SplitRef {
                    path: "split.json".into(),
                    sha256: "00".into(),
                },
                training: TrainConfig::default(),
                metrics: Metrics::compute(&[0.9f32, 0.1], &[1f32, 0.0], &[0.5, 0.5], true),
                val_loss: 0.1,
                best_epoch: 3,
                history: vec![],
                size: HeadSize::default(),
                fold: None,
                written_by: "test".into(),
            },
            tensors,
        }
    }

    fn parts() -> NameParts {
        NameParts {
            head: "mlp".into(),
            backbone: "dinov2".into(),
            loss: "bce".into(),
            lr: 0.001,
            batch_size: 256,
            seed: 3407,
            criterion: "f1".into(),
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
        let loaded = Checkpoint::load_meta(&second.with_extension("safetensors")).unwrap();
        assert_eq!(
            loaded.model.name,
            "mlp_dinov2_bce_v2_lr0.001_bs256_seed3407_f1"
        );
        assert_eq!(loaded.model.thresholds, vec![0.4, 0.6]);
        let weights = fs::read(second.with_extension("safetensors")).unwrap();
        let tensors = candle_core::safetensors::load_buffer(&weights, &Device::Cpu).unwrap();
        assert_eq!(
            tensors["fc.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        // Sealed: the seal holds for the card and weights as written, not for others.
        let sidecar: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&second).unwrap()).unwrap();
        let seal: Seal = serde_json::from_value(sidecar["seal"].clone()).unwrap();
        seal.check(&loaded.model, &weights, &second).unwrap();
        let mut edited = loaded.model.clone();
        edited.thresholds[1] = 0.5;
        assert!(seal.check(&edited, &weights, &second).is_err());
        let first_weights = fs::read(first.with_extension("safetensors")).unwrap();
        assert_eq!(first_weights, weights);
        let mut other = weights.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(seal.check(&loaded.model, &other, &second).is_err());
    }

    #[test]
    fn sidecars_written_before_the_inputs_were_renamed_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = checkpoint().save(dir.path(), None, &parts()).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"inputs\": {"), "{text}");
        fs::write(&path, text.replace("\"inputs\": {", "\"cache\": {")).unwrap();
        let old = Checkpoint::load_meta(&path).unwrap();
        assert_eq!(old.model.inputs, identity());
        let card: ModelCard = read_sidecar(&path).unwrap();
        assert_eq!(card, old.model);
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
        assert!(err.to_string().contains("mine.safetensors exists"), "{err}");
    }

    #[test]
    fn a_name_is_taken_by_any_file_of_its_run() {
        let dir = tempfile::tempdir().unwrap();
        for ext in RUN_FILE_EXTENSIONS {
            let name = format!("taken-{}", ext.replace('.', "-"));
            let file = dir.path().join(format!("{name}.{ext}"));
            fs::write(&file, "keep").unwrap();
            let err = checkpoint()
                .save(dir.path(), Some(&name), &parts())
                .unwrap_err();
            assert!(err.to_string().contains(&format!("{name}.{ext}")), "{err}");
            assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
        }
        // A generated name bumps past them.
        fs::write(
            dir.path().join(format!("{}.report.html", parts().name(1))),
            "keep",
        )
        .unwrap();
        let saved = checkpoint().save(dir.path(), None, &parts()).unwrap();
        assert!(saved.ends_with(format!("{}.json", parts().name(2))));
    }
}
