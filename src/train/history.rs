//! The per-epoch record of a training run, kept in the checkpoint sidecar for reports.

use serde::{Deserialize, Serialize};

/// One epoch of training and, for the main stage, its validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// `train` for the main run, `warmup:<part>` for a multi-stage warm-up stage.
    pub stage: String,
    /// 1-based epoch number within its stage.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Micro-F1 of the epoch's own training outputs, thresholds tuned on them (warm-up stages).
    pub train_micro_f1: Option<f64>,
    /// Validation loss, micro/macro-F1 with thresholds tuned on validation, and mAP (main stage).
    pub val_loss: Option<f64>,
    pub val_micro_f1: Option<f64>,
    pub val_macro_f1: Option<f64>,
    pub val_map: Option<f64>,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Wall-clock seconds of the epoch's training pass alone.
    pub train_seconds: f64,
    /// Wall-clock seconds of the whole epoch (training and validation).
    pub seconds: f64,
}
