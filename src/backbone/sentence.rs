//! Sentence embeddings from BERT-family encoders in Hugging Face's `BertModel` layout, as
//! sentence-transformers computes them (e.g. all-MiniLM-L6-v2): `tokenizer.json` without its fixed
//! padding, the attention mask passed, masked mean pooling (or CLS, per `1_Pooling/config.json`),
//! L2 normalisation when `modules.json` lists a `Normalize` module. Output: `text` [hidden]; with
//! option `text_tokens=true` also the token states before pooling (transformers'
//! `last_hidden_state`) `text_tokens` `[max_tokens, hidden]`, zero after each caption's last token,
//! and their mask `text_mask` `[max_tokens]` (1 = a token of the caption).
//!
//! Captions are sorted by token length and run in sub-batches padded only to their own longest
//! caption, so padding is (almost) never computed; rows come back in the original order.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::activation::Activation;
use super::attention::{Mask, self_attention};
use super::contract::{
    Backbone, BackboneInfo, Compute, OutputKind, OutputSpec, Prepared, Sample, rows_per_pass,
};
use super::contract::{TextEmbeddings, caption_samples};
use super::cpu_ops::residual_add;
use super::layers::{FrozenLayerNorm, FrozenLinear};
use super::options::Options;
use super::source::{ModelDir, Weights, load_weights};
use super::text::{read_tokenizer, set_length};
use crate::tensor_ops::{l2_normalize, masked_mean};

/// The fields of `BertConfig` the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

struct Layer {
    qkv: FrozenLinear,
    attn_out: FrozenLinear,
    attn_norm: FrozenLayerNorm,
    intermediate: FrozenLinear,
    output: FrozenLinear,
    output_norm: FrozenLayerNorm,
}

/// A BERT encoder (no pooler).
pub struct BertEncoder {
    config: Config,
    activation: Activation,
    /// [vocab, D]
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    /// Token type 0 embedding (sentence-transformers encodes single sentences).
    token_type_embedding: Tensor,
    embed_norm: FrozenLayerNorm,
    layers: Vec<Layer>,
}

