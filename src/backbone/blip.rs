//! BLIP image-text matching (`Salesforce/blip-itm-{base,large}-coco`, the Hugging Face
//! `BlipForImageTextRetrieval` layout): the model read from `config.json` + `model.safetensors`,
//! equal to transformers.
//!
//! Outputs of [`BlipItmModel::forward`]:
//! - `image`: `vision_proj(post_layernorm(vision)[CLS])`, L2-normalised, [256] (the retrieval
//!   path of `BlipForImageTextRetrieval` with `use_itm_head=False`);
//! - `text`: `text_proj(text_encoder(ids)[CLS])` without images, L2-normalised, [256];
//! - `multimodal_tokens`: the ITM text encoder's last hidden state with cross-attention to every
//!   image token, [T, 768] (the original's "multimodal embeddings"), and `multimodal_cls`, its
//!   first ([CLS]) row. Padding positions are computed exactly as transformers does (they attend
//!   to the real tokens and the image); the mask says which rows are real.
//!
//! As a [`Backbone`] ([`BlipBackbone`], spec `blip:<dir or Hub id>[:template=...]`): images go
//! through `preprocessor_config.json` (BlipImageProcessor: bicubic resize to 384x384, OpenAI
//! mean/std); captions get the original's casing ([`blip_caption_case`]), the template (default
//! `a picture of {caption}`) and the BERT uncased `tokenizer.json`, padded and truncated to 50
//! tokens with [CLS] kept as the tokenizer gives it (transformers' ITM path does not swap in
//! [ENC]). Outputs `image`, `text`, `multimodal_cls`, `multimodal_tokens` [50, 768] and
//! `multimodal_mask` [50] (a Mask: 1 for real tokens).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::activation::Activation;
use super::blip_text::{BlipTextConfig, BlipTextEncoder};
use super::contract::{
    Backbone, BackboneInfo, Compute, OutputKind, OutputSpec, Prepared, Sample, in_passes,
    rows_per_pass,
};
use super::layers::{FrozenLayerNorm, FrozenLinear, PatchEmbedding, PreNormLayer, VitEmbeddings};
use super::options::Options;
use super::preprocess::ImagePreprocess;
use super::source::{ModelDir, Weights, load_weights};
use super::text::{encode, load_tokenizer};
use crate::tensor_ops::l2_normalize;

/// Caption template of the original: `{caption}` is replaced by the caption after
/// [`blip_caption_case`].
pub const BLIP_DEFAULT_TEMPLATE: &str = "a picture of {caption}";

/// Text length of the original's ITM inputs (padded and truncated to it).
pub const BLIP_TEXT_TOKENS: usize = 50;

/// The original's caption casing: an all-caps caption is lower-cased, any other gets its first
/// letter lower-cased (the BERT uncased tokenizer lower-cases anyway; kept for fidelity).
pub fn blip_caption_case(caption: &str) -> String {
    let has_upper = caption.chars().any(char::is_uppercase);
    let has_lower = caption.chars().any(char::is_lowercase);
    if has_upper && !has_lower {
        return caption.to_lowercase();
    }
    let mut chars = caption.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `config.json` of a `BlipForImageTextRetrieval`; missing fields take transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct BlipConfig {
    #[serde(default)]
    pub text_config: BlipTextConfig,
    #[serde(default)]
    pub vision_config: BlipVisionConfig,
    #[serde(default = "default_image_text_hidden_size")]
    pub image_text_hidden_size: usize,
}

fn default_image_text_hidden_size() -> usize {
    256
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct BlipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for BlipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl BlipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading BLIP config {}", path.display()))?;
        let mut cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing BLIP config {}", path.display()))?;
        // transformers' BlipConfig.__init__ overrides it the same way.
        cfg.text_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        Ok(cfg)
    }
}

/// `BlipVisionModel`.
#[derive(Clone, Debug)]
struct BlipVision {
    embeddings: VitEmbeddings,
    layers: Vec<PreNormLayer>,
    post_layernorm: FrozenLayerNorm,
}

