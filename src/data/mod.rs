//! Datasets in the competition format: the csv records, the label vocabulary, the train/validation
//! split and image decoding.
//!
//! A dataset is a directory laid out like the competition's:
//!
//! ```text
//! <dir>/train.csv     ImageID,Labels,Caption   (optional)
//! <dir>/test.csv      ImageID,Caption          (optional; at least one of the two)
//! <dir>/data/<ImageID>                          images of both parts, in one folder
//! ```

pub mod image;
pub mod inspect;
pub mod labels;
pub mod records;
pub mod split;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use image::ImageLoadError;
pub use labels::LabelVocab;
pub use records::{CsvContents, Problem, Record};
pub use split::Split;

/// The two csv files of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// `train.csv`: labelled rows.
    Train,
    /// `test.csv`: rows to predict.
    Test,
}

impl Part {
    pub const ALL: [Part; 2] = [Part::Train, Part::Test];

    /// `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Test => "test",
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A dataset directory in the competition layout (see the module docs).
#[derive(Clone, Debug)]
pub struct Dataset {
    dir: PathBuf,
}

impl Dataset {
    /// Opens `dir`; fails unless it holds `train.csv` or `test.csv`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            bail!("dataset folder {} does not exist", dir.display());
        }
        let dataset = Dataset {
            dir: dir.to_path_buf(),
        };
        if dataset.parts().is_empty() {
            bail!(
                "{} holds neither train.csv nor test.csv; a dataset folder needs at least one \
                 (images go in {}/data/)",
                dir.display(),
                dir.display()
            );
        }
        Ok(dataset)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parts whose csv file exists, train first.
    pub fn parts(&self) -> Vec<Part> {
        Part::ALL
            .into_iter()
            .filter(|&p| self.csv_path(p).is_file())
            .collect()
    }

    /// `<dir>/train.csv` or `<dir>/test.csv` (whether or not it exists).
    pub fn csv_path(&self, part: Part) -> PathBuf {
        self.dir.join(format!("{}.csv", part.name()))
    }

    /// The path of image `id` inside `<dir>/data/`; an id that could name a file outside it is
    /// refused ([`records::check_image_id`]). Only the id is looked at: the file's existence and
    /// type are checked when it is opened, and a symlink inside `data/` is followed wherever it
    /// points (README, "Data format").
    pub fn image_file(&self, id: &str) -> Result<PathBuf, ImageLoadError> {
        let data = self.dir.join("data");
        match records::check_image_id(id) {
            Ok(()) => Ok(data.join(id)),
            Err(reason) => Err(ImageLoadError::BadId {
                id: records::printable_id(id),
                data,
                reason,
            }),
        }
    }

    /// Reads one part's csv with its problems; an absent file is an error naming it.
    pub fn read_csv(&self, part: Part) -> Result<CsvContents> {
        let path = self.csv_path(part);
        if !path.is_file() {
            bail!(
                "{} does not exist ({part} part of the dataset)",
                path.display()
            );
        }
        let contents = records::read_csv(&path)?;
        if part == Part::Train && !contents.has_labels {
            bail!(
                "{} has no Labels column (header must be ImageID,Labels,Caption)",
                path.display()
            );
        }
        Ok(contents)
    }

    /// The records of one part; a file with a header and no rows is an error naming it (what
    /// reads records has nothing to do; [`Dataset::read_csv`] reads it as 0 rows). Problems found
    /// in the file are logged as warnings (see `multiclip dataset inspect` for the full list).
    pub fn records(&self, part: Part) -> Result<Vec<Record>> {
        let contents = self.read_csv(part)?;
        if contents.records.is_empty() {
            bail!(
                "{} has a header but no rows; remove it if the dataset has no {part} part",
                self.csv_path(part).display()
            );
        }
        if !contents.problems.is_empty() {
            tracing::warn!(
                "{}: {} oddities found while reading (first on line {}: {}); run `multiclip \
                 dataset inspect {}` to list them",
                self.csv_path(part).display(),
                contents.problems.len(),
                contents.problems[0].line,
                contents.problems[0].message,
                self.dir.display()
            );
        }
        Ok(contents.records)
    }
}
