//! `multiclip sweep FILE.toml`: every configuration of a sweep file's grid trained as a
//! `multiclip train` child process of this binary (`--jobs N` at once, each with its share of the
//! CPU threads), or one per Slurm array task / Kubernetes Indexed Job (`--task`), finished
//! configurations skipped; then the ranked table (markdown, csv, HTML) and, with
//! `--ensemble-top N`, the N best averaged into an ensemble checkpoint. The grid, resuming and
//! ranking are `multiclip::sweep`'s.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;
use multiclip::cache::WorkerSlot;
use multiclip::files::write_atomic;
use multiclip::model::checkpoint::{checkpoint_files, read_sidecar};
use multiclip::model::ensemble::{EnsembleCard, MemberRef};
use multiclip::parallel::{run_indexed, threads_per_job};
use multiclip::report::RunMetrics;
use multiclip::report::sweep::{SweepRow, SweepTable, csv, html, markdown};
use multiclip::sweep::{Configuration, Status, Sweep};
use multiclip::train::ensemble::average;

use super::pipeline::to_args;
use super::run::{parse_args, shell_words};
use super::train::{TrainArgs, print_ensemble};

const SWEEP_HELP: &str = "\
A sweep file holds [sweep] (out = the folder of the runs and tables; rank_by = micro-f1, map or
loss; sbatch = extra sbatch flags), [train] (the `multiclip train` flags every run shares) and
[grid] (flags with lists of values: every combination is one run). A re-run skips finished runs.

Examples:
  multiclip sweep sweeps/oc.toml --jobs 2 --ensemble-top 3
  multiclip sweep sweeps/oc.toml --slurm            # print the sbatch array and ranking jobs
  multiclip sweep sweeps/oc.toml --slurm --submit   # submit them
  multiclip sweep sweeps/oc.toml --task 4           # run configuration 4 (array tasks: --task)
  multiclip sweep sweeps/oc.toml --rank             # rank what has finished";

/// Train a grid of configurations over one cache and rank them on validation.
#[derive(Debug, Args)]
#[command(after_help = SWEEP_HELP)]
pub struct SweepArgs {
    /// The sweep file (TOML).
    pub file: PathBuf,
    /// Configurations trained at once, as child processes sharing the CPU threads.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Average the N best runs (by validation) into the ensemble checkpoint `top-N`.
    #[arg(long, value_name = "N")]
    pub ensemble_top: Option<usize>,
    /// Print the Slurm jobs instead of training: an array with one task per unfinished
    /// configuration, and the ranking job that waits for it.
    #[arg(long, conflicts_with = "rank")]
    pub slurm: bool,
    /// With --slurm: submit both jobs with sbatch.
    #[arg(long, requires = "slurm")]
    pub submit: bool,
    /// Train one configuration: I, or without a value the index of this Slurm array task
    /// (SLURM_ARRAY_TASK_ID) or Kubernetes Indexed Job (JOB_COMPLETION_INDEX).
    #[arg(long, value_name = "I", num_args = 0..=1, conflicts_with_all = ["slurm", "rank", "ensemble_top"])]
    pub task: Option<Option<usize>>,
    /// Train nothing: rank the finished configurations (and make --ensemble-top).
    #[arg(long)]
    pub rank: bool,
    /// List the configurations and where each stands, and stop.
    #[arg(long, conflicts_with_all = ["slurm", "rank", "task"])]
    pub list: bool,
}