impl BlipVision {
    fn new(cfg: &BlipVisionConfig, vb: Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let act = Activation::from_hf(&cfg.hidden_act)?;
        let emb = vb.pp("embeddings");
        let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp("encoder").pp("layers").pp(i);
                let attn = l.pp("self_attn");
                Ok(PreNormLayer {
                    ln1: FrozenLayerNorm::new(d, eps, l.pp("layer_norm1"))?,
                    qkv: FrozenLinear::new(d, 3 * d, attn.pp("qkv"))?,
                    out: FrozenLinear::new(d, d, attn.pp("projection"))?,
                    ln2: FrozenLayerNorm::new(d, eps, l.pp("layer_norm2"))?,
                    fc1: FrozenLinear::new(d, cfg.intermediate_size, l.pp("mlp").pp("fc1"))?,
                    fc2: FrozenLinear::new(cfg.intermediate_size, d, l.pp("mlp").pp("fc2"))?,
                    act,
                    heads: cfg.num_attention_heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: VitEmbeddings {
                patch: PatchEmbedding::new(3, d, cfg.patch_size, true, emb.pp("patch_embedding"))?,
                class_embedding: emb.get((1, 1, d), "class_embedding")?,
                position_embedding: emb.get((1, positions, d), "position_embedding")?,
                image_size: cfg.image_size,
            },
            layers,
            post_layernorm: FrozenLayerNorm::new(d, eps, vb.pp("post_layernorm"))?,
        })
    }

    /// pixels [B, 3, S, S] -> `post_layernorm(last hidden state)` [B, 1 + patches, D].
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixels, "BLIP")?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// Everything [`BlipItmModel::forward`] computes for a batch, in f32.
#[derive(Debug)]
pub struct BlipFeatures {
    /// [B, 256], L2-normalised.
    pub image: Tensor,
    /// [B, 256], L2-normalised.
    pub text: Tensor,
    /// [B, T, D_text]; row 0 of each sample is `multimodal_cls`.
    pub multimodal_tokens: Tensor,
}

/// A `BlipForImageTextRetrieval` without the ITM head.
#[derive(Clone, Debug)]
pub struct BlipItmModel {
    vision: BlipVision,
    text: BlipTextEncoder,
    vision_proj: FrozenLinear,
    text_proj: FrozenLinear,
}

impl BlipItmModel {
    pub fn new(cfg: &BlipConfig, vb: Weights) -> Result<Self> {
        let (tc, vc) = (&cfg.text_config, &cfg.vision_config);
        let proj = cfg.image_text_hidden_size;
        Ok(Self {
            vision: BlipVision::new(vc, vb.pp("vision_model"))?,
            text: BlipTextEncoder::new(tc, vb.pp("text_encoder"))?,
            vision_proj: FrozenLinear::new(vc.hidden_size, proj, vb.pp("vision_proj"))?,
            text_proj: FrozenLinear::new(tc.hidden_size, proj, vb.pp("text_proj"))?,
        })
    }

    /// Tokens of one image in the vision model (class token + patches).
    pub fn image_tokens(&self) -> usize {
        self.vision.embeddings.tokens()
    }

    /// `pixels` [B, 3, S, S]; `ids`, `keep` row-major [B, T] as the tokenizer pads them (right
    /// padding, 1 = token).
    pub fn forward(&self, pixels: &Tensor, ids: &[u32], keep: &[u8]) -> Result<BlipFeatures> {
        let b = pixels.dim(0)?;
        anyhow::ensure!(
            ids.len() == keep.len() && ids.len().is_multiple_of(b.max(1)),
            "text batch does not match the {b} images"
        );
        let t = ids.len() / b.max(1);
        let image_embeds = self.vision.forward(pixels)?;
        let project = |proj: &FrozenLinear, hidden: &Tensor| -> Result<Tensor> {
            let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
            Ok(l2_normalize(&proj.forward(&cls)?.to_dtype(DType::F32)?)?)
        };
        let image = project(&self.vision_proj, &image_embeds)?;

        // Text-only: the [CLS] row cannot see padding, so run only up to the longest caption.
        let used = (0..b)
            .map(|i| {
                keep[i * t..(i + 1) * t]
                    .iter()
                    .rposition(|&k| k != 0)
                    .map_or(1, |p| p + 1)
            })
            .max()
            .unwrap_or(1);
        let (ids_used, keep_used): (Vec<u32>, Vec<u8>) = (0..b)
            .flat_map(|i| (i * t..i * t + used).map(|j| (ids[j], keep[j])))
            .unzip();
        let text_hidden = self.text.forward(&ids_used, &keep_used, b, None)?;
        let text = project(&self.text_proj, &text_hidden)?;

        let multimodal_tokens = self
            .text
            .forward(ids, keep, b, Some(&image_embeds))?
            .to_dtype(DType::F32)?;
        Ok(BlipFeatures {
            image,
            text,
            multimodal_tokens,
        })
    }
}

/// The `blip` backbone.
pub struct BlipBackbone {
    id: String,
    model: BlipItmModel,
    config: BlipConfig,
    preprocess: ImagePreprocess,
    tokenizer: Tokenizer,
    template: String,
    weights_sha256: Vec<(String, String)>,
    device: Device,
}

