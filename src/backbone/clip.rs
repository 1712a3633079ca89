//! CLIP (OpenAI ViT-B/32, B/16, L/14, L/14-336 in the Hugging Face `CLIPModel` layout): the model
//! read from `config.json` + `model.safetensors`, equal to transformers' `CLIPModel`.
//!
//! Outputs (see [`ClipModel::image_features`], [`ClipModel::text_features`]):
//! - `image`: `visual_projection(post_layernorm(CLS))`, L2-normalised (as `CLIPModel.forward`
//!   returns `image_embeds`), [projection_dim];
//! - `text`: `text_projection(final_layer_norm(h_eos))`, L2-normalised, [projection_dim], where the
//!   end-of-text position is chosen as transformers does for the config: the arg-max token id
//!   for legacy configs (`eos_token_id == 2`, e.g. the openai/* checkpoints), else the first
//!   `eos_token_id`;
//! - `image_tokens` (optional): every vision token after `post_layernorm`, [1 + patches, hidden]
//!   (row 0 is the class token): the same normalisation the pooled CLS gets before projection,
//!   for token-level heads.
//!
//! The text model is causal, so the tokens after the end-of-text token cannot change the pooled
//! output: each batch runs only up to its longest caption instead of 77 padded positions.
//!
//! As a [`Backbone`] ([`ClipBackbone`], spec `clip:<dir or Hub id>[:options]`): images go through
//! `preprocessor_config.json` (CLIPImageProcessor: bicubic shortest side, center crop, OpenAI
//! mean/std); captions through a template (option `template`, default `{caption}`; the original
//! wrote spaCy noun phrases into "The photo contains ...", which a template replaces) and
//! `tokenizer.json`, truncated to 77 tokens keeping the end token. Option `image_tokens=true`
//! adds the `image_tokens` output; `image_only=true` runs the vision tower alone (no `text`
//! output, captions not needed; the text tower still embeds label names).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::activation::Activation;
use super::attention::Mask;
use super::contract::{
    Backbone, BackboneInfo, Compute, OutputKind, OutputSpec, Prepared, Sample, TextEmbeddings,
    in_passes, rows_per_pass,
};
use super::layers::{FrozenLayerNorm, FrozenLinear, PatchEmbedding, PreNormLayer, VitEmbeddings};
use super::options::Options;
use super::preprocess::ImagePreprocess;
use super::source::{ModelDir, Weights, load_weights};
use super::text::{encode, load_tokenizer};
use crate::tensor_ops::l2_normalize;

/// `config.json` of a `CLIPModel`; missing fields take transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading CLIP config {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing CLIP config {}", path.display()))
    }
}

/// Loads one CLIP encoder layer (`self_attn.{q,k,v,out}_proj`, `layer_norm{1,2}`, `mlp.fc{1,2}`).
fn clip_layer(
    dim: usize,
    inner: usize,
    heads: usize,
    act: Activation,
    eps: f64,
    vb: Weights,
) -> Result<PreNormLayer> {
    let attn = vb.pp("self_attn");
    Ok(PreNormLayer {
        ln1: FrozenLayerNorm::new(dim, eps, vb.pp("layer_norm1"))?,
        qkv: FrozenLinear::fused(
            &["q_proj", "k_proj", "v_proj"],
            dim,
            dim,
            true,
            attn.clone(),
        )?,
        out: FrozenLinear::new(dim, dim, attn.pp("out_proj"))?,
        ln2: FrozenLayerNorm::new(dim, eps, vb.pp("layer_norm2"))?,
        fc1: FrozenLinear::new(dim, inner, vb.pp("mlp").pp("fc1"))?,
        fc2: FrozenLinear::new(inner, dim, vb.pp("mlp").pp("fc2"))?,
        act,
        heads,
    })
}

/// `count` CLIP encoder layers (`0`, `1`, ... under `vb`).
fn clip_layers(
    count: usize,
    dim: usize,
    inner: usize,
    heads: usize,
    act: &str,
    eps: f64,
    vb: Weights,
) -> Result<Vec<PreNormLayer>> {
    let act = Activation::from_hf(act)?;
    (0..count)
        .map(|i| clip_layer(dim, inner, heads, act, eps, vb.pp(i)))
        .collect()
}