pub fn run(args: SweepArgs) -> Result<()> {
    let sweep = Sweep::load(&args.file)?;
    // Every configuration must parse as `train` flags before anything runs.
    for c in &sweep.configurations {
        parse_args::<TrainArgs>(&train_argv(&sweep, c)).map_err(|e| {
            anyhow::anyhow!(
                "configuration {} ({}) of {}: {e}",
                c.index,
                c.name,
                args.file.display()
            )
        })?;
    }
    if let Some(n) = args.ensemble_top
        && n < 2
    {
        bail!("--ensemble-top averages at least 2 runs, got {n}");
    }
    let n = sweep.configurations.len();
    if args.list {
        for c in &sweep.configurations {
            let state = match sweep.status(c)? {
                Status::Finished(_) => "finished",
                Status::Pending => "pending",
            };
            println!(
                "{:>4}  {state:<8}  {}  {}",
                c.index,
                c.name,
                shell_words(&to_args(&c.flags))
            );
        }
        return Ok(());
    }
    if args.slurm {
        return slurm(&args, &sweep);
    }
    if let Some(task) = args.task {
        let slot = WorkerSlot::resolve(Some(n), task, |k| std::env::var(k).ok()).context(
            "choosing the configuration of this task (give --task I, or run it as a Slurm \
                 array task or Kubernetes Indexed Job)",
        )?;
        let c = &sweep.configurations[slot.index];
        if let Status::Finished(run) = sweep.status(c)? {
            println!(
                "configuration {} {} already finished: {}",
                c.index,
                c.name,
                summary(&run)
            );
            return Ok(());
        }
        let run = train_child(&sweep, c, None)?;
        println!("configuration {} {}: {}", c.index, c.name, summary(&run));
        return Ok(());
    }

    let mut failed = Vec::new();
    if !args.rank {
        let mut pending = Vec::new();
        for c in &sweep.configurations {
            if sweep.status(c)? == Status::Pending {
                pending.push(c);
            }
        }
        println!(
            "sweep {}: {n} configurations, {} finished, {} to train ({} at once)",
            args.file.display(),
            n - pending.len(),
            pending.len(),
            args.jobs.max(1)
        );
        let threads = (args.jobs > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none())
            .then(|| threads_per_job(args.jobs));
        let results = run_indexed(args.jobs, pending.len(), |i| {
            let c = pending[i];
            let started = Instant::now();
            let result = train_child(&sweep, c, threads);
            match &result {
                Ok(run) => println!(
                    "  [{}] {}: {} ({:.0} s)",
                    c.index,
                    c.name,
                    summary(run),
                    started.elapsed().as_secs_f64()
                ),
                Err(e) => println!("  [{}] {}: FAILED: {e:#}", c.index, c.name),
            }
            result
        });
        failed = pending
            .iter()
            .zip(results)
            .filter(|(_, r)| r.is_err())
            .map(|(c, _)| c.name.clone())
            .collect();
    }
    rank(&args, &sweep, &failed)?;
    if !failed.is_empty() {
        bail!(
            "{} configurations failed: {} (logs in {})",
            failed.len(),
            failed.join(", "),
            sweep.info.out.join("logs").display()
        );
    }
    Ok(())
}

/// The `train` arguments of a configuration.
fn train_argv(sweep: &Sweep, c: &Configuration) -> Vec<String> {
    let mut argv = to_args(&c.flags);
    argv.extend([
        "--out".to_string(),
        sweep.info.out.display().to_string(),
        "--name".to_string(),
        c.name.clone(),
    ]);
    argv
}

/// Trains configuration `c` as a `multiclip train` child process (output into its log) with
/// `threads` CPU threads when given; its validation numbers.
fn train_child(sweep: &Sweep, c: &Configuration, threads: Option<usize>) -> Result<RunMetrics> {
    sweep.prepare(c)?;
    let log_path = sweep.log_path(c);
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the multiclip binary")?;
    let mut command = Command::new(&exe);
    command
        .arg("train")
        .args(train_argv(sweep, c))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(threads) = threads {
        command.env("RAYON_NUM_THREADS", threads.to_string());
    }
    let status = command
        .status()
        .with_context(|| format!("starting {}", exe.display()))?;
    if !status.success() {
        bail!("train {status}, see {}", log_path.display());
    }
    match sweep.status(c)? {
        Status::Finished(run) => Ok(*run),
        Status::Pending => bail!(
            "train ended without the run's metrics, see {}",
            log_path.display()
        ),
    }
}

fn summary(run: &RunMetrics) -> String {
    format!(
        "val micro-F1 {:.4}, mAP {:.4}, loss {:.4} ({} {} rows)",
        run.metrics.averages.micro.f1, run.metrics.map, run.loss, run.rows, run.part
    )
}

/// Writes the ranked tables, prints the markdown one, and makes the `--ensemble-top` ensemble.
fn rank(args: &SweepArgs, sweep: &Sweep, failed: &[String]) -> Result<()> {
    let mut finished = Vec::new();
    for c in &sweep.configurations {
        if let Status::Finished(run) = sweep.status(c)? {
            finished.push((c, *run));
        }
    }
    let ranked = sweep.ranked(finished.iter().map(|(c, r)| (*c, r)));
    let mut rows: Vec<SweepRow> = ranked
        .iter()
        .enumerate()
        .map(|(i, (c, run))| SweepRow {
            rank: Some(i + 1),
            name: &c.name,
            values: &c.values,
            run: Some(run),
            status: "finished",
        })
        .collect();
    for c in &sweep.configurations {
        if !ranked.iter().any(|(r, _)| r.index == c.index) {
            rows.push(SweepRow {
                rank: None,
                name: &c.name,
                values: &c.values,
                run: None,
                status: if failed.contains(&c.name) {
                    "failed"
                } else {
                    "pending"
                },
            });
        }
    }
    let table = SweepTable {
        title: format!("Sweep {}", args.file.display()),
        keys: &sweep.keys,
        rank_by: sweep.rank_by.to_string(),
        rows,
    };
    let out = &sweep.info.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = markdown(&table);
    write_atomic(&out.join("sweep.md"), text.as_bytes())?;
    write_atomic(&out.join("sweep.csv"), csv(&table).as_bytes())?;
    write_atomic(&out.join("sweep.html"), html(&table)?.as_bytes())?;
    println!("\n{text}");
    println!("tables: {} (.csv, .html)", out.join("sweep.md").display());
    if let Some(n) = args.ensemble_top {
        let best: Vec<&Configuration> = ranked
            .iter()
            .filter(|(_, run)| run.members.is_empty())
            .map(|(c, _)| *c)
            .take(n)
            .collect();
        if best.len() < n {
            bail!(
                "--ensemble-top {n}: only {} single-head runs have finished",
                best.len()
            );
        }
        ensemble_top(sweep, &best)?;
    }
    Ok(())
}

