//! Resumable, crash-safe writing of a cache: [`CacheWriter`] takes the writer lock
//! ([`super::lock`]), decides which shards still need computing (for this worker), writes each
//! completed [`ShardBuilder`] atomically, and finally writes `manifest.json` (single process) or
//! this worker's part ([`super::parts`]).

use super::integrity::{Integrity, check_shard};
use super::layout::{
    MANIFEST_FILE, WorkerSlot, parse_shard_file_name, shard_file_name, shard_ranges,
};
use super::lock::WriterLock;
use super::manifest::{CacheHeader, Manifest, SHARD_HASH, ShardEntry, SkippedRow};
use super::parts;
use super::shard::{self, ShardBuilder, ShardLayout};
use crate::files::{self, ContentHash, remove_stale_temps, write_atomic};
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Writes the shards of one worker (or the whole job) into a cache directory.
pub struct CacheWriter {
    dir: PathBuf,
    header: CacheHeader,
    fingerprint: String,
    slot: WorkerSlot,
    ranges: Vec<Range<usize>>,
    /// Complete shards of this worker, by index.
    done: BTreeMap<usize, ShardEntry>,
    reused: usize,
    written: usize,
    /// `manifest.json` of this extraction already existed (the cache was complete or merged).
    merged: bool,
    /// Held until the writer is dropped (after [`CacheWriter::finish`]).
    _lock: WriterLock,
    /// Recorded in the entries of the shards this writer writes ([`CacheWriter::set_device`]).
    device: Option<String>,
}

impl CacheWriter {
    /// Opens `dir` (created if needed) for the extraction described by `header`.
    ///
    /// Takes the writer lock (all of `dir` for a single process, this worker's slot for one of
    /// several), so a second writer is refused with who holds it. Refuses a directory holding a
    /// manifest, part or shard of a different extraction (naming what differs). Removes
    /// temporary files left by an interrupted run for this worker's shards and takes this
    /// worker's complete shards as done after checking their size and header against the
    /// record (a damaged one is logged and recomputed).
    pub fn open(dir: &Path, header: CacheHeader, slot: WorkerSlot) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        let fingerprint = header.fingerprint();
        let lock = if slot.is_single() {
            WriterLock::whole(dir, "extract")?
        } else {
            WriterLock::worker(dir, slot, &fingerprint)?
        };
        let ranges = shard_ranges(header.dataset.rows, header.shard_rows);

        // Entries already recorded by a previous run (manifest or parts), trusted when the file
        // still has that size and header.
        let mut known: BTreeMap<usize, ShardEntry> = BTreeMap::new();
        let mut recorded = Vec::new();
        let manifest_path = dir.join(MANIFEST_FILE);
        let merged = manifest_path.exists();
        if merged {
            recorded.push((manifest_path.clone(), Manifest::load(&manifest_path)?));
        }
        for part in parts::list(dir)? {
            recorded.push((part.clone(), Manifest::load(&part)?));
        }
        for (path, manifest) in recorded {
            manifest.check_same_run(&path, &header, &fingerprint)?;
            known.extend(manifest.shards.into_iter().map(|s| (s.index, s)));
        }

        check_foreign_shards(dir, &fingerprint, ranges.len())?;

