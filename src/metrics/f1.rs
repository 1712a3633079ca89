//! Precision, recall and F1 from hard predictions, averaged like scikit-learn's
//! `precision_recall_fscore_support` with `zero_division=0`: micro (pooled counts), macro (mean over
//! every label, labels without positives or predictions included as zeros), weighted (by support)
//! and samples (per-row scores, mean over rows).

use serde::{Deserialize, Serialize};

/// Precision, recall and F1 of one label, one sample or one average.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Confusion counts of one label (or pooled over labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub true_positives: u64,
    /// Predicted positive: true plus false positives.
    pub predicted: u64,
    /// Actually positive: true positives plus false negatives (the support).
    pub actual: u64,
}

/// `numerator / denominator`, zero when the denominator is zero (scikit-learn's `zero_division=0`).
pub(crate) fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

impl Counts {
    /// Precision `tp / predicted`, recall `tp / actual`, F1 `2 tp / (predicted + actual)`, each zero
    /// where its denominator is zero.
    pub fn prf(&self) -> Prf {
        Prf {
            precision: ratio(self.true_positives, self.predicted),
            recall: ratio(self.true_positives, self.actual),
            f1: ratio(2 * self.true_positives, self.predicted + self.actual),
        }
    }

    /// The counts of a single (prediction, target) pair.
    fn of(predicted: bool, actual: bool) -> Counts {
        Counts {
            true_positives: u64::from(predicted && actual),
            predicted: u64::from(predicted),
            actual: u64::from(actual),
        }
    }

    fn add(&mut self, other: Counts) {
        self.true_positives += other.true_positives;
        self.predicted += other.predicted;
        self.actual += other.actual;
    }
}

/// The four averages scikit-learn offers for multi-label data.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Averages {
    pub micro: Prf,
    #[serde(rename = "macro")]
    pub macro_avg: Prf,
    pub weighted: Prf,
    pub samples: Prf,
}

/// Per-label counts of row-major `[rows, labels]` predictions against targets.
///
/// # Panics
/// If the slices' lengths differ or are not a multiple of `labels`.
pub fn label_counts(predictions: &[bool], targets: &[bool], labels: usize) -> Vec<Counts> {
    super::check_shape(predictions.len(), targets.len(), labels);
    let mut counts = vec![Counts::default(); labels];
    if labels == 0 {
        return counts;
    }
    for (prediction_row, target_row) in predictions.chunks(labels).zip(targets.chunks(labels)) {
        for ((count, &predicted), &actual) in counts.iter_mut().zip(prediction_row).zip(target_row)
        {
            count.add(Counts::of(predicted, actual));
        }
    }
    counts
}

/// Micro, macro, weighted and samples precision, recall and F1 of row-major `[rows, labels]`
/// predictions against targets.
///
/// # Panics
/// If the slices' lengths differ or are not a multiple of `labels`.
pub fn averages(predictions: &[bool], targets: &[bool], labels: usize) -> Averages {
    let counts = label_counts(predictions, targets, labels);
    let per_label: Vec<Prf> = counts.iter().map(Counts::prf).collect();
    let mut pooled = Counts::default();
    counts.iter().for_each(|c| pooled.add(*c));
    let per_sample: Vec<Prf> = if labels == 0 {
        Vec::new()
    } else {
        predictions
            .chunks(labels)
            .zip(targets.chunks(labels))
            .map(|(p, t)| row_counts(p, t).prf())
            .collect()
    };
    Averages {
        micro: pooled.prf(),
        macro_avg: weighted_mean(per_label.iter().map(|prf| (*prf, 1.0))),
        weighted: weighted_mean(
            per_label
                .iter()
                .zip(&counts)
                .map(|(prf, c)| (*prf, c.actual as f64)),
        ),
        samples: weighted_mean(per_sample.iter().map(|prf| (*prf, 1.0))),
    }
}

/// The counts of one sample's predictions pooled over its labels.
fn row_counts(predictions: &[bool], targets: &[bool]) -> Counts {
    let mut counts = Counts::default();
    for (&predicted, &actual) in predictions.iter().zip(targets) {
        counts.add(Counts::of(predicted, actual));
    }
    counts
}

/// The weighted mean of each score; all zeros when the weights sum to zero.
fn weighted_mean(values: impl Iterator<Item = (Prf, f64)>) -> Prf {
    let (mut sum, mut total_weight) = (Prf::default(), 0.0);
    for (prf, weight) in values {
        sum.precision += weight * prf.precision;
        sum.recall += weight * prf.recall;
        sum.f1 += weight * prf.f1;
        total_weight += weight;
    }
    if total_weight == 0.0 {
        return Prf::default();
    }
    Prf {
        precision: sum.precision / total_weight,
        recall: sum.recall / total_weight,
        f1: sum.f1 / total_weight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bools(rows: &[[u8; 3]]) -> Vec<bool> {
        rows.iter().flatten().map(|&v| v == 1).collect()
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
    fn averages_match_scikit_learn_by_hand() {
        let targets = bools(&[[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]);
        let predictions = bools(&[[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]]);
        // Label 0: tp 1, predicted 2, actual 2 -> 0.5, 0.5, 0.5. Label 1: the same.
        // Label 2: tp 0, predicted 0, actual 1 -> 0, 0, 0 (zero_division = 0).
        let counts = label_counts(&predictions, &targets, 3);
        assert_eq!(
            counts[2],
            Counts {
                true_positives: 0,
                predicted: 0,
                actual: 1
            }
        );
        let a = averages(&predictions, &targets, 3);
        // Micro: tp 2, predicted 4, actual 5 -> 2/4, 2/5, 4/9.
        assert_prf(a.micro, [0.5, 0.4, 4.0 / 9.0], "micro");
        // Macro: mean of (0.5, 0.5, 0) -> 1/3 each.
        assert_prf(a.macro_avg, [1.0 / 3.0; 3], "macro");
        // Weighted by support (2, 2, 1): (0.5 * 2 + 0.5 * 2 + 0) / 5 = 0.4.
        assert_prf(a.weighted, [0.4; 3], "weighted");
        // Samples: row 0 (tp 1, pred 2, actual 2) 0.5 each; row 1: 1 each; row 2 (nothing
        // predicted) and row 3 (nothing actual) 0 -> 1.5 / 4 = 0.375 each.
        assert_prf(a.samples, [0.375; 3], "samples");
        // scikit-learn 1.9.1, precision_recall_fscore_support(zero_division=0), printed the same
        // numbers: micro 0.5 0.4 0.4444..., macro 0.3333..., weighted 0.4, samples 0.375.
    }

    #[test]
    fn empty_inputs_give_zeros() {
        let a = averages(&[], &[], 3);
        assert_eq!(a, Averages::default());
        assert_eq!(averages(&[], &[], 0), Averages::default());
    }

    #[test]
    #[should_panic(expected = "differ in size")]
    fn mismatched_sizes_panic() {
        averages(&[true, false], &[true], 1);
    }
}
