//! The portable path of [`super::gemm_bf16`]: both operands rounded to bf16 and stored as f32,
//! multiplied by the `gemm` crate's f32 kernel. Rows of `A` are rounded a block at a time inside
//! the task that multiplies them; blocks have a fixed size, so the result does not depend on the
//! number of threads.

use std::ops::Range;

use rayon::prelude::*;

use super::{MatRef, SharedC};

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

/// `C (+)= A B` with `B` from [`pack_rhs`] (`n` columns); `C` (an `m x n` matrix with row
/// stride `c_row_stride`, read only when `accumulate`) checked by the caller.
pub(super) fn gemm(
    a: &MatRef,
    b: &Rounded,
    n: usize,
    c: &SharedC,
    c_row_stride: usize,
    accumulate: bool,
) {
    let m = a.rows;
    (0..m.div_ceil(ROWS)).into_par_iter().for_each(|block| {
        let i0 = block * ROWS;
        let rows = ROWS.min(m - i0);
        let lhs = rounded(a, i0..i0 + rows);
        // SAFETY: lhs (rows x k) and b (k x n) address their elements through their own
        // strides; the destination, rows i0.. of C (rows x n, row stride c_row_stride), lies
        // inside C and no other task writes it; the gemm crate reads it only when
        // `accumulate` (read_dst).
        unsafe {
            gemm::gemm(
                rows,
                n,
                a.cols,
                c.get().add(i0 * c_row_stride),
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
