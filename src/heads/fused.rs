//! Fused CPU kernels with hand-written backward passes for the heads' hot spots.
//!
//! candle's backward of a broadcast (a bias added to every row, a layer norm's scale and shift)
//! sums the gradient over the leading dimension with a strided reduction that costs ~20x a
//! contiguous pass, and a layer norm built from basic ops records ~10 ops whose gradients are
//! each materialised. These ops do the same maths in one or two passes:
//! [`bias_add`] (x + b on the last dimension; the bias gradient is a row-sum by matrix product)
//! and [`bias_relu`] (the same followed by a ReLU, whose candle backward is five passes),
//! [`layer_norm`] (normalise the last dimension, scale, shift; one pass forward, one backward),
//! [`matmul_weight_grad_only`] (x W^T for an input that needs no gradient: candle's matmul
//! backward always computes the input's gradient too, a third of an MLP's work on cached
//! features), [`normalize_rows_untracked`] (unit-norm rows of cached features in one pass
//! instead of four) and [`mul_by_mask`] (dropout's `x * mask`: candle's product backward also
//! computes the mask's gradient). CPU and f32 only; callers fall back to basic ops elsewhere. Row loops run on
//! rayon's pool.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::tensor_ops::{CHUNK, contiguous_f32};

/// Rows per parallel task: enough work per task to beat the scheduling cost.
const ROWS_PER_TASK: usize = 64;

/// Sums of `[.., n]` over every leading dimension, as `[n]`, by a matrix product with ones.
fn column_sums(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / n;
    let ones = Tensor::ones((1, rows), x.dtype(), x.device())?;
    ones.matmul(&x.reshape((rows, n))?)?.reshape(n)
}

/// `x + b`, or `max(x + b, 0)` when `relu`.
struct BiasAdd {
    relu: bool,
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        if self.relu { "bias-relu" } else { "bias-add" }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let mut out = x.to_vec();
        let relu = self.relu;
        out.par_chunks_mut(b.len() * ROWS_PER_TASK)
            .for_each(|rows| {
                for row in rows.chunks_exact_mut(b.len()) {
                    for (o, &bias) in row.iter_mut().zip(b) {
                        let v = *o + bias;
                        *o = if relu { v.max(0.0) } else { v };
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = if self.relu {
            grad.contiguous()?.apply_op2_no_bwd(res, &ReluGrad)?
        } else {
            grad.clone()
        };
        let bias_grad = column_sums(&grad)?;
        Ok((Some(grad), Some(bias_grad)))
    }
}

/// `grad` where the ReLU's output is positive, 0 elsewhere: one pass.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        zip_map(self.name(), (s1, l1), (s2, l2), |g, y| {
            if y > 0.0 { g } else { 0.0 }
        })
    }
}

/// `f(a, b)` element by element of two contiguous f32 operands of one shape (`a`'s), as an f32
/// tensor's storage: one parallel pass.
fn zip_map(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let a = contiguous_f32(s1, l1, name)?;
    let b = contiguous_f32(s2, l2, name)?;
    if a.len() != b.len() {
        candle_core::bail!("{name}: operands of {} and {} elements", a.len(), b.len());
    }
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

fn bias_op(x: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if b.dims() != [n] || x.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("bias-add: bias {:?} for input {:?}", b.shape(), x.shape());
    }
    x.contiguous()?
        .apply_op2(&b.contiguous()?, BiasAdd { relu })
}

/// `x + b` with `b` `[n]` added to every row of `x` `[.., n]` (CPU, f32).
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    bias_op(x, b, false)
}

/// `max(x + b, 0)`: the bias add and the ReLU in one pass each way (CPU, f32).
pub fn bias_relu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    bias_op(x, b, true)
}

/// `x * mask`, elementwise; the mask gets no gradient.
struct MaskMul;

impl CustomOp2 for MaskMul {
    fn name(&self) -> &'static str {
        "mask-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        zip_map(self.name(), (s1, l1), (s2, l2), |x, m| x * m)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(mask, self)?), None))
    }
}

