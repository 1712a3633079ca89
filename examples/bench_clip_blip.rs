//! Throughput of the CLIP and BLIP-ITM backbones on the CPU (see docs/benchmarks.md).
//!
//! `cargo run --release --example bench_clip_blip -- <clip|blip> <model dir> <batch> <repeats> [tokens]`
//! Forward only, on random pixels and on token ids of `tokens` tokens (default: the maximum);
//! prints items/s of the median repeat after one warm-up.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multiclip::backbone::blip::{BLIP_TEXT_TOKENS, BlipConfig, BlipItmModel};
use multiclip::backbone::clip::{ClipConfig, ClipModel};
use multiclip::backbone::source::Weights;
use multiclip::tensor_ops::Kernels;

fn median_rate(items: usize, repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    let mut secs: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            run().map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    secs.sort_by(f64::total_cmp);
    Ok(items as f64 / secs[secs.len() / 2])
}

fn main() -> Result<()> {
    multiclip::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!("usage: bench_clip_blip <clip|blip> <model dir> <batch> <repeats> [tokens]");
    }
    let dir = PathBuf::from(&args[1]);
    let batch: usize = args[2].parse()?;
    let repeats: usize = args[3].parse()?;
    let tokens: Option<usize> = args.get(4).map(|t| t.parse()).transpose()?;
    let dev = Device::Cpu;
    // SAFETY: the memory-mapped weights are only read; nothing may modify the file meanwhile.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)?
    };
    let vb = Weights::new(vb, Kernels::Fused);
    println!("threads: {}", rayon::current_num_threads());
    match args[0].as_str() {
        "clip" => {
            let cfg = ClipConfig::from_file(&dir.join("config.json"))?;
            let model = ClipModel::new(&cfg, vb)?;
            let s = cfg.vision_config.image_size;
            let pixels = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &dev)?;
            let rate = median_rate(batch, repeats, || {
                model.image_features(&pixels, false)?;
                Ok(())
            })?;
            println!("clip image forward: {rate:.2} img/s (batch {batch})");
            let n = tokens.unwrap_or(cfg.text_config.max_position_embeddings);
            let ids: Vec<Vec<u32>> = (0..batch)
                .map(|i| {
                    let mut row: Vec<u32> = (0..n as u32)
                        .map(|j| 400 + (i as u32 * 31 + j * 7) % 40000)
                        .collect();
                    row[0] = 49406;
                    row[n - 1] = 49407;
                    row
                })
                .collect();
            let rate = median_rate(batch, repeats, || {
                model.text_features(&ids)?;
                Ok(())
            })?;
            println!("clip text forward: {rate:.2} texts/s ({n} tokens, batch {batch})");
        }
        "blip" => {
            let cfg = BlipConfig::from_file(&dir.join("config.json"))?;
            let model = BlipItmModel::new(&cfg, vb)?;
            let s = cfg.vision_config.image_size;
            let pixels = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &dev)?;
            let t = BLIP_TEXT_TOKENS;
            let n = tokens.unwrap_or(t);
            let mut ids = vec![0u32; batch * t];
            let mut keep = vec![0u8; batch * t];
            for i in 0..batch {
                for j in 0..n {
                    ids[i * t + j] = 1000 + ((i * 31 + j * 7) % 20000) as u32;
                    keep[i * t + j] = 1;
                }
                ids[i * t] = 101;
                ids[i * t + n - 1] = 102;
            }
            let rate = median_rate(batch, repeats, || {
                model.forward(&pixels, &ids, &keep)?;
                Ok(())
            })?;
            println!(
                "blip image+text forward: {rate:.3} pairs/s ({n} real tokens of {t}, batch {batch})"
            );
        }
        other => bail!("unknown backbone {other:?} (clip or blip)"),
    }
    Ok(())
}
