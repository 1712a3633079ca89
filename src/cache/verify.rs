//! `cache verify`: the full check of [`super::integrity`] on every shard (sizes, headers, row
//! ids, content hashes) plus the manifest's dataset against the dataset itself, when given.
//! Every problem names the file it is about; nothing stops at the first one.

use super::integrity::{Integrity, check_manifest, check_shard};
use super::label_names;
use super::layout::{MANIFEST_FILE, PARTS_DIR, parse_shard_file_name};
use super::manifest::{DatasetFingerprint, Manifest};
use crate::files;
use anyhow::Result;
use rayon::prelude::*;
use std::fs;
use std::path::Path;

/// The dataset a cache claims to cover, as read from the data directory now.
pub struct DatasetRows {
    pub fingerprint: DatasetFingerprint,
    /// Ids of the selected rows in order (stored and skipped).
    pub ids: Vec<String>,
}

/// Outcome of [`verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub shards_checked: usize,
    pub bytes_checked: u64,
    /// Failures: each names the file (and row) it is about.
    pub problems: Vec<String>,
    /// Things that do not make the cache wrong (stray temporary files, unmerged parts).
    pub warnings: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the cache in `dir`. Fails (`Err`) only when the manifest itself cannot be read;
/// everything else is collected in the report.
pub fn verify(dir: &Path, dataset: Option<&DatasetRows>) -> Result<VerifyReport> {
    let manifest = Manifest::load_dir(dir)?;
    let header = &manifest.header;
    let manifest_name = dir.join(MANIFEST_FILE).display().to_string();
    let mut report = VerifyReport {
        problems: check_manifest(dir, &manifest),
        ..VerifyReport::default()
    };
    report
        .problems
        .extend(label_names::check(dir, &manifest.fingerprint));
    let stored: usize = manifest.shards.iter().map(|s| s.rows).sum();

    let results: Vec<(u64, Vec<String>, Vec<String>)> = manifest
        .shards
        .par_iter()
        .map(|entry| {
            let (shard, problems) =
                check_shard(dir, header, &manifest.fingerprint, entry, Integrity::Full);
            match shard {
                Some(shard) => (shard.mmap.len() as u64, problems, shard.layout.meta.ids),
                None => (0, problems, Vec::new()),
            }
        })
        .collect();
    let mut stored_ids = Vec::with_capacity(stored);
    for (entry, (bytes, problems, ids)) in manifest.shards.iter().zip(results) {
        report.shards_checked += 1;
        report.bytes_checked += bytes;
        report.problems.extend(problems);
        // Dataset order: stored ids interleaved with the skipped rows at their positions.
        let mut ids = ids.into_iter();
        let mut skips = entry.skipped.iter().peekable();
        for position in entry.start..entry.end {
            match skips.peek() {
                Some(s) if s.row == position => stored_ids.push(skips.next().map(|s| s.id.clone())),
                _ => stored_ids.push(ids.next()),
            }
        }
    }

    if let Some(dataset) = dataset {
        if dataset.fingerprint != header.dataset {
            report.problems.push(format!(
                "{manifest_name}: dataset differs from the data directory (manifest: part {} with \
                 {} rows, csv {}; data: part {} with {} rows, csv {})",
                header.dataset.selection,
                header.dataset.rows,
                describe_parts(&header.dataset),
                dataset.fingerprint.selection,
                dataset.fingerprint.rows,
                describe_parts(&dataset.fingerprint)
            ));
        }
        let mismatches: Vec<String> = dataset
            .ids
            .iter()
            .zip(&stored_ids)
            .enumerate()
            .filter(|(_, (want, got))| got.as_ref() != Some(*want))
            .take(5)
            .map(|(row, (want, got))| format!("row {row}: dataset {want:?}, cache {got:?}"))
            .collect();
        if !mismatches.is_empty() || dataset.ids.len() != stored_ids.len() {
            report.problems.push(format!(
                "{manifest_name}: row ids differ from the dataset ({} dataset rows, {} in the \
                 cache){}{}",
                dataset.ids.len(),
                stored_ids.len(),
                if mismatches.is_empty() {
                    ""
                } else {
                    "; first differences: "
                },
                mismatches.join("; ")
            ));
        }
    }

    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if files::is_temp_file_name(&name) {
            report.warnings.push(format!(
                "{}: stray temporary file of an interrupted write",
                entry.path().display()
            ));
        } else if parse_shard_file_name(&name).is_some()
            && !manifest.shards.iter().any(|s| s.file == name)
        {
            report.warnings.push(format!(
                "{}: shard file not listed in the manifest",
                entry.path().display()
            ));
        }
    }
    if dir.join(PARTS_DIR).exists() {
        report.warnings.push(format!(
            "{}: worker parts left over (run `multiclip cache merge {}`)",
            dir.join(PARTS_DIR).display(),
            dir.display()
        ));
    }
    Ok(report)
}

fn describe_parts(dataset: &DatasetFingerprint) -> String {
    dataset
        .parts
        .iter()
        .map(|p| {
            format!(
                "{} sha256 {} ({} rows)",
                p.file,
                &p.sha256[..p.sha256.len().min(12)],
                p.rows
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::WorkerSlot;
    use crate::cache::manifest::tests::test_header;
    use crate::cache::writer::tests::write_synthetic;

    fn cache() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_synthetic(
            dir.path(),
            &test_header(10, 4),
            WorkerSlot::SINGLE,
            &[5],
            None,
        )
        .finish()
        .unwrap();
        dir
    }

    fn dataset(rows: usize) -> DatasetRows {
        DatasetRows {
            fingerprint: test_header(rows, 4).dataset,
            ids: (0..rows).map(|r| format!("{r}.jpg")).collect(),
        }
    }

    #[test]
    fn a_good_cache_verifies_against_its_dataset() {
        let dir = cache();
        let report = verify(dir.path(), Some(&dataset(10))).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.shards_checked, 3);
        assert!(report.warnings.is_empty());
    }

    #[test]
    fn truncated_and_altered_shards_are_named() {
        let dir = cache();
        let truncated = dir.path().join("shard-00000.safetensors");
        let bytes = fs::read(&truncated).unwrap();
        fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let altered = dir.path().join("shard-00002.safetensors");
        let mut bytes = fs::read(&altered).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&altered, &bytes).unwrap();
        let report = verify(dir.path(), None).unwrap();
        assert!(!report.is_ok());
        let all = report.problems.join("\n");
        assert!(
            all.contains("shard-00000.safetensors") && all.contains("truncated"),
            "{all}"
        );
        assert!(
            all.contains("shard-00002.safetensors") && all.contains("altered"),
            "{all}"
        );
        assert!(!all.contains("shard-00001"), "{all}");
    }

    #[test]
    fn a_different_dataset_is_reported() {
        let dir = cache();
        let mut other = dataset(10);
        other.ids[7] = "x.jpg".into();
        let report = verify(dir.path(), Some(&other)).unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains("row 7")),
            "{:?}",
            report.problems
        );
        let report = verify(dir.path(), Some(&dataset(11))).unwrap();
        assert!(!report.is_ok());
    }
}
