//! `multiclip train`: train a head on a cache, tune thresholds on validation, save a checkpoint
//! and print the validation metrics; with `--folds K`, a k-fold ensemble of K such heads.

use super::evaluate::print_metrics;
use super::{CacheCheck, DeviceArg, one_of};
use anyhow::{Context, Result, bail};
use clap::Args;
use multiclip::heads::HeadConfig;
use multiclip::loss::Loss;
use multiclip::tensor_ops::Precision;
use multiclip::train::TrainConfig;
use multiclip::train::early_stop::Criterion;
use multiclip::train::ensemble::EnsembleReport;
use multiclip::train::folds::FoldRows;
use multiclip::train::kfold::{KFoldRequest, train_folds};
use multiclip::train::memory::MemoryLimit;
use multiclip::train::run::{TrainRequest, train};
use multiclip::train::schedule::ScheduleKind;
use std::path::{Path, PathBuf};

/// Train a head on cached features.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Cache folder written by `multiclip extract` (e.g. cache/demo).
    #[arg(long)]
    pub cache: PathBuf,
    /// Split file with the training and validation ids (`multiclip dataset split`).
    #[arg(long)]
    pub split: PathBuf,
    /// Dataset folder the cache was extracted from; its train.csv gives the labels.
    #[arg(long)]
    pub data: PathBuf,
    /// Head kind with options: `mlp`, `mlp:hidden=0` (linear probe), `router`,
    /// `router:inputs=image+text`, `ensemble`, `gat`, `ml_decoder:input=multimodal_tokens`.
    /// Inputs default to the cache's outputs.
    #[arg(long, required_unless_present = "head_config")]
    pub head: Option<String>,
    /// Full head configuration instead of --head: a JSON or TOML file, or inline JSON/TOML
    /// (with `kind = "..."`).
    #[arg(long, conflicts_with = "head")]
    pub head_config: Option<String>,
    /// Loss, with any parameters by name: bce, smoothing[:epsilon=E], focal[:alpha=A,gamma=G],
    /// margin[:scale=S,margin=M], angular[:scale=S,margin=M], zlpr,
    /// asl[:gamma_neg=G,gamma_pos=G,clip=C], e.g. `focal:gamma=3`. The default, label smoothing,
    /// was the best loss averaged over every head on real data (docs/results.md).
    #[arg(long, default_value_t = Loss::default())]
    pub loss: Loss,
    /// Peak learning rate.
    #[arg(long, default_value_t = TrainConfig::default().lr, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Rows per forward pass when scoring validation rows (default: the batch size).
    #[arg(long)]
    pub eval_batch_size: Option<usize>,
    /// Maximum epochs (early stopping usually ends sooner).
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Epochs without improvement before stopping.
    #[arg(long, default_value_t = TrainConfig::default().patience)]
    pub patience: usize,
    /// Validation number that picks the best epoch: micro-f1 (after threshold tuning), map
    /// or loss.
    #[arg(long, default_value_t = TrainConfig::default().criterion)]
    pub metric: Criterion,
    /// Learning-rate schedule after the warm-up: constant or cosine.
    #[arg(long, default_value_t = TrainConfig::default().schedule)]
    pub schedule: ScheduleKind,
    #[arg(long, default_value_t = TrainConfig::default().warmup_epochs, allow_negative_numbers = true)]
    pub warmup_epochs: f64,
    /// Decoupled weight decay (biases and norms are exempt).
    #[arg(long, default_value_t = TrainConfig::default().adamw.weight_decay, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Maximum global gradient norm; 0 turns clipping off.
    #[arg(long, default_value_t = TrainConfig::default().clip_grad.unwrap_or(0.0), allow_negative_numbers = true)]
    pub clip_grad: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Warm up each part of the head (router experts) until it plateaus, then train the whole.
    #[arg(long)]
    pub multistage: bool,
    /// Refuse to start when the head, its optimiser state and a batch need more memory than
    /// this: a size (`512M`, `16G`), `available` (what the machine and its cgroup have free
    /// now) or `none` (no check).
    #[arg(long, default_value = "available", value_name = "SIZE")]
    pub memory_limit: MemoryLimit,
    /// Folder of the checkpoints.
    #[arg(long, default_value = "checkpoints")]
    pub out: PathBuf,
    /// Where the head runs: cpu, cuda or cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// Checkpoint name (refused if it exists); default
    /// `{head}_{backbone}_{loss}_v{N}_lr{lr}_bs{batch}_seed{seed}_{metric}` with the first free N
    /// (`..._{K}fold` for a k-fold ensemble).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub cache_check: CacheCheck,
    /// Refuse, before training, a head whose saved weights exceed this many MB (10^6 bytes; all
    /// members of a k-fold ensemble together).
    #[arg(long)]
    pub max_head_mb: Option<f64>,
    /// Number type of the head's matrix products: f32, or bf16 (CPU: bf16 operands with f32
    /// sums in the forward and backward products, on AVX512-BF16 where the CPU has it; weights,
    /// optimiser state and loss stay f32). Recorded in the checkpoint.
    #[arg(long, default_value = "f32", value_parser = one_of(&TrainConfig::PRECISIONS, Precision::name))]
    pub precision: Precision,
    /// Train a k-fold ensemble: K members, each trained on K-1 stratified folds and validated on
    /// its own; thresholds tuned on the out-of-fold probabilities; the members' probabilities
    /// averaged. Members are saved as NAME.fold-I-of-K beside the ensemble's NAME.json.
    #[arg(long, value_name = "K")]
    pub folds: Option<usize>,
    /// Rows the folds cover: `all` (the split's training and validation ids: no row held out)
    /// or `train` (the validation ids measure the finished ensemble).
    #[arg(long, default_value = "all", value_parser = one_of(&FoldRows::ALL, FoldRows::name), requires = "folds")]
    pub fold_rows: FoldRows,
    /// Members trained at once (each on its share of the CPU threads).
    #[arg(long, default_value_t = 1, requires = "folds")]
    pub jobs: usize,
}

