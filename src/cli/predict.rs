//! `multiclip predict`: label every row of a cache with a checkpoint and write the submission
//! file (`ImageID,Labels`) and, optionally, the probabilities.

use super::DeviceArg;
use anyhow::Result;
use clap::Args;
use multiclip::cache::CacheReader;
use multiclip::model::Model;
use multiclip::model::score::SCORE_BATCH_ROWS;
use multiclip::predict::predict;
use multiclip::submission::{write_predictions, write_probabilities};
use std::path::PathBuf;

/// Predict labels for every row of a cache.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Cache folder of the rows to label (e.g. cache/test).
    #[arg(long)]
    pub cache: PathBuf,
    /// Checkpoint: NAME, NAME.json or NAME.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Submission file to write: `ImageID,Labels`, labels space-separated in vocabulary order.
    #[arg(long, default_value = "predictions.csv")]
    pub out: PathBuf,
    /// Also write `ImageID,<label>,...` probabilities here.
    #[arg(long)]
    pub probabilities: Option<PathBuf>,
    /// Allow samples without any label (default: each gets at least its most likely one).
    #[arg(long)]
    pub no_at_least_one: bool,
    /// Rows per forward pass.
    #[arg(long, default_value_t = SCORE_BATCH_ROWS)]
    pub batch_size: usize,
    /// Where the head runs: cpu, cuda or cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceArg,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let device = args.device.open()?;
    let reader = CacheReader::open(&args.cache)?;
    let model = Model::load(&args.checkpoint, &device)?;
    let predictions = predict(
        &model,
        &reader,
        args.batch_size,
        !args.no_at_least_one,
        &device,
    )?;
    write_predictions(
        &args.out,
        &predictions.ids,
        &predictions.decisions,
        &predictions.labels,
    )?;
    println!(
        "{} rows labelled with {} -> {}",
        predictions.ids.len(),
        model.card.name,
        args.out.display()
    );
    if let Some(path) = &args.probabilities {
        write_probabilities(
            path,
            &predictions.ids,
            &predictions.probabilities,
            &predictions.labels,
        )?;
        println!("probabilities -> {}", path.display());
    }
    Ok(())
}
