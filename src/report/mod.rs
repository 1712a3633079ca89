//! The run report of a checkpoint: `NAME.report.html` (charts a person reads in a browser) and
//! `NAME.metrics.json` (the same numbers for scripts), written beside the checkpoint.
//!
//! Everything comes from what the training run already computed: the checkpoint's sidecar
//! (history, thresholds, labels), the validation pass of the saved weights (per-label table,
//! precision-recall curve) and the label co-occurrence of the training rows.

mod html;

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::files::write_atomic;
use crate::metrics::{self, LabelMetrics, Metrics};
use crate::model::checkpoint::resolve;
use crate::train::checkpoint::{METRICS_EXTENSION, REPORT_EXTENSION};
use crate::train::history::EpochRecord;
use crate::train::run::TrainReport;

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

/// Writes `NAME.report.html` and `NAME.metrics.json` beside the checkpoint of a training run.
pub fn write(run: &TrainReport) -> Result<WrittenReport> {
    let data = report_data(run);
    let (weights, _) = resolve(&run.checkpoint);
    let html = weights.with_extension(REPORT_EXTENSION);
    write_atomic(&html, render_html(&data)?.as_bytes())?;
    let meta = &run.meta;
    let validation = &run.outcome.validation;
    let file = MetricsFile {
        checkpoint: &meta.model.name,
        part: "val",
        rows: validation.rows,
        loss: validation.loss,
        metrics: &validation.metrics,
        per_label: validation
            .per_label
            .iter()
            .map(|m| NamedLabelMetrics {
                name: meta.model.labels.get(m.label).map_or("?", String::as_str),
                metrics: m,
            })
            .collect(),
        history: &meta.history,
    };
    let metrics_json = weights.with_extension(METRICS_EXTENSION);
    write_atomic(
        &metrics_json,
        (serde_json::to_string_pretty(&file)? + "\n").as_bytes(),
    )?;
    Ok(WrittenReport {
        html,
        metrics_json,
        data,
    })
}

/// The report of a training run, on its validation rows.
fn report_data(run: &TrainReport) -> ReportData {
    let meta = &run.meta;
    let model = &meta.model;
    let validation = &run.outcome.validation;
    let m = &validation.metrics;
    let facts = vec![
        ("checkpoint".to_string(), model.name.clone()),
        ("backbone".to_string(), model.inputs.backbone.id.clone()),
        ("cache".to_string(), meta.cache_dir.display().to_string()),
        ("head".to_string(), model.head.kind.name().to_string()),
        ("loss".to_string(), model.loss.to_string()),
        (
            "split".to_string(),
            format!(
                "{} ({} validation rows scored)",
                meta.split.path.display(),
                validation.rows
            ),
        ),
        (
            "training".to_string(),
            format!(
                "lr {}, batch {}, seed {}, best epoch {}",
                meta.training.lr, meta.training.batch_size, model.seed, meta.best_epoch
            ),
        ),
    ];
    let truth: Vec<bool> = validation.truth.iter().map(|&t| t > 0.5).collect();
    ReportData {
        title: format!("multiclip run report: {}", model.name),
        facts,
        metrics: vec![
            ("micro-F1".into(), m.averages.micro.f1),
            ("macro-F1".into(), m.averages.macro_avg.f1),
            ("samples-F1".into(), m.averages.samples.f1),
            ("mAP".into(), m.map),
        ],
        history: meta.history.clone(),
        label_names: model.labels.clone(),
        per_label: validation.per_label.clone(),
        pr_curve: metrics::micro_precision_recall_curve(&validation.probabilities, &truth),
        cooccurrence: run.label_cooccurrence.conditional(),
    }
}
