//! Resumable, crash-safe writing of a cache: [`CacheWriter`] decides which shards still need
//! computing (for this worker), writes each completed [`ShardBuilder`] atomically, and finally
//! writes `manifest.json` (single process) or this worker's part ([`super::parts`]).

use super::layout::{
    MANIFEST_FILE, WorkerSlot, parse_shard_file_name, shard_file_name, shard_ranges,
};
use super::manifest::{CacheHeader, Manifest, ShardEntry, SkippedRow, StoredDtype, StoredOutput};
use super::parts;
use super::shard::{self, ShardLayout, ShardMeta};
use crate::files::{self, remove_stale_temps, write_atomic};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Tensor};
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
}

impl CacheWriter {
    /// Opens `dir` (created if needed) for the extraction described by `header`.
    ///
    /// Refuses a directory holding a manifest, part or shard of a different extraction (naming what
    /// differs). Removes temporary files left by an interrupted run for this worker's shards and
    /// takes this worker's complete shards as done (a damaged one is logged and recomputed).
    pub fn open(dir: &Path, header: CacheHeader, slot: WorkerSlot) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        let fingerprint = header.fingerprint();
        let ranges = shard_ranges(header.dataset.rows, header.shard_rows);

        // Entries already recorded by a previous run (manifest or parts), trusted when the file
        // is still there with the same size.
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
            let size = fs::metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?
                .len();
            let entry = match known.remove(&index) {
                Some(entry) if entry.bytes == size && entry.file == name => Ok(entry),
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
        })
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

    /// An empty builder for shard `index`.
    pub fn builder(&self, index: usize) -> ShardBuilder {
        ShardBuilder::new(&self.header.outputs, index, self.ranges[index].clone())
    }

    /// Encodes a complete shard and writes it atomically.
    pub fn write_shard(&mut self, builder: ShardBuilder) -> Result<()> {
        let index = builder.index;
        ensure!(
            self.slot.owns(index),
            "shard {index} belongs to another worker"
        );
        let (meta, data) = builder.finish(&self.fingerprint)?;
        let bytes = shard::encode(&self.header.outputs, &meta, &data)?;
        let file = shard_file_name(index);
        write_atomic(&self.dir.join(&file), &bytes)?;
        self.done.insert(
            index,
            ShardEntry {
                index,
                file,
                start: meta.start,
                end: meta.end,
                rows: meta.ids.len(),
                bytes: bytes.len() as u64,
                sha256: files::sha256_hex(&bytes),
                skipped: meta.skipped,
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
        let Ok(meta) = read_shard_meta(&path) else {
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

/// Reads only the [`ShardMeta`] of a shard file (its safetensors header), not the data.
pub fn read_shard_meta(path: &Path) -> Result<ShardMeta> {
    use std::io::Read;
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .with_context(|| format!("{} is too short for a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    ensure!(
        len <= 100_000_000,
        "{}: safetensors header too large",
        path.display()
    );
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__")]
        metadata: std::collections::HashMap<String, String>,
    }
    let parsed: Header = serde_json::from_slice(&json)
        .with_context(|| format!("{}: invalid safetensors header", path.display()))?;
    let meta = parsed
        .metadata
        .get(shard::META_KEY)
        .with_context(|| format!("{} is not a multiclip shard", path.display()))?;
    serde_json::from_str(meta)
        .with_context(|| format!("{}: invalid shard metadata", path.display()))
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
    Ok(ShardEntry {
        index,
        file: shard_file_name(index),
        start: layout.meta.start,
        end: layout.meta.end,
        rows: layout.rows,
        bytes: bytes.len() as u64,
        sha256: files::sha256_hex(&bytes),
        skipped: layout.meta.skipped,
    })
}

/// Accumulates the rows of one shard, batch by batch, in any order; the shard stores them in
/// dataset order.
pub struct ShardBuilder {
    index: usize,
    range: Range<usize>,
    outputs: Vec<StoredOutput>,
    data: Vec<Vec<u8>>,
    ids: Vec<String>,
    /// Dataset position of each stored row, in push order.
    positions: Vec<usize>,
    skipped: Vec<SkippedRow>,
}

impl ShardBuilder {
    pub fn new(outputs: &[StoredOutput], index: usize, range: Range<usize>) -> Self {
        Self {
            index,
            range,
            outputs: outputs.to_vec(),
            data: vec![Vec::new(); outputs.len()],
            ids: Vec::new(),
            positions: Vec::new(),
            skipped: Vec::new(),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether every position of the shard is stored or skipped.
    pub fn is_complete(&self) -> bool {
        self.ids.len() + self.skipped.len() == self.range.len()
    }

    fn check_position(&self, position: usize) -> Result<()> {
        ensure!(
            self.range.contains(&position),
            "row {position} is outside shard {} (rows {:?})",
            self.index,
            self.range
        );
        Ok(())
    }

    /// Adds a batch: `rows` are (dataset position, id), each position of the shard given once,
    /// in any order across pushes, and `outputs` the backbone's tensors, one per output, each
    /// `[rows.len(), ...shape]`.
    pub fn push(&mut self, rows: &[(usize, String)], outputs: &[Tensor]) -> Result<()> {
        ensure!(
            outputs.len() == self.outputs.len(),
            "backbone returned {} outputs, expected {}",
            outputs.len(),
            self.outputs.len()
        );
        for (out, tensor) in self.outputs.iter().zip(outputs) {
            let mut shape = vec![rows.len()];
            shape.extend(&out.shape);
            ensure!(
                tensor.dims() == shape.as_slice(),
                "backbone output `{}` has shape {:?}, expected {shape:?}",
                out.name,
                tensor.dims()
            );
        }
        for (position, _) in rows {
            self.check_position(*position)?;
        }
        let mut all_values = Vec::with_capacity(outputs.len());
        for (out, tensor) in self.outputs.iter().zip(outputs) {
            let values = tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
                .with_context(|| format!("cannot read backbone output `{}`", out.name))?;
            check_storable(out, &values, rows)?;
            all_values.push(values);
        }
        for ((out, buf), values) in self.outputs.iter().zip(&mut self.data).zip(all_values) {
            encode_values(out.dtype, &values, buf);
        }
        self.positions.extend(rows.iter().map(|(p, _)| *p));
        self.ids.extend(rows.iter().map(|(_, id)| id.clone()));
        Ok(())
    }

    /// Records a row that is not stored (in any order relative to [`ShardBuilder::push`]).
    pub fn skip(&mut self, row: SkippedRow) -> Result<()> {
        self.check_position(row.row)?;
        self.skipped.push(row);
        Ok(())
    }

    /// Puts the stored rows (ids, positions and every output's bytes) in dataset order.
    fn sort_rows(&mut self) {
        if self.positions.is_sorted() {
            return;
        }
        let mut order: Vec<usize> = (0..self.positions.len()).collect();
        order.sort_by_key(|&k| self.positions[k]);
        let rows = order.len();
        for buf in &mut self.data {
            let row_bytes = buf.len() / rows;
            let mut sorted = Vec::with_capacity(buf.len());
            for &k in &order {
                sorted.extend_from_slice(&buf[k * row_bytes..(k + 1) * row_bytes]);
            }
            *buf = sorted;
        }
        self.ids = order
            .iter()
            .map(|&k| std::mem::take(&mut self.ids[k]))
            .collect();
        self.positions = order.iter().map(|&k| self.positions[k]).collect();
    }

    fn finish(mut self, fingerprint: &str) -> Result<(ShardMeta, Vec<Vec<u8>>)> {
        self.skipped.sort_by_key(|s| s.row);
        self.sort_rows();
        let mut covered: Vec<usize> = self
            .positions
            .iter()
            .copied()
            .chain(self.skipped.iter().map(|s| s.row))
            .collect();
        covered.sort_unstable();
        ensure!(
            covered.iter().copied().eq(self.range.clone()),
            "shard {}: {} stored + {} skipped rows do not cover its {} rows exactly once",
            self.index,
            self.ids.len(),
            self.skipped.len(),
            self.range.len()
        );
        Ok((
            ShardMeta {
                fingerprint: fingerprint.to_string(),
                index: self.index,
                start: self.range.start,
                end: self.range.end,
                ids: self.ids,
                skipped: self.skipped,
            },
            self.data,
        ))
    }
}

/// Refuses NaN/infinite values and values beyond f16's range for an f16 output, naming the row.
fn check_storable(out: &StoredOutput, values: &[f32], rows: &[(usize, String)]) -> Result<()> {
    let limit = match out.dtype {
        StoredDtype::F16 => f32::from(half::f16::MAX),
        StoredDtype::F32 | StoredDtype::U8 => f32::MAX,
    };
    let row_len = out.row_len().max(1);
    if let Some(k) = values
        .iter()
        .position(|v| !v.is_finite() || v.abs() > limit)
    {
        let (position, id) = &rows[k / row_len];
        let value = values[k];
        if value.is_finite() {
            bail!(
                "backbone output `{}` of row {position} ({id}) holds {value}, beyond the f16 \
                 range (±{limit}): extract with --dtype f32",
                out.name
            );
        }
        bail!(
            "backbone output `{}` of row {position} ({id}) holds {value}: the model produced a \
             non-finite value",
            out.name
        );
    }
    Ok(())
}

/// Appends `values` to `buf` in the stored element type (little endian; masks as 0/1 bytes).
fn encode_values(dtype: StoredDtype, values: &[f32], buf: &mut Vec<u8>) {
    buf.reserve(values.len() * dtype.size());
    match dtype {
        StoredDtype::F16 => {
            for v in values {
                buf.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        StoredDtype::F32 => {
            for v in values {
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        StoredDtype::U8 => buf.extend(values.iter().map(|v| u8::from(*v != 0.0))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::manifest::tests::test_header;
    use candle_core::Device;

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
    fn builder_rejects_bad_shapes_and_rows_outside_the_shard() {
        let header = test_header(10, 4);
        let mut b = ShardBuilder::new(&header.outputs, 0, 0..4);
        let ids = vec![(1, "1.jpg".to_string())];
        assert!(b.push(&ids, &synthetic_outputs(&[1, 2])).is_err());
        assert!(
            b.push(&[(4, "4.jpg".into())], &synthetic_outputs(&[4]))
                .is_err()
        );
        b.push(&ids, &synthetic_outputs(&[1])).unwrap();
        assert!(!b.is_complete());
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
