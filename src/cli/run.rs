//! `multiclip run`: runs a pipeline file end to end: fetch what is missing, split, extract (a
//! valid cache is reused, a killed one resumed), train (with its report), evaluate, predict.
//! Each stage is the same command a user could type, parsed from the file's flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser};

use super::pipeline::{Pipeline, to_args};
use super::{dataset, evaluate, extract, predict, train};

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
        .find(|(name, _)| !Stage::ALL.iter().any(|s| s.name() == name))
    {
        bail!(
            "unknown stage [{name}] in {}: stages are {}",
            args.pipeline.display(),
            Stage::ALL.map(Stage::name).join(", ")
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
    // Every stage is checked (its flags parsed by the command's own parser, then the command's
    // own checks) before anything is fetched or run: a typo in [train] does not wait for the
    // extraction to finish.
    let planned = plan(&pipeline)?;
    for stage in &planned {
        stage.check()?;
    }
    let runner = Runner {
        dry_run: args.dry_run,
    };
    runner.fetch_missing(&pipeline)?;
    let mut checkpoint: Option<PathBuf> = None;
    for stage in &planned {
        if let Some(trained) = runner.run(stage, checkpoint.as_deref())? {
            checkpoint = Some(trained);
        }
    }
    println!("\npipeline {} done", pipeline.info.name);
    Ok(())
}

/// The stages of a pipeline, in the order they run; a pipeline names any subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Split,
    Extract,
    Train,
    Evaluate,
    Predict,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Self::Split,
        Self::Extract,
        Self::Train,
        Self::Evaluate,
        Self::Predict,
    ];

    /// The section of the pipeline file.
    fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::Extract => "extract",
            Self::Train => "train",
            Self::Evaluate => "evaluate",
            Self::Predict => "predict",
        }
    }

    /// The `multiclip` command it runs.
    fn command(self) -> &'static str {
        match self {
            Self::Split => "dataset",
            other => other.name(),
        }
    }
}

/// Stands for the checkpoint that the [train] stage will write, until it has.
const TRAINED_CHECKPOINT: &str = "<trained checkpoint>";

/// One run of a stage, as the pipeline file gives it.
struct Planned {
    stage: Stage,
    argv: Vec<String>,
    /// The split file of a [split] stage: an existing one is reused.
    reuse: Option<PathBuf>,
    /// Whether `--checkpoint` is the trained one (an [evaluate] or [predict] without its own).
    trained_checkpoint: bool,
}

/// Every run of every stage, in order.
fn plan(pipeline: &Pipeline) -> Result<Vec<Planned>> {
    let trains = !pipeline.stage(Stage::Train.name()).is_empty();
    let mut planned = Vec::new();
    for stage in Stage::ALL {
        for flags in pipeline.stage(stage.name()) {
            let mut run = Planned {
                stage,
                argv: to_args(flags),
                reuse: None,
                trained_checkpoint: false,
            };
            match stage {
                Stage::Split => {
                    let data = flags
                        .get("data")
                        .and_then(|v| v.as_str())
                        .context("[split] needs `data = \"DIR\"` (the dataset folder)")?;
                    let mut rest = flags.clone();
                    rest.remove("data");
                    run.reuse = Some(
                        rest.get("out")
                            .and_then(|v| v.as_str())
                            .map_or_else(|| Path::new(data).join("split.json"), PathBuf::from),
                    );
                    run.argv = ["split".to_string(), data.to_string()]
                        .into_iter()
                        .chain(to_args(&rest))
                        .collect();
                }
                Stage::Evaluate | Stage::Predict if !flags.contains_key("checkpoint") => {
                    if !trains {
                        bail!(
                            "[{}] has no `checkpoint` and the pipeline trains none: add one",
                            stage.name()
                        );
                    }
                    run.trained_checkpoint = true;
                }
                _ => {}
            }
            planned.push(run);
        }
    }
    Ok(planned)
}

impl Planned {
    /// The command line, with `checkpoint` as the trained checkpoint where it takes it.
    fn argv(&self, checkpoint: &str) -> Vec<String> {
        let mut argv = self.argv.clone();
        if self.trained_checkpoint {
            argv.extend(["--checkpoint".to_string(), checkpoint.to_string()]);
        }
        argv
    }

    /// Parses the flags with the command's own parser.
    fn parse<T: Args>(&self, argv: &[String]) -> Result<T> {
        parse_args::<T>(argv).map_err(|e| {
            anyhow::anyhow!(
                "in the [{}] section of the pipeline: {e}",
                self.stage.name()
            )
        })
    }

    /// Parses the flags and runs the command's checks, reading nothing.
    fn check(&self) -> Result<()> {
        let argv = self.argv(TRAINED_CHECKPOINT);
        match self.stage {
            Stage::Split => self.parse::<dataset::DatasetArgs>(&argv).map(drop),
            Stage::Extract => self.parse::<extract::ExtractArgs>(&argv).map(drop),
            Stage::Train => train::check(&self.parse(&argv)?),
            Stage::Evaluate => self.parse::<evaluate::EvaluateArgs>(&argv).map(drop),
            Stage::Predict => predict::check(&self.parse(&argv)?),
        }
        .with_context(|| format!("in the [{}] section of the pipeline", self.stage.name()))
    }
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
    /// Prints the stage's command line and runs it (not in a dry run); returns the checkpoint a
    /// [train] stage wrote.
    fn run(&self, stage: &Planned, checkpoint: Option<&Path>) -> Result<Option<PathBuf>> {
        if let Some(out) = stage.reuse.as_ref().filter(|out| out.exists()) {
            println!("\n== split: reusing {}", out.display());
            return Ok(None);
        }
        let shown = checkpoint.map(|p| p.display().to_string());
        let argv = stage.argv(shown.as_deref().unwrap_or(TRAINED_CHECKPOINT));
        println!(
            "\n== multiclip {} {}",
            stage.stage.command(),
            shell_words(&argv)
        );
        if self.dry_run {
            return Ok(None);
        }
        match stage.stage {
            Stage::Split => dataset::run(stage.parse(&argv)?).map(|()| None),
            Stage::Extract => extract::run(stage.parse(&argv)?).map(|()| None),
            Stage::Train => train::run(stage.parse(&argv)?).map(Some),
            Stage::Evaluate => evaluate::run(stage.parse(&argv)?).map(|()| None),
            Stage::Predict => predict::run(stage.parse(&argv)?).map(|()| None),
        }
        .with_context(|| format!("stage `{}` failed", stage.stage.command()))
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