/// `--head-config`: a file (JSON, or TOML by extension) or inline JSON/TOML.
fn parse_head_config(text_or_path: &str) -> Result<HeadConfig> {
    let path = Path::new(text_or_path);
    let (text, origin) = if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading head configuration {}", path.display()))?;
        (text, path.display().to_string())
    } else {
        (text_or_path.to_string(), "--head-config".to_string())
    };
    let json = serde_json::from_str::<HeadConfig>(&text);
    match json {
        Ok(config) => Ok(config),
        Err(json_error) => toml::from_str::<HeadConfig>(&text).map_err(|toml_error| {
            anyhow::anyhow!(
                "{origin} is neither a JSON head configuration ({json_error}) nor a TOML one \
                 ({toml_error})"
            )
        }),
    }
}

/// The training run the arguments ask for (nothing read yet but a `--head-config` file).
fn request(args: &TrainArgs) -> Result<TrainRequest> {
    let head = match (&args.head, &args.head_config) {
        (_, Some(config)) => parse_head_config(config)?,
        (Some(spec), None) => spec.parse::<HeadConfig>()?,
        (None, None) => bail!("give the head with --head KIND or --head-config"),
    };
    let defaults = TrainConfig::default();
    let config = TrainConfig {
        lr: args.lr,
        batch_size: args.batch_size,
        eval_batch_size: args.eval_batch_size.unwrap_or(args.batch_size),
        epochs: args.epochs,
        patience: args.patience,
        criterion: args.metric,
        schedule: args.schedule,
        warmup_epochs: args.warmup_epochs,
        adamw: multiclip::train::optim::AdamWConfig {
            weight_decay: args.weight_decay,
            ..defaults.adamw
        },
        // 0 turns clipping off; anything else (negative, NaN) goes to the range check.
        clip_grad: (args.clip_grad != 0.0).then_some(args.clip_grad),
        seed: args.seed,
        multistage: args.multistage,
        memory_limit: args.memory_limit,
        max_head_mb: args.max_head_mb,
        precision: args.precision,
        ..defaults
    };
    Ok(TrainRequest {
        cache: args.cache.clone(),
        data: args.data.clone(),
        split: args.split.clone(),
        head,
        loss: args.loss,
        config,
        out_dir: args.out.clone(),
        name: args.name.clone(),
        device: args.device.open()?,
        integrity: args.cache_check.integrity(),
    })
}

