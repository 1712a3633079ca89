//! The heads' matrix products `a b^T` (a linear layer's `x W^T`, a classifier's features against
//! its class vectors) in the precision of the run (`train --precision`).
//!
//! - [`Precision::F32`]: candle's f32 product; an input outside the autograd graph (cached
//!   features) gets no gradient ([`super::fused::matmul_weight_grad_only`]).
//! - [`Precision::Bf16`] on CPU f32 tensors: [`crate::bf16_gemm`], both operands rounded to bf16
//!   and every sum in f32, in the forward product and in both products of the backward pass
//!   (`da = g b`, `db = g^T a`, each skipped for an operand that needs no gradient). Weights,
//!   gradients, optimiser state and everything outside the products stay f32. Without
//!   AVX512-BF16 the kernel's fallback multiplies the same bf16-rounded operands in f32: the same
//!   numbers up to the order of the f32 sums.
//!
//! Other tensors (CUDA, f64 in tests) take candle's product whatever the precision; training
//! refuses `--precision bf16` off the CPU before it starts (`TrainRequest::check`).

use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor};

use super::fused;
use crate::bf16_gemm::{self, Kernel, gemm_bf16_new};
use crate::tensor_ops::{Precision, is_cpu_f32};

/// `a b^T` for `a` `[.., k]` (any rank from 2) and `b` `[n, k]`, as `[.., n]`, in `precision`.
///
/// The bf16 product takes the leading dimensions as rows inside the op; the others flatten a
/// rank-3 or higher `a` to `[rows, k]` and back (each reshape is one more node of the backward
/// pass, a zero-filled gradient and an add over the whole tensor).
pub fn matmul_nt(a: &Tensor, b: &Tensor, precision: Precision) -> Result<Tensor> {
    if precision == Precision::Bf16 && is_cpu_f32(a) && is_cpu_f32(b) {
        let a = if a.rank() > 2 {
            a.contiguous()?
        } else {
            a.clone()
        };
        return a.apply_op2(
            b,
            Bf16MatmulNt {
                kernel: Kernel::detect(),
            },
        );
    }
    if a.rank() > 2 {
        let (k, mut dims) = (a.dim(D::Minus1)?, a.dims().to_vec());
        let rows = a.elem_count() / k.max(1);
        let y = matmul_nt(&a.reshape((rows, k))?, b, precision)?;
        if let Some(last) = dims.last_mut() {
            *last = b.dim(0)?;
        }
        return y.reshape(dims);
    }
    if is_cpu_f32(a) && !a.track_op() && b.track_op() {
        fused::matmul_weight_grad_only(a, b)
    } else {
        a.matmul(&b.t()?)
    }
}

/// `x` `[.., k]` as `[rows, k]`: itself when 2-D, else flattened (no copy: the bf16 op's
/// operand of rank 3 or higher is contiguous).
fn rows(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 2 {
        return Ok(x.clone());
    }
    let k = x.dim(D::Minus1)?;
    x.detach().reshape((x.elem_count() / k.max(1), k))
}

/// `a b^T` with bf16 operands and f32 sums, forward and backward, on `kernel`.
struct Bf16MatmulNt {
    kernel: Kernel,
}

/// A [`bf16_gemm`] error as candle's.
fn candle_error(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("bf16 product: {e:#}"))
}

