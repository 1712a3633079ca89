//! Sweeps: many training runs over one cache from a grid of `multiclip train` flags, resumable
//! and rankable. A sweep file (TOML) holds a `[sweep]` section (the output folder, the ranking
//! metric, extra `sbatch` flags), a `[train]` section with the flags every run shares (the long
//! flags of `multiclip train`, as in a pipeline file) and a `[grid]` section whose keys take lists
//! of values: every combination is one configuration.
//!
//! A configuration is identified by the sha256 of its flags (the `[train]` flags with its grid
//! values): its checkpoint `NAME` (values and hash prefix) lives in the sweep's folder with a
//! record `NAME.sweep.json` of its hash and flags. It is finished when that record matches and
//! its checkpoint and `NAME.metrics.json` (written last by `train`) exist, so a re-run skips
//! it; anything else under `NAME.` is left over from an interrupted run and is removed before the
//! configuration runs again. Ranking reads validation numbers only (`metrics.json` of the split's
//! validation rows, or out-of-fold for a k-fold configuration); test rows never choose.
//!
//! Running the configurations (child processes, Slurm array tasks) is the CLI's job
//! (`src/cli/sweep.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::{Table, Value};

use crate::files::write_atomic;
use crate::model::checkpoint::checkpoint_files;
use crate::report::RunMetrics;
use crate::train::early_stop::Criterion;

/// Flags the sweep sets itself for every configuration.
const RESERVED: [&str; 2] = ["out", "name"];

/// The `[sweep]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepInfo {
    /// Folder of the runs, their logs and the ranked tables.
    pub out: PathBuf,
    /// The validation number that ranks the runs: `micro-f1` (default), `map` or `loss`.
    #[serde(default = "default_rank_by")]
    pub rank_by: String,
    /// Extra `sbatch` flags of the array and ranking jobs (e.g. `--cpus-per-task=4`).
    #[serde(default)]
    pub sbatch: Vec<String>,
}

fn default_rank_by() -> String {
    Criterion::MicroF1.to_string()
}

/// One run of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Configuration {
    /// Position in the grid (0-based): the Slurm array / Indexed Job index.
    pub index: usize,
    /// Checkpoint name: the grid values and a prefix of the hash.
    pub name: String,
    /// sha256 of the flags (canonical JSON).
    pub hash: String,
    /// Every `train` flag of the run (without `out` and `name`).
    pub flags: Table,
    /// The grid's values of this run, in the order of [`Sweep::keys`].
    pub values: Vec<String>,
}

/// A parsed sweep file and its configurations.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub info: SweepInfo,
    /// Ranking criterion.
    pub rank_by: Criterion,
    /// The grid's keys, in the order values vary (the last fastest).
    pub keys: Vec<String>,
    pub configurations: Vec<Configuration>,
}

/// Where a configuration stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Never run, or interrupted.
    Pending,
    /// Trained: its validation numbers.
    Finished(Box<RunMetrics>),
}

