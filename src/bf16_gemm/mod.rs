//! bf16 x bf16 -> f32 matrix products on the CPU: `C = A B` or `C += A B`, both operands rounded
//! to bfloat16 (round to nearest even) and every sum accumulated in f32.
//!
//! The right operand `B` (`k x n`, usually a weight) is packed once into a [`PackedRhs`]; the left
//! operand `A` (`m x k`, usually activations, f32 or bf16) is read through a strided [`MatRef`]
//! and converted to bf16 while it is packed, block by block, inside the product: no extra pass
//! over the activations. `C` is f32, row-major with a row stride.
//!
//! Two kernels, chosen at run time ([`Kernel::detect`]):
//! - [`Kernel::Avx512Bf16`] (x86-64 with AVX512-BF16, e.g. AMD Zen 4, Intel Sapphire Rapids): a
//!   register-blocked micro-kernel on `vdpbf16ps` (the layouts are described in `avx512.rs`).
//! - [`Kernel::F32Fallback`] everywhere else: the same rounding of both operands to bf16, then
//!   the `gemm` crate's f32 product, so results agree across machines up to the order of the f32
//!   sums. `MULTICLIP_BF16_GEMM=f32` forces it.
//!
//! Transposes come from strides (a [`MatRef`] may have any row and column strides, so `A^T` is
//! the same data with the strides swapped, [`MatRef::t`]), and either operand can be packed
//! from any layout. For a linear layer `y = x W^T + b` with a torch weight `W` `[out, in]`:
//! - forward `y = x W^T`: `A = x` (row-major), `B = W^T` ([`PackedRhs::from_linear_weight`]);
//! - input gradient `dx = g W`: `A = g`, `B = W` (`MatRef::row_major(w, out, in)`, packed);
//! - weight gradient `dW = g^T x`: `A = g^T` (`MatRef::row_major(g, rows, out).t()`), `B = x`
//!   packed at the product ([`PackedRhs::new`] on `MatRef::row_major(x, rows, in)`).
//!
//! f32 operands that are row-major or transposed (either stride 1) have vectorised packing on
//! the AVX512-BF16 kernel; other strides take a scalar path (correct, slower). Every element of `C` is computed by one task, summing over `k`
//! in the same order whatever the number of threads: results are bitwise identical for any
//! `RAYON_NUM_THREADS`. Denormal inputs may be read as zero (`vdpbf16ps` does so); nothing else
//! differs between the kernels but the order of the f32 sums.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod fallback;
pub mod tensor;

use std::sync::OnceLock;

use anyhow::{Result, bail, ensure};
use half::bf16;

/// The bits of `x` rounded to the nearest bf16 (ties to even; NaN stays NaN).
fn bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// Element types a [`MatRef`] may hold: `f32` (rounded to bf16 when packed) or `half::bf16`.
pub trait Element: Copy + Send + Sync + 'static {
    #[doc(hidden)]
    fn slice(data: &[Self]) -> Data<'_>;
}

impl Element for f32 {
    fn slice(data: &[Self]) -> Data<'_> {
        Data::F32(data)
    }
}

impl Element for bf16 {
    fn slice(data: &[Self]) -> Data<'_> {
        Data::Bf16(data)
    }
}

/// The elements behind a [`MatRef`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// A read-only `rows x cols` matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: Data<'a>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A strided view; an error when some element would lie outside `data`.
    pub fn new<T: Element>(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(row_stride)
                .zip((cols - 1).checked_mul(col_stride))
                .and_then(|(r, c)| r.checked_add(c));
            ensure!(
                last.is_some_and(|last| last < data.len()),
                "a {rows} x {cols} matrix with strides ({row_stride}, {col_stride}) does not fit in {} elements",
                data.len()
            );
        }
        Ok(Self {
            data: T::slice(data),
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A contiguous row-major `rows x cols` matrix (`data.len()` must be at least `rows * cols`).
    pub fn row_major<T: Element>(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (no copy: the strides swap).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)` as bf16 bits (in bounds by construction when `i < rows`, `j < cols`).
    fn bf16_bits(&self, i: usize, j: usize) -> u16 {
        let at = i * self.row_stride + j * self.col_stride;
        match self.data {
            Data::F32(d) => bf16_bits(d[at]),
            Data::Bf16(d) => d[at].to_bits(),
        }
    }

    /// Element `(i, j)` rounded to bf16, as f32.
    fn rounded(&self, i: usize, j: usize) -> f32 {
        f32::from_bits((self.bf16_bits(i, j) as u32) << 16)
    }
}

/// Which product runs: chosen once per process by [`Kernel::detect`], or passed explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` micro-kernel (x86-64 with AVX512F and AVX512-BF16).
    Avx512Bf16,
    /// bf16-rounded operands multiplied by the f32 `gemm` crate: runs everywhere.
    F32Fallback,
}

impl Kernel {
    /// The fastest kernel this CPU runs, unless `MULTICLIP_BF16_GEMM=f32` asks for the fallback.
    /// Detected once per process.
    pub fn detect() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            let forced = std::env::var("MULTICLIP_BF16_GEMM").is_ok_and(|v| v == "f32");
            if !forced && Kernel::Avx512Bf16.is_available() {
                Kernel::Avx512Bf16
            } else {
                Kernel::F32Fallback
            }
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::F32Fallback => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Bf16 => false,
        }
    }
}

