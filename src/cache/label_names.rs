//! `label-names.safetensors`: embeddings of the label names by the backbone's text encoder
//! (`extract --label-names`), for heads that start from them (`queries=labels`).
//!
//! One f32 tensor `embeddings` `[K, D]`, row `k` the name of `labels[k]`, and under the single
//! metadata key `multiclip` a JSON object [`LabelNamesMeta`]: the fingerprint of the cache it
//! belongs to (a file copied from another cache is refused), the labels, the names embedded,
//! the pooled output whose space the rows live in (`text`), and the xxh3-128 hash of the tensor
//! bytes. It sits beside the shards, outside the manifest, so that adding it to a finished cache
//! never rewrites the manifest or any shard; [`check`] is part of every integrity check of the
//! cache ([`super::integrity`]).

use super::shard::RawView;
use crate::data::LabelVocab;
use crate::files::{self, ContentHash, HashAlgorithm};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The file name inside a cache directory.
pub const LABEL_NAMES_FILE: &str = "label-names.safetensors";
/// The dataset file that maps label tokens to names (`label,name`), for numeric ids.
pub const LABEL_NAMES_CSV: &str = "label_names.csv";

const META_KEY: &str = "multiclip";
const TENSOR: &str = "embeddings";

/// What the file says about its rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelNamesMeta {
    /// Fingerprint of the cache (its manifest's) the file belongs to.
    pub fingerprint: String,
    /// Label tokens, one per row.
    pub labels: Vec<String>,
    /// The text embedded for each label.
    pub names: Vec<String>,
    /// The pooled output whose space the rows are in.
    pub output: String,
    /// Hash of the tensor's bytes.
    pub hash: ContentHash,
}

/// Label-name embeddings of a cache.
#[derive(Clone, Debug)]
pub struct LabelNames {
    pub meta: LabelNamesMeta,
    /// `[K, D]` f32 on the CPU.
    pub embeddings: Tensor,
}

