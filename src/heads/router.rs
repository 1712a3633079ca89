//! `router`: one MLP expert per modality and a router that gives each expert one softmax weight
//! per sample; logits = the weighted sum of the experts' logits.
//!
//! The router is an MLP on the concatenation of ALL the inputs, so every modality informs every
//! weight, and the weights sum to 1 (the original took both weights from the image features and
//! did not normalise them). [`Mixture`] is shared with the `ensemble` head.
//!
//! Variables: `experts.<input>.{hidden,out}.*` per modality, `router.{hidden,out}.*`. Each expert
//! is a [`HeadPart`] the trainer can warm up alone (`part_forward`).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::features::{Feature, concat};
use super::layers::Mlp;
use super::mlp::inputs_or_pooled;
use super::{Head, HeadContext, HeadPart, Inputs};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// One expert per listed cache output; empty = every pooled output of the cache.
    pub inputs: Vec<String>,
    /// Hidden width of each expert MLP (0 = linear experts).
    pub hidden: usize,
    /// Hidden width of the router MLP (0 = linear router).
    pub router_hidden: usize,
    pub dropout: f32,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            hidden: 768,
            router_hidden: 256,
            dropout: 0.0,
        }
    }
}

impl RouterConfig {
    /// `dropout` in [0, 1) (0 widths make linear experts or router).
    pub fn validate(&self) -> anyhow::Result<()> {
        super::require_dropout(self.dropout)
    }
}

/// One classifier of a mixture, on a subset of the mixture's features.
pub(crate) struct Expert {
    pub name: String,
    pub var_prefix: String,
    /// Indices into the mixture's features, concatenated in this order.
    pub features: Vec<usize>,
    pub mlp: Mlp,
}

/// Experts mixed by per-sample softmax weights from a router MLP on all features: the `router`
/// and `ensemble` heads (they differ only in the experts they build).
pub struct Mixture {
    features: Vec<Feature>,
    experts: Vec<Expert>,
    router: Mlp,
}

impl Mixture {
    /// A mixture of `experts` over `features`; the router (variables under `router.`) reads all
    /// features concatenated.
    pub(crate) fn new(
        features: Vec<Feature>,
        experts: Vec<Expert>,
        router_hidden: usize,
        dropout: f32,
        ctx: &HeadContext,
        vb: VarBuilder,
    ) -> Result<Self> {
        let in_dim = features.iter().map(|f| f.dim).sum();
        let router = Mlp::new(
            in_dim,
            router_hidden,
            experts.len(),
            dropout,
            false,
            ctx,
            vb.pp("router"),
        )?;
        Ok(Self {
            features,
            experts,
            router,
        })
    }

    fn features(&self, x: &Inputs) -> Result<Vec<Tensor>> {
        self.features.iter().map(|f| f.forward(x)).collect()
    }

    fn expert_forward(&self, expert: &Expert, feats: &[Tensor], train: bool) -> Result<Tensor> {
        let parts: Vec<Tensor> = expert.features.iter().map(|&i| feats[i].clone()).collect();
        expert.mlp.forward(&concat(&parts)?, train)
    }

    fn router_weights(&self, feats: &[Tensor], train: bool) -> Result<Tensor> {
        let scores = self.router.forward(&concat(feats)?, train)?;
        candle_nn::ops::softmax(&scores, D::Minus1)
    }
}

/// The full variable-name prefix (with a trailing dot) of `vb`.
pub(crate) fn var_prefix(vb: &VarBuilder) -> String {
    format!("{}.", vb.prefix())
}

impl Head for Mixture {
    /// Every expert's logit bias (the mixture's logits are their weighted mean).
    fn logit_biases(&self) -> Vec<Tensor> {
        self.experts
            .iter()
            .filter_map(|e| e.mlp.logit_bias().cloned())
            .collect()
    }

    fn inputs(&self) -> Vec<String> {
        self.features.iter().flat_map(Feature::inputs).collect()
    }

    /// The features (pooled, and concatenated for the router), each expert's input and layers,
    /// the router's layers, the stacked and weighted logits.
    fn activation_values(&self, rows: usize) -> usize {
        let dims: Vec<usize> = self.features.iter().map(|f| f.dim).collect();
        let experts: usize = self
            .experts
            .iter()
            .map(|e| {
                e.features.iter().map(|&i| dims[i]).sum::<usize>()
                    + e.mlp.activation_values_per_row()
            })
            .sum();
        let logits = self
            .experts
            .first()
            .map_or(0, |e| e.mlp.activation_values_per_row());
        let per_row = 2 * dims.iter().sum::<usize>()
            + experts
            + self.router.activation_values_per_row()
            + 2 * self.experts.len() * logits;
        rows * per_row
    }

    fn forward(&self, x: &Inputs, train: bool) -> Result<Tensor> {
        let feats = self.features(x)?;
        let logits = self
            .experts
            .iter()
            .map(|e| self.expert_forward(e, &feats, train))
            .collect::<Result<Vec<_>>>()?;
        let logits = Tensor::stack(&logits, 1)?; // [B, M, K]
        let weights = self.router_weights(&feats, train)?.unsqueeze(D::Minus1)?; // [B, M, 1]
        logits.broadcast_mul(&weights)?.sum(1)
    }

    fn parts(&self) -> Vec<HeadPart> {
        self.experts
            .iter()
            .map(|e| HeadPart {
                name: e.name.clone(),
                var_prefix: e.var_prefix.clone(),
            })
            .collect()
    }

    fn part_forward(&self, part: &str, x: &Inputs, train: bool) -> Result<Tensor> {
        let Some(expert) = self.experts.iter().find(|e| e.name == part) else {
            let names: Vec<&str> = self.experts.iter().map(|e| e.name.as_str()).collect();
            candle_core::bail!("no part `{part}`; parts: {}", names.join(", "));
        };
        let feats = self.features(x)?;
        self.expert_forward(expert, &feats, train)
    }
}

/// The `router` head: one MLP expert per input, mixed by the router.
pub fn build(
    cfg: &RouterConfig,
    cosine: bool,
    ctx: &HeadContext,
    vb: VarBuilder,
) -> anyhow::Result<Mixture> {
    let features = Feature::resolve_all(&inputs_or_pooled(&cfg.inputs, ctx), ctx)?;
    let experts = features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let evb = vb.pp("experts").pp(&f.name);
            Ok(Expert {
                name: f.name.clone(),
                var_prefix: var_prefix(&evb),
                features: vec![i],
                mlp: Mlp::new(
                    f.dim,
                    cfg.hidden,
                    ctx.num_labels,
                    cfg.dropout,
                    cosine,
                    ctx,
                    evb,
                )?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Mixture::new(
        features,
        experts,
        cfg.router_hidden,
        cfg.dropout,
        ctx,
        vb,
    )?)
}
