//! Training-speed benchmark of the stage-2 trainer on synthetic caches (see docs/benchmarks.md):
//! seconds per epoch and samples/s of a head at a batch size, with the anonymous resident memory
//! (RssAnon: what the process allocated, not the mapped cache pages) and its peak.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release --example train_bench -- \
//!     --dir target/bench-train --head mlp --batch-size 256 --epochs 3
//! ```
//!
//! The cache (25,500 rows by default; `--scale 4` writes 4x the rows and trains on every 4th)
//! holds pooled `image` / `text` vectors of 768 f16 values and, for `ml_decoder`, 50 x 768 f16
//! `multimodal_tokens` with 10-15 real tokens per row and their `multimodal_mask`. It is written
//! once per shape through the cache writer API and reused.

#[path = "../tests/support/synthetic.rs"]
mod synthetic;

use anyhow::Result;
use candle_core::Device;
use candle_nn::VarMap;
use clap::Parser;
use multiclip::cache::CacheReader;
use multiclip::data::labels::LabelVocab;
use multiclip::data::{Dataset, Part};
use multiclip::heads::{self, HeadConfig, HeadContext, HeadKind};
use multiclip::labelled::Targets;
use multiclip::loss::Loss;
use multiclip::tensor_ops::Precision;
use multiclip::train::run::head_context;
use multiclip::train::schedule::ScheduleKind;
use multiclip::train::{TrainConfig, TrainData, fit};
use std::path::PathBuf;
use synthetic::Synthetic;

#[derive(Parser)]
struct Args {
    /// Folder for the synthetic datasets and caches (reused between runs).
    #[arg(long, default_value = "target/bench-train")]
    dir: PathBuf,
    /// mlp, router or ml_decoder (or any head spec).
    #[arg(long, default_value = "mlp")]
    head: String,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Training rows.
    #[arg(long, default_value_t = 25_500)]
    rows: usize,
    /// Cache size as a multiple of the training rows (training uses every `scale`-th row).
    #[arg(long, default_value_t = 1)]
    scale: usize,
    /// Train on only the first N training rows (quick probes; the cache keeps its size).
    #[arg(long)]
    train_rows: Option<usize>,
    /// Only write the synthetic cache (so that measured runs do not include writing it).
    #[arg(long)]
    prepare: bool,
    /// The heads' matrix products: f32 or bf16 (`train --precision`).
    #[arg(long, default_value = "f32")]
    precision: String,
}

/// (RssAnon, VmHWM) of this process in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("RssAnon:"), field("VmHWM:"))
}

/// CPU seconds (user + system, all threads) this process has used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let ticks_per_second = 100.0; // USER_HZ on Linux
    (fields.get(11).copied().unwrap_or(0.0) + fields.get(12).copied().unwrap_or(0.0))
        / ticks_per_second
}

fn main() -> Result<()> {
    // As the multiclip binary does at start (src/main.rs).
    multiclip::runtime::keep_freed_memory();
    multiclip::runtime::single_threaded_elementwise_by_default();
    let args = Args::parse();
    let head_config: HeadConfig = match args.head.as_str() {
        "mlp" => "mlp:inputs=image".parse()?,
        // The peer's router (scripts/bench-train-peer.py) is linear: nn.Linear(2 * d, 2).
        "router" => "router:inputs=image+text,router_hidden=0".parse()?,
        "ml_decoder" => "ml_decoder:input=multimodal_tokens".parse()?,
        spec => spec.parse()?,
    };
    let tokens = matches!(head_config.kind, HeadKind::MlDecoder(_));
    let cache_rows = args.rows * args.scale;
    let name = format!("{cache_rows}{}", if tokens { "-tokens" } else { "" });
    let data_dir = args.dir.join(format!("data-{name}"));
    let cache_dir = args.dir.join(format!("cache-{name}"));
    let spec = Synthetic {
        rows: cache_rows,
        dim: 768,
        tokens: tokens.then_some((50, 10..16)),
        labels: 18,
        seed: 3407,
        shard_rows: 4096,
        backbone: "synthetic:bench".into(),
    };
    if !cache_dir.join("manifest.json").is_file() {
        eprintln!("writing synthetic cache {} ...", cache_dir.display());
        spec.write_dataset(&data_dir)?;
        spec.write_cache(&data_dir, &cache_dir)?;
    }
    if args.prepare {
        return Ok(());
    }
    let reader = CacheReader::open(&cache_dir)?;
    let records = Dataset::open(&data_dir)?.records(Part::Train)?;
    let vocab = LabelVocab::from_records(&records)?;
    let targets = Targets::from_records(reader.ids(), &records, &vocab, false)?;
    let mut train_rows: Vec<usize> = (0..cache_rows).step_by(args.scale).collect();
    train_rows.truncate(args.train_rows.unwrap_or(usize::MAX));
    let val_rows = train_rows[..512.min(train_rows.len())].to_vec();
    let config = TrainConfig {
        batch_size: args.batch_size,
        eval_batch_size: args.batch_size.min(1024),
        epochs: args.epochs,
        patience: args.epochs + 1,
        // The peer's work (scripts/bench-train-peer.py): AdamW at 1e-3, constant rate, no
        // gradient clipping.
        lr: 1e-3,
        schedule: ScheduleKind::Constant,
        warmup_epochs: 0.0,
        clip_grad: None,
        precision: match args.precision.as_str() {
            "bf16" => Precision::Bf16,
            "f32" => Precision::F32,
            other => anyhow::bail!("--precision f32 or bf16, not {other}"),
        },
        ..TrainConfig::default()
    };
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let ctx = HeadContext {
        precision: config.precision,
        ..head_context(&reader, &vocab, None, config.seed, &device)?
    };
    let head = heads::build(
        &head_config,
        &ctx,
        heads::init::seeded_var_builder(&varmap, config.seed, &device),
    )?;
    let data = TrainData {
        reader: &reader,
        targets: &targets,
        train_rows,
        val_rows,
        device,
    };
    let before = memory_mib();
    let cpu_before = cpu_seconds();
    let outcome = fit(head.as_ref(), &varmap, &Loss::Bce, &data, &config)?;
    let cpu_per_epoch = (cpu_seconds() - cpu_before) / outcome.history.len().max(1) as f64;
    let after = memory_mib();
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| "default".into());
    let threads = format!(
        "{} candle_threads={}",
        env("RAYON_NUM_THREADS"),
        env("CANDLE_NUM_THREADS")
    );
    for epoch in &outcome.history {
        println!(
            "head={} batch={} rows={} cache_rows={cache_rows} threads={threads} epoch={} \
             train_s={:.3} samples_per_s={:.0} loss={:.4}",
            args.head,
            args.batch_size,
            data.train_rows.len(),
            epoch.epoch,
            epoch.train_seconds,
            data.train_rows.len() as f64 / epoch.train_seconds,
            epoch.train_loss
        );
    }
    let mut seconds: Vec<f64> = outcome.history.iter().map(|e| e.train_seconds).collect();
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    println!(
        "SUMMARY head={} precision={} batch={} cache_rows={cache_rows} threads={threads} \
         median_train_s={median:.3} \
         samples_per_s={:.0} cpu_s_per_epoch={cpu_per_epoch:.2} rss_anon_mib={:.0} \
         (before training {:.0}) peak_rss_mib={:.0}",
        args.head,
        args.precision,
        args.batch_size,
        data.train_rows.len() as f64 / median,
        after.0,
        before.0,
        after.1
    );
    Ok(())
}
