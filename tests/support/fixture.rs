//! A small labelled dataset with its cache and split in a temporary folder, the training
//! request and settings the trainer's tests use on it, and running the `multiclip` binary.
//!
//! Each test crate uses a part of it.
#![allow(dead_code)]

use super::synthetic::Synthetic;
use candle_core::Device;
use multiclip::cache::Integrity;
use multiclip::data::labels::LabelVocab;
use multiclip::data::split::Split;
use multiclip::data::{Dataset, Part};
use multiclip::loss::Loss;
use multiclip::train::TrainConfig;
use multiclip::train::run::TrainRequest;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A dataset, its cache and a split in a temporary folder.
pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub data: PathBuf,
    pub cache: PathBuf,
    pub split: PathBuf,
}

pub fn synthetic(backbone: &str) -> Synthetic {
    Synthetic {
        rows: 320,
        dim: 16,
        tokens: Some((8, 2..6)),
        labels: 5,
        seed: 7,
        shard_rows: 100,
        backbone: backbone.into(),
    }
}

impl Fixture {
    /// `spec`'s dataset in `root/data`, the cache `write_cache` writes of it in `root/cache`, and
    /// a seeded stratified split (a quarter for validation) in `root/split.json`.
    pub fn new(
        spec: &Synthetic,
        write_cache: impl Fn(&Synthetic, &Path, &Path) -> anyhow::Result<()>,
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

/// The trainer tests' dataset ([`synthetic`]) with the cache it writes itself.
pub fn fixture() -> Fixture {
    Fixture::new(
        &synthetic("synthetic:models/test-backbone"),
        |spec, data, cache| spec.write_cache(data, cache),
    )
}

pub fn quick_config() -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        batch_size: 64,
        eval_batch_size: 100,
        epochs: 6,
        patience: 3,
        warmup_epochs: 1.0,
        ..TrainConfig::default()
    }
}

pub fn request(f: &Fixture, head: &str, out: &str) -> TrainRequest {
    TrainRequest {
        cache: f.cache.clone(),
        data: f.data.clone(),
        split: f.split.clone(),
        head: head.parse().unwrap(),
        loss: Loss::Bce,
        config: quick_config(),
        out_dir: f.root.join(out),
        name: None,
        device: Device::Cpu,
        integrity: Integrity::Full,
    }
}

/// Runs the `multiclip` binary with `args`; fails the test, with its output, unless it succeeds.
pub fn multiclip(args: &[&str]) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "multiclip {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
