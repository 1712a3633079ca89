//! Label-name queries (`queries=labels`): heads that start from label embeddings `[K, D]` (a
//! synthetic matrix), checked by hand and through a checkpoint round trip; a run of 0 epochs
//! (validation and thresholds only); and the whole path from `extract --label-names` to the
//! zero-shot scores of a 0-epoch cosine probe on the tiny MiniLM fixture.

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multiclip::cache::{CacheReader, Integrity};
use multiclip::data::labels::LabelVocab;
use multiclip::data::split::Split;
use multiclip::data::{Dataset, Part};
use multiclip::heads::{self, Head, HeadConfig, HeadContext, LabelCooccurrence};
use multiclip::model::Model;
use multiclip::train::TrainConfig;
use multiclip::train::checkpoint::checkpoint_tensors;
use multiclip::train::run::{TrainRequest, train};
use std::collections::HashMap;
use std::path::Path;
use support::fixture::{fixture, request};

const K: usize = 4;

/// The cosine of two vectors, computed in f64.
fn cosine_f64(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}
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
    for (i, row) in image.iter().enumerate() {
        for (k, label) in labels.iter().enumerate() {
            let cosine = cosine_f64(row, label);
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

const MINILM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minilm-tiny");
const WORDS: [&str; 4] = ["blue_sky", "cat", "dog", "red_car"];

/// 40 rows labelled with word tokens; the first four captions are the label names themselves.
fn word_dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let mut csv = String::from("ImageID,Labels,Caption\n");
    for i in 0..40 {
        image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8, 0, 0]))
            .save(dir.join("data").join(format!("{i}.png")))
            .unwrap();
        let caption = match i {
            0..4 => WORDS[i].replace('_', " "),
            _ => format!(
                "a drawing of thing {i} and a {}",
                WORDS[i % 4].replace('_', " ")
            ),
        };
        let mut labels = WORDS[i % 4].to_string();
        if i % 3 == 0 {
            labels = format!("{labels} {}", WORDS[(i + 1) % 4]);
        }
        csv.push_str(&format!("{i}.png,{labels},\"{caption}\"\n"));
    }
    std::fs::write(dir.join("train.csv"), csv).unwrap();
}

/// `extract --label-names` then a cosine probe with `queries=labels` trained for 0 epochs: its
/// scores are the cosines of each row's text feature with the label names' embeddings, which the
/// backbone computes for captions equal to the names (a row whose caption is a name scores ~1).
#[test]
fn extracted_label_names_give_the_zero_shot_text_similarities() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cache) = (dir.path().join("data"), dir.path().join("cache"));
    word_dataset(&data);
    let backbone = format!("sentence:{MINILM}");
    let (data_s, cache_s) = (data.to_str().unwrap(), cache.to_str().unwrap());
    let extract = [
        "extract",
        "--data",
        data_s,
        "--part",
        "train",
        "--backbone",
        &backbone,
        "--out",
        cache_s,
        "--threads",
        "1",
    ];
    support::fixture::multiclip(&extract);
    assert!(!cache.join("label-names.safetensors").exists());
    // On the finished cache the same command with --label-names adds just the names.
    let out = support::fixture::multiclip(&[&extract[..], &["--label-names"]].concat());
    assert!(String::from_utf8_lossy(&out.stdout).contains("label names  4 embedded"));
    let info = support::fixture::multiclip(&["cache", "info", cache_s]);
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(
        info.contains("label names    4 embedded, 16-d in the space of `text`"),
        "{info}"
    );
    assert!(info.contains("blue sky, cat, dog, red car"), "{info}");

    let records = Dataset::open(&data).unwrap().records(Part::Train).unwrap();
    let vocab = LabelVocab::from_records(&records).unwrap();
    let split = dir.path().join("split.json");
    Split::stratified(&records, &vocab, 0.25, 3)
        .unwrap()
        .save(&split)
        .unwrap();
    let mut request = TrainRequest {
        cache: cache.clone(),
        data: data.clone(),
        split: split.clone(),
        head: "mlp:hidden=0,cosine=true,queries=labels,inputs=text"
            .parse()
            .unwrap(),
        loss: "angular".parse().unwrap(),
        config: TrainConfig {
            epochs: 0,
            ..TrainConfig::default()
        },
        out_dir: dir.path().join("out"),
        name: None,
        device: Device::Cpu,
        integrity: Integrity::Full,
    };
    let report = train(&request).unwrap();
    let model = Model::load(&report.checkpoint, &Device::Cpu).unwrap();
    let reader = CacheReader::open(&cache).unwrap();
    let rows: Vec<usize> = (0..reader.len()).collect();
    let text = reader.gather("text", &rows, &Device::Cpu).unwrap();
    let x: heads::Inputs = HashMap::from([("text".to_string(), text.clone())]);
    let scores = model.head.predict(&x).unwrap().to_vec2::<f32>().unwrap();

    // The reference: the backbone's own text output for captions equal to the names.
    let names: Vec<String> = WORDS.iter().map(|w| w.replace('_', " ")).collect();
    let encoder = multiclip::backbone::load(&backbone, &Device::Cpu).unwrap();
    let samples = multiclip::backbone::contract::caption_samples(&names);
    let labels = encoder.forward(encoder.prepare(&samples).unwrap()).unwrap()[0]
        .to_vec2::<f32>()
        .unwrap();
    for (i, row) in text.to_vec2::<f32>().unwrap().iter().enumerate() {
        for (k, label) in labels.iter().enumerate() {
            let cosine = cosine_f64(row, label);
            let got = f64::from(scores[i][k]);
            assert!(
                (got - cosine).abs() < 1e-5,
                "row {i} label {k}: {got} vs {cosine}"
            );
        }
    }
    // A row whose caption is a name: cosine 1 with it, up to the cache's f16.
    for (i, word) in WORDS.iter().enumerate() {
        let row = reader.index_of(&format!("{i}.png")).unwrap();
        let k = vocab.index(word).unwrap();
        assert!(
            (scores[row][k] - 1.0).abs() < 2e-3,
            "{word}: {}",
            scores[row][k]
        );
    }

    // gat and ml_decoder start from them through training (planned, trained, saved, loaded).
    for head in [
        "gat:queries=labels,hidden=8,heads=2",
        "ml_decoder:queries=labels,input=text,d_model=8,heads=2,ffn=16",
    ] {
        request.head = head.parse().unwrap();
        request.loss = "bce".parse().unwrap();
        request.config.epochs = 1;
        let report = train(&request).unwrap();
        let model = Model::load(&report.checkpoint, &Device::Cpu).unwrap();
        assert_eq!(model.head.predict(&x).unwrap().dims(), [40, 4], "{head}");
    }

    // Without the names, the head says where to get them.
    std::fs::remove_file(cache.join("label-names.safetensors")).unwrap();
    request.name = Some("again".into());
    let err = format!("{:#}", train(&request).err().unwrap());
    assert!(err.contains("extract --label-names"), "{err}");
}
