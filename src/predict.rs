//! Labelling every row of a cache with a trained checkpoint: probabilities, and the label sets
//! its tuned thresholds choose. Rows skipped at extraction (`extract --on-error skip`) have no
//! features to score: they are refused unless the caller says how to write them
//! ([`SkippedRows`]), and listed either way.

use crate::cache::{CacheReader, SkippedRow};
use crate::labelled::describe_skipped;
use crate::model::Model;
use anyhow::{Result, bail, ensure};
use candle_core::Device;

/// What to do with rows of the cache that were skipped at extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkippedRows {
    /// Refuse to predict: a submission missing rows is a silent loss.
    Refuse,
    /// Leave them out of the predictions.
    Omit,
    /// Write them in their place with no labels (and NaN probabilities), so that the file has
    /// every row of the dataset.
    WriteEmpty,
}

impl SkippedRows {
    /// The choices a user can make: `omit` and `empty`.
    pub const ALLOWED: [SkippedRows; 2] = [Self::Omit, Self::WriteEmpty];

    /// Refuses the skipped `rows` (that "N rows `origin`", e.g. "of cache X were skipped at
    /// extraction", listed as `listed`) or warns that they are left out or written empty.
    pub fn check(self, rows: &[&SkippedRow], origin: &str, listed: &str) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len();
        match self {
            SkippedRows::Refuse => bail!(
                "{n} rows {origin}: {listed}. Predictions without them would be incomplete: fix \
                 their images (and, for a cache, extract into a new one), or pass \
                 --allow-skipped empty (written with no labels) or --allow-skipped omit (left out)"
            ),
            SkippedRows::Omit => {
                tracing::warn!("{n} rows {origin} and are left out of the predictions: {listed}")
            }
            SkippedRows::WriteEmpty => {
                tracing::warn!("{n} rows {origin} and are written with no labels: {listed}")
            }
        }
        Ok(())
    }

    /// `omit` or `empty` (`refuse` for the default).
    pub fn name(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::Omit => "omit",
            Self::WriteEmpty => "empty",
        }
    }
}

/// Predictions of a checkpoint for every row of a cache.
pub struct Predictions {
    pub ids: Vec<String>,
    pub labels: Vec<String>,
    /// `[ids, labels]` row-major (NaN for a skipped row written empty).
    pub probabilities: Vec<f32>,
    pub decisions: Vec<bool>,
    /// The cache's rows skipped at extraction (written empty or left out, as asked).
    pub skipped: Vec<SkippedRow>,
}

/// Scores every row of `reader`'s cache and applies the checkpoint's thresholds; rows skipped at
/// extraction are handled as `skipped` says (and listed in a warning).
pub fn predict(
    model: &Model,
    reader: &CacheReader,
    batch_size: usize,
    at_least_one: bool,
    skipped: SkippedRows,
    device: &Device,
) -> Result<Predictions> {
    let left_out: Vec<&SkippedRow> = reader.manifest().skipped().collect();
    let origin = format!(
        "of cache {} were skipped at extraction (`extract --on-error skip`)",
        reader.dir().display()
    );
    skipped.check(
        &left_out,
        &origin,
        &describe_skipped(&left_out, reader.dir()),
    )?;
    let rows: Vec<usize> = (0..reader.len()).collect();
    let scores = model.score_rows(reader, &rows, batch_size, device, None)?;
    let decisions = model.decisions(&scores.probabilities, at_least_one);
    let mut predictions = Predictions {
        ids: reader.ids().to_vec(),
        labels: model.card.labels.clone(),
        probabilities: scores.probabilities,
        decisions,
        skipped: left_out.into_iter().cloned().collect(),
    };
    if skipped == SkippedRows::WriteEmpty {
        predictions = predictions.with_empty_rows()?;
    }
    Ok(predictions)
}

impl Predictions {
    /// These predictions with the skipped rows in their dataset places (by [`SkippedRow::row`]),
    /// with no labels and NaN probabilities.
    pub fn with_empty_rows(self) -> Result<Predictions> {
        let k = self.labels.len();
        let total = self.ids.len() + self.skipped.len();
        let (mut ids, mut probabilities, mut decisions) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total * k),
            Vec::with_capacity(total * k),
        );
        let mut skipped: Vec<&SkippedRow> = self.skipped.iter().collect();
        skipped.sort_by_key(|s| s.row);
        let (mut next, mut next_skipped) = (0, skipped.iter().peekable());
        for position in 0..total {
            if let Some(s) = next_skipped.next_if(|s| s.row == position) {
                ids.push(s.id.clone());
                probabilities.extend(std::iter::repeat_n(f32::NAN, k));
                decisions.extend(std::iter::repeat_n(false, k));
                continue;
            }
            ensure!(
                next < self.ids.len(),
                "skipped row {} lies beyond the {total} rows",
                next_skipped.peek().map_or(position, |s| s.row)
            );
            ids.push(self.ids[next].clone());
            probabilities.extend_from_slice(&self.probabilities[next * k..(next + 1) * k]);
            decisions.extend_from_slice(&self.decisions[next * k..(next + 1) * k]);
            next += 1;
        }
        Ok(Predictions {
            ids,
            probabilities,
            decisions,
            ..self
        })
    }
}
