//! Classification heads trained on cached backbone outputs.
//!
//! A head reads named cache outputs from a batch ([`Inputs`]) and returns logits `[B, K]`
//! (or cosines in [-1, 1] with `cosine = true`, for the angular-margin loss). The kinds:
//! [`mlp`] (MLP or linear probe on concatenated features), [`router`] (one MLP per modality mixed
//! by per-sample softmax weights), [`ensemble`] (linear probes and a fused MLP mixed by a
//! router), [`gat`] (graph attention over the label co-occurrence graph) and [`ml_decoder`]
//! (Ridnik et al.'s query decoder over token sequences).
//!
//! Variables: [`build`] takes a `VarBuilder`; for training make it with
//! [`init::seeded_var_builder`] over a `VarMap` (seeded, reproducible initial weights). Every
//! variable in that map is trainable. Fixed buffers (ML-Decoder queries, GAT adjacency) are NOT
//! in the map: they live under a `buffers.` path segment ([`is_buffer`]) and the head returns them
//! from [`Head::buffers`]; a checkpoint saves map + buffers (`train::checkpoint`). Building from a
//! checkpoint's `VarBuilder` (e.g. `VarBuilder::from_mmaped_safetensors`) reads both back.

pub mod ensemble;
pub mod features;
mod fused;
pub mod gat;
pub mod init;
pub mod layers;
pub mod ml_decoder;
pub mod mlp;
mod products;
pub mod router;
pub mod shapes;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use candle_core::{Result, Shape, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

pub use ensemble::EnsembleConfig;
pub use gat::{GatConfig, LabelCooccurrence};
pub use ml_decoder::MlDecoderConfig;
pub use mlp::MlpConfig;
pub use router::RouterConfig;

/// A batch: cache output name -> tensor on the device, batch first (`[B, D]`, `[B, T, D]`,
/// masks `[B, T]` with 1 for a real token). Token sequences may be f16; heads convert.
pub type Inputs = HashMap<String, Tensor>;

/// What a head is built for.
#[derive(Debug, Clone, Default)]
pub struct HeadContext {
    /// K, the number of labels (logit columns).
    pub num_labels: usize,
    /// Per-sample shape of every available cache output, WITHOUT the batch dimension:
    /// `[D]` for pooled vectors, `[T, D]` for token sequences, `[T]` for masks.
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// Label co-occurrence counts of the training split; required by `gat` when training.
    pub label_cooccurrence: Option<LabelCooccurrence>,
    /// Seed of the fixed random buffers and the dropout masks.
    pub seed: u64,
    /// Embeddings of the label names `[K, D]` (vocabulary order), for heads with
    /// `queries=labels`. Training fills it from the cache once extraction stores them; a
    /// checkpoint does not need it (what the head took from it is saved with the weights).
    pub label_embeddings: Option<Tensor>,
    /// The number type of the head's matrix products (`train --precision`; a head loaded from a
    /// checkpoint computes in f32): bf16 operands with f32 sums, or f32 ([`products`]).
    pub precision: crate::tensor_ops::Precision,
}

/// Where a head's per-label starting points come from: `ml_decoder`'s class queries, `gat`'s
/// label nodes, a cosine `mlp`'s class weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Queries {
    /// Seeded random values (the original heads).
    #[default]
    Random,
    /// The label-name embeddings of the context (`HeadContext::label_embeddings`).
    Labels,
}

impl Queries {
    pub fn is_random(&self) -> bool {
        *self == Self::Random
    }
}

