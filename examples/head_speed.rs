//! Training-step and inference throughput of a head on synthetic cache-like batches.
//!
//! `cargo run --release --example head_speed -- SPEC BATCH [REAL_TOKENS] [MICRO_ROWS]` times
//! forward + backward + AdamW steps (and `predict`) of head SPEC (e.g. `ml_decoder`, `mlp`) on
//! batches of pooled 768-d `image`/`text` features and 50 x 768 f16 `multimodal_tokens` whose
//! first REAL_TOKENS (0 or absent: 10-15 at random) positions are real; with MICRO_ROWS the
//! step runs through `train::grads::loss_and_grads` in micro-batches of that many rows.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use multiclip::heads::{self, HeadConfig, HeadContext, Inputs, init::seeded_var_builder};
use multiclip::train::grads::loss_and_grads;
use rand::{RngExt, SeedableRng};

const T: usize = 50;
const DIM: usize = 768;
const K: usize = 18;

/// Stable BCE with logits.
fn bce(z: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let softplus = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((z.relu()? - (z * y)?)? + softplus)?.mean_all()
}

/// CPU time (user + system, all threads) of this process so far, from /proc (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = args
        .first()
        .context("usage: head_speed SPEC BATCH [REAL_TOKENS]")?;
    let batch: usize = args.get(1).context("missing BATCH")?.parse()?;
    let real: Option<usize> = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .filter(|&r| r > 0);
    let micro: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(batch);
    let cfg: HeadConfig = spec.parse()?;
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mask: Vec<f32> = (0..batch)
        .flat_map(|_| {
            let len = real.unwrap_or_else(|| rng.random_range(10..=15));
            (0..T).map(move |t| if t < len { 1.0 } else { 0.0 })
        })
        .collect();
    let inputs: Inputs = HashMap::from([
        (
            "image".into(),
            Tensor::randn(0f32, 1.0, (batch, DIM), &dev)?,
        ),
        ("text".into(), Tensor::randn(0f32, 1.0, (batch, DIM), &dev)?),
        (
            "multimodal_tokens".into(),
            Tensor::randn(0f32, 1.0, (batch, T, DIM), &dev)?.to_dtype(DType::F16)?,
        ),
        (
            "multimodal_mask".into(),
            Tensor::from_vec(mask, (batch, T), &dev)?,
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
        label_cooccurrence: None,
        seed: 3407,
        label_embeddings: None,
        precision: Default::default(),
    };
    let targets = Tensor::rand(0f32, 1.0, (batch, K), &dev)?
        .ge(0.8f32)?
        .to_dtype(DType::F32)?;
    let map = VarMap::new();
    let head = heads::build(&cfg, &ctx, seeded_var_builder(&map, 3407, &dev))?;
    let vars = map.all_vars();
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW::default())?;
    let steps = (4096 / batch).clamp(2, 8);
    let mut train = Vec::new();
    let mut cpu_train = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        let forward = |x: &Inputs| head.forward(x, true);
        let result = loss_and_grads(&forward, &inputs, &targets, micro, &vars, &bce)?;
        opt.step(&result.grads)?;
        if step > 0 {
            train.push(start.elapsed().as_secs_f64());
            cpu_train += cpu_seconds() - cpu_start;
        }
    }
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    for _ in 0..steps {
        head.predict(&inputs)?;
    }
    let eval = start.elapsed().as_secs_f64() / steps as f64;
    let cpu_eval = (cpu_seconds() - cpu_start) / steps as f64;
    let cpu_train = cpu_train / steps as f64;
    let median = {
        train.sort_by(f64::total_cmp);
        train[train.len() / 2]
    };
    println!(
        "{spec} batch {batch}: train {:.0} samples/s ({:.3} s/step, {:.3} CPU-ms/sample), \
         eval {:.0} samples/s ({:.3} CPU-ms/sample)",
        batch as f64 / median,
        median,
        1e3 * cpu_train / batch as f64,
        batch as f64 / eval,
        1e3 * cpu_eval / batch as f64,
    );
    Ok(())
}