/// A batch prepared by [`BlipBackbone::prepare`]: pixels and row-major [B, 50] ids and mask.
struct BlipBatch {
    pixels: Tensor,
    ids: Vec<u32>,
    keep: Vec<u8>,
}

impl BlipBackbone {
    /// Loads `config.json`, `preprocessor_config.json`, `tokenizer.json` and the weights.
    pub fn load(id: &str, dir: &ModelDir, options: &Options, compute: &Compute) -> Result<Self> {
        options.check_known("blip", &["template"])?;
        let config = BlipConfig::from_file(&dir.file("config.json")?)?;
        let preprocess = ImagePreprocess::from_hf_config(&dir.file("preprocessor_config.json")?)?;
        let weights = load_weights(
            dir,
            compute,
            "text_encoder.embeddings.word_embeddings.weight",
            &[],
        )?;
        let model = BlipItmModel::new(&config, weights.vb)
            .with_context(|| format!("cannot build BLIP from {}", dir.location))?;
        let tokenizer = load_tokenizer(
            &dir.file("tokenizer.json")?,
            BLIP_TEXT_TOKENS,
            Some(config.text_config.pad_token_id),
        )?;
        Ok(Self {
            id: id.to_string(),
            model,
            config,
            preprocess,
            tokenizer,
            template: options.template(BLIP_DEFAULT_TEMPLATE)?,
            weights_sha256: weights.sha256,
            device: compute.device.clone(),
        })
    }
}

impl Backbone for BlipBackbone {
    fn info(&self) -> BackboneInfo {
        BackboneInfo {
            id: self.id.clone(),
            weights_sha256: self.weights_sha256.clone(),
            preprocessing: serde_json::json!({
                "image": self.preprocess.describe(),
                "text": {
                    "tokenizer": "tokenizer.json",
                    "max_tokens": BLIP_TEXT_TOKENS,
                    "padding": "max_length",
                    "caption_case": "all-caps lower-cased, else first letter lower-cased",
                },
            }),
            text_template: Some(self.template.clone()),
        }
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        let spec = |name: &str, shape: Vec<usize>, kind| OutputSpec {
            name: name.into(),
            shape,
            kind,
        };
        let (p, d, t) = (
            self.config.image_text_hidden_size,
            self.config.text_config.hidden_size,
            BLIP_TEXT_TOKENS,
        );
        vec![
            spec("image", vec![p], OutputKind::Feature),
            spec("text", vec![p], OutputKind::Feature),
            spec("multimodal_cls", vec![d], OutputKind::Feature),
            spec("multimodal_tokens", vec![t, d], OutputKind::Feature),
            spec("multimodal_mask", vec![t], OutputKind::Mask),
        ]
    }

    fn needs_images(&self) -> bool {
        true
    }

    fn needs_text(&self) -> bool {
        true
    }

    fn prepare(&self, batch: &[Sample]) -> Result<Prepared> {
        let pixels = self.preprocess.batch(batch, &self.device)?;
        let mut ids = Vec::with_capacity(batch.len() * BLIP_TEXT_TOKENS);
        let mut keep = Vec::with_capacity(batch.len() * BLIP_TEXT_TOKENS);
        for s in batch {
            let text = self
                .template
                .replace("{caption}", &blip_caption_case(&s.caption));
            let (i, k) = encode(&self.tokenizer, &text)?;
            ids.extend(i);
            keep.extend(k);
        }
        Ok(Box::new(BlipBatch { pixels, ids, keep }))
    }

    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>> {
        let batch = prepared.downcast::<BlipBatch>().map_err(|_| {
            anyhow::anyhow!("blip forward got a batch prepared by another backbone")
        })?;
        let t = BLIP_TEXT_TOKENS;
        let per_pass = rows_per_pass(&self.device, self.model.image_tokens());
        in_passes(batch.pixels.dim(0)?, per_pass, |start, len| {
            let pixels = batch.pixels.narrow(0, start, len)?;
            let text = start * t..(start + len) * t;
            let keep = &batch.keep[text.clone()];
            let out = self.model.forward(&pixels, &batch.ids[text], keep)?;
            let cls = out.multimodal_tokens.narrow(1, 0, 1)?.squeeze(1)?;
            let mask = Tensor::from_slice(keep, (len, t), &self.device)?.to_dtype(DType::F32)?;
            Ok(vec![out.image, out.text, cls, out.multimodal_tokens, mask])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_casing_follows_the_original() {
        assert_eq!(blip_caption_case("TWO CATS, 3 DOGS"), "two cats, 3 dogs");
        assert_eq!(blip_caption_case("A Dog in NYC"), "a Dog in NYC");
        assert_eq!(blip_caption_case(""), "");
        assert_eq!(blip_caption_case("Éclair"), "éclair");
    }
}
