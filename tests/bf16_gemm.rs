//! The bf16 matrix product (`multiclip::bf16_gemm`) against f64 references: the product of the
//! bf16-rounded inputs within f32 accumulation error, the exact product within bf16's rounding,
//! on odd and tiny sizes, strided and transposed operands, both kernels (the AVX512-BF16 one
//! where this CPU has it), the product into fresh memory, the candle glue, and bitwise-equal
//! results for any number of threads.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use multiclip::bf16_gemm::{Kernel, MatRef, PackedRhs, gemm_bf16, gemm_bf16_new, tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// f32's unit roundoff.
const U32: f64 = 1.0 / (1u64 << 24) as f64;
/// bf16's unit roundoff: 8 significant bits, so half an ulp of 1 is 2^-8.
const U_BF16: f64 = 1.0 / 256.0;

/// The kernels this CPU runs (the fallback always; AVX512-BF16 where available).
fn kernels() -> Vec<Kernel> {
    let all = [Kernel::Avx512Bf16, Kernel::F32Fallback];
    let available: Vec<Kernel> = all.into_iter().filter(|k| k.is_available()).collect();
    if available.len() < all.len() {
        eprintln!("this CPU has no AVX512-BF16: testing the f32 fallback only");
    }
    available
}

/// Values of varied sign and magnitude (a spread of exponents, so that rounding matters).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let x = rng.random::<f32>() * 2.0 - 1.0;
            x * 2f32.powi(rng.random_range(-4..4))
        })
        .collect()
}

fn round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// A `rows x cols` matrix given by an element function.
type Elem<'a> = &'a dyn Fn(usize, usize) -> f32;

/// For every element of `A B`: the f64 product of the bf16-rounded inputs, the exact f64 product
/// and the sum of the absolute values of the products (the scale of the rounding errors).
struct Reference {
    rounded: Vec<f64>,
    exact: Vec<f64>,
    abs: Vec<f64>,
}

fn reference(a: Elem, b: Elem, (m, k, n): (usize, usize, usize)) -> Reference {
    let mut r = Reference {
        rounded: vec![0.0; m * n],
        exact: vec![0.0; m * n],
        abs: vec![0.0; m * n],
    };
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let (x, y) = (a(i, kk), b(kk, j));
                r.rounded[i * n + j] += round(x) as f64 * round(y) as f64;
                r.exact[i * n + j] += x as f64 * y as f64;
                r.abs[i * n + j] += (x as f64 * y as f64).abs();
            }
        }
    }
    r
}

/// Checks `c` (row-major `m x n`, row stride `ldc`) against `r`, plus `c0` (the values of `C`
/// before an accumulating product, else zero): within f32 accumulation error of the product of
/// the rounded inputs (at most `k + 2` roundings of partial sums, each within `u` of a sum
/// bounded by the sum of absolute values), and within bf16's rounding of both inputs of the
/// exact product.
fn check(c: &[f32], ldc: usize, r: &Reference, c0: &[f32], (m, k, n): (usize, usize, usize)) {
    for i in 0..m {
        for j in 0..n {
            let (got, at) = (c[i * ldc + j] as f64, i * n + j);
            let scale = r.abs[at] + (c0[at] as f64).abs();
            let accumulation = (k + 2) as f64 * U32 * scale + f32::MIN_POSITIVE as f64;
            let want = r.rounded[at] + c0[at] as f64;
            assert!(
                (got - want).abs() <= accumulation,
                "({i}, {j}) of {m} x {k} x {n}: {got} vs {want} (rounded inputs), bound {accumulation:e}"
            );
            let input_rounding = (2.0 * U_BF16 + U_BF16 * U_BF16) * r.abs[at];
            let exact = r.exact[at] + c0[at] as f64;
            assert!(
                (got - exact).abs() <= accumulation + input_rounding,
                "({i}, {j}) of {m} x {k} x {n}: {got} vs {exact} (exact)"
            );
        }
    }
}

/// Sizes around the kernel's blocks (14 x 32 tiles, 256-column blocks of `A`, 112-row tasks),
/// odd inner dimensions and tiny matrices.
const SIZES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (1, 2, 1),
    (2, 3, 5),
    (1, 77, 33),
    (14, 32, 32),
    (15, 33, 31),
    (13, 255, 47),
    (28, 256, 64),
    (29, 257, 65),
    (3, 513, 2),
    (113, 70, 97),
    (230, 40, 530),
];

