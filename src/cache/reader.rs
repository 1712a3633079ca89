//! Memory-mapped reading of a finished cache: this is what stage 2 uses.
//!
//! [`CacheReader::open`] maps every shard (nothing is read until touched) after checking the
//! cache with [`super::integrity`]: the manifest, every shard's size, header and row ids, and
//! (unless opened with [`Integrity::Headers`]) every shard's content hash, and the label-name
//! embeddings when the cache has them ([`super::label_names`]). Rows are numbered
//! `0..len()` over the stored rows of all shards in dataset order (skipped rows have no number).
//! [`CacheReader::row_bytes`] is a zero-copy view of one stored row; [`CacheReader::gather`]
//! copies just the requested rows into an f32 tensor, refusing non-finite values (which extract
//! never stores) by shard, row and id; batch iteration is in [`super::batches`].

use super::integrity::{Integrity, check_manifest, check_shard};
use super::label_names::{self, LabelNames};
use super::manifest::{Manifest, StoredDtype, StoredOutput};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Gathers of at least this many elements are decoded in parallel.
const PARALLEL_GATHER_ELEMENTS: usize = 1 << 16;
/// Problems listed in the error of a cache that fails its check on open.
const PROBLEMS_SHOWN: usize = 10;

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
    label_names: Option<LabelNames>,
}

