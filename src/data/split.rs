//! The train/validation split: seeded second-order iterative stratification.
//!
//! Iterative stratification (Sechidis et al. 2011) hands out rows one "evidence unit" at a time,
//! rarest first, each to the side that still wants most of that unit. Second order (Szymanski &
//! Kajdanowicz 2017) uses label PAIRS as units (a row with labels {a, b} carries the units
//! (a,a), (b,b) and (a,b)), so label co-occurrence is balanced as well as label frequency.
//!
//! On top of the published method: every label with at least two rows asks for at least one
//! validation row, and a final repair pass moves a row across when a label with >= 2 rows still
//! ended up on one side only, so that every such label can be trained and validated on. Rows
//! without labels fill whichever side is furthest below its target size.
//!
//! The split is saved as JSON (ids per side), and training, threshold tuning and evaluation all
//! read the same file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Record;
use super::labels::LabelVocab;

/// Default fraction of the rows held out for validation.
pub const DEFAULT_VAL_FRACTION: f64 = 0.15;
/// Default seed of the split.
pub const DEFAULT_SEED: u64 = 3407;
/// Conventional file name of a saved split.
pub const SPLIT_FILE: &str = "split.json";

/// Image ids on each side of a train/validation split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub seed: u64,
    pub val_fraction: f64,
    /// Ids in csv order.
    pub train: Vec<String>,
    /// Ids in csv order.
    pub val: Vec<String>,
}

impl Split {
    /// Splits labelled `records` with second-order iterative stratification. Every record must
    /// have labels known to `vocab`. The same inputs and seed give the same split.
    pub fn stratified(
        records: &[Record],
        vocab: &LabelVocab,
        val_fraction: f64,
        seed: u64,
    ) -> Result<Split> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            bail!("the validation fraction must lie strictly between 0 and 1, got {val_fraction}");
        }
        let mut label_sets = Vec::with_capacity(records.len());
        for r in records {
            let labels = r.labels.as_ref().with_context(|| {
                format!(
                    "row `{}` (line {}) has no Labels column to stratify on",
                    r.id, r.line
                )
            })?;
            let mut set = Vec::with_capacity(labels.len());
            for label in labels {
                let column = vocab.index(label).with_context(|| {
                    format!("row `{}` (line {}): unknown label `{label}`", r.id, r.line)
                })?;
                set.push(column);
            }
            set.sort_unstable();
            set.dedup();
            label_sets.push(set);
        }
        let is_val = assign(&label_sets, vocab.len(), val_fraction, seed);
        if let Some(note) = fraction_shortfall(&label_sets, &is_val, vocab.len(), val_fraction) {
            tracing::warn!("{note}");
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (r, v) in records.iter().zip(is_val) {
            if v { &mut val } else { &mut train }.push(r.id.clone());
        }
        Ok(Split {
            seed,
            val_fraction,
            train,
            val,
        })
    }

    /// Fails unless the split holds exactly the ids of `records`, each once.
    pub fn check_matches(&self, records: &[Record]) -> Result<()> {
        let mut sides: HashMap<&str, &str> = HashMap::with_capacity(records.len());
        for (side, ids) in [("train", &self.train), ("val", &self.val)] {
            for id in ids {
                if let Some(other) = sides.insert(id, side) {
                    bail!("the split lists `{id}` twice (in {other} and in {side})");
                }
            }
        }
        for r in records {
            if sides.remove(r.id.as_str()).is_none() {
                bail!(
                    "row `{}` (line {}) is in neither side of the split; was the split made \
                     from another csv? Make a new one with `multiclip dataset split`",
                    r.id,
                    r.line
                );
            }
        }
        if let Some(id) = sides.keys().next() {
            bail!(
                "the split lists `{id}` (and {} more ids) that the csv does not have",
                sides.len() - 1
            );
        }
        Ok(())
    }

    /// Rows per label on each side, `(label, train rows, val rows)` in vocabulary order
    /// (records not in the split are not counted).
    pub fn label_counts(
        &self,
        records: &[Record],
        vocab: &LabelVocab,
    ) -> Vec<(String, usize, usize)> {
        let side_of: HashMap<&str, usize> = (self.train.iter().map(|id| (id.as_str(), TRAIN)))
            .chain(self.val.iter().map(|id| (id.as_str(), VAL)))
            .collect();
        let mut counts = vec![[0usize; 2]; vocab.len()];
        for r in records {
            let Some(&side) = side_of.get(r.id.as_str()) else {
                continue;
            };
            for label in r.labels.iter().flatten() {
                if let Some(i) = vocab.index(label) {
                    counts[i][side] += 1;
                }
            }
        }
        vocab
            .names()
            .iter()
            .zip(counts)
            .map(|(name, [train, val])| (name.clone(), train, val))
            .collect()
    }

    /// Writes the split as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write split {}", path.display()))
    }

    /// Reads a split written by [`Split::save`].
    pub fn load(path: &Path) -> Result<Split> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read split {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid split file", path.display()))
    }
}

