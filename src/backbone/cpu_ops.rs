//! Fused, in-place, multi-threaded element-wise kernels for the CPU inference path of the
//! transformer backbones: `y = act(y + bias)` right after a matrix product, `x += y` for
//! residuals, layer normalisation, and the row softmax of the fused attention
//! ([`super::attention`]). candle runs each
//! of these as separate single-threaded passes that allocate a new tensor; on two cores that costs
//! as much as a fifth of a ViT forward.
//!
//! Activations use vectorisable polynomial approximations of exp and erf (errors ~1e-7 absolute,
//! far below the 1e-4 parity tolerance), compiled three times (portable, AVX2 + FMA, AVX-512) and
//! picked at run time: the same code, so the same values, only the vector width differs. Only f32
//! CPU tensors reach these kernels (the callers check [`Kernels::fuse`]); other devices and dtypes
//! go through candle's own ops.

use anyhow::Result;
use candle_core::{CpuStorage, Layout, Tensor};
use rayon::prelude::*;

use super::activation::Activation;
use crate::tensor_ops::{CHUNK, Kernels, contiguous_f32, contiguous_f32_mut};

/// `fn NAME(args)` that runs `IMPL(args)` compiled for AVX-512, else for AVX2 + FMA, else
/// portably, as this CPU allows (checked at run time): the same code, so the same values.
macro_rules! simd_variants {
    ($(#[$doc:meta])* $vis:vis fn $name:ident => $imp:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $imp($($arg),*)
                }
                if has_avx512() {
                    // SAFETY: the CPU has the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

/// Whether this CPU has AVX-512F, AVX2 and FMA.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f") && has_avx2_fma();
    #[allow(unreachable_code)]
    false
}

/// Whether this CPU has AVX2 and FMA.
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[allow(unreachable_code)]
    false
}

/// exp(x) for f32 (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // floor(y + 0.5) rather than round(): it vectorises (round() becomes a libm call).
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits of 1.5 * 2^23 + 127 + n (exact: n is a whole number in -126..=128), whose
    // low eight bits are n's biased exponent. `n as i32` would not vectorise (Rust's saturating
    // float-to-int conversion is scalar code per lane).
    let biased = (n + (12_582_912.0 + 127.0)).to_bits();
    e * f32::from_bits(biased << 23)
}

/// erf(x) (Abramowitz & Stegun 7.1.26: absolute error 1.5e-7, below 3e-7 in f32).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    // tanh(u) = 1 - 2 / (exp(2u) + 1)
    0.5 * x * (2.0 - 2.0 / (exp(2.0 * u) + 1.0))
}

#[inline(always)]
fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

/// `v = f(v + bias)` over whole rows; one tight loop per function so that it vectorises.
#[inline(always)]
fn map_rows<F: Fn(f32) -> f32>(rows: &mut [f32], bias: Option<&[f32]>, f: F) {
    match bias {
        Some(bias) => {
            for row in rows.chunks_exact_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v = f(*v + b));
            }
        }
        None => rows.iter_mut().for_each(|v| *v = f(*v)),
    }
}

/// One contiguous run of rows: `row = act(row + bias)`.
#[inline(always)]
fn bias_act_rows(rows: &mut [f32], bias: Option<&[f32]>, act: Option<Activation>) {
    match act {
        None => map_rows(rows, bias, |x| x),
        Some(Activation::Gelu) => map_rows(rows, bias, gelu),
        Some(Activation::GeluTanh) => map_rows(rows, bias, gelu_tanh),
        Some(Activation::QuickGelu) => map_rows(rows, bias, quick_gelu),
        Some(Activation::Relu) => map_rows(rows, bias, |x| x.max(0.0)),
        Some(Activation::Silu) => map_rows(rows, bias, |x| x / (1.0 + exp(-x))),
    }
}

simd_variants! {
    /// [`bias_act_rows`] for this CPU.
    fn bias_act_dispatch => bias_act_rows(rows: &mut [f32], bias: Option<&[f32]>, act: Option<Activation>)
}

struct BiasAct<'a> {
    bias: Option<&'a [f32]>,
    act: Option<Activation>,
}

