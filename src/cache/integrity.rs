//! What is checked before a cache is trusted, shared by [`super::reader::CacheReader::open_with`]
//! (stage 2), `cache verify`, the resuming writer and `cache merge`, so that all of them report a
//! problem in the same words, each naming its file.
//!
//! The manifest is the reference: [`check_manifest`] checks that its shard list covers the
//! dataset's rows, [`check_shard`] checks one shard file against its entry: size, the
//! safetensors header (settings fingerprint, row range, tensor names, dtypes and shapes, stored
//! and skipped rows), the hash of the header (the row ids: a reader must never attach a row's
//! features to another id) and, at [`Integrity::Full`], the hash of the whole file.
//! Non-finite feature values are caught where rows are read ([`super::reader`]).

use super::layout::{MANIFEST_FILE, shard_file_name, shard_ranges};
use super::manifest::{CacheHeader, Manifest, ShardEntry};
use super::shard::ShardLayout;
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

/// How much of a cache is checked when it is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Integrity {
    /// Everything: sizes, headers, row ids and the content hash of every shard (every byte is
    /// read once; xxh3 keeps that near the cost of reading the files).
    #[default]
    Full,
    /// Everything but the content hash: only the shard headers are read. For a cache that was
    /// verified already, on storage where reading it all costs too much. A flipped feature byte
    /// goes unnoticed (non-finite values are still refused when rows are read).
    Headers,
}

/// A shard file that could be mapped and decoded (whether or not it has problems).
pub(crate) struct CheckedShard {
    pub mmap: Mmap,
    pub layout: ShardLayout,
}

/// Problems of the manifest in `dir` itself: its shard list against the dataset's rows.
pub(crate) fn check_manifest(dir: &Path, manifest: &Manifest) -> Vec<String> {
    let header = &manifest.header;
    let manifest_name = dir.join(MANIFEST_FILE).display().to_string();
    let mut problems = Vec::new();
    let ranges = shard_ranges(header.dataset.rows, header.shard_rows);
    if manifest.shards.len() != ranges.len() {
        problems.push(format!(
            "{manifest_name}: lists {} shards, {} rows in shards of {} need {}",
            manifest.shards.len(),
            header.dataset.rows,
            header.shard_rows,
            ranges.len()
        ));
    }
    for (position, entry) in manifest.shards.iter().enumerate() {
        let expected = ranges.get(position);
        if entry.index != position
            || entry.file != shard_file_name(position)
            || expected.is_none_or(|r| r.start != entry.start || r.end != entry.end)
        {
            problems.push(format!(
                "{manifest_name}: entry {position} ({}, rows {}..{}) is not shard {position} \
                 covering {:?}",
                entry.file, entry.start, entry.end, expected
            ));
        }
    }
    let stored: usize = manifest.shards.iter().map(|s| s.rows).sum();
    let skipped: usize = manifest.shards.iter().map(|s| s.skipped.len()).sum();
    if stored != manifest.stored_rows
        || skipped != manifest.skipped_rows
        || stored + skipped != header.dataset.rows
    {
        problems.push(format!(
            "{manifest_name}: {stored} stored + {skipped} skipped rows in the shards, the manifest \
             says {} + {} of {} dataset rows",
            manifest.stored_rows, manifest.skipped_rows, header.dataset.rows
        ));
    }
    problems
}

/// Checks the file of shard `entry` (of the extraction `header`, whose fingerprint is
/// `fingerprint`) in `dir` at level `integrity`. Returns the problems, each naming the file, and
/// the mapped shard whenever its header could be decoded.
pub(crate) fn check_shard(
    dir: &Path,
    header: &CacheHeader,
    fingerprint: &str,
    entry: &ShardEntry,
    integrity: Integrity,
) -> (Option<CheckedShard>, Vec<String>) {
    let path = dir.join(&entry.file);
    let name = path.display();
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return (None, vec![format!("{name}: cannot open: {e}")]),
    };
    // SAFETY: read-only map of a file that multiclip writes once and renames into place, never
    // modifies in place; a concurrent external modification is outside the contract.
    let mmap = match unsafe { Mmap::map(&file) } {
        Ok(m) => m,
        Err(e) => return (None, vec![format!("{name}: cannot memory-map: {e}")]),
    };
    let mut problems = Vec::new();
    if mmap.len() as u64 != entry.bytes {
        problems.push(format!(
            "{name}: {} bytes, the manifest says {} (truncated or replaced)",
            mmap.len(),
            entry.bytes
        ));
    }
    let layout = match ShardLayout::parse(&mmap, header, fingerprint, entry.index) {
        Ok(layout) => Some(layout),
        Err(e) => {
            problems.push(format!("{name}: {e:#}"));
            None
        }
    };
    if let Some(layout) = &layout {
        if layout.rows != entry.rows || layout.meta.skipped != entry.skipped {
            problems.push(format!(
                "{name}: holds {} rows and {} skipped, the manifest says {} and {}",
                layout.rows,
                layout.meta.skipped.len(),
                entry.rows,
                entry.skipped.len()
            ));
        }
        if let Some(expected) = &entry.header_hash
            && let Some(actual) = expected.mismatch(&mmap[..layout.header_len])
        {
            problems.push(format!(
                "{name}: the row ids or skipped rows in its header are not those the manifest \
                 recorded (header {actual}, the manifest says {expected}): its metadata was \
                 edited, or the file comes from another cache"
            ));
        }
    }
    if integrity == Integrity::Full
        && let Some(actual) = entry.hash.mismatch(&mmap)
    {
        problems.push(format!(
            "{name}: {} {} differs from the manifest's {} (the file was altered)",
            actual.algorithm.name(),
            actual.hex,
            entry.hash.hex
        ));
    }
    (layout.map(|layout| CheckedShard { mmap, layout }), problems)
}
