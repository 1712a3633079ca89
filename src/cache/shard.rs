//! One shard file: collecting its rows ([`ShardBuilder`]: batches in any order, stored in dataset
//! order as f16, f32 or u8 bytes), encoding (deterministic bytes), and decoding: the whole file
//! into byte ranges ([`ShardLayout`]) or its header alone ([`read_meta`]).
//!
//! A shard is a safetensors file with one tensor per output, named after it and shaped
//! `[rows, ...shape]`, plus one metadata entry, `multiclip`, holding a JSON [`ShardMeta`] (the row
//! ids and skipped rows). One key only, because safetensors writes its metadata map in hash order:
//! a single key keeps the bytes deterministic.

use super::layout::shard_ranges;
use super::manifest::{CacheHeader, SkippedRow, StoredDtype, StoredOutput};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;

/// The safetensors metadata key holding the [`ShardMeta`] JSON.
pub const META_KEY: &str = "multiclip";

/// A shard's description of itself (in its safetensors metadata).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// [`CacheHeader::fingerprint`] of the run that wrote it.
    pub fingerprint: String,
    pub index: usize,
    /// Dataset positions `[start, end)` covered.
    pub start: usize,
    pub end: usize,
    /// Ids of the stored rows, in order.
    pub ids: Vec<String>,
    /// Rows of `[start, end)` that were not stored.
    pub skipped: Vec<SkippedRow>,
    /// The device that computed the rows (`cpu`, `cuda:0`), when known: kept in the shard so a
    /// resumed or merged extraction records it for shards it did not compute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Encodes a shard. `data[k]` holds the stored bytes of `outputs[k]` for all rows.
