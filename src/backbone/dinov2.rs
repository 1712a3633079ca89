//! DINOv2 image encoder in Hugging Face's `Dinov2Model` layout (`facebook/dinov2-small` and
//! larger), configured from `config.json`. Matches transformers: bicubic interpolation of the
//! position grid (torch's `interpolate(mode="bicubic", align_corners=False)`), layer scale, exact
//! GELU, final layer norm. Outputs the CLS token (`image`) and the mean patch token
//! (`image_patch_mean`); with option `image_tokens=true` also every token of the final layer norm
//! (transformers' `last_hidden_state`, CLS first), `image_tokens` `[1 + patches, hidden]`, which
//! needs the fixed image size of a center crop.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::activation::Activation;
use super::attention::self_attention;
use super::contract::{
    Backbone, BackboneInfo, Compute, OutputKind, OutputSpec, Prepared, Sample, in_passes,
    rows_per_pass,
};
use super::cpu_ops::residual_add;
use super::layers::{FrozenLayerNorm, FrozenLinear};
use super::options::Options;
use super::preprocess::ImagePreprocess;
use super::source::{ModelDir, Weights, load_weights};

/// The fields of `Dinov2Config` the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

/// One encoder layer; the layer scales are folded into `attn_out` and `fc2`.
struct Layer {
    norm1: FrozenLayerNorm,
    qkv: FrozenLinear,
    attn_out: FrozenLinear,
    norm2: FrozenLayerNorm,
    fc1: FrozenLinear,
    fc2: FrozenLinear,
}

/// The DINOv2 transformer.
pub struct Dinov2Model {
    config: Config,
    activation: Activation,
    /// Patch projection as a matrix product over `channels * patch * patch` pixel rows.
    patch_projection: FrozenLinear,
    cls_token: Tensor,
    /// `[1 + grid * grid, hidden]` as trained.
    position_embeddings: Tensor,
    /// Position grids interpolated to other patch grids, by (rows, cols).
    interpolated: Mutex<HashMap<(usize, usize), Tensor>>,
    layers: Vec<Layer>,
    final_norm: FrozenLayerNorm,
}

