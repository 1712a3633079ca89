//! What checking a cache's content hashes costs at every open, for the candidate hashes.
//!
//! `cargo run --release --example cache_hash_speed -- FILE [MB] [REPEATS]` writes FILE (MB
//! MiB of pseudo-random bytes, default 1536) unless it has that size already, then hashes it as
//! shards of 64 MiB with sha256, blake3 and xxh3-128, on rayon pools of 1 and 2 threads, warm
//! (the file in the page cache) and cold (its pages dropped with `posix_fadvise(DONTNEED)`
//! before each run, which needs no root and leaves other processes' pages alone), plus a
//! read-only pass that touches every page. Prints wall time and CPU time (all threads) per run:
//! on a shared machine the CPU time is the figure that does not depend on the load.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Instant;

use memmap2::Mmap;
use multiclip::files::{ContentHash, HashAlgorithm};
use rayon::prelude::*;

const SHARD: usize = 64 << 20;

/// CPU time (user + system, all threads) of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn map(file: &File) -> Mmap {
    // SAFETY: a read-only map of a file this program wrote and nobody changes.
    unsafe { Mmap::map(file) }.expect("cannot map the file")
}

/// Share of the map's pages in memory.
fn resident(map: &Mmap) -> f64 {
    let pages = map.len().div_ceil(4096);
    let mut flags = vec![0u8; pages];
    // SAFETY: `flags` has one byte per page of the mapping.
    unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), flags.as_mut_ptr()) };
    flags.iter().filter(|f| **f & 1 == 1).count() as f64 / pages as f64
}

fn digest(algorithm: &str, bytes: &[u8]) -> String {
    match algorithm {
        "sha256" => ContentHash::of(HashAlgorithm::Sha256, bytes).hex,
        "xxh3-128" => ContentHash::of(HashAlgorithm::Xxh3_128, bytes).hex,
        "blake3" => blake3::hash(bytes).to_hex().to_string(),
        _ => bytes
            .iter()
            .step_by(4096)
            .map(|&b| u64::from(b))
            .sum::<u64>()
            .to_string(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: cache_hash_speed FILE [MB] [REPEATS]");
    let mb: usize = args.get(2).map_or(1536, |s| s.parse().expect("MB"));
    let repeats: usize = args.get(3).map_or(3, |s| s.parse().expect("REPEATS"));
    if std::fs::metadata(path).map_or(true, |m| m.len() != (mb << 20) as u64) {
        let mut file = File::create(path).expect("cannot create FILE");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mb {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            file.write_all(&block).expect("cannot write FILE");
        }
        file.sync_all().expect("cannot fsync FILE");
    }
    let file = File::open(path).expect("cannot open FILE");
    let mut mapped = map(&file);
    let gb = mapped.len() as f64 / 1e9;
    println!("{path}: {gb:.2} GB in shards of {} MiB", SHARD >> 20);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        for cold in [false, true] {
            for algorithm in ["read-only", "sha256", "blake3", "xxh3-128"] {
                let mut runs = Vec::new();
                for _ in 0..repeats {
                    if cold {
                        drop(mapped);
                        // SAFETY: advice on our own open file.
                        unsafe {
                            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                        };
                        mapped = map(&file);
                    } else {
                        digest("read-only", &mapped);
                    }
                    let before = resident(&mapped);
                    let (cpu, wall) = (cpu_seconds(), Instant::now());
                    let digests: Vec<String> = pool.install(|| {
                        mapped
                            .par_chunks(SHARD)
                            .map(|c| digest(algorithm, c))
                            .collect()
                    });
                    std::hint::black_box(digests);
                    runs.push(format!(
                        "{:.2} s wall {:.2} s cpu ({:.0}% resident)",
                        wall.elapsed().as_secs_f64(),
                        cpu_seconds() - cpu,
                        100.0 * before
                    ));
                }
                println!(
                    "{threads} thread(s) {:<4} {algorithm:<9} {}",
                    if cold { "cold" } else { "warm" },
                    runs.join(" | ")
                );
            }
        }
    }
}
