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

pub use ap::{
    average_precision, mean_average_precision, micro_average_precision,
    micro_precision_recall_curve,
};
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
        values.is_multiple_of(labels),
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
///
/// Sorts (score, target) pairs packed into `u64` keys, several times faster than sorting tuples
/// with a float comparator; `-0.0` counts as `0.0`.
fn score_groups(scores: &[f32], targets: &[bool]) -> Vec<ScoreGroup> {
    let mut keys: Vec<u64> = scores
        .iter()
        .zip(targets)
        .map(|(&score, &positive)| u64::from(descending_key(score)) << 1 | u64::from(positive))
        .collect();
    keys.sort_unstable();
    let mut groups: Vec<ScoreGroup> = Vec::new();
    for key in keys {
        let score = score_of_key((key >> 1) as u32);
        let positive = key & 1;
        match groups.last_mut() {
            Some(group) if group.score.to_bits() == score.to_bits() => {
                group.positives += positive;
                group.count += 1;
            }
            _ => groups.push(ScoreGroup {
                score,
                positives: positive,
                count: 1,
            }),
        }
    }
    groups
}

/// A `u32` whose ascending order is the descending total order of scores.
fn descending_key(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits(); // -0.0 + 0.0 = +0.0
    let ascending = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    !ascending
}