/// `CLIPVisionModel`.
#[derive(Clone, Debug)]
struct ClipVision {
    embeddings: VitEmbeddings,
    pre_layernorm: FrozenLayerNorm,
    layers: Vec<PreNormLayer>,
    post_layernorm: FrozenLayerNorm,
}

impl ClipVision {
    fn new(cfg: &ClipVisionConfig, vb: Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        Ok(Self {
            embeddings: VitEmbeddings {
                patch: PatchEmbedding::new(
                    cfg.num_channels,
                    d,
                    cfg.patch_size,
                    false,
                    emb.pp("patch_embedding"),
                )?,
                class_embedding: emb.get(d, "class_embedding")?.reshape((1, 1, d))?,
                position_embedding: emb
                    .pp("position_embedding")
                    .get((positions, d), "weight")?
                    .unsqueeze(0)?,
                image_size: cfg.image_size,
            },
            // The Hub spells it "pre_layrnorm".
            pre_layernorm: FrozenLayerNorm::new(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers: clip_layers(
                cfg.num_hidden_layers,
                d,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                &cfg.hidden_act,
                cfg.layer_norm_eps,
                vb.pp("encoder").pp("layers"),
            )?,
            post_layernorm: FrozenLayerNorm::new(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// pixels [B, C, S, S] -> last hidden state [B, 1 + patches, D] (before `post_layernorm`).
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(pixels, "CLIP")?;
        let mut x = self.pre_layernorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        Ok(x)
    }
}

/// `CLIPTextModel`.
#[derive(Clone, Debug)]
struct ClipText {
    /// [vocab, D]
    token_embedding: Tensor,
    /// [max_positions, D]
    position_embedding: Tensor,
    layers: Vec<PreNormLayer>,
    final_layer_norm: FrozenLayerNorm,
    eos_token_id: u32,
}

impl ClipText {
    fn new(cfg: &ClipTextConfig, vb: Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get((cfg.vocab_size, d), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, d), "weight")?,
            layers: clip_layers(
                cfg.num_hidden_layers,
                d,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                &cfg.hidden_act,
                cfg.layer_norm_eps,
                vb.pp("encoder").pp("layers"),
            )?,
            final_layer_norm: FrozenLayerNorm::new(
                d,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    fn max_positions(&self) -> usize {
        self.position_embedding.dim(0).expect("2-D position table")
    }

    /// Token ids (with start and end tokens) -> pooled states [B, D] after `final_layer_norm`.
    fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.token_embedding.device();
        let eos: Vec<usize> = ids
            .iter()
            .map(|s| eos_position(s, self.eos_token_id))
            .collect();
        // Causal attention: positions after the end token cannot change it; run to the longest.
        let len = eos.iter().map(|&e| e + 1).max().unwrap_or(1);
        anyhow::ensure!(
            len <= self.max_positions(),
            "caption of {len} tokens is longer than the text model's {} positions",
            self.max_positions()
        );
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|s| (0..len).map(move |i| s.get(i).copied().unwrap_or(0)))
            .collect();
        let b = ids.len();
        let flat = Tensor::from_vec(flat, b * len, device)?;
        let x = self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((b, len, ()))?
            .broadcast_add(&self.position_embedding.narrow(0, 0, len)?.unsqueeze(0)?)?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, Some(Mask::Causal))?;
        }
        let d = x.dim(D::Minus1)?;
        let rows: Vec<u32> = eos
            .iter()
            .enumerate()
            .map(|(i, &e)| (i * len + e) as u32)
            .collect();
        let pooled = x
            .reshape((b * len, d))?
            .index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
        self.final_layer_norm.forward(&pooled)
    }
}

/// Where transformers' `CLIPTextModel` pools: the first arg-max token id when the config has the
/// legacy `eos_token_id == 2`, else the first `eos_token_id` (position 0 when absent).
pub fn eos_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&t| t == max).unwrap_or(0)
    } else {
        ids.iter().position(|&t| t == eos_token_id).unwrap_or(0)
    }
}

