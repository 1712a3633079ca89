//! A small labelled dataset with its cache and split in a temporary folder, the training
//! request and settings the trainer's tests use on it, and running the `multiclip` binary.
//!
//! Each test crate uses a part of it.
#![allow(dead_code)]

use super::synthetic::Synthetic;
use candle_core::Device;
use multiclip::data::labels::LabelVocab;
use multiclip::data::split::Split;
use multiclip::data::{Dataset, Part};
use multiclip::loss::Loss;
use multiclip::train::TrainConfig;
use multiclip::train::run::TrainRequest;
use std::path::PathBuf;
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

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    let cache = root.join("cache");
    let spec = synthetic("synthetic:models/test-backbone");
    spec.write_dataset(&data).unwrap();
    spec.write_cache(&data, &cache).unwrap();
    let records = Dataset::open(&data).unwrap().records(Part::Train).unwrap();
    let vocab = LabelVocab::from_records(&records).unwrap();
    let split = root.join("split.json");
    Split::stratified(&records, &vocab, 0.25, 3407)
        .unwrap()
        .save(&split)
        .unwrap();
    Fixture {
        _dir: dir,
        root,
        data,
        cache,
        split,
    }
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