/// The label embeddings `[K, D]` of `ctx` for `head` (`queries=labels`): present, one row per
/// label, f32.
pub(crate) fn label_embeddings<'a>(ctx: &'a HeadContext, head: &str) -> anyhow::Result<&'a Tensor> {
    let Some(embeddings) = &ctx.label_embeddings else {
        anyhow::bail!(
            "{head}: queries=labels needs embeddings of the label names, which this cache does \
             not hold (`multiclip extract --label-names` stores them)"
        );
    };
    match embeddings.dims() {
        [k, _] if *k == ctx.num_labels && embeddings.dtype() == candle_core::DType::F32 => {
            Ok(embeddings)
        }
        dims => anyhow::bail!(
            "{head}: the label embeddings are {dims:?} {:?}, expected [{}, D] f32",
            embeddings.dtype(),
            ctx.num_labels
        ),
    }
}

/// Head configuration: the kind with its own fields, and what every kind shares. In JSON/TOML one
/// flat table tagged by `kind` (`{"kind": "mlp", "hidden": 0, "cosine": false}`); see each kind's
/// config for its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    #[serde(flatten)]
    pub kind: HeadKind,
    /// L2-normalised features and class weights: the head outputs cosines in [-1, 1] (for the
    /// angular-margin loss) instead of logits.
    #[serde(default)]
    pub cosine: bool,
}

/// A head kind and its own fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadKind {
    Mlp(MlpConfig),
    Router(RouterConfig),
    Ensemble(EnsembleConfig),
    Gat(GatConfig),
    MlDecoder(MlDecoderConfig),
}

impl HeadConfig {
    /// Checks the kind's fields (each config's own `validate`): zero widths, head counts that do
    /// not divide a width, probabilities outside their range are refused, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        match &self.kind {
            HeadKind::Mlp(c) => c.validate(),
            HeadKind::Router(c) => c.validate(),
            HeadKind::Ensemble(c) => c.validate(),
            HeadKind::Gat(c) => c.validate(),
            HeadKind::MlDecoder(c) => c.validate(),
        }
        .with_context(|| format!("head `{}`", self.kind.name()))
    }
}

/// Fails naming `field` unless `value` is at least 1.
fn require_positive(field: &str, value: usize) -> anyhow::Result<()> {
    if value == 0 {
        anyhow::bail!("`{field}` must be at least 1 (got 0)");
    }
    Ok(())
}

/// Fails naming `field` unless `width` is a multiple of `heads` (both at least 1).
fn require_divisible(field: &str, width: usize, heads: usize) -> anyhow::Result<()> {
    require_positive(field, width)?;
    require_positive("heads", heads)?;
    if !width.is_multiple_of(heads) {
        anyhow::bail!("`{field}` {width} must be a multiple of `heads` {heads}");
    }
    Ok(())
}

/// Fails naming `field` unless `p` is a probability in `[0, 1]` (`[0, 1)` when `below_one`:
/// dropout of 1 drops everything).
fn require_probability(field: &str, p: f32, below_one: bool) -> anyhow::Result<()> {
    let ok = if below_one {
        (0.0..1.0).contains(&p)
    } else {
        (0.0..=1.0).contains(&p)
    };
    if !ok {
        let range = if below_one { "[0, 1)" } else { "[0, 1]" };
        anyhow::bail!("`{field}` must be in {range} (got {p})");
    }
    Ok(())
}

/// Fails naming `dropout` unless it is in `[0, 1)`.
fn require_dropout(p: f32) -> anyhow::Result<()> {
    require_probability("dropout", p, true)
}

impl HeadKind {
    /// The kind's name, as written in configs and checkpoint names (`mlp`, `ml_decoder`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mlp(_) => "mlp",
            Self::Router(_) => "router",
            Self::Ensemble(_) => "ensemble",
            Self::Gat(_) => "gat",
            Self::MlDecoder(_) => "ml_decoder",
        }
    }
}

