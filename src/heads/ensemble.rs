//! `ensemble`: base classifiers on different feature kinds combined by a learned router.
//!
//! Bases: one linear probe per input (pooled vectors as they are, token sequences such as
//! `multimodal_tokens` mean-pooled over their real tokens) and one MLP on all inputs fused
//! (concatenated). A router MLP on the fused features gives each base one softmax weight per
//! sample. Unlike `router`, the bases differ in kind (unimodal probes vs a fused multimodal MLP),
//! and token sequences are welcome.
//!
//! Variables: `bases.probe_<input>.out.*`, `bases.fused.{hidden,out}.*`, `router.*`.

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::HeadContext;
use super::features::Feature;
use super::layers::Mlp;
use super::router::{Expert, Mixture, var_prefix};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnsembleConfig {
    /// Cache outputs (pooled `[D]` or token sequences `[T, D]`); empty = all of the cache's
    /// pooled outputs and token sequences.
    pub inputs: Vec<String>,
    /// Hidden width of the fused MLP base and of the router (0 = linear).
    pub hidden: usize,
    pub dropout: f32,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            hidden: 768,
            dropout: 0.0,
        }
    }
}

impl EnsembleConfig {
    /// `dropout` in [0, 1) (`hidden` 0 makes the fused base and the router linear).
    pub fn validate(&self) -> anyhow::Result<()> {
        super::require_dropout(self.dropout)
    }
}

/// All the cache's pooled outputs and token sequences (masks excluded), sorted.
fn all_features(ctx: &HeadContext) -> Vec<String> {
    let mut names: Vec<String> = ctx
        .input_shapes
        .iter()
        .filter(|(name, shape)| (1..=2).contains(&shape.len()) && !name.ends_with("_mask"))
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

/// The `ensemble` head: the bases, mixed by the router.
pub fn build(
    cfg: &EnsembleConfig,
    cosine: bool,
    ctx: &HeadContext,
    vb: VarBuilder,
) -> anyhow::Result<Mixture> {
    let names = if cfg.inputs.is_empty() {
        all_features(ctx)
    } else {
        cfg.inputs.clone()
    };
    let features = Feature::resolve_all(&names, ctx)?;
    let k = ctx.num_labels;
    let mut experts = Vec::with_capacity(features.len() + 1);
    for (i, f) in features.iter().enumerate() {
        let name = format!("probe_{}", f.name);
        let evb = vb.pp("bases").pp(&name);
        experts.push(Expert {
            var_prefix: var_prefix(&evb),
            features: vec![i],
            mlp: Mlp::new(f.dim, 0, k, 0.0, cosine, ctx, evb)?,
            name,
        });
    }
    let fused_dim = features.iter().map(|f| f.dim).sum();
    let fvb = vb.pp("bases").pp("fused");
    experts.push(Expert {
        name: "fused".into(),
        var_prefix: var_prefix(&fvb),
        features: (0..features.len()).collect(),
        mlp: Mlp::new(fused_dim, cfg.hidden, k, cfg.dropout, cosine, ctx, fvb)?,
    });
    Ok(Mixture::new(
        features,
        experts,
        cfg.hidden,
        cfg.dropout,
        ctx,
        vb,
    )?)
}
