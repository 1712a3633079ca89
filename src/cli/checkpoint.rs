//! `multiclip checkpoint seal`: accept a checkpoint's files as they are now, after a deliberate
//! edit of its model card or once for a checkpoint written before seals.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use multiclip::model::checkpoint::seal;

/// Work on a checkpoint's files.
#[derive(Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    command: CheckpointCommand,
}

#[derive(Subcommand)]
enum CheckpointCommand {
    Seal(SealArgs),
}

/// Seal a checkpoint as it is now: its model card (head, loss, labels, thresholds, inputs) is
/// checked on its own and against the weights, then the sidecar records the hashes that
/// `evaluate` and `predict` check before using it.
///
/// Needed after editing the model card on purpose (e.g. a threshold), and once for a checkpoint
/// written before multiclip sealed checkpoints. Whoever seals vouches for the files: a checkpoint
/// that was damaged or replaced is used as it is after sealing.
#[derive(Args)]
#[command(
    after_help = "Example:\n  multiclip checkpoint seal checkpoints/mlp_dinov2-sentence_smoothing_v1_lr0.003_bs256_seed3407_f1"
)]
struct SealArgs {
    /// Checkpoint: NAME, NAME.json or NAME.safetensors.
    checkpoint: PathBuf,
}

pub fn run(args: CheckpointArgs) -> Result<()> {
    match args.command {
        CheckpointCommand::Seal(a) => {
            let seal = seal(&a.checkpoint)?;
            println!(
                "sealed {} (weights sha256 {}, model card sha256 {})",
                a.checkpoint.display(),
                seal.weights_sha256,
                seal.card_sha256
            );
            Ok(())
        }
    }
}
