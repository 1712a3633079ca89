//! What a GPU runs, proven on the CPU: a backbone loaded with [`Kernels::Generic`] (candle's
//! device-generic ops, the only ones CUDA has) gives the outputs of the fused CPU kernels, and its
//! reduced-precision forward passes (bf16 products of f32 activations, as `--precision bf16` runs
//! on the CPU; bf16 and f16 dtypes, as on CUDA) stay close to f32. Shared by tests/backbones.rs and
//! tests/clip_blip.rs (included with `#[path]`).

use candle_core::{D, DType, Device, Tensor};
use multiclip::backbone::{self, Compute, OutputKind, Sample};
use multiclip::bf16_gemm::Kernel;
use multiclip::tensor_ops::{Kernels, Precision};

/// Largest difference allowed between the generic and the fused path (f32).
pub const GENERIC_TOLERANCE: f32 = 1e-5;

/// Lowest cosine allowed between a bf16 or f16 output row and its f32 value.
pub const PRECISION_COSINE: f32 = 0.999;

/// The outputs of `spec` loaded on the CPU for `precision` with `kernels`, on `samples`.
fn outputs(spec: &str, precision: Precision, kernels: Kernels, samples: &[Sample]) -> Vec<Tensor> {
    let compute = Compute {
        kernels,
        ..Compute::new(&Device::Cpu, precision)
    };
    let model = backbone::load(spec, compute).unwrap();
    let outputs = model.forward(model.prepare(samples).unwrap()).unwrap();
    for (spec, output) in model.outputs().iter().zip(&outputs) {
        assert_eq!(output.dtype(), DType::F32, "{} is not f32", spec.name);
    }
    outputs
}

/// The largest absolute difference of two tensors of one shape (any dtypes), as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The lowest cosine between matching rows (vectors along the last dimension) of `a` and `b`; a
/// row that is zero in both counts as equal.
fn lowest_row_cosine(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let dot = (a * b).unwrap().sum(D::Minus1).unwrap();
    let norm = |t: &Tensor| t.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
    let (na, nb) = (norm(a), norm(b));
    let dot: Vec<f32> = dot.flatten_all().unwrap().to_vec1().unwrap();
    let na: Vec<f32> = na.flatten_all().unwrap().to_vec1().unwrap();
    let nb: Vec<f32> = nb.flatten_all().unwrap().to_vec1().unwrap();
    dot.iter()
        .zip(na.iter().zip(&nb))
        .map(|(d, (x, y))| {
            if *x == 0.0 && *y == 0.0 {
                1.0
            } else {
                d / (x * y)
            }
        })
        .fold(f32::INFINITY, f32::min)
}

/// Every output of `spec` on the generic path equals the fused path's (f32, CPU), within
/// [`GENERIC_TOLERANCE`].
pub fn assert_generic_equals_fused(spec: &str, samples: &[Sample]) {
    let model = backbone::load(spec, &Device::Cpu).unwrap();
    let fused = outputs(spec, Precision::F32, Kernels::Fused, samples);
    let generic = outputs(spec, Precision::F32, Kernels::Generic, samples);
    for ((out, fused), generic) in model.outputs().iter().zip(&fused).zip(&generic) {
        let diff = max_abs_diff(fused, generic);
        println!(
            "{spec} {}: generic vs fused max abs diff {diff:.2e}",
            out.name
        );
        assert!(
            diff <= GENERIC_TOLERANCE,
            "{spec} {}: generic path differs from the fused one by {diff}",
            out.name
        );
    }
}

/// The reduced-precision paths a backbone runs: bf16 products of f32 activations on the CPU
/// (`--precision bf16` there: the AVX512-BF16 kernel where this CPU has it, and the f32 fallback
/// that runs everywhere), and bf16 and f16 in candle's dtypes (what CUDA runs).
fn reduced_paths() -> Vec<(Precision, Kernels)> {
    let mut paths = vec![
        (Precision::Bf16, Kernels::FusedBf16(Kernel::F32Fallback)),
        (Precision::Bf16, Kernels::Generic),
        (Precision::F16, Kernels::Generic),
    ];
    if Kernel::Avx512Bf16.is_available() {
        paths.insert(0, (Precision::Bf16, Kernels::FusedBf16(Kernel::Avx512Bf16)));
    }
    let cpu_bf16 = Compute::new(&Device::Cpu, Precision::Bf16).kernels;
    assert_eq!(cpu_bf16, Kernels::FusedBf16(Kernel::detect()));
    assert!(paths.contains(&(Precision::Bf16, cpu_bf16)));
    paths
}

/// Every output row of `spec` on every reduced-precision path ([`reduced_paths`]) has a cosine of
/// at least [`PRECISION_COSINE`] with its f32 value (masks are equal); the two bf16 product
/// kernels agree within bf16 rounding.
pub fn assert_reduced_precisions_close(spec: &str, samples: &[Sample]) {
    let model = backbone::load(spec, &Device::Cpu).unwrap();
    let reference = outputs(spec, Precision::F32, Kernels::Fused, samples);
    let mut products = Vec::new();
    for (precision, kernels) in reduced_paths() {
        let got = outputs(spec, precision, kernels, samples);
        for ((out, want), got) in model.outputs().iter().zip(&reference).zip(&got) {
            if out.kind == OutputKind::Mask {
                assert_eq!(max_abs_diff(want, got), 0.0, "{spec} {}", out.name);
                continue;
            }
            let cosine = lowest_row_cosine(want, got);
            println!(
                "{spec} {} {} {kernels:?}: lowest row cosine to f32 {cosine:.6}",
                out.name,
                precision.name()
            );
            assert!(
                cosine >= PRECISION_COSINE,
                "{spec} {} in {} with {kernels:?}: cosine {cosine} to f32",
                out.name,
                precision.name()
            );
        }
        if let Kernels::FusedBf16(kernel) = kernels {
            products.push((kernel, got));
        }
    }
    // The two kernels round the same operands and differ only in the order of their f32 sums:
    // every output stays within one bf16 rounding (2^-8 relative) of the largest value.
    if let [(_, a), (_, b)] = &products[..] {
        for ((out, a), b) in model.outputs().iter().zip(a).zip(b) {
            let diff = max_abs_diff(a, b);
            let scale = max_abs_diff(a, &a.zeros_like().unwrap());
            println!(
                "{spec} {}: AVX512-BF16 vs f32 fallback max abs diff {diff:.2e} (max |x| {scale:.2e})",
                out.name
            );
            assert!(
                diff <= scale / 256.0,
                "{spec} {}: the bf16 kernels differ by {diff} on values up to {scale}",
                out.name
            );
        }
    }
}