        let mut done = BTreeMap::new();
        for index in (0..ranges.len()).filter(|&i| slot.owns(i)) {
            let name = shard_file_name(index);
            remove_stale_temps(dir, &name)?;
            let path = dir.join(&name);
            if !path.exists() {
                continue;
            }
            let entry = match known.remove(&index) {
                Some(entry) if entry.file == name => {
                    let (_, problems) =
                        check_shard(dir, &header, &fingerprint, &entry, Integrity::Headers);
                    if problems.is_empty() {
                        Ok(entry)
                    } else {
                        Err(anyhow::anyhow!(problems.join("; ")))
                    }
                }
                _ => describe_shard_file(&path, &header, &fingerprint, index),
            };
            match entry {
                Ok(entry) => {
                    done.insert(index, entry);
                }
                Err(e) => {
                    tracing::warn!("{}: {e:#}; recomputing it", path.display());
                    fs::remove_file(&path)
                        .with_context(|| format!("cannot remove {}", path.display()))?;
                }
            }
        }
        let reused = done.len();
        Ok(Self {
            dir: dir.to_path_buf(),
            header,
            fingerprint,
            slot,
            ranges,
            done,
            reused,
            written: 0,
            merged,
            _lock: lock,
            device: None,
        })
    }

    /// Records `device` (e.g. `cuda:0`) as where the shards written from now on were computed.
    pub fn set_device(&mut self, device: String) {
        self.device = Some(device);
    }

    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    /// Dataset positions covered by every shard of the cache.
    pub fn shard_ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// This worker's shards that still need computing, in order.
    pub fn pending(&self) -> Vec<usize> {
        (0..self.ranges.len())
            .filter(|&i| self.slot.owns(i) && !self.done.contains_key(&i))
            .collect()
    }

    /// Shards of this worker that were already complete when the writer opened.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Shards written by this writer.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Rows skipped so far in this worker's complete shards.
    pub fn skipped(&self) -> impl Iterator<Item = &SkippedRow> {
        self.done.values().flat_map(|e| e.skipped.iter())
    }

    /// Rows stored so far in this worker's complete shards.
    pub fn stored_rows(&self) -> usize {
        self.done.values().map(|e| e.rows).sum()
    }

    /// Removes this worker's complete shard files instead of finishing, and releases the lock.
    pub fn discard(self) -> Result<()> {
        for entry in self.done.values() {
            let path = self.dir.join(&entry.file);
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        files::sync_dir(&self.dir)
    }

    /// An empty builder for shard `index`.
    pub fn builder(&self, index: usize) -> ShardBuilder {
        ShardBuilder::new(&self.header.outputs, index, self.ranges[index].clone())
    }

    /// Encodes a complete shard and writes it atomically.
    pub fn write_shard(&mut self, builder: ShardBuilder) -> Result<()> {
        let index = builder.index();
        ensure!(
            self.slot.owns(index),
            "shard {index} belongs to another worker"
        );
        let (mut meta, data) = builder.finish(&self.fingerprint)?;
        meta.device = self.device.clone();
        let bytes = shard::encode(&self.header.outputs, &meta, &data)?;
        let file = shard_file_name(index);
        write_atomic(&self.dir.join(&file), &bytes)?;
        let (hash, header_hash) = shard_hashes(&bytes)?;
        self.done.insert(
            index,
            ShardEntry {
                index,
                file,
                start: meta.start,
                end: meta.end,
                rows: meta.ids.len(),
                bytes: bytes.len() as u64,
                hash,
                header_hash: Some(header_hash),
                skipped: meta.skipped,
                device: meta.device,
            },
        );
        self.written += 1;
        Ok(())
    }

    /// Writes the index once all of this worker's shards are done: `manifest.json` for a single
    /// process (removing parts of an earlier multi-worker run of the same extraction), else
    /// `parts/worker-I-of-N.json` (unless the cache is already merged and this worker rewrote
    /// nothing: shards are deterministic, so the manifest stays valid). Returns the index path.
    pub fn finish(self) -> Result<PathBuf> {
        let pending = self.pending();
        if !pending.is_empty() {
            bail!(
                "cannot finish {}: shards {pending:?} are not written",
                self.dir.display()
            );
        }
        let manifest = Manifest::new(self.header, self.done.into_values().collect());
        if self.slot.is_single() {
            let path = self.dir.join(MANIFEST_FILE);
            remove_stale_temps(&self.dir, MANIFEST_FILE)?;
            manifest.save(&path)?;
            parts::remove(&self.dir)?;
            Ok(path)
        } else if self.merged && self.written == 0 {
            Ok(self.dir.join(MANIFEST_FILE))
        } else {
            parts::save(&self.dir, self.slot, &manifest)
        }
    }
}

/// Errors if any shard file in `dir` was written by a different extraction (checked from its
/// header only; unreadable files are left to their owner to recompute).
fn check_foreign_shards(dir: &Path, fingerprint: &str, shards: usize) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(index) = parse_shard_file_name(name) else {
            continue;
        };
        let Ok(meta) = shard::read_meta(&path) else {
            continue;
        };
        if meta.fingerprint != fingerprint || index >= shards {
            bail!(
                "{} belongs to a different extraction (settings fingerprint {}; this run: {} with \
                 {} shards). Use another --out directory, or delete {} to start over",
                path.display(),
                meta.fingerprint,
                fingerprint,
                shards,
                dir.display()
            );
        }
    }
    Ok(())
}

