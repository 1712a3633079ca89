//! `multiclip predict`: label every row of a cache (or, with `--data`, a dataset's raw images and
//! captions, see `live.rs`) with a checkpoint and write the submission file (`ImageID,Labels`)
//! and, optionally, the probabilities.

use super::{CacheCheck, at_least_one_row, one_of};
use anyhow::{Result, bail};
use clap::Args;
use multiclip::cache::CacheReader;
use multiclip::model::Model;
use multiclip::model::score::SCORE_BATCH_ROWS;
use multiclip::predict::{SkippedRows, predict};
use multiclip::submission::{same_file, write_predictions, write_probabilities};
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
    /// Allow samples without any label (default: each gets at least the label closest to its
    /// threshold).
    #[arg(long)]
    pub no_at_least_one: bool,
    /// Rows per forward pass.
    #[arg(long, default_value_t = SCORE_BATCH_ROWS, value_parser = at_least_one_row())]
    pub batch_size: usize,
    /// Predict although rows were skipped (at extraction for a cache, `extract --on-error
    /// skip`; with --data, `--on-error skip`): write them with no labels (`empty`, NaN probabilities: the file keeps every row) or
    /// leave them out (`omit`). They are listed either way; without this flag they are refused.
    #[arg(long, value_name = "omit|empty", value_parser = one_of(&SkippedRows::ALLOWED, SkippedRows::name))]
    pub allow_skipped: Option<SkippedRows>,
    #[command(flatten)]
    pub cache_check: CacheCheck,
}

/// Checks the arguments without reading anything: the two outputs must be two files.
pub fn check(args: &PredictArgs) -> Result<()> {
    if let Some(probabilities) = &args.probabilities
        && same_file(&args.out, probabilities)
    {
        bail!(
            "--out {} and --probabilities {} name the same file: one would overwrite the other",
            args.out.display(),
            probabilities.display()
        );
    }
    Ok(())
}

pub fn run(args: PredictArgs) -> Result<()> {
    check(&args)?;
    let skipped = args.allow_skipped.unwrap_or(SkippedRows::Refuse);
    let (name, predictions) = match (&args.cache, &args.live.data) {
        (Some(cache), _) => {
            let device = args.live.backbone.device.open()?;
            let reader = CacheReader::open_with(cache, args.cache_check.integrity())?;
            let model = Model::load(&args.checkpoint, &device)?;
            let predictions = predict(
                &model,
                &reader,
                args.batch_size,
                !args.no_at_least_one,
                skipped,
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
            skipped,
        )?,
        (None, None) => bail!("give --cache or --data"),
    };
    write_predictions(
        &args.out,
        &predictions.ids,
        &predictions.decisions,
        &predictions.labels,
    )?;
    let note = match (predictions.skipped.len(), skipped) {
        (0, _) => String::new(),
        (n, SkippedRows::WriteEmpty) => format!(" ({n} skipped at extraction, with no labels)"),
        (n, _) => format!(" ({n} skipped at extraction left out)"),
    };
    println!(
        "{} rows labelled with {} -> {}{note}",
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
