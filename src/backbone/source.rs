//! Where a backbone's files come from: backbone specs (`family:location[:options]`, several joined
//! by `+`),
//! model directories in the Hugging Face layout (a local folder or a Hub repo id fetched through
//! `hf-hub`, honouring `HF_HUB_OFFLINE`), weight-file discovery (`model.safetensors`, a sharded
//! `model.safetensors.index.json`, or `pytorch_model.bin`), their sha256, a weight store whose
//! errors name the tensor and the file, and the [`Weights`] the layers load from (converted once to
//! the forward's dtype on its device).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::contract::Compute;
use crate::files::sha256_file;
use crate::spec::{Options, Spec, split_unquoted};
use crate::tensor_ops::Kernels;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// One `family:location[:options]` part of a backbone spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackboneSpec {
    /// The part as written (its id in cache manifests).
    pub id: String,
    pub family: String,
    pub location: String,
    pub options: Options,
}

/// Splits a spec such as `dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2` into its
/// parts (the grammar of [`crate::spec`]).
pub fn parse_spec(spec: &str) -> Result<Vec<BackboneSpec>> {
    if spec.trim().is_empty() {
        bail!("empty backbone spec");
    }
    split_unquoted(spec, '+')?
        .into_iter()
        .map(|part| {
            let parsed = Spec::parse_located(part).with_context(|| {
                format!(
                    "backbone spec part `{part}` must look like `family:location[:key=value,...]` \
                     (e.g. `dinov2:models/dinov2-small`)"
                )
            })?;
            Ok(BackboneSpec {
                id: part.trim().to_string(),
                family: parsed.name,
                location: parsed.location.unwrap_or_default(),
                options: parsed.options,
            })
        })
        .collect()
}

/// A model's files in the Hugging Face layout.
#[derive(Clone, Debug)]
pub struct ModelDir {
    /// What the user named (a directory or a Hub repo id), for messages.
    pub location: String,
    origin: Origin,
}

#[derive(Clone, Debug)]
enum Origin {
    Local(PathBuf),
    /// A Hub repo; files are fetched (or, offline, looked up in the hf-hub cache) on demand.
    Hub {
        repo: String,
        offline: bool,
        /// File names of the repo, asked from the Hub once.
        files: std::sync::OnceLock<Vec<String>>,
    },
}

impl ModelDir {
    /// A local directory when `location` is one, otherwise a Hub repo id.
    pub fn resolve(location: &str) -> Result<Self> {
        let path = Path::new(location);
        let origin = if path.is_dir() {
            Origin::Local(path.to_path_buf())
        } else if path.exists() {
            bail!(
                "{location} is a file; a backbone location must be a model directory or a Hub repo id"
            );
        } else if location.split('/').count() == 2 && !location.starts_with(['.', '/']) {
            let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
            Origin::Hub {
                repo: location.to_string(),
                offline,
                files: std::sync::OnceLock::new(),
            }
        } else {
            bail!(
                "model directory {location} does not exist (run scripts/fetch-weights.sh for the \
                 bundled models, or give a Hub repo id such as facebook/dinov2-small)"
            );
        };
        Ok(Self {
            location: location.to_string(),
            origin,
        })
    }

    /// The path of `name` if the model has it.
    pub fn optional_file(&self, name: &str) -> Result<Option<PathBuf>> {
        match &self.origin {
            Origin::Local(dir) => {
                let path = dir.join(name);
                Ok(path.is_file().then_some(path))
            }
            Origin::Hub {
                repo,
                offline: true,
                ..
            } => Ok(hf_hub::Cache::from_env().model(repo.clone()).get(name)),
            Origin::Hub {
                repo,
                offline: false,
                files,
            } => {
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .build()
                    .context("cannot set up the Hugging Face Hub client")?;
                let repo_api = api.model(repo.clone());
                if files.get().is_none() {
                    let info = repo_api.info().with_context(|| {
                        format!("cannot reach the Hub repo {repo} (set HF_HUB_OFFLINE=1 to use the local cache only)")
                    })?;
                    let _ = files.set(info.siblings.into_iter().map(|s| s.rfilename).collect());
                }
                if !files.get().is_some_and(|f| f.iter().any(|f| f == name)) {
                    return Ok(None);
                }
                let path = repo_api
                    .get(name)
                    .with_context(|| format!("cannot download {name} from the Hub repo {repo}"))?;
                Ok(Some(path))
            }
        }
    }

