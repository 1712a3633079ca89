//! The competition's files of labels per image: reading and writing `ImageID,Labels`
//! (submissions, and a test set's ground truth `test_labels.csv`), and writing the probabilities
//! file `ImageID,<label>,...`.

use crate::data::Record;
use crate::files::write_atomic;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Reads an `ImageID,Labels` file (a submission, or a test set's ground truth) as labelled
/// records without captions. Labels are space-separated; an empty field is an empty set.
pub fn read_predictions(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header))
            if header
                .trim_start_matches('\u{feff}')
                .trim()
                .eq_ignore_ascii_case("ImageID,Labels") => {}
        _ => bail!(
            "{}: line 1 must be the header `ImageID,Labels`",
            path.display()
        ),
    }
    let mut records = Vec::new();
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let Some((id, labels)) = line.split_once(',') else {
            bail!(
                "{} line {}: expected `ImageID,Labels`",
                path.display(),
                index + 1
            );
        };
        records.push(Record {
            id: id.trim().to_string(),
            labels: Some(labels.split_whitespace().map(str::to_string).collect()),
            caption: String::new(),
            line: index + 1,
        });
    }
    Ok(records)
}

/// Writes `ImageID,Labels`: one line per id, its predicted labels space-separated in vocabulary
/// order (`decisions` is `[ids, labels]` row-major).
pub fn write_predictions(
    path: &Path,
    ids: &[String],
    decisions: &[bool],
    labels: &[String],
) -> Result<()> {
    let k = labels.len();
    if decisions.len() != ids.len() * k {
        bail!(
            "{} decisions for {} ids x {k} labels",
            decisions.len(),
            ids.len()
        );
    }
    let mut out = String::from("ImageID,Labels\n");
    for (id, row) in ids.iter().zip(decisions.chunks(k.max(1))) {
        let chosen: Vec<&str> = labels
            .iter()
            .zip(row)
            .filter(|(_, on)| **on)
            .map(|(label, _)| label.as_str())
            .collect();
        out.push_str(&format!("{id},{}\n", chosen.join(" ")));
    }
    write_file(path, out.as_bytes())
}

/// Writes `ImageID,<label>,...` with one probability per label.
pub fn write_probabilities(
    path: &Path,
    ids: &[String],
    probabilities: &[f32],
    labels: &[String],
) -> Result<()> {
    let k = labels.len();
    if probabilities.len() != ids.len() * k {
        bail!(
            "{} probabilities for {} ids x {k} labels",
            probabilities.len(),
            ids.len()
        );
    }
    let mut out = format!("ImageID,{}\n", labels.join(","));
    for (id, row) in ids.iter().zip(probabilities.chunks(k.max(1))) {
        out.push_str(id);
        for p in row {
            out.push_str(&format!(",{p:.6}"));
        }
        out.push('\n');
    }
    write_file(path, out.as_bytes())
}

/// Writes `bytes` to `path` atomically, creating its folder.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating folder {}", parent.display()))?;
    }
    write_atomic(path, bytes)
}
