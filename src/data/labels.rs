//! The label vocabulary: which label token is which output column.
//!
//! Labels are tokens without spaces (the competition uses integer ids such as `1`..`19`; other
//! datasets use words). Columns are ordered numerically when every token is an integer, else
//! lexicographically (byte order). The vocabulary is saved as `labels.json`
//! (`{"labels": ["1", "2", ...]}`) and loaded back in exactly the saved order, so the split,
//! checkpoints and predictions all agree on the columns.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::Record;

/// Conventional file name of a saved vocabulary.
pub const LABELS_FILE: &str = "labels.json";

/// An ordered set of label tokens; the position of a token is its column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LabelFile", into = "LabelFile")]
pub struct LabelVocab {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

/// The JSON form of a vocabulary.
#[derive(Serialize, Deserialize)]
struct LabelFile {
    labels: Vec<String>,
}

impl TryFrom<LabelFile> for LabelVocab {
    type Error = anyhow::Error;
    fn try_from(file: LabelFile) -> Result<Self> {
        LabelVocab::from_ordered(file.labels)
    }
}

impl From<LabelVocab> for LabelFile {
    fn from(vocab: LabelVocab) -> Self {
        LabelFile {
            labels: vocab.names,
        }
    }
}

impl LabelVocab {
    /// The vocabulary of every label token in `records`, in canonical order (numeric when all
    /// tokens are integers, else lexicographic). Fails when no record has labels.
    pub fn from_records(records: &[Record]) -> Result<LabelVocab> {
        let tokens: BTreeSet<&str> = records
            .iter()
            .filter_map(|r| r.labels.as_ref())
            .flatten()
            .map(String::as_str)
            .collect();
        if tokens.is_empty() {
            bail!("no labels found: a label vocabulary needs labelled rows (train.csv)");
        }
        LabelVocab::from_tokens(tokens)
    }

    /// A vocabulary of the given tokens (duplicates merged) in canonical order.
    pub fn from_tokens<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Result<LabelVocab> {
        let mut names: Vec<String> = tokens
            .into_iter()
            .map(|t| t.as_ref().to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let numbers: Option<Vec<i128>> = names.iter().map(|n| n.parse().ok()).collect();
        if let Some(numbers) = numbers {
            let mut keyed: Vec<(i128, String)> = numbers.into_iter().zip(names).collect();
            keyed.sort();
            names = keyed.into_iter().map(|(_, n)| n).collect();
        }
        LabelVocab::from_ordered(names)
    }

    /// A vocabulary with exactly this column order; tokens must be unique, non-empty and without
    /// whitespace.
    pub fn from_ordered(names: Vec<String>) -> Result<LabelVocab> {
        let mut index = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() || name.contains(char::is_whitespace) {
                bail!("label `{name}` is empty or contains whitespace");
            }
            if index.insert(name.clone(), i).is_some() {
                bail!("label `{name}` is listed twice");
            }
        }
        Ok(LabelVocab { names, index })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Label tokens in column order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The column of `label`, if it is in the vocabulary.
    pub fn index(&self, label: &str) -> Option<usize> {
        self.index.get(label).copied()
    }

    /// Multi-hot vector (1.0 at each label's column). An unknown label is an error naming it.
    pub fn encode(&self, labels: &[String]) -> Result<Vec<f32>> {
        let mut hot = vec![0.0; self.len()];
        for label in labels {
            let i = self.index(label).with_context(|| {
                format!(
                    "unknown label `{label}`: the vocabulary has {} labels ({})",
                    self.len(),
                    self.names.join(" ")
                )
            })?;
            hot[i] = 1.0;
        }
        Ok(hot)
    }

    /// The labels whose column is set, in column order. `set` must have one entry per label.
    pub fn decode(&self, set: &[bool]) -> Vec<String> {
        assert_eq!(
            set.len(),
            self.len(),
            "decode needs one flag per label column"
        );
        self.names
            .iter()
            .zip(set)
            .filter(|&(_, &on)| on)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Writes the vocabulary as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write label vocabulary {}", path.display()))
    }

    /// Reads a vocabulary written by [`LabelVocab::save`], keeping its column order.
    pub fn load(path: &Path) -> Result<LabelVocab> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read label vocabulary {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid label vocabulary", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &LabelVocab) -> Vec<&str> {
        v.names().iter().map(String::as_str).collect()
    }

    #[test]
    fn integer_labels_sort_numerically() {
        let v = LabelVocab::from_tokens(["10", "2", "19", "1", "2"]).unwrap();
        assert_eq!(names(&v), ["1", "2", "10", "19"]);
        assert_eq!(v.index("10"), Some(2));
        assert_eq!(v.index("12"), None);
    }

    #[test]
    fn word_labels_sort_lexicographically() {
        let v = LabelVocab::from_tokens(["dog", "10", "cat", "Zebra"]).unwrap();
        assert_eq!(names(&v), ["10", "Zebra", "cat", "dog"]);
    }

    #[test]
    fn encode_decode_and_unknown_label() {
        let v = LabelVocab::from_tokens(["1", "3", "13"]).unwrap();
        assert_eq!(
            v.encode(&["13".into(), "1".into()]).unwrap(),
            [1.0, 0.0, 1.0]
        );
        assert_eq!(v.decode(&[false, true, true]), ["3", "13"]);
        let err = v.encode(&["12".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown label `12`"), "{err}");
    }

    #[test]
    fn save_load_keeps_order_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LABELS_FILE);
        // A non-canonical order must survive too.
        let v = LabelVocab::from_ordered(vec!["b".into(), "a".into(), "10".into()]).unwrap();
        v.save(&path).unwrap();
        assert_eq!(LabelVocab::load(&path).unwrap(), v);
        std::fs::write(&path, r#"{"labels": ["a", "a"]}"#).unwrap();
        let err = format!("{:#}", LabelVocab::load(&path).unwrap_err());
        assert!(
            err.contains("listed twice") && err.contains(LABELS_FILE),
            "{err}"
        );
    }
}
