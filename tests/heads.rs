//! Heads on a tiny synthetic set: every trainable variable gets a gradient, every head
//! overfits to micro-F1 1.0, cosine heads stay in [-1, 1], checkpoints (buffers included)
//! round-trip, and a missing input is a clear error.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use multiclip::heads::{
    self, Head, HeadConfig, HeadContext, HeadKind, Inputs, LabelCooccurrence,
    init::seeded_var_builder,
};
use multiclip::tensor_ops::Precision;
use multiclip::train::checkpoint::checkpoint_tensors;
use multiclip::train::grads::loss_and_grads;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 32;
const K: usize = 4;
const DIM: usize = 12;
const T: usize = 6;

struct Data {
    inputs: Inputs,
    targets: Tensor,
    ctx: HeadContext,
}

fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = 1.0 - rng.random::<f32>();
    let u2 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Image, text and token features are noisy views of one latent vector; label k is on when
/// the latent lies on the positive side of a random hyperplane. Padding tokens are garbage.
fn data(seed: u64) -> Result<Data> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let latent: Vec<Vec<f32>> = (0..N)
        .map(|_| (0..DIM).map(|_| gaussian(&mut rng)).collect())
        .collect();
    let planes: Vec<Vec<f32>> = (0..K)
        .map(|_| (0..DIM).map(|_| gaussian(&mut rng)).collect())
        .collect();
    let view = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        latent
            .iter()
            .flat_map(|z| {
                z.iter()
                    .map(|v| v + 0.3 * gaussian(rng))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let image = view(&mut rng);
    let text = view(&mut rng);
    let mut tokens = Vec::with_capacity(N * T * DIM);
    let mut mask = Vec::with_capacity(N * T);
    for z in &latent {
        let len = 1 + rng.random_range(0..T);
        for t in 0..T {
            let real = t < len;
            mask.push(if real { 1f32 } else { 0.0 });
            for v in z {
                tokens.push(if real {
                    v + 0.3 * gaussian(&mut rng)
                } else {
                    50.0 * gaussian(&mut rng)
                });
            }
        }
    }
    let labels: Vec<Vec<usize>> = latent
        .iter()
        .map(|z| {
            (0..K)
                .filter(|&k| z.iter().zip(&planes[k]).map(|(a, b)| a * b).sum::<f32>() > 0.0)
                .collect()
        })
        .collect();
    let mut targets = vec![0f32; N * K];
    for (n, set) in labels.iter().enumerate() {
        for &k in set {
            targets[n * K + k] = 1.0;
        }
    }
    for k in 0..K {
        let positives = (0..N).filter(|n| targets[n * K + k] == 1.0).count();
        assert!(positives > 0 && positives < N, "label {k} is constant");
    }
    let inputs: Inputs = HashMap::from([
        ("image".into(), Tensor::from_vec(image, (N, DIM), &dev)?),
        ("text".into(), Tensor::from_vec(text, (N, DIM), &dev)?),
        (
            "multimodal_tokens".into(),
            Tensor::from_vec(tokens, (N, T, DIM), &dev)?,
        ),
        (
            "multimodal_mask".into(),
            Tensor::from_vec(mask, (N, T), &dev)?,
        ),
    ]);
    let ctx = HeadContext {
        num_labels: K,
        input_shapes: HashMap::from([
            ("image".into(), vec![DIM]),
            ("text".into(), vec![DIM]),
            ("multimodal_tokens".into(), vec![T, DIM]),
            ("multimodal_mask".into(), vec![T]),
        ]),
        label_cooccurrence: Some(
            LabelCooccurrence::from_label_sets(labels.iter().map(Vec::as_slice), K)
                .expect("valid labels"),
        ),
        seed: 3407,
        label_embeddings: None,
        precision: Precision::F32,
    };
    Ok(Data {
        inputs,
        targets: Tensor::from_vec(targets, (N, K), &dev)?,
        ctx,
    })
}

/// Small versions of every head kind.
fn configs() -> Vec<HeadConfig> {
    [
        "mlp:hidden=32",
        "mlp:hidden=0",
        "mlp:inputs=multimodal_tokens,hidden=32",
        "router:hidden=32,router_hidden=16,dropout=0.1",
        "ensemble:hidden=32",
        "gat:hidden=32,heads=4,layers=2",
        "ml_decoder:d_model=32,heads=4,ffn=64",
        "ml_decoder:input=image,d_model=32,heads=4,ffn=64",
    ]
    .iter()
    .map(|spec| spec.parse().expect("valid head spec"))
    .collect()
}

fn with_cosine(cfg: &HeadConfig) -> HeadConfig {
    let mut json = serde_json::to_value(cfg).expect("serialisable");
    json["cosine"] = true.into();
    serde_json::from_value(json).expect("cosine config")
}

/// Stable BCE with logits: mean(max(z, 0) - z y + log(1 + exp(-|z|))).
fn bce(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((logits.relu()? - (logits * targets)?)? + softplus)?.mean_all()
}

fn micro_f1(logits: &Tensor, targets: &Tensor) -> Result<f32> {
    let pred = logits.gt(0f32)?.to_dtype(DType::F32)?;
    let tp = (&pred * targets)?.sum_all()?.to_scalar::<f32>()?;
    let predicted = pred.sum_all()?.to_scalar::<f32>()?;
    let actual = targets.sum_all()?.to_scalar::<f32>()?;
    Ok(2.0 * tp / (predicted + actual))
}

fn build(cfg: &HeadConfig, ctx: &HeadContext) -> (VarMap, Box<dyn Head>) {
    let map = VarMap::new();
    let vb = seeded_var_builder(&map, ctx.seed, &Device::Cpu);
    let head = heads::build(cfg, ctx, vb).unwrap_or_else(|e| panic!("build {cfg}: {e:#}"));
    (map, head)
}

#[test]
fn every_trainable_variable_gets_a_gradient() -> Result<()> {
    let d = data(1)?;
    for cfg in configs().iter().flat_map(|c| [c.clone(), with_cosine(c)]) {
        let (map, head) = build(&cfg, &d.ctx);
        let out = head.forward(&d.inputs, true)?;
        assert_eq!(out.dims(), &[N, K], "{cfg}");
        let grads = bce(&(out * 3.0)?, &d.targets)?.backward()?;
        let vars = map.data().lock().expect("map").clone();
        assert!(!vars.is_empty(), "{cfg}");
        for (name, var) in vars {
            assert!(
                !heads::is_buffer(&name),
                "{cfg}: buffer `{name}` in the trainable map"
            );
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{cfg}: no gradient for `{name}`"));
            let size = grad.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                size > 0.0 && size.is_finite(),
                "{cfg}: gradient of `{name}` is {size}"
            );
        }
    }
    Ok(())
}

