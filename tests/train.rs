//! The trainer end to end on small synthetic caches written with the cache writer API:
//! determinism, early stopping, checkpoints, predictions, the multi-stage recipe and the
//! `train` / `evaluate` / `predict` commands.

mod support;

use candle_core::Device;
use candle_nn::VarMap;
use multiclip::cache::Integrity;
use multiclip::cache::{CacheReader, StoredDtype};
use multiclip::data::labels::LabelVocab;
use multiclip::data::split::Split;
use multiclip::data::{Dataset, Part};
use multiclip::evaluate::{EvalPart, EvaluateRequest, evaluate};
use multiclip::heads::{self, HeadConfig};
use multiclip::labelled::Targets;
use multiclip::labelled::rows_for_ids;
use multiclip::loss::Loss;
use multiclip::model::score::score_rows;
use multiclip::model::{InputSignature, Model, ModelCard};
use multiclip::submission;
use multiclip::tensor_ops::Precision;
use multiclip::train::checkpoint::{Checkpoint, CheckpointMeta, NameParts, checkpoint_tensors};
use multiclip::train::early_stop::Criterion;
use multiclip::train::run::{head_context, train};
use multiclip::train::{TrainConfig, TrainData, fit};
use std::path::Path;
use support::fixture::{Fixture, fixture, multiclip, quick_config, request, synthetic};

#[test]
fn same_seed_gives_identical_runs_and_checkpoints() {
    let f = fixture();
    let a = train(&request(&f, "mlp", "a")).unwrap();
    let b = train(&request(&f, "mlp", "b")).unwrap();
    let losses = |r: &multiclip::train::run::TrainReport| {
        r.outcome
            .history
            .iter()
            .map(|e| (e.train_loss, e.val_loss, e.val_micro_f1))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(a.meta.model.thresholds, b.meta.model.thresholds);
    let weights = |p: &Path| std::fs::read(p.with_extension("safetensors")).unwrap();
    assert_eq!(weights(&a.checkpoint), weights(&b.checkpoint));
    // A different seed changes the numbers.
    let mut other = request(&f, "mlp", "c");
    other.config.seed = 1;
    let c = train(&other).unwrap();
    assert_ne!(losses(&a), losses(&c));
    // It learned something: the labels are a simple function of the image features.
    assert!(
        a.outcome.validation.micro_f1() > 0.6,
        "{:?}",
        a.outcome.validation.metrics
    );
}

#[test]
fn early_stopping_restores_the_best_epoch() {
    let f = fixture();
    let reader = CacheReader::open(&f.cache).unwrap();
    let records = Dataset::open(&f.data)
        .unwrap()
        .records(Part::Train)
        .unwrap();
    let vocab = LabelVocab::from_records(&records).unwrap();
    let split = Split::load(&f.split).unwrap();
    let targets = Targets::from_records(reader.ids(), &records, &vocab, false).unwrap();
    let data = TrainData {
        reader: &reader,
        targets: &targets,
        train_rows: rows_for_ids(&reader, &split.train, "training").unwrap(),
        val_rows: rows_for_ids(&reader, &split.val, "validation").unwrap(),
        device: Device::Cpu,
    };
    // A learning rate far too high makes the validation loss bounce: early stopping must end
    // the run and hand back the best epoch's weights, not the last ones.
    let config = TrainConfig {
        lr: 0.3,
        epochs: 30,
        patience: 2,
        criterion: Criterion::Loss,
        clip_grad: None,
        ..quick_config()
    };
    let varmap = VarMap::new();
    let ctx = head_context(&reader, &vocab, None, config.seed, &Device::Cpu).unwrap();
    let head = heads::build(
        &"mlp".parse::<HeadConfig>().unwrap(),
        &ctx,
        heads::init::seeded_var_builder(&varmap, config.seed, &Device::Cpu),
    )
    .unwrap();
    let outcome = fit(head.as_ref(), &varmap, &Loss::Bce, &data, &config).unwrap();
    assert!(outcome.stopped_early);
    let last = outcome.history.last().unwrap().epoch;
    assert!(
        outcome.best_epoch < last,
        "best {} last {last}",
        outcome.best_epoch
    );
    let best = &outcome.history[outcome.best_epoch - 1];
    let best_loss = outcome
        .history
        .iter()
        .filter_map(|e| e.val_loss)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(best.val_loss, Some(best_loss));
    // The variables now hold the best epoch's weights: validating again gives its numbers.
    assert!((outcome.validation.loss - best_loss).abs() < 1e-9);
    assert_eq!(Some(outcome.validation.micro_f1()), best.val_micro_f1);
}

/// Saves an untrained head (with its buffers) as a checkpoint, loads it back and compares
/// the probabilities on every row.
fn assert_checkpoint_round_trip(f: &Fixture, head_spec: &str) {
    let reader = CacheReader::open(&f.cache).unwrap();
    let records = Dataset::open(&f.data)
        .unwrap()
        .records(Part::Train)
        .unwrap();
    let vocab = LabelVocab::from_records(&records).unwrap();
    let targets = Targets::from_records(reader.ids(), &records, &vocab, false).unwrap();
    let rows: Vec<usize> = (0..reader.len()).collect();
    let sets = targets.label_sets(&rows);
    let cooc =
        heads::LabelCooccurrence::from_label_sets(sets.iter().map(Vec::as_slice), vocab.len())
            .unwrap();
    let config: HeadConfig = head_spec.parse().unwrap();
    let varmap = VarMap::new();
    let ctx = head_context(&reader, &vocab, Some(cooc), 11, &Device::Cpu).unwrap();
    let head = heads::build(
        &config,
        &ctx,
        heads::init::seeded_var_builder(&varmap, 11, &Device::Cpu),
    )
    .unwrap();
    let before = score_rows(
        head.as_ref(),
        &Loss::Bce,
        &reader,
        &rows,
        64,
        &Device::Cpu,
        None,
    )
    .unwrap()
    .probabilities;
    let reference = train(&request(f, "mlp:hidden=0", "reference"))
        .unwrap()
        .meta;
    let mut checkpoint = Checkpoint {
        meta: CheckpointMeta {
            model: ModelCard {
                head: config.clone(),
                inputs: InputSignature::of_cache(&reader, &head.inputs()).unwrap(),
                ..reference.model
            },
            ..reference
        },
        tensors: checkpoint_tensors(&varmap, head.as_ref()).unwrap(),
    };
    let parts = NameParts {
        head: config.kind.name().into(),
        backbone: "synthetic".into(),
        loss: "bce".into(),
        lr: 0.001,
        batch_size: 64,
        seed: 11,
        criterion: "f1".into(),
    };
    let path = checkpoint
        .save(&f.root.join("round"), None, &parts)
        .unwrap();
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let after = model
        .score_rows(&reader, &rows, 64, &Device::Cpu, None)
        .unwrap()
        .probabilities;
    let max_diff = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        before.len() == after.len() && max_diff == 0.0,
        "{head_spec}: the loaded checkpoint gives other outputs (max difference {max_diff})"
    );
}

