//! `multiclip predict`: label every row of a cache (or, with `--data`, a dataset's raw images and
//! captions, see `live.rs`) with a checkpoint and write the submission file (`ImageID,Labels`)
//! and, optionally, the probabilities.

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use multiclip::cache::CacheReader;
use multiclip::model::Model;
use multiclip::model::score::SCORE_BATCH_ROWS;
use multiclip::predict::predict;
use multiclip::submission::{write_predictions, write_probabilities};
use std::path::PathBuf;

/// Predict labels for every row of a cache, or of a dataset's raw images (--data).
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Cache folder of the rows to label (e.g. cache/test).
    #[arg(long, required_unless_present = "data")]
    pub cache: Option<PathBuf>,
    #[command(flatten)]
    pub live: super::live::DataArgs,
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
}

pub fn run(args: PredictArgs) -> Result<()> {
    let (name, predictions) = match (&args.cache, &args.live.data) {
        (Some(cache), _) => {
            let device = Device::Cpu;
            let reader = CacheReader::open(cache)?;
            let model = Model::load(&args.checkpoint, &device)?;
            let predictions = predict(
                &model,
                &reader,
                args.batch_size,
                !args.no_at_least_one,
                &device,
            )?;
            (model.card.name, predictions)
        }
        (None, Some(data)) => super::live::predict_data(
            &args.live,
            data,
            &args.checkpoint,
            args.batch_size,
            !args.no_at_least_one,
        )?,
        (None, None) => bail!("give --cache or --data"),
    };
    write_predictions(
        &args.out,
        &predictions.ids,
        &predictions.decisions,
        &predictions.labels,
    )?;
    println!(
        "{} rows labelled with {} -> {}",
        predictions.ids.len(),
        name,
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
