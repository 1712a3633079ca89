//! `ml_decoder`: Ridnik et al.'s ML-Decoder over a token sequence, computing only real tokens.
//!
//! Layout (one decoder layer, no self-attention): tokens -> Linear(D, d_model) + ReLU = M
//! (with `inputs=a+b`, several token sequences, each through its own projection, side by side
//! in one memory: image patches and caption tokens attended together);
//! one FIXED query per class q (seeded N(0, 1), a buffer saved with the weights);
//! t = LN1(q + dropout(q)); t = LN2(t + dropout(MHA(t, M, M))) with the key padding mask;
//! t = LN3(t + dropout(FFN(t))), FFN = Linear(d_model, ffn) -> ReLU -> dropout -> Linear;
//! group fully-connected output logit_k = <t_k, w_k> + b_k.
//!
//! Speed: the input projection and the K/V projections run ONLY on real tokens. The real rows of
//! the flattened `[B*T, D]` tokens are gathered (`index_select`, before any f16 -> f32
//! conversion), projected, and scattered (`index_add`) into a zero `[B, T', d]` memory where T'
//! is the batch's longest real extent; the rest is masked out of the attention with a large
//! negative bias. The result equals the padded computation (tested). In evaluation the query path
//! (LN1 and the Q projection) is the same for every sample and is computed once per batch.
//! A pooled `[D]` input is a one-token sequence: attention over one key is that key's value
//! whatever the query, so such a head has no Q/K projections (they could never learn). A sample
//! without any real token attends to nothing (its attention output is 0). The K projection has no
//! bias: a key bias shifts all of a query's scores equally, which softmax ignores.
//!
//! With `queries=labels` the queries are the label-name embeddings `[K, D]` (the buffer) through
//! a learned `query_proj` Linear(D, d_model), as ML-Decoder's zero-shot mode projects word
//! vectors.
//!
//! Variables: `input_proj` (`input_proj.<input>` each with `inputs`),
//! `attn.{q_proj,k_proj,v_proj,out_proj}` (no q/k for a pooled input,
//! `k_proj` without bias), `norm{1,2,3}`, `ffn.{fc1,fc2}`, `group_fc.{weight,bias}`,
//! `query_proj` (with `queries=labels`); buffer: `buffers.queries` `[K, d_model]` (`[K, D]`).

use anyhow::{Context, bail};
use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::features::{default_mask_name, lookup, shape_of};
use super::init::seeded_tensor;
use super::layers::{Dropout, LayerNorm, Linear, add_bias, l2_normalize_smooth};
use super::{Head, HeadContext, Inputs, LabelQueries, Queries, buffer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlDecoderConfig {
    /// Token sequence `[T, D]` (or a pooled `[D]` vector, used as one token).
    pub input: String,
    /// Several inputs attended together (instead of `input`), each with its default mask and
    /// its own projection, e.g. `inputs=image_tokens+text_tokens`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Mask output `[T]` of `input` (1 = real token); default `<stem>_mask` for
    /// `<stem>_tokens` when the cache has it, else every token is real.
    pub mask: Option<String>,
    pub d_model: usize,
    pub heads: usize,
    pub ffn: usize,
    pub dropout: f32,
    /// `labels`: the class queries are the label-name embeddings (projected).
    #[serde(skip_serializing_if = "Queries::is_random")]
    pub queries: Queries,
}

impl Default for MlDecoderConfig {
    fn default() -> Self {
        Self {
            input: "multimodal_tokens".into(),
            inputs: Vec::new(),
            mask: None,
            d_model: 768,
            heads: 8,
            ffn: 2048,
            dropout: 0.1,
            queries: Queries::Random,
        }
    }
}

impl MlDecoderConfig {
    /// `d_model` at least 1 and a multiple of `heads`, `ffn` at least 1, `dropout` in [0, 1).
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.inputs.is_empty() {
            let default = Self::default();
            if self.input != default.input || self.mask.is_some() {
                bail!("give `inputs` (each with its default mask) or `input` and `mask`, not both");
            }
            for (i, name) in self.inputs.iter().enumerate() {
                if self.inputs[..i].contains(name) {
                    bail!("input `{name}` is listed twice");
                }
            }
        }
        super::require_divisible("d_model", self.d_model, self.heads)?;
        super::require_positive("ffn", self.ffn)?;
        super::require_dropout(self.dropout)
    }
}