impl CustomOp2 for Bf16MatmulNt {
    fn name(&self) -> &'static str {
        "bf16-matmul-nt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // `a` `[.., k]` of rank 3 or more is contiguous (`matmul_nt`): its rows are `[rows, k]`.
        let mut dims = l1.dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        let flat = (dims.len() > 2).then(|| {
            Layout::contiguous_with_offset(
                (l1.shape().elem_count() / k.max(1), k),
                l1.start_offset(),
            )
        });
        let a = bf16_gemm::tensor::view(s1, flat.as_ref().unwrap_or(l1)).map_err(candle_error)?;
        let b = bf16_gemm::tensor::view(s2, l2).map_err(candle_error)?;
        let n = b.rows();
        let packed = bf16_gemm::PackedRhs::for_kernel(b.t(), self.kernel).map_err(candle_error)?;
        let out = gemm_bf16_new(a, &packed).map_err(candle_error)?;
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use bf16_gemm::tensor::{matmul, pack};
        let kernel = self.kernel;
        let grad = rows(grad)?;
        let grad_a = if a.track_op() {
            let g = matmul(&grad, &pack(b, kernel).map_err(candle_error)?).map_err(candle_error)?;
            Some(g.reshape(a.dims())?)
        } else {
            None
        };
        let grad_b = if b.track_op() {
            let packed = pack(&rows(a)?, kernel).map_err(candle_error)?;
            Some(matmul(&grad.t()?, &packed).map_err(candle_error)?)
        } else {
            None
        };
        Ok((grad_a, grad_b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use half::bf16;

    fn round(x: &[f32]) -> Vec<f64> {
        x.iter()
            .map(|&v| f64::from(bf16::from_f32(v).to_f32()))
            .collect()
    }

    /// `a b^T` (`a` `m x k`, `b` `n x k`, row-major) in f64, and the sum of the absolute values
    /// of its products per element (the scale of its rounding errors).
    fn product_nt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0.0; m * n];
        let mut scale = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    out[i * n + j] += a[i * k + p] * b[j * k + p];
                    scale[i * n + j] += (a[i * k + p] * b[j * k + p]).abs();
                }
            }
        }
        (out, scale)
    }

    fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        (0..cols)
            .flat_map(|j| (0..rows).map(move |i| x[i * cols + j]))
            .collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Checks `got` against `want` within `rel` of each element's scale.
    fn assert_close(got: &[f32], want: &[f64], scale: &[f64], rel: f64, what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let tol = rel * s + 1e-30;
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}[{i}]: {g} vs {w} (tolerance {tol})"
            );
        }
    }

    /// Forward and both gradients of `sum(w * (a b^T))` on both kernels: equal to the f64
    /// products of the bf16-rounded operands (the backward rounds `w`, the incoming gradient, too)
    /// within f32 accumulation error, and to the exact f32 maths within bf16 rounding; the
    /// gradients also agree with central finite differences of the exact function.
    #[test]
    fn bf16_products_and_their_gradients_match_references() -> Result<()> {
        let dev = Device::Cpu;
        let (m, n, k) = (37, 19, 70);
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        let (av, bv, wv) = (values(&a), values(&b), values(&w));
        let exact = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        // References: y = a b^T, da = w b, db = w^T a.
        let refs = |a: &[f64], b: &[f64], w: &[f64]| {
            let (y, ys) = product_nt(a, b, m, n, k);
            let (da, das) = product_nt(w, &transpose(b, n, k), m, k, n);
            let (db, dbs) = product_nt(&transpose(w, m, n), &transpose(a, m, k), n, k, m);
            [(y, ys), (da, das), (db, dbs)]
        };
        let rounded = refs(&round(&av), &round(&bv), &round(&wv));
        let smooth = refs(&exact(&av), &exact(&bv), &exact(&wv));
        for kernel in [Kernel::Avx512Bf16, Kernel::F32Fallback] {
            if !kernel.is_available() {
                continue;
            }
            let y = a
                .as_tensor()
                .apply_op2(b.as_tensor(), Bf16MatmulNt { kernel })?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let got = [
                values(&y),
                values(grads.get(a.as_tensor()).expect("da")),
                values(grads.get(b.as_tensor()).expect("db")),
            ];
            for (what, (got, ((r, rs), (s, ss)))) in ["y", "da", "db"]
                .iter()
                .zip(got.iter().zip(rounded.iter().zip(&smooth)))
            {
                assert_close(got, r, rs, 1e-5, &format!("{kernel:?} {what} vs rounded"));
                // Each operand within 2^-9 relative: each product within 2^-7.5.
                assert_close(
                    got,
                    s,
                    ss,
                    1.0 / 128.0,
                    &format!("{kernel:?} {what} vs f32"),
                );
            }
            // Finite differences of the exact sum(w * (a b^T)) at a few entries of a and b.
            let f = |a: &[f64], b: &[f64]| -> f64 {
                let (y, _) = product_nt(a, b, m, n, k);
                y.iter().zip(exact(&wv)).map(|(y, w)| y * w).sum()
            };
            let h = 1e-3;
            for (which, index) in [(0, 5), (0, m * k - 1), (1, 3), (1, n * k - 2)] {
                let (mut plus, mut minus) = ([exact(&av), exact(&bv)], [exact(&av), exact(&bv)]);
                plus[which][index] += h;
                minus[which][index] -= h;
                let numeric = (f(&plus[0], &plus[1]) - f(&minus[0], &minus[1])) / (2.0 * h);
                let (grad, scale) = (&got[1 + which], &smooth[1 + which].1);
                let tol = scale[index] / 128.0 + 1e-6;
                assert!(
                    (f64::from(grad[index]) - numeric).abs() <= tol,
                    "{kernel:?} operand {which}[{index}]: {} vs {numeric}",
                    grad[index]
                );
            }
        }
        Ok(())
    }

    /// A rank-3 left operand gives the same product and gradients as its `[rows, k]`
    /// flattening, in both precisions.
    #[test]
    fn leading_dimensions_are_rows() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 7), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev)?;
        for precision in [Precision::F32, Precision::Bf16] {
            let y = matmul_nt(a.as_tensor(), b.as_tensor(), precision)?;
            assert_eq!(y.dims(), [2, 5, 3]);
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let flat = matmul_nt(&a.as_tensor().reshape((10, 7))?, b.as_tensor(), precision)?;
            let flat_grads = (&flat * &w.reshape((10, 3))?)?.sum_all()?.backward()?;
            assert_eq!(values(&y), values(&flat), "{precision:?}");
            for (v, dims) in [(&a, &[2usize, 5, 7][..]), (&b, &[3, 7][..])] {
                let (g, f) = (
                    grads.get(v).expect("grad"),
                    flat_grads.get(v).expect("grad"),
                );
                assert_eq!(g.dims(), dims);
                assert_eq!(values(g), values(f), "{precision:?}");
            }
        }
        Ok(())
    }

    /// An operand that needs no gradient gets none (cached features), and a product of two
    /// untracked tensors records nothing; f32 precision and other dtypes take candle's product.
    #[test]
    fn untracked_operands_get_no_gradient_and_other_tensors_take_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (8, 5), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev)?)?;
        let y = matmul_nt(&x, w.as_tensor(), Precision::Bf16)?;
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        assert!(grads.get(w.as_tensor()).is_some());
        assert!(!matmul_nt(&x, &w.as_tensor().detach(), Precision::Bf16)?.track_op());
        let reference = x.matmul(&w.as_tensor().t()?)?;
        let f64_product = matmul_nt(
            &x.to_dtype(DType::F64)?,
            &w.as_tensor().to_dtype(DType::F64)?,
            Precision::Bf16,
        )?;
        assert_eq!(f64_product.dtype(), DType::F64);
        let diff = (f64_product.to_dtype(DType::F32)? - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let bf16_diff = (y - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(bf16_diff > 0.0 && bf16_diff < 0.1, "{bf16_diff}");
        Ok(())
    }
}