#[test]
fn checkpoints_round_trip_to_the_same_outputs() {
    let f = fixture();
    for head in ["mlp", "router", "gat", "ml_decoder:input=multimodal_tokens"] {
        assert_checkpoint_round_trip(&f, head);
    }
}

#[test]
fn the_report_shows_what_evaluating_the_checkpoint_gives() {
    let f = fixture();
    let run = train(&request(&f, "gat", "report")).unwrap();
    let written = multiclip::report::write(&run).unwrap();
    let evaluation = evaluate(&EvaluateRequest {
        checkpoint: run.checkpoint.clone(),
        cache: None,
        data: None,
        split: None,
        part: EvalPart::Val,
        batch_size: 4096,
        at_least_one: true,
        device: Device::Cpu,
        integrity: Integrity::Full,
    })
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written.metrics_json).unwrap()).unwrap();
    assert_eq!(json["rows"], evaluation.rows);
    assert_eq!(json["loss"], evaluation.loss);
    assert_eq!(
        json["metrics"],
        serde_json::to_value(&evaluation.metrics).unwrap()
    );
    assert_eq!(written.data.per_label, evaluation.per_label);
    // The co-occurrence map: P(j | i) over the split's training rows of train.csv.
    let split = Split::load(&f.split).unwrap();
    let records = Dataset::open(&f.data)
        .unwrap()
        .records(Part::Train)
        .unwrap();
    let vocab = LabelVocab::from_ordered(run.meta.model.labels.clone()).unwrap();
    let sets: Vec<Vec<usize>> = records
        .iter()
        .filter(|r| split.train.contains(&r.id))
        .map(|r| {
            r.labels
                .iter()
                .flatten()
                .filter_map(|l| vocab.index(l))
                .collect()
        })
        .collect();
    let counts =
        heads::LabelCooccurrence::from_label_sets(sets.iter().map(Vec::as_slice), vocab.len())
            .unwrap();
    assert_eq!(written.data.cooccurrence, counts.conditional());
}

