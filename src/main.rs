//! The `multiclip` command line: parse, call the library, print. Each command's arguments and
//! runner live in `src/cli/<command>.rs`; the HTTP server of `multiclip serve` in `src/serve/`.

use clap::{Parser, Subcommand};

mod cli;
mod serve;

/// Multimodal, multi-label classification on frozen vision-language backbones.
///
/// Stage 1 (`extract`) runs a frozen backbone once and caches embeddings; stage 2 (`train`,
/// `evaluate`, `predict`) trains light heads on the cache, many times, on any small machine.
#[derive(Parser)]
#[command(name = "multiclip", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect a dataset folder, print its parsed records, or write its train/validation split.
    Dataset(cli::dataset::DatasetArgs),
    /// Run a frozen backbone over a dataset and write the embedding cache (stage 1).
    Extract(cli::extract::ExtractArgs),
    /// Show, verify or merge an embedding cache.
    Cache(cli::cache::CacheArgs),
    /// Train a head on a cache; tune thresholds on validation; save a checkpoint.
    Train(cli::train::TrainArgs),
    /// Metrics of a checkpoint on the validation, training or test rows.
    Evaluate(cli::evaluate::EvaluateArgs),
    /// Label every row of a cache with a checkpoint (submission csv).
    Predict(cli::predict::PredictArgs),
    /// Seal a checkpoint's files as they are now (after a deliberate edit of its model card).
    Checkpoint(cli::checkpoint::CheckpointArgs),
    /// Run a pipeline file (pipelines/*.toml): split, extract, train, evaluate, predict.
    Run(cli::run::RunArgs),
    /// Serve a checkpoint over HTTP: image + caption -> labels, with dynamic batching.
    Serve(cli::serve::ServeArgs),
    /// Train a grid of configurations over one cache (local processes or a Slurm array), rank
    /// them on validation, average the best.
    Sweep(cli::sweep::SweepArgs),
}

fn main() -> anyhow::Result<()> {
    multiclip::runtime::keep_freed_memory();
    multiclip::runtime::single_threaded_elementwise_by_default();
    cli::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Dataset(args) => cli::dataset::run(args),
        Command::Extract(args) => cli::extract::run(args),
        Command::Cache(args) => cli::cache::run(args),
        Command::Train(args) => cli::train::run(args).map(drop),
        Command::Evaluate(args) => cli::evaluate::run(args),
        Command::Predict(args) => cli::predict::run(args),
        Command::Checkpoint(args) => cli::checkpoint::run(args),
        Command::Run(args) => cli::run::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Sweep(args) => cli::sweep::run(args),
    }
}
