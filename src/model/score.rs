//! Scoring without training: the probabilities of a head on a batch, and the thin loop that
//! scores cache rows in bounded batches streamed from the cache (validation, evaluation,
//! prediction).

use crate::cache::{Batch, BatchOrder, CacheReader};
use crate::heads::{Head, Inputs};
use crate::labelled::Targets;
use crate::loss::Loss;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Rows per forward pass when scoring without gradients (validation, evaluation, prediction): the
/// head runs them in its own micro-batches, so this bounds only the gathered inputs.
pub const SCORE_BATCH_ROWS: usize = 1024;

/// A cache batch as a head's inputs.
pub fn batch_inputs(batch: Batch) -> Inputs {
    batch.tensors.into_iter().collect()
}

/// Probabilities `[B, K]` of `head`, trained with `loss`, on a batch of inputs.
pub fn probabilities(head: &dyn Head, loss: &Loss, x: &Inputs) -> Result<Tensor> {
    let output = head.predict(x).context("head forward pass")?;
    Ok(loss.probabilities(&output)?)
}

/// The head's outputs on a set of rows.
#[derive(Debug, Clone)]
pub struct Scores {
    /// `[rows, num_labels]` row-major sigmoid probabilities, rows in the order requested.
    pub probabilities: Vec<f32>,
    /// Mean loss over the rows, when targets were given.
    pub loss: Option<f64>,
}

/// Probabilities of `head` on `rows`, `batch_size` rows at a time (in row order); with
/// `targets`, also the mean of `loss` over the rows.
pub fn score_rows(
    head: &dyn Head,
    loss: &Loss,
    reader: &CacheReader,
    rows: &[usize],
    batch_size: usize,
    device: &Device,
    targets: Option<&Targets>,
) -> Result<Scores> {
    anyhow::ensure!(batch_size >= 1, "a scoring batch needs at least one row");
    let names = head.inputs();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut probabilities = Vec::new();
    let mut loss_sum = 0f64;
    for batch in reader.batches(rows, batch_size, BatchOrder::Sequential, &names, device)? {
        let batch = batch?;
        let batch_rows = batch.rows.clone();
        let output = head
            .predict(&batch_inputs(batch))
            .context("head forward pass")?;
        if let Some(targets) = targets {
            let y = targets.gather(&batch_rows, device)?;
            let batch_loss = loss.compute(&output, &y)?.to_scalar::<f32>()?;
            loss_sum += batch_loss as f64 * batch_rows.len() as f64;
        }
        let probs = loss.probabilities(&output)?;
        probabilities.extend(probs.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Scores {
        probabilities,
        loss: targets.map(|_| loss_sum / rows.len().max(1) as f64),
    })
}