/// Bias added to attention scores of padding keys: finite, so a sample without any real token
/// gets a uniform mix of zero rows rather than NaN.
const MASKED: f32 = -1e9;

/// One input sequence of the memory with its mask and projection.
struct Source {
    input: String,
    mask: Option<String>,
    /// Token positions per sample (1 for a pooled input).
    tokens: usize,
    proj: Linear,
}

pub struct MlDecoderHead {
    /// The inputs, in memory order.
    sources: Vec<Source>,
    heads: usize,
    d_model: usize,
    /// Q and K projections; `None` for a pooled input (one key: nothing to attend between).
    query_key: Option<(Linear, Linear)>,
    v_proj: Linear,
    out_proj: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    drop_query: Dropout,
    drop_attn: Dropout,
    drop_ffn_hidden: Dropout,
    drop_ffn: Dropout,
    queries_name: String,
    queries: Tensor,
    /// Projects label-name queries `[K, D]` to `d_model` (`queries=labels`).
    query_proj: Option<Linear>,
    group_weight: Tensor,
    group_bias: Option<Tensor>,
}

/// Keys (absent without Q/K projections) and values `[B, T', d]` of the real tokens, and the
/// attention bias `[B, 1, 1, T']`.
struct Memory {
    keys: Option<Tensor>,
    values: Tensor,
    bias: Tensor,
}

impl MlDecoderHead {
    pub fn new(
        cfg: &MlDecoderConfig,
        cosine: bool,
        ctx: &HeadContext,
        vb: VarBuilder,
    ) -> anyhow::Result<Self> {
        let (d, k) = (cfg.d_model, ctx.num_labels);
        let precision = ctx.precision;
        let several = !cfg.inputs.is_empty();
        let names = if several {
            cfg.inputs.clone()
        } else {
            vec![cfg.input.clone()]
        };
        let mut sources = Vec::with_capacity(names.len());
        let mut is_sequence = several;
        for input in names {
            let (in_dim, tokens, sequence) = match shape_of(ctx, &input)? {
                [dim] => (*dim, 1, false),
                [tokens, dim] => (*dim, *tokens, true),
                other => bail!(
                    "ml_decoder input `{input}` has per-sample shape {other:?}; expected [T, D] \
                     or [D]"
                ),
            };
            is_sequence |= sequence;
            let mask = match &cfg.mask {
                Some(name) => {
                    shape_of(ctx, name).context("ml_decoder mask")?;
                    Some(name.clone())
                }
                None if sequence => {
                    let name = default_mask_name(&input);
                    ctx.input_shapes.contains_key(&name).then_some(name)
                }
                None => None,
            };
            let proj_vb = if several {
                vb.pp("input_proj").pp(&input)
            } else {
                vb.pp("input_proj")
            };
            sources.push(Source {
                proj: Linear::new(in_dim, d, precision, proj_vb)?,
                input,
                mask,
                tokens,
            });
        }
        let p = cfg.dropout;
        let (queries_name, queries, query_proj) = match cfg.queries {
            Queries::Random => {
                let (name, queries) = buffer(&vb, "queries", (k, d), || {
                    let name = vb.pp("buffers").pp("queries").prefix();
                    let init = Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    };
                    Ok(seeded_tensor(
                        &(k, d).into(),
                        init,
                        ctx.seed,
                        &name,
                        vb.device(),
                    )?)
                })?;
                (name, queries, None)
            }
            Queries::Labels => {
                let named = LabelQueries::new(
                    "ml_decoder",
                    ctx,
                    &vb,
                    "queries",
                    "query_proj",
                    d,
                    precision,
                )?;
                (named.buffer_name, named.embeddings, Some(named.proj))
            }
        };
        let attn = vb.pp("attn");
        let ffn = vb.pp("ffn");
        let group = vb.pp("group_fc");
        let group_weight =
            group.get_with_hints((k, d), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let group_bias = if cosine {
            None
        } else {
            Some(group.get_with_hints(k, "bias", candle_nn::init::ZERO)?)
        };
        Ok(Self {
            sources,
            heads: cfg.heads,
            d_model: d,
            query_key: if is_sequence {
                Some((
                    Linear::new(d, d, precision, attn.pp("q_proj"))?,
                    Linear::without_bias(d, d, precision, attn.pp("k_proj"))?,
                ))
            } else {
                None
            },
            v_proj: Linear::new(d, d, precision, attn.pp("v_proj"))?,
            out_proj: Linear::new(d, d, precision, attn.pp("out_proj"))?,
            norm1: LayerNorm::new(d, vb.pp("norm1"))?,
            norm2: LayerNorm::new(d, vb.pp("norm2"))?,
            norm3: LayerNorm::new(d, vb.pp("norm3"))?,
            fc1: Linear::new(d, cfg.ffn, precision, ffn.pp("fc1"))?,
            fc2: Linear::new(cfg.ffn, d, precision, ffn.pp("fc2"))?,
            drop_query: Dropout::new(p, ctx.seed, "query", &vb)?,
            drop_attn: Dropout::new(p, ctx.seed, "attn", &vb)?,
            drop_ffn_hidden: Dropout::new(p, ctx.seed, "ffn_hidden", &vb)?,
            drop_ffn: Dropout::new(p, ctx.seed, "ffn", &vb)?,
            queries_name,
            queries,
            query_proj,
            group_weight,
            group_bias,
        })
    }

