//! The portable path of [`super::gemm_bf16`]: both operands rounded to bf16 and stored as f32,
//! multiplied by the `gemm` crate's f32 kernel. Rows of `A` are rounded a block at a time inside
//! the task that multiplies them; blocks have a fixed size, so the result does not depend on the
//! number of threads.

use rayon::prelude::*;

use super::MatRef;

/// Rows of `A` per task.
const ROWS: usize = 64;

/// `B` (`k x n`) rounded to bf16, row-major.
pub(super) fn pack_rhs(b: &MatRef) -> Vec<f32> {
    (0..b.rows)
        .flat_map(|i| (0..b.cols).map(move |j| b.rounded(i, j)))
        .collect()
}

/// `C (+)= A B` with `B` from [`pack_rhs`].
pub(super) fn gemm(
    a: &MatRef,
    packed: &[f32],
    n: usize,
    c: &mut [f32],
    c_row_stride: usize,
    accumulate: bool,
) {
    let (m, k) = (a.rows, a.cols);
    let c = &mut c[..(m - 1) * c_row_stride + n];
    c.par_chunks_mut(ROWS * c_row_stride)
        .enumerate()
        .for_each(|(bi, c_block)| {
            let i0 = bi * ROWS;
            let rows = ROWS.min(m - i0);
            let lhs: Vec<f32> = (i0..i0 + rows)
                .flat_map(|i| (0..k).map(move |j| a.rounded(i, j)))
                .collect();
            let dst = c_block.as_mut_ptr();
            // SAFETY: lhs is rows x k and packed k x n, both row-major and in bounds; dst addresses
            // rows x n elements with row stride c_row_stride, all inside `c_block` (its last row
            // needs only n elements, which `c` was cut to).
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    dst,
                    1,
                    c_row_stride as isize,
                    accumulate,
                    lhs.as_ptr(),
                    1,
                    k as isize,
                    packed.as_ptr(),
                    1,
                    n as isize,
                    if accumulate { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
}
