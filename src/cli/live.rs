//! The live path on the command line: where a checkpoint's backbone is loaded from and onto what
//! device (shared by `predict --data` and `serve`), and `predict --data`, which labels a dataset's
//! raw images and captions through the checkpoint's backbone with no cache in between.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use super::{DeviceArg, one_of};
use multiclip::cache::SkippedRow;
use multiclip::classify::Classifier;
use multiclip::classify::rows::{RowOptions, label_rows};
use multiclip::data::image::DEFAULT_MAX_PIXELS;
use multiclip::extract::{DEFAULT_BATCH_SIZE, OnError, PartSelection, SelectedRows};
use multiclip::predict::{Predictions, SkippedRows};

/// Where the checkpoint's backbone comes from and where it runs.
#[derive(Debug, Args)]
pub struct BackboneArgs {
    /// Folder under which the relative backbone locations recorded in the checkpoint are found
    /// (e.g. `models/dinov2-small` is read from DIR/models/dinov2-small); absolute locations and
    /// Hub repo ids are used as they are.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub backbone_root: PathBuf,
    /// Where the backbone and head run: cpu, cuda or cuda:N (needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// Images with more pixels than this are refused (checked from the header, before decoding).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,
}

impl BackboneArgs {
    /// The checkpoint at `checkpoint` on its live backbone.
    pub fn classifier(&self, checkpoint: &Path) -> Result<Classifier> {
        Classifier::load(checkpoint, &self.backbone_root, &self.device.open()?)
    }
}

/// `predict --data`: label raw images and captions instead of a cache.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Dataset folder to label from its raw images and captions, through the checkpoint's own
    /// backbone (no extract, no cache); instead of --cache.
    #[arg(long, value_name = "DIR", conflicts_with = "cache")]
    pub data: Option<PathBuf>,
    /// With --data: which csv files to label.
    #[arg(long, default_value = "test", requires = "data",
          value_parser = one_of(&PartSelection::ALL, PartSelection::name))]
    pub part: PartSelection,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// With --data: rows per backbone forward pass (as extract's --batch-size).
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, requires = "data")]
    pub backbone_batch_size: usize,
    /// With --data: a missing, corrupt or oversized image or an empty caption stops the run
    /// naming it (`fail`), or is left out and listed (`skip`; see --allow-skipped).
    #[arg(long, default_value = "fail", requires = "data",
          value_parser = one_of(&OnError::ALL, OnError::name))]
    pub on_error: OnError,
}

/// Labels the rows of `args.data` with the checkpoint at `checkpoint` on its live backbone: the
/// model's name and its predictions. Skipped rows are listed on stderr and handled as `skipped`
/// says (refused by default, as predict does for a cache).
pub fn predict_data(
    args: &DataArgs,
    data: &Path,
    checkpoint: &Path,
    head_batch_rows: usize,
    at_least_one: bool,
    skipped: SkippedRows,
) -> Result<(String, Predictions)> {
    let selected = SelectedRows::read(data, args.part)?;
    let classifier = args.backbone.classifier(checkpoint)?;
    let options = RowOptions {
        backbone_batch_size: args.backbone_batch_size,
        head_batch_rows,
        on_error: args.on_error,
        max_pixels: args.backbone.max_pixels,
        at_least_one,
    };
    let mut predictions = label_rows(&classifier, &selected, &options)?;
    for s in &predictions.skipped {
        eprintln!("skipped row {} ({}): {}", s.row, s.id, s.reason);
    }
    let left_out: Vec<&SkippedRow> = predictions.skipped.iter().collect();
    let origin = format!(
        "of {} could not be loaded (`--on-error skip`)",
        data.display()
    );
    skipped.check(&left_out, &origin, "listed above")?;
    if skipped == SkippedRows::WriteEmpty {
        predictions = predictions.with_empty_rows()?;
    }
    Ok((classifier.card().name.clone(), predictions))
}
