//! Labelling dataset rows live (`multiclip predict --data`): the rows of the selected csv files
//! are read, decoded and run through the [`Classifier`] with no cache in between.
//!
//! The work is cut as extract + predict cut it, so that the numbers are the same bit for bit:
//! the backbone sees the windows [`extract::shard_windows`] forms in blocks of
//! [`extract::DEFAULT_SHARD_ROWS`] rows (extract's default shards), and the head sees the rows
//! that loaded, in dataset order, `head_batch_rows` at a time (as predict reads a cache). Memory
//! holds one block's head inputs. Bad rows follow extract's `--on-error`.

use super::Classifier;
use crate::backbone::Sample;
use crate::extract::{self, OnError, SelectedRows};
use crate::heads::Inputs;
use crate::predict::Predictions;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;

/// How to label rows.
#[derive(Clone, Debug)]
pub struct RowOptions {
    /// Rows per backbone forward pass (extract's `--batch-size`).
    pub backbone_batch_size: usize,
    /// Rows per head forward pass (predict's `--batch-size`).
    pub head_batch_rows: usize,
    pub on_error: OnError,
    pub max_pixels: u64,
    /// Every row gets at least its label closest to its threshold.
    pub at_least_one: bool,
}

/// Labels the rows of `selected` with `classifier`: predictions for the rows that loaded, and
/// the rows that did not (with `--on-error skip`) in [`Predictions::skipped`].
pub fn label_rows(
    classifier: &Classifier,
    selected: &SelectedRows,
    options: &RowOptions,
) -> Result<Predictions> {
    if options.backbone_batch_size == 0 || options.head_batch_rows == 0 {
        bail!("batch sizes must be at least 1");
    }
    let rows = &selected.rows;
    let mut ids = Vec::with_capacity(rows.len());
    let mut skipped = Vec::new();
    let mut probabilities = Vec::new();
    let mut pending: Vec<Inputs> = Vec::new();
    for start in (0..rows.len()).step_by(extract::DEFAULT_SHARD_ROWS) {
        let block = start..(start + extract::DEFAULT_SHARD_ROWS).min(rows.len());
        let windows = extract::shard_windows(
            rows,
            block,
            options.backbone_batch_size,
            classifier.needs_text(),
        );
        let mut block_rows = Vec::new();
        for window in windows {
            let (loaded, window_skipped) = extract::load_window(
                selected,
                &window,
                (classifier.needs_images(), classifier.needs_text()),
                options.max_pixels,
                options.on_error,
            )?;
            skipped.extend(window_skipped);
            if loaded.is_empty() {
                continue;
            }
            let (positions, samples): (Vec<usize>, Vec<Sample>) = loaded.into_iter().unzip();
            let features = classifier
                .features(classifier.prepare(&samples)?)
                .with_context(|| describe(&samples))?;
            for (k, position) in positions.into_iter().enumerate() {
                block_rows.push((position, row_of(&features, k)?));
            }
        }
        block_rows.sort_by_key(|(position, _)| *position);
        for (position, features) in block_rows {
            ids.push(rows[position].id.clone());
            pending.push(features);
            if pending.len() == options.head_batch_rows {
                probabilities.extend(classifier.probabilities(&stack(&pending)?)?);
                pending.clear();
            }
        }
    }
    if !pending.is_empty() {
        probabilities.extend(classifier.probabilities(&stack(&pending)?)?);
    }
    let decisions = classifier.decisions(&probabilities, options.at_least_one);
    Ok(Predictions {
        ids,
        labels: classifier.card().labels.clone(),
        probabilities,
        decisions,
        skipped,
    })
}

fn describe(samples: &[Sample]) -> String {
    let ids: Vec<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    format!("backbone forward pass on rows {}", ids.join(", "))
}

/// Row `k` of every input of a batch, each `[1, ...]`.
fn row_of(features: &Inputs, k: usize) -> Result<Inputs> {
    features
        .iter()
        .map(|(name, value)| Ok((name.clone(), value.narrow(0, k, 1)?)))
        .collect()
}

/// Rows of head inputs (`[1, ...]` each) as one batch (`[rows, ...]` per input).
fn stack(rows: &[Inputs]) -> Result<Inputs> {
    let Some(first) = rows.first() else {
        return Ok(Inputs::new());
    };
    first
        .keys()
        .map(|name| {
            let parts: Vec<&Tensor> = rows.iter().map(|row| &row[name]).collect();
            Ok((name.clone(), Tensor::cat(&parts, 0)?))
        })
        .collect()
}