impl candle_core::InplaceOp1 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "multiclip-bias-act"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let data = contiguous_f32_mut(storage, layout, self.name())?;
        let width = self.bias.map_or(1, <[f32]>::len);
        let chunk = (CHUNK / width).max(1) * width;
        data.par_chunks_mut(chunk)
            .for_each(|rows| bias_act_dispatch(rows, self.bias, self.act));
        Ok(())
    }
}

/// Lanes of the explicit 8-wide reductions below: a float sum or max over one accumulator is a
/// serial dependency chain the compiler may not reorder, eight independent ones vectorise.
const LANES: usize = 8;

/// `f` folded over `g(v)` for every `v` of `x`, from `init`, in [`LANES`] independent
/// accumulators (so that it vectorises), then over the accumulators.
#[inline(always)]
fn lanes_reduce(x: &[f32], init: f32, g: impl Fn(f32) -> f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, g(v)));
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = f(*a, g(v));
        }
    }
    acc.iter().fold(tail, |a, &v| f(a, v))
}

/// Softmax of `scale` times one row, in place (`scale` > 0); entries whose `keep` flag is 0 get
/// probability 0.
#[inline(always)]
fn softmax_row_impl(row: &mut [f32], keep: Option<&[f32]>, scale: f32) {
    if let Some(keep) = keep {
        row.iter_mut()
            .zip(keep)
            .for_each(|(v, &k)| *v = if k != 0.0 { *v } else { f32::MIN });
    }
    let max = lanes_reduce(row, f32::MIN, |v| v, |a, v| if v > a { v } else { a });
    if keep.is_some() && max == f32::MIN {
        // Every entry masked: uniform, as transformers' additive most-negative mask gives.
        row.fill(1.0 / row.len() as f32);
        return;
    }
    row.iter_mut().for_each(|v| *v = exp((*v - max) * scale));
    if let Some(keep) = keep {
        row.iter_mut().zip(keep).for_each(|(v, &k)| *v *= k);
    }
    let inv = 1.0 / lanes_reduce(row, 0.0, |v| v, |a, v| a + v);
    row.iter_mut().for_each(|v| *v *= inv);
}

simd_variants! {
    /// Softmax of `scale` (> 0) times one row, in place (`keep`: optional 1/0 flags, 0 =
    /// probability 0).
    pub fn softmax_row => softmax_row_impl(row: &mut [f32], keep: Option<&[f32]>, scale: f32)
}

/// Layer normalisation of each row of `x` (rows of `weight.len()`) into `out`: the mean, then
/// the mean squared deviation from it (two passes, as PyTorch's CPU kernel), then
/// `(v - mean) / sqrt(var + eps) * weight + bias`.
#[inline(always)]
fn layer_norm_rows(x: &[f32], out: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let d = weight.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = lanes_reduce(x, 0.0, |v| v, |a, v| a + v) / d as f32;
        let var = lanes_reduce(x, 0.0, |v| (v - mean) * (v - mean), |a, v| a + v) / d as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (v - mean) * rstd * w + b;
        }
    }
}

simd_variants! {
    /// [`layer_norm_rows`] for this CPU.
    fn layer_norm_dispatch => layer_norm_rows(x: &[f32], out: &mut [f32], weight: &[f32], bias: &[f32], eps: f32)
}

struct LayerNorm<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl candle_core::CustomOp1 for LayerNorm<'_> {
    fn name(&self) -> &'static str {
        "multiclip-layer-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let d = self.weight.len();
        if layout.dims().last() != Some(&d) || self.bias.len() != d {
            candle_core::bail!(
                "layer norm of {} weights and {} biases over {:?}",
                d,
                self.bias.len(),
                layout.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        let chunk = (CHUNK / d).max(1) * d;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(out, x)| layer_norm_dispatch(x, out, self.weight, self.bias, self.eps));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Layer normalisation over the last dimension of a contiguous f32 CPU `x` (checked with
/// [`Kernels::fuse`]), `weight` and `bias` as host slices: multi-threaded, vectorised, f32.
pub fn layer_norm(x: &Tensor, weight: &[f32], bias: &[f32], eps: f32) -> Result<Tensor> {
    Ok(x.apply_op1_no_bwd(&LayerNorm { weight, bias, eps })?)
}

/// `act(y + bias)` with `bias` (as a host slice) broadcast over the last dimension, in place on a
/// contiguous f32 CPU `y`, which the caller must own (e.g. a fresh matrix product) and have checked
/// with [`Kernels::fuse`].
pub fn bias_act(y: Tensor, bias: Option<&[f32]>, act: Option<Activation>) -> Result<Tensor> {
    if bias.is_some() || act.is_some() {
        y.inplace_op1(&BiasAct { bias, act })?;
    }
    Ok(y)
}

struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "multiclip-add-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let b = contiguous_f32(s2, l2, self.name())?;
        let a = contiguous_f32_mut(s1, l1, self.name())?;
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(x, y)| *x += y));
        Ok(())
    }
}