/// Row-major `A` (f32) times a torch-layout weight (`B = W^T`), for every size and kernel.
#[test]
fn row_major_times_linear_weight() {
    for kernel in kernels() {
        for (m, k, n) in SIZES {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let r = reference(&|i, kk| a[i * k + kk], &|kk, j| w[j * k + kk], (m, k, n));
            let packed = PackedRhs::from_linear_weight(&w, n, k, kernel).unwrap();
            assert_eq!((packed.k(), packed.n(), packed.kernel()), (k, n, kernel));
            let mut c = vec![f32::NAN; m * n];
            gemm_bf16(
                MatRef::row_major(&a, m, k).unwrap(),
                &packed,
                &mut c,
                n,
                false,
            )
            .unwrap();
            check(&c, n, &r, &vec![0.0; m * n], (m, k, n));
            // The same product into fresh memory that no one filled first.
            let fresh = gemm_bf16_new(MatRef::row_major(&a, m, k).unwrap(), &packed).unwrap();
            assert_eq!(
                fresh.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                c.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "gemm_bf16_new on {m} x {k} x {n}, {kernel:?}"
            );
        }
    }
}

/// Every way of giving the operands: `A` with padded rows, transposed (`g^T`), in bf16, with
/// both strides > 1; `B` row-major (`W` in `g W`, or activations in `g^T x`), transposed,
/// generally strided; `C` with padded rows, accumulated onto, its padding left alone.
#[test]
fn strided_and_transposed_operands() {
    let (m, k, n) = (37, 75, 70);
    for kernel in kernels() {
        // A as (data, row stride, column stride), every layout holding the same matrix.
        let base = values(m * k, 3);
        let padded: Vec<f32> = (0..m)
            .flat_map(|i| base[i * k..(i + 1) * k].iter().copied().chain([9.0; 5]))
            .collect();
        let transposed: Vec<f32> = (0..k)
            .flat_map(|kk| (0..m).map(move |i| (kk, i)))
            .map(|(kk, i)| base[i * k + kk])
            .collect();
        let mut spread = vec![-7.0f32; m * k * 6];
        for i in 0..m {
            for kk in 0..k {
                spread[i * k * 6 + kk * 6] = base[i * k + kk];
            }
        }
        let to_bf16 = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
        let (base_bf16, transposed_bf16) = (to_bf16(&base), to_bf16(&transposed));
        let lhs = [
            MatRef::new(&padded, m, k, k + 5, 1).unwrap(),
            MatRef::row_major(&transposed, k, m).unwrap().t(),
            MatRef::new(&spread, m, k, k * 6, 6).unwrap(),
            MatRef::row_major(&base_bf16, m, k).unwrap(),
            MatRef::row_major(&transposed_bf16, k, m).unwrap().t(),
        ];
        let b_base = values(k * n, 4);
        let b_t: Vec<f32> = (0..n)
            .flat_map(|j| (0..k).map(move |kk| (kk, j)))
            .map(|(kk, j)| b_base[kk * n + j])
            .collect();
        let b_strided: Vec<f32> = b_base.iter().flat_map(|&x| [x, 5.0]).collect();
        let rhs = [
            PackedRhs::for_kernel(MatRef::row_major(&b_base, k, n).unwrap(), kernel).unwrap(),
            PackedRhs::for_kernel(MatRef::row_major(&b_t, n, k).unwrap().t(), kernel).unwrap(),
            PackedRhs::for_kernel(MatRef::new(&b_strided, k, n, 2 * n, 2).unwrap(), kernel)
                .unwrap(),
        ];
        let r = reference(
            &|i, kk| base[i * k + kk],
            &|kk, j| b_base[kk * n + j],
            (m, k, n),
        );
        let ldc = n + 3;
        let c0 = values(m * n, 5);
        for (ai, a) in lhs.iter().enumerate() {
            for (bi, b) in rhs.iter().enumerate() {
                let mut c = vec![-1.0f32; (m - 1) * ldc + n];
                for i in 0..m {
                    c[i * ldc..i * ldc + n].copy_from_slice(&c0[i * n..(i + 1) * n]);
                }
                gemm_bf16(*a, b, &mut c, ldc, true).unwrap();
                check(&c, ldc, &r, &c0, (m, k, n));
                for i in 0..m - 1 {
                    assert!(
                        c[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == -1.0),
                        "{kernel:?}: lhs {ai} x rhs {bi} wrote into C's row padding"
                    );
                }
            }
        }
    }
}