/// Every head with a logit bias exposes it, and the trainer's prior initialisation sets it to
/// the label frequencies' log-odds (cosine heads have none).
#[test]
fn logit_biases_start_at_the_label_prior() -> anyhow::Result<()> {
    let d = data(3)?;
    let positives: Vec<usize> = (0..K)
        .map(|k| {
            d.targets
                .narrow(1, k, 1)
                .and_then(|c| c.sum_all()?.to_scalar::<f32>())
        })
        .map(|c| c.map(|c| c as usize))
        .collect::<Result<_>>()?;
    for cfg in configs() {
        let (map, head) = build(&cfg, &d.ctx);
        let biases = head.logit_biases();
        assert!(!biases.is_empty(), "{cfg}: no logit bias");
        heads::init::logit_biases_from_prior(head.as_ref(), &map, &positives, N)?;
        for bias in head.logit_biases() {
            for (k, got) in bias.to_vec1::<f32>()?.into_iter().enumerate() {
                let p = (positives[k] as f64 + 0.5) / (N as f64 + 1.0);
                let want = (p / (1.0 - p)).ln() as f32;
                assert!(
                    (got - want).abs() < 1e-6,
                    "{cfg}: label {k}: {got} vs {want}"
                );
            }
        }
        assert!(
            build(&with_cosine(&cfg), &d.ctx)
                .1
                .logit_biases()
                .is_empty()
        );
    }
    Ok(())
}

/// In f32 and with bf16 matrix products (`train --precision bf16`).
#[test]
fn every_head_overfits_a_tiny_set() -> Result<()> {
    let d = data(2)?;
    for (cfg, precision) in configs()
        .into_iter()
        .flat_map(|c| [(c.clone(), Precision::F32), (c, Precision::Bf16)])
    {
        let ctx = HeadContext {
            precision,
            ..d.ctx.clone()
        };
        let (map, head) = build(&cfg, &ctx);
        let params = ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(map.all_vars(), params)?;
        let mut f1 = 0.0;
        for _ in 0..400 {
            let loss = bce(&head.forward(&d.inputs, true)?, &d.targets)?;
            opt.backward_step(&loss)?;
            f1 = micro_f1(&head.forward(&d.inputs, false)?, &d.targets)?;
            if f1 == 1.0 {
                break;
            }
        }
        assert_eq!(f1, 1.0, "{cfg} in {precision:?} reached micro-F1 {f1}");
    }
    Ok(())
}

