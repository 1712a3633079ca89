//! Stage 2 training on a memory-mapped cache: the epoch loop with streamed batches, AdamW with
//! decay exemptions and clipping, learning-rate schedules, early stopping with a copy of the best
//! weights, the multi-stage recipe, and checkpoints.

pub mod checkpoint;
pub mod early_stop;
pub mod history;
pub mod optim;
pub mod schedule;
