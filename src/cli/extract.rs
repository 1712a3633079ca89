//! `multiclip extract`: stage 1, run a frozen backbone over a dataset into a cache directory.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::{DeviceArg, at_least_one_row, one_of};
use multiclip::backbone::{self, Compute};
use multiclip::cache::{StoredDtype, WorkerSlot};
use multiclip::data::image::DEFAULT_MAX_PIXELS;
use multiclip::extract::{
    DEFAULT_BATCH_SIZE, DEFAULT_SHARD_ROWS, ExtractOptions, OnError, PartSelection, SelectedRows,
    extract, extract_label_names,
};
use multiclip::tensor_ops::{Precision, device_name};

const EXTRACT_HELP: &str = "\
The cache is resumable: re-running the same command after a crash or kill computes only the
missing shards. A different backbone, dataset, precision or option into an existing cache is
refused; another --device with the same --precision may resume it.

Several machines: give every worker the same arguments plus --num-workers N --worker-index I
(or run it as a Slurm array / Kubernetes Indexed Job, which set them), then run
`multiclip cache merge OUT` once all have finished.

Examples:
  multiclip extract --data data/demo --part all \\
      --backbone dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2 --out cache/demo
  multiclip extract --data data/demo --backbone blip:Salesforce/blip-itm-large-coco \\
      --out cache/demo-blip --device cuda --precision bf16 --batch-size 256
  sbatch --array=0-7 --wrap 'multiclip extract --data /data/comp --part all \\
      --backbone dinov2:facebook/dinov2-base --out /shared/cache/comp --device cuda'";

/// Skipped rows listed in the summary (all are in the manifest).
const SKIPPED_SHOWN: usize = 20;

/// Run a frozen backbone over a dataset and write the embedding cache (stage 1).
#[derive(Args)]
#[command(after_help = EXTRACT_HELP)]
pub struct ExtractArgs {
    /// Dataset folder (train.csv and/or test.csv, images in data/).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Which csv files to extract: train.csv, test.csv or both (`all`).
    #[arg(long, default_value = "all", value_parser = one_of(&PartSelection::ALL, PartSelection::name))]
    part: PartSelection,
    /// Backbone spec, `family:location[:key=value,...]`, several joined by `+`, e.g.
    /// `dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2` or
    /// `clip:openai/clip-vit-base-patch32:template="A photo of {caption}",image_tokens=true`.
    #[arg(long, value_name = "SPEC")]
    backbone: String,
    /// Cache directory to create or resume, e.g. cache/demo-dinov2.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rows per forward pass.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = at_least_one_row())]
    batch_size: usize,
    /// Dataset rows per shard file (memory holds one shard's outputs).
    #[arg(long, default_value_t = DEFAULT_SHARD_ROWS, value_parser = at_least_one_row())]
    shard_rows: usize,
    /// Stored type of float outputs (masks are always u8).
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    dtype: String,
    /// Where the model runs: cpu, cuda (the first GPU) or cuda:N (needs a build with
    /// `--features cuda`). Decoding and preprocessing run on the CPU cores either way.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceArg,
    /// Number type of the forward pass: f32, bf16 or f16 [default: bf16 on cuda, f32 on cpu].
    /// Part of the cache's identity; the stored type is --dtype.
    #[arg(long, value_parser = one_of(&Precision::ALL, Precision::name))]
    precision: Option<Precision>,
    /// Number of worker processes sharing the job [default: SLURM_ARRAY_TASK_COUNT,
    /// MULTICLIP_NUM_WORKERS, else 1].
    #[arg(long, value_name = "N")]
    num_workers: Option<usize>,
    /// This worker's 0-based index [default: SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN),
    /// JOB_COMPLETION_INDEX].
    #[arg(long, value_name = "I")]
    worker_index: Option<usize>,
    /// A missing, corrupt or oversized image or an empty caption: stop with an error naming it
    /// (`fail`), or record the row as skipped in the manifest and go on (`skip`).
    #[arg(long, default_value = "fail", value_parser = one_of(&OnError::ALL, OnError::name))]
    on_error: OnError,
    /// Images with more pixels than this are refused (checked from the header, before decoding).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// CPU threads for decoding, preprocessing and the model [default: all cores].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Prepared batches queued ahead of the model.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = at_least_one_row())]
    prefetch: usize,
    /// Also embed the label names of train.csv (the tokens, `_` read as a space, or the names of
    /// DATA/label_names.csv `label,name`) with the backbone's text encoder and store them in the
    /// cache (`label-names.safetensors`), for heads with `queries=labels`. On a finished cache
    /// the same command adds just them.
    #[arg(long)]
    label_names: bool,
}

