//! `manifest.json`: what a cache holds and how it was made. The [`CacheHeader`] is everything that
//! determines the bytes of the shards (backbone, forward precision, outputs, dataset, shard size,
//! batch size, tool version); its [`CacheHeader::fingerprint`] is stamped into every shard, part
//! and manifest so a re-run with other settings into the same directory is refused instead of
//! mixing caches. The device that computed each shard is recorded beside it ([`ShardEntry`]), not
//! in the header: a run resumed on another device with the same precision may go on.

use super::layout::MANIFEST_FILE;
use crate::backbone::{BackboneInfo, OutputKind, OutputSpec};
use crate::files::{self, ContentHash, HashAlgorithm};
use crate::tensor_ops::Precision;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Cache format version; bump when the layout of shards or manifest changes. Version 2 records
/// an xxh3-128 hash of every shard and of its header (row ids) instead of version 1's sha256 of
/// the file; version 1 caches stay readable (see [`ShardEntry`]).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest cache format this multiclip reads.
pub const OLDEST_READABLE_FORMAT: u32 = 1;
/// The hash new shards are recorded with.
pub const SHARD_HASH: HashAlgorithm = HashAlgorithm::Xxh3_128;

/// Element type of an output as stored in the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredDtype {
    F16,
    F32,
    U8,
}

impl StoredDtype {
    pub fn size(self) -> usize {
        match self {
            StoredDtype::F16 => 2,
            StoredDtype::F32 => 4,
            StoredDtype::U8 => 1,
        }
    }

    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            StoredDtype::F16 => safetensors::Dtype::F16,
            StoredDtype::F32 => safetensors::Dtype::F32,
            StoredDtype::U8 => safetensors::Dtype::U8,
        }
    }
}

impl std::str::FromStr for StoredDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(StoredDtype::F16),
            "f32" => Ok(StoredDtype::F32),
            _ => bail!("unknown feature dtype {s:?}: expected f16 or f32"),
        }
    }
}

/// One output as stored: the backbone's [`OutputSpec`] plus its stored element type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredOutput {
    pub name: String,
    /// Shape of one row, e.g. `[384]` or `[50, 768]`.
    pub shape: Vec<usize>,
    pub kind: OutputKind,
    pub dtype: StoredDtype,
}

impl StoredOutput {
    /// Features are stored as `feature_dtype`, masks always as u8.
    pub fn from_spec(spec: &OutputSpec, feature_dtype: StoredDtype) -> Self {
        let dtype = match spec.kind {
            OutputKind::Feature => feature_dtype,
            OutputKind::Mask => StoredDtype::U8,
        };
        Self {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            kind: spec.kind,
            dtype,
        }
    }

    /// Elements in one row.
    pub fn row_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.row_len() * self.dtype.size()
    }
}

/// One csv file that contributed rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsvPart {
    /// `train` or `test`. Stored as `split`, its name before multiclip called a csv selection a
    /// part: renaming it would change the header's fingerprint, so existing caches would no
    /// longer resume, merge or be reused.
    #[serde(rename = "split")]
    pub part: String,
    /// File name inside the data directory, e.g. `train.csv`.
    pub file: String,
    pub sha256: String,
    /// Records read from it.
    pub rows: usize,
}

/// Which dataset rows the cache covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFingerprint {
    /// The `--part` given: `train`, `test` or `all` (stored as `split`, see [`CsvPart::part`]).
    #[serde(rename = "split")]
    pub selection: String,
    /// The csv files read, in row order.
    pub parts: Vec<CsvPart>,
    /// Selected rows (stored + skipped).
    pub rows: usize,
}

/// Everything that determines the shard bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    pub format_version: u32,
    pub tool_version: String,
    pub backbone: BackboneInfo,
    /// The number type of the forward pass (`--precision`). Written only when it is not f32, so
    /// that the headers (and fingerprints) of f32 caches, every cache made before it existed
    /// included, stay as they were: absent means f32.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    pub outputs: Vec<StoredOutput>,
    pub dataset: DatasetFingerprint,
    /// Dataset rows per shard (the last shard may have fewer).
    pub shard_rows: usize,
    /// Rows per forward batch; batches never cross a shard, so a shard's bytes depend on it.
    pub batch_size: usize,
}

impl CacheHeader {
    /// Lower-case hex sha256 of the header's canonical JSON.
    pub fn fingerprint(&self) -> String {
        files::sha256_hex(&serde_json::to_vec(self).expect("a header always serialises"))
    }

