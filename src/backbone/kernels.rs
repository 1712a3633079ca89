//! In-place CPU kernels for the element-wise work between the matrix products of the transformer
//! backbones: bias add, bias + exact GELU, softmax over the last dimension (optionally masked).
//! They run in parallel over rows (rayon) with branch-free, auto-vectorised `exp`/`erf`
//! approximations accurate to a few f32 ulps, and reuse the matmul output buffer instead of
//! allocating new tensors. On other devices (or non-contiguous inputs) the same math runs as
//! ordinary candle ops. Inference only: none of this records gradients.

use candle_core::{CpuStorage, D, InplaceOp1, InplaceOp2, Layout, Result, Tensor, bail};
use rayon::prelude::*;

/// Elements per parallel task (keeps rayon's overhead small on short rows).
const TASK_ELEMS: usize = 1 << 14;

/// `e^x` for f32, Cephes-style: range reduction by powers of two and a degree-6 polynomial;
/// relative error ~1e-7. Inputs below -87 give ~1e-38 instead of denormals/0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and removing 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `erf(x)` for f32 as a rational function of x (Eigen's `generic_fast_erf_float`); absolute
/// error a few 1e-7, no branches.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_473_9e-2;
    x * p / q
}

/// Exact (erf) GELU.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn contiguous_f32<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let (start, end) = match layout.contiguous_offsets() {
        Some(offsets) => offsets,
        None => bail!("{op}: the tensor must be contiguous"),
    };
    match storage {
        CpuStorage::F32(data) => Ok(&mut data[start..end]),
        _ => bail!("{op}: only f32 is supported"),
    }
}

fn vector_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let (start, end) = match layout.contiguous_offsets() {
        Some(offsets) => offsets,
        None => bail!("{op}: the second operand must be contiguous"),
    };
    match storage {
        CpuStorage::F32(data) => Ok(&data[start..end]),
        _ => bail!("{op}: only f32 is supported"),
    }
}

/// Rows of `width` per parallel task.
fn rows_per_task(width: usize) -> usize {
    (TASK_ELEMS / width.max(1)).max(1)
}

/// `x[r, :] = f(x[r, :] + bias)` for every row.
fn map_rows_with_bias(x: &mut [f32], bias: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    let width = bias.len();
    x.par_chunks_mut(width * rows_per_task(width))
        .for_each(|rows| {
            for row in rows.chunks_exact_mut(width) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v = f(*v + b);
                }
            }
        });
}

struct AddBias;

impl InplaceOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let bias = vector_f32(s2, l2, self.name())?;
        map_rows_with_bias(contiguous_f32(s1, l1, self.name())?, bias, |v| v);
        Ok(())
    }
}

struct BiasGelu;

impl InplaceOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let bias = vector_f32(s2, l2, self.name())?;
        map_rows_with_bias(contiguous_f32(s1, l1, self.name())?, bias, gelu);
        Ok(())
    }
}

/// Lanes of the independent accumulators in the reductions (lets them vectorise).
const LANES: usize = 8;

/// Largest value of `row`.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sum of `row`.
#[inline(always)]
fn row_sum(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    rest.iter().chain(&acc).sum()
}

/// Softmax of one row in place; keys whose `keep` is 0 get probability 0.
#[inline(always)]
fn softmax_row(row: &mut [f32], keep: Option<&[f32]>) {
    let max = match keep {
        None => row_max(row),
        // Padded keys cannot win the max: their score is compared as -inf.
        Some(keep) => {
            row.iter().zip(keep).fold(
                f32::NEG_INFINITY,
                |m, (&v, &k)| if k > 0.0 && v > m { v } else { m },
            )
        }
    };
    for v in row.iter_mut() {
        *v = exp_f32(*v - max);
    }
    if let Some(keep) = keep {
        for (v, k) in row.iter_mut().zip(keep) {
            *v *= k;
        }
    }
    let inv = 1.0 / row_sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

struct Softmax;

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let width = layout.dims().last().copied().unwrap_or(1);
        let x = contiguous_f32(storage, layout, self.name())?;
        x.par_chunks_mut(width * rows_per_task(width))
            .for_each(|rows| {
                rows.chunks_exact_mut(width)
                    .for_each(|row| softmax_row(row, None));
            });
        Ok(())
    }
}