const TRAIN: usize = 0;
const VAL: usize = 1;

/// Second-order iterative stratification of rows given as sorted label columns; returns, per
/// row, whether it goes to validation.
fn assign(label_sets: &[Vec<usize>], n_labels: usize, val_fraction: f64, seed: u64) -> Vec<bool> {
    let fractions = [1.0 - val_fraction, val_fraction];
    let sides = assign_sides(label_sets, n_labels, &fractions, &[false, true], seed);
    sides.into_iter().map(|s| s == VAL).collect()
}

/// K folds of the rows given as label sets (label columns below `n_labels`), by the split's
/// second-order iterative stratification with K equal sides: the fold (0-based) of each row.
/// Every label with at least two rows reaches at least two folds (so every member of a k-fold
/// ensemble trains on it), and each fold asks for at least one row of every label with two or
/// more rows. The same rows and seed give the same folds.
pub fn stratified_folds(
    label_sets: &[Vec<usize>],
    n_labels: usize,
    folds: usize,
    seed: u64,
) -> Result<Vec<usize>> {
    if folds < 2 {
        bail!("k-fold training needs at least 2 folds, got {folds}");
    }
    if folds > label_sets.len() {
        bail!(
            "{folds} folds of {} rows: every fold needs at least one row",
            label_sets.len()
        );
    }
    let mut sets = label_sets.to_vec();
    for set in &mut sets {
        if let Some(&bad) = set.iter().find(|&&l| l >= n_labels) {
            bail!("label column {bad} is out of range for {n_labels} labels");
        }
        set.sort_unstable();
        set.dedup();
    }
    let fractions = vec![1.0 / folds as f64; folds];
    Ok(assign_sides(
        &sets,
        n_labels,
        &fractions,
        &vec![true; folds],
        seed,
    ))
}

