//! Label-name queries (`queries=labels`): heads that start from label embeddings `[K, D]` (here
//! a synthetic matrix; extraction will store real ones), checked by hand and through a
//! checkpoint round trip; and a run of 0 epochs (validation and thresholds only).

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multiclip::heads::{self, Head, HeadConfig, HeadContext, LabelCooccurrence};
use multiclip::model::Model;
use multiclip::train::checkpoint::checkpoint_tensors;
use multiclip::train::run::train;
use std::collections::HashMap;
use support::fixture::{fixture, request};

const K: usize = 4;
const D: usize = 6;
const T: usize = 3;
const B: usize = 5;

fn context(embeddings: Option<Tensor>) -> HeadContext {
    HeadContext {
        num_labels: K,
        input_shapes: HashMap::from([
            ("image".to_string(), vec![D]),
            ("tokens".to_string(), vec![T, D]),
        ]),
        label_cooccurrence: Some(
            LabelCooccurrence::from_label_sets([&[0usize, 1][..], &[2], &[3, 0]], K).unwrap(),
        ),
        seed: 3,
        label_embeddings: embeddings,
        precision: Default::default(),
    }
}

fn inputs() -> heads::Inputs {
    let dev = Device::Cpu;
    HashMap::from([
        (
            "image".to_string(),
            Tensor::randn(0f32, 1.0, (B, D), &dev).unwrap(),
        ),
        (
            "tokens".to_string(),
            Tensor::randn(0f32, 1.0, (B, T, D), &dev).unwrap(),
        ),
    ])
}

/// A head of `spec` built for training with `embeddings`, and the same head rebuilt from its
/// saved file without them (as `Model::load` does).
fn built_and_reloaded(spec: &str, embeddings: &Tensor) -> (Box<dyn Head>, Box<dyn Head>) {
    let config: HeadConfig = spec.parse().unwrap();
    let varmap = VarMap::new();
    let vb = heads::init::seeded_var_builder(&varmap, 3, &Device::Cpu);
    let head = heads::build(&config, &context(Some(embeddings.clone())), vb).unwrap();
    let tensors = checkpoint_tensors(&varmap, head.as_ref()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("head.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let loaded = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(loaded, DType::F32, &Device::Cpu);
    let reloaded = heads::build(&config, &context(None), vb).unwrap();
    (head, reloaded)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_cosine_probe_on_label_embeddings_scores_by_text_similarity() {
    let embeddings = Tensor::randn(0f32, 1.0, (K, D), &Device::Cpu).unwrap();
    let (head, reloaded) = built_and_reloaded(
        "mlp:hidden=0,cosine=true,queries=labels,inputs=image",
        &embeddings,
    );
    let x = inputs();
    let scores = values(&head.forward(&x, false).unwrap());
    // cos(feature, label embedding), by hand in f64.
    let image = x["image"].to_vec2::<f32>().unwrap();
    let labels = embeddings.to_vec2::<f32>().unwrap();
    let norm = |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    for (i, row) in image.iter().enumerate() {
        for (k, label) in labels.iter().enumerate() {
            let dot: f64 = row
                .iter()
                .zip(label)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let cosine = dot / (norm(row) * norm(label));
            let got = f64::from(scores[i * K + k]);
            assert!(
                (got - cosine).abs() < 1e-5,
                "row {i} label {k}: {got} vs {cosine}"
            );
        }
    }
    assert_eq!(values(&reloaded.forward(&x, false).unwrap()), scores);
}

#[test]
fn gat_and_ml_decoder_start_from_the_label_embeddings() {
    let embeddings = Tensor::randn(0f32, 1.0, (K, D), &Device::Cpu).unwrap();
    let other = (&embeddings * -1.0).unwrap();
    let x = inputs();
    for (spec, buffer) in [
        (
            "gat:queries=labels,inputs=image,hidden=8,heads=2",
            "buffers.label_embeddings",
        ),
        (
            "ml_decoder:queries=labels,input=tokens,d_model=8,heads=2,ffn=16,dropout=0",
            "buffers.queries",
        ),
    ] {
        let (head, reloaded) = built_and_reloaded(spec, &embeddings);
        let saved: HashMap<String, Tensor> = head.buffers().into_iter().collect();
        assert_eq!(values(&saved[buffer]), values(&embeddings), "{spec}");
        let out = head.forward(&x, false).unwrap();
        assert_eq!(out.dims(), [B, K]);
        assert_eq!(
            values(&reloaded.forward(&x, false).unwrap()),
            values(&out),
            "{spec}"
        );
        // The outputs depend on the embeddings.
        let (moved, _) = built_and_reloaded(spec, &other);
        assert_ne!(
            values(&moved.forward(&x, false).unwrap()),
            values(&out),
            "{spec}"
        );
    }
}

#[test]
fn label_queries_need_embeddings_and_a_cosine_probe() {
    let embeddings = Tensor::randn(0f32, 1.0, (K, D), &Device::Cpu).unwrap();
    let narrow = Tensor::randn(0f32, 1.0, (K, D - 1), &Device::Cpu).unwrap();
    for (spec, ctx, message) in [
        (
            "mlp:hidden=0,cosine=true,queries=labels",
            context(None),
            "extract --label-names",
        ),
        (
            "gat:queries=labels,hidden=8,heads=2",
            context(None),
            "extract --label-names",
        ),
        (
            "mlp:queries=labels,cosine=true",
            context(Some(embeddings.clone())),
            "hidden=0",
        ),
        (
            "mlp:hidden=0,queries=labels",
            context(Some(embeddings.clone())),
            "cosine",
        ),
        (
            "mlp:hidden=0,cosine=true,queries=labels,inputs=image",
            context(Some(narrow)),
            "5 wide but the inputs (image) are 6",
        ),
    ] {
        let varmap = VarMap::new();
        let vb = heads::init::seeded_var_builder(&varmap, 3, &Device::Cpu);
        let err = heads::build(&spec.parse().unwrap(), &ctx, vb)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains(message), "{spec}: {err:#}");
    }
}

#[test]
fn zero_epochs_keep_the_initial_weights_with_validation_and_thresholds() {
    let f = fixture();
    let mut zero = request(&f, "mlp:hidden=0", "zero");
    zero.config.epochs = 0;
    let report = train(&zero).unwrap();
    let outcome = &report.outcome;
    assert_eq!(outcome.best_epoch, 0);
    assert!(outcome.history.is_empty());
    assert_eq!(outcome.validation.rows, 80);
    assert_eq!(report.meta.model.thresholds.len(), 5);
    // The checkpoint holds those initial weights: it scores validation as the run did.
    let model = Model::load(&report.checkpoint, &Device::Cpu).unwrap();
    let reader = multiclip::cache::CacheReader::open(&f.cache).unwrap();
    let rows: Vec<usize> = report
        .val_ids
        .iter()
        .map(|id| reader.index_of(id).unwrap())
        .collect();
    let batch = zero.config.eval_batch_size;
    let scores = model
        .score_rows(&reader, &rows, batch, &Device::Cpu, None)
        .unwrap();
    assert_eq!(scores.probabilities, outcome.validation.probabilities);
    // Its report renders without curves.
    multiclip::report::write(&report).unwrap();
}
