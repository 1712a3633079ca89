//! `multiclip run`: runs a pipeline file end to end: fetch what is missing, split, extract (a
//! valid cache is reused, a killed one resumed), train (with its report), evaluate, predict.
//! Each stage is the same command a user could type, parsed from the file's flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser};

use super::pipeline::{Pipeline, to_args};
use super::{dataset, evaluate, extract, predict, train};

/// Order in which stages run; a pipeline names any subset.
const STAGES: [&str; 5] = ["split", "extract", "train", "evaluate", "predict"];

const RUN_HELP: &str = "\
A pipeline file holds a [pipeline] section (name, description, `needs` paths and a `fetch`
command run when one is missing) and one section per stage with that command's long flags:
[split] (dataset split: `data` is the dataset folder), [extract], [train], [evaluate], [predict].
[[stage]] (an array of tables) runs a stage several times. evaluate and predict get the trained
checkpoint unless they name one.

Examples:
  multiclip run pipelines/demo.toml
  multiclip run pipelines/demo.toml --set train.head=router --set train.loss=focal
  multiclip run pipelines/blip_ml_decoder.toml --dry-run";

/// Run a pipeline file: split, extract, train, evaluate and predict in one go.
#[derive(Args)]
#[command(after_help = RUN_HELP)]
pub struct RunArgs {
    /// The pipeline file, e.g. pipelines/demo.toml.
    pipeline: PathBuf,
    /// Override a field of the file: `--set train.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    overrides: Vec<String>,
    /// Print each stage's command line without running anything.
    #[arg(long)]
    dry_run: bool,
}

/// One stage's flags parsed as its command's arguments.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct StageArgs<T: Args> {
    #[command(flatten)]
    args: T,
}

pub fn run(args: RunArgs) -> Result<()> {
    let pipeline = Pipeline::load(&args.pipeline, &args.overrides)?;
    if let Some((name, _)) = pipeline
        .stages
        .iter()
        .find(|(name, _)| !STAGES.contains(&name.as_str()))
    {
        bail!(
            "unknown stage [{name}] in {}: stages are {}",
            args.pipeline.display(),
            STAGES.join(", ")
        );
    }
    println!(
        "pipeline {} ({})",
        pipeline.info.name,
        args.pipeline.display()
    );
    if !pipeline.info.description.is_empty() {
        println!("  {}", pipeline.info.description);
    }
    let runner = Runner {
        dry_run: args.dry_run,
    };
    runner.fetch_missing(&pipeline)?;

    for flags in pipeline.stage("split") {
        let mut argv = vec!["split".to_string()];
        let data = flags
            .get("data")
            .and_then(|v| v.as_str())
            .context("[split] needs `data = \"DIR\"` (the dataset folder)")?;
        argv.push(data.to_string());
        let mut rest = flags.clone();
        rest.remove("data");
        let out = rest
            .get("out")
            .and_then(|v| v.as_str())
            .map_or_else(|| Path::new(data).join("split.json"), PathBuf::from);
        argv.extend(to_args(&rest));
        if out.exists() {
            println!("\n== split: reusing {}", out.display());
            continue;
        }
        runner.stage("dataset", &argv, |a: dataset::DatasetArgs| dataset::run(a))?;
    }
    for flags in pipeline.stage("extract") {
        runner.stage("extract", &to_args(flags), extract::run)?;
    }
    let mut checkpoint: Option<PathBuf> = None;
    for flags in pipeline.stage("train") {
        checkpoint = runner.stage("train", &to_args(flags), |a| train::run(a).map(Some))?;
    }
    for (name, flags) in [
        ("evaluate", pipeline.stage("evaluate")),
        ("predict", pipeline.stage("predict")),
    ] {
        for flags in flags {
            let mut argv = to_args(flags);
            if !flags.contains_key("checkpoint") {
                let path = match (&checkpoint, runner.dry_run) {
                    (Some(path), _) => path.display().to_string(),
                    (None, true) => "<trained checkpoint>".to_string(),
                    (None, false) => {
                        bail!("[{name}] has no `checkpoint` and the pipeline trains none: add one")
                    }
                };
                argv.extend(["--checkpoint".to_string(), path]);
            }
            match name {
                "evaluate" => runner.stage(name, &argv, evaluate::run)?,
                _ => runner.stage(name, &argv, predict::run)?,
            }
        }
    }
    println!("\npipeline {} done", pipeline.info.name);
    Ok(())
}

/// Parses `argv` (without the command's name) as the arguments of one command.
pub fn parse_args<T: Args>(argv: &[String]) -> Result<T, clap::Error> {
    StageArgs::<T>::command()
        .try_get_matches_from(argv)
        .and_then(|m| StageArgs::<T>::from_arg_matches(&m))
        .map(|stage| stage.args)
}

struct Runner {
    dry_run: bool,
}

impl Runner {
    /// Prints the stage's command line, parses it as the command's arguments and runs it.
    fn stage<T: Args, R: Default>(
        &self,
        command: &str,
        argv: &[String],
        run: impl FnOnce(T) -> Result<R>,
    ) -> Result<R> {
        println!("\n== multiclip {command} {}", shell_words(argv));
        let args = parse_args::<T>(argv)
            .map_err(|e| anyhow::anyhow!("in the [{command}] section of the pipeline: {e}"))?;
        if self.dry_run {
            return Ok(R::default());
        }
        run(args).with_context(|| format!("stage `{command}` failed"))
    }

    /// Runs the pipeline's `fetch` command when a path in `needs` is missing.
    fn fetch_missing(&self, pipeline: &Pipeline) -> Result<()> {
        let missing: Vec<&PathBuf> = pipeline.info.needs.iter().filter(|p| !p.exists()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        let Some(fetch) = &pipeline.info.fetch else {
            if self.dry_run {
                println!(
                    "\n== missing {} (the run would stop here)",
                    names.join(", ")
                );
                return Ok(());
            }
            bail!(
                "missing {}: the pipeline has no `fetch` command to get it; \
                 the comments at the top of the pipeline file say where it comes from",
                names.join(", ")
            );
        };
        if self.dry_run {
            println!("\n== missing {}: would run `{fetch}`", names.join(", "));
            return Ok(());
        }
        println!("\n== missing {}: running `{fetch}`", names.join(", "));
        let status = Command::new("sh")
            .arg("-c")
            .arg(fetch)
            .status()
            .with_context(|| format!("starting `{fetch}`"))?;
        if !status.success() {
            bail!("`{fetch}` failed ({status})");
        }
        if let Some(still) = missing.iter().find(|p| !p.exists()) {
            bail!(
                "`{fetch}` finished but {} is still missing",
                still.display()
            );
        }
        Ok(())
    }
}

/// The arguments as a POSIX shell reads them back (single-quoted unless every character is
/// plainly safe).
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let safe = |c: char| c.is_ascii_alphanumeric() || "_./:=,+@%-".contains(c);
            if a.is_empty() || !a.chars().all(safe) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