/// Both kernels agree on the same operands (within both of their accumulation errors), and
/// `k = 0` gives zeros or leaves an accumulated `C` alone.
#[test]
fn kernels_agree_and_empty_products() {
    let (m, k, n) = (50, 300, 90);
    let a = values(m * k, 6);
    let w = values(n * k, 7);
    let a_ref = MatRef::row_major(&a, m, k).unwrap();
    let products: Vec<Vec<f32>> = kernels()
        .into_iter()
        .map(|kernel| {
            let packed = PackedRhs::from_linear_weight(&w, n, k, kernel).unwrap();
            let mut c = vec![0f32; m * n];
            gemm_bf16(a_ref, &packed, &mut c, n, false).unwrap();
            c
        })
        .collect();
    let r = reference(&|i, kk| a[i * k + kk], &|kk, j| w[j * k + kk], (m, k, n));
    for pair in products.windows(2) {
        for (at, (x, y)) in pair[0].iter().zip(&pair[1]).enumerate() {
            let bound = 2.0 * (k + 2) as f64 * U32 * r.abs[at];
            assert!(((x - y) as f64).abs() <= bound, "{at}: {x} vs {y}");
        }
    }
    for kernel in kernels() {
        let empty: Vec<f32> = Vec::new();
        let packed =
            PackedRhs::for_kernel(MatRef::row_major(&empty, 0, 4).unwrap(), kernel).unwrap();
        let lhs = MatRef::row_major(&empty, 3, 0).unwrap();
        let mut c = vec![2.0f32; 12];
        gemm_bf16(lhs, &packed, &mut c, 4, true).unwrap();
        assert!(c.iter().all(|&x| x == 2.0));
        gemm_bf16(lhs, &packed, &mut c, 4, false).unwrap();
        assert!(c.iter().all(|&x| x == 0.0));
    }
}

/// The result does not depend on the number of threads: bitwise equal on 1, 2 and 3 threads, for
/// products large enough to be split into many tasks, with `A` row-major and transposed (`g^T`
/// in a weight gradient), and equal to the reference.
#[test]
fn threads_give_bitwise_equal_results() {
    let (m, k, n) = (230, 300, 530);
    let a = values(m * k, 8);
    let a_t: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
    let w = values(n * k, 9);
    let r = reference(&|i, kk| a[i * k + kk], &|kk, j| w[j * k + kk], (m, k, n));
    let lhs = [
        MatRef::row_major(&a, m, k).unwrap(),
        MatRef::row_major(&a_t, k, m).unwrap().t(),
    ];
    for kernel in kernels() {
        let packed = PackedRhs::from_linear_weight(&w, n, k, kernel).unwrap();
        for (li, lhs) in lhs.iter().enumerate() {
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = vec![0f32; m * n];
                pool.install(|| gemm_bf16(*lhs, &packed, &mut c, n, false))
                    .unwrap();
                c
            };
            let one = run(1);
            check(&one, n, &r, &vec![0.0; m * n], (m, k, n));
            for threads in [2, 3] {
                let many = run(threads);
                assert!(
                    one.iter()
                        .zip(&many)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?}, lhs {li}: {threads} threads differ from one"
                );
            }
        }
    }
}

