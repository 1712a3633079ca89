//! The run report of a checkpoint: `NAME.report.html` (charts a person reads in a browser) and
//! `NAME.metrics.json` (the same numbers for scripts), written beside the checkpoint; for an
//! ensemble also its members' runs side by side. [`sweep`] renders a sweep's ranked table.
//!
//! Everything comes from what the training run already computed: the checkpoint's sidecar
//! (history, thresholds, labels, size), the validation pass of the saved weights (per-label table,
//! precision-recall curve, the error gallery) and the label co-occurrence of the training rows.
//! Only the gallery reads more: captions and images of the shown rows from the dataset folder.

pub mod gallery;
mod html;
pub mod sweep;

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::files::write_atomic;
use crate::heads::LabelCooccurrence;
use crate::metrics::{self, LabelMetrics, Metrics};
use crate::model::checkpoint::resolve;
use crate::train::Validation;
use crate::train::budget::HeadSize;
use crate::train::checkpoint::{METRICS_EXTENSION, REPORT_EXTENSION};
use crate::train::ensemble::{EnsembleReport, MemberRun, TunedOn};
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
    /// An ensemble's members, each with its own validation and curves.
    pub members: Vec<MemberRun>,
    /// The error gallery section (HTML), when the report has one.
    pub gallery: Option<String>,
}

/// Where a report went, and what it showed.
pub struct WrittenReport {
    pub html: PathBuf,
    pub metrics_json: PathBuf,
    pub data: ReportData,
}

/// `NAME.metrics.json`: the validation numbers of a checkpoint with label names, for scripts
/// (and the ranking of a sweep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    pub checkpoint: String,
    /// `val` (the split's validation rows) or `out-of-fold`.
    pub part: String,
    pub rows: usize,
    pub loss: f64,
    pub metrics: Metrics,
    pub per_label: Vec<NamedLabelMetrics>,
    pub history: Vec<EpochRecord>,
    /// All members together for an ensemble (0 in files written before sizes were recorded).
    #[serde(default)]
    pub size: HeadSize,
    /// An ensemble's members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberRun>,
}

impl RunMetrics {
    /// Wall-clock seconds of training (every member's, for an ensemble).
    pub fn seconds(&self) -> f64 {
        let epochs = |h: &[EpochRecord]| h.iter().map(|e| e.seconds).sum::<f64>();
        epochs(&self.history) + self.members.iter().map(|m| epochs(&m.history)).sum::<f64>()
    }
}

/// One label's row of [`RunMetrics::per_label`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedLabelMetrics {
    pub name: String,
    #[serde(flatten)]
    pub metrics: LabelMetrics,
}

/// Writes `NAME.report.html` and `NAME.metrics.json` beside the checkpoint of a training run.
pub fn write(run: &TrainReport) -> Result<WrittenReport> {
    let meta = &run.meta;
    let model = &meta.model;
    let validation = &run.outcome.validation;
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
        ("size".to_string(), meta.size.describe()),
    ];
    let shown = Shown {
        checkpoint: &run.checkpoint,
        name: &model.name,
        part: "val",
        labels: &model.labels,
        validation,
        ids: &run.val_ids,
        data_dir: &meta.data_dir,
        cooccurrence: &run.label_cooccurrence,
        history: &meta.history,
        size: meta.size,
        members: &[],
    };
    write_shown(&shown, facts)
}