#[test]
fn cosine_heads_output_cosines() -> Result<()> {
    let d = data(3)?;
    for cfg in configs().iter().map(with_cosine) {
        let (_, head) = build(&cfg, &d.ctx);
        for train in [false, true] {
            let out = head
                .forward(&d.inputs, train)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)), "{cfg}");
            assert!(out.iter().any(|v| v.abs() > 1e-3), "{cfg}: all zero");
        }
    }
    Ok(())
}

#[test]
fn same_seed_same_outputs_with_dropout() -> Result<()> {
    let d = data(4)?;
    let cfg: HeadConfig = "ml_decoder:d_model=32,heads=4,ffn=64,dropout=0.3"
        .parse()
        .expect("spec");
    let run = || -> Result<Vec<f32>> {
        let (_, head) = build(&cfg, &d.ctx);
        head.forward(&d.inputs, true)?.flatten_all()?.to_vec1()
    };
    assert_eq!(run()?, run()?);
    Ok(())
}

#[test]
fn checkpoints_round_trip_with_buffers() -> Result<()> {
    let d = data(5)?;
    let dir = tempfile::tempdir().expect("tempdir");
    for cfg in configs() {
        let (map, head) = build(&cfg, &d.ctx);
        let expected = head
            .forward(&d.inputs, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let tensors = checkpoint_tensors(&map, head.as_ref()).expect("tensors");
        for (name, _) in head.buffers() {
            assert!(
                heads::is_buffer(&name) && tensors.contains_key(&name),
                "{cfg}: {name}"
            );
        }
        let path = dir.path().join(format!("{}.safetensors", cfg.kind.name()));
        candle_core::safetensors::save(&tensors, &path)?;
        // Predict-time context: another seed and no label statistics; all comes from the file.
        let ctx = HeadContext {
            seed: 1,
            label_cooccurrence: None,
            ..d.ctx.clone()
        };
        let bytes = std::fs::read(&path)?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)?;
        let loaded = heads::build(&cfg, &ctx, vb).unwrap_or_else(|e| panic!("{cfg}: {e:#}"));
        let got = loaded
            .forward(&d.inputs, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(expected, got, "{cfg}");
    }
    Ok(())
}

#[test]
fn router_parts_are_the_modality_experts() -> Result<()> {
    let d = data(6)?;
    let cfg: HeadConfig = "router:inputs=image+text,hidden=16".parse().expect("spec");
    let (map, head) = build(&cfg, &d.ctx);
    let parts = head.parts();
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["image", "text"]);
    let vars = map.data().lock().expect("map").clone();
    for part in &parts {
        let logits = head.part_forward(&part.name, &d.inputs, false)?;
        assert_eq!(logits.dims(), &[N, K]);
        // Only the part's own variables get gradients from its logits.
        let grads = bce(&logits, &d.targets)?.backward()?;
        for (name, var) in &vars {
            let has = grads.get(var.as_tensor()).is_some();
            assert_eq!(
                has,
                name.starts_with(&part.var_prefix),
                "{} / {name}",
                part.name
            );
        }
    }
    assert!(head.part_forward("audio", &d.inputs, false).is_err());
    Ok(())
}

#[test]
fn missing_inputs_are_named_with_the_available_ones() -> Result<()> {
    let d = data(7)?;
    let map = VarMap::new();
    let vb = seeded_var_builder(&map, 0, &Device::Cpu);
    let cfg: HeadConfig = "mlp:inputs=image+audio".parse().expect("spec");
    let err = format!(
        "{:#}",
        heads::build(&cfg, &d.ctx, vb).err().expect("must fail")
    );
    assert!(
        err.contains("`audio`") && err.contains("image, multimodal_mask"),
        "{err}"
    );

    let (_, head) = build(&"mlp:inputs=image+text".parse().expect("spec"), &d.ctx);
    let mut batch = d.inputs.clone();
    batch.remove("text");
    let err = head
        .forward(&batch, false)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("`text`") && err.contains("image"), "{err}");
    Ok(())
}