impl Sweep {
    /// Reads a sweep file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading sweep file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in sweep file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut table: Table = toml::from_str(text).context("parsing the TOML")?;
        let info: SweepInfo = match table.remove("sweep") {
            Some(value) => value.try_into().context("in section [sweep]")?,
            None => bail!("missing section [sweep] (with at least `out = \"FOLDER\"`)"),
        };
        let rank_by: Criterion = info
            .rank_by
            .parse()
            .map_err(|e| anyhow::anyhow!("[sweep] rank_by: {e}"))?;
        let section = |table: &mut Table, name: &str| -> Result<Table> {
            match table.remove(name) {
                None => Ok(Table::new()),
                Some(Value::Table(t)) => Ok(t),
                Some(_) => bail!("`{name}` must be a section ([{name}])"),
            }
        };
        let fixed = section(&mut table, "train")?;
        let grid = section(&mut table, "grid")?;
        if let Some(other) = table.keys().next() {
            bail!("unknown section [{other}]: a sweep file has [sweep], [train] and [grid]");
        }
        for key in fixed.keys().chain(grid.keys()) {
            if RESERVED.contains(&key.as_str()) {
                bail!("`{key}` is set by the sweep for every run: remove it");
            }
            if fixed.contains_key(key) && grid.contains_key(key) {
                bail!("`{key}` is in both [train] and [grid]: keep one");
            }
        }
        let axes: Vec<(String, Vec<Value>)> = grid
            .into_iter()
            .map(|(key, value)| match value {
                Value::Array(values) if values.is_empty() => {
                    bail!("[grid] {key} is an empty list")
                }
                Value::Array(values) => Ok((key, values)),
                one => Ok((key, vec![one])),
            })
            .collect::<Result<_>>()?;
        let keys: Vec<String> = axes.iter().map(|(k, _)| k.clone()).collect();
        let total: usize = axes.iter().map(|(_, v)| v.len()).product();
        let mut configurations = Vec::with_capacity(total);
        for index in 0..total {
            let mut flags = fixed.clone();
            let mut values = Vec::with_capacity(axes.len());
            let mut rest = index;
            // Mixed radix, the last key fastest.
            let mut picks = vec![0; axes.len()];
            for (axis, (_, options)) in axes.iter().enumerate().rev() {
                picks[axis] = rest % options.len();
                rest /= options.len();
            }
            for ((key, options), pick) in axes.iter().zip(picks) {
                let value = options[pick].clone();
                values.push(display(&value));
                flags.insert(key.clone(), value);
            }
            let hash = hash_flags(&flags)?;
            let name = configuration_name(&values, &hash);
            configurations.push(Configuration {
                index,
                name,
                hash,
                flags,
                values,
            });
        }
        Ok(Self {
            info,
            rank_by,
            keys,
            configurations,
        })
    }

    /// The record file of a configuration.
    pub fn record_path(&self, c: &Configuration) -> PathBuf {
        self.info.out.join(format!("{}.sweep.json", c.name))
    }

    /// The checkpoint path (`NAME`) of a configuration.
    pub fn checkpoint(&self, c: &Configuration) -> PathBuf {
        self.info.out.join(&c.name)
    }

    /// The log file of a configuration's run.
    pub fn log_path(&self, c: &Configuration) -> PathBuf {
        self.info.out.join("logs").join(format!("{}.log", c.name))
    }

    /// Whether `c` has finished (record matching, checkpoint and metrics present), and its
    /// validation numbers if so.
    pub fn status(&self, c: &Configuration) -> Result<Status> {
        let record: Configuration = match std::fs::read_to_string(self.record_path(c)) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(record) => record,
                Err(_) => return Ok(Status::Pending),
            },
            Err(_) => return Ok(Status::Pending),
        };
        let (_, sidecar) = checkpoint_files(&self.info.out, &c.name);
        let metrics = self.info.out.join(format!("{}.metrics.json", c.name));
        if record.hash != c.hash || !sidecar.is_file() || !metrics.is_file() {
            return Ok(Status::Pending);
        }
        let text = std::fs::read_to_string(&metrics)
            .with_context(|| format!("reading {}", metrics.display()))?;
        let run: RunMetrics = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", metrics.display()))?;
        Ok(Status::Finished(Box::new(run)))
    }

    /// Clears what an interrupted run of `c` left (every `NAME.*` file in the sweep's folder)
    /// and writes its record: the configuration is ready to run.
    pub fn prepare(&self, c: &Configuration) -> Result<()> {
        let out = &self.info.out;
        std::fs::create_dir_all(out.join("logs"))
            .with_context(|| format!("creating {}", out.display()))?;
        let prefix = format!("{}.", c.name);
        for entry in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) && entry.path().is_file() {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        let json = serde_json::to_string_pretty(c)? + "\n";
        write_atomic(&self.record_path(c), json.as_bytes())
    }

    /// The finished configurations, best first by validation `rank_by` (ties: grid order).
    pub fn ranked<'a>(
        &self,
        finished: impl IntoIterator<Item = (&'a Configuration, &'a RunMetrics)>,
    ) -> Vec<(&'a Configuration, &'a RunMetrics)> {
        let mut rows: Vec<_> = finished.into_iter().collect();
        let criterion = self.rank_by;
        rows.sort_by(|(a, ra), (b, rb)| {
            let (x, y) = (rank_value(criterion, ra), rank_value(criterion, rb));
            let order = if criterion.higher_is_better() {
                y.total_cmp(&x)
            } else {
                x.total_cmp(&y)
            };
            order.then(a.index.cmp(&b.index))
        });
        rows
    }
}

