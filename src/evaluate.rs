//! Metrics of a trained checkpoint (at its tuned thresholds) on labelled rows of a cache: the
//! split's validation or training ids, or the ids of the dataset's `test_labels.csv`.

use crate::cache::{CacheReader, Integrity};
use crate::data::labels::LabelVocab;
use crate::data::split::Split;
use crate::files::sha256_file;
use crate::labelled::{Targets, labelled_records, rows_for_ids};
use crate::metrics::{self, LabelMetrics, Metrics};
use crate::model::Model;
use crate::model::checkpoint::read_sidecar;
use crate::submission::read_predictions;
use crate::train::checkpoint::RunRecord;
use anyhow::{Result, bail};
use candle_core::Device;
use std::path::PathBuf;

/// Which labelled rows `evaluate` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalPart {
    /// The split's validation ids (where the thresholds were tuned).
    Val,
    /// The split's training ids.
    Train,
    /// Rows of the cache listed in the dataset's `test_labels.csv` (`ImageID,Labels`).
    Test,
}

impl EvalPart {
    pub const ALL: [EvalPart; 3] = [Self::Val, Self::Train, Self::Test];

    /// `val`, `train` or `test`, as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            EvalPart::Val => "val",
            EvalPart::Train => "train",
            EvalPart::Test => "test",
        }
    }
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
    /// How much of the cache is checked when it is opened.
    pub integrity: Integrity,
}

/// Metrics of a checkpoint (at its tuned thresholds) on one part.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The checkpoint's name and label vocabulary.
    pub name: String,
    pub labels: Vec<String>,
    pub cache: PathBuf,
    pub rows: usize,
    pub loss: f64,
    pub metrics: Metrics,
    pub per_label: Vec<LabelMetrics>,
}

/// Scores a checkpoint on the validation, training or test rows of a cache.
pub fn evaluate(request: &EvaluateRequest) -> Result<Evaluation> {
    let meta: RunRecord = read_sidecar(&request.checkpoint)?;
    let cache = request
        .cache
        .clone()
        .unwrap_or_else(|| meta.cache_dir.clone());
    let data = request
        .data
        .clone()
        .unwrap_or_else(|| meta.data_dir.clone());
    let reader = CacheReader::open_with(&cache, request.integrity)?;
    let model = Model::load(&request.checkpoint, &request.device)?;
    model.ensure_compatible(&reader)?;
    let vocab = LabelVocab::from_ordered(model.card.labels.clone())?;
    if request.part == EvalPart::Val && meta.fold.is_some_and(|f| f.trained_on_validation_ids()) {
        bail!(
            "{} was trained with k-fold over the split's training and validation ids, so its \
             validation rows are not held out: its out-of-fold metrics are in its sidecar and \
             report; evaluate it with --part test",
            model.card.name
        );
    }
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
            let (ids, side) = match request.part {
                EvalPart::Val => (&split.val, "validation"),
                _ => (&split.train, "training"),
            };
            let records = labelled_records(&data, &reader)?;
            let rows = rows_for_ids(&reader, ids, side)?;
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
        name: model.card.name,
        labels: model.card.labels,
    })
}
