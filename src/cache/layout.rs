//! Where things live in a cache directory and which rows go where: file names (built and parsed
//! only here), the fixed partition of the selected dataset rows into shards, and the
//! deterministic assignment of shards to workers (shard `i` belongs to worker `i % count`).

use anyhow::{Result, bail};
use std::ops::Range;

/// The cache index, present once the cache is complete.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Folder of per-worker manifest parts (multi-worker runs, until `cache merge`).
pub const PARTS_DIR: &str = "parts";
/// The cache-wide writer lock (see [`super::lock`]); removed by its last exclusive holder.
pub const LOCK_FILE: &str = "writer.lock";

const SHARD_PREFIX: &str = "shard-";
const SHARD_SUFFIX: &str = ".safetensors";
const PART_PREFIX: &str = "worker-";
const PART_SUFFIX: &str = ".json";
const WORKER_LOCK_SUFFIX: &str = ".lock";

/// `shard-00042.safetensors`.
pub fn shard_file_name(index: usize) -> String {
    format!("{SHARD_PREFIX}{index:05}{SHARD_SUFFIX}")
}

/// The index of a shard file name (`shard-00042.safetensors` -> 42), None for any other name.
pub fn parse_shard_file_name(name: &str) -> Option<usize> {
    name.strip_prefix(SHARD_PREFIX)?
        .strip_suffix(SHARD_SUFFIX)?
        .parse()
        .ok()
}

/// `worker-1-of-3.json`.
pub fn part_file_name(slot: WorkerSlot) -> String {
    worker_file_name(slot, PART_SUFFIX)
}

/// `worker-1-of-3.lock`: the lock of one worker's slot, beside [`LOCK_FILE`].
pub fn worker_lock_file_name(slot: WorkerSlot) -> String {
    worker_file_name(slot, WORKER_LOCK_SUFFIX)
}

fn worker_file_name(slot: WorkerSlot, suffix: &str) -> String {
    format!("{PART_PREFIX}{}-of-{}{suffix}", slot.index, slot.count)
}

/// Whether `name` is meant as a part file (`worker-*.json`), well-formed or not.
pub fn is_part_file_name(name: &str) -> bool {
    name.starts_with(PART_PREFIX) && name.ends_with(PART_SUFFIX)
}

/// The (index, count) of a part file name (`worker-1-of-3.json` -> (1, 3)), None when it is not
/// of that form (the numbers are not checked against each other: see [`WorkerSlot::new`]).
pub fn parse_part_file_name(name: &str) -> Option<(usize, usize)> {
    parse_worker_file_name(name, PART_SUFFIX)
}

/// The (index, count) of a worker lock file name (`worker-1-of-3.lock` -> (1, 3)).
pub fn parse_worker_lock_file_name(name: &str) -> Option<(usize, usize)> {
    parse_worker_file_name(name, WORKER_LOCK_SUFFIX)
}

fn parse_worker_file_name(name: &str, suffix: &str) -> Option<(usize, usize)> {
    let (index, count) = name
        .strip_prefix(PART_PREFIX)?
        .strip_suffix(suffix)?
        .split_once("-of-")?;
    Some((index.parse().ok()?, count.parse().ok()?))
}

/// Dataset positions covered by each shard: `[i*shard_rows, min((i+1)*shard_rows, rows))`.
pub fn shard_ranges(rows: usize, shard_rows: usize) -> Vec<Range<usize>> {
    assert!(shard_rows > 0, "shard_rows must be positive");
    (0..rows.div_ceil(shard_rows))
        .map(|i| i * shard_rows..((i + 1) * shard_rows).min(rows))
        .collect()
}

/// One worker of a multi-process extraction: worker `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerSlot {
    pub index: usize,
    pub count: usize,
}

