#!/usr/bin/env python3
"""The PyTorch peer of examples/gemm_bench.rs: GFLOP/s of `a @ b` ([m, k] by a contiguous [k, n])
in f32 and in bf16, on the same shapes, best of REPS runs after a warm-up, with
torch.set_num_threads(THREADS). Run it right after the Rust benchmark (shared machines are noisy);
"per CPU-s" divides the work by the process CPU time instead of the wall time, as the Rust side does.

Usage: "$(scripts/python-env.sh)" scripts/bench-gemm-peer.py [THREADS] [REPS] [MxKxN ...]
"""

import sys
import time

import torch

SHAPES = [(8192, 768, 768), (1600, 768, 3072), (2048, 2048, 2048)]


def best(reps, run):
    """Best (wall, process CPU) seconds of `reps` runs after a warm-up."""
    run()
    times = []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - t, time.process_time() - c))
    return min(times)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    shapes = [tuple(int(d) for d in s.split("x")) for s in sys.argv[3:]] or SHAPES
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"PyTorch {torch.__version__}, threads {threads}, best of {reps} runs; "
          "GFLOP/s by wall time (per CPU-s)")
    print("| m x k x n | PyTorch f32 | PyTorch bf16 |")
    print("|---|---|---|")
    for m, k, n in shapes:
        flop = 2.0 * m * n * k
        a = torch.randn(m, k)
        b = torch.randn(k, n)
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        with torch.inference_mode():
            f32 = best(reps, lambda: a @ b)
            bf16 = best(reps, lambda: a16 @ b16)
        cell = lambda t: f"{flop / t[0] / 1e9:.0f} ({flop / max(t[1], 1e-9) / 1e9:.0f})"
        print(f"| {m} x {k} x {n} | {cell(f32)} | {cell(bf16)} |")


if __name__ == "__main__":
    main()
