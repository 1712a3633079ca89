//! Memory-mapped reading of a finished cache: this is what stage 2 uses.
//!
//! [`CacheReader::open`] maps every shard (nothing is read until touched) and checks it against
//! the manifest. Rows are numbered `0..len()` over the stored rows of all shards in dataset order
//! (skipped rows have no number). [`CacheReader::row_bytes`] is a zero-copy view of one stored row;
//! [`CacheReader::gather`] copies just the requested rows into an f32 tensor; batch iteration is in
//! [`super::batches`].

use super::layout::shard_file_name;
use super::manifest::{Manifest, StoredDtype, StoredOutput};
use super::shard::ShardLayout;
use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Gathers of at least this many elements are decoded in parallel.
const PARALLEL_GATHER_ELEMENTS: usize = 1 << 16;

struct MappedShard {
    mmap: Mmap,
    /// Byte range of each output (manifest order) in `mmap`.
    ranges: Vec<std::ops::Range<usize>>,
}

/// A read-only, memory-mapped cache.
pub struct CacheReader {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<MappedShard>,
    /// `first_row[s]` is the reader row of shard `s`'s first stored row; one extra entry = len.
    first_row: Vec<usize>,
    ids: Vec<String>,
    index: HashMap<String, usize>,
}

impl CacheReader {
    /// Opens `dir/manifest.json` and maps every shard, checking each file's size, tensor names,
    /// dtypes, shapes and row ids against the manifest (checksums are `cache verify`'s job).
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load_dir(dir)?;
        let header = &manifest.header;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut first_row = vec![0];
        let mut ids = Vec::with_capacity(manifest.stored_rows);
        for (expected_index, entry) in manifest.shards.iter().enumerate() {
            let path = dir.join(&entry.file);
            ensure!(
                entry.index == expected_index && entry.file == shard_file_name(entry.index),
                "{}: shard {} listed as {} at position {expected_index}",
                dir.join(super::layout::MANIFEST_FILE).display(),
                entry.index,
                entry.file
            );
            let file = File::open(&path)
                .with_context(|| format!("cannot open shard {}", path.display()))?;
            let size = file
                .metadata()
                .with_context(|| format!("cannot stat {}", path.display()))?
                .len();
            if size != entry.bytes {
                bail!(
                    "shard {} has {size} bytes, the manifest says {}: it was truncated or \
                     replaced (run `multiclip cache verify {}`)",
                    path.display(),
                    entry.bytes,
                    dir.display()
                );
            }
            // SAFETY: cache files are written once and renamed into place, never modified in
            // place; a concurrent external modification is outside the contract.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            let layout = ShardLayout::parse(&mmap, header, &manifest.fingerprint, entry.index)
                .with_context(|| format!("shard {} does not match the manifest", path.display()))?;
            ensure!(
                layout.rows == entry.rows && layout.meta.skipped == entry.skipped,
                "shard {} holds {} rows and {} skipped, the manifest says {} and {}",
                path.display(),
                layout.rows,
                layout.meta.skipped.len(),
                entry.rows,
                entry.skipped.len()
            );
            first_row.push(first_row.last().copied().unwrap_or(0) + layout.rows);
            ids.extend(layout.meta.ids);
            shards.push(MappedShard {
                mmap,
                ranges: layout.ranges,
            });
        }
        let mut index = HashMap::with_capacity(ids.len());
        for (row, id) in ids.iter().enumerate() {
            if let Some(prev) = index.insert(id.clone(), row) {
                bail!(
                    "{}: id {id:?} is stored twice (rows {prev} and {row})",
                    dir.display()
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            first_row,
            ids,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Stored rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Id of every stored row, in row order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Row of the sample with id `id`, if stored.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// All stored outputs.
    pub fn outputs(&self) -> &[StoredOutput] {
        &self.manifest.header.outputs
    }

    /// The stored output `name`; the error lists the outputs the cache has.
    pub fn output_spec(&self, name: &str) -> Result<&StoredOutput> {
        self.output_position(name).map(|k| &self.outputs()[k])
    }

    fn output_position(&self, name: &str) -> Result<usize> {
        self.outputs()
            .iter()
            .position(|o| o.name == name)
            .with_context(|| {
                let names: Vec<&str> = self.outputs().iter().map(|o| o.name.as_str()).collect();
                format!(
                    "cache {} has no output `{name}` (it has: {}; backbone {})",
                    self.dir.display(),
                    names.join(", "),
                    self.manifest.header.backbone.id
                )
            })
    }

    /// (shard, row within the shard) of reader row `row`.
    fn locate(&self, row: usize) -> Result<(usize, usize)> {
        ensure!(
            row < self.len(),
            "row {row} is out of range: cache {} has {} rows",
            self.dir.display(),
            self.len()
        );
        let shard = self.first_row.partition_point(|&first| first <= row) - 1;
        Ok((shard, row - self.first_row[shard]))
    }

    /// The stored bytes of one row of output `name` (little endian, in the output's stored
    /// dtype), borrowed from the memory map.
    pub fn row_bytes(&self, name: &str, row: usize) -> Result<&[u8]> {
        let k = self.output_position(name)?;
        self.row_bytes_at(k, row)
    }

    fn row_bytes_at(&self, output: usize, row: usize) -> Result<&[u8]> {
        let (shard, local) = self.locate(row)?;
        let len = self.outputs()[output].row_bytes();
        let start = self.shards[shard].ranges[output].start + local * len;
        Ok(&self.shards[shard].mmap[start..start + len])
    }

    /// Rows `rows` of output `name` as an f32 tensor `[rows.len(), ...shape]` on `device`
    /// (masks come out as 0.0/1.0). Only the requested rows are read and converted.
    pub fn gather(&self, name: &str, rows: &[usize], device: &Device) -> Result<Tensor> {
        let k = self.output_position(name)?;
        let out = &self.outputs()[k];
        let row_len = out.row_len();
        let mut values = vec![0f32; rows.len() * row_len];
        let decode = |(dst, &row): (&mut [f32], &usize)| -> Result<()> {
            decode_row(out.dtype, self.row_bytes_at(k, row)?, dst);
            Ok(())
        };
        if row_len == 0 {
            // Nothing to copy.
        } else if values.len() >= PARALLEL_GATHER_ELEMENTS {
            values
                .par_chunks_mut(row_len)
                .zip(rows.par_iter())
                .try_for_each(decode)?;
        } else {
            values.chunks_mut(row_len).zip(rows).try_for_each(decode)?;
        }
        let mut shape = vec![rows.len()];
        shape.extend(&out.shape);
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

/// Converts one stored row to f32. Uses the vectorised slice conversions when the bytes are
/// aligned (always, for shards written by multiclip on a little-endian machine), else decodes
/// element by element.
fn decode_row(dtype: StoredDtype, bytes: &[u8], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let little_endian = cfg!(target_endian = "little");
    match dtype {
        StoredDtype::F16 => {
            // SAFETY: every bit pattern is a valid f16; `align_to` only returns a properly
            // aligned middle part.
            let (head, values, tail) = unsafe { bytes.align_to::<half::f16>() };
            if little_endian && head.is_empty() && tail.is_empty() {
                values.convert_to_f32_slice(dst);
            } else {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
        StoredDtype::F32 => {
            // SAFETY: every bit pattern is a valid f32; see above.
            let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
            if little_endian && head.is_empty() && tail.is_empty() {
                dst.copy_from_slice(values);
            } else {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        StoredDtype::U8 => {
            for (d, b) in dst.iter_mut().zip(bytes) {
                *d = f32::from(*b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::WorkerSlot;
    use crate::cache::manifest::tests::test_header;
    use crate::cache::writer::tests::write_synthetic;

    fn synthetic_cache(rows: usize, shard_rows: usize, skip: &[usize]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let header = test_header(rows, shard_rows);
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, skip, None)
            .finish()
            .unwrap();
        dir
    }

    #[test]
    fn rows_ids_and_views_follow_the_dataset_minus_skipped() {
        let dir = synthetic_cache(10, 4, &[5]);
        let reader = CacheReader::open(dir.path()).unwrap();
        assert_eq!(reader.len(), 9);
        assert_eq!(reader.ids()[4], "4.jpg");
        assert_eq!(reader.ids()[5], "6.jpg");
        assert_eq!(reader.index_of("6.jpg"), Some(5));
        assert_eq!(reader.index_of("5.jpg"), None);
        let image = reader.row_bytes("image", 5).unwrap();
        assert_eq!(image.len(), 6);
        assert_eq!(half::f16::from_le_bytes([image[0], image[1]]).to_f32(), 6.0);
        assert!(reader.row_bytes("image", 9).is_err());
        let err = reader.output_spec("text").unwrap_err().to_string();
        assert!(err.contains("image, tokens, mask"), "{err}");
        assert_eq!(reader.output_spec("tokens").unwrap().shape, vec![2, 2]);
    }

    #[test]
    fn gather_converts_requested_rows_across_shards() {
        let dir = synthetic_cache(10, 4, &[]);
        let reader = CacheReader::open(dir.path()).unwrap();
        let rows = [9, 0, 4, 3];
        let image = reader.gather("image", &rows, &Device::Cpu).unwrap();
        assert_eq!(image.dims(), &[4, 3]);
        let got = image.to_vec2::<f32>().unwrap();
        assert_eq!(got[0], vec![9.0, 9.125, 9.25]);
        assert_eq!(got[3], vec![3.0, 3.125, 3.25]);
        let tokens = reader.gather("tokens", &rows, &Device::Cpu).unwrap();
        assert_eq!(tokens.dims(), &[4, 2, 2]);
        assert_eq!(
            tokens.to_vec3::<f32>().unwrap()[1],
            vec![vec![0.0, 1.0], vec![2.0, 3.0]]
        );
        let mask = reader.gather("mask", &rows, &Device::Cpu).unwrap();
        assert_eq!(
            mask.to_vec2::<f32>().unwrap(),
            vec![[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
        );
    }

    #[test]
    fn large_gather_matches_per_row_views() {
        let dir = synthetic_cache(3000, 1000, &[]);
        let reader = CacheReader::open(dir.path()).unwrap();
        let rows: Vec<usize> = (0..3000).rev().step_by(7).collect();
        // 429 rows x 4 values is below the parallel threshold; use tokens via many rows instead.
        let all: Vec<usize> = (0..3000)
            .chain(0..3000)
            .chain(0..3000)
            .chain(0..3000)
            .chain(0..3000)
            .collect();
        let big = reader.gather("tokens", &all, &Device::Cpu).unwrap();
        assert_eq!(big.dims(), &[15000, 2, 2]);
        let small = reader.gather("tokens", &rows, &Device::Cpu).unwrap();
        let big_rows = big
            .index_select(
                &Tensor::new(
                    rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    &Device::Cpu,
                )
                .unwrap(),
                0,
            )
            .unwrap();
        assert_eq!(
            small.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            big_rows.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn shards_are_plain_safetensors_for_other_readers() {
        let dir = synthetic_cache(10, 4, &[]);
        let reader = CacheReader::open(dir.path()).unwrap();
        let tensors = candle_core::safetensors::load(
            dir.path().join("shard-00001.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for name in ["image", "tokens", "mask"] {
            let theirs = tensors[name].to_dtype(candle_core::DType::F32).unwrap();
            let ours = reader.gather(name, &[4, 5, 6, 7], &Device::Cpu).unwrap();
            assert_eq!(theirs.dims(), ours.dims());
            assert_eq!(
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn aligned_and_unaligned_decoding_agree() {
        let values = [1.5f32, -2.25, 65504.0, 1e-3];
        for dtype in [StoredDtype::F16, StoredDtype::F32] {
            let mut bytes = vec![0u8];
            for v in values {
                match dtype {
                    StoredDtype::F16 => bytes.extend(half::f16::from_f32(v).to_le_bytes()),
                    _ => bytes.extend(v.to_le_bytes()),
                }
            }
            let n = bytes.len() - 1;
            let mut aligned_copy = vec![0u64; n.div_ceil(8)];
            // SAFETY: u64 storage reinterpreted as bytes, for an 8-aligned buffer.
            let aligned = unsafe { aligned_copy.align_to_mut::<u8>().1 };
            aligned[..n].copy_from_slice(&bytes[1..]);
            let (mut a, mut b) = ([0f32; 4], [0f32; 4]);
            decode_row(dtype, &aligned[..n], &mut a);
            decode_row(dtype, &bytes[1..], &mut b);
            assert_eq!(a, b);
            assert_eq!(a[..2], [1.5, -2.25]);
        }
    }

    #[test]
    fn open_reports_a_truncated_shard_by_name() {
        let dir = synthetic_cache(10, 4, &[]);
        let path = dir.path().join("shard-00001.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = CacheReader::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("shard-00001.safetensors"), "{err}");
    }
}
