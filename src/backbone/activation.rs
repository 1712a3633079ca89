//! Feed-forward activations of the transformer backbones, named as in Hugging Face configs
//! (`hidden_act`). [`Activation::apply`] is the candle-ops form (any device and dtype); the fused
//! CPU kernels in [`super::cpu_ops`] apply the same functions in place after a matrix product.

use anyhow::{Result, bail};
use candle_core::Tensor;

/// A feed-forward activation, named as in Hugging Face configs (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), `gelu` in transformers.
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `quick_gelu`: x * sigmoid(1.702 x), used by OpenAI's CLIP.
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("activation `{other}` is not supported"),
        })
    }

    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_activation_is_an_error() {
        assert!(Activation::from_hf("swish_v9").is_err());
        assert_eq!(
            Activation::from_hf("quick_gelu").unwrap(),
            Activation::QuickGelu
        );
    }
}
