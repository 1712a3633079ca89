//! Running independent jobs side by side: `jobs` worker threads take tasks `0..n` from a shared
//! counter in order, each result in its task's place. The members of a k-fold ensemble (each in
//! its own rayon pool) and the child processes of a sweep run this way.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `run(0)`, ..., `run(n - 1)` on at most `jobs` threads (on the calling thread when `jobs` is
/// 1); the results in task order.
pub fn run_indexed<T: Send>(jobs: usize, n: usize, run: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let jobs = jobs.clamp(1, n.max(1));
    if jobs == 1 {
        return (0..n).map(run).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let task = next.fetch_add(1, Ordering::Relaxed);
                    if task >= n {
                        break;
                    }
                    let result = run(task);
                    *results[task].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every task ran: the workers only stop when the counter passes n")
        })
        .collect()
}

/// Threads for each of `jobs` jobs sharing the process's rayon threads (at least 1).
pub fn threads_per_job(jobs: usize) -> usize {
    (rayon::current_num_threads() / jobs.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_results_keep_their_order() {
        for jobs in [1, 3, 10] {
            let calls = AtomicUsize::new(0);
            let out = run_indexed(jobs, 7, |i| {
                calls.fetch_add(1, Ordering::Relaxed);
                i * i
            });
            assert_eq!(out, vec![0, 1, 4, 9, 16, 25, 36]);
            assert_eq!(calls.load(Ordering::Relaxed), 7);
        }
        assert!(run_indexed(4, 0, |i| i).is_empty());
    }
}
