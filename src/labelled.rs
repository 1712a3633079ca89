//! Labelled cache rows, for training and evaluation: the labelled records of a dataset's
//! `train.csv` (checked against the csv the cache was extracted from), the cache rows of a list of
//! ids (rows skipped at extraction left out, and said so), and the multi-hot targets of cache rows
//! (labels from the csv, features from the cache, joined by image id).

use crate::cache::{CacheReader, SkippedRow};
use crate::data::labels::LabelVocab;
use crate::data::{Dataset, Part, Record};
use crate::files::sha256_file;
use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The labelled rows of `data`'s `train.csv`, checked against the csv the cache was built from.
pub fn labelled_records(data: &Path, reader: &CacheReader) -> Result<Vec<Record>> {
    let dataset = Dataset::open(data)?;
    let csv = dataset.csv_path(Part::Train);
    let recorded = reader
        .manifest()
        .header
        .dataset
        .parts
        .iter()
        .find(|p| p.part == Part::Train.name());
    if let Some(part) = recorded {
        let actual = sha256_file(&csv)?;
        if actual != part.sha256 {
            bail!(
                "{} differs from the train.csv cache {} was extracted from (sha256 {} vs {}): \
                 pass the dataset folder the cache was made from with --data",
                csv.display(),
                reader.dir().display(),
                &actual[..12],
                &part.sha256[..part.sha256.len().min(12)]
            );
        }
    }
    dataset.records(Part::Train)
}

/// The cache rows of `ids` (e.g. one side of a split; `what` names them: "training"). An id the
/// cache recorded as skipped at extraction (`extract --on-error skip`: an unreadable image) is
/// left out, with a warning that says how many, which and why; an id the cache does not know is
/// an error.
pub fn rows_for_ids(reader: &CacheReader, ids: &[String], what: &str) -> Result<Vec<usize>> {
    let skipped: HashMap<&str, &SkippedRow> = reader
        .manifest()
        .skipped()
        .map(|s| (s.id.as_str(), s))
        .collect();
    let mut rows = Vec::with_capacity(ids.len());
    let mut left_out = Vec::new();
    for id in ids {
        match (reader.index_of(id), skipped.get(id.as_str())) {
            (Some(row), _) => rows.push(row),
            (None, Some(s)) => left_out.push(*s),
            (None, None) => bail!(
                "{what} id `{id}` is not in cache {} ({} rows): was the cache extracted from \
                 another dataset or split?",
                reader.dir().display(),
                reader.len()
            ),
        }
    }
    if !left_out.is_empty() {
        tracing::warn!(
            "{} {what} ids (of {}) were skipped at extraction and are left out: {}",
            left_out.len(),
            ids.len(),
            describe_skipped(&left_out, reader.dir())
        );
    }
    Ok(rows)
}

/// Skipped rows listed in messages; `cache info --skipped 0` lists all.
const SKIPPED_SHOWN: usize = 10;

/// `id (reason), ...` for the first skipped rows of the cache in `dir`, then how many more and
/// where to see them all.
pub fn describe_skipped(rows: &[&SkippedRow], dir: &Path) -> String {
    let mut text = rows
        .iter()
        .take(SKIPPED_SHOWN)
        .map(|s| format!("{} ({})", s.id, s.reason.trim_end()))
        .collect::<Vec<_>>()
        .join(", ");
    if rows.len() > SKIPPED_SHOWN {
        text.push_str(&format!(
            " and {} more (`multiclip cache info {} --skipped 0` lists all)",
            rows.len() - SKIPPED_SHOWN,
            dir.display()
        ));
    }
    text
}

/// One multi-hot vector of `num_labels` per cache row; rows without labels (test rows) are
/// marked and refused when a batch asks for them.
#[derive(Debug, Clone)]
pub struct Targets {
    num_labels: usize,
    /// `[rows, num_labels]` row-major, 0.0 / 1.0.
    values: Vec<f32>,
    labelled: Vec<bool>,
}