/// Parses the CLI form `KIND[:KEY=VALUE,...]` (the grammar of [`crate::spec`]), e.g. `mlp`,
/// `mlp:hidden=0`, `router:inputs=image+text,hidden=512`, `ml_decoder:input=multimodal_tokens`.
/// List values (`inputs`) are joined with `+`; unknown keys are errors.
impl FromStr for HeadConfig {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let spec = crate::spec::Spec::parse(text).context("bad head spec")?;
        let mut map = serde_json::Map::new();
        map.insert("kind".into(), spec.name.clone().into());
        for (key, items) in spec.options.iter() {
            let value = match items {
                _ if LIST_FIELDS.contains(&key) => serde_json::Value::from(items.to_vec()),
                [one] => scalar(one),
                _ => anyhow::bail!(
                    "head option `{key}` takes one value, got the list `{}`",
                    items.join("+")
                ),
            };
            map.insert(key.to_string(), value);
        }
        let config: Self = serde_json::from_value(map.into()).with_context(|| {
            format!("bad head `{text}` (kinds: mlp, router, ensemble, gat, ml_decoder)")
        })?;
        config
            .validate()
            .with_context(|| format!("bad head `{text}`"))?;
        Ok(config)
    }
}

/// Head fields that hold lists (written `a+b` in a spec).
const LIST_FIELDS: [&str; 1] = ["inputs"];

/// A spec value as the JSON scalar it reads as: a bool, an integer, a float, else a string.
fn scalar(value: &str) -> serde_json::Value {
    if let Ok(b) = value.parse::<bool>() {
        b.into()
    } else if let Ok(n) = value.parse::<u64>() {
        n.into()
    } else if let Ok(x) = value.parse::<f64>() {
        x.into()
    } else {
        value.into()
    }
}

impl fmt::Display for HeadConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&json)
    }
}

/// A part of a head that can be trained on its own first (the multi-stage recipe), e.g. the
/// image expert of a router. Its variables are those whose names start with `var_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPart {
    pub name: String,
    pub var_prefix: String,
}

/// A trained head: logits from a batch of cache outputs.
pub trait Head: Send + Sync {
    /// The batch entries (cache output names, masks included) that `forward` reads.
    fn inputs(&self) -> Vec<String>;

    /// Logits `[B, K]` (cosines in [-1, 1] for a cosine head). `train` turns dropout on.
    fn forward(&self, x: &Inputs, train: bool) -> Result<Tensor>;