/// The right operand `B` (`k x n`) of [`gemm_bf16`], rounded to bf16 and laid out for one
/// kernel. Make it once per weight (at load time) and reuse it for every product.
#[derive(Clone, Debug)]
pub struct PackedRhs {
    k: usize,
    n: usize,
    packed: Packed,
}

#[derive(Clone, Debug)]
enum Packed {
    /// bf16 bits in the panel layout of `avx512.rs`.
    #[cfg(target_arch = "x86_64")]
    Avx512(Vec<u16>),
    /// bf16-rounded values as f32.
    F32(fallback::Rounded),
}

impl PackedRhs {
    /// Packs `b` (`k x n`, any strides) for [`Kernel::detect`]'s kernel.
    pub fn new(b: MatRef) -> Self {
        Self::for_kernel(b, Kernel::detect()).expect("the detected kernel is available")
    }

    /// Packs `b` for `kernel`; an error when this CPU cannot run it.
    pub fn for_kernel(b: MatRef, kernel: Kernel) -> Result<Self> {
        ensure!(
            kernel.is_available(),
            "{kernel:?} is not available on this CPU"
        );
        let packed = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => Packed::Avx512(avx512::pack_rhs(&b)),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Bf16 => unreachable!("not available off x86-64"),
            Kernel::F32Fallback => Packed::F32(fallback::pack_rhs(&b)),
        };
        Ok(Self {
            k: b.rows,
            n: b.cols,
            packed,
        })
    }

    /// `B = W^T` for a linear layer's weight `W` `[out, in]`, row-major (torch's layout), so
    /// that [`gemm_bf16`] computes `x W^T`.
    pub fn from_linear_weight<T: Element>(
        weight: &[T],
        out_dim: usize,
        in_dim: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        ensure!(
            weight.len() == out_dim * in_dim,
            "a [{out_dim}, {in_dim}] weight has {} elements",
            weight.len()
        );
        Self::for_kernel(MatRef::row_major(weight, out_dim, in_dim)?.t(), kernel)
    }

    /// Rows of `B` (the inner dimension of the product).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of `B` (the columns of the result).
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn kernel(&self) -> Kernel {
        match self.packed {
            #[cfg(target_arch = "x86_64")]
            Packed::Avx512(_) => Kernel::Avx512Bf16,
            Packed::F32(_) => Kernel::F32Fallback,
        }
    }
}

/// `C = A B` (or `C += A B` when `accumulate`) for `A` `m x k` (any strides, f32 or bf16) and
/// `B` packed (`k x n`), `C` row-major `m x n` with row stride `c_row_stride`, on the current
/// rayon pool. Both operands are rounded to bf16 and the sums are f32.
pub fn gemm_bf16(
    a: MatRef,
    b: &PackedRhs,
    c: &mut [f32],
    c_row_stride: usize,
    accumulate: bool,
) -> Result<()> {
    let (m, k, n) = product_shape(&a, b)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    ensure!(
        c_row_stride >= n && (m - 1) * c_row_stride + n <= c.len(),
        "a {m} x {n} result with row stride {c_row_stride} does not fit in {} elements",
        c.len()
    );
    if k == 0 {
        if !accumulate {
            c.chunks_mut(c_row_stride)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return Ok(());
    }
    // SAFETY: `c` holds the m x n result with its row stride (checked above).
    unsafe { run(&a, b, c.as_mut_ptr(), c_row_stride, accumulate) };
    Ok(())
}

/// `C = A B` as a new row-major `m x n` vector: [`gemm_bf16`] into memory that is written once,
/// by the product, rather than zero-filled first.
pub fn gemm_bf16_new(a: MatRef, b: &PackedRhs) -> Result<Vec<f32>> {
    let (m, k, n) = product_shape(&a, b)?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds the m x n result (row stride n); without `accumulate` both
    // kernels write every element of C and read none, so all m * n are initialised before
    // `set_len`.
    unsafe {
        run(&a, b, c.as_mut_ptr(), n, false);
        c.set_len(m * n);
    }
    Ok(c)
}

/// `(m, k, n)` of `A B`; an error when the inner dimensions differ.
fn product_shape(a: &MatRef, b: &PackedRhs) -> Result<(usize, usize, usize)> {
    let (m, k, n) = (a.rows, a.cols, b.n);
    if k != b.k {
        bail!("cannot multiply {m} x {k} by {} x {n}", b.k);
    }
    Ok((m, k, n))
}

/// The kernel of `b` on `C` at `c`.
///
/// # Safety
/// `c` must address an `m x n` matrix with row stride `ldc` (`m, n, k > 0`, `A` `m x k`, `B`
/// `k x n`); with `accumulate` its elements must be initialised.
unsafe fn run(a: &MatRef, b: &PackedRhs, c: *mut f32, ldc: usize, accumulate: bool) {
    let c = SharedC(c);
    match &b.packed {
        #[cfg(target_arch = "x86_64")]
        Packed::Avx512(packed) => avx512::gemm(a, packed, b.n, &c, ldc, accumulate),
        Packed::F32(packed) => fallback::gemm(a, packed, b.n, &c, ldc, accumulate),
    }
}

/// `C`'s base pointer, shared by the tasks of a product, which write disjoint tiles.
struct SharedC(*mut f32);

// SAFETY: the tasks of a product write disjoint tiles of C through it.
unsafe impl Sync for SharedC {}

impl SharedC {
    fn get(&self) -> *mut f32 {
        self.0
    }
}