impl CacheReader {
    /// Opens `dir/manifest.json` and maps every shard after the full check
    /// ([`Integrity::Full`]): what `cache verify` checks, but the dataset.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, Integrity::Full)
    }

    /// Opens `dir` after the checks of `integrity`; any problem is an error that lists them in
    /// the words of `cache verify`.
    pub fn open_with(dir: &Path, integrity: Integrity) -> Result<Self> {
        let manifest = Manifest::load_dir(dir)?;
        if integrity == Integrity::Headers && manifest.header.format_version < 2 {
            tracing::warn!(
                "{}: cache format {} records no hash of the shard headers, so the row ids are \
                 checked only by the full check (open it without --trust-cache, or re-extract)",
                dir.display(),
                manifest.header.format_version
            );
        }
        let mut problems = check_manifest(dir, &manifest);
        let label_names = label_names::load(dir, &manifest.fingerprint).unwrap_or_else(|e| {
            problems.push(format!("{e:#}"));
            None
        });
        let checked: Vec<_> = manifest
            .shards
            .par_iter()
            .map(|entry| {
                check_shard(
                    dir,
                    &manifest.header,
                    &manifest.fingerprint,
                    entry,
                    integrity,
                )
            })
            .collect();
        let mut shards = Vec::with_capacity(checked.len());
        let mut first_row = vec![0];
        let mut ids = Vec::with_capacity(manifest.stored_rows);
        for (shard, shard_problems) in checked {
            problems.extend(shard_problems);
            if let Some(shard) = shard {
                first_row.push(first_row.last().copied().unwrap_or(0) + shard.layout.rows);
                ids.extend(shard.layout.meta.ids);
                shards.push(MappedShard {
                    mmap: shard.mmap,
                    ranges: shard.layout.ranges,
                });
            }
        }
        if !problems.is_empty() {
            bail!(failed_check(dir, &problems));
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
            label_names,
        })
    }

    /// The label-name embeddings stored by `extract --label-names`, if any.
    pub fn label_names(&self) -> Option<&LabelNames> {
        self.label_names.as_ref()
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
    /// (masks come out as 0.0/1.0). Only the requested rows are read and converted; a NaN or
    /// infinite value among them is an error naming the shard, the row and its id.
    pub fn gather(&self, name: &str, rows: &[usize], device: &Device) -> Result<Tensor> {
        let k = self.output_position(name)?;
        let out = &self.outputs()[k];
        let row_len = out.row_len();
        let mut values = vec![0f32; rows.len() * row_len];
        let decode = |(dst, &row): (&mut [f32], &usize)| -> Result<()> {
            let bytes = self.row_bytes_at(k, row)?;
            if let Some(element) = first_non_finite(out.dtype, bytes) {
                return Err(self.non_finite(out, row, element, bytes));
            }
            decode_row(out.dtype, bytes, dst);
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

    /// The error for element `element` of row `row` of output `out` (`bytes`), not finite.
    fn non_finite(
        &self,
        out: &StoredOutput,
        row: usize,
        element: usize,
        bytes: &[u8],
    ) -> anyhow::Error {
        let mut values = vec![0f32; out.row_len()];
        decode_row(out.dtype, bytes, &mut values);
        let (shard, local) = self.locate(row).unwrap_or((0, row));
        let file = self.dir.join(&self.manifest.shards[shard].file);
        anyhow::anyhow!(
            "{}: stored row {local} (id {:?}) holds {} in output `{}` (element {element}). \
             extract never stores a non-finite value, so the file was altered or written by \
             another tool: run `multiclip cache verify {}`",
            file.display(),
            self.ids[row],
            values[element],
            out.name,
            self.dir.display()
        )
    }
}

/// The first NaN or infinite element of a stored row, from the raw bits (exponent all ones);
/// masks have none.
fn first_non_finite(dtype: StoredDtype, bytes: &[u8]) -> Option<usize> {
    fn first<const N: usize>(bytes: &[u8], bad: impl Fn([u8; N]) -> bool) -> Option<usize> {
        let elements = || {
            bytes
                .chunks_exact(N)
                .map(|b| bad(b.try_into().expect("chunks of N bytes")))
        };
        // A fold without early exit vectorises: only a row that has a bad value is searched.
        if !elements().fold(false, |any, b| any | b) {
            return None;
        }
        elements().position(|b| b)
    }
    match dtype {
        StoredDtype::F16 => first::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7c00 == 0x7c00),
        StoredDtype::F32 => first::<4>(bytes, |b| {
            u32::from_le_bytes(b) & 0x7f80_0000 == 0x7f80_0000
        }),
        StoredDtype::U8 => None,
    }
}

/// The error of a cache that failed its check on open: the problems, and what to do.
fn failed_check(dir: &Path, problems: &[String]) -> String {
    let mut message = format!(
        "cache {} failed its integrity check ({} problem{}):",
        dir.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems.iter().take(PROBLEMS_SHOWN) {
        message.push_str(&format!("\n  {problem}"));
    }
    if problems.len() > PROBLEMS_SHOWN {
        message.push_str(&format!(
            "\n  ... and {} more",
            problems.len() - PROBLEMS_SHOWN
        ));
    }
    message.push_str(&format!(
        "\nNothing was read from it. `multiclip cache verify {}` checks it in full; to repair it, \
         delete the damaged shard files and run the same `multiclip extract` again, which \
         recomputes just those.",
        dir.display()
    ));
    message
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

    use crate::cache::manifest::tests::as_format_1;
    use crate::cache::manifest::{SHARD_HASH, StoredDtype};
    use crate::cache::shard::ShardLayout;
    use crate::cache::shard::tests::edit_header;
    use crate::files::ContentHash;

    fn open_error(dir: &Path, integrity: Integrity) -> String {
        match CacheReader::open_with(dir, integrity) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn edited_ids_are_refused_at_each_level_and_altered_bytes_at_full() {
        let dir = synthetic_cache(10, 4, &[]);
        let path = dir.path().join("shard-00001.safetensors");
        let pristine = std::fs::read(&path).unwrap();
        edit_header(&path, "\\\"4.jpg", "\\\"x.jpg");
        for integrity in [Integrity::Full, Integrity::Headers] {
            let err = open_error(dir.path(), integrity);
            assert!(
                err.contains("shard-00001.safetensors: the row ids")
                    && err.contains("cache verify")
                    && !err.contains("shard-00000"),
                "{err}"
            );
        }
        let mut bytes = pristine.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = open_error(dir.path(), Integrity::Full);
        assert!(
            err.contains("shard-00001.safetensors: xxh3-128") && err.contains("altered"),
            "{err}"
        );
        assert_eq!(
            CacheReader::open_with(dir.path(), Integrity::Headers)
                .unwrap()
                .len(),
            10
        );
    }

    /// Writes `bytes` into row `local` of output `output` of shard `index` of the cache in
    /// `dir`; with `rehash`, the manifest records the new content hash (as another tool that
    /// wrote the cache would have).
    fn overwrite_value(
        dir: &Path,
        index: usize,
        output: usize,
        local: usize,
        bytes: &[u8],
        rehash: bool,
    ) {
        let mut manifest = Manifest::load_dir(dir).unwrap();
        let path = dir.join(&manifest.shards[index].file);
        let mut data = std::fs::read(&path).unwrap();
        let layout =
            ShardLayout::parse(&data, &manifest.header, &manifest.fingerprint, index).unwrap();
        let at = layout.ranges[output].start + local * manifest.header.outputs[output].row_bytes();
        data[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&path, &data).unwrap();
        if rehash {
            manifest.shards[index].hash = ContentHash::of(SHARD_HASH, &data);
            manifest
                .save(&dir.join(crate::cache::layout::MANIFEST_FILE))
                .unwrap();
        }
    }

    #[test]
    fn non_finite_values_are_refused_where_rows_are_read() {
        let dir = synthetic_cache(10, 4, &[]);
        // `image` (f16) of dataset row 5 = stored row 1 of shard 1: a NaN, with a manifest that
        // vouches for it.
        overwrite_value(dir.path(), 1, 0, 1, &half::f16::NAN.to_le_bytes(), true);
        let reader = CacheReader::open(dir.path()).unwrap();
        assert!(reader.gather("image", &[0, 4, 6], &Device::Cpu).is_ok());
        let many: Vec<usize> = (0..10).cycle().take(20_000).collect();
        for rows in [&[0, 5][..], &many] {
            let err = reader
                .gather("image", rows, &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("shard-00001.safetensors: stored row 1 (id \"5.jpg\") holds NaN")
                    && err.contains("`image` (element 0)"),
                "{err}"
            );
        }
        // `tokens` (f32) of row 9 (shard 2, stored row 1, element 0): -inf, not rehashed, so
        // only a Headers open gets as far as reading it.
        overwrite_value(dir.path(), 2, 1, 1, &f32::NEG_INFINITY.to_le_bytes(), false);
        assert!(CacheReader::open(dir.path()).is_err());
        let reader = CacheReader::open_with(dir.path(), Integrity::Headers).unwrap();
        let err = reader
            .gather("tokens", &[9], &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(id \"9.jpg\") holds -inf in output `tokens`"),
            "{err}"
        );
        assert!(reader.gather("mask", &[5, 9], &Device::Cpu).is_ok());
        assert_eq!(
            first_non_finite(StoredDtype::F16, &half::f16::INFINITY.to_le_bytes()),
            Some(0)
        );
        assert_eq!(
            first_non_finite(StoredDtype::F16, &half::f16::MAX.to_le_bytes()),
            None
        );
        assert_eq!(
            first_non_finite(StoredDtype::F32, &[0, 0, 0, 0, 0, 0, 0xc0, 0x7f]),
            Some(1)
        );
        assert_eq!(
            first_non_finite(StoredDtype::F32, &f32::MAX.to_le_bytes()),
            None
        );
    }

    #[test]
    fn format_1_caches_are_read_and_checked_with_their_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let mut header = test_header(10, 4);
        header.format_version = 1;
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[5], None)
            .finish()
            .unwrap();
        let manifest = Manifest::load_dir(dir.path()).unwrap();
        let sha256s: Vec<String> = manifest
            .shards
            .iter()
            .map(|s| crate::files::sha256_file(&dir.path().join(&s.file)).unwrap())
            .collect();
        std::fs::write(
            dir.path().join("manifest.json"),
            as_format_1(&manifest, &sha256s),
        )
        .unwrap();
        let reader = CacheReader::open(dir.path()).unwrap();
        assert_eq!(
            (reader.len(), reader.manifest().header.format_version),
            (9, 1)
        );
        let path = dir.path().join("shard-00002.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = open_error(dir.path(), Integrity::Full);
        assert!(
            err.contains("shard-00002.safetensors: sha256") && err.contains("altered"),
            "{err}"
        );
        assert!(CacheReader::open_with(dir.path(), Integrity::Headers).is_ok());
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