/// Softmax of `[batch, heads, queries, keys]` scores where `mask` `[batch, keys]` (1 keep, 0 drop)
/// selects the keys of each batch row.
struct MaskedSoftmax;

impl InplaceOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let keys = l1.dims().last().copied().unwrap_or(1);
        let batch = l1.dims().first().copied().unwrap_or(1);
        let rows_per_batch = l1.shape().elem_count() / (batch * keys).max(1);
        let mask = vector_f32(s2, l2, self.name())?;
        if mask.len() != batch * keys {
            bail!(
                "{}: mask has {} values, expected {batch} x {keys}",
                self.name(),
                mask.len()
            );
        }
        let x = contiguous_f32(s1, l1, self.name())?;
        x.par_chunks_mut(keys * rows_per_batch)
            .zip(mask.par_chunks(keys))
            .for_each(|(scores, keep)| {
                scores
                    .chunks_exact_mut(keys)
                    .for_each(|row| softmax_row(row, Some(keep)));
            });
        Ok(())
    }
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous()
}

/// `x + bias` (bias broadcast over rows), reusing `x`'s buffer on the CPU.
pub fn add_bias(x: Tensor, bias: &Tensor) -> Result<Tensor> {
    if fast_path(&x) && bias.is_contiguous() {
        x.inplace_op2(bias, &AddBias)?;
        Ok(x)
    } else {
        x.broadcast_add(bias)
    }
}

/// `gelu_erf(x + bias)`, reusing `x`'s buffer on the CPU.
pub fn bias_gelu(x: Tensor, bias: &Tensor) -> Result<Tensor> {
    if fast_path(&x) && bias.is_contiguous() {
        x.inplace_op2(bias, &BiasGelu)?;
        Ok(x)
    } else {
        x.broadcast_add(bias)?.gelu_erf()
    }
}

/// Softmax over the last dimension of `[batch, heads, queries, keys]` scores; with `mask`
/// (`[batch, keys]`, 1 = token, 0 = padding) padded keys get probability 0.
pub fn softmax(scores: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None if fast_path(&scores) => {
            scores.inplace_op1(&Softmax)?;
            Ok(scores)
        }
        None => candle_nn::ops::softmax_last_dim(&scores),
        Some(mask) if fast_path(&scores) && mask.is_contiguous() => {
            scores.inplace_op2(mask, &MaskedSoftmax)?;
            Ok(scores)
        }
        Some(mask) => {
            let (b, keys) = mask.dims2()?;
            let bias = ((1.0 - mask)? * f32::MIN as f64)?.reshape((b, 1, 1, keys))?;
            candle_nn::ops::softmax(&scores.broadcast_add(&bias)?, D::Minus1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_accurate() {
        for i in -8000..=8000 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            assert!(rel < 3e-7, "exp({x}): relative error {rel}");
        }
    }

    #[test]
    fn bias_gelu_matches_candle_exact_gelu() {
        let dev = Device::Cpu;
        let x = Tensor::arange(-6000f32, 6000., &dev)
            .unwrap()
            .affine(1e-3, 0.)
            .unwrap()
            .reshape((40, 300))
            .unwrap();
        let bias = Tensor::arange(0f32, 300., &dev)
            .unwrap()
            .affine(1e-3, -0.1)
            .unwrap();
        let want = x
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .broadcast_add(&bias.to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .gelu_erf()
            .unwrap();
        let got = bias_gelu(x.copy().unwrap(), &bias)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let diff: f64 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        // Values reach 6 (f32 ulp 4.8e-7): a couple of ulps.
        assert!(diff < 2e-6, "max abs diff {diff}");
    }

    #[test]
    fn softmax_matches_candle_with_and_without_mask() {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3., (2, 3, 4, 5), &dev).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let got = softmax(scores.copy().unwrap(), None).unwrap();
        let diff: f32 = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "max abs diff {diff}");
        let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.], [1., 1., 1., 1., 1.]], &dev).unwrap();
        let fast = softmax(scores.copy().unwrap(), Some(&mask)).unwrap();
        let bias = ((1.0 - &mask).unwrap() * -1e30)
            .unwrap()
            .reshape((2, 1, 1, 5))
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias).unwrap()).unwrap();
        let diff: f32 = (fast - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "masked: max abs diff {diff}");
    }
}
