//! Multi-head scaled dot-product attention for the frozen backbones (self- and cross-attention,
//! optional causal or key-padding mask).
//!
//! On the CPU (f32) it runs as one fused kernel: each (sample, head) pair is one parallel task that
//! multiplies the queries by the keys straight out of the projection's layout (no head split, no
//! transposes, the 1/sqrt(d) scale applied by the matrix product), takes the softmax of its score
//! block while it is still in cache, and writes the weighted values into the merged `[B, T, D]`
//! output. The scores of a whole batch (`[B, H, T, T]`, 50 MB for 32 ViT images) never exist.
//! With [`Kernels::FusedBf16`] (`--precision bf16` on the CPU) both products run in bf16 x bf16 ->
//! f32 through [`crate::bf16_gemm`] (the keys and the values packed per head as they are used,
//! the scale applied in the softmax, which stays f32, as do the scores and the probabilities
//! until they enter the second product).
//! Other devices and dtypes (and [`Kernels::Generic`]) run the same maths with candle ops: the
//! products in the forward's dtype, the mask and softmax in f32 as transformers' CLIP attention
//! and PyTorch's fused attention do (a masked key adds `f32::MIN`, which only f32 can hold).

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_ops::softmax_row;
use crate::bf16_gemm::{self, MatRef, PackedRhs, gemm_bf16};
use crate::tensor_ops::Kernels;

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// Query `i` sees keys `0..=i` (CLIP's text encoder).
    Causal,
    /// `[B, Tk]` f32, 1 for a token and 0 for padding, which is never attended to.
    Keys(&'a Tensor),
}

/// Self-attention on a fused projection: `qkv` is `[batch * seq, 3 * dim]` (queries, keys and
/// values side by side). Returns the per-head contexts merged back to `[batch * seq, dim]`.
pub fn self_attention(
    qkv: &Tensor,
    batch: usize,
    seq: usize,
    heads: usize,
    mask: Option<Mask>,
    kernels: Kernels,
) -> Result<Tensor> {
    let dim = qkv.dim(1)? / 3;
    let qkv = qkv.reshape((batch, seq, 3 * dim))?;
    let part = |i: usize| qkv.narrow(D::Minus1, i * dim, dim);
    let out = attention(&part(0)?, &part(1)?, &part(2)?, heads, mask, kernels)?;
    Ok(out.reshape((batch * seq, dim))?)
}

/// Scaled dot-product attention over already projected `q` [B, Tq, D] and `k`, `v` [B, Tk, D]
/// with `heads` heads; the inputs may be column slices of a wider projection. Returns [B, Tq, D],
/// computed by the fused kernel when `kernels` fuses the inputs, else by candle's ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<Mask>,
    kernels: Kernels,
) -> Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let (_, tk, _) = k.dims3()?;
    anyhow::ensure!(
        d % heads == 0 && k.dims() == v.dims() && k.dims() == [b, tk, d],
        "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let causal = matches!(mask, Some(Mask::Causal));
    anyhow::ensure!(
        !causal || tq == tk,
        "causal attention needs as many queries as keys"
    );
    if kernels.fuse(&[q, k, v]) {
        let keep = match mask {
            Some(Mask::Keys(m)) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            _ => None,
        };
        let bf16 = kernels.bf16_products(q);
        let op = FusedAttention {
            heads,
            causal,
            keep,
            bf16,
        };
        return Ok(q.apply_op3_no_bwd(k, v, &op)?);
    }
    attention_ops(q, k, v, heads, mask)
}

/// `[B, T, H * dh]` -> contiguous `[B, H, T, dh]`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    Ok(x.reshape((b, t, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// The same attention with candle ops (any device and dtype): products in the inputs' dtype,
/// mask and softmax in f32.
fn attention_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<Mask>,
) -> Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let tk = k.dim(1)?;
    let dtype = q.dtype();
    let scale = 1.0 / ((d / heads) as f64).sqrt();
    let q = split_heads(&(q * scale)?, heads)?;
    let k = split_heads(k, heads)?;
    let v = split_heads(v, heads)?;
    let probs = {
        let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        match mask {
            // 0 where attended, the most negative f32 on masked keys (as transformers).
            Some(Mask::Keys(keep)) => {
                let bias = ((1.0 - keep.to_dtype(DType::F32)?)? * f32::MIN as f64)?;
                scores = scores.broadcast_add(&bias.reshape((b, 1, 1, tk))?)?;
            }
            Some(Mask::Causal) => {
                let mask: Vec<f32> = (0..tq)
                    .flat_map(|i| (0..tk).map(move |j| if j > i { f32::MIN } else { 0.0 }))
                    .collect();
                let mask = Tensor::from_vec(mask, (1, 1, tq, tk), scores.device())?;
                scores = scores.broadcast_add(&mask)?;
            }
            None => {}
        }
        candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?
    };
    let out = probs.matmul(&v)?; // [B, H, Tq, dh]
    Ok(out.transpose(1, 2)?.reshape((b, tq, d))?)
}

