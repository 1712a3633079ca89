//! The AVX512-BF16 kernel of [`super::gemm_bf16`]: `vdpbf16ps` multiplies 16 pairs of bf16 by
//! 16 pairs and adds each pair's two products to one f32 lane.
//!
//! Layouts (bf16 bits as `u16`):
//! - packed `B`: panels of `NR` = 32 columns (the last one zero-padded). For each pair of rows
//!   `(2p, 2p + 1)` of `B` (a zero row pads an odd `k`) a panel holds 32 words, one per column,
//!   each `[B(2p, j), B(2p + 1, j)]`: the operand layout of `vdpbf16ps`, read as two vectors.
//! - packed `A`: micro-panels of `MR` = 14 rows, split along `k` into blocks of `KC` = 256
//!   columns (`MR * KC` values each). Within a block, row-major `A` is stored as `MR` rows of
//!   `KC` values (each row converted with contiguous loads); `A` with contiguous columns (`g^T`)
//!   pair-major, `KC / 2` pairs of `MR` words `[A(i, 2p), A(i, 2p + 1)]` (two contiguous runs
//!   interleaved). Either way the 14 words the kernel broadcasts at one step lie at constant
//!   offsets from one pointer.
//! - micro-kernel: a 14 x 32 tile of `C` lives in 28 accumulator registers over the whole `k`;
//!   per pair of `k` it loads two vectors of `B`, broadcasts 14 words of `A` and issues 28
//!   `vdpbf16ps`, then adds the tile to `C` (or stores it) once.
//! - driver: rayon tasks over blocks of `MC` rows x `nc` columns of `C` (`nc` sized so the task's
//!   panels of `B`, about 1 MiB, stay in L2). A task converts one micro-panel of row-major `A`
//!   at a time into a per-thread buffer (it stays in L1) and multiplies it by each of its panels
//!   of `B`; pair-major `A` is packed whole once before the tasks start.
//!
//! On a Zen 4 core `vdpbf16ps` on 512 bits retires one per cycle (64 flops); this kernel runs at
//! about 90% of that in the products of the benchmark (docs/benchmarks.md).

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::{Data, MatRef, SharedC};

/// Rows of the micro-kernel's tile.
const MR: usize = 14;
/// Columns of the micro-kernel's tile (two vectors of 16 f32).
const NR: usize = 32;
/// Columns of `A` per block of a packed micro-panel (a multiple of 32).
const KC: usize = 256;
/// Rows of `C` per task.
const MC: usize = MR * 8;
/// Bytes of packed `B` per task: its panels stay in L2 while the micro-panels of `A` pass.
const B_BLOCK_BYTES: usize = 1 << 20;
/// Products with fewer multiply-adds run on the calling thread.
const PARALLEL_WORK: usize = 1 << 22;

thread_local! {
    /// The packed rows of `A` of the task running on this thread.
    static LHS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Lane `i` of the result takes lane `IDX[i]` of `[row 2p (16 lanes), row 2p + 1 (16 lanes)]`.
static INTERLEAVE: [u16; 32] = [
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28,
    13, 29, 14, 30, 15, 31,
];

/// The mask of the first `len` (at most 16) lanes.
fn lanes(len: usize) -> __mmask16 {
    if len >= 16 { !0 } else { (1 << len) - 1 }
}

/// The first `min(len, 32)` f32 at `src` as bf16 (round to nearest even), zeros after them.
///
/// # Safety
/// `src` must point to at least `min(len, 32)` readable f32 (the loads are masked to those).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert32(src: *const f32, len: usize) -> __m512i {
    // SAFETY: forwarded to the caller.
    unsafe {
        let lo = _mm512_maskz_loadu_ps(lanes(len), src);
        let hi = _mm512_maskz_loadu_ps(lanes(len.saturating_sub(16)), src.wrapping_add(16));
        std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
    }
}

/// bf16 words `[x[j], y[j]]` for the first `min(len, 16)` lanes `j`, zeros after them (and for
/// `y` when it is `None`).
///
/// # Safety
/// `x` and `y` must point to at least `min(len, 16)` readable f32 (the loads are masked).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave16(x: *const f32, y: Option<*const f32>, len: usize) -> __m512i {
    // SAFETY: forwarded to the caller; INTERLEAVE holds 32 lanes.
    unsafe {
        let lo = _mm512_maskz_loadu_ps(lanes(len), x);
        let hi = y.map_or(_mm512_setzero_ps(), |y| {
            _mm512_maskz_loadu_ps(lanes(len), y)
        });
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_permutexvar_epi16(_mm512_loadu_si512(INTERLEAVE.as_ptr().cast()), v)
    }
}

