//! k-fold ensembles and the size budget end to end on a small synthetic cache: members that load
//! alone, the ensemble's probabilities as the mean of its members', out-of-fold thresholds, the
//! ensemble through `evaluate` and `predict`, and refusals before training.

mod support;

use candle_core::Device;
use multiclip::cache::{CacheReader, Integrity};
use multiclip::evaluate::{EvalPart, EvaluateRequest, evaluate};
use multiclip::model::Model;
use multiclip::model::checkpoint::resolve;
use multiclip::model::ensemble::member_paths;
use multiclip::train::TrainConfig;
use multiclip::train::folds::FoldRows;
use multiclip::train::kfold::{KFoldRequest, train_folds};
use multiclip::train::run::train;
use std::collections::HashSet;
use support::fixture::{Fixture, fixture, multiclip, request};

fn kfold(f: &Fixture, head: &str, rows: FoldRows, jobs: usize) -> KFoldRequest {
    let mut train = request(f, head, "kfold");
    train.config.epochs = 3;
    KFoldRequest {
        train,
        folds: 3,
        rows,
        jobs,
    }
}

fn evaluate_part(checkpoint: &std::path::Path, part: EvalPart) -> anyhow::Result<f64> {
    evaluate(&EvaluateRequest {
        checkpoint: checkpoint.to_path_buf(),
        cache: None,
        data: None,
        split: None,
        part,
        batch_size: 64,
        at_least_one: true,
        device: Device::Cpu,
        integrity: Integrity::Full,
    })
    .map(|e| e.metrics.averages.micro.f1)
}

#[test]
fn a_kfold_ensemble_averages_members_that_load_alone() {
    let f = fixture();
    let report = train_folds(&kfold(&f, "mlp:hidden=8", FoldRows::All, 2)).unwrap();
    let meta = &report.meta;
    // Three members, validated on disjoint folds that cover every row of the split.
    assert_eq!(meta.member_runs.len(), 3);
    let fold_rows: usize = meta.member_runs.iter().map(|m| m.val_rows).sum();
    assert_eq!(fold_rows, 320);
    assert_eq!(report.shown.rows, 320);
    assert_eq!(report.shown_part, "out-of-fold");
    assert_eq!(
        report.shown_ids.iter().collect::<HashSet<_>>().len(),
        320,
        "every row once"
    );
    assert_eq!(meta.card.thresholds, report.shown.thresholds);
    assert_eq!(meta.size, meta.member_runs[0].size.times(3));

    // The ensemble's probabilities are the mean of its members', each loaded on its own.
    let device = Device::Cpu;
    let ensemble = Model::load(&report.checkpoint, &device).unwrap();
    let members: Vec<Model> = member_paths(&report.checkpoint)
        .unwrap()
        .iter()
        .map(|p| Model::load(p, &device).unwrap())
        .collect();
    assert_eq!(members.len(), 3);
    assert!(
        members[1].card.name.ends_with("_3fold.fold-2-of-3"),
        "{}",
        members[1].card.name
    );
    let reader = CacheReader::open(&f.cache).unwrap();
    let rows: Vec<usize> = (0..reader.len()).collect();
    let scores = |m: &Model| {
        m.score_rows(&reader, &rows, 50, &device, None)
            .unwrap()
            .probabilities
    };
    let mean: Vec<f32> = {
        let all: Vec<Vec<f32>> = members.iter().map(scores).collect();
        (0..all[0].len())
            .map(|i| all.iter().map(|p| p[i]).sum::<f32>() / 3.0)
            .collect()
    };
    let got = scores(&ensemble);
    let max_diff = got
        .iter()
        .zip(&mean)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-6, "ensemble vs mean of members: {max_diff}");
    assert_ne!(scores(&members[0]), scores(&members[1]), "members differ");

    // Every member trained on some of the split's validation ids: `evaluate` refuses them as a
    // validation number, and scores the training part.
    let err = evaluate_part(&report.checkpoint, EvalPart::Val).unwrap_err();
    assert!(err.to_string().contains("out-of-fold"), "{err}");
    evaluate_part(&report.checkpoint, EvalPart::Train).unwrap();

    // A member whose weights changed is refused.
    let (weights, _) = resolve(&member_paths(&report.checkpoint).unwrap()[2]);
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let err = format!(
        "{:#}",
        Model::load(&report.checkpoint, &device).err().unwrap()
    );
    assert!(err.contains("changed since ensemble"), "{err}");
}

