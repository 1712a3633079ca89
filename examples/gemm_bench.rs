//! Matrix-product benchmark (see docs/benchmarks.md): GFLOP/s of multiclip's bf16 product
//! (`bf16_gemm`, f32 or bf16 activations times a packed torch-layout weight), candle's f32
//! `matmul` and candle's bf16 `matmul`, on `m x k x n` products, with the threads of
//! `RAYON_NUM_THREADS`. `scripts/bench-gemm-peer.py` runs the same shapes in PyTorch.
//!
//! ```sh
//! cargo build --release --example gemm_bench
//! RAYON_NUM_THREADS=1 target/release/examples/gemm_bench --reps 10
//! RAYON_NUM_THREADS=2 target/release/examples/gemm_bench --reps 10 --shape 2048x2048x2048
//! ```
//!
//! Each figure is the best of `--reps` timed runs after one warm-up; "per CPU-s" divides the
//! work by the process CPU time of that run instead of the wall time, which stays meaningful on
//! a machine where other processes take turns on the cores.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use half::bf16;
use multiclip::bf16_gemm::{Kernel, MatRef, PackedRhs, gemm_bf16};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Timed runs per product (the best is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Products as MxKxN (repeatable); default: the three of issue 15.
    #[arg(long = "shape")]
    shapes: Vec<String>,
}

/// Seconds of CPU time used by this process so far (all threads).
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Best (wall, cpu) seconds of `reps` runs of `f` after one warm-up.
fn best(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let (t, c) = (Instant::now(), cpu_seconds());
        f()?;
        let wall = t.elapsed().as_secs_f64();
        if wall < best.0 {
            best = (wall, cpu_seconds() - c);
        }
    }
    Ok(best)
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let dims: Vec<usize> = s
        .split('x')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--shape {s}: expected MxKxN"))?;
    match dims[..] {
        [m, k, n] => Ok((m, k, n)),
        _ => anyhow::bail!("--shape {s}: expected MxKxN"),
    }
}

fn main() -> Result<()> {
    multiclip::runtime::single_threaded_elementwise_by_default();
    multiclip::runtime::keep_freed_memory();
    let args = Args::parse();
    let shapes = if args.shapes.is_empty() {
        vec![(8192, 768, 768), (1600, 768, 3072), (2048, 2048, 2048)]
    } else {
        args.shapes
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<_>>()?
    };
    let kernel = Kernel::detect();
    println!(
        "threads {}, kernel {kernel:?}, best of {} runs; GFLOP/s by wall time (per CPU-s)",
        rayon::current_num_threads(),
        args.reps
    );
    println!(
        "| m x k x n | multiclip bf16 (f32 in) | multiclip bf16 (bf16 in) | candle f32 | candle bf16 | pack W once |"
    );
    println!("|---|---|---|---|---|---|");
    let dev = Device::Cpu;
    for (m, k, n) in shapes {
        let flop = 2.0 * (m * n * k) as f64;
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let a_host: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let a_bf16: Vec<bf16> = a_host.iter().map(|&x| bf16::from_f32(x)).collect();
        let w_host: Vec<f32> = w.flatten_all()?.to_vec1()?;

        let t = Instant::now();
        let packed = PackedRhs::from_linear_weight(&w_host, n, k, kernel)?;
        let pack_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut c = vec![0f32; m * n];
        let ours_f32 = best(args.reps, || {
            gemm_bf16(MatRef::row_major(&a_host, m, k)?, &packed, &mut c, n, false)
        })?;
        let ours_bf16 = best(args.reps, || {
            gemm_bf16(MatRef::row_major(&a_bf16, m, k)?, &packed, &mut c, n, false)
        })?;

        // candle multiplies by a contiguous [k, n] right operand, as PyTorch's `a @ b` does.
        let b = w.t()?.contiguous()?;
        let candle_f32 = best(args.reps, || a.matmul(&b).map(drop).map_err(Into::into))?;
        let (a16, b16) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
        let candle_bf16 = best(args.reps, || a16.matmul(&b16).map(drop).map_err(Into::into))?;

        let cell = |(wall, cpu): (f64, f64)| {
            format!(
                "{:.0} ({:.0})",
                flop / wall / 1e9,
                flop / cpu.max(1e-9) / 1e9
            )
        };
        println!(
            "| {m} x {k} x {n} | {} | {} | {} | {} | {pack_ms:.1} ms |",
            cell(ours_f32),
            cell(ours_bf16),
            cell(candle_f32),
            cell(candle_bf16)
        );
    }
    Ok(())
}
