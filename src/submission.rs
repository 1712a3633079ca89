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

/// Whether the output paths `a` and `b` name one file: the same directory entry once `.`, `..`
/// and symbolic links in the folders are resolved (`x.csv`, `./x.csv`, `out/../x.csv`), or two
/// links to one existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    /// The canonical folder and the name: what an atomic write replaces.
    fn entry(path: &Path) -> Option<std::path::PathBuf> {
        let name = path.file_name()?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(parent).ok()?.join(name))
    }
    match (entry(a), entry(b)) {
        (Some(x), Some(y)) if x == y => return true,
        (None, None) => return a == b,
        _ => {}
    }
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(x), Ok(y)) if x == y
    )
}

/// Writes `bytes` to `path` atomically, creating its folder.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating folder {}", parent.display()))?;
    }
    write_atomic(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_is_recognised_under_every_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        let x = d.join("x.csv");
        assert!(same_file(&x, &d.join(".").join("x.csv")));
        assert!(same_file(&x, &d.join("sub").join("..").join("x.csv")));
        assert!(!same_file(&x, &d.join("y.csv")));
        std::fs::write(&x, "").unwrap();
        std::os::unix::fs::symlink(&x, d.join("link.csv")).unwrap();
        assert!(same_file(&x, &d.join("link.csv")));
        std::os::unix::fs::symlink(d, d.join("sub").join("up")).unwrap();
        assert!(same_file(&x, &d.join("sub").join("up").join("x.csv")));
    }
}
