//! What a model reads: the backbone that made its inputs (id, weight hashes, preprocessing, text
//! template) and each input's name, per-row shape and stored dtype. Recorded in the checkpoint, it
//! rebuilds the head without a cache and decides whether a cache can feed the model.

use crate::backbone::BackboneInfo;
use crate::cache::{CacheReader, StoredDtype};
use crate::heads::HeadContext;
use crate::tensor_ops::Precision;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// One input of the model as it was trained: cache output name, per-row shape and stored dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSignature {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoredDtype,
}

/// The features a model was trained on: enough to rebuild its head and to refuse a cache made by
/// another backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSignature {
    /// The backbone as the cache manifest records it (id, weight hashes, preprocessing, template).
    pub backbone: BackboneInfo,
    /// The cache outputs the head consumes, masks included.
    pub outputs: Vec<OutputSignature>,
}

impl InputSignature {
    /// The signature of `reader`'s cache restricted to the outputs called `inputs`.
    pub fn of_cache(reader: &CacheReader, inputs: &[String]) -> Result<Self> {
        let outputs = inputs
            .iter()
            .map(|name| {
                let output = reader.output_spec(name)?;
                Ok(OutputSignature {
                    name: output.name.clone(),
                    shape: output.shape.clone(),
                    dtype: output.dtype,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            backbone: reader.manifest().header.backbone.clone(),
            outputs,
        })
    }

    /// The context to rebuild the head in: these inputs' per-row shapes (no label graph: a
    /// checkpoint holds its fixed buffers).
    pub fn head_context(&self, num_labels: usize, seed: u64) -> HeadContext {
        HeadContext {
            num_labels,
            input_shapes: self
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.shape.clone()))
                .collect(),
            label_cooccurrence: None,
            seed,
            label_embeddings: None,
            // The weights are f32 whatever precision trained them: a loaded head computes in f32.
            precision: Precision::F32,
        }
    }

    /// Fails with a message naming both sides when `reader`'s cache was made by another backbone,
    /// with other weights or preprocessing, or lacks one of these outputs with the same shape and
    /// dtype.
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
            if output.dtype != want.dtype {
                bail!(
                    "cache {} stores output `{}` as {}, but the checkpoint was trained on {} \
                     (extract with the checkpoint's --dtype)",
                    cache_dir.display(),
                    want.name,
                    dtype_name(output.dtype),
                    dtype_name(want.dtype)
                );
            }
        }
        Ok(())
    }
}

fn dtype_name(dtype: StoredDtype) -> String {
    format!("{dtype:?}").to_lowercase()
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
