//! Multi-label evaluation on plain score matrices: F1 variants, average precision, per-label
//! tables, and decision thresholds (tuning on validation scores, the "at least one label" rule).
//!
//! Scores are row-major `[rows, labels]` slices of probabilities; targets are row-major slices of
//! anything implementing [`Target`] (`bool`, `u8`, or `f32` multi-hot). Definitions follow
//! scikit-learn with `zero_division=0`, except that mAP averages only over labels with at least
//! one positive. No candle here: the trainer hands over plain vectors.
//!
//! - [`f1`]: precision, recall, F1 from hard predictions (micro, macro, weighted, samples);
//! - [`ap`]: average precision per label, mAP, micro AP;
//! - [`thresholds`]: threshold tuning and application.

pub mod ap;
pub mod f1;
pub mod thresholds;

use serde::{Deserialize, Serialize};

pub use ap::{average_precision, mean_average_precision, micro_average_precision};
pub use f1::{Averages, Counts, Prf, averages, label_counts};
pub use thresholds::{TuneObjective, apply_thresholds, apply_thresholds_flat, tune_thresholds};

/// A target value: positive or not.
pub trait Target: Copy {
    fn is_positive(self) -> bool;
}

impl Target for bool {
    fn is_positive(self) -> bool {
        self
    }
}

impl Target for u8 {
    fn is_positive(self) -> bool {
        self != 0
    }
}

impl Target for f32 {
    /// Multi-hot 0.0 / 1.0 (anything >= 0.5 counts as positive).
    fn is_positive(self) -> bool {
        self >= 0.5
    }
}

fn to_bools<T: Target>(targets: &[T]) -> Vec<bool> {
    targets.iter().map(|t| t.is_positive()).collect()
}

/// Asserts that two row-major `[rows, labels]` matrices have the same, whole number of rows.
fn check_shape(left: usize, right: usize, labels: usize) {
    assert_eq!(
        left, right,
        "score/prediction and target matrices differ in size ({left} vs {right} values)"
    );
    check_rows(left, labels);
}

/// Asserts that `values` form whole rows of `labels`.
fn check_rows(values: usize, labels: usize) {
    assert!(
        if labels == 0 {
            values == 0
        } else {
            values % labels == 0
        },
        "{values} values do not form rows of {labels} labels"
    );
}

/// Column `j` of a row-major matrix with `labels` columns.
fn column<T: Copy>(matrix: &[T], labels: usize, j: usize) -> Vec<T> {
    matrix.iter().skip(j).step_by(labels).copied().collect()
}

/// The samples sharing one distinct score.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ScoreGroup {
    score: f32,
    positives: u64,
    count: u64,
}

/// Scores grouped by distinct value, highest first (ties are one group, as in scikit-learn).
fn score_groups(scores: &[f32], targets: &[bool]) -> Vec<ScoreGroup> {
    let mut pairs: Vec<(f32, bool)> = scores
        .iter()
        .copied()
        .zip(targets.iter().copied())
        .collect();
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut groups: Vec<ScoreGroup> = Vec::new();
    for (score, positive) in pairs {
        match groups.last_mut() {
            Some(group) if group.score == score => {
                group.positives += u64::from(positive);
                group.count += 1;
            }
            _ => groups.push(ScoreGroup {
                score,
                positives: u64::from(positive),
                count: 1,
            }),
        }
    }
    groups
}

/// Summary metrics of thresholded predictions and of the raw scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub rows: usize,
    pub labels: usize,
    /// Labels with at least one positive: those mAP averages over.
    pub labels_with_positives: usize,
    /// Micro, macro, weighted and samples precision / recall / F1 of the predictions.
    #[serde(flatten)]
    pub averages: Averages,
    /// Mean AP over labels with at least one positive (threshold-free).
    pub map: f64,
    /// AP over all (sample, label) pairs pooled (threshold-free); 0 without positives.
    pub micro_ap: f64,
}

/// One row of the per-label table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    pub label: usize,
    /// Number of positive targets.
    pub support: u64,
    /// Number of positive predictions.
    pub predicted: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// `None` without positives.
    pub average_precision: Option<f64>,
    pub threshold: f32,
}

impl Metrics {
    /// Metrics of `scores >= thresholds` (with the at-least-one rule if asked) and of the raw
    /// scores, against targets; all row-major `[rows, labels]` with `labels = thresholds.len()`.
    ///
    /// # Panics
    /// If the slices' lengths differ or are not a multiple of `thresholds.len()`.
    pub fn compute<T: Target>(
        scores: &[f32],
        targets: &[T],
        thresholds: &[f32],
        at_least_one: bool,
    ) -> Metrics {
        let labels = thresholds.len();
        check_shape(scores.len(), targets.len(), labels);
        let targets = to_bools(targets);
        let predictions = apply_thresholds_flat(scores, thresholds, at_least_one);
        let aps = ap::label_average_precisions(scores, &targets, labels);
        Metrics {
            rows: scores.len().checked_div(labels).unwrap_or(0),
            labels,
            labels_with_positives: aps.iter().flatten().count(),
            averages: averages(&predictions, &targets, labels),
            map: ap::mean_of_defined(&aps),
            micro_ap: micro_average_precision(scores, &targets).unwrap_or(0.0),
        }
    }
}

/// Per-label support, predictions, precision, recall, F1, AP and threshold, in label order.
///
/// # Panics
/// As [`Metrics::compute`].
pub fn per_label_table<T: Target>(
    scores: &[f32],
    targets: &[T],
    thresholds: &[f32],
    at_least_one: bool,
) -> Vec<LabelMetrics> {
    let labels = thresholds.len();
    check_shape(scores.len(), targets.len(), labels);
    let targets = to_bools(targets);
    let predictions = apply_thresholds_flat(scores, thresholds, at_least_one);
    let aps = ap::label_average_precisions(scores, &targets, labels);
    label_counts(&predictions, &targets, labels)
        .iter()
        .zip(aps)
        .zip(thresholds)
        .enumerate()
        .map(|(label, ((counts, average_precision), &threshold))| {
            let prf = counts.prf();
            LabelMetrics {
                label,
                support: counts.actual,
                predicted: counts.predicted,
                precision: prf.precision,
                recall: prf.recall,
                f1: prf.f1,
                average_precision,
                threshold,
            }
        })
        .collect()
}
