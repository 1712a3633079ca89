//! The per-epoch record of a training run, kept in the checkpoint sidecar for reports.

use serde::{Deserialize, Serialize};

/// One epoch of training and its validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number within its stage.
    pub epoch: usize,
    /// `train` for the main run, or the multi-stage warm-up stage's name (e.g. `warmup:image`).
    pub stage: String,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    pub val_loss: f64,
    /// Validation micro- and macro-F1 with thresholds tuned on the validation part.
    pub val_micro_f1: f64,
    pub val_macro_f1: f64,
    pub val_map: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Wall-clock seconds of the epoch (training and validation).
    pub seconds: f64,
}
