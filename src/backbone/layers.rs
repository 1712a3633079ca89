//! Inference building blocks shared by the transformer backbones: a linear layer that runs as
//! one matrix product over all tokens (bias and activation fused on the CPU; in bf16 x bf16 -> f32
//! through [`crate::bf16_gemm`] with [`Kernels::FusedBf16`]), layer norm, the
//! pre-norm ViT/CLIP encoder layer, the ViT patch embedding as one matrix product and the ViT
//! input tokens; attention is in [`super::attention`], activations in [`super::activation`].
//!
//! Frozen weights only, forward passes only: the fast, gradient-free candle kernels are fine.
//! Hence [`FrozenLinear`] and [`FrozenLayerNorm`], unlike the heads' trainable `Linear` and
//! `LayerNorm` (`crate::heads::layers`), which initialise their variables and record backward
//! passes. Each layer runs in the dtype and with the [`Kernels`] its [`Weights`] were loaded
//! with; a layer built of others (the encoder layer) runs with those of its projections.

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{D, DType, Tensor};

use super::activation::Activation;
use super::attention::{Mask, attention};
use super::cpu_ops::{bias_act, layer_norm, residual_add};
use super::source::Weights;
use crate::bf16_gemm::PackedRhs;
use crate::bf16_gemm::tensor::{linear, pack_linear_weight};
use crate::tensor_ops::{Kernels, is_cpu_f32};

/// A dense layer `y = x W^T + b` with loaded (frozen) weights over the last dimension of any-rank
/// input, optionally followed by an activation in the same pass.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    product: Product,
    /// [out]
    bias: Option<Tensor>,
    /// `bias` on the host, when the layer runs a fused CPU kernel (f32 CPU weights).
    bias_host: Option<Vec<f32>>,
    kernels: Kernels,
}

/// How a [`FrozenLinear`] multiplies its input by its weight.
#[derive(Clone, Debug)]
enum Product {
    /// candle's matmul by `W^T`, `W` [out, in] as stored by PyTorch, in the forward's dtype.
    Matmul(Tensor),
    /// bf16 x bf16 -> f32 by `W^T`, rounded and packed once at load ([`Kernels::FusedBf16`]);
    /// the f32 weight is not kept.
    Bf16(Arc<PackedRhs>),
}