/// `x * mask` for a `mask` of the same shape that needs no gradient (a dropout mask): one pass
/// each way (CPU, f32).
pub fn mul_by_mask(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if x.dims() != mask.dims() || x.dtype() != DType::F32 || mask.dtype() != DType::F32 {
        candle_core::bail!(
            "mask-mul: mask {:?} for input {:?}",
            mask.shape(),
            x.shape()
        );
    }
    x.contiguous()?.apply_op2(&mask.contiguous()?, MaskMul)
}

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1 / standard deviation of a row.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(dst, src)| {
                for (row, dst) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                    let (mean, rstd) = row_stats(row, self.eps);
                    for (((o, &v), &wi), &bi) in dst.iter_mut().zip(row).zip(w).zip(b) {
                        *o = (v - mean) * rstd * wi + bi;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        // One pass gives dx (rows x n), then dw and db as two extra rows.
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.get(rows)?;
        let db = packed.get(rows + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The layer norm's backward pass: `[rows + 2, n]` = dx rows, then dw, then db.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let n = w.len();
        let rows = x.len() / n;
        let mut out = vec![0f32; (rows + 2) * n];
        let (dx, sums) = out.split_at_mut(rows * n);
        // Each task writes its rows of dx and returns its partial dw and db.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .zip(g.par_chunks(n * ROWS_PER_TASK))
            .map(|((dx, x), g)| {
                let mut dw_db = vec![0f32; 2 * n];
                let (dw, db) = dw_db.split_at_mut(n);
                let mut xhat = vec![0f32; n];
                for ((row, grow), dxrow) in x
                    .chunks_exact(n)
                    .zip(g.chunks_exact(n))
                    .zip(dx.chunks_exact_mut(n))
                {
                    let (mean, rstd) = row_stats(row, self.eps);
                    let (mut mean_gw, mut mean_gw_xhat) = (0f32, 0f32);
                    for i in 0..n {
                        xhat[i] = (row[i] - mean) * rstd;
                        let gw = grow[i] * w[i];
                        mean_gw += gw;
                        mean_gw_xhat += gw * xhat[i];
                        dw[i] += grow[i] * xhat[i];
                        db[i] += grow[i];
                    }
                    mean_gw /= n as f32;
                    mean_gw_xhat /= n as f32;
                    for i in 0..n {
                        dxrow[i] = rstd * (grow[i] * w[i] - mean_gw - xhat[i] * mean_gw_xhat);
                    }
                }
                dw_db
            })
            .collect();
        for partial in partials {
            for (total, v) in sums.iter_mut().zip(partial) {
                *total += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, n))))
    }
}

/// Layer norm of `x` `[.., n]` over its last dimension with scale `w` and shift `b` `[n]`
/// (CPU, f32).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [n] || b.dims() != [n] || x.dtype() != DType::F32 {
        candle_core::bail!(
            "layer-norm: scale {:?} for input {:?}",
            w.shape(),
            x.shape()
        );
    }
    let op = LayerNormOp { eps: eps as f32 };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// Each row scaled to unit L2 norm (an all-zero row stays zero), in one pass.
struct NormalizeRows;

impl CustomOp1 for NormalizeRows {
    fn name(&self) -> &'static str {
        "normalize-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        out.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
            for row in rows.chunks_exact_mut(n) {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|v| *v /= norm);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Rows of `x` `[B, n]` scaled to unit L2 norm, without a backward op: for inputs outside the
/// autograd graph (cached features). CPU, f32.
pub fn normalize_rows_untracked(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || x.track_op() {
        candle_core::bail!("normalize-rows: untracked f32 input only");
    }
    x.contiguous()?.apply_op1_no_bwd(&NormalizeRows)
}

/// The identity on `x W^T` whose backward gives `W` its gradient `g^T x` and nothing else.
struct WeightGrad {
    input: Tensor,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, self.name())?;
        Ok((CpuStorage::F32(y.to_vec()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(grad.t()?.matmul(&self.input)?)))
    }
}

/// `x W^T` for `x` `[rows, in]` that needs no gradient (cached features): the backward pass
/// computes only `W`'s gradient (CPU, f32).
pub fn matmul_weight_grad_only(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        candle_core::bail!("weight-grad matmul: f32 only");
    }
    let y = x.matmul(&w.detach().t()?)?;
    y.apply_op2(w, WeightGrad { input: x.clone() })
}