    /// The path of `name`, which the model must have.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        self.optional_file(name)?
            .with_context(|| match &self.origin {
                Origin::Local(dir) => format!("{} is missing", dir.join(name).display()),
                Origin::Hub {
                    repo,
                    offline: true,
                    ..
                } => format!(
                    "{name} of {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
                ),
                Origin::Hub { repo, .. } => format!("the Hub repo {repo} has no {name}"),
            })
    }

    /// Reads a JSON file of the model (e.g. `config.json`) into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.file(name)?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// The weight files: `model.safetensors`, the shards of `model.safetensors.index.json`, or
    /// `pytorch_model.bin`, in that order of preference.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        if let Some(path) = self.optional_file("model.safetensors")? {
            return Ok(vec![path]);
        }
        if let Some(index) = self.optional_file("model.safetensors.index.json")? {
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&index)
                    .with_context(|| format!("cannot read {}", index.display()))?,
            )
            .with_context(|| format!("invalid {}", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no weight_map", index.display()))?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            return shards.into_iter().map(|name| self.file(name)).collect();
        }
        if let Some(path) = self.optional_file("pytorch_model.bin")? {
            return Ok(vec![path]);
        }
        bail!(
            "no weights in {}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
            self.location
        )
    }
}

/// (file name, sha256) of each weight file.
pub fn weights_sha256(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    files
        .iter()
        .map(|path| {
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            Ok((name, sha256_file(path)?))
        })
        .collect()
}

/// The tensors of a model's weight files, memory-mapped where the format allows.
pub struct WeightStore {
    files: Vec<WeightFile>,
    /// Tensor name -> index in `files`.
    index: HashMap<String, usize>,
}

struct WeightFile {
    path: PathBuf,
    contents: WeightContents,
}

enum WeightContents {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// A PyTorch pickle (`pytorch_model.bin`), read whole.
    Pickle(HashMap<String, Tensor>),
}

impl WeightStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
            let (contents, names) = if is_safetensors {
                // SAFETY: the file is only read; mutating it while we run is the user's problem,
                // as with every memory-mapped model loader.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                    .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
                let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
                (WeightContents::Safetensors(st), names)
            } else {
                let tensors: HashMap<String, Tensor> = candle_core::pickle::read_all(path)
                    .with_context(|| format!("cannot read PyTorch weights {}", path.display()))?
                    .into_iter()
                    .collect();
                let names = tensors.keys().cloned().collect();
                (WeightContents::Pickle(tensors), names)
            };
            for name in names {
                index.insert(name, i);
            }
            files.push(WeightFile {
                path: path.clone(),
                contents,
            });
        }
        Ok(Self { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<(Tensor, &Path)> {
        let Some(&i) = self.index.get(name) else {
            candle_core::bail!("tensor `{name}` is missing from {}", self.file_list());
        };
        let file = &self.files[i];
        let tensor = match &file.contents {
            WeightContents::Safetensors(st) => st.load(name, dev).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot load tensor `{name}` from {}: {e}",
                    file.path.display()
                ))
            })?,
            WeightContents::Pickle(map) => map[name].to_device(dev)?,
        };
        Ok((tensor, &file.path))
    }

    /// A `VarBuilder` over these weights (converted to `dtype` on `device`).
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for WeightStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (tensor, path) = self.load(name, dev)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "tensor `{name}` in {} has shape {:?}, expected {:?} (does config.json match the weights?)",
                path.display(),
                tensor.dims(),
                shape.dims()
            );
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.0.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// A model's weights as its layers load them: every tensor converted to the forward's dtype on its
/// device (a `VarBuilder`), and the kernels the layers built from them run.
#[derive(Clone)]
pub struct Weights {
    vb: VarBuilder<'static>,
    kernels: Kernels,
}

