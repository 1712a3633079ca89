//! `multiclip evaluate`: a checkpoint's metrics (at its tuned thresholds) on the validation,
//! training or test rows, as a summary table and a per-label table.

use super::{CacheCheck, DeviceArg, at_least_one_row, one_of};
use anyhow::Result;
use clap::Args;
use multiclip::evaluate::{EvalPart, EvaluateRequest, evaluate};
use multiclip::metrics::{LabelMetrics, Metrics};
use multiclip::model::score::SCORE_BATCH_ROWS;
use std::path::PathBuf;

/// Score a checkpoint on labelled rows of a cache.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Checkpoint: NAME, NAME.json or NAME.safetensors (e.g. checkpoints/mlp_..._f1).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Cache folder (default: the one the checkpoint was trained on).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Dataset folder with the labels (default: the checkpoint's).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split file (default: the checkpoint's, refused if it changed since).
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Which rows: the split's val or train ids, or the ids of the dataset's test_labels.csv.
    #[arg(long, default_value = "val", value_parser = one_of(&EvalPart::ALL, EvalPart::name))]
    pub part: EvalPart,
    /// Rows per forward pass.
    #[arg(long, default_value_t = SCORE_BATCH_ROWS, value_parser = at_least_one_row())]
    pub batch_size: usize,
    /// Do not force at least one label per sample.
    #[arg(long)]
    pub no_at_least_one: bool,
    #[command(flatten)]
    pub cache_check: CacheCheck,
    /// Where the head runs: cpu, cuda or cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceArg,
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    let request = EvaluateRequest {
        checkpoint: args.checkpoint,
        cache: args.cache,
        data: args.data,
        split: args.split,
        part: args.part,
        batch_size: args.batch_size,
        at_least_one: !args.no_at_least_one,
        device: args.device.open()?,
        integrity: args.cache_check.integrity(),
    };
    let evaluation = evaluate(&request)?;
    println!(
        "checkpoint {} on {} ({:?} part, {} rows), loss {:.4}",
        evaluation.name,
        evaluation.cache.display(),
        args.part,
        evaluation.rows,
        evaluation.loss
    );
    print_metrics(
        &evaluation.metrics,
        &evaluation.per_label,
        &evaluation.labels,
    );
    Ok(())
}

/// Prints the averages (micro, macro, weighted, samples), mAP and the per-label table.
pub fn print_metrics(metrics: &Metrics, per_label: &[LabelMetrics], labels: &[String]) {
    let a = &metrics.averages;
    println!();
    println!(
        "{:<10} {:>9} {:>9} {:>9}",
        "average", "precision", "recall", "F1"
    );
    for (name, prf) in [
        ("micro", a.micro),
        ("macro", a.macro_avg),
        ("weighted", a.weighted),
        ("samples", a.samples),
    ] {
        println!(
            "{name:<10} {:>9.4} {:>9.4} {:>9.4}",
            prf.precision, prf.recall, prf.f1
        );
    }
    println!(
        "mAP {:.4} (over {} labels with positives), micro-AP {:.4}, {} rows",
        metrics.map, metrics.labels_with_positives, metrics.micro_ap, metrics.rows
    );
    println!();
    let width = labels.iter().map(String::len).max().unwrap_or(5).max(5);
    println!(
        "{:<width$} {:>7} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9}",
        "label", "support", "predicted", "precision", "recall", "F1", "AP", "threshold"
    );
    for row in per_label {
        let name = labels.get(row.label).map(String::as_str).unwrap_or("?");
        let ap = row
            .average_precision
            .map_or("-".to_string(), |ap| format!("{ap:.4}"));
        println!(
            "{name:<width$} {:>7} {:>9} {:>9.4} {:>9.4} {:>7.4} {ap:>7} {:>9.4}",
            row.support, row.predicted, row.precision, row.recall, row.f1, row.threshold
        );
    }
}