/// Second-order iterative stratification of rows (sorted label columns) into sides of the given
/// `fractions`: the side of each row. A side with `min_one` asks for at least one row of every
/// label that has two or more rows (the others share what is left in proportion); a final pass
/// puts every label with two or more rows on at least two sides.
fn assign_sides(
    label_sets: &[Vec<usize>],
    n_labels: usize,
    fractions: &[f64],
    min_one: &[bool],
    seed: u64,
) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = label_sets.len();

    // Evidence units: every (a, b) with a <= b among a row's labels, numbered as first seen.
    let mut unit_of: HashMap<(usize, usize), usize> = HashMap::new();
    let mut unit_is_single: Vec<bool> = Vec::new();
    let row_units: Vec<Vec<usize>> = label_sets
        .iter()
        .map(|set| {
            let mut units = Vec::with_capacity(set.len() * (set.len() + 1) / 2);
            for (i, &a) in set.iter().enumerate() {
                for &b in &set[i..] {
                    let next = unit_of.len();
                    let unit = *unit_of.entry((a, b)).or_insert(next);
                    if unit == unit_is_single.len() {
                        unit_is_single.push(a == b);
                    }
                    units.push(unit);
                }
            }
            units
        })
        .collect();
    // Rows carrying each unit, in a seeded random order.
    let mut unit_rows: Vec<Vec<usize>> = vec![Vec::new(); unit_of.len()];
    for (row, units) in row_units.iter().enumerate() {
        for &unit in units {
            unit_rows[unit].push(row);
        }
    }
    for rows in &mut unit_rows {
        rows.shuffle(&mut rng);
    }
    // How many more rows of each unit each side wants.
    let others_fraction: f64 = fractions
        .iter()
        .zip(min_one)
        .filter(|(_, min)| !**min)
        .map(|(f, _)| f)
        .sum();
    let mut wanted: Vec<Vec<f64>> = unit_rows
        .iter()
        .zip(&unit_is_single)
        .map(|(rows, &single)| {
            let count = rows.len() as f64;
            let raise = single && rows.len() >= 2;
            let mut want: Vec<f64> = fractions
                .iter()
                .zip(min_one)
                .map(|(f, &min)| {
                    let share = count * f;
                    if min && raise { share.max(1.0) } else { share }
                })
                .collect();
            let raised: f64 = (want.iter().zip(min_one))
                .filter(|(_, min)| **min)
                .map(|(w, _)| w)
                .sum();
            for ((w, f), _) in (want.iter_mut().zip(fractions).zip(min_one)).filter(|(_, m)| !**m) {
                *w = (count - raised) * (f / others_fraction);
            }
            want
        })
        .collect();
    let mut wanted_rows: Vec<f64> = fractions.iter().map(|f| n as f64 * f).collect();
    let mut remaining: Vec<usize> = unit_rows.iter().map(Vec::len).collect();
    let mut side: Vec<Option<usize>> = vec![None; n];

    // Pick the side that wants the most; ties go to the side wanting more rows, then at random.
    let choose = |want: &[f64], wanted_rows: &[f64], rng: &mut ChaCha8Rng| {
        let most = |values: &[f64], among: &[usize]| -> Vec<usize> {
            let best = among
                .iter()
                .map(|&s| values[s])
                .fold(f64::NEG_INFINITY, f64::max);
            among
                .iter()
                .copied()
                .filter(|&s| values[s] == best)
                .collect()
        };
        let all: Vec<usize> = (0..want.len()).collect();
        let tied = most(wanted_rows, &most(want, &all));
        if tied.len() == 1 {
            tied[0]
        } else {
            tied[rng.random_range(0..tied.len())]
        }
    };

    // Rarest unit first (fewest rows still unassigned; ties: first seen).
    while let Some(unit) = (0..remaining.len())
        .filter(|&u| remaining[u] > 0)
        .min_by_key(|&u| (remaining[u], u))
    {
        for &row in &unit_rows[unit] {
            if side[row].is_some() {
                continue;
            }
            let s = choose(&wanted[unit], &wanted_rows, &mut rng);
            side[row] = Some(s);
            wanted_rows[s] -= 1.0;
            for &u in &row_units[row] {
                wanted[u][s] -= 1.0;
                remaining[u] -= 1;
            }
        }
    }
    // Rows without labels.
    let nothing = vec![0.0; fractions.len()];
    for s in side.iter_mut().filter(|s| s.is_none()) {
        let chosen = choose(&nothing, &wanted_rows, &mut rng);
        wanted_rows[chosen] -= 1.0;
        *s = Some(chosen);
    }
    let mut sides: Vec<usize> = side.into_iter().map(|s| s.unwrap_or(TRAIN)).collect();
    repair_one_sided_labels(label_sets, n_labels, fractions.len(), &mut sides);
    sides
}

/// Why the split's sides are far from the requested sizes, when they are: the smaller side off
/// by more than a quarter of its wanted size and more than 2 rows. The cause is the guarantee
/// that every label with two or more rows is on both sides (and that a row moves with all its
/// labels), which a fraction near 0 or 1 cannot meet with few rows per label.
fn fraction_shortfall(
    label_sets: &[Vec<usize>],
    is_val: &[bool],
    n_labels: usize,
    val_fraction: f64,
) -> Option<String> {
    let n = is_val.len();
    let val = is_val.iter().filter(|&&v| v).count();
    let (wanted, got) = if val_fraction <= 0.5 {
        (n as f64 * val_fraction, val)
    } else {
        (n as f64 * (1.0 - val_fraction), n - val)
    };
    if (got as f64 - wanted).abs() <= (0.25 * wanted).max(2.0) {
        return None;
    }
    let mut rows_per_label = vec![0usize; n_labels];
    for &l in label_sets.iter().flatten() {
        rows_per_label[l] += 1;
    }
    let both_sides: Vec<usize> = rows_per_label.into_iter().filter(|&c| c >= 2).collect();
    let reason = match both_sides.iter().min() {
        Some(&rarest) => {
            let (verb, side) = if val_fraction <= 0.5 {
                ("puts", "in validation")
            } else {
                ("keeps", "for training")
            };
            format!(
                "stratification keeps every label with two or more rows on both sides ({} labels \
                 here): the rarest, with {rarest} rows, {verb} at least 1 ({:.1}%) {side}, and a \
                 row moves with all its labels",
                both_sides.len(),
                100.0 / rarest as f64
            )
        }
        None => "a row moves with all its labels".to_owned(),
    };
    Some(format!(
        "the split has {val} validation rows of {n} ({:.1}%) where the validation fraction \
         {val_fraction} asks for {:.1}: {reason}",
        100.0 * val as f64 / n.max(1) as f64,
        n as f64 * val_fraction
    ))
}