/// `B` (`k x n`, any strides) in the panel layout of the module doc.
pub(super) fn pack_rhs(b: &MatRef) -> Vec<u16> {
    let panel_len = b.rows.div_ceil(2) * 2 * NR;
    let mut out = vec![0u16; b.cols.div_ceil(NR) * panel_len];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(panel_len)
        .enumerate()
        .for_each(|(jp, panel)| {
            // SAFETY: a PackedRhs for this kernel is only made once the CPU has been checked.
            unsafe { pack_rhs_panel(b, jp * NR, panel) }
        });
    out
}

/// Packs columns `j0..j0 + NR` of `b` (zeros past its last column) into `panel`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs_panel(b: &MatRef, j0: usize, panel: &mut [u16]) {
    let (k, n) = (b.rows, b.cols);
    let (rs, cs) = (b.row_stride, b.col_stride);
    let cols = NR.min(n - j0);
    let pairs = k.div_ceil(2);
    match b.data {
        // Rows of B contiguous (activations, or W for g W): interleave two rows 16 columns at a time.
        Data::F32(d) if cs == 1 => {
            let d = d.as_ptr();
            for p in 0..pairs {
                for h in 0..cols.div_ceil(16) {
                    let c0 = j0 + 16 * h;
                    let row = |kk: usize| d.wrapping_add(kk * rs + c0);
                    // SAFETY: elements (2p, c0..n) and (2p + 1, c0..n) of b, when 2p + 1 < k, are
                    // in d (MatRef checked); the store writes 32 values inside the panel
                    // (2 * NR per pair).
                    unsafe {
                        let v = interleave16(
                            row(2 * p),
                            (2 * p + 1 < k).then(|| row(2 * p + 1)),
                            n - c0,
                        );
                        _mm512_storeu_si512(panel.as_mut_ptr().add(p * 2 * NR + 32 * h).cast(), v);
                    }
                }
            }
        }
        // Columns of B contiguous (a torch weight [out, in] as W^T): each column's consecutive
        // pairs are already adjacent; convert 32 values at a time and spread the 16 pairs.
        Data::F32(d) if rs == 1 => {
            let mut converted = [0u16; 32];
            for c in 0..cols {
                let col = d[(j0 + c) * cs..].as_ptr();
                for q in (0..k).step_by(32) {
                    let len = 32.min(k - q);
                    // SAFETY: elements q..k of this column of b are in d.
                    unsafe {
                        let v = convert32(col.wrapping_add(q), len);
                        _mm512_storeu_si512(converted.as_mut_ptr().cast(), v);
                    }
                    for t in 0..len.div_ceil(2) {
                        let at = ((q / 2 + t) * NR + c) * 2;
                        panel[at..at + 2].copy_from_slice(&converted[2 * t..2 * t + 2]);
                    }
                }
            }
        }
        _ => {
            for p in 0..pairs {
                for c in 0..cols {
                    let at = (p * NR + c) * 2;
                    panel[at] = b.bf16_bits(2 * p, j0 + c);
                    panel[at + 1] = if 2 * p + 1 < k {
                        b.bf16_bits(2 * p + 1, j0 + c)
                    } else {
                        0
                    };
                }
            }
        }
    }
}

/// Whether `a` is packed pair-major: when its columns are contiguous (a transposed matrix such
/// as `g^T`), so that a pair of its columns is two contiguous runs to interleave.
fn pair_major(a: &MatRef) -> bool {
    a.row_stride == 1 && a.col_stride != 1
}