    /// Project only the real tokens of the batch to keys and values: each input's real tokens
    /// through its projection, placed side by side (input after input) in each sample's memory.
    fn memory(&self, x: &Inputs) -> Result<Memory> {
        let mut packed = Vec::with_capacity(self.sources.len());
        let mut layouts = Vec::with_capacity(self.sources.len());
        let mut b = None;
        for source in &self.sources {
            let tokens = lookup(x, &source.input)?;
            let tokens = match tokens.rank() {
                2 => tokens.unsqueeze(1)?,
                3 => tokens.clone(),
                _ => candle_core::bail!(
                    "batch entry `{}` has shape {:?}; expected [B, T, D] or [B, D]",
                    source.input,
                    tokens.shape()
                ),
            };
            let (rows, t, dim) = tokens.dims3()?;
            if b.is_some_and(|b| b != rows) {
                candle_core::bail!("the inputs of the batch have different numbers of rows");
            }
            b = Some(rows);
            let mask = match &source.mask {
                Some(name) if t > 1 => Some(lookup(x, name)?),
                _ => None,
            };
            let mut real = real_positions(mask, rows, t)?;
            if !real.source.is_empty() {
                let positions = std::mem::take(&mut real.source);
                let index = Tensor::from_vec(positions, real.target.len(), tokens.device())?;
                let rows = tokens.reshape((rows * t, dim))?.index_select(&index, 0)?;
                packed.push(source.proj.forward_relu(&rows.to_dtype(DType::F32)?)?);
            }
            layouts.push(real);
        }
        let b = b.unwrap_or(0);
        let dev = &lookup(x, &self.sources[0].input)?.device().clone();
        let (target, tm, bias) = side_by_side(layouts, b);
        let n = target.len();
        let bias = Tensor::from_vec(bias, (b, 1, 1, tm), dev)?;
        if n == 0 {
            let zeros = Tensor::zeros((b, tm, self.d_model), DType::F32, dev)?;
            return Ok(Memory {
                keys: self.query_key.as_ref().map(|_| zeros.clone()),
                values: zeros,
                bias,
            });
        }
        let h = Tensor::cat(&packed, 0)?;
        let target = Tensor::from_vec(target, n, dev)?;
        let scatter = |rows: Tensor| -> Result<Tensor> {
            Tensor::zeros((b * tm, self.d_model), DType::F32, dev)?
                .index_add(&target, &rows, 0)?
                .reshape((b, tm, self.d_model))
        };
        Ok(Memory {
            keys: match &self.query_key {
                Some((_, k_proj)) => Some(scatter(k_proj.forward(&h)?)?),
                None => None,
            },
            values: scatter(self.v_proj.forward(&h)?)?,
            bias,
        })
    }