/// Shapes that do not fit are errors, never panics or out-of-bounds accesses.
#[test]
fn mismatched_shapes_are_errors() {
    let data = vec![1.0f32; 12];
    assert!(MatRef::new(&data, 3, 4, 4, 1).is_ok());
    assert!(MatRef::new(&data, 3, 5, 4, 1).is_err());
    assert!(MatRef::new(&data, 2, 2, usize::MAX, 1).is_err());
    assert!(PackedRhs::from_linear_weight(&data, 5, 2, Kernel::F32Fallback).is_err());
    for kernel in kernels() {
        let packed = PackedRhs::from_linear_weight(&data, 3, 4, kernel).unwrap();
        let a = MatRef::row_major(&data, 3, 4).unwrap();
        let mut c = vec![0f32; 9];
        assert!(gemm_bf16(a, &packed, &mut c, 3, false).is_ok());
        assert!(
            gemm_bf16(a.t(), &packed, &mut c, 3, false).is_err(),
            "4 x 3 by 4 x 3"
        );
        assert!(
            gemm_bf16(a, &packed, &mut c[..8], 3, false).is_err(),
            "C too short"
        );
        assert!(
            gemm_bf16(a, &packed, &mut c, 2, false).is_err(),
            "row stride < n"
        );
    }
}

/// The candle glue computes a linear layer's three training products: forward `x W^T + b`,
/// input gradient `g W` and weight gradient `g^T x`, on tensors, against candle's f32 products
/// of the bf16-rounded tensors.
#[test]
fn tensor_glue_covers_the_training_products() {
    let dev = Device::Cpu;
    let (rows, in_dim, out) = (24, 40, 18);
    let tensor =
        |len, seed, shape: &[usize]| Tensor::from_vec(values(len, seed), shape, &dev).unwrap();
    let x = tensor(rows * in_dim, 10, &[2, rows / 2, in_dim]);
    let w = tensor(out * in_dim, 11, &[out, in_dim]);
    let g = tensor(rows * out, 12, &[rows, out]);
    let bias = values(out, 13);
    let rounded = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (xr, wr, gr) = (
        rounded(&x.reshape((rows, in_dim)).unwrap()),
        rounded(&w),
        rounded(&g),
    );
    // |got - want| within both sides' f32 accumulation error, elementwise: 2 (k + 2) u |a| |b|.
    let close = |got: &Tensor, want: &Tensor, a: &Tensor, b: &Tensor, what: &str| {
        let k = a.dim(1).unwrap();
        let scale = a.abs().unwrap().matmul(&b.abs().unwrap()).unwrap();
        let bound = (scale * (2.0 * (k + 2) as f64 * U32)).unwrap();
        let excess = ((got - want).unwrap().abs().unwrap() - bound).unwrap();
        let worst: f32 = excess
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(worst <= 0.0, "{what}: off by {worst:e} beyond the bound");
    };
    for kernel in kernels() {
        let w_t = tensor::pack_linear_weight(&w, kernel).unwrap();
        let y = tensor::linear(&x, &w_t, Some(&bias)).unwrap();
        assert_eq!(y.dims(), &[2, rows / 2, out]);
        let bias_t = Tensor::new(bias.as_slice(), &dev).unwrap();
        let wt = wr.t().unwrap();
        let want = xr.matmul(&wt).unwrap().broadcast_add(&bias_t).unwrap();
        let y = y.reshape((rows, out)).unwrap();
        close(&y, &want, &xr, &wt, &format!("{kernel:?} forward"));

        let dx = tensor::matmul(&g, &tensor::pack(&w, kernel).unwrap()).unwrap();
        let want = gr.matmul(&wr).unwrap();
        close(&dx, &want, &gr, &wr, &format!("{kernel:?} input gradient"));

        let x2 = x.reshape((rows, in_dim)).unwrap();
        let dw = tensor::matmul(&g.t().unwrap(), &tensor::pack(&x2, kernel).unwrap()).unwrap();
        assert_eq!(dw.dims(), &[out, in_dim]);
        let gt = gr.t().unwrap();
        let want = gt.matmul(&xr).unwrap();
        close(&dw, &want, &gt, &xr, &format!("{kernel:?} weight gradient"));

        let y16 = tensor::linear(&x.to_dtype(DType::BF16).unwrap(), &w_t, None).unwrap();
        let want = xr.matmul(&wt).unwrap();
        let y16 = y16.reshape((rows, out)).unwrap();
        close(&y16, &want, &xr, &wt, &format!("{kernel:?} bf16 input"));
        assert!(
            tensor::linear(&x2.t().unwrap(), &w_t, None).is_err(),
            "wrong input size"
        );
    }
}