impl BertEncoder {
    pub fn new(config: Config, vb: Weights) -> Result<Self> {
        if config.position_embedding_type != "absolute" {
            bail!(
                "position_embedding_type `{}` is not supported",
                config.position_embedding_type
            );
        }
        let activation = Activation::from_hf(&config.hidden_act)?;
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        let ffn = config.intermediate_size;
        let emb = vb.pp("embeddings");
        let word_embeddings = emb
            .pp("word_embeddings")
            .get((config.vocab_size, d), "weight")?;
        let position_embeddings = emb
            .pp("position_embeddings")
            .get((config.max_position_embeddings, d), "weight")?;
        let token_type_embedding = emb
            .pp("token_type_embeddings")
            .get((config.type_vocab_size, d), "weight")?
            .narrow(0, 0, 1)?;
        let embed_norm = FrozenLayerNorm::new(d, eps, emb.pp("LayerNorm"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attn = vb.pp("attention");
                Ok(Layer {
                    qkv: FrozenLinear::fused(
                        &["query", "key", "value"],
                        d,
                        d,
                        true,
                        attn.pp("self"),
                    )?,
                    attn_out: FrozenLinear::new(d, d, attn.pp("output").pp("dense"))?,
                    attn_norm: FrozenLayerNorm::new(d, eps, attn.pp("output").pp("LayerNorm"))?,
                    intermediate: FrozenLinear::new(d, ffn, vb.pp("intermediate").pp("dense"))?,
                    output: FrozenLinear::new(ffn, d, vb.pp("output").pp("dense"))?,
                    output_norm: FrozenLayerNorm::new(d, eps, vb.pp("output").pp("LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            activation,
            word_embeddings,
            position_embeddings,
            token_type_embedding,
            embed_norm,
            layers,
        })
    }

    /// Last hidden states `[batch, seq, hidden]` for `ids` `[batch, seq]` (u32); `mask`
    /// `[batch, seq]` f32 (1 = token, 0 = padding) or None when no row is padded.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        let d = self.config.hidden_size;
        if seq > self.config.max_position_embeddings {
            bail!(
                "{seq} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let words = self
            .word_embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, seq, d))?;
        let positions = self.position_embeddings.narrow(0, 0, seq)?;
        let x = words.broadcast_add(
            &positions
                .broadcast_add(&self.token_type_embedding)?
                .unsqueeze(0)?,
        )?;
        let mut x = self.embed_norm.forward(&x.reshape((b * seq, d))?)?;
        let heads = self.config.num_attention_heads;
        for layer in &self.layers {
            let kernels = layer.qkv.kernels();
            let attn = {
                let qkv = layer.qkv.forward(&x)?;
                let mask = mask.map(Mask::Keys);
                layer
                    .attn_out
                    .forward(&self_attention(&qkv, b, seq, heads, mask, kernels)?)?
            };
            x = layer.attn_norm.forward(&residual_add(&x, attn, kernels)?)?;
            let out = {
                let hidden = layer.intermediate.forward_act(&x, Some(self.activation))?;
                layer.output.forward(&hidden)?
            };
            x = layer
                .output_norm
                .forward(&residual_add(&x, out, kernels)?)?;
        }
        Ok(x.reshape((b, seq, d))?)
    }
}

/// How token states become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

/// sentence-transformers `1_Pooling/config.json`.
#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// A loaded sentence encoder with its tokenizer.
pub struct SentenceBackbone {
    id: String,
    model: BertEncoder,
    tokenizer: Tokenizer,
    max_tokens: usize,
    pooling: Pooling,
    normalize: bool,
    /// Store the token states and their mask (`text_tokens=true`).
    text_tokens: bool,
    weights_sha256: Vec<(String, String)>,
    device: Device,
}

/// One sub-batch's pooled sentence vectors `[g, D]` and, when asked for, its token states and
/// mask padded to `max_tokens` (`[g, max_tokens, D]`, `[g, max_tokens]`).
struct Embedded {
    pooled: Tensor,
    tokens: Option<(Tensor, Tensor)>,
}

/// Token ids of a batch, in the batch's order.
struct Tokenized(Vec<Vec<u32>>);

impl SentenceBackbone {
    /// Loads `config.json`, `tokenizer.json`, the weights, and the sentence-transformers files
    /// when present (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`);
    /// `options`: `text_tokens=true|false`.
    pub fn load(id: &str, dir: &ModelDir, options: &Options, compute: &Compute) -> Result<Self> {
        options.check_known("sentence backbone", &["text_tokens"])?;
        let config: Config = dir.json("config.json")?;
        let tokenizer_path = dir.file("tokenizer.json")?;
        let mut tokenizer = read_tokenizer(&tokenizer_path)?;
        // sentence-transformers truncates at max_seq_length, else the tokenizer's own limit.
        let st_limit = match dir.optional_file("sentence_bert_config.json")? {
            Some(_) => {
                dir.json::<SentenceBertConfig>("sentence_bert_config.json")?
                    .max_seq_length
            }
            None => None,
        };
        let max_tokens = st_limit
            .or_else(|| tokenizer.get_truncation().map(|t| t.max_length))
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        set_length(&mut tokenizer, &tokenizer_path, max_tokens, None)?;
        let pooling = match dir.optional_file("1_Pooling/config.json")? {
            None => Pooling::Mean,
            Some(_) => {
                let p: PoolingConfig = dir.json("1_Pooling/config.json")?;
                match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token) {
                    _ if p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens => {
                        bail!("{}: only mean or CLS pooling is supported", dir.location)
                    }
                    (true, false) => Pooling::Mean,
                    (false, true) => Pooling::Cls,
                    _ => bail!(
                        "{}: exactly one of mean or CLS pooling must be set",
                        dir.location
                    ),
                }
            }
        };
        let normalize = match dir.optional_file("modules.json")? {
            None => false,
            Some(_) => dir
                .json::<Vec<ModuleEntry>>("modules.json")?
                .iter()
                .any(|m| m.kind.ends_with(".Normalize")),
        };
        let weights = load_weights(dir, compute, "embeddings.word_embeddings.weight", &["bert"])?;
        let model = BertEncoder::new(config, weights.vb)
            .with_context(|| format!("cannot build the BERT encoder from {}", dir.location))?;
        Ok(Self {
            id: id.to_string(),
            model,
            tokenizer,
            max_tokens,
            pooling,
            normalize,
            text_tokens: options.flag("text_tokens")?,
            weights_sha256: weights.sha256,
            device: compute.device.clone(),
        })
    }

    /// Embeds token-id rows, padding them to the longest (masked) when their lengths differ.
    fn embed_group(&self, rows: &[&[u32]]) -> Result<Embedded> {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let padded = rows.iter().any(|r| r.len() != seq);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for row in rows {
            ids.extend_from_slice(row);
            ids.resize(ids.len() + seq - row.len(), 0);
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, seq - row.len()));
        }
        let ids = Tensor::from_vec(ids, (rows.len(), seq), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows.len(), seq), &self.device)?;
        let hidden = self
            .model
            .forward(&ids, padded.then_some(&mask))?
            .to_dtype(DType::F32)?;
        let pooled = match self.pooling {
            Pooling::Mean => masked_mean(&hidden, padded.then_some(&mask))?,
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let pooled = if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        let tokens = if self.text_tokens {
            // Padding rows of the hidden states are zeroed, then every row padded to max_tokens.
            let extra = self.max_tokens - seq;
            let hidden = hidden
                .broadcast_mul(&mask.unsqueeze(2)?)?
                .pad_with_zeros(1, 0, extra)?;
            Some((hidden, mask.pad_with_zeros(1, 0, extra)?))
        } else {
            None
        };
        Ok(Embedded { pooled, tokens })
    }
}