/// Averages the best runs into `top-N` in the sweep's folder; an existing `top-N` of the same
/// members (files unchanged) is kept, any other replaced.
fn ensemble_top(sweep: &Sweep, best: &[&Configuration]) -> Result<()> {
    let out = &sweep.info.out;
    let name = format!("top-{}", best.len());
    let (_, sidecar) = checkpoint_files(out, &name);
    let names: Vec<&str> = best.iter().map(|c| c.name.as_str()).collect();
    if sidecar.is_file() {
        let card: EnsembleCard = read_sidecar(&sidecar)?;
        let current = best
            .iter()
            .map(|c| MemberRef::of(&sweep.checkpoint(c)))
            .collect::<Result<Vec<_>>>()?;
        if card.members == current {
            println!(
                "\nensemble {} of {} is up to date",
                sidecar.display(),
                names.join(", ")
            );
            return Ok(());
        }
        for ext in ["json", "report.html", "metrics.json"] {
            remove_if_present(&out.join(format!("{name}.{ext}")))?;
        }
    }
    println!("\naveraging the {} best runs into {name}", best.len());
    let members: Vec<PathBuf> = best.iter().map(|c| sweep.checkpoint(c)).collect();
    let report = average(&members, &name, &Device::Cpu)?;
    print_ensemble(&report)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// `0-3,5,7-9`: indices as Slurm array ranges.
fn array_ranges(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        while i + 1 < indices.len() && indices[i + 1] == indices[i] + 1 {
            i += 1;
        }
        parts.push(if indices[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", indices[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// Prints (or with `--submit` runs) the sbatch array of the unfinished configurations and the
/// ranking job that waits for it.
fn slurm(args: &SweepArgs, sweep: &Sweep) -> Result<()> {
    let exe = std::env::current_exe().context("finding the multiclip binary")?;
    let exe = exe.display().to_string();
    let file = args.file.display().to_string();
    let mut pending = Vec::new();
    for c in &sweep.configurations {
        if sweep.status(c)? == Status::Pending {
            pending.push(c.index);
        }
    }
    let mut rank_cmd = vec![exe.clone(), "sweep".into(), file.clone(), "--rank".into()];
    if let Some(n) = args.ensemble_top {
        rank_cmd.extend(["--ensemble-top".into(), n.to_string()]);
    }
    let extra = &sweep.info.sbatch;
    let array: Vec<String> = [
        "--parsable".to_string(),
        format!("--array={}", array_ranges(&pending)),
    ]
    .into_iter()
    .chain(["--job-name=multiclip-sweep".to_string()])
    .chain(extra.iter().cloned())
    .chain([
        "--wrap".to_string(),
        shell_words(&[exe, "sweep".into(), file, "--task".into()]),
    ])
    .collect();
    // The ranking job's flags, after its `--dependency` on the array (when there is one).
    let ranking: Vec<String> = ["--job-name=multiclip-sweep-rank".to_string()]
        .into_iter()
        .chain(extra.iter().cloned())
        .chain(["--wrap".into(), shell_words(&rank_cmd)])
        .collect();
    if !args.submit {
        println!(
            "# {} of {} configurations to train: one array task each, then the ranking job",
            pending.len(),
            sweep.configurations.len()
        );
        if pending.is_empty() {
            println!("sbatch {}", shell_words(&ranking));
        } else {
            println!("jid=$(sbatch {})", shell_words(&array));
            println!("sbatch --dependency=afterok:$jid {}", shell_words(&ranking));
        }
        return Ok(());
    }
    let sbatch = |argv: &[String]| -> Result<String> {
        let output = Command::new("sbatch")
            .args(argv)
            .output()
            .context("running sbatch (is this a Slurm login node?)")?;
        if !output.status.success() {
            bail!(
                "sbatch failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let mut ranking = ranking;
    if !pending.is_empty() {
        // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
        let id = sbatch(&array)?;
        let id = id.split(';').next().unwrap_or_default().to_string();
        println!("submitted array job {id}: {} tasks", pending.len());
        ranking.insert(0, format!("--dependency=afterok:{id}"));
    }
    let id = sbatch(&ranking)?;
    println!("submitted ranking job {id}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_become_slurm_array_ranges() {
        assert_eq!(array_ranges(&[0, 1, 2, 3, 5, 7, 8, 9]), "0-3,5,7-9");
        assert_eq!(array_ranges(&[4]), "4");
        assert_eq!(array_ranges(&[]), "");
    }
}