    /// `[B, T', d]` -> `[B, heads, T', d / heads]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.d_model / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The decoder layer and the group fully-connected output on a memory of `b` samples.
    fn decode(&self, memory: &Memory, b: usize, train: bool) -> Result<Tensor> {
        let queries = match &self.query_proj {
            Some(proj) => proj.forward(&self.queries)?,
            None => self.queries.clone(),
        };
        let (k, d) = queries.dims2()?;
        let dh = d / self.heads;
        // t = LN1(q + dropout(q)): per sample when dropout is active, else shared by the batch.
        let t = if self.drop_query.is_active(train) {
            let q = queries
                .unsqueeze(0)?
                .broadcast_as((b, k, d))?
                .contiguous()?;
            self.norm1
                .forward(&(&q + self.drop_query.forward(&q, true)?)?)?
        } else {
            self.norm1.forward(&(&queries * 2.0)?)?.unsqueeze(0)?
        };
        let attended = match (&self.query_key, &memory.keys) {
            (Some((q_proj, _)), Some(keys)) => {
                let q = self.split_heads(&q_proj.forward(&t)?)?; // [B or 1, H, K, dh]
                let q = q.broadcast_as((b, self.heads, k, dh))?.contiguous()?;
                let keys = self.split_heads(keys)?;
                let values = self.split_heads(&memory.values)?;
                let scores = (q.matmul(&keys.t()?)? * (1.0 / (dh as f64).sqrt()))?
                    .broadcast_add(&memory.bias)?;
                let attention = candle_nn::ops::softmax(&scores, D::Minus1)?;
                let mixed = attention
                    .matmul(&values)? // [B, H, K, dh]
                    .transpose(1, 2)?
                    .reshape((b, k, d))?;
                self.out_proj.forward(&mixed)?
            }
            // One key per sample: every query gets its (projected) value.
            _ => self
                .out_proj
                .forward(&memory.values)?
                .broadcast_as((b, k, d))?,
        };
        let t = self
            .norm2
            .forward(&t.broadcast_add(&self.drop_attn.forward(&attended, train)?)?)?;
        let hidden = self
            .drop_ffn_hidden
            .forward(&self.fc1.forward_relu(&t)?, train)?;
        let ffn = self.fc2.forward(&hidden)?;
        let t = self
            .norm3
            .forward(&(&t + self.drop_ffn.forward(&ffn, train)?)?)?;
        // Group fully-connected: one dot product per class, as a batched product over classes
        // (its weight gradient is then a matrix product, not a strided sum over the batch).
        let (t, w) = match &self.group_bias {
            Some(_) => (t, self.group_weight.clone()),
            None => (
                l2_normalize_smooth(&t)?,
                l2_normalize_smooth(&self.group_weight)?,
            ),
        };
        let logits = t
            .transpose(0, 1)?
            .contiguous()? // [K, B, d]
            .matmul(&w.unsqueeze(2)?)? // [K, B, 1]
            .squeeze(2)?
            .t()?;
        match &self.group_bias {
            Some(bias) => add_bias(&logits, bias),
            None => logits.clamp(-1f32, 1f32),
        }
    }
}

/// Where the real tokens of a `[B, T]` mask are, for packing.
struct RealPositions {
    /// Row of each real token in the flattened `[B*T]` input.
    source: Vec<u32>,
    /// Row of each real token in the flattened `[B*T']` memory.
    target: Vec<u32>,
    /// T': one past the last real position of any sample (at least 1).
    extent: usize,
    /// `[B*T']` attention bias: 0 for real tokens, [`MASKED`] for padding.
    bias: Vec<f32>,
}