/// Packs rows `i0..i0 + MR` of `a` (zeros past its last row) row-major into `dst`
/// (`MR * nkb * KC` values: `nkb` blocks of `MR` rows of `KC`). Slots past `k` in the last block
/// are not read by the kernel, except the one that completes a pair when `k` is odd, which is
/// set to zero.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_lhs_rows(a: &MatRef, i0: usize, nkb: usize, dst: &mut [u16]) {
    let (m, k) = (a.rows, a.cols);
    for r in 0..MR {
        let i = i0 + r;
        for kb in 0..nkb {
            let k0 = kb * KC;
            let len = KC.min(k - k0);
            let out = &mut dst[(kb * MR + r) * KC..][..KC];
            if i >= m {
                out[..len.next_multiple_of(2)].fill(0);
                continue;
            }
            match a.data {
                Data::F32(d) if a.col_stride == 1 => {
                    let src = d[i * a.row_stride + k0..].as_ptr();
                    for q in (0..len).step_by(32) {
                        let w = len - q;
                        // SAFETY: elements k0 + q.. < k of row i are in d; the store writes 32
                        // values at q < len <= KC, q a multiple of 32, inside `out`.
                        unsafe {
                            let v = convert32(src.wrapping_add(q), w);
                            _mm512_storeu_si512(out.as_mut_ptr().add(q).cast(), v);
                        }
                    }
                }
                Data::Bf16(d) if a.col_stride == 1 => {
                    let src = &d[i * a.row_stride + k0..][..len];
                    for (o, x) in out.iter_mut().zip(src) {
                        *o = x.to_bits();
                    }
                    if len % 2 == 1 {
                        out[len] = 0;
                    }
                }
                _ => {
                    for (kk, o) in out[..len].iter_mut().enumerate() {
                        *o = a.bf16_bits(i, k0 + kk);
                    }
                    if len % 2 == 1 {
                        out[len] = 0;
                    }
                }
            }
        }
    }
}

/// Packs rows `i0..i0 + MR` of a pair-major `a` ([`pair_major`]) into `dst`: blocks of `KC / 2`
/// pairs of columns, each pair `MR` words `[A(i, 2p), A(i, 2p + 1)]` (zeros past the last row,
/// and for the missing column of an odd `k`).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lhs_pairs(a: &MatRef, i0: usize, dst: &mut [u16]) {
    let (m, k, cs) = (a.rows, a.cols, a.col_stride);
    let rows = MR.min(m - i0);
    for p in 0..k.div_ceil(2) {
        let out = &mut dst[(p / (KC / 2)) * MR * KC + (p % (KC / 2)) * 2 * MR..][..2 * MR];
        match a.data {
            Data::F32(d) => {
                let column = |kk: usize| d.as_ptr().wrapping_add(i0 + kk * cs);
                // SAFETY: A(i0 + r, 2p) and A(i0 + r, 2p + 1) for r < rows (and 2p + 1 < k) lie
                // at d[i0 + r + column * cs] (row stride 1), inside d; the masked store writes
                // the 2 * MR values of `out`.
                unsafe {
                    let v = interleave16(
                        column(2 * p),
                        (2 * p + 1 < k).then(|| column(2 * p + 1)),
                        rows,
                    );
                    _mm512_mask_storeu_epi16(out.as_mut_ptr().cast(), (1 << (2 * MR)) - 1, v);
                }
            }
            Data::Bf16(_) => {
                for (r, word) in out.chunks_exact_mut(2).enumerate() {
                    let value = |kk: usize| {
                        if r < rows && kk < k {
                            a.bf16_bits(i0 + r, kk)
                        } else {
                            0
                        }
                    };
                    word[0] = value(2 * p);
                    word[1] = value(2 * p + 1);
                }
            }
        }
    }
}

/// `C[0..MR, 0..NR] (+)= A B` for one micro-panel of packed `A` and one panel of packed `B`
/// over `pairs` pairs of `k`; `C` row-major with row stride `ldc`.
///
/// # Safety
/// `a` must hold the micro-panel's `ceil(pairs / (KC / 2))` blocks, `b` `pairs * 2 * NR`
/// values and `c` a full `MR x NR` tile with row stride `ldc`; the CPU must have AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const PAIR_MAJOR: bool>(
    pairs: usize,
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: forwarded to the caller: every pointer below stays inside the regions it names.
    unsafe {
        if add {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(i * ldc));
                row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
            }
        }
        let (mut a, mut b) = (a, b);
        let mut left = pairs;
        while left > 0 {
            let steps = left.min(KC / 2);
            for p in 0..steps {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(32).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let at = if PAIR_MAJOR {
                        2 * (p * MR + i)
                    } else {
                        i * KC + 2 * p
                    };
                    let pair = a.add(at).cast::<i32>().read_unaligned();
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
                b = b.add(2 * NR);
            }
            a = a.add(MR * KC);
            left -= steps;
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc), row[0]);
            _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
        }
    }
}

/// Columns of `C` per task for an inner dimension `k`: a multiple of `NR` whose panels of
/// packed `B` fill about [`B_BLOCK_BYTES`].
fn task_columns(k: usize) -> usize {
    NR * (B_BLOCK_BYTES / (k.div_ceil(2) * 4 * NR)).clamp(2, 16)
}

/// Values of one packed micro-panel of `A` for an inner dimension `k`.
fn panel_len(k: usize) -> usize {
    MR * k.div_ceil(KC) * KC
}

