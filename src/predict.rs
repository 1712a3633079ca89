//! Labelling every row of a cache with a trained checkpoint: probabilities, and the label sets
//! its tuned thresholds choose.

use crate::cache::CacheReader;
use crate::model::Model;
use anyhow::Result;
use candle_core::Device;

/// Predictions of a checkpoint for every row of a cache.
pub struct Predictions {
    pub ids: Vec<String>,
    pub labels: Vec<String>,
    /// `[ids, labels]` row-major.
    pub probabilities: Vec<f32>,
    pub decisions: Vec<bool>,
}

/// Scores every row of `reader`'s cache and applies the checkpoint's thresholds.
pub fn predict(
    model: &Model,
    reader: &CacheReader,
    batch_size: usize,
    at_least_one: bool,
    device: &Device,
) -> Result<Predictions> {
    let rows: Vec<usize> = (0..reader.len()).collect();
    let scores = model.score_rows(reader, &rows, batch_size, device, None)?;
    let decisions = model.decisions(&scores.probabilities, at_least_one);
    Ok(Predictions {
        ids: reader.ids().to_vec(),
        labels: model.card.labels.clone(),
        probabilities: scores.probabilities,
        decisions,
    })
}