/// The real positions of `b` samples of `t` tokens under `mask` (every token without one).
fn real_positions(mask: Option<&Tensor>, b: usize, t: usize) -> Result<RealPositions> {
    let flags: Vec<u8> = match mask {
        Some(mask) => mask
            .ne(0f32)?
            .reshape(b * t)?
            .to_device(&Device::Cpu)?
            .to_vec1()?,
        None => vec![1; b * t],
    };
    if flags.len() != b * t {
        candle_core::bail!("mask has {} entries for {b} x {t} tokens", flags.len());
    }
    let extent = flags
        .chunks(t)
        .filter_map(|row| row.iter().rposition(|&f| f != 0))
        .max()
        .map_or(1, |last| last + 1);
    let mut source = Vec::new();
    let mut target = Vec::new();
    let mut bias = vec![MASKED; b * extent];
    for (i, row) in flags.chunks(t).enumerate() {
        for (j, _) in row.iter().enumerate().filter(|(_, f)| **f != 0) {
            source.push((i * t + j) as u32);
            target.push((i * extent + j) as u32);
            bias[i * extent + j] = 0.0;
        }
    }
    Ok(RealPositions {
        source,
        target,
        extent,
        bias,
    })
}

/// The memory of several inputs side by side (each sample: the first input's T' positions, then
/// the second's...): (the memory row of every real token, input after input, as their projected
/// rows are concatenated; the extent; the `[B*T']` attention bias).
fn side_by_side(parts: Vec<RealPositions>, b: usize) -> (Vec<u32>, usize, Vec<f32>) {
    if parts.len() == 1 {
        let one = parts.into_iter().next().expect("one part");
        return (one.target, one.extent, one.bias);
    }
    let extent: usize = parts.iter().map(|p| p.extent).sum();
    let mut bias = Vec::with_capacity(b * extent);
    for i in 0..b {
        for p in &parts {
            bias.extend_from_slice(&p.bias[i * p.extent..(i + 1) * p.extent]);
        }
    }
    let mut target = Vec::new();
    let mut offset = 0;
    for p in &parts {
        target.extend(p.target.iter().map(|&row| {
            let (i, j) = (row as usize / p.extent, row as usize % p.extent);
            (i * extent + offset + j) as u32
        }));
        offset += p.extent;
    }
    (target, extent, bias)
}

impl Head for MlDecoderHead {
    fn micro_batch_rows(&self) -> usize {
        super::MICRO_BATCH_ROWS
    }

    fn logit_biases(&self) -> Vec<Tensor> {
        self.group_bias.iter().cloned().collect()
    }

    fn inputs(&self) -> Vec<String> {
        self.sources
            .iter()
            .flat_map(|s| std::iter::once(s.input.clone()).chain(s.mask.clone()))
            .collect()
    }

    /// Per sample: the projected tokens, keys and values; per query the decoder layer's outputs
    /// (norms, attention, FFN) and the attention weights over the tokens.
    fn activation_values(&self, rows: usize) -> usize {
        let (k, d) = self.queries.dims2().unwrap_or((0, 0));
        let t: usize = self.sources.iter().map(|s| s.tokens).sum();
        let tokens = 3 * t * d;
        let queries = k * (8 * d + 2 * self.fc1.out_dim() + 2 * self.heads * t);
        rows * (tokens + queries) + k * d
    }