/// `C (+)= A B` with `B` from [`pack_rhs`] (`n` columns); `C` (an `m x n` matrix with row
/// stride `ldc`, read only when `accumulate`) checked by the caller.
///
/// A row-major `A` is converted micro-panel by micro-panel inside each task, where the panel
/// stays in L1; a pair-major one ([`pair_major`]: its rows are strided) is packed whole first,
/// once, so that each of its strided reads happens once rather than once per task.
pub(super) fn gemm(
    a: &MatRef,
    packed: &[u16],
    n: usize,
    c: &SharedC,
    ldc: usize,
    accumulate: bool,
) {
    let (m, k) = (a.rows, a.cols);
    let nc = task_columns(k);
    let nblocks = n.div_ceil(nc);
    let tasks = m.div_ceil(MC) * nblocks;
    let parallel = m * n * k >= PARALLEL_WORK;
    let prepacked = pair_major(a).then(|| {
        let mut lhs = vec![0u16; m.div_ceil(MR) * panel_len(k)];
        let pack = |(ip, dst): (usize, &mut [u16])| {
            // SAFETY: the CPU was checked when `packed` was made.
            unsafe { pack_lhs_pairs(a, ip * MR, dst) }
        };
        if parallel {
            lhs.par_chunks_mut(panel_len(k)).enumerate().for_each(pack);
        } else {
            lhs.chunks_mut(panel_len(k)).enumerate().for_each(pack);
        }
        lhs
    });
    let task = |t: usize| {
        let at = ((t / nblocks) * MC, (t % nblocks) * nc);
        // SAFETY: the CPU was checked when `packed` was made; task t writes only its MC rows and
        // nc columns of C, a tile no other task writes.
        unsafe {
            match &prepacked {
                Some(lhs) => {
                    block::<true>(a, Some(lhs), packed, n, at, nc, c.get(), ldc, accumulate)
                }
                None => block::<false>(a, None, packed, n, at, nc, c.get(), ldc, accumulate),
            }
        }
    };
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// The tile of `C` at rows `i0..i0 + MC` and columns `j0..j0 + nc` (clipped to `m x n`): each
/// micro-panel of `A` (from `prepacked`, pair-major, or else packed row-major here) is multiplied
/// by every panel of `B` in the tile.
///
/// # Safety
/// `c` must address an `m x n` matrix with row stride `ldc`; the CPU must have AVX512-BF16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block<const PAIR_MAJOR: bool>(
    a: &MatRef,
    prepacked: Option<&[u16]>,
    packed: &[u16],
    n: usize,
    (i0, j0): (usize, usize),
    nc: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (m, k) = (a.rows, a.cols);
    let pairs = k.div_ceil(2);
    let panel_len = panel_len(k);
    let mut own = Vec::new();
    if prepacked.is_none() {
        own = LHS.take();
        own.resize(panel_len, 0);
    }
    for i in (i0..m.min(i0 + MC)).step_by(MR) {
        let rows = MR.min(m - i);
        let lhs = match prepacked {
            Some(all) => &all[i / MR * panel_len..][..panel_len],
            None => {
                // SAFETY: same CPU features.
                unsafe { pack_lhs_rows(a, i, k.div_ceil(KC), &mut own) };
                &own[..]
            }
        };
        for jp in j0 / NR..(j0 + nc).min(n).div_ceil(NR) {
            let cols = NR.min(n - jp * NR);
            let b = packed[jp * pairs * 2 * NR..][..pairs * 2 * NR].as_ptr();
            // SAFETY: (i, jp * NR) lies inside C; a full tile is written in place, a partial one
            // through a local tile of which only the rows x cols inside C are copied.
            unsafe {
                let at = c.add(i * ldc + jp * NR);
                if rows == MR && cols == NR {
                    kernel::<PAIR_MAJOR>(pairs, lhs.as_ptr(), b, at, ldc, accumulate);
                } else {
                    let mut tile = [0f32; MR * NR];
                    if accumulate {
                        for r in 0..rows {
                            let row = tile[r * NR..].as_mut_ptr();
                            std::ptr::copy_nonoverlapping(at.add(r * ldc), row, cols);
                        }
                    }
                    let t = tile.as_mut_ptr();
                    kernel::<PAIR_MAJOR>(pairs, lhs.as_ptr(), b, t, NR, accumulate);
                    for r in 0..rows {
                        let row = tile[r * NR..].as_ptr();
                        std::ptr::copy_nonoverlapping(row, at.add(r * ldc), cols);
                    }
                }
            }
        }
    }
    if prepacked.is_none() {
        LHS.set(own);
    }
}