#[test]
fn a_checkpoint_scores_inputs_without_a_cache() {
    let f = fixture();
    let report = train(&request(&f, "router", "live")).unwrap();
    let model = Model::load(&report.checkpoint, &Device::Cpu).unwrap();
    // Inputs from anywhere (here gathered by hand, as live backbone outputs would be).
    let reader = CacheReader::open(&f.cache).unwrap();
    let rows: Vec<usize> = (0..50).collect();
    let inputs: multiclip::heads::Inputs = model
        .head
        .inputs()
        .into_iter()
        .map(|name| {
            let tensor = reader.gather(&name, &rows, &Device::Cpu).unwrap();
            (name, tensor)
        })
        .collect();
    let live = model.probabilities(&inputs).unwrap();
    assert_eq!(live.dims(), &[50, 5]);
    let cached = model
        .score_rows(&reader, &rows, 16, &Device::Cpu, None)
        .unwrap();
    let live: Vec<f32> = live.flatten_all().unwrap().to_vec1().unwrap();
    let max_diff = live
        .iter()
        .zip(&cached.probabilities)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-6, "{max_diff}");
}

#[test]
fn a_cache_with_another_dtype_is_refused() {
    let f = fixture();
    let report = train(&request(&f, "mlp", "ckpt")).unwrap();
    let reader = CacheReader::open(&f.cache).unwrap();
    let mut model = Model::load(&report.checkpoint, &Device::Cpu).unwrap();
    model.ensure_compatible(&reader).unwrap();
    // The same outputs stored as f32 instead of the f16 the head was trained on.
    for output in &mut model.card.inputs.outputs {
        output.dtype = StoredDtype::F32;
    }
    let message = format!("{:#}", model.ensure_compatible(&reader).unwrap_err());
    assert!(
        message.contains("as f16") && message.contains("trained on f32"),
        "{message}"
    );
}

#[test]
fn a_cache_from_another_backbone_is_refused() {
    let f = fixture();
    let report = train(&request(&f, "mlp", "ckpt")).unwrap();
    let other = f.root.join("other-cache");
    synthetic("clip:models/clip-vit-b32")
        .write_cache(&f.data, &other)
        .unwrap();
    let reader = CacheReader::open(&other).unwrap();
    let err = Model::load(&report.checkpoint, &Device::Cpu)
        .unwrap()
        .ensure_compatible(&reader)
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("clip:models/clip-vit-b32")
            && message.contains("synthetic:models/test-backbone"),
        "{message}"
    );
}

#[test]
fn predictions_round_trip_through_the_reader() {
    let f = fixture();
    let path = f.root.join("predictions.csv");
    let ids: Vec<String> = ["0.jpg", "1.jpg", "2.jpg"].map(String::from).to_vec();
    let labels: Vec<String> = ["1", "2", "10"].map(String::from).to_vec();
    let decisions = [
        true, false, true, //
        false, false, false, //
        false, true, false,
    ];
    submission::write_predictions(&path, &ids, &decisions, &labels).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "ImageID,Labels\n0.jpg,1 10\n1.jpg,\n2.jpg,2\n");
    let records = submission::read_predictions(&path).unwrap();
    let vocab = LabelVocab::from_ordered(labels.clone()).unwrap();
    let targets = Targets::from_records(&ids, &records, &vocab, false).unwrap();
    let back: Vec<bool> = targets.rows(&[0, 1, 2]).iter().map(|&v| v > 0.5).collect();
    assert_eq!(back, decisions);
}

#[test]
fn multistage_router_warms_up_each_modality_first() {
    let f = fixture();
    let mut req = request(&f, "router", "multi");
    req.config.multistage = true;
    req.config.epochs = 4;
    let report = train(&req).unwrap();
    let stages: Vec<&str> = report
        .outcome
        .history
        .iter()
        .map(|e| e.stage.as_str())
        .collect();
    let warmups: Vec<&&str> = stages.iter().filter(|s| s.starts_with("warmup:")).collect();
    assert!(
        warmups.len() >= 4,
        "two parts, each >= 2 epochs: {stages:?}"
    );
    assert!(stages.last().unwrap() == &"train");
    assert!(
        report
            .outcome
            .history
            .iter()
            .all(|e| e.train_loss.is_finite())
    );
}