impl LabelNames {
    /// Rows in the column order of `vocab`; every label of it must have a name here.
    pub fn for_vocab(&self, vocab: &LabelVocab) -> Result<Tensor> {
        let index: HashMap<&str, usize> = self
            .meta
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        let rows = vocab
            .names()
            .iter()
            .map(|label| {
                index.get(label.as_str()).map(|&i| i as u32).with_context(|| {
                    format!(
                        "label `{label}` has no name embedding in the cache ({LABEL_NAMES_FILE} \
                         covers {} labels): extract again with --label-names",
                        self.meta.labels.len()
                    )
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let rows = Tensor::from_vec(rows, vocab.len(), &Device::Cpu)?;
        Ok(self.embeddings.index_select(&rows, 0)?)
    }

    /// Rows x width.
    pub fn dims(&self) -> (usize, usize) {
        self.embeddings.dims2().unwrap_or((0, 0))
    }
}

/// The name of every label of `vocab`: from `DATA/label_names.csv` (header `label,name`) when
/// the dataset has one, which must name every label; else the token itself with `_` read as a
/// space (`traffic_light` -> `traffic light`).
pub fn label_texts(data_dir: &Path, vocab: &LabelVocab) -> Result<Vec<String>> {
    let path = data_dir.join(LABEL_NAMES_CSV);
    if !path.exists() {
        return Ok(vocab.names().iter().map(|l| l.replace('_', " ")).collect());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map_or("", |(_, l)| l.trim_start_matches('\u{feff}').trim());
    if header != "label,name" {
        bail!(
            "{}: the header must be `label,name`, found `{header}`",
            path.display()
        );
    }
    let mut names = HashMap::new();
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        // A label has no comma; the name is the rest of the line, quoted or not.
        let Some((label, name)) = line.split_once(',') else {
            bail!("{} line {line_no}: expected `label,name`", path.display());
        };
        let (label, name) = (label.trim(), unquote(name.trim()));
        if name.is_empty() {
            bail!(
                "{} line {line_no}: label `{label}` has an empty name",
                path.display()
            );
        }
        if names.insert(label.to_string(), name).is_some() {
            bail!(
                "{} line {line_no}: label `{label}` is named twice",
                path.display()
            );
        }
    }
    vocab
        .names()
        .iter()
        .map(|label| {
            names.get(label).cloned().with_context(|| {
                format!(
                    "{}: label `{label}` of train.csv has no name",
                    path.display()
                )
            })
        })
        .collect()
}

/// `"a ""b"" c"` -> `a "b" c`; an unquoted value as it is.
fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => value.to_string(),
    }
}

/// Writes the embeddings `[K, D]` (any device, f32) of `names` for `labels` into `dir`
/// (atomically), bound to the cache of `fingerprint`.
pub fn save(
    dir: &Path,
    fingerprint: &str,
    labels: &[String],
    names: &[String],
    output: &str,
    embeddings: &Tensor,
) -> Result<()> {
    let (rows, dim) = embeddings.dims2()?;
    ensure!(
        rows == labels.len() && rows == names.len(),
        "{rows} label embeddings for {} labels and {} names",
        labels.len(),
        names.len()
    );
    let values: Vec<f32> = embeddings
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!("the embedding of label `{}` is not finite", labels[i / dim]);
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let meta = LabelNamesMeta {
        fingerprint: fingerprint.to_string(),
        labels: labels.to_vec(),
        names: names.to_vec(),
        output: output.to_string(),
        hash: ContentHash::of(HashAlgorithm::Xxh3_128, &bytes),
    };
    let view = RawView {
        dtype: safetensors::Dtype::F32,
        shape: vec![rows, dim],
        data: &bytes,
    };
    let metadata = HashMap::from([(META_KEY.to_string(), serde_json::to_string(&meta)?)]);
    let file = safetensors::serialize([(TENSOR.to_string(), view)], Some(metadata))?;
    files::write_atomic(&dir.join(LABEL_NAMES_FILE), &file)
}

/// The label names of the cache in `dir` of `fingerprint`: `None` when it has none, an error
/// naming the file when it is unreadable, belongs to another cache, or fails its hash.
pub fn load(dir: &Path, fingerprint: &str) -> Result<Option<LabelNames>> {
    let path = dir.join(LABEL_NAMES_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    decode(&bytes, fingerprint)
        .with_context(|| path.display().to_string())
        .map(Some)
}

fn decode(bytes: &[u8], fingerprint: &str) -> Result<LabelNames> {
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).context("not a safetensors file")?;
    let meta_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .with_context(|| format!("no `{META_KEY}` metadata"))?;
    let meta: LabelNamesMeta = serde_json::from_str(meta_json)
        .with_context(|| format!("invalid `{META_KEY}` metadata"))?;
    if meta.fingerprint != fingerprint {
        bail!(
            "belongs to another cache (fingerprint {}, this cache {fingerprint}): extract again \
             with --label-names",
            meta.fingerprint
        );
    }
    let tensors = safetensors::SafeTensors::deserialize(bytes).context("not a safetensors file")?;
    let view = tensors
        .tensor(TENSOR)
        .with_context(|| format!("no tensor `{TENSOR}`"))?;
    let k = meta.labels.len();
    ensure!(
        view.dtype() == safetensors::Dtype::F32
            && view.shape().len() == 2
            && view.shape()[0] == k
            && meta.names.len() == k,
        "`{TENSOR}` is {:?} {:?}, expected F32 [{k}, D] for {k} labels and {} names",
        view.dtype(),
        view.shape(),
        meta.names.len()
    );
    if let Some(found) = meta.hash.mismatch(view.data()) {
        bail!(
            "content hash {found} differs from the recorded {}",
            meta.hash
        );
    }
    LabelVocab::from_ordered(meta.labels.clone()).context("its labels")?;
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    ensure!(
        values.iter().all(|v| v.is_finite()),
        "non-finite values in `{TENSOR}`"
    );
    let embeddings = Tensor::from_vec(values, (k, view.shape()[1]), &Device::Cpu)?;
    Ok(LabelNames { meta, embeddings })
}

/// The problem of the label-name file of the cache in `dir`, if it has one and it is bad.
pub(crate) fn check(dir: &Path, fingerprint: &str) -> Vec<String> {
    match load(dir, fingerprint) {
        Ok(_) => Vec::new(),
        Err(e) => vec![format!("{e:#}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["cat".into(), "dog".into(), "traffic_light".into()]
    }

    #[test]
    fn saved_names_load_back_in_vocabulary_order() {
        let dir = tempfile::tempdir().unwrap();
        let values = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap();
        let names = vec!["cat".into(), "dog".into(), "traffic light".into()];
        save(dir.path(), "fp", &labels(), &names, "text", &values).unwrap();
        let loaded = load(dir.path(), "fp").unwrap().unwrap();
        assert_eq!(loaded.meta.names, names);
        let vocab = LabelVocab::from_ordered(vec!["dog".into(), "cat".into()]).unwrap();
        let rows = loaded.for_vocab(&vocab).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows, [[2.0, 3.0], [0.0, 1.0]]);
        let other = LabelVocab::from_ordered(vec!["bird".into()]).unwrap();
        let err = loaded.for_vocab(&other).unwrap_err().to_string();
        assert!(err.contains("`bird`"), "{err}");
        assert!(load(&dir.path().join("nothing"), "fp").unwrap().is_none());
    }

    #[test]
    fn another_cache_or_a_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let values = Tensor::ones((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        save(dir.path(), "fp", &labels(), &labels(), "text", &values).unwrap();
        let err = format!("{:#}", load(dir.path(), "other").unwrap_err());
        assert!(err.contains("another cache"), "{err}");
        let path = dir.path().join(LABEL_NAMES_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let problems = check(dir.path(), "fp");
        assert!(problems[0].contains("content hash"), "{problems:?}");
    }

    #[test]
    fn names_come_from_the_csv_or_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = LabelVocab::from_ordered(labels()).unwrap();
        assert_eq!(
            label_texts(dir.path(), &vocab).unwrap(),
            ["cat", "dog", "traffic light"]
        );
        let csv = dir.path().join(LABEL_NAMES_CSV);
        std::fs::write(&csv, "label,name\ncat,a cat\ndog,a dog\n").unwrap();
        let err = label_texts(dir.path(), &vocab).unwrap_err().to_string();
        assert!(err.contains("`traffic_light`"), "{err}");
        std::fs::write(
            &csv,
            "label,name\ncat,a cat\ndog,\"a dog, \"\"good\"\"\"\ntraffic_light,lights\n",
        )
        .unwrap();
        assert_eq!(
            label_texts(dir.path(), &vocab).unwrap(),
            ["a cat", "a dog, \"good\"", "lights"]
        );
        std::fs::write(&csv, "id,name\n1,x\n").unwrap();
        assert!(label_texts(dir.path(), &vocab).is_err());
    }
}
