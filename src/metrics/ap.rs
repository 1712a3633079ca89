//! Average precision as scikit-learn's `average_precision_score`: the step-wise sum
//! `sum_n (R_n - R_{n-1}) P_n` over the distinct scores in descending order, tied scores forming a
//! single step (no interpolation).

use super::{ScoreGroup, check_shape, column, score_groups};

/// AP of one label's scores (any order) against its targets; `None` without positives, where AP
/// is undefined.
///
/// # Panics
/// If the slices' lengths differ.
pub fn average_precision(scores: &[f32], targets: &[bool]) -> Option<f64> {
    check_shape(scores.len(), targets.len(), 1);
    average_precision_of_groups(&score_groups(scores, targets))
}

fn average_precision_of_groups(groups: &[ScoreGroup]) -> Option<f64> {
    let positives: u64 = groups.iter().map(|g| g.positives).sum();
    if positives == 0 {
        return None;
    }
    let (mut true_positives, mut predicted, mut sum) = (0u64, 0u64, 0.0);
    for group in groups {
        true_positives += group.positives;
        predicted += group.count;
        // Recall grows by group.positives / positives at precision true_positives / predicted.
        sum += group.positives as f64 * true_positives as f64 / predicted as f64;
    }
    Some(sum / positives as f64)
}

/// AP of every label of row-major `[rows, labels]` scores; `None` for labels without positives.
///
/// # Panics
/// If the slices' lengths differ or are not a multiple of `labels`.
pub fn label_average_precisions(
    scores: &[f32],
    targets: &[bool],
    labels: usize,
) -> Vec<Option<f64>> {
    check_shape(scores.len(), targets.len(), labels);
    (0..labels)
        .map(|j| average_precision(&column(scores, labels, j), &column(targets, labels, j)))
        .collect()
}

/// mAP: the mean AP over the labels that have at least one positive (scikit-learn's macro average
/// would count the others as 0); 0 when no label has a positive.
pub fn mean_average_precision(scores: &[f32], targets: &[bool], labels: usize) -> f64 {
    mean_of_defined(&label_average_precisions(scores, targets, labels))
}

/// The mean of the defined values, 0 when there are none.
pub(crate) fn mean_of_defined(values: &[Option<f64>]) -> f64 {
    let defined: Vec<f64> = values.iter().flatten().copied().collect();
    if defined.is_empty() {
        0.0
    } else {
        defined.iter().sum::<f64>() / defined.len() as f64
    }
}

/// Micro AP: one AP over all (sample, label) pairs pooled; `None` without any positive.
pub fn micro_average_precision(scores: &[f32], targets: &[bool]) -> Option<f64> {
    average_precision(scores, targets)
}

/// The micro precision-recall curve: one (recall, precision) point per distinct score over all
/// (sample, label) pairs pooled, from the highest score down; empty without any positive.
pub fn micro_precision_recall_curve(scores: &[f32], targets: &[bool]) -> Vec<(f64, f64)> {
    check_shape(scores.len(), targets.len(), 1);
    let groups = score_groups(scores, targets);
    let positives: u64 = groups.iter().map(|g| g.positives).sum();
    if positives == 0 {
        return Vec::new();
    }
    let (mut true_positives, mut predicted) = (0u64, 0u64);
    groups
        .iter()
        .map(|group| {
            true_positives += group.positives;
            predicted += group.count;
            (
                true_positives as f64 / positives as f64,
                true_positives as f64 / predicted as f64,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_form_one_step_like_scikit_learn() {
        // Groups 0.8 {+,-}, 0.5 {+,-}, 0.2 {+}; each adds recall 1/3 at precision 1/2, 2/4, 3/5:
        // (0.5 + 0.5 + 0.6) / 3 = 0.533333 (scikit-learn 1.9.1 gives 0.5333333333333333).
        let ap = average_precision(
            &[0.5, 0.8, 0.2, 0.8, 0.5],
            &[true, true, true, false, false],
        );
        assert!((ap.expect("positives") - 1.6 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn perfect_and_reversed_rankings() {
        let targets = [true, true, false, false];
        assert_eq!(
            average_precision(&[0.9, 0.8, 0.2, 0.1], &targets),
            Some(1.0)
        );
        // Positives ranked last: recall 1/2 at precision 1/3, then 1/2 at 2/4.
        let reversed = average_precision(&[0.1, 0.2, 0.8, 0.9], &targets).expect("positives");
        assert!((reversed - (1.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
        // All tied: one step at precision 1/2.
        assert_eq!(average_precision(&[0.3; 4], &targets), Some(0.5));
    }

    #[test]
    fn undefined_without_positives_and_skipped_by_map() {
        assert_eq!(average_precision(&[0.3, 0.7], &[false, false]), None);
        // Label 0 ranks perfectly (AP 1), label 1 has no positives: mAP = 1.
        let scores = [0.9, 0.1, 0.2, 0.8];
        let targets = [true, false, false, false];
        assert_eq!(
            label_average_precisions(&scores, &targets, 2),
            vec![Some(1.0), None]
        );
        assert_eq!(mean_average_precision(&scores, &targets, 2), 1.0);
        assert_eq!(mean_average_precision(&[0.5], &[false], 1), 0.0);
    }

    #[test]
    fn micro_curve_steps_through_tied_groups() {
        // Same groups as above: (1/3, 1/2), (2/3, 2/4), (3/3, 3/5).
        let curve = micro_precision_recall_curve(
            &[0.5, 0.8, 0.2, 0.8, 0.5],
            &[true, true, true, false, false],
        );
        let expected = [(1.0 / 3.0, 0.5), (2.0 / 3.0, 0.5), (1.0, 0.6)];
        assert_eq!(curve.len(), expected.len());
        for ((r, p), (er, ep)) in curve.iter().zip(expected) {
            assert!((r - er).abs() < 1e-12 && (p - ep).abs() < 1e-12);
        }
        assert!(micro_precision_recall_curve(&[0.1], &[false]).is_empty());
    }
}
