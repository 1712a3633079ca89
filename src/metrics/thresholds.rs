//! Per-label decision thresholds: tuning on validation probabilities, and applying them with the
//! "at least one label per sample" rule.
//!
//! Tuning is exact, not a grid search. For one label, sort its scores; any threshold between two
//! consecutive distinct scores gives the same predictions, so the candidates are one threshold per
//! gap (the midpoint, in f64 then rounded so that it still separates the two scores), plus one above
//! the highest score (predict nothing). Only thresholds in the open interval (0, 1) are considered.
//! F1 values are compared as exact fractions of counts, so ties are real ties; among tied
//! candidates the one closest to 0.5 wins (then the higher one), a prior for calibrated
//! probabilities that also makes the result deterministic.
//!
//! Predictions are `score >= threshold`.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::{ScoreGroup, Target, check_rows, check_shape, column, score_groups, to_bools};

/// The threshold of labels without any information (no candidates at all).
const NEUTRAL_THRESHOLD: f32 = 0.5;

/// What threshold tuning maximises on the validation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "objective", rename_all = "snake_case")]
pub enum TuneObjective {
    /// Each label's own F1, independently (also maximises macro-F1).
    LabelF1,
    /// Micro-F1: start from the better (by micro-F1) of the per-label optimum and the best single
    /// threshold shared by all labels, then up to `passes` rounds of coordinate ascent, each label
    /// in turn taking its exact best threshold given the others. Micro-F1 never decreases, so the
    /// result is at least as good as any shared threshold, 0.5 included.
    MicroF1 { passes: usize },
}

impl Default for TuneObjective {
    fn default() -> Self {
        TuneObjective::MicroF1 { passes: 3 }
    }
}

/// One candidate threshold of a label and the predictions it makes.
#[derive(Debug, Clone, Copy)]
struct Cut {
    threshold: f32,
    true_positives: u64,
    predicted: u64,
}

/// The candidate thresholds of scores grouped by distinct value in descending order, highest
/// threshold first. Cut `c` predicts the `c` highest groups.
fn cuts(groups: &[ScoreGroup]) -> Vec<Cut> {
    let mut cuts = Vec::with_capacity(groups.len() + 1);
    let (mut true_positives, mut predicted) = (0, 0);
    for c in 0..=groups.len() {
        // Predict groups[..c]: the threshold must be > the next score and <= the last included.
        let upper = c.checked_sub(1).map_or(1.0, |i| groups[i].score);
        let lower = groups.get(c).map_or(0.0, |g| g.score.max(0.0));
        if lower < upper {
            let mut threshold = ((f64::from(lower) + f64::from(upper)) / 2.0) as f32;
            if threshold <= lower {
                threshold = upper;
            }
            if threshold > 0.0 && threshold < 1.0 {
                cuts.push(Cut {
                    threshold,
                    true_positives,
                    predicted,
                });
            }
        }
        if let Some(group) = groups.get(c) {
            true_positives += group.positives;
            predicted += group.count;
        }
    }
    cuts
}

/// An F1 value as an exact fraction `2 tp / (predicted + actual)`; 0 when the denominator is 0.
#[derive(Debug, Clone, Copy)]
struct F1Fraction {
    numerator: u64,
    denominator: u64,
}

impl F1Fraction {
    /// F1 when `extra_tp` and `extra_predicted` are added to a base of `base_tp` true positives and
    /// `base_denominator` = predicted + actual positives.
    fn with(base_tp: u64, base_denominator: u64, extra_tp: u64, extra_predicted: u64) -> Self {
        F1Fraction {
            numerator: 2 * (base_tp + extra_tp),
            denominator: base_denominator + extra_predicted,
        }
    }

    fn cmp(&self, other: &F1Fraction) -> Ordering {
        let value = |f: &F1Fraction| {
            if f.denominator == 0 {
                (0u128, 1u128)
            } else {
                (u128::from(f.numerator), u128::from(f.denominator))
            }
        };
        let ((a, b), (c, d)) = (value(self), value(other));
        (a * d).cmp(&(c * b))
    }
}

/// The cut with the highest F1 over a base (see [`F1Fraction::with`]), ties to the threshold
/// closest to 0.5, then to the higher threshold.
fn best_cut(cuts: &[Cut], base_tp: u64, base_denominator: u64) -> Option<(Cut, F1Fraction)> {
    let score =
        |cut: &Cut| F1Fraction::with(base_tp, base_denominator, cut.true_positives, cut.predicted);
    cuts.iter()
        .map(|cut| (*cut, score(cut)))
        .max_by(|(a, fa), (b, fb)| {
            fa.cmp(fb)
                .then_with(|| {
                    let distance = |c: &Cut| (c.threshold - NEUTRAL_THRESHOLD).abs();
                    distance(b).total_cmp(&distance(a))
                })
                .then_with(|| a.threshold.total_cmp(&b.threshold))
        })
}

/// (true positives, predicted) of a label's groups at a threshold.
fn counts_at(groups: &[ScoreGroup], threshold: f32) -> (u64, u64) {
    groups
        .iter()
        .take_while(|g| g.score >= threshold)
        .fold((0, 0), |(tp, predicted), g| {
            (tp + g.positives, predicted + g.count)
        })
}

