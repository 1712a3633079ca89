//! Inference building blocks shared by the transformer backbones: fused QKV projection,
//! multi-head self-attention on flattened `[batch * seq, dim]` activations, activations by their
//! Hugging Face names. Frozen weights only: the fast, gradient-free candle kernels are fine here.

use anyhow::{Result, bail};
use candle_core::{D, Tensor};
use candle_nn::{Linear, VarBuilder};

/// A feed-forward activation, named as in Hugging Face configs (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), `gelu` in transformers.
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("activation `{other}` is not supported"),
        })
    }

    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Loads `prefix.{query,key,value}` (or any three projections) as one `[3 * dim, dim]` linear
/// layer, so the three projections are a single matrix product.
pub fn fused_qkv(vb: &VarBuilder, names: [&str; 3], dim: usize, bias: bool) -> Result<Linear> {
    let mut weights = Vec::with_capacity(3);
    let mut biases = Vec::with_capacity(3);
    for name in names {
        let vb = vb.pp(name);
        weights.push(vb.get((dim, dim), "weight")?);
        if bias {
            biases.push(vb.get(dim, "bias")?);
        }
    }
    let weight = Tensor::cat(&weights, 0)?;
    let bias = if bias {
        Some(Tensor::cat(&biases, 0)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Self-attention core: `qkv` is `[batch * seq, 3 * dim]` (queries, keys, values side by side);
/// `mask_bias`, when given, is added to the scores (`[batch, 1, 1, seq]`, 0 or a large negative).
/// Returns the per-head contexts merged back to `[batch * seq, dim]`.
pub fn self_attention(
    qkv: &Tensor,
    batch: usize,
    seq: usize,
    heads: usize,
    mask_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dim = qkv.dim(1)? / 3;
    let head_dim = dim / heads;
    let qkv = qkv
        .reshape((batch, seq, 3, heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let q = (qkv.get(0)?.contiguous()? * scale)?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(mask_bias) = mask_bias {
        scores = scores.broadcast_add(mask_bias)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let context = probs.matmul(&v)?; // [batch, heads, seq, head_dim]
    Ok(context.transpose(1, 2)?.reshape((batch * seq, dim))?)
}

/// Mean over `dim` 1 of `[batch, seq, dim]` rows where `mask` (`[batch, seq]`, 1/0 f32) is 1.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let summed = x.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
    Ok(summed.broadcast_div(&counts)?)
}