pub fn encode(outputs: &[StoredOutput], meta: &ShardMeta, data: &[Vec<u8>]) -> Result<Vec<u8>> {
    ensure!(
        outputs.len() == data.len(),
        "{} outputs but {} data buffers",
        outputs.len(),
        data.len()
    );
    let rows = meta.ids.len();
    let views: Vec<(String, RawView)> = outputs
        .iter()
        .zip(data)
        .map(|(out, bytes)| {
            ensure!(
                bytes.len() == rows * out.row_bytes(),
                "output {}: {} bytes for {rows} rows of {} bytes",
                out.name,
                bytes.len(),
                out.row_bytes()
            );
            let mut shape = vec![rows];
            shape.extend(&out.shape);
            Ok((
                out.name.clone(),
                RawView {
                    dtype: out.dtype.safetensors(),
                    shape,
                    data: bytes,
                },
            ))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([(META_KEY.to_string(), serde_json::to_string(meta)?)]);
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// A borrowed tensor for [`safetensors::serialize`].
pub(crate) struct RawView<'a> {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl safetensors::View for RawView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The largest safetensors header read (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The [`ShardMeta`] in a shard's safetensors metadata.
fn meta_of(metadata: &safetensors::tensor::Metadata) -> Result<ShardMeta> {
    let meta_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .with_context(|| format!("no `{META_KEY}` metadata: not a multiclip shard"))?;
    serde_json::from_str(meta_json).with_context(|| format!("invalid `{META_KEY}` metadata"))
}

/// Reads the [`ShardMeta`] of a shard file from its safetensors header alone (the length prefix
/// and the JSON header, parsed by the safetensors crate), never its tensor data.
pub fn read_meta(path: &Path) -> Result<ShardMeta> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .with_context(|| format!("{} is too short for a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    ensure!(
        len <= MAX_HEADER_BYTES,
        "{}: safetensors header too large",
        path.display()
    );
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&json)
        .with_context(|| format!("{}: invalid safetensors header", path.display()))?;
    meta_of(&metadata).with_context(|| path.display().to_string())
}

/// The length of a shard's safetensors header (8-byte length prefix + JSON) as its first bytes
/// announce it; None when `bytes` is too short to hold that header.
pub fn header_len(bytes: &[u8]) -> Option<usize> {
    let prefix: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let len = 8usize.checked_add(usize::try_from(u64::from_le_bytes(prefix)).ok()?)?;
    (len <= bytes.len()).then_some(len)
}

/// A decoded shard: its metadata and where each output's bytes are in the file.
#[derive(Clone, Debug)]
pub struct ShardLayout {
    pub meta: ShardMeta,
    /// Stored rows.
    pub rows: usize,
    /// Length of the safetensors header (length prefix + JSON): `bytes[..header_len]` holds the
    /// row ids and the tensor table.
    pub header_len: usize,
    /// Byte range in the file of each output of the header, in header order.
    pub ranges: Vec<Range<usize>>,
}

impl ShardLayout {
    /// Decodes the bytes of shard `index` and checks them against the header (fingerprint,
    /// row range, tensor names, dtypes, shapes, file length). Errors do not name the file: callers
    /// add it.
    pub fn parse(
        bytes: &[u8],
        header: &CacheHeader,
        fingerprint: &str,
        index: usize,
    ) -> Result<Self> {
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("not a complete safetensors file ({e:?})"))?;
        let meta = meta_of(&metadata)?;
        if meta.fingerprint != fingerprint {
            bail!(
                "written by a different extraction (settings fingerprint {} instead of {fingerprint})",
                meta.fingerprint
            );
        }
        let expected = shard_ranges(header.dataset.rows, header.shard_rows)
            .get(index)
            .cloned()
            .with_context(|| format!("shard index {index} is beyond the dataset's shards"))?;
        ensure!(
            meta.index == index && meta.start == expected.start && meta.end == expected.end,
            "claims to be shard {} covering rows {}..{}, expected shard {index} covering {}..{}",
            meta.index,
            meta.start,
            meta.end,
            expected.start,
            expected.end
        );
        let rows = meta.ids.len();
        ensure!(
            rows + meta.skipped.len() == meta.end - meta.start,
            "{rows} stored + {} skipped rows do not make the {} rows it covers",
            meta.skipped.len(),
            meta.end - meta.start
        );
        ensure!(
            metadata.tensors().len() == header.outputs.len(),
            "holds {} tensors, the manifest lists {} outputs",
            metadata.tensors().len(),
            header.outputs.len()
        );
        let data_start = 8 + header_len;
        let ranges = header
            .outputs
            .iter()
            .map(|out| {
                let info = metadata
                    .info(&out.name)
                    .with_context(|| format!("has no tensor `{}`", out.name))?;
                let mut shape = vec![rows];
                shape.extend(&out.shape);
                ensure!(
                    info.dtype == out.dtype.safetensors() && info.shape == shape,
                    "tensor `{}` is {:?} {:?}, expected {:?} {shape:?}",
                    out.name,
                    info.dtype,
                    info.shape,
                    out.dtype
                );
                let (begin, end) = info.data_offsets;
                Ok(data_start + begin..data_start + end)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            meta,
            rows,
            header_len: data_start,
            ranges,
        })
    }
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

    /// The shard's metadata and every output's bytes, rows in dataset order; errors unless the
    /// stored and skipped rows cover the shard exactly once.
    pub(crate) fn finish(mut self, fingerprint: &str) -> Result<(ShardMeta, Vec<Vec<u8>>)> {
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
                device: None,
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
    use crate::cache::writer::tests::synthetic_outputs;

    /// Deterministic synthetic bytes for shard `index` of `header` with the rows in `skip`
    /// left out; row `r`'s values derive from its dataset position.
    pub(crate) fn synthetic_shard(header: &CacheHeader, index: usize, skip: &[usize]) -> Vec<u8> {
        let range = shard_ranges(header.dataset.rows, header.shard_rows)[index].clone();
        let kept: Vec<usize> = range.clone().filter(|r| !skip.contains(r)).collect();
        let data = header
            .outputs
            .iter()
            .map(|out| {
                kept.iter()
                    .flat_map(|&r| {
                        (0..out.row_len()).flat_map(move |k| {
                            let v = r as f32 + k as f32 / 8.0;
                            match out.dtype {
                                super::super::StoredDtype::F16 => {
                                    half::f16::from_f32(v).to_le_bytes().to_vec()
                                }
                                super::super::StoredDtype::F32 => v.to_le_bytes().to_vec(),
                                super::super::StoredDtype::U8 => vec![((r + k) % 2) as u8],
                            }
                        })
                    })
                    .collect()
            })
            .collect::<Vec<Vec<u8>>>();
        let meta = ShardMeta {
            fingerprint: header.fingerprint(),
            index,
            start: range.start,
            end: range.end,
            ids: kept.iter().map(|r| format!("{r}.jpg")).collect(),
            skipped: range
                .filter(|r| skip.contains(r))
                .map(|r| SkippedRow {
                    row: r,
                    id: format!("{r}.jpg"),
                    reason: "test".into(),
                })
                .collect(),
            device: None,
        };
        encode(&header.outputs, &meta, &data).unwrap()
    }

    /// Replaces the bytes `from` by `to` (same length) once in the safetensors header of the
    /// shard file `path`, as a hand edit of its metadata would.
    pub(crate) fn edit_header(path: &Path, from: &str, to: &str) {
        assert_eq!(from.len(), to.len());
        let mut bytes = std::fs::read(path).unwrap();
        let end = header_len(&bytes).unwrap();
        let at = bytes[..end]
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap_or_else(|| panic!("{from} is not in the header of {}", path.display()));
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn encode_is_deterministic_and_parses_back() {
        let header = test_header(5, 3);
        let a = synthetic_shard(&header, 1, &[]);
        assert_eq!(a, synthetic_shard(&header, 1, &[]));
        let layout = ShardLayout::parse(&a, &header, &header.fingerprint(), 1).unwrap();
        assert_eq!(layout.rows, 2);
        assert_eq!(layout.meta.ids, vec!["3.jpg", "4.jpg"]);
        let image = &a[layout.ranges[0].clone()];
        assert_eq!(image.len(), 2 * 3 * 2);
        assert_eq!(half::f16::from_le_bytes([image[0], image[1]]).to_f32(), 3.0);
    }

    #[test]
    fn meta_reads_from_the_header_alone() {
        let header = test_header(5, 3);
        let bytes = synthetic_shard(&header, 1, &[4]);
        let full = ShardLayout::parse(&bytes, &header, &header.fingerprint(), 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00001.safetensors");
        // Only the header is read: a shard cut right after it still gives its metadata.
        let header_end = header_len(&bytes).unwrap();
        assert_eq!(header_end, full.header_len);
        std::fs::write(&path, &bytes[..header_end]).unwrap();
        assert_eq!(read_meta(&path).unwrap(), full.meta);
        std::fs::write(&path, &bytes[..header_end - 1]).unwrap();
        assert!(read_meta(&path).is_err());
        assert_eq!(header_len(&bytes[..header_end - 1]), None);
        assert_eq!(header_len(&bytes[..7]), None);
    }

    #[test]
    fn parse_rejects_damage_and_foreign_shards() {
        let header = test_header(5, 3);
        let bytes = synthetic_shard(&header, 0, &[1]);
        let fp = header.fingerprint();
        assert!(ShardLayout::parse(&bytes, &header, &fp, 0).is_ok());
        assert!(ShardLayout::parse(&bytes[..bytes.len() - 1], &header, &fp, 0).is_err());
        assert!(ShardLayout::parse(&bytes, &header, &fp, 1).is_err());
        let mut other = header.clone();
        other.batch_size = 7;
        let err = ShardLayout::parse(&bytes, &other, &other.fingerprint(), 0).unwrap_err();
        assert!(err.to_string().contains("different extraction"), "{err}");
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
}