impl FrozenLinear {
    /// A layer of these weights: `weight` [out, in], `bias` [out], of one dtype and device.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, kernels: Kernels) -> Result<Self> {
        let (product, bias_host) = match kernels.bf16_products(&weight) {
            Some(kernel) => {
                let packed = pack_linear_weight(&weight, kernel)?;
                let host = bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1());
                (Product::Bf16(Arc::new(packed)), host.transpose()?)
            }
            None => {
                let host = match &bias {
                    Some(b) if kernels.fuse(&[&weight, b]) => Some(b.to_vec1()?),
                    _ => None,
                };
                (Product::Matmul(weight), host)
            }
        };
        Ok(Self {
            product,
            bias,
            bias_host,
            kernels,
        })
    }

    /// Loads `weight` [out, in] and `bias` [out] under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: Weights) -> Result<Self> {
        let (weight, bias) = Self::parameters(in_dim, out_dim, true, &vb)?;
        Self::from_weights(weight, bias, vb.kernels())
    }

    /// Loads `weight` [out, in] under `vb` (a layer without bias).
    pub fn without_bias(in_dim: usize, out_dim: usize, vb: Weights) -> Result<Self> {
        let (weight, bias) = Self::parameters(in_dim, out_dim, false, &vb)?;
        Self::from_weights(weight, bias, vb.kernels())
    }

    /// `weight` [out, in] and, when `with_bias`, `bias` [out] under `vb`.
    fn parameters(
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
        vb: &Weights,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok((weight, bias))
    }

    /// Loads several `[out_dim, in_dim]` projections of one input under `vb` (e.g. query, key,
    /// value) as one `[names.len() * out_dim, in_dim]` layer: a single matrix product.
    pub fn fused(
        names: &[&str],
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
        vb: Weights,
    ) -> Result<Self> {
        let parts = names
            .iter()
            .map(|name| Self::parameters(in_dim, out_dim, with_bias, &vb.pp(*name)))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = parts.iter().map(|(w, _)| w).collect();
        let biases: Vec<&Tensor> = parts.iter().filter_map(|(_, b)| b.as_ref()).collect();
        let bias = with_bias.then(|| Tensor::cat(&biases, 0)).transpose()?;
        Self::from_weights(Tensor::cat(&weights, 0)?, bias, vb.kernels())
    }

    /// Loads a layer under `vb` as [`FrozenLinear::new`] with a per-output scale (DINOv2's layer
    /// scale) folded in: `(x W^T + b) * s`.
    pub fn scaled(in_dim: usize, out_dim: usize, scale: &Tensor, vb: Weights) -> Result<Self> {
        let (weight, bias) = Self::parameters(in_dim, out_dim, true, &vb)?;
        let weight = weight.broadcast_mul(&scale.unsqueeze(1)?)?;
        let bias = bias.map(|b| b * scale).transpose()?;
        Self::from_weights(weight, bias, vb.kernels())
    }

    pub fn out_dim(&self) -> usize {
        match &self.product {
            Product::Matmul(weight) => weight.dims()[0],
            Product::Bf16(packed) => packed.n(),
        }
    }

    /// The dtype of the layer's input and output: the forward's.
    pub fn dtype(&self) -> DType {
        match &self.product {
            Product::Matmul(weight) => weight.dtype(),
            Product::Bf16(_) => DType::F32,
        }
    }

    /// The kernels this layer was loaded with.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }

    /// `act(x W^T + b)`: on the CPU in f32 (whether the product is f32 or bf16), the bias and
    /// activation in one in-place pass after the product; elsewhere candle's ops.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let weight = match &self.product {
            Product::Bf16(packed) => {
                let y = linear(x, packed, None)?;
                return bias_act(y, self.bias_host.as_deref(), act);
            }
            Product::Matmul(weight) => weight,
        };
        let mut dims = x.dims().to_vec();
        let in_dim = *dims
            .last()
            .expect("linear input has at least one dimension");
        let rows = x.elem_count() / in_dim;
        let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        let y = match (&self.bias, &self.bias_host) {
            (None, _) if self.kernels.fuse(&[&y]) => bias_act(y, None, act)?,
            (Some(_), Some(host)) if self.kernels.fuse(&[&y]) => bias_act(y, Some(host), act)?,
            (bias, _) => {
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                match act {
                    Some(act) => act.apply(&y)?,
                    None => y,
                }
            }
        };
        *dims.last_mut().expect("non-empty") = self.out_dim();
        Ok(y.reshape(dims)?)
    }
}

/// Layer normalisation over the last dimension with loaded (frozen) scale and shift.
#[derive(Clone, Debug)]
pub struct FrozenLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
    /// `weight` and `bias` on the host, when the fused CPU kernel runs (f32 CPU weights).
    host: Option<(Vec<f32>, Vec<f32>)>,
}

impl FrozenLayerNorm {
    /// Loads `weight` and `bias` [dim] under `vb` (or `gamma` and `beta`, as older BERT
    /// checkpoints name them).
    pub fn new(dim: usize, eps: f64, vb: Weights) -> Result<Self> {
        let name = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find(|n| vb.contains_tensor(n))
                .unwrap_or(names[0])
        };
        let weight = vb.get(dim, name(["weight", "gamma"]))?;
        let bias = vb.get(dim, name(["bias", "beta"]))?;
        let host = if vb.kernels().fuse(&[&weight, &bias]) {
            Some((weight.to_vec1()?, bias.to_vec1()?))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
            host,
        })
    }

    /// Statistics in f32 whatever the dtype (the fused CPU kernel and candle's CPU and CUDA
    /// kernels all accumulate in f32, as PyTorch does for bf16 and f16), output in the input's
    /// dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((weight, bias)) = &self.host {
            let x = x.contiguous()?;
            if is_cpu_f32(&x) {
                return layer_norm(&x, weight, bias, self.eps);
            }
        }
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// One pre-norm transformer layer (CLIP text and vision, BLIP vision):
/// `x = x + out(attn(ln1(x)))`, `x = x + fc2(act(fc1(ln2(x))))`.
#[derive(Clone, Debug)]
pub struct PreNormLayer {
    pub ln1: FrozenLayerNorm,
    /// Fused query/key/value projection, [3D, D].
    pub qkv: FrozenLinear,
    pub out: FrozenLinear,
    pub ln2: FrozenLayerNorm,
    pub fc1: FrozenLinear,
    pub fc2: FrozenLinear,
    pub act: Activation,
    pub heads: usize,
}

