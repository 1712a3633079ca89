//! `multiclip cache`: look at (info), check (verify) and combine (merge) embedding caches.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use multiclip::backbone::OutputKind;
use multiclip::cache::layout::{MANIFEST_FILE, PARTS_DIR};
use multiclip::cache::merge::{MergeOutcome, merge};
use multiclip::cache::verify::verify;
use multiclip::cache::{Manifest, StoredDtype, label_names};
use multiclip::extract::{PartSelection, SelectedRows};

/// Show, verify or merge an embedding cache made by `multiclip extract`.
#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand)]
enum CacheCommand {
    Info(InfoArgs),
    Verify(VerifyArgs),
    Merge(MergeArgs),
}

/// Print what a cache holds: backbone, outputs, dataset, shards, skipped rows.
#[derive(Args)]
#[command(after_help = "Example:\n  multiclip cache info cache/demo")]
struct InfoArgs {
    /// Cache directory.
    dir: PathBuf,
    /// Skipped rows to list (all with --skipped 0).
    #[arg(long, default_value_t = 20, value_name = "N")]
    skipped: usize,
}

/// Recompute every shard's content hash and check row ids, shapes, row counts and ranges (and,
/// with --data, the dataset). Exits non-zero on any problem, naming the file.
#[derive(Args)]
#[command(after_help = "Examples:\n  multiclip cache verify cache/demo\n  \
                        multiclip cache verify cache/demo --data data/demo")]
struct VerifyArgs {
    /// Cache directory.
    dir: PathBuf,
    /// Also check the cache against this dataset folder (csv checksums and row ids).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

/// Combine the parts written by `extract --num-workers N` workers into one manifest, identical to
/// the one a single process writes.
#[derive(Args)]
#[command(after_help = "Example:\n  multiclip cache merge /shared/cache/comp")]
struct MergeArgs {
    /// Cache directory.
    dir: PathBuf,
}

pub fn run(args: CacheArgs) -> Result<()> {
    match args.command {
        CacheCommand::Info(a) => info(&a.dir, a.skipped),
        CacheCommand::Verify(a) => run_verify(&a.dir, a.data.as_deref()),
        CacheCommand::Merge(a) => {
            match merge(&a.dir)? {
                MergeOutcome::Merged { parts, shards } => println!(
                    "merged {parts} worker parts ({shards} shards) into {}",
                    a.dir.join(MANIFEST_FILE).display()
                ),
                MergeOutcome::AlreadyMerged => {
                    println!("{} is already merged", a.dir.display())
                }
            }
            Ok(())
        }
    }
}

fn info(dir: &Path, max_skipped: usize) -> Result<()> {
    if !dir.join(MANIFEST_FILE).exists() && dir.join(PARTS_DIR).exists() {
        bail!(
            "{} is not merged yet (worker parts in {}/): run `multiclip cache merge {}` once \
             every worker has finished",
            dir.display(),
            dir.join(PARTS_DIR).display(),
            dir.display()
        );
    }
    let m = Manifest::load_dir(dir)?;
    let h = &m.header;
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!("cache {}", dir.display());
    println!("  backbone       {}", h.backbone.id);
    for (file, sha) in &h.backbone.weights_sha256 {
        println!("    weights      {file} sha256 {sha}");
    }
    println!("  preprocessing  {}", h.backbone.preprocessing);
    if let Some(template) = &h.backbone.text_template {
        println!("  text template  {template:?}");
    }
    println!("  outputs");
    for o in &h.outputs {
        let dtype = match o.dtype {
            StoredDtype::F16 => "f16",
            StoredDtype::F32 => "f32",
            StoredDtype::U8 => "u8",
        };
        let kind = match o.kind {
            OutputKind::Feature => "feature",
            OutputKind::Mask => "mask",
        };
        println!("    {:<16} {:?} {dtype} {kind}", o.name, o.shape);
    }
    println!(
        "  dataset        part {}, {} rows",
        h.dataset.selection, h.dataset.rows
    );
    for p in &h.dataset.parts {
        println!("    {:<12} {} rows, sha256 {}", p.file, p.rows, p.sha256);
    }
    println!(
        "  rows           {} stored, {} skipped",
        m.stored_rows, m.skipped_rows
    );
    println!(
        "  shards         {} of up to {} rows, {:.1} MB, batch size {}",
        m.shards.len(),
        h.shard_rows,
        bytes as f64 / 1e6,
        h.batch_size
    );
    println!(
        "  made by        multiclip {} (cache format {}), fingerprint {}",
        h.tool_version, h.format_version, m.fingerprint
    );
    match label_names::load(dir, &m.fingerprint)? {
        None => println!("  label names    none (`extract --label-names` adds them)"),
        Some(names) => {
            let (k, d) = names.dims();
            let shown: Vec<String> = names.meta.names.iter().take(5).cloned().collect();
            println!(
                "  label names    {k} embedded, {d}-d in the space of `{}` ({}): {}{}",
                names.meta.output,
                label_names::LABEL_NAMES_FILE,
                shown.join(", "),
                if k > shown.len() { ", ..." } else { "" }
            );
        }
    }
    if m.skipped_rows > 0 {
        println!("  skipped rows");
        let limit = if max_skipped == 0 {
            usize::MAX
        } else {
            max_skipped
        };
        for s in m.skipped().take(limit) {
            println!("    row {} ({}): {}", s.row, s.id, s.reason);
        }
        if m.skipped_rows > limit {
            println!(
                "    ... and {} more (--skipped 0 lists all)",
                m.skipped_rows - limit
            );
        }
    }
    Ok(())
}

fn run_verify(dir: &Path, data: Option<&Path>) -> Result<()> {
    let dataset = match data {
        Some(data) => {
            let manifest = Manifest::load_dir(dir)?;
            let selection: PartSelection = manifest.header.dataset.selection.parse()?;
            Some(SelectedRows::read(data, selection)?.into_dataset_rows())
        }
        None => None,
    };
    let report = verify(dir, dataset.as_ref())?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for p in &report.problems {
        eprintln!("error: {p}");
    }
    if report.is_ok() {
        println!(
            "{}: OK ({} shards, {:.1} MB checked{})",
            dir.display(),
            report.shards_checked,
            report.bytes_checked as f64 / 1e6,
            if data.is_some() {
                ", matches the dataset"
            } else {
                ""
            }
        );
        Ok(())
    } else {
        bail!(
            "{}: {} problem(s) found (listed above)",
            dir.display(),
            report.problems.len()
        )
    }
}