    /// The trainable biases added straight to the logits (`[K]` each): the trainer starts them at
    /// the label prior's log-odds, so that training does not spend its first epochs learning
    /// label frequencies (and a router is not pulled toward whichever expert gets there first).
    fn logit_biases(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// Fixed (never optimised) tensors to save with the weights, by full name.
    fn buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Sub-heads that can be warmed up alone before the whole head is trained.
    fn parts(&self) -> Vec<HeadPart> {
        Vec::new()
    }

    /// Logits `[B, K]` of the part called `part` (one of [`Head::parts`]) on its own.
    fn part_forward(&self, part: &str, _x: &Inputs, _train: bool) -> Result<Tensor> {
        candle_core::bail!("this head has no part `{part}`")
    }

    /// About how many values the forward pass of `rows` samples produces (every layer's output,
    /// each kept for the backward pass, which makes a gradient of the same size): the memory
    /// check before training ([`crate::train::memory`]) counts on it. An estimate, not a bound.
    fn activation_values(&self, rows: usize) -> usize;

    /// Rows per micro-batch in training and prediction ([`POOLED_MICRO_BATCH_ROWS`]; heads on
    /// token sequences use [`MICRO_BATCH_ROWS`]).
    fn micro_batch_rows(&self) -> usize {
        POOLED_MICRO_BATCH_ROWS
    }

    /// Evaluation logits `[B, K]` for a batch of any size, computed in micro-batches of
    /// [`Head::micro_batch_rows`] and detached: memory stays bounded and large batches cost no
    /// more per sample than small ones.
    fn predict(&self, x: &Inputs) -> Result<Tensor> {
        let logits = micro_batches(x, self.micro_batch_rows())?
            .iter()
            .map(|chunk| Ok(self.forward(chunk, false)?.detach()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&logits, 0)
    }
}

/// Rows per micro-batch of a head on token sequences: activations of a few hundred samples stay
/// in cache; thousands do not (ML-Decoder: ~35% more CPU time per sample at 4096 rows in one piece
/// than at 256).
pub const MICRO_BATCH_ROWS: usize = 256;

/// Rows per micro-batch of a head on pooled vectors: a few kB of activations per row, and the
/// weight gradients are matrix products whose inner dimension is the rows, faster when long
/// (router at batch 4096 on 2 threads: 15,500 samples/s in pieces of 256, 18,900 in one piece).
pub const POOLED_MICRO_BATCH_ROWS: usize = 4096;

/// Split a batch into consecutive pieces of at most `rows` samples (views, no copies).
pub fn micro_batches(x: &Inputs, rows: usize) -> Result<Vec<Inputs>> {
    let total = batch_size(x)?;
    let rows = rows.max(1);
    (0..total)
        .step_by(rows)
        .map(|start| {
            let len = rows.min(total - start);
            x.iter()
                .map(|(name, t)| Ok((name.clone(), t.narrow(0, start, len)?)))
                .collect()
        })
        .collect()
}

/// The number of samples in a batch (every entry must agree).
pub fn batch_size(x: &Inputs) -> Result<usize> {
    let mut size: Option<(&String, usize)> = None;
    for (name, t) in x {
        let n = t.dim(0)?;
        match size {
            None => size = Some((name, n)),
            Some((first, m)) if m != n => candle_core::bail!(
                "batch entries `{first}` ({m} rows) and `{name}` ({n} rows) differ"
            ),
            Some(_) => {}
        }
    }
    match size {
        Some((_, n)) => Ok(n),
        None => candle_core::bail!("empty batch: no inputs"),
    }
}

/// Build the head described by `cfg`. Checks that every input it needs is in
/// `ctx.input_shapes` (the error names the missing output and lists the available ones).
pub fn build(cfg: &HeadConfig, ctx: &HeadContext, vb: VarBuilder) -> anyhow::Result<Box<dyn Head>> {
    if ctx.num_labels == 0 {
        anyhow::bail!("a head needs at least one label");
    }
    cfg.validate()?;
    let cosine = cfg.cosine;
    let head: Box<dyn Head> = match &cfg.kind {
        HeadKind::Mlp(c) => Box::new(mlp::MlpHead::new(c, cosine, ctx, vb)?),
        HeadKind::Router(c) => Box::new(router::build(c, cosine, ctx, vb)?),
        HeadKind::Ensemble(c) => Box::new(ensemble::build(c, cosine, ctx, vb)?),
        HeadKind::Gat(c) => Box::new(gat::GatHead::new(c, cosine, ctx, vb)?),
        HeadKind::MlDecoder(c) => Box::new(ml_decoder::MlDecoderHead::new(c, cosine, ctx, vb)?),
    };
    Ok(head)
}

/// The path segment under which fixed buffers are named (`buffers.queries`, ...).
pub const BUFFER_SCOPE: &str = "buffers";

/// Whether a checkpoint tensor name is a fixed buffer (not a trainable variable).
pub fn is_buffer(name: &str) -> bool {
    name.split('.').any(|segment| segment == BUFFER_SCOPE)
}

/// A fixed buffer called `name` under `vb`'s `buffers` scope: read from `vb` when it holds it
/// (a checkpoint), otherwise made by `make`. Returns the full name and the tensor.
fn buffer(
    vb: &VarBuilder,
    name: &str,
    shape: impl Into<Shape>,
    make: impl FnOnce() -> anyhow::Result<Tensor>,
) -> anyhow::Result<(String, Tensor)> {
    let scope = vb.pp(BUFFER_SCOPE);
    let full_name = scope.pp(name).prefix();
    let shape = shape.into();
    let tensor = if scope.contains_tensor(name) {
        scope
            .get(shape, name)
            .with_context(|| format!("buffer `{full_name}` in the checkpoint"))?
    } else {
        let tensor = make()?;
        if tensor.shape() != &shape {
            anyhow::bail!(
                "buffer `{full_name}` has shape {:?}, expected {shape:?}",
                tensor.shape()
            );
        }
        tensor
    };
    Ok((full_name, tensor))
}

/// The label-name embeddings `[K, D]` as a head's fixed buffer, with a learned projection of
/// them: where `ml_decoder`'s queries and `gat`'s label nodes start with `queries=labels`.
pub(crate) struct LabelQueries {
    pub buffer_name: String,
    /// `[K, D]`: from the context when the head is built for training, as saved when it is
    /// loaded from a checkpoint.
    pub embeddings: Tensor,
    /// `D -> width`.
    pub proj: layers::Linear,
}

impl LabelQueries {
    /// The buffer `buffer` and the projection `projection` (to `width`, its product in
    /// `precision`) of `head` under `vb`.
    pub(crate) fn new(
        head: &str,
        ctx: &HeadContext,
        vb: &VarBuilder,
        buffer: &str,
        projection: &str,
        width: usize,
        precision: crate::tensor_ops::Precision,
    ) -> anyhow::Result<Self> {
        let scope = vb.pp(BUFFER_SCOPE);
        let buffer_name = scope.pp(buffer).prefix();
        // Built for training (or planned), the context holds them; loaded, the checkpoint does
        // (checked against the head before). Neither: the error that names `--label-names`.
        let saved = (ctx.label_embeddings.is_none() && scope.contains_tensor(buffer))
            .then(|| scope.get_unchecked(buffer));
        let embeddings = match saved {
            Some(Ok(saved)) => saved,
            _ => label_embeddings(ctx, head)?.clone(),
        };
        let (rows, dim) = embeddings.dims2()?;
        if rows != ctx.num_labels {
            anyhow::bail!(
                "{head}: {rows} label embeddings for {} labels",
                ctx.num_labels
            );
        }
        Ok(Self {
            buffer_name,
            embeddings,
            proj: layers::Linear::new(dim, width, precision, vb.pp(projection))?,
        })
    }

    /// The projected embeddings `[K, width]`.
    pub(crate) fn projected(&self) -> Result<Tensor> {
        candle_nn::Module::forward(&self.proj, &self.embeddings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_keep_the_flat_json_of_earlier_sidecars() {
        // As multiclip wrote them when every kind's config held its own `cosine`.
        for json in [
            r#"{"kind":"mlp","inputs":["image","text"],"hidden":768,"dropout":0.0,"cosine":false}"#,
            r#"{"kind":"gat","inputs":[],"hidden":512,"heads":4,"layers":2,"threshold":0.4,"p":0.2,"cosine":true}"#,
        ] {
            let config: HeadConfig = serde_json::from_str(json).unwrap();
            let written: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
            assert_eq!(
                written,
                serde_json::from_str::<serde_json::Value>(json).unwrap()
            );
        }
        let gat: HeadConfig = serde_json::from_str(r#"{"kind":"gat","cosine":true}"#).unwrap();
        assert!(gat.cosine && gat.kind.name() == "gat");
        let typo = serde_json::from_str::<HeadConfig>(r#"{"kind":"mlp","cosin":true}"#);
        assert!(typo.unwrap_err().to_string().contains("cosin"));
    }

    #[test]
    fn a_kind_without_options_takes_its_defaults() {
        let kinds = [
            HeadKind::Mlp(MlpConfig::default()),
            HeadKind::Router(RouterConfig::default()),
            HeadKind::Ensemble(EnsembleConfig::default()),
            HeadKind::Gat(GatConfig::default()),
            HeadKind::MlDecoder(MlDecoderConfig::default()),
        ];
        for kind in kinds {
            let parsed: HeadConfig = kind.name().parse().unwrap();
            assert_eq!(
                parsed,
                HeadConfig {
                    kind,
                    cosine: false
                }
            );
        }
    }
}
