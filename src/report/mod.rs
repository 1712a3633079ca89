//! The run report of a checkpoint: `NAME.report.html` (charts a person reads in a browser) and
//! `NAME.metrics.json` (the same numbers for scripts), written beside the checkpoint.
//!
//! Everything comes from the checkpoint's sidecar (history, thresholds, labels) plus one scoring
//! pass over the validation rows (per-label table, precision-recall curve) and the training labels
//! of the split (co-occurrence).

mod html;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

use crate::data::{Dataset, LabelVocab, Part, Split};
use crate::heads::LabelCooccurrence;
use crate::metrics::{self, LabelMetrics, Metrics};
use crate::model::checkpoint::resolve;
use crate::predict::{EvalPart, EvaluateRequest, Evaluation, evaluate};
use crate::train::history::EpochRecord;

pub use html::{render_html, terminal_summary};

/// Everything a report shows.
#[derive(Clone, Debug, Default)]
pub struct ReportData {
    pub title: String,
    /// Facts about the run: checkpoint, cache, backbone, head, loss, split, best epoch ...
    pub facts: Vec<(String, String)>,
    /// Headline metrics (name, value), e.g. ("micro-F1", 0.83).
    pub metrics: Vec<(String, f64)>,
    /// Per-epoch records; the curves show the main stage (`train`).
    pub history: Vec<EpochRecord>,
    /// Label names, in vocabulary order.
    pub label_names: Vec<String>,
    /// One row per label, in vocabulary order.
    pub per_label: Vec<LabelMetrics>,
    /// Micro-averaged precision-recall curve as (recall, precision) points.
    pub pr_curve: Vec<(f64, f64)>,
    /// Conditional co-occurrence P(column | row) on the training labels, in vocabulary order.
    pub cooccurrence: Vec<Vec<f64>>,
}

/// Where a report went, and what it showed.
pub struct WrittenReport {
    pub html: PathBuf,
    pub metrics_json: PathBuf,
    pub data: ReportData,
}

/// `metrics.json`: the validation numbers of a checkpoint with label names.
#[derive(Serialize)]
struct MetricsFile<'a> {
    checkpoint: &'a str,
    part: &'a str,
    rows: usize,
    loss: f64,
    metrics: &'a Metrics,
    per_label: Vec<NamedLabelMetrics<'a>>,
    history: &'a [EpochRecord],
}

#[derive(Serialize)]
struct NamedLabelMetrics<'a> {
    name: &'a str,
    #[serde(flatten)]
    metrics: &'a LabelMetrics,
}

/// Scores `checkpoint` on its validation rows and writes `NAME.report.html` and
/// `NAME.metrics.json` beside it.
pub fn write_for_checkpoint(checkpoint: &Path, device: &Device) -> Result<WrittenReport> {
    let evaluation = evaluate(&EvaluateRequest {
        checkpoint: checkpoint.to_path_buf(),
        cache: None,
        data: None,
        split: None,
        part: EvalPart::Val,
        batch_size: 4096,
        at_least_one: true,
        device: device.clone(),
    })?;
    let data = report_data(&evaluation)?;
    let (weights, _) = resolve(checkpoint);
    let html = weights.with_extension("report.html");
    std::fs::write(&html, render_html(&data)?)
        .with_context(|| format!("writing {}", html.display()))?;
    let meta = &evaluation.meta;
    let file = MetricsFile {
        checkpoint: &meta.model.name,
        part: "val",
        rows: evaluation.rows,
        loss: evaluation.loss,
        metrics: &evaluation.metrics,
        per_label: evaluation
            .per_label
            .iter()
            .map(|m| NamedLabelMetrics {
                name: meta.model.labels.get(m.label).map_or("?", String::as_str),
                metrics: m,
            })
            .collect(),
        history: &meta.history,
    };
    let metrics_json = weights.with_extension("metrics.json");
    std::fs::write(&metrics_json, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", metrics_json.display()))?;
    Ok(WrittenReport {
        html,
        metrics_json,
        data,
    })
}

/// The report of one evaluation on the validation rows.
fn report_data(evaluation: &Evaluation) -> Result<ReportData> {
    let meta = &evaluation.meta;
    let m = &evaluation.metrics;
    let facts = vec![
        ("checkpoint".to_string(), meta.model.name.clone()),
        (
            "backbone".to_string(),
            meta.model.inputs.backbone.id.clone(),
        ),
        ("cache".to_string(), evaluation.cache.display().to_string()),
        ("head".to_string(), meta.model.head.kind().to_string()),
        ("loss".to_string(), meta.model.loss.to_string()),
        (
            "split".to_string(),
            format!(
                "{} ({} validation rows scored)",
                meta.split.path.display(),
                evaluation.rows
            ),
        ),
        (
            "training".to_string(),
            format!(
                "lr {}, batch {}, seed {}, best epoch {}",
                meta.training.lr, meta.training.batch_size, meta.model.seed, meta.best_epoch
            ),
        ),
    ];
    Ok(ReportData {
        title: format!("multiclip run report: {}", meta.model.name),
        facts,
        metrics: vec![
            ("micro-F1".into(), m.averages.micro.f1),
            ("macro-F1".into(), m.averages.macro_avg.f1),
            ("samples-F1".into(), m.averages.samples.f1),
            ("mAP".into(), m.map),
        ],
        history: meta.history.clone(),
        label_names: meta.model.labels.clone(),
        per_label: evaluation.per_label.clone(),
        pr_curve: metrics::micro_precision_recall_curve(
            &evaluation.probabilities,
            &evaluation.truth,
        ),
        cooccurrence: training_cooccurrence(&meta.data_dir, &meta.split.path, &meta.model.labels)?,
    })
}

/// P(label j | label i) over the training ids of the split.
fn training_cooccurrence(data: &Path, split: &Path, labels: &[String]) -> Result<Vec<Vec<f64>>> {
    let vocab = LabelVocab::from_ordered(labels.to_vec())?;
    let split = Split::load(split)?;
    let train: HashSet<&str> = split.train.iter().map(String::as_str).collect();
    let records = Dataset::open(data)?.records(Part::Train)?;
    let sets: Vec<Vec<usize>> = records
        .iter()
        .filter(|r| train.contains(r.id.as_str()))
        .map(|r| {
            r.labels
                .iter()
                .flatten()
                .filter_map(|l| vocab.index(l))
                .collect()
        })
        .collect();
    let counts = LabelCooccurrence::from_label_sets(sets.iter().map(Vec::as_slice), vocab.len())?;
    Ok(counts.conditional())
}
