//! Process-wide runtime settings, made once at the start of a program: how the allocator keeps
//! freed memory, and how many threads candle's element-wise operations use.

/// Keeps freed memory in the process heap instead of returning it to the OS (glibc): without
/// it every large activation (tens of MB at batch 8) is a fresh `mmap` whose pages are faulted
/// in and zeroed again, ~10-20% of a BLIP forward. Process-wide; done once.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tunables; valid parameters.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// Sets `CANDLE_NUM_THREADS=1` unless the user chose a value. Call it first thing in the program,
/// before any other thread exists and before candle's first operation.
///
/// candle runs elementwise operations on its own pool whose caller spins (without yielding) until
/// the pool's workers finish. On a loaded machine (a shared 2-core CI box, or extraction running
/// beside training) a descheduled worker makes every elementwise op wait a whole time slice:
/// training measured 10x slower (26.8 s vs 2.1 s per MLP epoch at load 13 on 2 cores). Even on a
/// quiet machine the spinning pool competes with rayon's threads: DINOv2-S extraction at batch 1
/// ran at 10.1 images/s with the pool and 11.9 without. The hot elementwise work of the backbones
/// and heads has its own rayon kernels, and matrix products keep `RAYON_NUM_THREADS` threads (gemm
/// uses rayon, which sleeps instead of spinning).
pub fn single_threaded_elementwise_by_default() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at the start of a command, while the process has a single thread, so no
        // other thread can read the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
