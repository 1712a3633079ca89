//! `cache merge`: combines the per-worker parts (`parts/worker-I-of-N.json`) of a multi-worker
//! extraction into the one `manifest.json` a single process would have written, byte for byte,
//! then removes the parts. Holds the whole cache's writer lock (so no worker is still running),
//! and refuses when a worker is missing, the parts disagree, a shard does not match its part's
//! record, or no row at all was stored.

use super::integrity::{Integrity, check_shard};
use super::layout::{MANIFEST_FILE, WorkerSlot, part_file_name, shard_ranges};
use super::lock::WriterLock;
use super::manifest::{FORMAT_VERSION, Manifest, describe_skipped};
use super::parts;
use anyhow::{Result, bail, ensure};
use std::collections::BTreeMap;
use std::path::Path;

/// What [`merge`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Wrote `manifest.json` from this many parts.
    Merged { parts: usize, shards: usize },
    /// No parts and a manifest already present: nothing to do.
    AlreadyMerged,
}

/// Merges the worker parts in `dir` into `dir/manifest.json`.
pub fn merge(dir: &Path) -> Result<MergeOutcome> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if parts::list(dir)?.is_empty() && manifest_path.exists() {
        // Nothing to write (the cache may sit on read-only storage): no lock needed.
        return Ok(MergeOutcome::AlreadyMerged);
    }
    let _lock = if dir.is_dir() {
        Some(WriterLock::whole(dir, "cache merge")?)
    } else {
        None
    };
    let part_paths = parts::list(dir)?;
    if part_paths.is_empty() {
        if manifest_path.exists() {
            return Ok(MergeOutcome::AlreadyMerged);
        }
        bail!(
            "{} has no worker parts (parts/worker-I-of-N.json) and no manifest: run \
             `multiclip extract --num-workers N --worker-index I ...` for every worker first",
            dir.display()
        );
    }
    let mut parts = Vec::new();
    for path in &part_paths {
        parts.push((path.clone(), Manifest::load(path)?));
    }
    let (first_path, first) = &parts[0];
    let header = first.header.clone();
    let fingerprint = first.fingerprint.clone();
    ensure!(
        header.format_version == FORMAT_VERSION,
        "{}: written by another multiclip version (cache format {}; this one merges format \
         {FORMAT_VERSION}): merge with the multiclip that extracted it",
        first_path.display(),
        header.format_version
    );
    ensure!(
        header.fingerprint() == fingerprint,
        "{}: the header does not match its fingerprint (edited by hand?)",
        first_path.display()
    );
    for (path, part) in &parts[1..] {
        part.check_same_run(path, &header, &fingerprint)?;
    }
    if manifest_path.exists() {
        let existing = Manifest::load(&manifest_path)?;
        existing.check_same_run(&manifest_path, &header, &fingerprint)?;
    }

    // The worker count comes from the part names; every worker 0..N must be there.
    let mut count = None;
    let mut slots = Vec::new();
    for path in &part_paths {
        let slot = parts::slot_of(path)?;
        if count.is_some_and(|c| c != slot.count) {
            bail!(
                "{} has parts from runs with different --num-workers ({} and {}): delete the \
                 parts of the stale run",
                dir.display(),
                count.unwrap_or(0),
                slot.count
            );
        }
        count = Some(slot.count);
        slots.push(slot);
    }
    let count = count.unwrap_or(1);
    let missing: Vec<String> = (0..count)
        .filter(|i| !slots.iter().any(|s| s.index == *i))
        .map(|i| part_file_name(WorkerSlot { index: i, count }))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: workers have not finished (missing parts/{}): re-run them with the same \
             arguments and their --worker-index",
            dir.display(),
            missing.join(", parts/")
        );
    }

    let mut shards = BTreeMap::new();
    for ((path, part), slot) in parts.into_iter().zip(&slots) {
        for entry in part.shards {
            ensure!(
                slot.owns(entry.index),
                "{}: lists shard {} which belongs to worker {}",
                path.display(),
                entry.index,
                entry.index % slot.count
            );
            let (_, problems) = check_shard(dir, &header, &fingerprint, &entry, Integrity::Headers);
            if !problems.is_empty() {
                bail!(
                    "{} records a shard that does not match it: {}. Re-run that worker with the \
                     same arguments (it recomputes the shard) before merging",
                    path.display(),
                    problems.join("; ")
                );
            }
            if shards.insert(entry.index, entry).is_some() {
                bail!("{}: a shard is listed by two parts", path.display());
            }
        }
    }
    let expected = shard_ranges(header.dataset.rows, header.shard_rows).len();
    let absent: Vec<usize> = (0..expected).filter(|i| !shards.contains_key(i)).collect();
    ensure!(
        absent.is_empty() && shards.len() == expected,
        "{}: shards {absent:?} are missing from the parts",
        dir.display()
    );
    let shard_count = shards.len();
    let manifest = Manifest::new(header, shards.into_values().collect());
    if manifest.stored_rows == 0 && manifest.header.dataset.rows > 0 {
        bail!(
            "{}: all {} rows were skipped, so the cache would hold nothing ({}). Nothing was \
             merged: fix the inputs, delete {} and run the workers again",
            dir.display(),
            manifest.header.dataset.rows,
            describe_skipped(manifest.skipped(), manifest.skipped_rows),
            dir.display()
        );
    }
    manifest.save(&manifest_path)?;
    parts::remove(dir)?;
    Ok(MergeOutcome::Merged {
        parts: count,
        shards: shard_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::manifest::tests::test_header;
    use crate::cache::writer::tests::write_synthetic;
    use std::fs;

    fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    fs::read(&p).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn three_workers_merge_into_the_single_process_cache() {
        let header = test_header(23, 4);
        let single = tempfile::tempdir().unwrap();
        write_synthetic(single.path(), &header, WorkerSlot::SINGLE, &[9], None)
            .finish()
            .unwrap();
        let multi = tempfile::tempdir().unwrap();
        for i in [2, 0] {
            write_synthetic(
                multi.path(),
                &header,
                WorkerSlot::new(i, 3).unwrap(),
                &[9],
                None,
            )
            .finish()
            .unwrap();
        }
        let err = merge(multi.path()).unwrap_err().to_string();
        assert!(err.contains("worker-1-of-3.json"), "{err}");
        write_synthetic(
            multi.path(),
            &header,
            WorkerSlot::new(1, 3).unwrap(),
            &[9],
            None,
        )
        .finish()
        .unwrap();
        assert_eq!(
            merge(multi.path()).unwrap(),
            MergeOutcome::Merged {
                parts: 3,
                shards: 6
            }
        );
        assert!(!multi.path().join("parts").exists());
        assert_eq!(files(single.path()), files(multi.path()));
        assert_eq!(merge(multi.path()).unwrap(), MergeOutcome::AlreadyMerged);
        // A worker re-run after the merge finds its shards and leaves the merged cache alone.
        let worker = write_synthetic(
            multi.path(),
            &header,
            WorkerSlot::new(1, 3).unwrap(),
            &[9],
            None,
        );
        assert_eq!((worker.written(), worker.reused()), (0, 2));
        worker.finish().unwrap();
        assert_eq!(files(single.path()), files(multi.path()));
        assert!(!multi.path().join("parts").exists());
    }
}