    /// The stored output called `name`.
    pub fn output(&self, name: &str) -> Option<&StoredOutput> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Names the fields in which `other` differs from `self` (for error messages).
    pub fn differences(&self, other: &CacheHeader) -> Vec<&'static str> {
        let mut diffs = Vec::new();
        if self.format_version != other.format_version {
            diffs.push("cache format version");
        }
        if self.tool_version != other.tool_version {
            diffs.push("multiclip version");
        }
        if self.backbone != other.backbone {
            diffs.push("backbone (--backbone, weights or preprocessing)");
        }
        if self.precision != other.precision {
            diffs.push("--precision");
        }
        if self.outputs != other.outputs {
            diffs.push("outputs or --dtype");
        }
        if self.dataset != other.dataset {
            diffs.push("dataset (csv contents or --part)");
        }
        if self.shard_rows != other.shard_rows {
            diffs.push("--shard-rows");
        }
        if self.batch_size != other.batch_size {
            diffs.push("--batch-size");
        }
        diffs
    }
}

/// A dataset row that was not stored, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRow {
    /// Position among the selected dataset rows.
    pub row: usize,
    pub id: String,
    pub reason: String,
}

/// Skipped rows shown in a message by [`describe_skipped`].
const SKIPPED_SHOWN: usize = 3;