/// Moves one row for each label with >= 2 rows that sits on one side only, to the side with the
/// fewest rows, choosing a row whose move leaves every one of its labels still present on the
/// side it leaves.
fn repair_one_sided_labels(
    label_sets: &[Vec<usize>],
    n_labels: usize,
    n_sides: usize,
    sides: &mut [usize],
) {
    let count_per_side = |sides: &[usize]| {
        let mut counts = vec![vec![0usize; n_sides]; n_labels];
        for (set, &s) in label_sets.iter().zip(sides.iter()) {
            for &l in set {
                counts[l][s] += 1;
            }
        }
        counts
    };
    let mut counts = count_per_side(sides);
    let mut order: Vec<usize> = (0..n_labels).collect();
    order.sort_by_key(|&l| (counts[l].iter().sum::<usize>(), l));
    let mut moved = HashSet::new();
    for label in order {
        let total: usize = counts[label].iter().sum();
        let present = counts[label].iter().filter(|&&c| c > 0).count();
        if total < 2 || present >= 2 {
            continue;
        }
        let Some(from) = (0..n_sides).find(|&s| counts[label][s] > 0) else {
            continue;
        };
        let mut sizes = vec![0usize; n_sides];
        for &s in sides.iter() {
            sizes[s] += 1;
        }
        let Some(to) = (0..n_sides)
            .filter(|&s| s != from)
            .min_by_key(|&s| (sizes[s], s))
        else {
            continue;
        };
        let candidate = (0..label_sets.len()).find(|&row| {
            sides[row] == from
                && !moved.contains(&row)
                && label_sets[row].contains(&label)
                && label_sets[row].iter().all(|&l| counts[l][from] >= 2)
        });
        if let Some(row) = candidate {
            sides[row] = to;
            moved.insert(row);
            counts = count_per_side(sides);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rare_labels_reach_both_sides() {
        // Label 2 has 2 rows, label 3 has 3 rows both shared with label 0.
        let mut sets = vec![vec![0]; 40];
        sets.extend([
            vec![0, 2],
            vec![2],
            vec![0, 3],
            vec![0, 3],
            vec![1, 3],
            vec![1],
        ]);
        let is_val = assign(&sets, 4, 0.15, 1);
        for label in [0, 2, 3] {
            let sides: HashSet<bool> = sets
                .iter()
                .zip(&is_val)
                .filter(|(s, _)| s.contains(&label))
                .map(|(_, &v)| v)
                .collect();
            assert_eq!(sides.len(), 2, "label {label} on one side only");
        }
    }

    /// 300 rows over 12 labels with power-law frequencies, 1-3 labels each, seeded.
    fn multi_label_rows() -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        (0..300)
            .map(|_| {
                let mut set: Vec<usize> = (0..rng.random_range(1..4))
                    .map(|_| {
                        let u: f64 = rng.random_range(0.0..1.0);
                        ((u * u * 12.0) as usize).min(11)
                    })
                    .collect();
                set.sort_unstable();
                set.dedup();
                set
            })
            .collect()
    }

    /// Per label, the largest gap between its rows in a fold and its fair share (count / k).
    fn worst_label_gap(sets: &[Vec<usize>], folds: &[usize], k: usize) -> f64 {
        let mut counts = vec![vec![0usize; k]; 12];
        for (set, &f) in sets.iter().zip(folds) {
            for &l in set {
                counts[l][f] += 1;
            }
        }
        counts
            .iter()
            .flat_map(|per_fold| {
                let share = per_fold.iter().sum::<usize>() as f64 / k as f64;
                per_fold.iter().map(move |&c| (c as f64 - share).abs())
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn folds_are_disjoint_covering_seeded_and_stratified() {
        let sets = multi_label_rows();
        let k = 5;
        let folds = stratified_folds(&sets, 12, k, 3407).unwrap();
        // One fold per row (disjoint and covering), each of about n / k rows.
        assert_eq!(folds.len(), sets.len());
        let mut sizes = vec![0usize; k];
        for &f in &folds {
            sizes[f] += 1;
        }
        assert!(sizes.iter().all(|&s| s.abs_diff(60) <= 6), "{sizes:?}");
        // Seeded: the same seed gives the same folds, another seed others.
        assert_eq!(stratified_folds(&sets, 12, k, 3407).unwrap(), folds);
        assert_ne!(stratified_folds(&sets, 12, k, 1).unwrap(), folds);
        // Stratified: every label within 2 rows of its share in every fold, where a seeded
        // random assignment of the same fold sizes misses some label's share by more.
        let gap = worst_label_gap(&sets, &folds, k);
        assert!(gap <= 2.0, "worst gap {gap}");
        let mut shuffled = folds.clone();
        shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(5));
        let random_gap = worst_label_gap(&sets, &shuffled, k);
        assert!(random_gap > gap + 1.0, "random {random_gap} vs {gap}");
    }

    #[test]
    fn single_label_folds_are_exact_and_rare_labels_reach_two_folds() {
        // 5 labels of 10, 11, ..., 14 rows and one label of 2 rows.
        let mut sets: Vec<Vec<usize>> = (0..5)
            .flat_map(|l| std::iter::repeat_n(vec![l], 10 + l))
            .collect();
        sets.extend([vec![5], vec![5]]);
        let k = 4;
        let folds = stratified_folds(&sets, 6, k, 9).unwrap();
        for label in 0..6 {
            let mut per_fold = vec![0usize; k];
            for (set, &f) in sets.iter().zip(&folds) {
                if set.contains(&label) {
                    per_fold[f] += 1;
                }
            }
            let (lo, hi) = (
                per_fold.iter().min().unwrap(),
                per_fold.iter().max().unwrap(),
            );
            if label < 5 {
                assert!(hi - lo <= 1, "label {label}: {per_fold:?}");
            } else {
                assert_eq!(
                    per_fold.iter().filter(|&&c| c > 0).count(),
                    2,
                    "{per_fold:?}"
                );
            }
        }
        assert!(stratified_folds(&sets, 6, 1, 9).is_err());
        assert!(stratified_folds(&sets[..3], 6, 4, 9).is_err());
        assert!(stratified_folds(&[vec![7]], 6, 2, 9).is_err());
    }

    #[test]
    fn a_far_off_fraction_is_explained() {
        // 10 labels of 3 rows each: at 0.99 each keeps a training row, so 10 of 30 train.
        let sets: Vec<Vec<usize>> = (0..30).map(|i| vec![i % 10]).collect();
        let is_val = assign(&sets, 10, 0.99, 1);
        assert_eq!(is_val.iter().filter(|&&v| !v).count(), 10);
        let note = fraction_shortfall(&sets, &is_val, 10, 0.99).unwrap();
        assert!(
            note.contains("20 validation rows of 30 (66.7%)")
                && note.contains("fraction 0.99 asks for 29.7")
                && note.contains("on both sides (10 labels here)")
                && note.contains("the rarest, with 3 rows, keeps at least 1 (33.3%) for training"),
            "{note}"
        );
        let is_val = assign(&sets, 10, 0.5, 1);
        assert_eq!(fraction_shortfall(&sets, &is_val, 10, 0.5), None);
    }

    #[test]
    fn repair_moves_a_row_when_needed() {
        let sets = vec![vec![0, 1], vec![0, 1], vec![0], vec![0]];
        let mut sides = vec![TRAIN, TRAIN, VAL, TRAIN];
        repair_one_sided_labels(&sets, 2, 2, &mut sides);
        assert!(
            sides[0] == VAL || sides[1] == VAL,
            "label 1 must reach validation"
        );
    }
}
