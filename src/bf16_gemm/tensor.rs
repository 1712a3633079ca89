//! candle glue for [`super::gemm_bf16`]: products of CPU tensors (f32 or bf16) by packed
//! operands, f32 results. These are what linear layers and heads call.

use anyhow::{Result, bail, ensure};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Storage, Tensor};

use super::{Kernel, MatRef, PackedRhs, gemm_bf16, gemm_bf16_new};

/// Runs `f` on a 2-D CPU tensor seen as a [`MatRef`] (its own strides: transposed views
/// included).
fn with_matrix<R>(t: &Tensor, f: impl FnOnce(MatRef) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!(
            "bf16 products run on the CPU; the tensor is on {:?}",
            t.device()
        )
    };
    f(view(cpu, layout)?)
}

/// A 2-D CPU tensor's storage (f32 or bf16) seen through its layout as a [`MatRef`]: what a
/// candle custom op's `cpu_fwd` receives.
pub fn view<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<MatRef<'a>> {
    let [rows, cols] = *layout.dims() else {
        bail!(
            "bf16 product of a tensor that is not 2-D ({:?})",
            layout.dims()
        )
    };
    let (start, stride) = (layout.start_offset(), layout.stride());
    match storage {
        CpuStorage::F32(d) => MatRef::new(&d[start..], rows, cols, stride[0], stride[1]),
        CpuStorage::BF16(d) => MatRef::new(&d[start..], rows, cols, stride[0], stride[1]),
        other => bail!(
            "bf16 products take f32 or bf16 tensors, not {:?}",
            other.dtype()
        ),
    }
}

/// Packs a 2-D tensor `b` `[k, n]` (any strides: pass `w.t()?` for `W^T`) as the right operand
/// of [`matmul`] and [`linear`].
pub fn pack(b: &Tensor, kernel: Kernel) -> Result<PackedRhs> {
    with_matrix(b, |view| PackedRhs::for_kernel(view, kernel))
}

/// `B = W^T` for a linear layer's weight `W` `[out, in]`: `linear(x, &packed, ..)` is `x W^T`.
pub fn pack_linear_weight(weight: &Tensor, kernel: Kernel) -> Result<PackedRhs> {
    pack(&weight.t()?, kernel)
}

/// `a b` for a 2-D tensor `a` `[m, k]` (any strides: `g.t()?` gives `g^T`), as an f32 `[m, n]`.
pub fn matmul(a: &Tensor, b: &PackedRhs) -> Result<Tensor> {
    let (m, _) = a.dims2()?;
    let out = with_matrix(a, |view| gemm_bf16_new(view, b))?;
    Ok(Tensor::from_vec(out, (m, b.n()), a.device())?)
}

/// `x W^T + bias` for `x` `[.., in]` (made contiguous if it is not) and `weight` from
/// [`pack_linear_weight`], as an f32 `[.., out]`.
pub fn linear(x: &Tensor, weight: &PackedRhs, bias: Option<&[f32]>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let Some(in_dim) = dims.pop() else {
        bail!("a linear layer's input needs at least one dimension")
    };
    ensure!(
        in_dim == weight.k(),
        "linear layer of input size {} applied to [.., {in_dim}]",
        weight.k()
    );
    let n = weight.n();
    if let Some(bias) = bias {
        ensure!(bias.len() == n, "bias of {} for {n} outputs", bias.len());
    }
    let rows = dims.iter().product::<usize>();
    let x2 = x.reshape((rows, in_dim))?.contiguous()?;
    let out = with_matrix(&x2, |view| match bias {
        Some(bias) => {
            let mut out = bias.repeat(rows);
            gemm_bf16(view, weight, &mut out, n, true)?;
            Ok(out)
        }
        None => gemm_bf16_new(view, weight),
    })?;
    dims.push(n);
    Ok(Tensor::from_vec(out, dims, x.device())?)
}