/// A `CLIPModel` without the logit scale.
#[derive(Clone, Debug)]
pub struct ClipModel {
    vision: ClipVision,
    text: ClipText,
    visual_projection: FrozenLinear,
    text_projection: FrozenLinear,
}

impl ClipModel {
    pub fn new(cfg: &ClipConfig, vb: Weights) -> Result<Self> {
        let (tc, vc) = (&cfg.text_config, &cfg.vision_config);
        Ok(Self {
            vision: ClipVision::new(vc, vb.pp("vision_model"))?,
            text: ClipText::new(tc, vb.pp("text_model"))?,
            visual_projection: FrozenLinear::without_bias(
                vc.hidden_size,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
            text_projection: FrozenLinear::without_bias(
                tc.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?,
        })
    }

    pub fn device(&self) -> &Device {
        self.text.token_embedding.device()
    }

    /// Tokens of one image in the vision model (class token + patches).
    pub fn image_tokens(&self) -> usize {
        self.vision.embeddings.tokens()
    }

    /// pixels [B, 3, S, S] (CLIP-normalised) -> (`image` [B, P] L2-normalised, `image_tokens`
    /// [B, 1 + patches, D] after `post_layernorm` when `with_tokens`), in f32.
    pub fn image_features(
        &self,
        pixels: &Tensor,
        with_tokens: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let hidden = self.vision.forward(pixels)?;
        let project = |pooled: &Tensor| -> Result<Tensor> {
            let embeds = self.visual_projection.forward(pooled)?;
            Ok(l2_normalize(&embeds.to_dtype(DType::F32)?)?)
        };
        if with_tokens {
            let tokens = self.vision.post_layernorm.forward(&hidden)?;
            let embeds = project(&tokens.narrow(1, 0, 1)?.squeeze(1)?)?;
            Ok((embeds, Some(tokens.to_dtype(DType::F32)?)))
        } else {
            let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
            Ok((project(&self.vision.post_layernorm.forward(&cls)?)?, None))
        }
    }

    /// Token ids per caption (start token .. end token, as the tokenizer gives them; anything
    /// after the end token is ignored) -> `text` [B, P] L2-normalised, in f32.
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let pooled = self.text.forward(ids)?;
        let embeds = self.text_projection.forward(&pooled)?;
        Ok(l2_normalize(&embeds.to_dtype(DType::F32)?)?)
    }
}

/// The `clip` backbone: outputs `image`, `text` (unless `image_only=true`) and, with
/// `image_tokens=true`, `image_tokens`.
pub struct ClipBackbone {
    id: String,
    model: ClipModel,
    config: ClipConfig,
    preprocess: ImagePreprocess,
    tokenizer: Tokenizer,
    template: String,
    image_tokens: bool,
    image_only: bool,
    weights_sha256: Vec<(String, String)>,
    device: Device,
}

/// A batch prepared by [`ClipBackbone::prepare`] (no token ids with `image_only=true`).
struct ClipBatch {
    pixels: Tensor,
    ids: Vec<Vec<u32>>,
}

impl ClipBackbone {
    /// Loads `config.json`, `preprocessor_config.json`, `tokenizer.json` and the weights.
    pub fn load(id: &str, dir: &ModelDir, options: &Options, compute: &Compute) -> Result<Self> {
        options.check_known("clip", &["template", "image_tokens", "image_only"])?;
        let config = ClipConfig::from_file(&dir.file("config.json")?)?;
        let preprocess = ImagePreprocess::from_hf_config(&dir.file("preprocessor_config.json")?)?;
        let weights = load_weights(
            dir,
            compute,
            "text_model.embeddings.token_embedding.weight",
            &[],
        )?;
        let model = ClipModel::new(&config, weights.vb)
            .with_context(|| format!("cannot build CLIP from {}", dir.location))?;
        let tokenizer = load_tokenizer(
            &dir.file("tokenizer.json")?,
            config.text_config.max_position_embeddings,
            None,
        )?;
        Ok(Self {
            id: id.to_string(),
            model,
            config,
            preprocess,
            tokenizer,
            template: options.template("{caption}")?,
            image_tokens: options.flag("image_tokens")?,
            image_only: options.flag("image_only")?,
            weights_sha256: weights.sha256,
            device: compute.device.clone(),
        })
    }
}

impl Backbone for ClipBackbone {
    fn info(&self) -> BackboneInfo {
        BackboneInfo {
            id: self.id.clone(),
            weights_sha256: self.weights_sha256.clone(),
            preprocessing: serde_json::json!({
                "image": self.preprocess.describe(),
                "text": {
                    "tokenizer": "tokenizer.json",
                    "max_tokens": self.config.text_config.max_position_embeddings,
                    "truncation": "keep the end token",
                    "pooling": "end-of-text token",
                },
            }),
            text_template: Some(self.template.clone()),
        }
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        let feature = |name: &str, shape: Vec<usize>| OutputSpec {
            name: name.into(),
            shape,
            kind: OutputKind::Feature,
        };
        let p = self.config.projection_dim;
        let mut outputs = vec![feature("image", vec![p])];
        if !self.image_only {
            outputs.push(feature("text", vec![p]));
        }
        if self.image_tokens {
            let v = &self.config.vision_config;
            let tokens = (v.image_size / v.patch_size).pow(2) + 1;
            outputs.push(feature("image_tokens", vec![tokens, v.hidden_size]));
        }
        outputs
    }