#[test]
fn train_evaluate_predict_from_the_command_line() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    let (cache, data, split, out_s) = (
        f.cache.to_str().unwrap(),
        f.data.to_str().unwrap(),
        f.split.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let trained = multiclip(&[
        "train",
        "--cache",
        cache,
        "--data",
        data,
        "--split",
        split,
        "--head",
        "gat",
        "--loss",
        "focal",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "0.003",
        "--out",
        out_s,
    ]);
    let stdout = String::from_utf8_lossy(&trained.stdout);
    assert!(
        stdout.contains("micro") && stdout.contains("mAP"),
        "{stdout}"
    );
    let name = "gat_synthetic_focal_v1_lr0.003_bs64_seed3407_f1";
    let checkpoint = out.join(name);
    assert!(
        out.join(format!("{name}.safetensors")).is_file(),
        "{stdout}"
    );
    let checkpoint_s = checkpoint.to_str().unwrap();

    let evaluated = multiclip(&["evaluate", "--checkpoint", checkpoint_s]);
    let table = String::from_utf8_lossy(&evaluated.stdout);
    for column in ["weighted", "samples", "threshold", "support"] {
        assert!(table.contains(column), "{table}");
    }

    // A test set with ground truth (`ImageID,Labels`), one label unknown to the checkpoint.
    let train_csv = std::fs::read_to_string(f.data.join("train.csv")).unwrap();
    let mut test_labels = String::from("ImageID,Labels\n");
    for line in train_csv.lines().skip(1).take(40) {
        let mut fields = line.splitn(3, ',');
        let (id, labels) = (fields.next().unwrap(), fields.next().unwrap());
        test_labels.push_str(&format!("{id},{labels}\n"));
    }
    test_labels.push_str("41.jpg,99\n");
    std::fs::write(f.data.join("test_labels.csv"), test_labels).unwrap();
    let tested = multiclip(&["evaluate", "--checkpoint", checkpoint_s, "--part", "test"]);
    let table = String::from_utf8_lossy(&tested.stdout);
    assert!(table.contains("Test part, 41 rows"), "{table}");

    let predictions = f.root.join("predictions.csv");
    let probabilities = f.root.join("probs.csv");
    multiclip(&[
        "predict",
        "--cache",
        cache,
        "--checkpoint",
        checkpoint_s,
        "--out",
        predictions.to_str().unwrap(),
        "--probabilities",
        probabilities.to_str().unwrap(),
    ]);
    let records = submission::read_predictions(&predictions).unwrap();
    assert_eq!(records.len(), 320);
    assert!(
        records
            .iter()
            .all(|r| !r.labels.as_ref().unwrap().is_empty())
    );
    let probs = std::fs::read_to_string(&probabilities).unwrap();
    assert!(probs.starts_with("ImageID,1,2,3,4,5\n"), "{probs}");

    // Training again under the same settings takes the next version, never overwrites.
    multiclip(&[
        "train",
        "--cache",
        cache,
        "--data",
        data,
        "--split",
        split,
        "--head",
        "gat",
        "--loss",
        "focal",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--lr",
        "0.003",
        "--out",
        out_s,
    ]);
    assert!(
        out.join("gat_synthetic_focal_v2_lr0.003_bs64_seed3407_f1.json")
            .is_file()
    );
}

/// `--precision bf16` (bf16 operands and f32 sums in the heads' forward and backward products):
/// every head kind learns the fixture as well as in f32, its checkpoint records the precision,
/// and it is refused off the CPU and for f16.
#[test]
fn bf16_products_train_every_head_like_f32() {
    let f = fixture();
    for head in [
        "mlp",
        "router",
        "ensemble",
        "gat",
        "ml_decoder:d_model=32,heads=4,ffn=64",
    ] {
        let run = |precision: Precision| {
            let mut request = request(&f, head, precision.name());
            request.config.precision = precision;
            train(&request).unwrap_or_else(|e| panic!("{head} in {precision:?}: {e:#}"))
        };
        let (f32_run, bf16_run) = (run(Precision::F32), run(Precision::Bf16));
        let (f32_val, bf16_val) = (&f32_run.outcome.validation, &bf16_run.outcome.validation);
        let losses = |r: &multiclip::train::run::TrainReport| -> Vec<f64> {
            r.outcome.history.iter().map(|e| e.train_loss).collect()
        };
        let (first, last) = (losses(&bf16_run)[0], *losses(&bf16_run).last().unwrap());
        assert!(
            last < 0.8 * first,
            "{head}: bf16 train loss {first} -> {last}"
        );
        assert_ne!(
            losses(&f32_run),
            losses(&bf16_run),
            "{head}: bf16 changed nothing"
        );
        assert!(
            (f32_val.metrics.map - bf16_val.metrics.map).abs() < 0.03
                && (f32_val.micro_f1() - bf16_val.micro_f1()).abs() < 0.05,
            "{head}: f32 {:?} vs bf16 {:?}",
            f32_val.metrics,
            bf16_val.metrics
        );
        assert_eq!(bf16_run.meta.training.precision, Precision::Bf16);
        let sidecar = std::fs::read_to_string(&bf16_run.checkpoint).unwrap();
        assert!(sidecar.contains(r#""precision": "bf16""#), "{sidecar}");
    }
    let mut f16 = request(&f, "mlp", "f16");
    f16.config.precision = Precision::F16;
    let err = format!("{:#}", f16.check().unwrap_err());
    assert!(err.contains("--precision must be f32 or bf16"), "{err}");
}