/// The fused CPU kernel (see the module doc).
struct FusedAttention {
    heads: usize,
    causal: bool,
    /// `[B * Tk]` key flags (1 keep, 0 padding).
    keep: Option<Vec<f32>>,
    /// Both products in bf16 x bf16 -> f32 on this kernel ([`Kernels::FusedBf16`]), else f32.
    bf16: Option<bf16_gemm::Kernel>,
}

/// A `[B, T, D]` f32 input as its data and strides (elements); the last dimension contiguous.
struct View<'a> {
    data: &'a [f32],
    batch_stride: usize,
    row_stride: usize,
}

impl<'a> View<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let data = &storage.as_slice::<f32>()?[layout.start_offset()..];
        match layout.stride() {
            &[batch_stride, row_stride, 1] => Ok(Self {
                data,
                batch_stride,
                row_stride,
            }),
            other => candle_core::bail!("attention: input strides {other:?} are not supported"),
        }
    }
}

/// The output buffer, shared by the tasks, each of which writes its own (sample, head) block.
struct Output(*mut f32);
// SAFETY: tasks write disjoint elements (distinct samples or distinct head columns).
unsafe impl Sync for Output {}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "multiclip-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, tq, d) = lq.shape().dims3()?;
        let tk = lk.shape().dims()[1];
        let (q, k, v) = (View::new(sq, lq)?, View::new(sk, lk)?, View::new(sv, lv)?);
        let (q_rs, k_rs, v_rs) = (
            q.row_stride as isize,
            k.row_stride as isize,
            v.row_stride as isize,
        );
        let heads = self.heads;
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut out = vec![0f32; b * tq * d];
        let dst = Output(out.as_mut_ptr());
        let dst = &dst;
        let softmax = |scores: &mut [f32], s: usize, scale: f32| {
            let keep = self.keep.as_deref().map(|m| &m[s * tk..(s + 1) * tk]);
            for (i, row) in scores.chunks_exact_mut(tk).enumerate() {
                if self.causal {
                    softmax_row(&mut row[..=i], None, scale);
                    row[i + 1..].fill(0.0);
                } else {
                    softmax_row(row, keep, scale);
                }
            }
        };
        (0..b * heads).into_par_iter().try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(scores, context): &mut (Vec<f32>, Vec<f32>), task| {
                let (s, h) = (task / heads, task % heads);
                scores.resize(tq * tk, 0.0);
                let q = &q.data[s * q.batch_stride + h * dh..];
                let k = &k.data[s * k.batch_stride + h * dh..];
                let v = &v.data[s * v.batch_stride + h * dh..];
                let Some(kernel) = self.bf16 else {
                    // SAFETY (both products): every index they touch lies inside its slice: rows
                    // < tq (tk) times the row stride plus columns < dh, as the layouts were
                    // checked to be [B, T, D] with a contiguous last dimension; `dst` rows are d
                    // apart and this task's columns h * dh .. (h + 1) * dh belong to it alone.
                    unsafe {
                        // scores = scale * q k^T  [tq, tk]
                        product(
                            (tq, tk, dh),
                            (scores.as_mut_ptr(), tk as isize),
                            (q.as_ptr(), q_rs, 1),
                            (k.as_ptr(), 1, k_rs),
                            scale,
                        );
                    }
                    softmax(scores, s, 1.0);
                    // SAFETY: as above.
                    unsafe {
                        // out[s, :, h] = scores v  [tq, dh]
                        product(
                            (tq, dh, tk),
                            (dst.0.add(s * tq * d + h * dh), d as isize),
                            (scores.as_ptr(), tk as isize, 1),
                            (v.as_ptr(), v_rs, 1),
                            1.0,
                        );
                    }
                    return candle_core::Result::Ok(());
                };
                let bf16 = |e: anyhow::Error| candle_core::Error::msg(format!("attention: {e:#}"));
                // scores = q k^T  [tq, tk] (the scale goes into the softmax)
                let q = MatRef::new(q, tq, dh, q_rs as usize, 1).map_err(bf16)?;
                let kt = MatRef::new(k, dh, tk, 1, k_rs as usize).map_err(bf16)?;
                let kt = PackedRhs::for_kernel(kt, kernel).map_err(bf16)?;
                gemm_bf16(q, &kt, scores, tk, false).map_err(bf16)?;
                softmax(scores, s, scale);
                // context = scores v  [tq, dh], then into out[s, :, h]
                context.resize(tq * dh, 0.0);
                let vm = MatRef::new(v, tk, dh, v_rs as usize, 1).map_err(bf16)?;
                let vm = PackedRhs::for_kernel(vm, kernel).map_err(bf16)?;
                let probs = MatRef::row_major(scores.as_slice(), tq, tk).map_err(bf16)?;
                gemm_bf16(probs, &vm, context, dh, false).map_err(bf16)?;
                for (i, row) in context.chunks_exact(dh).enumerate() {
                    // SAFETY: row i of this task's block of `dst` (see above) lies inside `out`.
                    unsafe {
                        let at = dst.0.add((s * tq + i) * d + h * dh);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), at, dh);
                    }
                }
                Ok(())
            },
        )?;
        Ok((CpuStorage::F32(out), Shape::from((b, tq, d))))
    }
}

