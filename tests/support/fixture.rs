//! A synthetic dataset, a cache of it and a split of it in a temporary folder: what the
//! trainer's tests train, evaluate and predict on.

use super::synthetic::Synthetic;
use anyhow::Result;
use multiclip::data::labels::LabelVocab;
use multiclip::data::split::Split;
use multiclip::data::{Dataset, Part};
use std::path::{Path, PathBuf};

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub data: PathBuf,
    pub cache: PathBuf,
    pub split: PathBuf,
}

impl Fixture {
    /// `spec`'s dataset in `root/data`, the cache `write_cache` writes of it in `root/cache`, and
    /// a seeded stratified split (a quarter for validation) in `root/split.json`.
    pub fn new(
        spec: &Synthetic,
        write_cache: impl Fn(&Synthetic, &Path, &Path) -> Result<()>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let cache = root.join("cache");
        spec.write_dataset(&data).unwrap();
        write_cache(spec, &data, &cache).unwrap();
        let records = Dataset::open(&data).unwrap().records(Part::Train).unwrap();
        let vocab = LabelVocab::from_records(&records).unwrap();
        let split = root.join("split.json");
        Split::stratified(&records, &vocab, 0.25, 3407)
            .unwrap()
            .save(&split)
            .unwrap();
        Self {
            _dir: dir,
            root,
            data,
            cache,
            split,
        }
    }
}
