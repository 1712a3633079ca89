//! The maths of one optimisation step on a batch: the mean loss and its gradients, computed over
//! micro-batches so that memory stays bounded whatever the batch size.

use crate::heads::{Inputs, batch_size, micro_batches};
use candle_core::{Result, Tensor};

/// What [`loss_and_grads`] returns for a batch.
pub struct BatchGrads {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Gradients of the mean loss for the variables asked for.
    pub grads: candle_core::backprop::GradStore,
    /// The forward pass's outputs `[B, K]`, detached.
    pub outputs: Tensor,
}

/// Mean loss, its gradients and the outputs for a batch of any size, computed over micro-batches
/// of `rows` samples whose gradients are summed (weighted by their share of the batch): the same
/// numbers as one pass over the whole batch for a loss that is a mean over samples, with memory
/// bounded by `rows` and no extra cost per sample for large batches ([`crate::heads::MICRO_BATCH_ROWS`] is a
/// good `rows`). `forward` is e.g. `|x| head.forward(x, true)` or a part's forward; `loss(outputs,
/// targets)` returns the mean loss of a micro-batch; `targets` are split like `x`; `vars` are
/// the variables to differentiate (e.g. `varmap.all_vars()`). Dropout draws continue from the
/// head's streams in micro-batch order.
pub fn loss_and_grads(
    forward: &dyn Fn(&Inputs) -> Result<Tensor>,
    x: &Inputs,
    targets: &Tensor,
    rows: usize,
    vars: &[candle_core::Var],
    loss: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<BatchGrads> {
    let total = batch_size(x)?;
    if targets.dim(0)? != total {
        candle_core::bail!("{} target rows for a batch of {total}", targets.dim(0)?);
    }
    let mut grads = candle_core::backprop::GradStore::default();
    let mut mean_loss = 0f32;
    let mut outputs = Vec::new();
    let mut start = 0;
    for chunk in micro_batches(x, rows)? {
        let len = batch_size(&chunk)?;
        let share = len as f64 / total as f64;
        let output = forward(&chunk)?;
        let chunk_loss = (loss(&output, &targets.narrow(0, start, len)?)? * share)?;
        mean_loss += chunk_loss
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        let chunk_grads = chunk_loss.backward()?;
        for var in vars {
            if let Some(g) = chunk_grads.get(var.as_tensor()) {
                let g = match grads.get(var.as_tensor()) {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                };
                grads.insert(var.as_tensor(), g);
            }
        }
        outputs.push(output.detach());
        start += len;
    }
    Ok(BatchGrads {
        loss: mean_loss,
        grads,
        outputs: Tensor::cat(&outputs, 0)?,
    })
}
