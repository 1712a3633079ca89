//! Inference building blocks shared by the transformer backbones: dense layers (with fused QKV and
//! folded layer scales), multi-head self-attention on flattened `[batch * seq, dim]` activations,
//! activations by their Hugging Face names, masked mean pooling. Frozen weights only: the
//! gradient-free kernels of [`super::kernels`] are used.

use anyhow::{Result, bail};
use candle_core::{D, Tensor};
use candle_nn::VarBuilder;

use super::kernels;

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
}

/// A linear layer `x W^T + b` on `[rows, in]` activations.
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// Loads `weight` `[out, in]` and `bias` `[out]` under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: vb.get(out_dim, "bias")?,
        })
    }

    /// Loads three `[dim, dim]` projections (e.g. query, key, value) as one `[3 * dim, dim]` layer,
    /// so they are a single matrix product. Missing biases (`bias = false`) are zeros.
    pub fn load_fused(vb: &VarBuilder, names: [&str; 3], dim: usize, bias: bool) -> Result<Self> {
        let mut weights = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for name in names {
            let vb = vb.pp(name);
            weights.push(vb.get((dim, dim), "weight")?);
            biases.push(if bias {
                vb.get(dim, "bias")?
            } else {
                Tensor::zeros(dim, candle_core::DType::F32, vb.device())?
            });
        }
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
        })
    }

    /// Folds a per-output scale (DINOv2's layer scale) into the weights: `(x W^T + b) * s`.
    pub fn scaled(self, scale: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: self.weight.broadcast_mul(&scale.unsqueeze(1)?)?,
            bias: (self.bias * scale)?,
        })
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(kernels::add_bias(self.matmul(x)?, &self.bias)?)
    }

    /// `activation(x W^T + b)`, fused for exact GELU.
    pub fn forward_activated(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let y = self.matmul(x)?;
        Ok(match activation {
            Activation::Gelu => kernels::bias_gelu(y, &self.bias)?,
            Activation::GeluTanh => kernels::add_bias(y, &self.bias)?.gelu()?,
            Activation::Relu => kernels::add_bias(y, &self.bias)?.relu()?,
            Activation::Silu => kernels::add_bias(y, &self.bias)?.silu()?,
        })
    }
}

/// Self-attention core: `qkv` is `[batch * seq, 3 * dim]` (queries, keys, values side by side);
/// `mask`, when given, is `[batch, seq]` (1 = token, 0 = padding, never attended to).
/// Returns the per-head contexts merged back to `[batch * seq, dim]`.
pub fn self_attention(
    qkv: &Tensor,
    batch: usize,
    seq: usize,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dim = qkv.dim(1)? / 3;
    let head_dim = dim / heads;
    let qkv = qkv.reshape((batch, seq, 3, heads, head_dim))?;
    let part = |i: usize| qkv.narrow(2, i, 1).and_then(|t| t.squeeze(2)); // [batch, seq, heads, head_dim]
    let scale = 1.0 / (head_dim as f64).sqrt();
    let q = (part(0)?.transpose(1, 2)?.contiguous()? * scale)?; // [batch, heads, seq, head_dim]
    let k_t = part(1)?.permute((0, 2, 3, 1))?.contiguous()?; // [batch, heads, head_dim, seq]
    let v = part(2)?.transpose(1, 2)?.contiguous()?;
    let probs = kernels::softmax(q.matmul(&k_t)?, mask)?;
    let context = probs.matmul(&v)?; // [batch, heads, seq, head_dim]
    Ok(context.transpose(1, 2)?.reshape((batch * seq, dim))?)
}

/// Mean over `dim` 1 of `[batch, seq, dim]` rows where `mask` (`[batch, seq]`, 1/0 f32) is 1.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let summed = x.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
    Ok(summed.broadcast_div(&counts)?)
}