#[test]
fn folds_of_the_training_ids_keep_validation_held_out() {
    let f = fixture();
    let report = train_folds(&kfold(&f, "mlp:hidden=0", FoldRows::Train, 1)).unwrap();
    let meta = &report.meta;
    let held_out = meta.held_out.as_ref().expect("validation held out");
    assert_eq!(report.shown_part, "val");
    assert_eq!(held_out.metrics.rows, 80);
    assert_eq!(meta.metrics.rows, 240, "out of fold on the training ids");
    // The held-out number is what evaluating the ensemble on validation gives.
    let micro = evaluate_part(&report.checkpoint, EvalPart::Val).unwrap();
    assert_eq!(micro, held_out.metrics.averages.micro.f1);
}

#[test]
fn the_budget_refuses_a_head_or_ensemble_before_training() {
    let f = fixture();
    // mlp:hidden=8 on image + text (16 + 16) with 5 labels: 32*8 + 8 + 8*5 + 5 = 309 values.
    let one = 309.0 * 4.0 / 1e6;
    let mut over = request(&f, "mlp:hidden=8", "budget");
    over.config = TrainConfig {
        max_head_mb: Some(one * 0.9),
        ..over.config
    };
    let err = train(&over).err().unwrap().to_string();
    assert!(err.contains("309 trainable parameters"), "{err}");
    let mut fits = kfold(&f, "mlp:hidden=8", FoldRows::All, 1);
    fits.train.config.max_head_mb = Some(one * 1.5);
    let err = train_folds(&fits).err().unwrap().to_string();
    assert!(
        err.contains("the 3-fold ensemble") && err.contains("927 trainable"),
        "{err}"
    );
    // Nothing was written.
    for out in ["budget", "kfold"] {
        assert!(!f.root.join(out).exists(), "{out}");
    }
}

#[test]
fn kfold_from_the_command_line_through_evaluate_and_predict() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--cache",
            f.cache.to_str().unwrap(),
            "--data",
            f.data.to_str().unwrap(),
            "--split",
            f.split.to_str().unwrap(),
            "--head",
            "mlp:hidden=8",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let trained = multiclip(
        &args(&["--folds", "3", "--jobs", "2", "--name", "kf"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let stdout = String::from_utf8_lossy(&trained.stdout);
    assert!(
        stdout.contains("kf.fold-3-of-3") && stdout.contains("out-of-fold"),
        "{stdout}"
    );
    assert!(stdout.contains("trainable parameters"), "{stdout}");
    let html = std::fs::read_to_string(out.join("kf.report.html")).unwrap();
    assert!(html.contains("Members") && html.contains("fold-2-of-3"));
    // The synthetic dataset has no images: the gallery keeps captions and says why.
    assert!(html.contains("Error gallery") && html.contains("holds no images"));
    let checkpoint = out.join("kf");
    let checkpoint = checkpoint.to_str().unwrap();

    // A test set with ground truth: the ensemble through evaluate, then predict.
    let train_csv = std::fs::read_to_string(f.data.join("train.csv")).unwrap();
    let mut test_labels = String::from("ImageID,Labels\n");
    for line in train_csv.lines().skip(1).take(30) {
        let mut fields = line.splitn(3, ',');
        let (id, labels) = (fields.next().unwrap(), fields.next().unwrap());
        test_labels.push_str(&format!("{id},{labels}\n"));
    }
    std::fs::write(f.data.join("test_labels.csv"), test_labels).unwrap();
    let tested = multiclip(&["evaluate", "--checkpoint", checkpoint, "--part", "test"]);
    let table = String::from_utf8_lossy(&tested.stdout);
    assert!(
        table.contains("checkpoint kf") && table.contains("30 rows"),
        "{table}"
    );
    let predictions = f.root.join("predictions.csv");
    multiclip(&[
        "predict",
        "--cache",
        f.cache.to_str().unwrap(),
        "--checkpoint",
        checkpoint,
        "--out",
        predictions.to_str().unwrap(),
    ]);
    let records = multiclip::submission::read_predictions(&predictions).unwrap();
    assert_eq!(records.len(), 320);
    // The same name again is refused, and --fold-rows needs --folds.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(args(&["--folds", "3", "--name", "kf"]))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is taken"));
}