impl Backbone for SentenceBackbone {
    fn info(&self) -> BackboneInfo {
        BackboneInfo {
            id: self.id.clone(),
            weights_sha256: self.weights_sha256.clone(),
            preprocessing: serde_json::json!({
                "text": {
                    "tokenizer": "tokenizer.json",
                    "max_tokens": self.max_tokens,
                    "padding": "none (sorted by length, padded per sub-batch, masked)",
                    "pooling": self.pooling,
                    "normalize": self.normalize,
                }
            }),
            text_template: Some("{caption}".into()),
        }
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        let d = self.model.config.hidden_size;
        let spec = |name: &str, shape: Vec<usize>, kind| OutputSpec {
            name: name.into(),
            shape,
            kind,
        };
        let mut outputs = vec![spec("text", vec![d], OutputKind::Feature)];
        if self.text_tokens {
            let t = self.max_tokens;
            outputs.push(spec("text_tokens", vec![t, d], OutputKind::Feature));
            outputs.push(spec("text_mask", vec![t], OutputKind::Mask));
        }
        outputs
    }

    fn needs_images(&self) -> bool {
        false
    }

    fn needs_text(&self) -> bool {
        true
    }

    fn prepare(&self, batch: &[Sample]) -> Result<Prepared> {
        let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
        let encodings = self
            .tokenizer
            .encode_batch(captions, true)
            .map_err(|e| anyhow::anyhow!("tokenizing captions failed: {e}"))?;
        Ok(Box::new(Tokenized(
            encodings.iter().map(|e| e.get_ids().to_vec()).collect(),
        )))
    }

    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>> {
        let Tokenized(rows) = *prepared.downcast::<Tokenized>().map_err(|_| {
            anyhow::anyhow!("sentence forward got a batch prepared by another backbone")
        })?;
        if rows.is_empty() {
            bail!("cannot embed an empty batch of captions");
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < order.len() {
            // Sorted ascending: the last row of a group is its longest, and the group one pass.
            let mut end = start + 1;
            while end < order.len()
                && end + 1 - start <= rows_per_pass(&self.device, rows[order[end]].len())
            {
                end += 1;
            }
            let group: Vec<&[u32]> = order[start..end]
                .iter()
                .map(|&i| rows[i].as_slice())
                .collect();
            pieces.push(self.embed_group(&group)?);
            start = end;
        }
        // Row order[k] of the batch is row k of the sorted pieces: invert the permutation.
        let mut inverse = vec![0u32; order.len()];
        for (k, &i) in order.iter().enumerate() {
            inverse[i] = k as u32;
        }
        let inverse = Tensor::from_vec(inverse, order.len(), &self.device)?;
        let unsort = |parts: Vec<&Tensor>| -> Result<Tensor> {
            Ok(Tensor::cat(&parts, 0)?.index_select(&inverse, 0)?)
        };
        let mut outputs = vec![unsort(pieces.iter().map(|p| &p.pooled).collect())?];
        if self.text_tokens {
            let tokens: Vec<&(Tensor, Tensor)> =
                pieces.iter().filter_map(|p| p.tokens.as_ref()).collect();
            outputs.push(unsort(tokens.iter().map(|(t, _)| t).collect())?);
            outputs.push(unsort(tokens.iter().map(|(_, m)| m).collect())?);
        }
        Ok(outputs)
    }

    /// The `text` output of captions equal to `texts`.
    fn embed_texts(&self, texts: &[String]) -> Result<Option<TextEmbeddings>> {
        let prepared = self.prepare(&caption_samples(texts))?;
        let values = self.forward(prepared)?.swap_remove(0);
        Ok(Some(TextEmbeddings {
            output: "text".into(),
            values,
        }))
    }
}
