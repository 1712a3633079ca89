//! The portable path of [`super::gemm_bf16`]: both operands rounded to bf16 and stored as f32,
//! multiplied by the `gemm` crate's f32 kernel. Rows of `A` are rounded a block at a time inside
//! the task that multiplies them; blocks have a fixed size, so the result does not depend on the
//! number of threads.

use std::ops::Range;

use rayon::prelude::*;

use super::MatRef;

/// Rows of `A` per task.
const ROWS: usize = 256;

/// A bf16-rounded copy of some rows of a matrix, as f32 with its strides.
#[derive(Clone, Debug)]
pub(super) struct Rounded {
    data: Vec<f32>,
    row_stride: usize,
    col_stride: usize,
}

/// Rows `rows` of `m` rounded to bf16, in the storage order of `m` (column-major when its
/// columns are contiguous, else row-major), so that the copy reads `m` sequentially.
fn rounded(m: &MatRef, rows: Range<usize>) -> Rounded {
    let (count, cols) = (rows.len(), m.cols);
    if m.row_stride == 1 && m.col_stride != 1 {
        Rounded {
            data: (0..cols)
                .flat_map(|j| rows.clone().map(move |i| m.rounded(i, j)))
                .collect(),
            row_stride: 1,
            col_stride: count,
        }
    } else {
        Rounded {
            data: rows
                .flat_map(|i| (0..cols).map(move |j| m.rounded(i, j)))
                .collect(),
            row_stride: cols,
            col_stride: 1,
        }
    }
}

/// `B` (`k x n`) rounded to bf16.
pub(super) fn pack_rhs(b: &MatRef) -> Rounded {
    rounded(b, 0..b.rows)
}

/// `C (+)= A B` with `B` from [`pack_rhs`] (`n` columns); `C` checked by the caller.
pub(super) fn gemm(
    a: &MatRef,
    b: &Rounded,
    n: usize,
    c: &mut [f32],
    c_row_stride: usize,
    accumulate: bool,
) {
    let (m, k) = (a.rows, a.cols);
    let c = &mut c[..(m - 1) * c_row_stride + n];
    c.par_chunks_mut(ROWS * c_row_stride)
        .enumerate()
        .for_each(|(block, c_block)| {
            let i0 = block * ROWS;
            let rows = ROWS.min(m - i0);
            let lhs = rounded(a, i0..i0 + rows);
            // SAFETY: lhs (rows x k) and b (k x n) address their elements through their own
            // strides; the destination is rows x n with row stride c_row_stride, inside `c_block`
            // (whose last row needs only n elements, which `c` was cut to).
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    c_block.as_mut_ptr(),
                    1,
                    c_row_stride as isize,
                    accumulate,
                    lhs.data.as_ptr(),
                    lhs.col_stride as isize,
                    lhs.row_stride as isize,
                    b.data.as_ptr(),
                    b.col_stride as isize,
                    b.row_stride as isize,
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