#[test]
fn head_configs_that_cannot_work_are_refused_when_parsed_and_when_built() -> Result<()> {
    for (spec, field) in [
        ("gat:hidden=0", "hidden"),
        ("gat:heads=0", "heads"),
        ("gat:hidden=6,heads=4", "heads"),
        ("gat:p=1.5", "p"),
        ("gat:threshold=-0.1", "threshold"),
        ("mlp:dropout=1", "dropout"),
        ("ensemble:dropout=-1", "dropout"),
        ("ml_decoder:d_model=0", "d_model"),
        ("ml_decoder:ffn=0", "ffn"),
        ("ml_decoder:heads=0", "heads"),
        ("ml_decoder:d_model=10,heads=3", "heads"),
        ("ml_decoder:dropout=1", "dropout"),
    ] {
        let err = format!("{:#}", spec.parse::<HeadConfig>().expect_err(spec));
        assert!(err.contains(spec) && err.contains(field), "{spec}: {err}");
    }
    // The same configurations from JSON (a --head-config file, a checkpoint's sidecar) are
    // refused by `build`, before any variable exists.
    let d = data(3)?;
    for (json, field) in [
        (r#"{"kind": "gat", "hidden": 0}"#, "hidden"),
        (r#"{"kind": "ml_decoder", "d_model": 0}"#, "d_model"),
        (r#"{"kind": "ml_decoder", "ffn": 0}"#, "ffn"),
        (
            r#"{"kind": "ml_decoder", "d_model": 8, "heads": 3}"#,
            "heads",
        ),
    ] {
        let cfg: HeadConfig = serde_json::from_str(json).expect("well-formed");
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 0, &Device::Cpu);
        let err = format!(
            "{:#}",
            heads::build(&cfg, &d.ctx, vb).err().expect("must fail")
        );
        assert!(err.contains(field), "{json}: {err}");
        assert!(map.all_vars().is_empty(), "{json}");
    }
    Ok(())
}

#[test]
fn head_specs_parse_and_reject_typos() {
    let cfg: HeadConfig = "router:inputs=image+text,hidden=0,dropout=0.5"
        .parse()
        .expect("spec");
    let HeadKind::Router(r) = &cfg.kind else {
        panic!("not a router: {cfg}")
    };
    assert_eq!(
        (r.inputs.clone(), r.hidden, r.dropout),
        (vec!["image".into(), "text".into()], 0, 0.5)
    );
    let json: HeadConfig = serde_json::from_str(&cfg.to_string()).expect("json round trip");
    assert_eq!(json, cfg);
    let toml_cfg: HeadConfig = toml::from_str("kind = \"ml_decoder\"\nd_model = 64").expect("toml");
    assert!(matches!(toml_cfg.kind, HeadKind::MlDecoder(ref m) if m.d_model == 64 && m.heads == 8));
    assert!("mlp:hiden=3".parse::<HeadConfig>().is_err());
    assert!("transformer".parse::<HeadConfig>().is_err());
    assert!("mlp:hidden".parse::<HeadConfig>().is_err());
}

#[test]
fn micro_batches_give_the_full_batch_numbers() -> Result<()> {
    let d = data(8)?;
    for spec in [
        "ml_decoder:d_model=32,heads=4,ffn=64,dropout=0",
        "router:hidden=16",
    ] {
        let cfg: HeadConfig = spec.parse().expect("spec");
        let (map, head) = build(&cfg, &d.ctx);
        let vars = map.all_vars();
        let forward = |x: &Inputs| head.forward(x, true);
        let full = loss_and_grads(&forward, &d.inputs, &d.targets, N, &vars, &bce)?;
        let chunked = loss_and_grads(&forward, &d.inputs, &d.targets, 5, &vars, &bce)?;
        let (full_loss, loss) = (full.loss, chunked.loss);
        let outputs = (full.outputs - &chunked.outputs)?
            .abs()?
            .flatten_all()?
            .max(0)?;
        assert!(outputs.to_scalar::<f32>()? < 1e-5, "{spec}: outputs differ");
        let (full, chunked) = (full.grads, chunked.grads);
        assert!(
            (full_loss - loss).abs() < 1e-5,
            "{spec}: {full_loss} vs {loss}"
        );
        for var in &vars {
            let (a, b) = (
                full.get(var.as_tensor()).expect("grad"),
                chunked.get(var.as_tensor()).expect("grad"),
            );
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{spec}: gradient differs by {diff}");
        }
        let whole = head.forward(&d.inputs, false)?;
        let predicted = head.predict(&d.inputs)?;
        assert_eq!(
            whole.flatten_all()?.to_vec1::<f32>()?,
            predicted.flatten_all()?.to_vec1::<f32>()?
        );
    }
    let mut bad = d.inputs.clone();
    bad.insert(
        "text".into(),
        Tensor::zeros((N - 1, DIM), DType::F32, &Device::Cpu)?,
    );
    assert!(heads::batch_size(&bad).is_err());
    Ok(())
}
