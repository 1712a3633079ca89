//! The live path on the command line: where a checkpoint's backbone is loaded from and onto what
//! device (shared by `predict --data` and `serve`), and `predict --data`, which labels a dataset's
//! raw images and captions through the checkpoint's backbone with no cache in between.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;

use super::one_of;
use multiclip::classify::Classifier;
use multiclip::classify::rows::{RowOptions, label_rows};
use multiclip::data::image::DEFAULT_MAX_PIXELS;
use multiclip::extract::{DEFAULT_BATCH_SIZE, OnError, PartSelection, SelectedRows};
use multiclip::predict::Predictions;

/// Where the checkpoint's backbone comes from and where it runs.
#[derive(Debug, Args)]
pub struct BackboneArgs {
    /// Folder under which the relative backbone locations recorded in the checkpoint are found
    /// (e.g. `models/dinov2-small` is read from DIR/models/dinov2-small); absolute locations and
    /// Hub repo ids are used as they are.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub backbone_root: PathBuf,
    /// Where the backbone and head run (`cuda` needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
    /// Images with more pixels than this are refused (checked from the header, before decoding).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,
}

impl BackboneArgs {
    pub fn device(&self) -> Result<Device> {
        Ok(match self.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(0)?,
            other => bail!("unknown device {other:?}"),
        })
    }

    /// The checkpoint at `checkpoint` on its live backbone.
    pub fn classifier(&self, checkpoint: &Path) -> Result<Classifier> {
        Classifier::load(checkpoint, &self.backbone_root, &self.device()?)
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
    /// Write the predictions even though rows were skipped (they are listed on stderr and are
    /// not in the files); without it, skipped rows fail the run.
    #[arg(long)]
    pub allow_skipped: bool,
}

/// Labels the rows of `args.data` with the checkpoint at `checkpoint` on its live backbone: the
/// model's name and its predictions. Skipped rows are listed on stderr, and refused unless
/// `--allow-skipped`.
pub fn predict_data(
    args: &DataArgs,
    data: &Path,
    checkpoint: &Path,
    head_batch_rows: usize,
    at_least_one: bool,
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
    let labelled = label_rows(&classifier, &selected, &options)?;
    for s in &labelled.skipped {
        eprintln!("skipped row {} ({}): {}", s.row, s.id, s.reason);
    }
    if !labelled.skipped.is_empty() && !args.allow_skipped {
        bail!(
            "{} of {} rows of {} could not be labelled (listed above); pass --allow-skipped to \
             write the predictions without them",
            labelled.skipped.len(),
            selected.rows.len(),
            data.display()
        );
    }
    Ok((classifier.card().name.clone(), labelled.predictions))
}