pub fn run(args: ExtractArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        set_threads(threads)?;
    }
    let slot = WorkerSlot::resolve(args.num_workers, args.worker_index, |name| {
        std::env::var(name).ok()
    })?;
    let device = args.device.open()?;
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_for(&device));
    let selected = SelectedRows::read(&args.data, args.part)?;
    let model = backbone::load(&args.backbone, Compute::new(&device, precision))?;
    let options = ExtractOptions {
        out: args.out.clone(),
        batch_size: args.batch_size,
        shard_rows: args.shard_rows,
        dtype: args.dtype.parse::<StoredDtype>()?,
        precision,
        device: device_name(&device),
        slot,
        on_error: args.on_error,
        max_pixels: args.max_pixels,
        prefetch: args.prefetch,
        progress: true,
    };
    let summary = extract(model.as_ref(), &selected, &options)?;

    println!(
        "extracted {} with {} ({} on {})",
        args.out.display(),
        args.backbone,
        precision.name(),
        args.device
    );
    println!(
        "  worker       {} of {} (owns {} of {} shards)",
        slot.index, slot.count, summary.shards_owned, summary.shards_total
    );
    println!(
        "  shards       {} written, {} reused from an earlier run",
        summary.shards_written, summary.shards_reused
    );
    println!(
        "  rows         {} in the dataset, {} computed now in {:.1} s ({:.1} rows/s)",
        summary.dataset_rows,
        summary.rows_processed,
        summary.elapsed.as_secs_f64(),
        summary.rows_per_second()
    );
    println!(
        "  time         {:.1} s in the model, {:.1} s waiting for decoded input",
        summary.forward.as_secs_f64(),
        summary.input_wait.as_secs_f64()
    );
    println!("  skipped      {} rows", summary.skipped.len());
    for s in summary.skipped.iter().take(SKIPPED_SHOWN) {
        println!("    row {} ({}): {}", s.row, s.id, s.reason);
    }
    if summary.skipped.len() > SKIPPED_SHOWN {
        println!(
            "    ... and {} more (`multiclip cache info --skipped 0` lists all)",
            summary.skipped.len() - SKIPPED_SHOWN
        );
    }
    println!("  index        {}", summary.index_file.display());
    if args.label_names {
        let names = extract_label_names(model.as_ref(), &args.data, &selected, &options)?;
        println!(
            "  label names  {} embedded, {}-d in the space of `{}`: {}",
            names.labels,
            names.dim,
            names.output,
            names.file.display()
        );
    }
    if !slot.is_single() {
        println!(
            "  next         when every worker has finished: multiclip cache merge {}",
            args.out.display()
        );
    }
    Ok(())
}

/// `--threads`: the size of the process's rayon pool, on which decoding, preprocessing, the fused
/// kernels and candle's matrix products run. A process has one such pool and it cannot be resized,
/// so the first `--threads` of a process sets it; a later extract stage of the same `multiclip
/// run` that asks for another count (or comes after the pool was started at its default size)
/// runs with the pool as it is and says so, rather than fail.
///
/// candle also splits each matrix product into `RAYON_NUM_THREADS` tasks (else one per core).
/// That variable is set to the same count, but only while this is the process's only thread
/// (always so for `multiclip extract`): writing the environment while another thread may read it
/// is undefined behaviour.
fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    static FIRST: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    FIRST.call_once(|| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads);
        if only_thread_of_process() {
            // SAFETY: no other thread exists (checked just above), so none can read the
            // environment while it is written.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
            tracing::debug!("RAYON_NUM_THREADS={threads}");
            result = pool
                .build_global()
                .map_err(|e| anyhow::anyhow!("cannot set up {threads} threads: {e}"));
        } else {
            // Fails when an earlier stage already started the pool: the check below says so.
            let _ = pool.build_global();
        }
    });
    result?;
    let pool = rayon::current_num_threads();
    if pool != threads {
        tracing::warn!(
            "--threads {threads}: this process already runs a pool of {pool} CPU threads (set by \
             an earlier stage); the extraction uses those {pool}"
        );
    }
    Ok(())
}

/// Whether the calling thread is the process's only one (Linux: `/proc/self/task`; elsewhere
/// unknown, so no).
fn only_thread_of_process() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}
