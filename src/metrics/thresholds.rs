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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{averages, label_counts};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Noisy validation data: label j is positive with probability (j + 1) / (2 labels) and its
    /// score is a sigmoid of a shifted normal-ish variable, rounded to 2 decimals half the time
    /// (ties). The last label has no positives.
    fn validation(seed: u64, rows: usize, labels: usize) -> (Vec<f32>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut scores, mut targets) = (Vec::new(), Vec::new());
        for _ in 0..rows {
            for j in 0..labels {
                let positive =
                    j + 1 < labels && rng.random_bool((j + 1) as f64 / (2 * labels) as f64);
                let noise: f32 = (0..3).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 3.0;
                let shift = if positive { 1.0 } else { -1.0 };
                let mut score = 1.0 / (1.0 + (-(noise + shift)).exp());
                if rng.random_bool(0.5) {
                    score = (score * 100.0).round() / 100.0;
                }
                scores.push(score);
                targets.push(positive);
            }
        }
        (scores, targets)
    }

    fn label_f1(scores: &[f32], targets: &[bool], labels: usize, thresholds: &[f32]) -> Vec<f64> {
        let predictions = apply_thresholds_flat(scores, thresholds, false);
        label_counts(&predictions, targets, labels)
            .iter()
            .map(|c| c.prf().f1)
            .collect()
    }

    fn micro_f1(scores: &[f32], targets: &[bool], labels: usize, thresholds: &[f32]) -> f64 {
        averages(
            &apply_thresholds_flat(scores, thresholds, false),
            targets,
            labels,
        )
        .micro
        .f1
    }

    #[test]
    fn label_f1_tuning_is_the_exact_optimum() {
        let labels = 4;
        let (scores, targets) = validation(1, 300, labels);
        let tuned = tune_thresholds(&scores, &targets, labels, TuneObjective::LabelF1);
        let tuned_f1 = label_f1(&scores, &targets, labels, &tuned);
        for j in 0..labels - 1 {
            // Brute force: every distinct score as a `>=` threshold, plus "predict nothing".
            let col = column(&scores, labels, j);
            let mut candidates: Vec<f32> = col.clone();
            candidates.push(1.0);
            let best = candidates
                .iter()
                .map(|&t| {
                    let mut thresholds = tuned.clone();
                    thresholds[j] = t;
                    label_f1(&scores, &targets, labels, &thresholds)[j]
                })
                .fold(0.0, f64::max);
            assert_eq!(tuned_f1[j], best, "label {j}");
        }
    }

    #[test]
    fn tuning_beats_one_half_on_validation() {
        for seed in 0..8 {
            let labels = 5;
            let (scores, targets) = validation(seed, 200, labels);
            let half = vec![0.5; labels];
            let per_label = tune_thresholds(&scores, &targets, labels, TuneObjective::LabelF1);
            let at_half = label_f1(&scores, &targets, labels, &half);
            let tuned = label_f1(&scores, &targets, labels, &per_label);
            for j in 0..labels {
                assert!(tuned[j] >= at_half[j], "seed {seed} label {j}");
            }
            let micro = tune_thresholds(&scores, &targets, labels, TuneObjective::default());
            let micro_tuned = micro_f1(&scores, &targets, labels, &micro);
            assert!(
                micro_tuned >= micro_f1(&scores, &targets, labels, &half),
                "seed {seed}"
            );
            assert!(
                micro_tuned >= micro_f1(&scores, &targets, labels, &per_label),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn thresholds_lie_in_the_open_unit_interval() {
        let labels = 3;
        let (mut scores, targets) = validation(3, 100, labels);
        // Saturated probabilities at both ends.
        scores[0] = 0.0;
        scores[1] = 1.0;
        scores[5] = 1.0;
        for objective in [TuneObjective::LabelF1, TuneObjective::default()] {
            for t in tune_thresholds(&scores, &targets, labels, objective) {
                assert!(t > 0.0 && t < 1.0, "{t}");
            }
        }
        let all_zero = tune_thresholds(
            &[0.0; 6],
            &[true, false, true, false, true, false],
            2,
            TuneObjective::default(),
        );
        assert!(all_zero.iter().all(|&t| t > 0.0 && t < 1.0), "{all_zero:?}");
        let empty: Vec<bool> = Vec::new();
        assert_eq!(
            tune_thresholds(&[], &empty, 2, TuneObjective::default()),
            vec![0.5; 2]
        );
    }

    #[test]
    fn labels_without_positives_fall_back_to_the_best_shared_threshold() {
        let labels = 4;
        let (scores, targets) = validation(4, 200, labels);
        let tuned = tune_thresholds(&scores, &targets, labels, TuneObjective::default());
        // The best single threshold for all labels, by brute force over every score.
        let best_shared = scores
            .iter()
            .map(|&t| (micro_f1(&scores, &targets, labels, &[t; 4]), t))
            .fold((0.0, 0.0), |best, candidate| {
                if candidate.0 > best.0 {
                    candidate
                } else {
                    best
                }
            });
        let fallback = tuned[labels - 1];
        assert_eq!(
            micro_f1(&scores, &targets, labels, &[fallback; 4]),
            best_shared.0
        );
    }

    #[test]
    fn tuning_is_deterministic_and_ignores_row_order() {
        let labels = 4;
        let (scores, targets) = validation(5, 150, labels);
        let first = tune_thresholds(&scores, &targets, labels, TuneObjective::default());
        assert_eq!(
            first,
            tune_thresholds(&scores, &targets, labels, TuneObjective::default())
        );
        let reversed_rows =
            |m: &[f32]| -> Vec<f32> { m.chunks(labels).rev().flatten().copied().collect() };
        let reversed_targets: Vec<bool> = targets.chunks(labels).rev().flatten().copied().collect();
        assert_eq!(
            first,
            tune_thresholds(
                &reversed_rows(&scores),
                &reversed_targets,
                labels,
                TuneObjective::default()
            )
        );
        // f32 and u8 targets mean the same.
        let as_f32: Vec<f32> = targets.iter().map(|&t| f32::from(u8::from(t))).collect();
        assert_eq!(
            first,
            tune_thresholds(&scores, &as_f32, labels, TuneObjective::default())
        );
    }

    /// The tuned threshold of one label, checked against an expected midpoint.
    fn assert_single_threshold(scores: &[f32], targets: &[bool], expected: f32) {
        let t = tune_thresholds(scores, targets, 1, TuneObjective::LabelF1);
        assert!(
            (t[0] - expected).abs() < 1e-6,
            "got {t:?}, expected {expected}"
        );
    }

    #[test]
    fn candidates_are_midpoints_and_ties_prefer_one_half() {
        // Scores 0.2 (+), 0.9 (+): predicting both (F1 1) needs a threshold in (0, 0.2]: 0.1.
        assert_single_threshold(&[0.2, 0.9], &[true, true], 0.1);
        // 0.1 (+), 0.95 (-), 0.9 (+), 0.05 (-), P = 2, F1 = 2 tp / (predicted + 2):
        // t 0.975 -> 0; 0.925 -> {0.95}: 0; 0.5 -> {0.95, 0.9}: 2/4; 0.075 -> +0.1: 4/5;
        // 0.025 -> all: 4/6. Best 0.075.
        assert_single_threshold(&[0.1, 0.95, 0.9, 0.05], &[true, false, true, false], 0.075);
        // A tie: 0.9 (+), 0.4 (-), 0.3 (-), 0.2 (+): t 0.65 -> {0.9}: 2/3; t 0.1 -> all: 4/6 = 2/3.
        // 0.65 is closer to 0.5.
        assert_single_threshold(&[0.9, 0.4, 0.3, 0.2], &[true, false, false, true], 0.65);
        // The mirror tie: 0.99 (+), 0.9 (-), 0.85 (-), 0.4 (+), 0.05 (-): t 0.945 -> 2/3;
        // t 0.225 -> {0.99, 0.9, 0.85, 0.4}: 4/6. 0.225 is closer to 0.5.
        assert_single_threshold(
            &[0.99, 0.9, 0.85, 0.4, 0.05],
            &[true, false, false, true, false],
            0.225,
        );
    }

    #[test]
    fn midpoints_separate_adjacent_floats() {
        let low = 0.3f32;
        let high = f32::from_bits(low.to_bits() + 1);
        // Only `high` is positive: the threshold must predict it and not `low`.
        let t = tune_thresholds(&[low, high], &[false, true], 1, TuneObjective::LabelF1);
        assert!(t[0] > low && t[0] <= high, "{t:?}");
    }

    #[test]
    fn at_least_one_label_per_sample() {
        let scores = [0.2, 0.45, 0.1, 0.9, 0.1, 0.3, 0.05, 0.3, 0.25];
        let thresholds = [0.5, 0.5, 0.2];
        let strict = apply_thresholds(&scores, &thresholds, false);
        assert_eq!(
            strict,
            vec![
                vec![false, false, false],
                vec![true, false, true],
                vec![false, false, true]
            ]
        );
        // Row 0: margins -0.3, -0.05, -0.1 -> label 1 (closest to its threshold, not the highest
        // ratio: 0.1 / 0.2 = 0.5 < 0.45 / 0.5 = 0.9 agrees here, 0.2 / 0.5 = 0.4 does not).
        let lenient = apply_thresholds(&scores, &thresholds, true);
        assert_eq!(lenient[0], vec![false, true, false]);
        assert_eq!(lenient[1..], strict[1..]);
        // Ties go to the first label.
        assert_eq!(
            apply_thresholds(&[0.1, 0.1], &[0.5, 0.5], true),
            vec![vec![true, false]]
        );
        assert_eq!(
            apply_thresholds(&[], &[0.5, 0.5], true),
            Vec::<Vec<bool>>::new()
        );
    }
}
