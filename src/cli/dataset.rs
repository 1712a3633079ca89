//! `multiclip dataset`: look at a dataset folder (inspect), print what the csv reader sees
//! (records), and write the train/validation split with its label vocabulary (split).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::one_of;
use multiclip::data::image::DEFAULT_MAX_PIXELS;
use multiclip::data::inspect::{InspectReport, LengthStats, inspect};
use multiclip::data::labels::LABELS_FILE;
use multiclip::data::split::{DEFAULT_SEED, DEFAULT_VAL_FRACTION, SPLIT_FILE};
use multiclip::data::{Dataset, LabelVocab, Part, Split};

const DATASET_HELP: &str = "\
A dataset folder follows the competition layout:
  <dir>/train.csv       ImageID,Labels,Caption  (labels space-separated, e.g. \"1 3 10\")
  <dir>/test.csv        ImageID,Caption
  <dir>/data/<ImageID>  the images of both files
Either csv may be absent, not both. Raw competition files (unescaped inner quotes, multi-line
captions) and well-formed RFC-4180 csv are both read.

Examples:
  multiclip dataset inspect data/demo
  multiclip dataset records data/demo --part test | head
  multiclip dataset split data/demo";

/// Inspect a dataset folder, print its parsed records, or write its train/validation split.
#[derive(Args)]
#[command(after_help = DATASET_HELP)]
pub struct DatasetArgs {
    #[command(subcommand)]
    command: DatasetCommand,
}

#[derive(Subcommand)]
enum DatasetCommand {
    Inspect(InspectArgs),
    Records(RecordsArgs),
    Split(SplitArgs),
}

/// Print statistics and problems of a dataset folder.
///
/// Reports rows per csv, label frequencies, labels per row, caption lengths (characters and
/// words), problems found in the csv files with their line numbers, and images that are missing,
/// unreadable or over the pixel limit. Only image headers are read (in parallel), so it is fast
/// but does not catch damage after the header.
#[derive(Args)]
#[command(after_help = "Examples:
  multiclip dataset inspect data/demo
  multiclip dataset inspect data/demo --json > inspect.json
  multiclip dataset inspect /data/comp2024 --max-pixels 100000000")]
struct InspectArgs {
    /// Dataset folder (holding train.csv and/or test.csv, and data/).
    dir: PathBuf,
    /// Print the full report as one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Images with more pixels (width x height) than this are reported as too large.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "N")]
    max_pixels: u64,
}

/// Print every parsed record as JSON lines.
///
/// One object per record: {"id", "labels", "caption", "line"}; "labels" is null for test.csv and
/// "line" is where the record starts in the csv. Use it to see exactly what was read from a
/// quirky csv.
#[derive(Args)]
#[command(after_help = "Examples:
  multiclip dataset records data/demo
  multiclip dataset records data/demo --part train | grep '\"line\":812'")]
struct RecordsArgs {
    /// Dataset folder.
    dir: PathBuf,
    /// Only this csv (default: every csv present, train first).
    #[arg(long, value_name = "train|test", value_parser = one_of(&Part::ALL, Part::name))]
    part: Option<Part>,
}

/// Write the train/validation split and the label vocabulary.
///
/// Splits train.csv by seeded second-order iterative stratification (label pairs are balanced
/// too; every label with two or more rows lands on both sides), writes the label vocabulary
/// beside the split, and prints the rows per label on each side. Training, threshold tuning and
/// evaluation all read these two files.
#[derive(Args)]
#[command(
    after_help = "Writes <out> (default <dir>/split.json: the seed, the fraction and the image ids of \
each side) and labels.json in the same folder (the label columns, in order).
Existing files are never replaced unless --force is given.

Examples:
  multiclip dataset split data/demo
  multiclip dataset split data/demo --val-fraction 0.2 --seed 1 --out runs/split-seed1.json"
)]
struct SplitArgs {
    /// Dataset folder (needs train.csv).
    dir: PathBuf,
    /// Fraction of the rows held out for validation.
    #[arg(long, default_value_t = DEFAULT_VAL_FRACTION, value_name = "F")]
    val_fraction: f64,
    /// Seed of the split (same seed and csv, same split).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Where to write the split [default: <dir>/split.json]; labels.json goes beside it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace an existing split file and labels.json.
    #[arg(long)]
    force: bool,
}

pub fn run(args: DatasetArgs) -> Result<()> {
    match args.command {
        DatasetCommand::Inspect(a) => run_inspect(a),
        DatasetCommand::Records(a) => run_records(a),
        DatasetCommand::Split(a) => run_split(a),
    }
}

/// How many csv problems the text report lists per file (`--json` has all).
const PROBLEMS_SHOWN: usize = 20;

fn run_inspect(args: InspectArgs) -> Result<()> {
    let dataset = Dataset::open(&args.dir)?;
    let report = inspect(&dataset, args.max_pixels)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    Ok(())
}

