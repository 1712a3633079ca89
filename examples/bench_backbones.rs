//! Throughput of the real DINOv2-S and all-MiniLM-L6-v2 backbones (models/, from
//! scripts/fetch-weights.sh) on data/demo: forward only and decode/tokenize + preprocess + forward,
//! sequentially, median of repeats after a warm-up. Results go to docs/benchmarks.md by hand.
//!
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_backbones [-- REPEATS]

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use multiclip::backbone::{self, Backbone, Sample};
use multiclip::data::image::{DEFAULT_MAX_PIXELS, load_rgb};

const DATA: &str = "data/demo";

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Rows of data/demo/train.csv: (image path, caption).
fn rows() -> Result<Vec<(String, String)>> {
    let mut reader = csv::Reader::from_path(Path::new(DATA).join("train.csv"))?;
    reader
        .deserialize::<(String, String, String)>()
        .map(|r| {
            let (image, _labels, caption) = r?;
            Ok((format!("{DATA}/data/{image}"), caption))
        })
        .collect()
}

/// Items/s over `n` items, median of `repeats` after one warm-up; `run` returns the seconds
/// that count.
fn rate(n: usize, repeats: usize, mut run: impl FnMut() -> Result<f64>) -> Result<f64> {
    run()?;
    let times = (0..repeats).map(|_| run()).collect::<Result<Vec<_>>>()?;
    Ok(n as f64 / median(times))
}

/// Seconds `f` takes.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds of the forward passes alone over `chunks` (preparation not counted).
fn forward_seconds(model: &dyn Backbone, chunks: &[&[Sample]]) -> Result<f64> {
    let mut total = 0.0;
    for chunk in chunks {
        let prepared = model.prepare(chunk)?;
        total += timed(|| model.forward(prepared).map(drop))?;
    }
    Ok(total)
}

/// Seconds of `prepare` alone over `chunks`.
fn prepare_seconds(model: &dyn Backbone, chunks: &[&[Sample]]) -> Result<f64> {
    timed(|| chunks.iter().try_for_each(|c| model.prepare(c).map(drop)))
}

fn bench_images(model: &dyn Backbone, rows: &[(String, String)], repeats: usize) -> Result<()> {
    for (batch, n) in [(1usize, 8usize), (8, 32), (32, 64)] {
        let paths: Vec<&str> = rows.iter().take(n).map(|r| r.0.as_str()).collect();
        let decode = |paths: &[&str]| -> Result<Vec<Sample>> {
            paths
                .iter()
                .map(|p| {
                    Ok(Sample {
                        id: p.to_string(),
                        image: Some(load_rgb(Path::new(p), DEFAULT_MAX_PIXELS)?),
                        caption: String::new(),
                    })
                })
                .collect()
        };
        let samples = decode(&paths)?;
        let chunks: Vec<_> = samples.chunks(batch).collect();
        let forward = rate(n, repeats, || forward_seconds(model, &chunks))?;
        let pre = rate(n, repeats, || prepare_seconds(model, &chunks))?;
        let e2e = rate(n, repeats, || {
            timed(|| {
                paths
                    .chunks(batch)
                    .try_for_each(|chunk| model.forward(model.prepare(&decode(chunk)?)?).map(drop))
            })
        })?;
        println!(
            "dinov2-s batch {batch:>3}: forward {forward:6.2} img/s | preprocess alone {pre:7.1} img/s | \
             decode+preprocess+forward {e2e:6.2} img/s | peak RSS {:.0} MB",
            peak_rss_mb()
        );
    }
    Ok(())
}

fn bench_texts(model: &dyn Backbone, rows: &[(String, String)], repeats: usize) -> Result<()> {
    let samples: Vec<Sample> = rows
        .iter()
        .map(|(id, caption)| Sample {
            id: id.clone(),
            image: None,
            caption: caption.clone(),
        })
        .collect();
    for batch in [32usize, 256] {
        let chunks: Vec<_> = samples.chunks(batch).collect();
        let forward = rate(samples.len(), repeats, || forward_seconds(model, &chunks))?;
        let tokenize = rate(samples.len(), repeats, || prepare_seconds(model, &chunks))?;
        let e2e = rate(samples.len(), repeats, || {
            timed(|| {
                chunks
                    .iter()
                    .try_for_each(|c| model.forward(model.prepare(c)?).map(drop))
            })
        })?;
        println!(
            "minilm batch {batch:>3}: forward {forward:6.1} texts/s | tokenize+forward {e2e:6.1} texts/s | tokenize alone {tokenize:8.0} texts/s | \
             {} captions | peak RSS {:.0} MB",
            samples.len(),
            peak_rss_mb()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    multiclip::runtime::keep_freed_memory();
    let repeats: usize = std::env::args()
        .nth(1)
        .map_or(Ok(3), |a| a.parse())
        .context("REPEATS must be a number")?;
    println!("threads: {}", rayon::current_num_threads());
    let rows = rows()?;
    let device = Device::Cpu;
    let text = backbone::load("sentence:models/all-MiniLM-L6-v2", &device)?;
    bench_texts(text.as_ref(), &rows, repeats)?;
    let image = backbone::load("dinov2:models/dinov2-small", &device)?;
    bench_images(image.as_ref(), &rows, repeats)?;
    Ok(())
}