/// Reads, checks and hashes a complete shard file into its manifest entry.
pub(crate) fn describe_shard_file(
    path: &Path,
    header: &CacheHeader,
    fingerprint: &str,
    index: usize,
) -> Result<ShardEntry> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let layout = ShardLayout::parse(&bytes, header, fingerprint, index)?;
    let (hash, header_hash) = shard_hashes(&bytes)?;
    Ok(ShardEntry {
        index,
        file: shard_file_name(index),
        start: layout.meta.start,
        end: layout.meta.end,
        rows: layout.rows,
        bytes: bytes.len() as u64,
        hash,
        header_hash: Some(header_hash),
        skipped: layout.meta.skipped,
        device: layout.meta.device,
    })
}

/// The content hash and header hash a manifest records for the shard `bytes`.
fn shard_hashes(bytes: &[u8]) -> Result<(ContentHash, ContentHash)> {
    let header_len = shard::header_len(bytes).context("a shard too short for its header")?;
    Ok((
        ContentHash::of(SHARD_HASH, bytes),
        ContentHash::of(SHARD_HASH, &bytes[..header_len]),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::manifest::tests::test_header;
    use candle_core::{Device, Tensor};

    /// Synthetic backbone outputs for dataset positions `rows`: `image` = position + k/8,
    /// `tokens` = position * 10 + k, `mask` = [1, position % 2].
    pub(crate) fn synthetic_outputs(rows: &[usize]) -> Vec<Tensor> {
        let n = rows.len();
        let image: Vec<f32> = rows
            .iter()
            .flat_map(|&r| (0..3).map(move |k| r as f32 + k as f32 / 8.0))
            .collect();
        let tokens: Vec<f32> = rows
            .iter()
            .flat_map(|&r| (0..4).map(move |k| r as f32 * 10.0 + k as f32))
            .collect();
        let mask: Vec<f32> = rows.iter().flat_map(|&r| [1.0, (r % 2) as f32]).collect();
        vec![
            Tensor::from_vec(image, (n, 3), &Device::Cpu).unwrap(),
            Tensor::from_vec(tokens, (n, 2, 2), &Device::Cpu).unwrap(),
            Tensor::from_vec(mask, (n, 2), &Device::Cpu).unwrap(),
        ]
    }

    /// Writes the shards `only` (all when None) of a synthetic cache with `rows` rows, skipping the
    /// positions in `skip`, in batches of the header's batch size.
    pub(crate) fn write_synthetic(
        dir: &Path,
        header: &CacheHeader,
        slot: WorkerSlot,
        skip: &[usize],
        only: Option<&[usize]>,
    ) -> CacheWriter {
        let mut writer = CacheWriter::open(dir, header.clone(), slot).unwrap();
        for index in writer.pending() {
            if only.is_some_and(|o| !o.contains(&index)) {
                continue;
            }
            let mut builder = writer.builder(index);
            let range = writer.shard_ranges()[index].clone();
            let positions: Vec<usize> = range.collect();
            for window in positions.chunks(header.batch_size) {
                let kept: Vec<usize> = window
                    .iter()
                    .copied()
                    .filter(|r| !skip.contains(r))
                    .collect();
                for &r in window.iter().filter(|r| skip.contains(r)) {
                    builder
                        .skip(SkippedRow {
                            row: r,
                            id: format!("{r}.jpg"),
                            reason: "bad".into(),
                        })
                        .unwrap();
                }
                if !kept.is_empty() {
                    let ids: Vec<(usize, String)> =
                        kept.iter().map(|&r| (r, format!("{r}.jpg"))).collect();
                    builder.push(&ids, &synthetic_outputs(&kept)).unwrap();
                }
            }
            writer.write_shard(builder).unwrap();
        }
        writer
    }

    fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for entry in walk(dir) {
            let rel = entry
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(rel, fs::read(&entry).unwrap());
        }
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files.extend(walk(&p));
            } else {
                files.push(p);
            }
        }
        files
    }

    #[test]
    fn resume_writes_only_missing_shards_and_matches_one_go() {
        let header = test_header(10, 4);
        let full = tempfile::tempdir().unwrap();
        write_synthetic(full.path(), &header, WorkerSlot::SINGLE, &[5], None)
            .finish()
            .unwrap();

        let resumed = tempfile::tempdir().unwrap();
        // First run dies after shard 1, leaving a stray temp file of shard 2.
        let w = write_synthetic(
            resumed.path(),
            &header,
            WorkerSlot::SINGLE,
            &[5],
            Some(&[1]),
        );
        drop(w);
        fs::write(
            resumed.path().join(".shard-00002.safetensors.tmp.99"),
            b"partial",
        )
        .unwrap();
        let w = CacheWriter::open(resumed.path(), header.clone(), WorkerSlot::SINGLE).unwrap();
        assert_eq!(w.pending(), vec![0, 2]);
        assert_eq!(w.reused(), 1);
        drop(w);
        let w = write_synthetic(resumed.path(), &header, WorkerSlot::SINGLE, &[5], None);
        assert_eq!(w.written(), 2);
        w.finish().unwrap();
        assert_eq!(dir_bytes(full.path()), dir_bytes(resumed.path()));
        let manifest = Manifest::load_dir(resumed.path()).unwrap();
        assert_eq!(manifest.stored_rows, 9);
        assert_eq!(
            manifest.skipped().map(|s| s.row).collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[test]
    fn other_settings_are_refused() {
        let header = test_header(10, 4);
        let dir = tempfile::tempdir().unwrap();
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[], Some(&[0]));
        let mut other = header.clone();
        other.shard_rows = 5;
        let err = CacheWriter::open(dir.path(), other.clone(), WorkerSlot::SINGLE)
            .err()
            .unwrap();
        assert!(err.to_string().contains("different extraction"), "{err}");
        // Also refused once the manifest exists, naming the setting.
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[], None)
            .finish()
            .unwrap();
        let err = CacheWriter::open(dir.path(), other, WorkerSlot::SINGLE)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--shard-rows"), "{err}");
    }

    #[test]
    fn damaged_shard_is_recomputed() {
        let header = test_header(10, 4);
        let dir = tempfile::tempdir().unwrap();
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[], Some(&[0, 1]));
        let path = dir.path().join(shard_file_name(1));
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let w = CacheWriter::open(dir.path(), header, WorkerSlot::SINGLE).unwrap();
        assert_eq!(w.pending(), vec![1, 2]);
    }

    #[test]
    fn a_shard_whose_ids_were_edited_is_recomputed_on_resume() {
        let header = test_header(10, 4);
        let dir = tempfile::tempdir().unwrap();
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[], None)
            .finish()
            .unwrap();
        let expected = dir_bytes(dir.path());
        let path = dir.path().join(shard_file_name(1));
        crate::cache::shard::tests::edit_header(&path, "\\\"4.jpg", "\\\"x.jpg");
        let writer = CacheWriter::open(dir.path(), header.clone(), WorkerSlot::SINGLE).unwrap();
        assert_eq!(writer.pending(), vec![1]);
        drop(writer);
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[], None)
            .finish()
            .unwrap();
        assert_eq!(dir_bytes(dir.path()), expected);
    }

    #[test]
    fn rows_pushed_in_any_order_are_stored_in_dataset_order() {
        let header = test_header(10, 4);
        let in_order = tempfile::tempdir().unwrap();
        write_synthetic(in_order.path(), &header, WorkerSlot::SINGLE, &[5], None)
            .finish()
            .unwrap();
        let shuffled = tempfile::tempdir().unwrap();
        let mut writer = CacheWriter::open(shuffled.path(), header, WorkerSlot::SINGLE).unwrap();
        for (index, batches) in [
            (0, vec![vec![3, 0], vec![2, 1]]),
            (1, vec![vec![7], vec![6, 4]]),
            (2, vec![vec![9, 8]]),
        ] {
            let mut builder = writer.builder(index);
            for rows in batches {
                let ids: Vec<(usize, String)> =
                    rows.iter().map(|&r| (r, format!("{r}.jpg"))).collect();
                builder.push(&ids, &synthetic_outputs(&rows)).unwrap();
            }
            if index == 1 {
                builder
                    .skip(SkippedRow {
                        row: 5,
                        id: "5.jpg".into(),
                        reason: "bad".into(),
                    })
                    .unwrap();
            }
            writer.write_shard(builder).unwrap();
        }
        writer.finish().unwrap();
        assert_eq!(dir_bytes(in_order.path()), dir_bytes(shuffled.path()));
    }

    #[test]
    fn a_row_given_twice_is_refused() {
        let header = test_header(10, 4);
        let dir = tempfile::tempdir().unwrap();
        let mut writer = CacheWriter::open(dir.path(), header, WorkerSlot::SINGLE).unwrap();
        let mut builder = writer.builder(0);
        for rows in [[0, 1], [1, 2]] {
            let ids: Vec<(usize, String)> = rows.iter().map(|&r| (r, format!("{r}.jpg"))).collect();
            builder.push(&ids, &synthetic_outputs(&rows)).unwrap();
        }
        let err = writer.write_shard(builder).unwrap_err();
        assert!(format!("{err:#}").contains("exactly once"), "{err:#}");
    }
}
