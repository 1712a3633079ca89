//! Tensor maths shared by the frozen backbones and the trainable heads, at the bottom of the crate
//! so that both import it from here: L2 normalisation of rows as torch's `F.normalize` does it,
//! the mean of a token sequence over its real (unmasked) tokens, the number type of a forward pass
//! ([`Precision`]), and what the fused CPU kernels of both (`backbone::cpu_ops` and
//! `backbone::attention` for inference, `heads::fused` with backward passes for training) have in
//! common: when they apply ([`Kernels::fuse`], [`is_cpu_f32`]; [`Kernels::for_compute`] picks the
//! bf16 products of [`crate::bf16_gemm`] for bf16 on the CPU), their task size ([`CHUNK`]) and
//! their access to a contiguous tensor's data ([`contiguous_f32`]).

use candle_core::{CpuStorage, D, DType, Device, DeviceLocation, Layout, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::bf16_gemm;

/// Elements per parallel task of the element-wise CPU kernels: enough work per rayon task to beat
/// its scheduling cost.
pub const CHUNK: usize = 1 << 14;

/// Whether `t` is an f32 tensor on the CPU: the only tensors the fused CPU kernels take (others,
/// on any device or in any other dtype, go through candle's device-generic ops). The kernels read
/// such a tensor through [`contiguous_f32`] (after `.contiguous()`, free when it already is) or,
/// for the attention's column slices of a fused projection, check its strides themselves.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Which kernels a frozen model runs, chosen once when it is loaded ([`Kernels::for_compute`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fused CPU kernels wherever their inputs allow ([`Kernels::fuse`]), candle's
    /// device-generic ops elsewhere (CUDA, bf16, f16).
    #[default]
    Fused,
    /// The fused CPU kernels with every linear layer's matrix product in bf16 x bf16 -> f32 on
    /// this [`bf16_gemm::Kernel`] (its weights packed once, at load; its input rounded to bf16 at
    /// each product): `--precision bf16` on the CPU, which rounds the operands of the attention's
    /// two products to bf16 the same way. Everything else (activations, accumulation, layer
    /// norms, softmax, GELU) stays in f32.
    FusedBf16(bf16_gemm::Kernel),
    /// candle's device-generic ops everywhere: what runs on CUDA, forced on the CPU by the tests
    /// that prove the two paths equal.
    Generic,
}

impl Kernels {
    /// The kernels for `precision` on `device`: [`Kernels::FusedBf16`] on the fastest
    /// [`bf16_gemm::Kernel`] for bf16 on the CPU (candle has no bf16 dot-product kernels there),
    /// [`Kernels::Fused`] otherwise. The one place where `--precision` picks a CPU path.
    pub fn for_compute(device: &Device, precision: Precision) -> Self {
        if device.is_cpu() && precision == Precision::Bf16 {
            Self::FusedBf16(bf16_gemm::Kernel::detect())
        } else {
            Self::Fused
        }
    }

    /// The dtype of a model's weights and activations for `precision` with these kernels: f32
    /// with [`Kernels::FusedBf16`] (only its products round to bf16), else `precision`'s.
    pub fn dtype(self, precision: Precision) -> DType {
        match self {
            Self::FusedBf16(_) => DType::F32,
            Self::Fused | Self::Generic => precision.dtype(),
        }
    }

    /// The bf16 product kernel of a product of `operand` (a linear layer's weight, the attention's
    /// inputs): that of [`Kernels::FusedBf16`] when `operand` is an f32 CPU tensor.
    pub fn bf16_products(self, operand: &Tensor) -> Option<bf16_gemm::Kernel> {
        match self {
            Self::FusedBf16(kernel) if is_cpu_f32(operand) => Some(kernel),
            _ => None,
        }
    }

    /// Whether a fused CPU kernel takes `tensors`: [`Kernels::Fused`] or [`Kernels::FusedBf16`]
    /// and every one of them [`is_cpu_f32`]. The one check in front of every fused kernel of the
    /// backbones.
    pub fn fuse(self, tensors: &[&Tensor]) -> bool {
        self != Kernels::Generic && tensors.iter().all(|t| is_cpu_f32(t))
    }
}

/// The number type of a forward pass (`--precision`). On a GPU (and with [`Kernels::Generic`]),
/// weights are converted to it once when a model is loaded and activations stay in it, except
/// where transformers computes in f32 too (layer norm statistics, attention softmax) and for the
/// final outputs, which are f32 before their normalisation. bf16 on the CPU rounds only the
/// operands of the linear layers' products ([`Kernels::FusedBf16`]). Stored (cache) dtypes are a
/// separate choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Self::F32, Self::Bf16, Self::F16];

    /// `f32`, `bf16` or `f16`, as written on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// bf16 on a GPU (tensor cores, f32 accumulation), f32 on the CPU (the fused kernels).
    pub fn default_for(device: &Device) -> Self {
        if device.is_cpu() {
            Self::F32
        } else {
            Self::Bf16
        }
    }

    /// Whether this is f32 (every cache made before the precision was recorded).
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

/// `cpu`, `cuda:0`, ...: a device as the manifest records it.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The f32 data of a contiguous tensor in a custom op's `cpu_fwd`; `op` names the op in errors.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// [`contiguous_f32`] for an in-place op.
pub fn contiguous_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// Rows (the last dimension) divided by their L2 norm, `x / max(||x||, 1e-12)`: torch's
/// `F.normalize(x, dim=-1)`, which BLIP's retrieval head and sentence-transformers' `Normalize`
/// apply. CLIP divides by the bare norm (`x / x.norm(dim=-1, keepdim=True)`), which is the same
/// number for every row with a norm above 1e-12 and NaN for an all-zero row, which stays zero
/// here.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Mean of `[B, T, D]` tokens over the positions where `mask` `[B, T]` is non-zero (all positions
/// without a mask): sentence-transformers' mean pooling, and the heads' pooling of cached token
/// sequences. A sample without any real token gives zeros.
pub fn masked_mean(tokens: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => tokens.mean(1),
        Some(mask) => {
            let mask = mask.ne(0f32)?.to_dtype(DType::F32)?; // [B, T]
            let summed = tokens.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
            let count = mask.sum_keepdim(1)?.clamp(1f32, f32::INFINITY)?;
            summed.broadcast_div(&count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_get_unit_norm_and_zero_rows_stay_zero() -> Result<()> {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu)?;
        assert_eq!(
            l2_normalize(&x)?.to_vec2::<f32>()?,
            vec![vec![0.6, 0.8], vec![0.0, 0.0]]
        );
        Ok(())
    }

    #[test]
    fn masked_mean_averages_real_tokens_only() -> Result<()> {
        let dev = Device::Cpu;
        let tokens = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0], [50.0, 60.0]]], &dev)?;
        let mask = Tensor::new(&[[1f32, 1.0, 0.0]], &dev)?;
        assert_eq!(
            masked_mean(&tokens, Some(&mask))?.to_vec2::<f32>()?,
            vec![vec![2.0, 3.0]]
        );
        let none = Tensor::zeros((1, 3), DType::F32, &dev)?;
        assert_eq!(
            masked_mean(&tokens, Some(&none))?.to_vec2::<f32>()?,
            vec![vec![0.0, 0.0]]
        );
        assert_eq!(
            masked_mean(&tokens, None)?.to_vec2::<f32>()?,
            vec![vec![18.0, 22.0]]
        );
        Ok(())
    }
}
