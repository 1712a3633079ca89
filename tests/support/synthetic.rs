//! Synthetic labelled datasets and caches for the trainer's tests and benchmark, written through
//! the cache writer API: a `train.csv` whose labels a linear model can learn from the cached
//! features, and a cache of pooled `image` / `text` vectors and (optionally) `multimodal_tokens`
//! with a `multimodal_mask` of realistic caption lengths.

use anyhow::Result;
use candle_core::{Device, Tensor};
use multiclip::backbone::{BackboneInfo, OutputKind};
use multiclip::cache::manifest::FORMAT_VERSION;
use multiclip::cache::{
    CacheHeader, CacheWriter, CsvPart, DatasetFingerprint, SkippedRow, StoredDtype, StoredOutput,
    WorkerSlot,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub rows: usize,
    /// Width of the pooled `image` and `text` vectors.
    pub dim: usize,
    /// `multimodal_tokens` `[positions, dim]` with this many positions, and the real-token
    /// count per row drawn from `real_tokens`.
    pub tokens: Option<(usize, Range<usize>)>,
    pub labels: usize,
    pub seed: u64,
    pub shard_rows: usize,
    pub backbone: String,
}

impl Synthetic {
    /// Image id of row `r`.
    pub fn id(r: usize) -> String {
        format!("{r}.jpg")
    }

    /// The pooled image vector of row `r` (uniform in [-1, 1], from the row's own stream).
    fn image(&self, r: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(r as u64);
        (0..self.dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect()
    }

    /// The labels of row `r`: label `j` when two of its image coordinates sum above 0.8 (about
    /// 18% positives per label), and at least the strongest one.
    fn label_set(&self, image: &[f32]) -> Vec<usize> {
        let d = self.dim;
        let score = |j: usize| image[j % d] + image[(j * 7 + 3) % d];
        let mut set: Vec<usize> = (0..self.labels).filter(|&j| score(j) > 0.8).collect();
        if set.is_empty() {
            let best = (0..self.labels)
                .max_by(|&a, &b| score(a).total_cmp(&score(b)))
                .unwrap_or(0);
            set.push(best);
        }
        set
    }

    /// Writes `dir/train.csv` (`ImageID,Labels,Caption`); returns the label sets.
    pub fn write_dataset(&self, dir: &Path) -> Result<Vec<Vec<usize>>> {
        std::fs::create_dir_all(dir)?;
        let mut csv = String::from("ImageID,Labels,Caption\n");
        let mut sets = Vec::with_capacity(self.rows);
        for r in 0..self.rows {
            let set = self.label_set(&self.image(r));
            let labels: Vec<String> = set.iter().map(|j| (j + 1).to_string()).collect();
            writeln!(csv, "{},{},\"caption {r}\"", Self::id(r), labels.join(" "))?;
            sets.push(set);
        }
        std::fs::write(dir.join("train.csv"), csv)?;
        Ok(sets)
    }

    fn outputs(&self) -> Vec<StoredOutput> {
        let feature = |name: &str, shape: Vec<usize>| StoredOutput {
            name: name.into(),
            shape,
            kind: OutputKind::Feature,
            dtype: StoredDtype::F16,
        };
        let mut outputs = vec![
            feature("image", vec![self.dim]),
            feature("text", vec![self.dim]),
        ];
        if let Some((positions, _)) = &self.tokens {
            outputs.push(feature("multimodal_tokens", vec![*positions, self.dim]));
            outputs.push(StoredOutput {
                name: "multimodal_mask".into(),
                shape: vec![*positions],
                kind: OutputKind::Mask,
                dtype: StoredDtype::U8,
            });
        }
        outputs
    }

    /// Writes the cache of the dataset in `data_dir` (whose train.csv must exist) into `dir`.
    pub fn write_cache(&self, data_dir: &Path, dir: &Path) -> Result<()> {
        self.write_cache_skipping(data_dir, dir, &[])
    }

    /// [`Synthetic::write_cache`] with the rows `skipped` recorded as skipped (as
    /// `extract --on-error skip` records an unreadable image) instead of stored.
    pub fn write_cache_skipping(
        &self,
        data_dir: &Path,
        dir: &Path,
        skipped: &[usize],
    ) -> Result<()> {
        let csv = data_dir.join("train.csv");
        let sha256 = multiclip::files::sha256_file(&csv)?;
        let header = CacheHeader {
            format_version: FORMAT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            backbone: BackboneInfo {
                id: self.backbone.clone(),
                weights_sha256: vec![("model.safetensors".into(), "ab".repeat(32))],
                preprocessing: serde_json::json!({"synthetic": true}),
                text_template: None,
            },
            precision: Default::default(),
            outputs: self.outputs(),
            dataset: DatasetFingerprint {
                selection: "train".into(),
                parts: vec![CsvPart {
                    part: "train".into(),
                    file: "train.csv".into(),
                    sha256,
                    rows: self.rows,
                }],
                rows: self.rows,
            },
            shard_rows: self.shard_rows,
            batch_size: 256,
        };
        let mut writer = CacheWriter::open(dir, header, WorkerSlot::SINGLE)?;
        for index in writer.pending() {
            let range = writer.shard_ranges()[index].clone();
            let mut builder = writer.builder(index);
            let (rows, left_out): (Vec<usize>, Vec<usize>) =
                range.partition(|r| !skipped.contains(r));
            for row in left_out {
                builder.skip(SkippedRow {
                    row,
                    id: Self::id(row),
                    reason: format!(
                        "cannot decode image {}: unexpected end of file",
                        Self::id(row)
                    ),
                })?;
            }
            for chunk in rows.chunks(256) {
                let ids: Vec<(usize, String)> = chunk.iter().map(|&r| (r, Self::id(r))).collect();
                builder.push(&ids, &self.features(chunk)?)?;
            }
            writer.write_shard(builder)?;
        }
        writer.finish()?;
        Ok(())
    }

    /// The outputs of `rows`, in [`Synthetic::outputs`] order.
    fn features(&self, rows: &[usize]) -> Result<Vec<Tensor>> {
        let (n, d) = (rows.len(), self.dim);
        let mut image = Vec::with_capacity(n * d);
        let mut text = Vec::with_capacity(n * d);
        let mut tokens = Vec::new();
        let mut mask = Vec::new();
        for &r in rows {
            let x = self.image(r);
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed);
            rng.set_stream(r as u64);
            for k in 0..d {
                text.push(0.7 * x[(k + 1) % d] + rng.random_range(-0.3f32..0.3));
            }
            image.extend_from_slice(&x);
            if let Some((positions, real)) = &self.tokens {
                let length = rng.random_range(real.clone()).min(*positions);
                for t in 0..*positions {
                    let real = t < length;
                    mask.push(if real { 1.0f32 } else { 0.0 });
                    for k in 0..d {
                        let signal = if real { x[(k + t) % d] } else { 0.0 };
                        tokens.push(signal + rng.random_range(-0.3f32..0.3));
                    }
                }
            }
        }
        let device = Device::Cpu;
        let mut out = vec![
            Tensor::from_vec(image, (n, d), &device)?,
            Tensor::from_vec(text, (n, d), &device)?,
        ];
        if let Some((positions, _)) = &self.tokens {
            out.push(Tensor::from_vec(tokens, (n, *positions, d), &device)?);
            out.push(Tensor::from_vec(mask, (n, *positions), &device)?);
        }
        Ok(out)
    }
}