impl PreNormLayer {
    pub fn forward(&self, x: &Tensor, mask: Option<Mask>) -> Result<Tensor> {
        let kernels = self.qkv.kernels();
        let d = x.dim(D::Minus1)?;
        // Blocks drop each intermediate as soon as it is used: one pass holds a layer's
        // activations at a time, not every one it made.
        let attended = {
            let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
            let q = qkv.narrow(D::Minus1, 0, d)?;
            let k = qkv.narrow(D::Minus1, d, d)?;
            let v = qkv.narrow(D::Minus1, 2 * d, d)?;
            self.out
                .forward(&attention(&q, &k, &v, self.heads, mask, kernels)?)?
        };
        let x = residual_add(x, attended, kernels)?;
        let h = {
            let hidden = self
                .fc1
                .forward_act(&self.ln2.forward(&x)?, Some(self.act))?;
            self.fc2.forward(&hidden)?
        };
        residual_add(&x, h, kernels)
    }
}

/// ViT patch embedding: a Conv2d with kernel = stride = `patch` as one matrix product.
/// `weight` [D, C, p, p], `bias` [D]; input [B, C, H, W] -> [B, (H/p)*(W/p), D] in row-major
/// patch order (as `conv(x).flatten(2).transpose(1, 2)`).
#[derive(Clone, Debug)]
pub struct PatchEmbedding {
    proj: FrozenLinear,
    patch: usize,
}

impl PatchEmbedding {
    /// Loads `weight` [D, C, p, p] and, when `with_bias`, `bias` [D] under `vb`.
    pub fn new(
        channels: usize,
        dim: usize,
        patch: usize,
        with_bias: bool,
        vb: Weights,
    ) -> Result<Self> {
        let weight = vb
            .get((dim, channels, patch, patch), "weight")?
            .reshape((dim, channels * patch * patch))?;
        let bias = if with_bias {
            Some(vb.get(dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            proj: FrozenLinear::from_weights(weight, bias, vb.kernels())?,
            patch,
        })
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch;
        if h % p != 0 || w % p != 0 {
            bail!("image of {h}x{w} pixels is not a multiple of the patch size {p}");
        }
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .to_dtype(self.proj.dtype())?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        self.proj.forward(&patches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn patch_embedding_equals_strided_conv() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 12), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (5, 3, 4, 4), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let conv = x
            .conv2d(&w, 0, 4, 1, 1)?
            .broadcast_add(&b.reshape((1, 5, 1, 1))?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let pe = PatchEmbedding {
            proj: FrozenLinear::from_weights(w.reshape((5, 48))?, Some(b), Kernels::Fused)?,
            patch: 4,
        };
        let diff = (pe.forward(&x)? - conv)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max diff {diff}");
        Ok(())
    }
}

/// ViT input tokens as CLIP and BLIP build them: the class token followed by the patch
/// embeddings, plus learned absolute position embeddings, for square images of one fixed size.
#[derive(Clone, Debug)]
pub struct VitEmbeddings {
    pub patch: PatchEmbedding,
    /// [1, 1, D]
    pub class_embedding: Tensor,
    /// [1, 1 + patches, D]
    pub position_embedding: Tensor,
    pub image_size: usize,
}

impl VitEmbeddings {
    /// Tokens of one image (class token + patches).
    pub fn tokens(&self) -> usize {
        self.position_embedding.dim(1).unwrap_or(1)
    }

    /// pixels [B, C, S, S] -> tokens [B, 1 + patches, D]; `model` names the model in the error
    /// about a wrong image size.
    pub fn forward(&self, pixels: &Tensor, model: &str) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        anyhow::ensure!(
            h == self.image_size && w == self.image_size,
            "{model} vision expects {0}x{0} pixel values, got {h}x{w}",
            self.image_size
        );
        let patches = self.patch.forward(pixels)?;
        let d = patches.dim(D::Minus1)?;
        let cls = self.class_embedding.broadcast_as((b, 1, d))?;
        Ok(Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?)
    }
}
