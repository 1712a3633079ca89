//! `multiclip serve`: a checkpoint behind HTTP (see `src/serve/`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use super::live::BackboneArgs;
use crate::serve::{BatchPolicy, Limits, ServeOptions};

const SERVE_HELP: &str = "\
Endpoints: POST /v1/classify (multipart `image` + `caption`, or JSON {\"image\": base64,
\"caption\": ...}); the Open Inference Protocol under /v2 (health, model metadata, infer with
IMAGE and CAPTION BYTES inputs); GET / (a page to try it); GET /metrics (Prometheus).

Examples:
  multiclip serve --checkpoint checkpoints/demo/mlp_dinov2-sentence_smoothing_v1_lr0.003_bs256_seed3407_f1
  curl -F image=@photo.png -F caption='A red lighthouse' http://127.0.0.1:8080/v1/classify";

/// Serve a checkpoint over HTTP: image + caption -> labels, with dynamic batching.
#[derive(Debug, Args)]
#[command(after_help = SERVE_HELP)]
pub struct ServeArgs {
    /// Checkpoint: NAME, NAME.json or NAME.safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Address to listen on (port 0 picks a free one; the first line printed says which).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Most samples in one forward pass.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_batch: usize,
    /// Longest a sample waits for others to share its forward pass.
    #[arg(long, default_value_t = 5, value_name = "MS")]
    max_wait_ms: u64,
    /// Most samples read, decoded, queued or computed at once; beyond, requests get 503 with
    /// Retry-After (and one infer request holds at most this many).
    #[arg(long, default_value_t = 128, value_name = "N")]
    max_queue: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 20, value_name = "MB")]
    max_body_mb: usize,
    /// Time a client has to send a request's body.
    #[arg(long, default_value_t = 30, value_name = "S")]
    read_timeout_s: u64,
    /// Time a client has to send a request's headers; also how long an idle connection stays
    /// open.
    #[arg(long, default_value_t = 10, value_name = "S")]
    header_timeout_s: u64,
    /// Most connections open at once (more wait to be accepted).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_connections: usize,
    /// On SIGTERM or Ctrl-C, time given to the requests in flight before exiting anyway.
    #[arg(long, default_value_t = 30, value_name = "S")]
    shutdown_timeout_s: u64,
    /// Allow samples without any label (default: each gets at least the label closest to its
    /// threshold).
    #[arg(long)]
    no_at_least_one: bool,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_batch == 0 || args.max_queue == 0 || args.max_body_mb == 0 {
        bail!("--max-batch, --max-queue and --max-body-mb must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::serve::run(ServeOptions {
        checkpoint: args.checkpoint,
        addr: args.addr,
        backbone_root: args.backbone.backbone_root.clone(),
        device: args.backbone.device.open()?,
        policy: BatchPolicy {
            max_batch: args.max_batch,
            max_wait: Duration::from_millis(args.max_wait_ms),
            queue: args.max_queue,
            at_least_one: !args.no_at_least_one,
        },
        limits: Limits {
            max_body: args.max_body_mb.saturating_mul(1 << 20),
            read_timeout: Duration::from_secs(args.read_timeout_s),
            max_pixels: args.backbone.max_pixels,
            max_samples: args.max_queue,
        },
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_s),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_s),
        decode_threads: cores,
    })
}