/// The first few of `rows` (`count` in all) for a message:
/// `row 0 (0.png): <reason>; row 1 (1.png): <reason>; ...; and 21 more`.
pub fn describe_skipped<'a>(
    rows: impl IntoIterator<Item = &'a SkippedRow>,
    count: usize,
) -> String {
    let mut shown: Vec<String> = rows
        .into_iter()
        .take(SKIPPED_SHOWN)
        .map(|s| format!("row {} ({}): {}", s.row, s.id, s.reason.trim_end()))
        .collect();
    if count > SKIPPED_SHOWN {
        shown.push(format!("and {} more", count - SKIPPED_SHOWN));
    }
    shown.join("; ")
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ShardEntryFields")]
pub struct ShardEntry {
    pub index: usize,
    pub file: String,
    /// Dataset positions `[start, end)` covered (stored + skipped).
    pub start: usize,
    pub end: usize,
    /// Rows stored in the file.
    pub rows: usize,
    pub bytes: u64,
    /// Hash of the whole file (`xxh3-128:…`; format 1 caches: their `sha256`, read as
    /// `sha256:…`).
    pub hash: ContentHash,
    /// Hash of the file's safetensors header (row ids, skipped rows, tensor table), checked on
    /// every open; format 1 caches have none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_hash: Option<ContentHash>,
    pub skipped: Vec<SkippedRow>,
    /// The device that computed its rows (`cpu`, `cuda:0`), when known: recorded, not part of
    /// the cache's identity (absent in shards written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// A [`ShardEntry`] as written by any format version.
#[derive(Deserialize)]
struct ShardEntryFields {
    index: usize,
    file: String,
    start: usize,
    end: usize,
    rows: usize,
    bytes: u64,
    #[serde(default)]
    hash: Option<ContentHash>,
    #[serde(default)]
    header_hash: Option<ContentHash>,
    /// Format 1: the file's sha256 (hex).
    #[serde(default)]
    sha256: Option<String>,
    skipped: Vec<SkippedRow>,
    #[serde(default)]
    device: Option<String>,
}

impl TryFrom<ShardEntryFields> for ShardEntry {
    type Error = String;
    fn try_from(f: ShardEntryFields) -> Result<Self, String> {
        let hash = match (f.hash, f.sha256) {
            (Some(hash), None) => hash,
            (None, Some(sha256)) => format!("sha256:{sha256}")
                .parse()
                .map_err(|e| format!("shard {}: {e}", f.index))?,
            _ => {
                return Err(format!(
                    "shard {} must record exactly one of `hash` and (format 1) `sha256`",
                    f.index
                ));
            }
        };
        Ok(Self {
            index: f.index,
            file: f.file,
            start: f.start,
            end: f.end,
            rows: f.rows,
            bytes: f.bytes,
            hash,
            header_hash: f.header_hash,
            skipped: f.skipped,
            device: f.device,
        })
    }
}

/// The cache index (`manifest.json`), also the body of a per-worker part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `multiclip-cache`.
    pub format: String,
    /// [`CacheHeader::fingerprint`] of `header`.
    pub fingerprint: String,
    #[serde(flatten)]
    pub header: CacheHeader,
    /// Rows stored across all shards.
    pub stored_rows: usize,
    /// Rows skipped across all shards.
    pub skipped_rows: usize,
    pub shards: Vec<ShardEntry>,
}

pub const FORMAT_NAME: &str = "multiclip-cache";

impl Manifest {
    /// A manifest over `shards` (sorted by index by the caller).
    pub fn new(header: CacheHeader, shards: Vec<ShardEntry>) -> Self {
        Self {
            format: FORMAT_NAME.to_string(),
            fingerprint: header.fingerprint(),
            stored_rows: shards.iter().map(|s| s.rows).sum(),
            skipped_rows: shards.iter().map(|s| s.skipped.len()).sum(),
            header,
            shards,
        }
    }

    /// Pretty JSON with a trailing newline: the exact bytes written to disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Reads and checks a manifest or part file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read {} (is this a finished multiclip cache? multi-worker caches need \
                 `multiclip cache merge` first)",
                path.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid multiclip manifest", path.display()))?;
        if manifest.format != FORMAT_NAME {
            bail!(
                "{} has format {:?}, expected {FORMAT_NAME:?}",
                path.display(),
                manifest.format
            );
        }
        let version = manifest.header.format_version;
        if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&version) {
            bail!(
                "{} uses cache format version {version}, this multiclip reads versions \
                 {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION} (was it written by a newer \
                 multiclip?)",
                path.display()
            );
        }
        if manifest.header.shard_rows == 0 || manifest.header.batch_size == 0 {
            bail!(
                "{}: shard_rows and batch_size must be at least 1 (the file was edited?)",
                path.display()
            );
        }
        if version >= 2
            && let Some(entry) = manifest.shards.iter().find(|s| s.header_hash.is_none())
        {
            bail!(
                "{}: shard {} has no header_hash, which cache format {version} records",
                path.display(),
                entry.index
            );
        }
        Ok(manifest)
    }

    /// Reads `dir/manifest.json`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        Self::load(&dir.join(MANIFEST_FILE))
    }

    /// Writes the manifest atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        files::write_atomic(path, &self.to_bytes())
    }

    /// Errors unless this manifest or part (read from `path`) records the extraction of `header`
    /// (whose fingerprint is `fingerprint`), naming the settings that differ.
    pub fn check_same_run(
        &self,
        path: &Path,
        header: &CacheHeader,
        fingerprint: &str,
    ) -> Result<()> {
        if self.fingerprint == fingerprint {
            return Ok(());
        }
        let dir = path.parent().map_or(path, |p| p).display();
        if self.header.format_version != header.format_version {
            bail!(
                "{} was written by another multiclip version (cache format {}; this one writes \
                 format {}), so this extraction cannot add to it: extract into a new --out \
                 directory (the old cache stays readable by train, evaluate and predict), or \
                 delete {dir} to start over",
                path.display(),
                self.header.format_version,
                header.format_version
            );
        }
        let diffs = self.header.differences(header);
        bail!(
            "{} belongs to a different extraction (differs in: {}). Use another --out directory, or \
             delete {dir} to start over",
            path.display(),
            if diffs.is_empty() {
                "settings".to_string()
            } else {
                diffs.join(", ")
            },
        )
    }

    /// Every skipped row of every shard, in row order.
    pub fn skipped(&self) -> impl Iterator<Item = &SkippedRow> {
        self.shards.iter().flat_map(|s| s.skipped.iter())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small header for tests of the cache layer: outputs `image` [3] (f16), `tokens` [2, 2]
    /// (f32) and `mask` [2] (u8).
    pub(crate) fn test_header(rows: usize, shard_rows: usize) -> CacheHeader {
        CacheHeader {
            format_version: FORMAT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            backbone: BackboneInfo {
                id: "test:synthetic".into(),
                weights_sha256: vec![("model.safetensors".into(), "00".repeat(32))],
                preprocessing: serde_json::json!({"size": 4}),
                text_template: None,
            },
            precision: Precision::F32,
            outputs: vec![
                StoredOutput {
                    name: "image".into(),
                    shape: vec![3],
                    kind: OutputKind::Feature,
                    dtype: StoredDtype::F16,
                },
                StoredOutput {
                    name: "tokens".into(),
                    shape: vec![2, 2],
                    kind: OutputKind::Feature,
                    dtype: StoredDtype::F32,
                },
                StoredOutput {
                    name: "mask".into(),
                    shape: vec![2],
                    kind: OutputKind::Mask,
                    dtype: StoredDtype::U8,
                },
            ],
            dataset: DatasetFingerprint {
                selection: "train".into(),
                parts: vec![CsvPart {
                    part: "train".into(),
                    file: "train.csv".into(),
                    sha256: "11".repeat(32),
                    rows,
                }],
                rows,
            },
            shard_rows,
            batch_size: 2,
        }
    }

    #[test]
    fn manifest_round_trips_and_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest::new(test_header(4, 2), vec![entry(0), entry(1)]);
        let path = dir.path().join("manifest.json");
        manifest.save(&path).unwrap();
        let loaded = Manifest::load(&path).unwrap();
        assert_eq!(loaded, manifest);
        assert_eq!(loaded.to_bytes(), std::fs::read(&path).unwrap());
        assert_eq!(loaded.header.fingerprint(), manifest.fingerprint);
    }

    /// A format 2 manifest turned into what multiclip 1 wrote: format_version 1 and a bare
    /// `sha256` per shard instead of `hash` and `header_hash`.
    pub(crate) fn as_format_1(manifest: &Manifest, sha256s: &[String]) -> Vec<u8> {
        let mut json = serde_json::to_value(manifest).unwrap();
        let mut header = manifest.header.clone();
        header.format_version = 1;
        json["format_version"] = 1.into();
        json["fingerprint"] = header.fingerprint().into();
        for (shard, sha) in json["shards"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(sha256s)
        {
            let shard = shard.as_object_mut().unwrap();
            shard.remove("hash");
            shard.remove("header_hash");
            shard.insert("sha256".into(), sha.clone().into());
        }
        serde_json::to_vec_pretty(&json).unwrap()
    }

    fn entry(index: usize) -> ShardEntry {
        ShardEntry {
            index,
            file: crate::cache::layout::shard_file_name(index),
            start: 2 * index,
            end: 2 * index + 2,
            rows: 2,
            bytes: 10,
            hash: ContentHash::of(SHARD_HASH, b"shard"),
            header_hash: Some(ContentHash::of(SHARD_HASH, b"header")),
            skipped: vec![],
            device: None,
        }
    }

    #[test]
    fn format_1_manifests_stay_readable_with_their_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest::new(test_header(4, 2), vec![entry(0), entry(1)]);
        let path = dir.path().join("manifest.json");
        let sha = files::sha256_hex(b"shard");
        std::fs::write(&path, as_format_1(&manifest, &[sha.clone(), sha.clone()])).unwrap();
        let old = Manifest::load(&path).unwrap();
        assert_eq!(old.header.format_version, 1);
        assert_eq!(old.shards[1].hash.to_string(), format!("sha256:{sha}"));
        assert_eq!(old.shards[1].header_hash, None);
        // An extraction with this version's settings into it names the format.
        let err = old
            .check_same_run(&path, &manifest.header, &manifest.fingerprint)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cache format 1") && err.contains("new --out"),
            "{err}"
        );

        // Format 2 must record the header hash; format 3 is from the future.
        let mut json = serde_json::to_value(&manifest).unwrap();
        json["shards"][0]
            .as_object_mut()
            .unwrap()
            .remove("header_hash");
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let err = Manifest::load(&path).unwrap_err().to_string();
        assert!(err.contains("header_hash"), "{err}");
        json["format_version"] = 3.into();
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let err = Manifest::load(&path).unwrap_err().to_string();
        assert!(err.contains("versions 1 to 2"), "{err}");
        // Both hashes, or neither, is not a shard entry.
        let mut json = serde_json::to_value(&manifest).unwrap();
        json["shards"][0]["sha256"] = sha.into();
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let err = format!("{:#}", Manifest::load(&path).unwrap_err());
        assert!(err.contains("exactly one of"), "{err}");
    }

    #[test]
    fn differences_name_the_changed_setting() {
        let a = test_header(3, 2);
        let mut b = a.clone();
        b.shard_rows = 4;
        b.backbone.id = "other".into();
        b.precision = Precision::Bf16;
        assert_eq!(
            a.differences(&b),
            vec![
                "backbone (--backbone, weights or preprocessing)",
                "--precision",
                "--shard-rows"
            ]
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }

    /// An f32 header serialises as before precisions existed (its fingerprint, which old caches
    /// carry, unchanged); another precision is written and read back.
    #[test]
    fn precision_is_written_only_when_not_f32() {
        let f32_header = test_header(3, 2);
        let json = serde_json::to_value(&f32_header).unwrap();
        assert!(json.get("precision").is_none(), "{json}");
        let mut without = json.clone();
        without.as_object_mut().unwrap().remove("precision");
        let read: CacheHeader = serde_json::from_value(without).unwrap();
        assert_eq!(read.precision, Precision::F32);
        let mut bf16 = f32_header.clone();
        bf16.precision = Precision::Bf16;
        let json = serde_json::to_value(&bf16).unwrap();
        assert_eq!(json["precision"], "bf16");
        assert_eq!(serde_json::from_value::<CacheHeader>(json).unwrap(), bf16);
        assert_ne!(bf16.fingerprint(), f32_header.fingerprint());
    }
}
