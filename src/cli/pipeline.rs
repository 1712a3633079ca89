//! Pipeline files: a TOML file that writes down, stage by stage, the flags of the `multiclip`
//! commands a run consists of (extract, split, train, evaluate, predict).
//!
//! Each stage section holds exactly the long flags of its command (`batch_size = 32` is
//! `--batch-size 32`), so everything the command line can do a pipeline can do, with the same
//! names, defaults and error messages. A stage written as an array of tables (`[[evaluate]]`)
//! runs once per entry. `--set stage.key=value` overrides a field (in every entry of an array).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use toml::{Table, Value};

/// The `[pipeline]` section: what the run is and what it needs before it can start.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineInfo {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Paths that must exist before the run (e.g. the backbone weights).
    #[serde(default)]
    pub needs: Vec<PathBuf>,
    /// A command run once when something in `needs` is missing (e.g. `scripts/fetch-weights.sh`).
    #[serde(default)]
    pub fetch: Option<String>,
}

/// A parsed pipeline: its info and the flag tables of each stage, one per run of the stage
/// (the runner fixes the order of the stages).
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub info: PipelineInfo,
    pub stages: Vec<(String, Vec<Table>)>,
}

impl Pipeline {
    /// Reads a pipeline file and applies `overrides` (`stage.key=value`, value in TOML syntax
    /// or a bare string).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline {}", path.display()))?;
        let mut table: Table = toml::from_str(&text)
            .with_context(|| format!("parsing pipeline {}", path.display()))?;
        for item in overrides {
            apply_override(&mut table, item)
                .with_context(|| format!("applying --set {item} to {}", path.display()))?;
        }
        Self::from_table(table).with_context(|| format!("in pipeline {}", path.display()))
    }

    fn from_table(mut table: Table) -> Result<Self> {
        let info = match table.remove("pipeline") {
            Some(value) => value
                .try_into::<PipelineInfo>()
                .context("in section [pipeline]")?,
            None => bail!("missing section [pipeline] (with at least `name = \"...\"`)"),
        };
        let mut stages = Vec::new();
        for (name, value) in table {
            let runs = match value {
                Value::Table(flags) => vec![flags],
                Value::Array(items) => items
                    .into_iter()
                    .map(|item| match item {
                        Value::Table(flags) => Ok(flags),
                        _ => bail!("every [[{name}]] entry must be a table of flags"),
                    })
                    .collect::<Result<_>>()?,
                _ => bail!("`{name}` must be a section ([{name}]) of command-line flags"),
            };
            stages.push((name, runs));
        }
        Ok(Self { info, stages })
    }

    /// The flag tables of one stage (one per run; empty if the pipeline lacks it).
    pub fn stage(&self, name: &str) -> &[Table] {
        self.stages
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&[], |(_, runs)| runs.as_slice())
    }
}

/// `stage.key=value`: sets (or adds) one field.
fn apply_override(table: &mut Table, item: &str) -> Result<()> {
    let (path, raw) = item.split_once('=').context("expected stage.key=value")?;
    let (section, key) = path
        .trim()
        .split_once('.')
        .context("expected stage.key=value")?;
    let value = parse_value(raw.trim());
    let key = key.trim().to_string();
    match table
        .entry(section.to_string())
        .or_insert_with(|| Value::Table(Table::new()))
    {
        Value::Table(flags) => {
            flags.insert(key, value);
        }
        Value::Array(runs) => {
            for run in runs {
                run.as_table_mut()
                    .with_context(|| format!("[[{section}]] holds a non-table entry"))?
                    .insert(key.clone(), value.clone());
            }
        }
        _ => bail!("`{section}` is not a section"),
    }
    Ok(())
}

/// A value in TOML syntax (`1e-3`, `true`, `["a", "b"]`), else the raw text as a string.
fn parse_value(raw: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

/// Turns a stage's flag table into command-line arguments: `key = v` -> `--key v`,
/// `flag = true` -> `--flag`, `false` -> nothing, arrays repeat the flag, tables become JSON.
/// A value starting with `-` (`lr = -1.0`) is joined to its flag (`--lr=-1`), so that it reads
/// as the flag's value and not as another flag.
pub fn to_args(flags: &Table) -> Vec<String> {
    let mut args = Vec::new();
    for (key, value) in flags {
        let flag = format!("--{}", key.replace('_', "-"));
        let mut push = |value: &Value| {
            let value = scalar(value);
            if value.starts_with('-') {
                args.push(format!("{flag}={value}"));
            } else {
                args.extend([flag.clone(), value]);
            }
        };
        match value {
            Value::Boolean(true) => args.push(flag),
            Value::Boolean(false) => {}
            Value::Array(items) => items.iter().for_each(&mut push),
            other => push(other),
        }
    }
    args
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Table(t) => serde_json::to_string(t).unwrap_or_default(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[pipeline]
name = "demo"
needs = ["models/x"]

[extract]
data = "data/demo"
batch_size = 32

[train]
head = "mlp"
lr = 0.001
multistage = false
verbose = true
margin = -0.5
"#;

    #[test]
    fn stages_become_flags() {
        let p = Pipeline::from_table(toml::from_str(FILE).unwrap()).unwrap();
        assert_eq!(p.info.name, "demo");
        let names: Vec<&str> = p.stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["extract", "train"]);
        let args = to_args(&p.stage("train")[0]);
        assert_eq!(
            args,
            [
                "--head",
                "mlp",
                "--lr",
                "0.001",
                "--margin=-0.5",
                "--verbose"
            ]
        );
        assert_eq!(
            to_args(&p.stage("extract")[0]),
            ["--batch-size", "32", "--data", "data/demo"]
        );
    }

    #[test]
    fn overrides_parse_toml_values_or_strings() {
        let mut t: Table = toml::from_str(FILE).unwrap();
        apply_override(&mut t, "train.lr=1e-4").unwrap();
        apply_override(&mut t, "train.head=router").unwrap();
        apply_override(&mut t, "predict.out=preds.csv").unwrap();
        let p = Pipeline::from_table(t).unwrap();
        let train = &p.stage("train")[0];
        assert_eq!(train["lr"].as_float(), Some(1e-4));
        assert_eq!(train["head"].as_str(), Some("router"));
        assert_eq!(p.stage("predict")[0]["out"].as_str(), Some("preds.csv"));
        assert!(apply_override(&mut Table::new(), "nodot=1").is_err());
    }

    #[test]
    fn arrays_of_tables_run_once_per_entry_and_take_overrides() {
        let text = "[pipeline]\nname = \"x\"\n[[evaluate]]\npart = \"val\"\n[[evaluate]]\npart = \"test\"\n";
        let mut t: Table = toml::from_str(text).unwrap();
        apply_override(&mut t, "evaluate.batch_size=8").unwrap();
        let p = Pipeline::from_table(t).unwrap();
        let runs = p.stage("evaluate");
        assert_eq!(runs.len(), 2);
        assert_eq!(to_args(&runs[1]), ["--batch-size", "8", "--part", "test"]);
        assert!(p.stage("predict").is_empty());
    }

    #[test]
    fn missing_pipeline_section_is_an_error() {
        let err = Pipeline::from_table(toml::from_str("[train]\nlr = 1").unwrap()).unwrap_err();
        assert!(err.to_string().contains("[pipeline]"));
    }
}
