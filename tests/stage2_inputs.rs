//! Bad input to stage 2 through the real binary: training settings out of range, head
//! configurations that cannot work or do not fit in memory, checkpoints that were damaged, edited
//! or replaced, caches with rows skipped at extraction, outputs that cannot be written or collide,
//! and names that are taken. Each gives a clear error (exit code 1, never a panic) or the
//! documented behaviour, and nothing that existed is overwritten or lost.

mod support;

use candle_core::Device;
use multiclip::loss::Loss;
use multiclip::train::TrainConfig;
use multiclip::train::run::{TrainRequest, train};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::fixture::Fixture;
use support::synthetic::Synthetic;

const ROWS: usize = 160;

fn synthetic() -> Synthetic {
    Synthetic {
        rows: ROWS,
        dim: 8,
        tokens: Some((4, 1..4)),
        labels: 4,
        seed: 5,
        shard_rows: 50,
        backbone: "synthetic:models/test-backbone".into(),
    }
}

fn fixture() -> Fixture {
    Fixture::new(&synthetic(), |spec, data, cache| {
        spec.write_cache(data, cache)
    })
}

/// A small checkpoint of `head` trained on the fixture through the library; returns its
/// sidecar's path.
fn checkpoint(f: &Fixture, head: &str, out: &str) -> PathBuf {
    train(&TrainRequest {
        cache: f.cache.clone(),
        data: f.data.clone(),
        split: f.split.clone(),
        head: head.parse().unwrap(),
        loss: Loss::Bce,
        config: TrainConfig {
            batch_size: 64,
            epochs: 2,
            ..TrainConfig::default()
        },
        out_dir: f.root.join(out),
        name: None,
        device: Device::Cpu,
    })
    .unwrap()
    .checkpoint
}

fn multiclip<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clean failure (exit code 1, or 2 for a command line clap refuses: an error message,
/// not a panic or a signal); returns stderr.
fn fails(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(1 | 2)),
        "expected a clean error, got {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        output.status,
        text(&output.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Asserts success; returns stderr.
fn succeeds(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert!(
        output.status.success(),
        "failed with {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        output.status,
        text(&output.stdout)
    );
    stderr
}

/// `multiclip train` on the fixture for one epoch, plus `extra` flags (a small MLP unless they
/// give a `--head`).
fn train_cli(f: &Fixture, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "train",
        "--cache",
        f.cache.to_str().unwrap(),
        "--data",
        f.data.to_str().unwrap(),
        "--split",
        f.split.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    if !extra.contains(&"--head") {
        args.extend(["--head".to_string(), "mlp:hidden=8".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    multiclip(&args)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn training_settings_out_of_range_are_refused_naming_the_flag() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    let cases: &[(&[&str], &str)] = &[
        (&["--batch-size", "0"], "--batch-size"),
        (&["--eval-batch-size", "0"], "--eval-batch-size"),
        (&["--lr=-0.01"], "--lr"),
        (&["--lr", "0"], "--lr"),
        (&["--lr", "NaN"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--weight-decay=-5"], "--weight-decay"),
        (&["--weight-decay", "NaN"], "--weight-decay"),
        (&["--clip-grad=-1"], "--clip-grad"),
        (&["--clip-grad", "NaN"], "--clip-grad"),
        (&["--epochs", "0"], "--epochs"),
        (&["--patience", "0"], "--patience"),
        (&["--warmup-epochs=-1"], "--warmup-epochs"),
        (&["--warmup-epochs", "NaN"], "--warmup-epochs"),
        (&["--loss", "smoothing:epsilon=1"], "epsilon"),
        (&["--loss", "focal:gamma=-1"], "gamma"),
        (&["--loss", "focal:alpha=1.5"], "alpha"),
        (&["--loss", "angular:margin=2"], "margin"),
        (&["--loss", "asl:clip=1"], "clip"),
    ];
    for (flags, named) in cases {
        let stderr = fails(&train_cli(&f, &out, flags));
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
    // Clipping off (0) is a setting, not an error.
    succeeds(&train_cli(&f, &out, &["--clip-grad", "0"]));
}

#[test]
fn evaluate_and_predict_refuse_a_zero_batch_size() {
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "checkpoints");
    let ckpt = ckpt.to_str().unwrap();
    let stderr = fails(&multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt,
        "--batch-size",
        "0",
    ]));
    assert!(stderr.contains("--batch-size"), "{stderr}");
    let out = f.root.join("predictions.csv");
    let stderr = fails(&multiclip(&[
        "predict",
        "--cache",
        f.cache.to_str().unwrap(),
        "--checkpoint",
        ckpt,
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "0",
    ]));
    assert!(stderr.contains("--batch-size"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn extract_refuses_zero_sizes_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir_all(data.join("data")).unwrap();
    fs::write(data.join("train.csv"), "ImageID,Labels,Caption\n").unwrap();
    for flag in ["--batch-size", "--shard-rows", "--prefetch", "--max-pixels"] {
        let out = dir.path().join("cache");
        let stderr = fails(&multiclip(&[
            "extract",
            "--data",
            data.to_str().unwrap(),
            "--backbone",
            "dinov2:tests/fixtures/dinov2-tiny",
            "--out",
            out.to_str().unwrap(),
            flag,
            "0",
        ]));
        assert!(stderr.contains(flag), "{flag}: {stderr}");
        assert!(!out.exists(), "{flag}");
    }
}

#[test]
fn head_settings_that_cannot_work_are_refused_naming_the_field() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    for (head, field) in [
        ("gat:hidden=0", "hidden"),
        ("gat:heads=0", "heads"),
        ("gat:hidden=6,heads=4", "heads"),
        ("gat:threshold=1.5", "threshold"),
        ("mlp:dropout=1", "dropout"),
        ("router:dropout=-0.5", "dropout"),
        ("ml_decoder:input=multimodal_tokens,d_model=0", "d_model"),
        ("ml_decoder:input=multimodal_tokens,ffn=0", "ffn"),
        (
            "ml_decoder:input=multimodal_tokens,d_model=10,heads=3",
            "heads",
        ),
    ] {
        let stderr = fails(&train_cli(&f, &out, &["--head", head]));
        assert!(
            stderr.contains(field) && stderr.contains(head),
            "{head}: {stderr}"
        );
    }
    assert!(files_in(&out).is_empty());
}

#[test]
fn a_head_too_large_for_memory_is_refused_before_allocating() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    // 16 inputs x 1e8 hidden + 1e8 x 4 labels: 2.1e9 parameters, 39 GiB with their gradients,
    // AdamW moments and the best epoch's copy, before any activation.
    let stderr = fails(&train_cli(&f, &out, &["--head", "mlp:hidden=100000000"]));
    assert!(
        stderr.contains("GiB") && stderr.contains("--memory-limit"),
        "{stderr}"
    );
    // The limit can be set: a small head over a tiny limit is refused too, naming both numbers.
    let stderr = fails(&train_cli(&f, &out, &["--memory-limit", "1K"]));
    assert!(
        stderr.contains("memory") && stderr.contains("1.0 KiB"),
        "{stderr}"
    );
    assert!(files_in(&out).is_empty());
    succeeds(&train_cli(&f, &out, &["--memory-limit", "1G"]));
}