impl Targets {
    /// `labels[row]` holds the label indices of cache row `row` (`None`: unlabelled).
    pub fn new(num_labels: usize, labels: &[Option<Vec<usize>>]) -> Result<Self> {
        let mut values = vec![0f32; labels.len() * num_labels];
        let mut labelled = Vec::with_capacity(labels.len());
        for (row, set) in labels.iter().enumerate() {
            labelled.push(set.is_some());
            for &label in set.iter().flatten() {
                if label >= num_labels {
                    bail!(
                        "cache row {row} has label index {label}, but there are {num_labels} labels"
                    );
                }
                values[row * num_labels + label] = 1.0;
            }
        }
        Ok(Self {
            num_labels,
            values,
            labelled,
        })
    }

    /// Targets of the cache rows with ids `ids` from the `records` of a labelled csv: a row is
    /// labelled when its id has a record with labels. Labels outside `vocab` are an error, or,
    /// with `drop_unknown` (scoring a test set), dropped with a warning.
    pub fn from_records(
        ids: &[String],
        records: &[Record],
        vocab: &LabelVocab,
        drop_unknown: bool,
    ) -> Result<Self> {
        let by_id: HashMap<&str, &Record> = records.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut dropped = 0usize;
        let mut sets = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(labels) = by_id.get(id.as_str()).and_then(|r| r.labels.as_ref()) else {
                sets.push(None);
                continue;
            };
            let mut set = Vec::with_capacity(labels.len());
            for label in labels {
                match vocab.index(label) {
                    Some(index) => set.push(index),
                    None if drop_unknown => dropped += 1,
                    None => bail!(
                        "row `{id}` has label `{label}`, which is not in the vocabulary ({})",
                        vocab.names().join(" ")
                    ),
                }
            }
            sets.push(Some(set));
        }
        if dropped > 0 {
            tracing::warn!(
                "{dropped} label occurrences are not in the checkpoint's vocabulary and were \
                 ignored by the metrics"
            );
        }
        Self::new(vocab.len(), &sets)
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Fails naming the first row of `rows` that has no labels.
    pub fn ensure_labelled(&self, rows: &[usize], ids: &[String]) -> Result<()> {
        if let Some(&row) = rows
            .iter()
            .find(|&&r| !self.labelled.get(r).copied().unwrap_or(false))
        {
            let id = ids.get(row).map(String::as_str).unwrap_or("?");
            bail!(
                "cache row {row} (id {id}) has no labels in the dataset csv: training and \
                 validation ids must come from train.csv"
            );
        }
        Ok(())
    }

    /// The multi-hot vectors of `rows`, concatenated (`[rows.len() * num_labels]`).
    pub fn rows(&self, rows: &[usize]) -> Vec<f32> {
        let k = self.num_labels;
        let mut out = Vec::with_capacity(rows.len() * k);
        for &row in rows {
            out.extend_from_slice(&self.values[row * k..(row + 1) * k]);
        }
        out
    }

    /// `[rows.len(), num_labels]` f32 tensor of the multi-hot vectors of `rows`.
    pub fn gather(&self, rows: &[usize], device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.rows(rows),
            (rows.len(), self.num_labels),
            device,
        )?)
    }

    /// The label indices of each row of `rows` (for the label co-occurrence graph).
    pub fn label_sets(&self, rows: &[usize]) -> Vec<Vec<usize>> {
        let k = self.num_labels;
        rows.iter()
            .map(|&row| (0..k).filter(|&j| self.values[row * k + j] > 0.5).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_multi_hot_rows_and_refuses_unlabelled_ones() {
        let t = Targets::new(3, &[Some(vec![0, 2]), None, Some(vec![1])]).unwrap();
        let y = t.gather(&[2, 0], &Device::Cpu).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 1.0]]
        );
        assert_eq!(t.label_sets(&[0, 2]), vec![vec![0, 2], vec![1]]);
        let ids: Vec<String> = ["a.jpg", "b.jpg", "c.jpg"].map(String::from).to_vec();
        t.ensure_labelled(&[0, 2], &ids).unwrap();
        let err = t.ensure_labelled(&[0, 1], &ids).unwrap_err().to_string();
        assert!(err.contains("b.jpg"), "{err}");
        assert!(Targets::new(2, &[Some(vec![2])]).is_err());
    }
}