/// `dst = scale * lhs rhs` for `(m, n, k)` matrices given as (pointer, row stride, column stride)
/// (`dst`: pointer and row stride, columns contiguous), single-threaded: the caller parallelises.
///
/// # Safety
/// Every element the strides address must lie in its allocation, and `dst` must not alias.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, isize),
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    scale: f32,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            false,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16_gemm::Kernel;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused kernel equals the candle-ops computation for every mask, on column slices of a
    /// fused projection (strided inputs) and on cross-attention with fewer keys than queries.
    #[test]
    fn fused_kernel_matches_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, d, heads) = (3, 7, 16, 4);
        let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &dev)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, d)?,
            qkv.narrow(2, d, d)?,
            qkv.narrow(2, 2 * d, d)?,
        );
        let keep = Tensor::new(
            &[
                [1f32, 1., 1., 1., 1., 1., 1.],
                [1., 1., 1., 0., 0., 0., 0.],
                [1., 0., 1., 1., 0., 1., 1.],
            ],
            &dev,
        )?;
        let mut bf16 = vec![Kernels::FusedBf16(Kernel::F32Fallback)];
        if Kernel::Avx512Bf16.is_available() {
            bf16.push(Kernels::FusedBf16(Kernel::Avx512Bf16));
        }
        for mask in [None, Some(Mask::Causal), Some(Mask::Keys(&keep))] {
            let fused = attention(&q, &k, &v, heads, mask, Kernels::Fused)?;
            let ops = attention_ops(&q, &k, &v, heads, mask)?;
            assert!(max_diff(&fused, &ops) < 1e-6, "{mask:?}");
            // bf16 operands (8 bits of mantissa) on values of about 1.
            for &kernels in &bf16 {
                let diff = max_diff(&attention(&q, &k, &v, heads, mask, kernels)?, &ops);
                assert!(diff < 2e-2, "{mask:?} {kernels:?}: {diff}");
            }
        }
        let context = Tensor::randn(0f32, 1.0, (b, 3, 2 * d), &dev)?;
        let (ck, cv) = (context.narrow(2, 0, d)?, context.narrow(2, d, d)?);
        let fused = attention(&q, &ck, &cv, heads, None, Kernels::Fused)?;
        assert!(max_diff(&fused, &attention_ops(&q, &ck, &cv, heads, None)?) < 1e-6);
        // Every key masked: uniform attention (the mean of the values) as in transformers, not NaN.
        let none = Tensor::zeros((b, t), DType::F32, &dev)?;
        let mask = Some(Mask::Keys(&none));
        let fused = attention(&q, &k, &v, heads, mask, Kernels::Fused)?;
        assert!(max_diff(&fused, &attention_ops(&q, &k, &v, heads, mask)?) < 1e-6);
        Ok(())
    }

    #[test]
    fn causal_attention_ignores_later_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev)?;
        for kernels in [Kernels::Fused, Kernels::Generic] {
            let full = attention(&x, &x, &x, 2, Some(Mask::Causal), kernels)?;
            let prefix = x.narrow(1, 0, 3)?;
            let short = attention(&prefix, &prefix, &prefix, 2, Some(Mask::Causal), kernels)?;
            assert!(
                max_diff(&full.narrow(1, 0, 3)?, &short) < 1e-6,
                "{kernels:?}"
            );
        }
        Ok(())
    }
}