    fn needs_images(&self) -> bool {
        true
    }

    fn needs_text(&self) -> bool {
        !self.image_only
    }

    fn prepare(&self, batch: &[Sample]) -> Result<Prepared> {
        let pixels = self.preprocess.batch(batch, &self.device)?;
        if self.image_only {
            let ids = Vec::new();
            return Ok(Box::new(ClipBatch { pixels, ids }));
        }
        let ids = batch
            .iter()
            .map(|s| {
                let text = self.template.replace("{caption}", &s.caption);
                Ok(encode(&self.tokenizer, &text)?.0)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(ClipBatch { pixels, ids }))
    }

    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>> {
        let batch = prepared.downcast::<ClipBatch>().map_err(|_| {
            anyhow::anyhow!("clip forward got a batch prepared by another backbone")
        })?;
        let per_pass = rows_per_pass(&self.device, self.model.image_tokens());
        in_passes(batch.pixels.dim(0)?, per_pass, |start, len| {
            let pixels = batch.pixels.narrow(0, start, len)?;
            let (image, tokens) = self.model.image_features(&pixels, self.image_tokens)?;
            let text = if self.image_only {
                None
            } else {
                Some(self.model.text_features(&batch.ids[start..start + len])?)
            };
            Ok(std::iter::once(image).chain(text).chain(tokens).collect())
        })
    }

    /// The `text` output of captions equal to `texts` (the caption template applied).
    fn embed_texts(&self, texts: &[String]) -> Result<Option<TextEmbeddings>> {
        let ids = texts
            .iter()
            .map(|text| Ok(encode(&self.tokenizer, &self.template.replace("{caption}", text))?.0))
            .collect::<Result<Vec<_>>>()?;
        let tokens = self.config.text_config.max_position_embeddings;
        let per_pass = rows_per_pass(&self.device, tokens);
        let values = in_passes(ids.len(), per_pass, |start, len| {
            Ok(vec![self.model.text_features(&ids[start..start + len])?])
        })?
        .swap_remove(0);
        Ok(Some(TextEmbeddings {
            output: "text".into(),
            values,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_position_follows_the_config_rule() {
        let ids = [49406, 320, 49407, 49407];
        assert_eq!(eos_position(&ids, 2), 2);
        assert_eq!(eos_position(&ids, 49407), 2);
        // A newer config with a custom end token that is not the largest id.
        assert_eq!(eos_position(&[49406, 7, 5, 0], 5), 2);
        assert_eq!(eos_position(&[49406, 7, 5, 0], 2), 0);
    }

    #[test]
    fn config_defaults_are_vit_b32() {
        let cfg: ClipConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.vision_config.patch_size, 32);
        assert_eq!(cfg.text_config.max_position_embeddings, 77);
        assert_eq!(cfg.projection_dim, 512);
    }
}