impl Dinov2Model {
    pub fn new(config: Config, vb: Weights) -> Result<Self> {
        if config.use_swiglu_ffn {
            bail!("DINOv2 with use_swiglu_ffn (the giant model) is not supported");
        }
        let activation = Activation::from_hf(&config.hidden_act)?;
        let (d, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let grid = config.image_size / p;
        let emb = vb.pp("embeddings");
        let proj = emb.pp("patch_embeddings").pp("projection");
        let patch_projection = FrozenLinear::from_weights(
            proj.get((d, c, p, p), "weight")?.reshape((d, c * p * p))?,
            Some(proj.get(d, "bias")?),
            vb.kernels(),
        )?;
        let cls_token = emb.get((1, 1, d), "cls_token")?.reshape((1, d))?;
        let position_embeddings = emb
            .get((1, grid * grid + 1, d), "position_embeddings")?
            .reshape((grid * grid + 1, d))?;
        let mlp_dim = (d as f64 * config.mlp_ratio) as usize;
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attn = vb.pp("attention");
                let scale1 = vb.pp("layer_scale1").get(d, "lambda1")?;
                let scale2 = vb.pp("layer_scale2").get(d, "lambda1")?;
                let qkv_names = ["query", "key", "value"];
                Ok(Layer {
                    norm1: FrozenLayerNorm::new(d, eps, vb.pp("norm1"))?,
                    qkv: FrozenLinear::fused(
                        &qkv_names,
                        d,
                        d,
                        config.qkv_bias,
                        attn.pp("attention"),
                    )?,
                    attn_out: FrozenLinear::scaled(d, d, &scale1, attn.pp("output").pp("dense"))?,
                    norm2: FrozenLayerNorm::new(d, eps, vb.pp("norm2"))?,
                    fc1: FrozenLinear::new(d, mlp_dim, vb.pp("mlp").pp("fc1"))?,
                    fc2: FrozenLinear::scaled(mlp_dim, d, &scale2, vb.pp("mlp").pp("fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = FrozenLayerNorm::new(d, eps, vb.pp("layernorm"))?;
        Ok(Self {
            config,
            activation,
            patch_projection,
            cls_token,
            position_embeddings,
            interpolated: Mutex::new(HashMap::new()),
            layers,
            final_norm,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Position embeddings `[1 + rows * cols, hidden]` for a patch grid of that size, as
    /// transformers' `interpolate_pos_encoding` computes them (in f32, then in the forward's
    /// dtype).
    fn position_embeddings(
        &self,
        rows: usize,
        cols: usize,
        height: usize,
        width: usize,
    ) -> Result<Tensor> {
        let grid = self.config.image_size / self.config.patch_size;
        // transformers returns the trained embeddings unchanged only for a square input whose
        // grid matches; otherwise it interpolates (an identity resize is exact anyway).
        if rows == grid && cols == grid && height == width {
            return Ok(self.position_embeddings.clone());
        }
        let mut cache = self.interpolated.lock().expect("position cache lock");
        if let Some(t) = cache.get(&(rows, cols)) {
            return Ok(t.clone());
        }
        let d = self.config.hidden_size;
        let patches = self.position_embeddings.narrow(0, 1, grid * grid)?;
        // [grid*grid, d] -> channel planes [d, grid, grid]
        let planes: Vec<f32> = patches
            .t()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let resized = bicubic_resize_torch(&planes, d, (grid, grid), (rows, cols));
        let resized = Tensor::from_vec(resized, (d, rows * cols), patches.device())?
            .to_dtype(patches.dtype())?
            .t()?;
        let cls = self.position_embeddings.narrow(0, 0, 1)?;
        let full = Tensor::cat(&[&cls, &resized], 0)?.contiguous()?;
        cache.insert((rows, cols), full.clone());
        Ok(full)
    }

    /// Runs the model on `[batch, channels, height, width]` pixels; returns the final-layernorm
    /// hidden states `[batch, 1 + patches, hidden]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (p, d) = (self.config.patch_size, self.config.hidden_size);
        let (rows, cols) = (h / p, w / p);
        if rows == 0 || cols == 0 {
            bail!("input {h}x{w} is smaller than one {p}x{p} patch");
        }
        // Non-overlapping patches as rows of a matrix (a stride-p convolution, as one matmul);
        // like the convolution, pixels beyond the last whole patch are ignored.
        let patches = pixels
            .to_dtype(self.patch_projection.dtype())?
            .narrow(2, 0, rows * p)?
            .narrow(3, 0, cols * p)?
            .reshape((b, c, rows, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * rows * cols, c * p * p))?;
        let embedded = self.patch_projection.forward(&patches)?;
        let embedded = embedded.reshape((b, rows * cols, d))?;
        let cls = self.cls_token.unsqueeze(0)?.expand((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &embedded], 1)?;
        let seq = 1 + rows * cols;
        let positions = self.position_embeddings(rows, cols, h, w)?;
        let mut x = tokens
            .broadcast_add(&positions.unsqueeze(0)?)?
            .reshape((b * seq, d))?;
        let heads = self.config.num_attention_heads;
        let kernels = self.patch_projection.kernels();
        for layer in &self.layers {
            let attn = {
                let qkv = layer.qkv.forward(&layer.norm1.forward(&x)?)?;
                layer
                    .attn_out
                    .forward(&self_attention(&qkv, b, seq, heads, None, kernels)?)?
            };
            x = residual_add(&x, attn, kernels)?;
            let mlp = {
                let hidden = layer
                    .fc1
                    .forward_act(&layer.norm2.forward(&x)?, Some(self.activation))?;
                layer.fc2.forward(&hidden)?
            };
            x = residual_add(&x, mlp, kernels)?;
        }
        Ok(self.final_norm.forward(&x)?.reshape((b, seq, d))?)
    }

    /// Tokens of one image of `height` x `width` pixels (class token + patches).
    pub fn tokens_per_image(&self, height: usize, width: usize) -> usize {
        let p = self.config.patch_size;
        1 + (height / p) * (width / p)
    }

    /// (CLS token, mean patch token) of the final layer norm, each `[batch, hidden]` in f32, and
    /// with `tokens` every token `[batch, 1 + patches, hidden]`.
    pub fn embed(&self, pixels: &Tensor, tokens: bool) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let hidden = self.forward(pixels)?.to_dtype(DType::F32)?;
        let seq = hidden.dim(1)?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let patch_mean = hidden.narrow(1, 1, seq - 1)?.mean(1)?;
        Ok((cls, patch_mean, tokens.then_some(hidden)))
    }
}

/// torch's `interpolate(mode="bicubic", align_corners=False, antialias=False)` with an explicit
/// output size, on `channels` planes of `input` (row-major `[channels, rows, cols]`): cubic
/// convolution with a = -0.75, source coordinate `(dst + 0.5) * in / out - 0.5`, edge-clamped taps.
pub fn bicubic_resize_torch(
    input: &[f32],
    channels: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    fn taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f64; 4])> {
        const A: f64 = -0.75;
        let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
        let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
        // torch computes the scale in f32 from the sizes.
        let scale = (in_size as f32 / out_size as f32) as f64;
        (0..out_size)
            .map(|dst| {
                let src = (dst as f64 + 0.5) * scale - 0.5;
                let base = src.floor();
                let t = src - base;
                let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
                let index =
                    |offset: i64| (base as i64 + offset).clamp(0, in_size as i64 - 1) as usize;
                ([index(-1), index(0), index(1), index(2)], weights)
            })
            .collect()
    }
    let rows = taps(in_h, out_h);
    let cols = taps(in_w, out_w);
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for plane in input.chunks_exact(in_h * in_w) {
        for (ys, wy) in &rows {
            for (xs, wx) in &cols {
                let mut acc = 0.0f64;
                for (&y, &wy) in ys.iter().zip(wy) {
                    let row = &plane[y * in_w..];
                    let mut line = 0.0f64;
                    for (&x, &wx) in xs.iter().zip(wx) {
                        line += row[x] as f64 * wx;
                    }
                    acc += line * wy;
                }
                out.push(acc as f32);
            }
        }
    }
    out
}

/// A loaded DINOv2 backbone with its preprocessing.
pub struct Dinov2Backbone {
    id: String,
    model: Dinov2Model,
    preprocess: ImagePreprocess,
    /// Tokens per image of the `image_tokens` output, when it is stored.
    image_tokens: Option<usize>,
    weights_sha256: Vec<(String, String)>,
    device: Device,
}

impl Dinov2Backbone {
    /// Loads `config.json`, `preprocessor_config.json` and the weights of `dir`; `options`:
    /// `image_tokens=true|false`.
    pub fn load(id: &str, dir: &ModelDir, options: &Options, compute: &Compute) -> Result<Self> {
        options.check_known("dinov2 backbone", &["image_tokens"])?;
        let config: Config = dir.json("config.json")?;
        let preprocess = ImagePreprocess::from_hf_config(&dir.file("preprocessor_config.json")?)?;
        let image_tokens = if options.flag("image_tokens")? {
            let Some((h, w)) = preprocess.crop else {
                bail!(
                    "{}: image_tokens=true needs a fixed image size, but the preprocessor does no \
                     center crop (do_center_crop), so the token count varies with the image",
                    dir.location
                );
            };
            let p = config.patch_size;
            Some(1 + (h as usize / p) * (w as usize / p))
        } else {
            None
        };
        let weights = load_weights(dir, compute, "embeddings.cls_token", &["dinov2"])?;
        let model = Dinov2Model::new(config, weights.vb)
            .with_context(|| format!("cannot build DINOv2 from {}", dir.location))?;
        Ok(Self {
            id: id.to_string(),
            model,
            preprocess,
            image_tokens,
            weights_sha256: weights.sha256,
            device: compute.device.clone(),
        })
    }

    pub fn preprocess(&self) -> &ImagePreprocess {
        &self.preprocess
    }
}

impl Backbone for Dinov2Backbone {
    fn info(&self) -> BackboneInfo {
        BackboneInfo {
            id: self.id.clone(),
            weights_sha256: self.weights_sha256.clone(),
            preprocessing: serde_json::json!({ "image": self.preprocess.describe() }),
            text_template: None,
        }
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        let d = self.model.hidden_size();
        let feature = |name: &str, shape: Vec<usize>| OutputSpec {
            name: name.into(),
            shape,
            kind: OutputKind::Feature,
        };
        let mut outputs = vec![
            feature("image", vec![d]),
            feature("image_patch_mean", vec![d]),
        ];
        if let Some(tokens) = self.image_tokens {
            outputs.push(feature("image_tokens", vec![tokens, d]));
        }
        outputs
    }

    fn needs_images(&self) -> bool {
        true
    }

    fn needs_text(&self) -> bool {
        false
    }

    fn prepare(&self, batch: &[Sample]) -> Result<Prepared> {
        Ok(Box::new(self.preprocess.batch(batch, &self.device)?))
    }

    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>> {
        let pixels = prepared.downcast::<Tensor>().map_err(|_| {
            anyhow::anyhow!("dinov2 forward got a batch prepared by another backbone")
        })?;
        let (n, _, h, w) = pixels.dims4()?;
        let per_pass = rows_per_pass(&self.device, self.model.tokens_per_image(h, w));
        in_passes(n, per_pass, |start, len| {
            let pixels = pixels.narrow(0, start, len)?;
            let (cls, patch_mean, tokens) =
                self.model.embed(&pixels, self.image_tokens.is_some())?;
            Ok([cls, patch_mean].into_iter().chain(tokens).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_identity_and_constant() {
        let input: Vec<f32> = (0..2 * 5 * 4).map(|i| i as f32 * 0.37).collect();
        assert_eq!(bicubic_resize_torch(&input, 2, (5, 4), (5, 4)), input);
        let constant = vec![1.5f32; 6 * 6];
        for v in bicubic_resize_torch(&constant, 1, (6, 6), (3, 4)) {
            assert!((v - 1.5).abs() < 1e-6);
        }
    }
}