/// The score of a [`descending_key`].
fn score_of_key(key: u32) -> f32 {
    let ascending = !key;
    let bits = if ascending & 0x8000_0000 != 0 {
        ascending & 0x7fff_ffff
    } else {
        !ascending
    };
    f32::from_bits(bits)
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

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: usize = 40;
    const LABELS: usize = 5;
    const THRESHOLDS: [f32; LABELS] = [0.75, 0.65, 0.85, 0.55, 0.95];

    /// A deterministic matrix with many tied scores (multiples of 0.1) and targets correlated with
    /// them; label 4 has no positives. The scikit-learn numbers below come from the same formulas
    /// in Python (numpy float64, scikit-learn 1.9.1).
    fn reference_case() -> (Vec<f32>, Vec<f32>) {
        let mut scores = Vec::new();
        let mut targets = Vec::new();
        for i in 0..ROWS {
            for j in 0..LABELS {
                let tenths = (i * 7 + j * 13 + i * j) % 11;
                let score = tenths as f32 / 10.0;
                let positive = j != 4
                    && ((i * 5 + j * 3 + (i * j) % 7) % 4 == 0
                        || (tenths >= 8 && (i + j) % 3 != 0));
                scores.push(score);
                targets.push(if positive { 1.0 } else { 0.0 });
            }
        }
        (scores, targets)
    }

    fn assert_prf(actual: Prf, expected: [f64; 3], what: &str) {
        let got = [actual.precision, actual.recall, actual.f1];
        for (g, e) in got.iter().zip(expected) {
            assert!(
                (g - e).abs() < 1e-12,
                "{what}: got {got:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn matches_scikit_learn() {
        let (scores, targets) = reference_case();
        let m = Metrics::compute(&scores, &targets, &THRESHOLDS, false);
        assert_eq!((m.rows, m.labels, m.labels_with_positives), (40, 5, 4));
        let a = m.averages;
        assert_prf(
            a.micro,
            [0.6326530612244898, 0.5740740740740741, 0.6019417475728155],
            "micro",
        );
        assert_prf(
            a.macro_avg,
            [0.5472727272727272, 0.4595238095238095, 0.490173018753781],
            "macro",
        );
        assert_prf(
            a.weighted,
            [0.6723905723905724, 0.5740740740740741, 0.6081190204118214],
            "weighted",
        );
        assert_prf(
            a.samples,
            [0.5083333333333333, 0.45, 0.4616666666666666],
            "samples",
        );
        // average_precision_score per label (labels 0..4), their mean, and on the raveled matrix.
        let expected_ap = [
            0.5452716168687131,
            0.7579545454545455,
            0.8083333333333333,
            0.6804705215419501,
        ];
        assert!((m.map - 0.6980075042996355).abs() < 1e-12, "map {}", m.map);
        assert!(
            (m.micro_ap - 0.5699116525893305).abs() < 1e-12,
            "micro ap {}",
            m.micro_ap
        );

        let table = per_label_table(&scores, &targets, &THRESHOLDS, false);
        assert_eq!(table.len(), LABELS);
        for (row, expected) in table.iter().zip(expected_ap) {
            let ap = row.average_precision.expect("positives");
            assert!((ap - expected).abs() < 1e-12, "label {}: {ap}", row.label);
        }
        assert_eq!(table[4].average_precision, None);
        assert_eq!(
            table.iter().map(|r| r.support).collect::<Vec<_>>(),
            vec![14, 14, 12, 14, 0]
        );
        assert_eq!(table[2].threshold, 0.85);
        let macro_f1 = table.iter().map(|r| r.f1).sum::<f64>() / LABELS as f64;
        assert!((macro_f1 - a.macro_avg.f1).abs() < 1e-12);
    }

    #[test]
    fn at_least_one_rule_matches_scikit_learn_on_the_forced_predictions() {
        // Four rows predict nothing at these thresholds; the rule gives each its label with the
        // largest score - threshold. Several differences tie in exact arithmetic (0.7 - 0.75 and
        // 0.6 - 0.65), so the reference computed them in float32 like the code does and took
        // numpy's argmax (first maximum), then scikit-learn's averages.
        let (scores, targets) = reference_case();
        let m = Metrics::compute(&scores, &targets, &THRESHOLDS, true);
        let a = m.averages;
        assert_prf(
            a.micro,
            [0.6037735849056604, 0.5925925925925926, 0.5981308411214953],
            "micro",
        );
        assert_prf(
            a.macro_avg,
            [0.5266666666666666, 0.4738095238095239, 0.4885178463399879],
            "macro",
        );
        assert_prf(
            a.weighted,
            [0.645679012345679, 0.5925925925925926, 0.6059734265420895],
            "weighted",
        );
        assert_prf(
            a.samples,
            [0.5333333333333333, 0.475, 0.48666666666666664],
            "samples",
        );
        let rows = apply_thresholds(&scores, &THRESHOLDS, true);
        assert!(rows.iter().all(|r| r.iter().any(|&p| p)));
    }

    #[test]
    fn score_keys_order_scores_descending_and_round_trip() {
        let scores = [
            1.0,
            0.5,
            f32::MIN_POSITIVE,
            0.0,
            -f32::MIN_POSITIVE,
            -0.5,
            f32::NEG_INFINITY,
        ];
        let keys: Vec<u32> = scores.iter().map(|&s| descending_key(s)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        for (&s, &k) in scores.iter().zip(&keys) {
            assert_eq!(score_of_key(k), s);
        }
        assert_eq!(descending_key(-0.0), descending_key(0.0));
        let groups = score_groups(
            &[0.5, -0.0, 0.0, 0.5, 0.9],
            &[true, false, true, false, true],
        );
        let summary: Vec<(f32, u64, u64)> = groups
            .iter()
            .map(|g| (g.score, g.positives, g.count))
            .collect();
        assert_eq!(summary, vec![(0.9, 1, 1), (0.5, 1, 2), (0.0, 1, 2)]);
    }

    #[test]
    fn metrics_round_trip_through_json() {
        let (scores, targets) = reference_case();
        let m = Metrics::compute(&scores, &targets, &THRESHOLDS, true);
        let json = serde_json::to_string(&m).expect("write");
        assert!(json.contains("\"macro\":{\"precision\""), "{json}");
        let back: Metrics = serde_json::from_str(&json).expect("read");
        assert_eq!(back, m);
    }

    #[test]
    fn targets_of_every_kind_agree() {
        let (scores, targets) = reference_case();
        let as_bool: Vec<bool> = targets.iter().map(|&t| t == 1.0).collect();
        let as_u8: Vec<u8> = as_bool.iter().map(|&t| u8::from(t)).collect();
        let m = Metrics::compute(&scores, &targets, &THRESHOLDS, true);
        assert_eq!(m, Metrics::compute(&scores, &as_bool, &THRESHOLDS, true));
        assert_eq!(m, Metrics::compute(&scores, &as_u8, &THRESHOLDS, true));
    }
}
