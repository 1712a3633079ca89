//! Labelling every row of a cache with a trained checkpoint: probabilities, and the label sets
//! its tuned thresholds choose. Rows skipped at extraction (`extract --on-error skip`) have no
//! features to score: they are refused unless the caller says how to write them
//! ([`SkippedRows`]), and listed either way.

use crate::cache::{CacheReader, SkippedRow};
use crate::labelled::describe_skipped;
use crate::model::Model;
use anyhow::{Result, bail, ensure};
use candle_core::Device;
use std::collections::HashMap;

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
    if !left_out.is_empty() {
        let listed = describe_skipped(&left_out, reader.dir());
        match skipped {
            SkippedRows::Refuse => bail!(
                "{} rows of cache {} were skipped at extraction (`extract --on-error skip`): \
                 {listed}. Predictions without them would be incomplete: fix their images and \
                 extract into a new cache, or pass --allow-skipped empty (written with no labels) \
                 or --allow-skipped omit (left out)",
                left_out.len(),
                reader.dir().display()
            ),
            SkippedRows::Omit => tracing::warn!(
                "{} rows skipped at extraction are left out of the predictions: {listed}",
                left_out.len()
            ),
            SkippedRows::WriteEmpty => tracing::warn!(
                "{} rows skipped at extraction are written with no labels: {listed}",
                left_out.len()
            ),
        }
    }
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
    if skipped == SkippedRows::WriteEmpty && !predictions.skipped.is_empty() {
        predictions = with_empty_rows(predictions, reader)?;
    }
    Ok(predictions)
}

/// The predictions of the stored rows with the skipped ones in their dataset places, with no
/// labels and NaN probabilities.
fn with_empty_rows(stored: Predictions, reader: &CacheReader) -> Result<Predictions> {
    let k = stored.labels.len();
    let total = stored.ids.len() + stored.skipped.len();
    let (mut ids, mut probabilities, mut decisions) = (
        Vec::with_capacity(total),
        Vec::with_capacity(total * k),
        Vec::with_capacity(total * k),
    );
    let mut next = 0;
    for shard in &reader.manifest().shards {
        let skipped: HashMap<usize, &SkippedRow> =
            shard.skipped.iter().map(|s| (s.row, s)).collect();
        for position in shard.start..shard.end {
            if let Some(s) = skipped.get(&position) {
                ids.push(s.id.clone());
                probabilities.extend(std::iter::repeat_n(f32::NAN, k));
                decisions.extend(std::iter::repeat_n(false, k));
                continue;
            }
            ensure!(
                next < stored.ids.len(),
                "cache {}: its shards cover more rows than it stores",
                reader.dir().display()
            );
            ids.push(stored.ids[next].clone());
            probabilities.extend_from_slice(&stored.probabilities[next * k..(next + 1) * k]);
            decisions.extend_from_slice(&stored.decisions[next * k..(next + 1) * k]);
            next += 1;
        }
    }
    ensure!(
        next == stored.ids.len(),
        "cache {}: its shards cover {next} stored rows, it holds {}",
        reader.dir().display(),
        stored.ids.len()
    );
    Ok(Predictions {
        ids,
        probabilities,
        decisions,
        ..stored
    })
}