    fn forward(&self, x: &Inputs, train: bool) -> Result<Tensor> {
        let memory = self.memory(x)?;
        let b = memory.values.dim(0)?;
        self.decode(&memory, b, train)
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        vec![(self.queries_name.clone(), self.queries.clone())]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::heads::init::seeded_var_builder;
    use candle_nn::VarMap;

    const B: usize = 5;
    const T: usize = 7;
    const DIM: usize = 10;
    const K: usize = 3;

    fn context() -> HeadContext {
        HeadContext {
            num_labels: K,
            input_shapes: HashMap::from([
                ("multimodal_tokens".into(), vec![T, DIM]),
                ("multimodal_mask".into(), vec![T]),
                ("image".into(), vec![DIM]),
            ]),
            label_cooccurrence: None,
            seed: 11,
            label_embeddings: None,
            precision: Default::default(),
        }
    }

    fn head(dropout: f32) -> anyhow::Result<MlDecoderHead> {
        let cfg = MlDecoderConfig {
            d_model: 16,
            heads: 4,
            ffn: 24,
            dropout,
            ..Default::default()
        };
        let map = VarMap::new();
        MlDecoderHead::new(
            &cfg,
            false,
            &context(),
            seeded_var_builder(&map, 11, &Device::Cpu),
        )
    }

    /// Lengths 3, 1, 7, 0 (no real token) and 2, padded on the right; `pad` fills the padding.
    fn batch(pad: f32) -> Result<Inputs> {
        let dev = Device::Cpu;
        let lengths = [3usize, 1, 7, 0, 2];
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&l| (0..T).map(move |t| if t < l { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (B, T), &dev)?;
        let tokens = Tensor::randn(0f32, 1.0, (B, T, DIM), &dev)?;
        let pad = Tensor::full(pad, (B, T, DIM), &dev)?;
        let keep = mask.unsqueeze(2)?.broadcast_as((B, T, DIM))?.ne(0f32)?;
        let tokens = keep.where_cond(&tokens, &pad)?;
        Ok(HashMap::from([
            ("multimodal_tokens".into(), tokens),
            ("multimodal_mask".into(), mask),
        ]))
    }

    /// The straightforward memory: every token position projected, padding masked.
    fn padded_memory(head: &MlDecoderHead, x: &Inputs) -> Result<Memory> {
        let tokens = &x["multimodal_tokens"];
        let mask = &x["multimodal_mask"];
        let h = head.sources[0]
            .proj
            .forward_relu(&tokens.reshape((B * T, DIM))?)?;
        let (_, k_proj) = head.query_key.as_ref().expect("sequence head");
        let d = head.d_model;
        let bias = ((mask.ne(0f32)?.to_dtype(DType::F32)? - 1.0)? * (-MASKED as f64))?
            .reshape((B, 1, 1, T))?;
        Ok(Memory {
            keys: Some(k_proj.forward(&h)?.reshape((B, T, d))?),
            values: head.v_proj.forward(&h)?.reshape((B, T, d))?,
            bias,
        })
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar()
    }

    #[test]
    fn packed_tokens_give_the_padded_result() -> anyhow::Result<()> {
        let head = head(0.0)?;
        let x = batch(0.0)?;
        let packed = head.forward(&x, false)?;
        let padded = head.decode(&padded_memory(&head, &x)?, B, false)?;
        // Sample 3 has no real token: the padded path averages padding values, ours uses none.
        for sample in [0, 1, 2, 4] {
            let diff = max_diff(&packed.get(sample)?, &padded.get(sample)?)?;
            assert!(diff < 1e-5, "sample {sample}: {diff}");
        }
        assert!(
            packed
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite())
        );
        Ok(())
    }

    #[test]
    fn several_inputs_are_one_memory_side_by_side() -> anyhow::Result<()> {
        // Caption-like tokens with a mask beside image-like tokens (other width, no mask).
        const T2: usize = 4;
        const DIM2: usize = 6;
        let mut ctx = context();
        ctx.input_shapes.insert("patches".into(), vec![T2, DIM2]);
        let cfg: MlDecoderConfig = serde_json::from_value(serde_json::json!({
            "inputs": ["multimodal_tokens", "patches"], "d_model": 16, "heads": 4, "ffn": 24,
            "dropout": 0.0
        }))?;
        cfg.validate()?;
        let map = VarMap::new();
        let head =
            MlDecoderHead::new(&cfg, false, &ctx, seeded_var_builder(&map, 5, &Device::Cpu))?;
        assert_eq!(
            head.inputs(),
            ["multimodal_tokens", "multimodal_mask", "patches"]
        );
        let mut x = batch(0.0)?;
        let patches = Tensor::randn(0f32, 1.0, (B, T2, DIM2), &Device::Cpu)?;
        x.insert("patches".into(), patches.clone());
        // The padded memory by hand: both inputs projected, concatenated along the tokens.
        let (a, b) = (&head.sources[0], &head.sources[1]);
        let d = head.d_model;
        let ha = a
            .proj
            .forward_relu(&x["multimodal_tokens"].reshape((B * T, DIM))?)?
            .reshape((B, T, d))?;
        let hb = b
            .proj
            .forward_relu(&patches.reshape((B * T2, DIM2))?)?
            .reshape((B, T2, d))?;
        let h = Tensor::cat(&[&ha, &hb], 1)?.reshape((B * (T + T2), d))?;
        let mask_bias =
            ((x["multimodal_mask"].ne(0f32)?.to_dtype(DType::F32)? - 1.0)? * (-MASKED as f64))?;
        let bias = Tensor::cat(
            &[
                &mask_bias,
                &Tensor::zeros((B, T2), DType::F32, &Device::Cpu)?,
            ],
            1,
        )?
        .reshape((B, 1, 1, T + T2))?;
        let (_, k_proj) = head.query_key.as_ref().expect("keys");
        let memory = Memory {
            keys: Some(k_proj.forward(&h)?.reshape((B, T + T2, d))?),
            values: head.v_proj.forward(&h)?.reshape((B, T + T2, d))?,
            bias,
        };
        let want = head.decode(&memory, B, false)?;
        let got = head.forward(&x, false)?;
        // Every sample has real tokens here (the patches), the empty caption included.
        assert!(max_diff(&got, &want)? < 1e-5, "{}", max_diff(&got, &want)?);
        // `inputs` with `input` or `mask` is refused.
        let both: MlDecoderConfig = serde_json::from_value(serde_json::json!({
            "inputs": ["a", "b"], "mask": "m"
        }))?;
        assert!(both.validate().is_err());
        Ok(())
    }

    #[test]
    fn padding_content_does_not_matter() -> anyhow::Result<()> {
        let head = head(0.0)?;
        let mut x = batch(0.0)?;
        let clean = head.forward(&x, false)?;
        let garbage = batch(1e4)?;
        x.insert("multimodal_tokens".into(), {
            let keep = x["multimodal_mask"]
                .unsqueeze(2)?
                .broadcast_as((B, T, DIM))?
                .ne(0f32)?;
            keep.where_cond(&x["multimodal_tokens"], &garbage["multimodal_tokens"])?
        });
        assert!(max_diff(&clean, &head.forward(&x, false)?)? < 1e-6);
        Ok(())
    }

    #[test]
    fn f16_tokens_and_u8_masks_are_accepted() -> anyhow::Result<()> {
        let head = head(0.0)?;
        let x = batch(0.0)?;
        let mut half = x.clone();
        half.insert(
            "multimodal_tokens".into(),
            x["multimodal_tokens"].to_dtype(DType::F16)?,
        );
        half.insert(
            "multimodal_mask".into(),
            x["multimodal_mask"].to_dtype(DType::U8)?,
        );
        let reference = head.forward(&x, false)?;
        assert!(max_diff(&reference, &head.forward(&half, false)?)? < 1e-2);
        Ok(())
    }

    #[test]
    fn shared_query_path_in_eval_equals_the_per_sample_path() -> anyhow::Result<()> {
        // A dropout that (almost surely) never drops: train mode then only switches to the
        // per-sample query path.
        let head = head(1e-9)?;
        let x = batch(0.0)?;
        assert!(max_diff(&head.forward(&x, false)?, &head.forward(&x, true)?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn pooled_input_is_a_one_token_sequence() -> anyhow::Result<()> {
        let cfg = MlDecoderConfig {
            input: "image".into(),
            d_model: 16,
            heads: 4,
            ffn: 24,
            ..Default::default()
        };
        let map = VarMap::new();
        let head = MlDecoderHead::new(
            &cfg,
            false,
            &context(),
            seeded_var_builder(&map, 1, &Device::Cpu),
        )?;
        assert!(head.query_key.is_none());
        assert_eq!(head.inputs(), ["image"]);
        let image = Tensor::randn(0f32, 1.0, (B, DIM), &Device::Cpu)?;
        let x: Inputs = HashMap::from([("image".into(), image)]);
        assert_eq!(head.forward(&x, false)?.dims(), &[B, K]);
        assert_eq!(head.forward(&x, true)?.dims(), &[B, K]);
        Ok(())
    }

    #[test]
    fn default_mask_is_found_and_required() -> anyhow::Result<()> {
        let head = head(0.1)?;
        assert_eq!(head.inputs(), ["multimodal_tokens", "multimodal_mask"]);
        let mut x = batch(0.0)?;
        x.remove("multimodal_mask");
        let err = head
            .forward(&x, false)
            .expect_err("mask missing")
            .to_string();
        assert!(err.contains("`multimodal_mask`"), "{err}");
        Ok(())
    }
}