/// `x + y` (same shape); in place into `y` for contiguous f32 CPU tensors that `kernels` fuses
/// (the caller must own `y`), else candle's add.
pub fn residual_add(x: &Tensor, y: Tensor, kernels: Kernels) -> Result<Tensor> {
    let in_place = x.is_contiguous() && y.is_contiguous() && x.dims() == y.dims();
    if in_place && kernels.fuse(&[x, &y]) {
        y.inplace_op2(x, &AddAssign)?;
        return Ok(y);
    }
    Ok((x + y)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn approximations_are_accurate() {
        for i in -2000..2000 {
            let x = i as f32 / 100.0;
            let e = (exp(x) - x.exp()).abs() / x.exp();
            assert!(e < 3e-7, "exp({x}) rel err {e}");
        }
        for i in -300..=300 {
            let x = i as f32 / 100.0;
            let want = taylor_erf(x as f64) as f32;
            assert!((erf(x) - want).abs() < 3e-7, "erf({x}): {}", erf(x) - want);
        }
        for i in 300..1000 {
            let x = i as f32 / 100.0;
            assert!((erf(x) - 1.0).abs() < 2.3e-5 && (erf(-x) + 1.0).abs() < 2.3e-5);
        }
    }

    /// erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), in f64 (exact to ~1e-12 for
    /// |x| <= 3).
    fn taylor_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn fused_kernels_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (37, 24), &dev)?).contiguous()?;
        let b = Tensor::randn(0f32, 1.0, 24, &dev)?;
        let host: Vec<f32> = b.to_vec1()?;
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
            Activation::Relu,
            Activation::Silu,
        ] {
            let want = act.apply(&x.broadcast_add(&b)?)?;
            let got = bias_act(x.copy()?, Some(&host), Some(act))?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{act:?}: {diff}");
        }
        for scale in [1.0, 0.125] {
            let want = candle_nn::ops::softmax_last_dim(&(&x * scale as f64)?)?;
            for (mut row, want) in x.to_vec2::<f32>()?.into_iter().zip(want.to_vec2::<f32>()?) {
                softmax_row(&mut row, None, scale);
                let diff = row
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-6, "softmax of {scale} x: {diff}");
            }
        }
        for d in [24, 37, 384] {
            // An offset far from zero, as a residual stream has: the two-pass statistics keep it.
            let x = (Tensor::randn(0f32, 3.0, (5, 7, d), &dev)? + 40.0)?;
            let w = Tensor::randn(1f32, 0.5, d, &dev)?;
            let b = Tensor::randn(0f32, 1.0, d, &dev)?;
            let (wv, bv): (Vec<f32>, Vec<f32>) = (w.to_vec1()?, b.to_vec1()?);
            let got = layer_norm(&x, &wv, &bv, 1e-6)?;
            assert_eq!(got.dims(), x.dims());
            // Against the statistics in f64 (candle's one-pass variance loses digits here).
            let rows = x.flatten_to(1)?.to_vec2::<f32>()?;
            let got_rows = got.flatten_to(1)?.to_vec2::<f32>()?;
            for (row, got) in rows.iter().zip(&got_rows) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                for (i, (&v, &g)) in row.iter().zip(got).enumerate() {
                    let want =
                        (v as f64 - mean) / (var + 1e-6).sqrt() * wv[i] as f64 + bv[i] as f64;
                    assert!(
                        (g as f64 - want).abs() < 2e-5,
                        "layer norm over {d}: {g} vs {want}"
                    );
                }
            }
        }
        assert!(layer_norm(&x, &host[..23], &host[..23], 1e-5).is_err());
        let got = residual_add(&x, b.broadcast_as((37, 24))?.contiguous()?, Kernels::Fused)?;
        let want = x.broadcast_add(&b)?;
        assert_eq!(
            (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0,
            "residual"
        );
        Ok(())
    }
}