fn format_lengths(name: &str, s: &LengthStats) -> String {
    format!(
        "  caption {name}: min {}, median {}, mean {:.1}, p95 {}, max {}\n",
        s.min, s.median, s.mean, s.p95, s.max
    )
}

fn format_report(report: &InspectReport) -> String {
    let mut out = format!("dataset {}\n", report.dir.display());
    for part in &report.parts {
        out += &format!(
            "\n{} ({}, read as {}): {} rows\n",
            part.part,
            part.csv.display(),
            part.syntax,
            part.rows
        );
        if let Some(labels) = &part.labels {
            out += &format!(
                "  labels: {} distinct, {:.2} per row on average\n",
                labels.frequencies.len(),
                labels.mean_per_row
            );
            let hist: Vec<String> = labels
                .per_row
                .iter()
                .map(|(k, rows)| format!("{k}: {rows}"))
                .collect();
            out += &format!("  labels per row (count: rows): {}\n", hist.join(", "));
            out += "  label frequencies (label: rows, share):\n";
            for f in &labels.frequencies {
                out += &format!(
                    "    {:>12}: {:>7} {:>6.2}%\n",
                    f.label,
                    f.rows,
                    f.fraction * 100.0
                );
            }
        }
        out += &format_lengths("chars", &part.caption_chars);
        out += &format_lengths("words", &part.caption_words);
        if part.problems.is_empty() {
            out += "  problems: none\n";
        } else {
            out += &format!("  problems: {}\n", part.problems.len());
            for p in part.problems.iter().take(PROBLEMS_SHOWN) {
                out += &format!("    line {}: {}\n", p.line, p.message);
            }
            if part.problems.len() > PROBLEMS_SHOWN {
                out += &format!(
                    "    ... {} more (see --json)\n",
                    part.problems.len() - PROBLEMS_SHOWN
                );
            }
        }
    }
    let img = &report.images;
    out += &format!(
        "\nimages ({}/data/, headers checked, limit {} pixels): {} rows, {} ok, {} missing, \
         {} unreadable, {} too large\n",
        report.dir.display(),
        img.max_pixels,
        img.checked,
        img.ok,
        img.missing,
        img.unreadable,
        img.too_large
    );
    if let Some(l) = &img.largest {
        out += &format!("  largest: {} ({}x{})\n", l.id, l.width, l.height);
    }
    if img.outside_data > 0 {
        out += &format!(
            "  {} images reached through symlinks that point outside data/\n",
            img.outside_data
        );
    }
    for issue in &img.examples {
        out += &format!("  {} {}: {}\n", issue.part, issue.id, issue.error);
    }
    let bad = img.missing + img.unreadable + img.too_large;
    if bad > img.examples.len() {
        out += &format!("  ... and {} more\n", bad - img.examples.len());
    }
    out
}

fn run_records(args: RecordsArgs) -> Result<()> {
    let dataset = Dataset::open(&args.dir)?;
    let parts = match args.part {
        Some(part) => vec![part],
        None => dataset.parts(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for part in parts {
        for record in dataset.records(part)? {
            let line = serde_json::to_string(&record)?;
            if let Err(e) = writeln!(out, "{line}") {
                return ignore_broken_pipe(e);
            }
        }
    }
    out.flush().or_else(ignore_broken_pipe)
}

/// A closed pipe (`| head`) ends the output quietly.
fn ignore_broken_pipe(e: std::io::Error) -> Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e.into())
    }
}

fn refuse_to_overwrite(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it (training runs that used it would \
             no longer match), or choose another file with --out",
            path.display()
        );
    }
    Ok(())
}

fn run_split(args: SplitArgs) -> Result<()> {
    let dataset = Dataset::open(&args.dir)?;
    let out = args.out.unwrap_or_else(|| dataset.dir().join(SPLIT_FILE));
    let labels_path = out
        .parent()
        .map_or_else(|| PathBuf::from(LABELS_FILE), |dir| dir.join(LABELS_FILE));
    refuse_to_overwrite(&out, args.force)?;
    refuse_to_overwrite(&labels_path, args.force)?;

    let records = dataset.records(Part::Train)?;
    let vocab = LabelVocab::from_records(&records)?;
    let split = Split::stratified(&records, &vocab, args.val_fraction, args.seed)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    split.save(&out)?;
    vocab.save(&labels_path)?;

    println!(
        "split {} rows (seed {}): {} train, {} val ({:.2}%)",
        records.len(),
        split.seed,
        split.train.len(),
        split.val.len(),
        100.0 * split.val.len() as f64 / records.len().max(1) as f64
    );
    println!("{:>12} {:>8} {:>8} {:>7}", "label", "train", "val", "val %");
    for (label, train, val) in split.label_counts(&records, &vocab) {
        let share = 100.0 * val as f64 / (train + val).max(1) as f64;
        println!("{label:>12} {train:>8} {val:>8} {share:>6.1}%");
    }
    println!("wrote {} and {}", out.display(), labels_path.display());
    Ok(())
}