/// Checks the arguments without reading the cache (settings, head, loss).
pub fn check(args: &TrainArgs) -> Result<()> {
    request(args)?.check().map(drop)
}

/// Trains, prints the metrics and writes the run report; returns the checkpoint's sidecar path.
pub fn run(args: TrainArgs) -> Result<PathBuf> {
    let request = request(&args)?;
    if let Some(folds) = args.folds {
        let report = train_folds(&KFoldRequest {
            train: request,
            folds,
            rows: args.fold_rows,
            jobs: args.jobs.max(1),
        })?;
        print_ensemble(&report)?;
        return Ok(report.checkpoint);
    }
    let report = train(&request)?;
    let outcome = &report.outcome;
    println!(
        "best epoch {} of {}{}; thresholds tuned on {} validation rows",
        outcome.best_epoch,
        outcome
            .history
            .iter()
            .filter(|r| r.stage == "train")
            .count(),
        if outcome.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        outcome.validation.rows
    );
    print_metrics(
        &outcome.validation.metrics,
        &outcome.validation.per_label,
        &report.meta.model.labels,
    );
    println!("checkpoint: {}", report.checkpoint.display());
    println!("size:       {}", report.meta.size.describe());
    let written = multiclip::report::write(&report)?;
    print!("{}", multiclip::report::terminal_summary(&written.data));
    println!("report:     {}", written.html.display());
    println!("metrics:    {}", written.metrics_json.display());
    Ok(report.checkpoint)
}

/// Prints an ensemble's members and metrics, writes its report (also used by `sweep`).
pub fn print_ensemble(report: &EnsembleReport) -> Result<()> {
    let meta = &report.meta;
    println!(
        "{:<40} {:>8} {:>10} {:>9} {:>9} {:>7}",
        "member", "val rows", "best epoch", "micro-F1", "macro-F1", "mAP"
    );
    for m in &meta.member_runs {
        println!(
            "{:<40} {:>8} {:>10} {:>9.4} {:>9.4} {:>7.4}",
            m.name,
            m.val_rows,
            m.best_epoch,
            m.metrics.averages.micro.f1,
            m.metrics.averages.macro_avg.f1,
            m.metrics.map
        );
    }
    println!(
        "\nensemble of {} members, {} rows ({}):",
        meta.member_runs.len(),
        report.shown.rows,
        report.shown_part
    );
    print_metrics(
        &report.shown.metrics,
        &report.shown.per_label,
        &meta.card.labels,
    );
    println!("checkpoint: {}", report.checkpoint.display());
    println!("size:       {} (all members)", meta.size.describe());
    let written = multiclip::report::write_ensemble(report)?;
    print!("{}", multiclip::report::terminal_summary(&written.data));
    println!("report:     {}", written.html.display());
    println!("metrics:    {}", written.metrics_json.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_configs_come_inline_as_json_or_toml_or_from_a_file() {
        let json = parse_head_config(r#"{"kind": "mlp", "hidden": 0}"#).unwrap();
        let toml = parse_head_config("kind = \"mlp\"\nhidden = 0").unwrap();
        assert_eq!(json, toml);
        assert_eq!(json, "mlp:hidden=0".parse::<HeadConfig>().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("head.toml");
        std::fs::write(&file, "kind = \"router\"\ninputs = [\"image\", \"text\"]").unwrap();
        let from_file = parse_head_config(file.to_str().unwrap()).unwrap();
        assert_eq!(from_file.kind.name(), "router");
        assert!(parse_head_config("kind = \"nope\"").is_err());
    }
}