impl Weights {
    pub fn new(vb: VarBuilder<'static>, kernels: Kernels) -> Self {
        Self { vb, kernels }
    }

    /// The weights under `name.` (as `VarBuilder::pp`).
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            kernels: self.kernels,
        }
    }

    /// The tensor `name` of this shape (an error naming tensor and file otherwise).
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
        self.vb.get(shape, name)
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
}

/// Weights of a model directory plus their identity.
pub struct LoadedWeights {
    pub vb: Weights,
    pub sha256: Vec<(String, String)>,
}

/// Opens the weights of `dir` for `compute` (its dtype, device and kernels). When the checkpoint
/// stores the model under a prefix (e.g. `bert.` in a `BertForMaskedLM` file), give the tensor
/// name that identifies the bare model in `probe`; the builder is then rooted at that prefix.
pub fn load_weights(
    dir: &ModelDir,
    compute: &Compute,
    probe: &str,
    prefixes: &[&str],
) -> Result<LoadedWeights> {
    let files = dir.weight_files()?;
    let sha256 = weights_sha256(&files)?;
    let store = WeightStore::open(&files)?;
    let prefix = std::iter::once("")
        .chain(prefixes.iter().copied())
        .find(|p| store.contains(&join_prefix(p, probe)));
    let Some(prefix) = prefix else {
        bail!(
            "the weights of {} have no tensor `{probe}` (is this the right model family?)",
            dir.location
        );
    };
    let vb = store.into_var_builder(compute.dtype(), &compute.device);
    let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
    Ok(LoadedWeights {
        vb: Weights::new(vb, compute.kernels),
        sha256,
    })
}

fn join_prefix(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_combined_specs() {
        let parts = parse_spec(
            "dinov2:models/dinov2-small+sentence:sentence-transformers/all-MiniLM-L6-v2",
        )
        .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0],
            BackboneSpec {
                id: "dinov2:models/dinov2-small".into(),
                family: "dinov2".into(),
                location: "models/dinov2-small".into(),
                options: Options::default(),
            }
        );
        assert_eq!(parts[1].location, "sentence-transformers/all-MiniLM-L6-v2");
        let parts = parse_spec(r#"clip:models/clip:template="a+b {caption}"+sentence:m"#).unwrap();
        assert_eq!(parts[0].id, r#"clip:models/clip:template="a+b {caption}""#);
        assert_eq!(
            parts[0].options.get("template").unwrap(),
            Some("a+b {caption}")
        );
        assert_eq!(parts[1].family, "sentence");
        assert!(parse_spec("dinov2").is_err());
        assert!(parse_spec("dinov2:").is_err());
        assert!(parse_spec("dinov2:a+").is_err());
        assert!(parse_spec("").is_err());
    }

    #[test]
    fn missing_local_directory_is_a_clear_error() {
        let err = ModelDir::resolve("./no/such/dir").unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn store_errors_name_tensor_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a.weight".to_string(), t)]), &path)
            .unwrap();
        let store = WeightStore::open(std::slice::from_ref(&path)).unwrap();
        let vb = store.into_var_builder(DType::F32, &Device::Cpu);
        let err = vb.get((3, 2), "a.weight").unwrap_err().to_string();
        assert!(
            err.contains("a.weight") && err.contains("model.safetensors") && err.contains("[2, 3]"),
            "{err}"
        );
        let err = vb.get((3, 2), "b.weight").unwrap_err().to_string();
        assert!(
            err.contains("b.weight") && err.contains("model.safetensors"),
            "{err}"
        );
        assert!(vb.get((2, 3), "a.weight").is_ok());
    }
}