/// Writes `NAME.report.html` and `NAME.metrics.json` beside an ensemble's sidecar: its metrics
/// where its thresholds were tuned (or on held-out validation rows), and its members' runs.
pub fn write_ensemble(run: &EnsembleReport) -> Result<WrittenReport> {
    let meta = &run.meta;
    let card = &meta.card;
    let made = match (&meta.fold, meta.tuned_on) {
        (Some(fold), _) => format!(
            "{} folds of the split's {} ids (seed {}), thresholds tuned out of fold",
            fold.count,
            if fold.trained_on_validation_ids() {
                "training and validation"
            } else {
                "training"
            },
            fold.seed
        ),
        (None, TunedOn::Validation) => format!(
            "the mean of {} checkpoints, thresholds tuned on the split's validation rows",
            card.members.len()
        ),
        (None, TunedOn::OutOfFold) => "thresholds tuned out of fold".to_string(),
    };
    let mut facts = vec![
        ("ensemble".to_string(), card.name.clone()),
        ("backbone".to_string(), card.inputs.backbone.id.clone()),
        ("cache".to_string(), meta.cache_dir.display().to_string()),
        ("members".to_string(), made),
        (
            "split".to_string(),
            format!(
                "{} ({} {} rows shown)",
                meta.split.path.display(),
                run.shown.rows,
                run.shown_part
            ),
        ),
        (
            "size".to_string(),
            format!("{} (all members)", meta.size.describe()),
        ),
    ];
    if meta.held_out.is_some() {
        facts.push((
            "out-of-fold".to_string(),
            format!(
                "micro-F1 {:.4}, mAP {:.4} on {} rows (where the thresholds were tuned)",
                meta.metrics.averages.micro.f1, meta.metrics.map, meta.metrics.rows
            ),
        ));
    }
    let shown = Shown {
        checkpoint: &run.checkpoint,
        name: &card.name,
        part: &run.shown_part,
        labels: &card.labels,
        validation: &run.shown,
        ids: &run.shown_ids,
        data_dir: &meta.data_dir,
        cooccurrence: &run.label_cooccurrence,
        history: &[],
        size: meta.size,
        members: &meta.member_runs,
    };
    write_shown(&shown, facts)
}

/// `s` with the characters HTML gives a meaning escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What a report shows: a checkpoint's scored rows and its record.
struct Shown<'a> {
    checkpoint: &'a Path,
    name: &'a str,
    part: &'a str,
    labels: &'a [String],
    validation: &'a Validation,
    ids: &'a [String],
    data_dir: &'a Path,
    cooccurrence: &'a LabelCooccurrence,
    history: &'a [EpochRecord],
    size: HeadSize,
    members: &'a [MemberRun],
}

fn write_shown(shown: &Shown, facts: Vec<(String, String)>) -> Result<WrittenReport> {
    let validation = shown.validation;
    let m = &validation.metrics;
    let truth: Vec<bool> = validation.truth.iter().map(|&t| t > 0.5).collect();
    let gallery = gallery::section(&gallery::GalleryInput {
        data_dir: shown.data_dir,
        ids: shown.ids,
        probabilities: &validation.probabilities,
        truth: &validation.truth,
        thresholds: &validation.thresholds,
        labels: shown.labels,
    });
    let data = ReportData {
        title: format!("multiclip run report: {}", shown.name),
        facts,
        metrics: vec![
            ("micro-F1".into(), m.averages.micro.f1),
            ("macro-F1".into(), m.averages.macro_avg.f1),
            ("samples-F1".into(), m.averages.samples.f1),
            ("mAP".into(), m.map),
        ],
        history: shown.history.to_vec(),
        label_names: shown.labels.to_vec(),
        per_label: validation.per_label.clone(),
        pr_curve: metrics::micro_precision_recall_curve(&validation.probabilities, &truth),
        cooccurrence: shown.cooccurrence.conditional(),
        members: shown.members.to_vec(),
        gallery: Some(gallery),
    };
    let (weights, _) = resolve(shown.checkpoint);
    let html = weights.with_extension(REPORT_EXTENSION);
    write_atomic(&html, render_html(&data)?.as_bytes())?;
    let file = RunMetrics {
        checkpoint: shown.name.to_string(),
        part: shown.part.to_string(),
        rows: validation.rows,
        loss: validation.loss,
        metrics: validation.metrics.clone(),
        per_label: validation
            .per_label
            .iter()
            .map(|m| NamedLabelMetrics {
                name: shown
                    .labels
                    .get(m.label)
                    .map_or("?", String::as_str)
                    .to_string(),
                metrics: m.clone(),
            })
            .collect(),
        history: shown.history.to_vec(),
        size: shown.size,
        members: shown.members.to_vec(),
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