/// Tunes one threshold per label on validation probabilities, row-major `[rows, labels]`.
///
/// Labels without validation positives get the best single threshold shared by all labels (by
/// micro-F1), not their own "never predict" optimum, and keep it during the micro-F1 passes: their
/// validation data says nothing about where their positives lie. Every threshold is in (0, 1) (0.5
/// when no candidate exists, e.g. without rows). Deterministic.
///
/// # Panics
/// If the slices' lengths differ or are not a multiple of `labels`.
pub fn tune_thresholds<T: Target>(
    scores: &[f32],
    targets: &[T],
    labels: usize,
    objective: TuneObjective,
) -> Vec<f32> {
    check_shape(scores.len(), targets.len(), labels);
    let targets = to_bools(targets);
    let groups: Vec<Vec<ScoreGroup>> = (0..labels)
        .map(|j| score_groups(&column(scores, labels, j), &column(&targets, labels, j)))
        .collect();
    let sweeps: Vec<Vec<Cut>> = groups.iter().map(|g| cuts(g)).collect();
    let positives: Vec<u64> = groups
        .iter()
        .map(|g| g.iter().map(|group| group.positives).sum())
        .collect();
    let all_positives: u64 = positives.iter().sum();
    let shared = best_cut(&cuts(&score_groups(scores, &targets)), 0, all_positives)
        .map_or(NEUTRAL_THRESHOLD, |(cut, _)| cut.threshold);

    let per_label: Vec<f32> = sweeps
        .iter()
        .zip(&positives)
        .map(|(sweep, &p)| match best_cut(sweep, 0, p) {
            Some((cut, _)) if p > 0 => cut.threshold,
            _ => shared,
        })
        .collect();
    let TuneObjective::MicroF1 { passes } = objective else {
        return per_label;
    };

    let micro = |thresholds: &[f32]| {
        let counts: Vec<(u64, u64)> = groups
            .iter()
            .zip(thresholds)
            .map(|(g, &t)| counts_at(g, t))
            .collect();
        let (tp, predicted) = counts.iter().fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        (F1Fraction::with(tp, all_positives, 0, predicted), counts)
    };
    let (per_label_f1, per_label_counts) = micro(&per_label);
    let (shared_f1, shared_counts) = micro(&vec![shared; labels]);
    let (mut thresholds, mut counts) = if shared_f1.cmp(&per_label_f1) == Ordering::Greater {
        (vec![shared; labels], shared_counts)
    } else {
        (per_label, per_label_counts)
    };

    let (mut total_tp, mut total_predicted) =
        counts.iter().fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    for _ in 0..passes {
        let mut changed = false;
        for j in (0..labels).filter(|&j| positives[j] > 0) {
            let (tp, predicted) = counts[j];
            let base_tp = total_tp - tp;
            let base_denominator = total_predicted - predicted + all_positives;
            let current = F1Fraction::with(base_tp, base_denominator, tp, predicted);
            if let Some((cut, f1)) = best_cut(&sweeps[j], base_tp, base_denominator)
                && f1.cmp(&current) == Ordering::Greater
            {
                thresholds[j] = cut.threshold;
                counts[j] = (cut.true_positives, cut.predicted);
                total_tp = base_tp + cut.true_positives;
                total_predicted = total_predicted - predicted + cut.predicted;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    thresholds
}

/// Row-major `[rows, labels]` predictions `score >= threshold`, `labels = thresholds.len()`.
///
/// With `at_least_one`, a sample with no label passing gets the one label with the highest
/// `score - threshold` (the smallest shortfall in probability; the first such label on ties). A
/// difference rather than a ratio: the scores are probabilities, and a ratio would favour labels
/// with tiny thresholds.
///
/// # Panics
/// If `scores.len()` is not a multiple of `thresholds.len()`.
pub fn apply_thresholds_flat(scores: &[f32], thresholds: &[f32], at_least_one: bool) -> Vec<bool> {
    let labels = thresholds.len();
    check_rows(scores.len(), labels);
    let mut predictions: Vec<bool> = scores
        .iter()
        .zip(thresholds.iter().cycle())
        .map(|(s, t)| s >= t)
        .collect();
    if at_least_one && labels > 0 {
        for (row_scores, row) in scores.chunks(labels).zip(predictions.chunks_mut(labels)) {
            if row.iter().any(|&p| p) {
                continue;
            }
            let closest = row_scores
                .iter()
                .zip(thresholds)
                .map(|(s, t)| s - t)
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (j, margin)| {
                    if margin > best.1 { (j, margin) } else { best }
                })
                .0;
            row[closest] = true;
        }
    }
    predictions
}

/// [`apply_thresholds_flat`], one `Vec` of `labels` booleans per sample.
pub fn apply_thresholds(scores: &[f32], thresholds: &[f32], at_least_one: bool) -> Vec<Vec<bool>> {
    if thresholds.is_empty() {
        check_rows(scores.len(), 0);
        return Vec::new();
    }
    apply_thresholds_flat(scores, thresholds, at_least_one)
        .chunks(thresholds.len())
        .map(<[bool]>::to_vec)
        .collect()
}