impl WorkerSlot {
    /// The whole job in one process.
    pub const SINGLE: WorkerSlot = WorkerSlot { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            bail!("the number of workers must be at least 1");
        }
        if index >= count {
            bail!("worker index {index} is out of range for {count} workers (0-based: 0..{count})");
        }
        Ok(Self { index, count })
    }

    /// Resolves the slot from explicit flags, else from the job scheduler's environment:
    /// Slurm arrays (`SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`, minus
    /// `SLURM_ARRAY_TASK_MIN` when the array does not start at 0) or Kubernetes Indexed Jobs
    /// (`JOB_COMPLETION_INDEX`, with the count from `--num-workers` or `MULTICLIP_NUM_WORKERS`).
    /// `env` looks a variable up (`std::env::var(..).ok()` in production).
    pub fn resolve(
        num_workers: Option<usize>,
        worker_index: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let var = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    anyhow::anyhow!("environment variable {name}={v:?} is not a whole number")
                }),
            }
        };
        let count = match num_workers {
            Some(n) => Some(n),
            None => match var("SLURM_ARRAY_TASK_COUNT")? {
                Some(n) => Some(n),
                None => var("MULTICLIP_NUM_WORKERS")?,
            },
        };
        let index = match worker_index {
            Some(i) => Some(i),
            None => match var("SLURM_ARRAY_TASK_ID")? {
                Some(id) => Some(id - var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0).min(id)),
                None => var("JOB_COMPLETION_INDEX")?,
            },
        };
        match (count, index) {
            (None, None) => Ok(Self::SINGLE),
            (Some(count), Some(index)) => Self::new(index, count),
            (Some(1), None) => Ok(Self::SINGLE),
            (Some(count), None) => bail!(
                "{count} workers requested but no worker index: pass --worker-index \
                 (or run as a Slurm array task / Kubernetes Indexed Job)"
            ),
            (None, Some(index)) => bail!(
                "worker index {index} given but not the number of workers: pass --num-workers \
                 (or set MULTICLIP_NUM_WORKERS to the Job's completions)"
            ),
        }
    }

    /// Whether this worker computes shard `shard`.
    pub fn owns(&self, shard: usize) -> bool {
        shard % self.count == self.index
    }

    pub fn is_single(&self) -> bool {
        self.count == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn shard_ranges_cover_rows_exactly() {
        assert_eq!(shard_ranges(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(shard_ranges(8, 4), vec![0..4, 4..8]);
        assert!(shard_ranges(0, 4).is_empty());
    }

    #[test]
    fn file_names_parse_back() {
        assert_eq!(parse_shard_file_name(&shard_file_name(42)), Some(42));
        assert_eq!(parse_shard_file_name("shard-00042.json"), None);
        assert_eq!(parse_shard_file_name("shard-x.safetensors"), None);
        let slot = WorkerSlot::new(1, 3).unwrap();
        assert_eq!(parse_part_file_name(&part_file_name(slot)), Some((1, 3)));
        assert_eq!(
            parse_worker_lock_file_name(&worker_lock_file_name(slot)),
            Some((1, 3))
        );
        assert_eq!(parse_part_file_name(&worker_lock_file_name(slot)), None);
        assert!(!is_part_file_name(&worker_lock_file_name(slot)));
        assert!(is_part_file_name("worker-x.json"));
        assert_eq!(parse_part_file_name("worker-x.json"), None);
        assert!(!is_part_file_name("notes.json"));
    }

    #[test]
    fn workers_partition_shards() {
        let slots: Vec<_> = (0..3).map(|i| WorkerSlot::new(i, 3).unwrap()).collect();
        for shard in 0..10 {
            assert_eq!(slots.iter().filter(|s| s.owns(shard)).count(), 1);
        }
        assert!(WorkerSlot::new(3, 3).is_err());
        assert!(WorkerSlot::new(0, 0).is_err());
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn slot_resolves_from_flags_and_schedulers() {
        assert_eq!(
            WorkerSlot::resolve(None, None, env_of(&[])).unwrap(),
            WorkerSlot::SINGLE
        );
        let slurm = env_of(&[
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]);
        assert_eq!(
            WorkerSlot::resolve(None, None, slurm).unwrap(),
            WorkerSlot { index: 2, count: 4 }
        );
        let k8s = env_of(&[("JOB_COMPLETION_INDEX", "1")]);
        assert_eq!(
            WorkerSlot::resolve(Some(3), None, k8s).unwrap(),
            WorkerSlot { index: 1, count: 3 }
        );
        let k8s_no_count = env_of(&[("JOB_COMPLETION_INDEX", "1")]);
        assert!(WorkerSlot::resolve(None, None, k8s_no_count).is_err());
        assert_eq!(
            WorkerSlot::resolve(Some(2), Some(0), env_of(&[("SLURM_ARRAY_TASK_ID", "7")])).unwrap(),
            WorkerSlot { index: 0, count: 2 }
        );
        assert!(WorkerSlot::resolve(None, None, env_of(&[("JOB_COMPLETION_INDEX", "x")])).is_err());
    }
}