/// The validation number of `run` that `criterion` ranks by (NaN ranks last).
pub fn rank_value(criterion: Criterion, run: &RunMetrics) -> f64 {
    let value = match criterion {
        Criterion::MicroF1 => run.metrics.averages.micro.f1,
        Criterion::Map => run.metrics.map,
        Criterion::Loss => run.loss,
    };
    match (value.is_nan(), criterion.higher_is_better()) {
        (false, _) => value,
        (true, true) => f64::NEG_INFINITY,
        (true, false) => f64::INFINITY,
    }
}

/// sha256 of the flags as canonical JSON (keys sorted).
fn hash_flags(flags: &Table) -> Result<String> {
    let json = serde_json::to_string(flags)?;
    Ok(hex::encode(Sha256::digest(json.as_bytes())))
}

/// A grid value as written in tables and names (`mlp`, `0.003`, `true`).
fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `mlp_smoothing_0.003-1a2b3c4d`: the values (file-name safe, at most 80 characters) and the
/// first 8 hex digits of the hash.
fn configuration_name(values: &[String], hash: &str) -> String {
    let slug: String = values
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=') {
                c
            } else {
                '-'
            }
        })
        .take(80)
        .collect();
    if slug.is_empty() {
        format!("run-{}", &hash[..8])
    } else {
        format!("{slug}-{}", &hash[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[sweep]
out = "runs"

[train]
cache = "cache/demo"
epochs = 5

[grid]
head = ["mlp", "mlp:hidden=0,dropout=0.5"]
lr = [0.001, 0.003, 0.01]
"#;

    #[test]
    fn the_grid_is_every_combination_with_stable_names_and_hashes() {
        let sweep = Sweep::parse(FILE).unwrap();
        assert_eq!(sweep.keys, ["head", "lr"]);
        assert_eq!(sweep.configurations.len(), 6);
        let c = &sweep.configurations[4];
        assert_eq!(c.values, ["mlp:hidden=0,dropout=0.5", "0.003"]);
        assert_eq!(c.flags["epochs"].as_integer(), Some(5));
        assert!(
            c.name.starts_with("mlp-hidden=0-dropout=0.5_0.003-"),
            "{}",
            c.name
        );
        // The same flags give the same hash whatever the file's order; other flags another.
        let reordered = FILE.replace(
            "[train]\ncache = \"cache/demo\"\nepochs = 5",
            "[train]\nepochs = 5\ncache = \"cache/demo\"",
        );
        assert_eq!(Sweep::parse(&reordered).unwrap().configurations[4], *c);
        let other = Sweep::parse(&FILE.replace("epochs = 5", "epochs = 6")).unwrap();
        assert_ne!(other.configurations[4].hash, c.hash);
        let hashes: std::collections::HashSet<_> =
            sweep.configurations.iter().map(|c| &c.hash).collect();
        assert_eq!(hashes.len(), 6);
    }

    #[test]
    fn bad_sweep_files_are_refused() {
        for (text, message) in [
            ("[train]\nlr = 1", "missing section [sweep]"),
            (
                "[sweep]\nout = \"x\"\n[train]\nname = \"a\"",
                "set by the sweep",
            ),
            (
                "[sweep]\nout = \"x\"\n[train]\nlr = 1\n[grid]\nlr = [1, 2]",
                "both",
            ),
            ("[sweep]\nout = \"x\"\n[grid]\nlr = []", "empty list"),
            ("[sweep]\nout = \"x\"\nrank_by = \"f2\"", "rank_by"),
            ("[sweep]\nout = \"x\"\n[extract]\na = 1", "unknown section"),
        ] {
            let err = format!("{:#}", Sweep::parse(text).unwrap_err());
            assert!(err.contains(message), "{text}: {err}");
        }
        // No grid: one configuration of the [train] flags.
        assert_eq!(
            Sweep::parse("[sweep]\nout = \"x\"")
                .unwrap()
                .configurations
                .len(),
            1
        );
    }
}
