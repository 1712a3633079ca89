//! Using a trained checkpoint on a cache (refusing a cache from another backbone or with other
//! outputs): scoring rows, turning probabilities into label sets with the
//! tuned thresholds, and writing the competition's submission file (`ImageID,Labels`) and an
//! optional probabilities file.

use crate::cache::CacheReader;
use crate::cache::files::sha256_file;
use crate::data::Record;
use crate::data::labels::LabelVocab;
use crate::data::split::Split;
use crate::labelled::{Targets, labelled_records, rows_for_ids};
use crate::metrics::{self, LabelMetrics, Metrics};
use crate::model::Model;
use crate::train::checkpoint::{Checkpoint, CheckpointMeta};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which labelled rows `evaluate` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalPart {
    /// The split's validation ids (where the thresholds were tuned).
    Val,
    /// The split's training ids.
    Train,
    /// Rows of the cache listed in the dataset's `test_labels.csv` (`ImageID,Labels`).
    Test,
}

/// What `evaluate` scores; unset paths default to those recorded in the checkpoint.
#[derive(Debug, Clone)]
pub struct EvaluateRequest {
    pub checkpoint: PathBuf,
    pub cache: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub split: Option<PathBuf>,
    pub part: EvalPart,
    pub batch_size: usize,
    pub at_least_one: bool,
    pub device: Device,
}

/// Metrics of a checkpoint (at its tuned thresholds) on one part.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub meta: CheckpointMeta,
    pub cache: PathBuf,
    pub rows: usize,
    pub loss: f64,
    pub metrics: Metrics,
    pub per_label: Vec<LabelMetrics>,
}

/// Scores a checkpoint on the validation, training or test rows of a cache.
pub fn evaluate(request: &EvaluateRequest) -> Result<Evaluation> {
    let meta = Checkpoint::load_meta(&request.checkpoint)?;
    let cache = request
        .cache
        .clone()
        .unwrap_or_else(|| meta.cache_dir.clone());
    let data = request
        .data
        .clone()
        .unwrap_or_else(|| meta.data_dir.clone());
    let reader = CacheReader::open(&cache)?;
    let model = Model::load(&request.checkpoint, &request.device)?;
    model.ensure_compatible(&reader)?;
    let vocab = LabelVocab::from_ordered(model.card.labels.clone())?;
    let (records, rows) = match request.part {
        EvalPart::Val | EvalPart::Train => {
            let split_path = request
                .split
                .clone()
                .unwrap_or_else(|| meta.split.path.clone());
            if request.split.is_none() && sha256_file(&split_path)? != meta.split.sha256 {
                bail!(
                    "split {} changed since checkpoint {} was trained: pass --split explicitly",
                    split_path.display(),
                    model.card.name
                );
            }
            let split = Split::load(&split_path)?;
            let ids = match request.part {
                EvalPart::Val => &split.val,
                _ => &split.train,
            };
            let records = labelled_records(&data, &reader)?;
            let rows = rows_for_ids(&reader, ids, "split")?;
            (records, rows)
        }
        EvalPart::Test => {
            let path = data.join("test_labels.csv");
            let records = read_predictions(&path)?;
            let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            let rows = rows_for_ids(&reader, &ids, path.to_string_lossy().as_ref())?;
            (records, rows)
        }
    };
    let targets = Targets::from_records(
        reader.ids(),
        &records,
        &vocab,
        request.part == EvalPart::Test,
    )?;
    targets.ensure_labelled(&rows, reader.ids())?;
    let scores = model.score_rows(
        &reader,
        &rows,
        request.batch_size,
        &request.device,
        Some(&targets),
    )?;
    let truth = targets.rows(&rows);
    Ok(Evaluation {
        cache,
        rows: rows.len(),
        loss: scores.loss.unwrap_or(f64::NAN),
        metrics: Metrics::compute(
            &scores.probabilities,
            &truth,
            &model.card.thresholds,
            request.at_least_one,
        ),
        per_label: metrics::per_label_table(
            &scores.probabilities,
            &truth,
            &model.card.thresholds,
            request.at_least_one,
        ),
        meta,
    })
}

/// Predictions of a checkpoint for every row of a cache.
pub struct Predictions {
    pub ids: Vec<String>,
    pub labels: Vec<String>,
    /// `[ids, labels]` row-major.
    pub probabilities: Vec<f32>,
    pub decisions: Vec<bool>,
}

/// Scores every row of `reader`'s cache and applies the checkpoint's thresholds.
pub fn predict(
    model: &Model,
    reader: &CacheReader,
    batch_size: usize,
    at_least_one: bool,
    device: &Device,
) -> Result<Predictions> {
    let rows: Vec<usize> = (0..reader.len()).collect();
    let scores = model.score_rows(reader, &rows, batch_size, device, None)?;
    let decisions = model.decisions(&scores.probabilities, at_least_one);
    Ok(Predictions {
        ids: reader.ids().to_vec(),
        labels: model.card.labels.clone(),
        probabilities: scores.probabilities,
        decisions,
    })
}

/// Reads an `ImageID,Labels` file (a submission, or a test set's ground truth) as labelled
/// records without captions. Labels are space-separated; an empty field is an empty set.
pub fn read_predictions(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header))
            if header
                .trim_start_matches('\u{feff}')
                .trim()
                .eq_ignore_ascii_case("ImageID,Labels") => {}
        _ => bail!(
            "{}: line 1 must be the header `ImageID,Labels`",
            path.display()
        ),
    }
    let mut records = Vec::new();
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let Some((id, labels)) = line.split_once(',') else {
            bail!(
                "{} line {}: expected `ImageID,Labels`",
                path.display(),
                index + 1
            );
        };
        records.push(Record {
            id: id.trim().to_string(),
            labels: Some(labels.split_whitespace().map(str::to_string).collect()),
            caption: String::new(),
            line: index + 1,
        });
    }
    Ok(records)
}

/// Writes `ImageID,Labels`: one line per id, its predicted labels space-separated in vocabulary
/// order (`decisions` is `[ids, labels]` row-major).
pub fn write_predictions(
    path: &Path,
    ids: &[String],
    decisions: &[bool],
    labels: &[String],
) -> Result<()> {
    let k = labels.len();
    if decisions.len() != ids.len() * k {
        bail!(
            "{} decisions for {} ids x {k} labels",
            decisions.len(),
            ids.len()
        );
    }
    let mut out = String::from("ImageID,Labels\n");
    for (id, row) in ids.iter().zip(decisions.chunks(k.max(1))) {
        let chosen: Vec<&str> = labels
            .iter()
            .zip(row)
            .filter(|(_, on)| **on)
            .map(|(label, _)| label.as_str())
            .collect();
        out.push_str(&format!("{id},{}\n", chosen.join(" ")));
    }
    write_file(path, out.as_bytes())
}

/// Writes `ImageID,<label>,...` with one probability per label.
pub fn write_probabilities(
    path: &Path,
    ids: &[String],
    probabilities: &[f32],
    labels: &[String],
) -> Result<()> {
    let k = labels.len();
    if probabilities.len() != ids.len() * k {
        bail!(
            "{} probabilities for {} ids x {k} labels",
            probabilities.len(),
            ids.len()
        );
    }
    let mut out = format!("ImageID,{}\n", labels.join(","));
    for (id, row) in ids.iter().zip(probabilities.chunks(k.max(1))) {
        out.push_str(id);
        for p in row {
            out.push_str(&format!(",{p:.6}"));
        }
        out.push('\n');
    }
    write_file(path, out.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating folder {}", parent.display()))?;
    }
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}
