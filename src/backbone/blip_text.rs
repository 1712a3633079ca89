//! BLIP's text encoder as used by `BlipForImageTextRetrieval` (`text_encoder.*`): a post-norm
//! BERT (no token types) whose layers can also cross-attend to image tokens. With image tokens it
//! is the image-text matching (ITM) encoder; without them the same weights give text-only
//! features. Attention is bidirectional with a padding mask; every image token is attended.

use anyhow::Result;
use candle_core::{D, Tensor};
use serde::Deserialize;

use super::activation::Activation;
use super::attention::{Mask, attention};
use super::cpu_ops::residual_add;
use super::layers::{FrozenLayerNorm, FrozenLinear};
use super::source::Weights;

/// `text_config` of a BLIP `config.json`; missing fields take transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct BlipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

impl Default for BlipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }
}

/// `attention` / `crossattention`: projections, then `output.dense` + residual + LayerNorm.
#[derive(Clone, Debug)]
struct BertAttention {
    query: FrozenLinear,
    /// key and value fused, [2D, D_kv].
    key_value: FrozenLinear,
    dense: FrozenLinear,
    norm: FrozenLayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(dim: usize, kv_dim: usize, heads: usize, eps: f64, vb: Weights) -> Result<Self> {
        let s = vb.pp("self");
        Ok(Self {
            query: FrozenLinear::new(dim, dim, s.pp("query"))?,
            key_value: FrozenLinear::fused(&["key", "value"], kv_dim, dim, true, s.clone())?,
            dense: FrozenLinear::new(dim, dim, vb.pp("output").pp("dense"))?,
            norm: FrozenLayerNorm::new(dim, eps, vb.pp("output").pp("LayerNorm"))?,
            heads,
        })
    }

    /// `x` [B, T, D] attends to `context` [B, S, D_kv] (itself for self-attention).
    fn forward(&self, x: &Tensor, context: &Tensor, mask: Option<Mask>) -> Result<Tensor> {
        let kernels = self.query.kernels();
        let d = x.dim(D::Minus1)?;
        let attended = {
            let q = self.query.forward(x)?;
            let kv = self.key_value.forward(context)?;
            let k = kv.narrow(D::Minus1, 0, d)?;
            let v = kv.narrow(D::Minus1, d, d)?;
            self.dense
                .forward(&attention(&q, &k, &v, self.heads, mask, kernels)?)?
        };
        self.norm.forward(&residual_add(x, attended, kernels)?)
    }
}

#[derive(Clone, Debug)]
struct BertLayer {
    attention: BertAttention,
    cross_attention: BertAttention,
    intermediate: FrozenLinear,
    output: FrozenLinear,
    output_norm: FrozenLayerNorm,
    act: Activation,
}

impl BertLayer {
    fn forward(&self, x: &Tensor, mask: &Tensor, image: Option<&Tensor>) -> Result<Tensor> {
        let x = self.attention.forward(x, x, Some(Mask::Keys(mask)))?;
        let x = match image {
            Some(image) => self.cross_attention.forward(&x, image, None)?,
            None => x,
        };
        let h = {
            let hidden = self.intermediate.forward_act(&x, Some(self.act))?;
            self.output.forward(&hidden)?
        };
        let kernels = self.intermediate.kernels();
        self.output_norm.forward(&residual_add(&x, h, kernels)?)
    }
}

/// `BlipTextModel` without the pooler.
#[derive(Clone, Debug)]
pub struct BlipTextEncoder {
    /// [vocab, D]
    word_embeddings: Tensor,
    /// [max_positions, D]
    position_embeddings: Tensor,
    embeddings_norm: FrozenLayerNorm,
    layers: Vec<BertLayer>,
}

impl BlipTextEncoder {
    pub fn new(cfg: &BlipTextConfig, vb: Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let heads = cfg.num_attention_heads;
        let act = Activation::from_hf(&cfg.hidden_act)?;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp("encoder").pp("layer").pp(i);
                Ok(BertLayer {
                    attention: BertAttention::new(d, d, heads, eps, l.pp("attention"))?,
                    cross_attention: BertAttention::new(
                        d,
                        cfg.encoder_hidden_size,
                        heads,
                        eps,
                        l.pp("crossattention"),
                    )?,
                    intermediate: FrozenLinear::new(
                        d,
                        cfg.intermediate_size,
                        l.pp("intermediate").pp("dense"),
                    )?,
                    output: FrozenLinear::new(
                        cfg.intermediate_size,
                        d,
                        l.pp("output").pp("dense"),
                    )?,
                    output_norm: FrozenLayerNorm::new(d, eps, l.pp("output").pp("LayerNorm"))?,
                    act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: emb
                .pp("word_embeddings")
                .get((cfg.vocab_size, d), "weight")?,
            position_embeddings: emb
                .pp("position_embeddings")
                .get((cfg.max_position_embeddings, d), "weight")?,
            embeddings_norm: FrozenLayerNorm::new(d, eps, emb.pp("LayerNorm"))?,
            layers,
        })
    }

    fn max_positions(&self) -> usize {
        self.position_embeddings.dim(0).expect("2-D position table")
    }

    /// `ids` and `keep` (attention mask, 1 = token) row-major [B, T]; `image` [B, S, D_vision]
    /// switches on cross-attention (ITM mode). Returns the last hidden state [B, T, D].
    pub fn forward(
        &self,
        ids: &[u32],
        keep: &[u8],
        batch: usize,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let device = self.word_embeddings.device();
        let t = ids.len() / batch;
        anyhow::ensure!(
            t <= self.max_positions(),
            "{t} text tokens exceed the text encoder's {} positions",
            self.max_positions()
        );
        let x = self
            .word_embeddings
            .index_select(&Tensor::new(ids, device)?, 0)?
            .reshape((batch, t, ()))?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, t)?.unsqueeze(0)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        let keep: Vec<f32> = keep.iter().map(|&k| f32::from(k != 0)).collect();
        let mask = Tensor::from_vec(keep, (batch, t), device)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, image)?;
        }
        Ok(x)
    }
}
