//! `mlp`: Linear -> ReLU -> Linear on one pooled feature or several concatenated (the
//! original's "naive" BLIP head), or a linear probe with `hidden = 0`. A cosine probe with
//! `queries=labels` starts its class weights at the label-name embeddings: before any training
//! it scores each label by the cosine of the feature and the label's embedding (CLIP-style
//! zero-shot classification).
//!
//! Variables: `hidden.{weight,bias}` (absent for a probe), `out.{weight,bias}`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::features::{Feature, concat, pooled_inputs};
use super::init::start_variable_at;
use super::layers::Mlp;
use super::{Head, HeadContext, Inputs, Queries, label_embeddings};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpConfig {
    /// Cache outputs to concatenate (token sequences are mean-pooled over real tokens);
    /// empty = every pooled output of the cache.
    pub inputs: Vec<String>,
    /// Hidden width; 0 makes a linear probe.
    pub hidden: usize,
    pub dropout: f32,
    /// `labels`: the class weights start at the label-name embeddings (a cosine probe whose
    /// inputs live in the embeddings' space, e.g. CLIP's image and text).
    #[serde(skip_serializing_if = "Queries::is_random")]
    pub queries: Queries,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            hidden: 768,
            dropout: 0.0,
            queries: Queries::Random,
        }
    }
}

impl MlpConfig {
    /// `dropout` in [0, 1) (`hidden` 0 is a linear probe).
    pub fn validate(&self) -> anyhow::Result<()> {
        super::require_dropout(self.dropout)
    }
}

/// Inputs of a head config: the listed ones, or every pooled output of the cache.
pub(crate) fn inputs_or_pooled(listed: &[String], ctx: &HeadContext) -> Vec<String> {
    if listed.is_empty() {
        pooled_inputs(ctx)
    } else {
        listed.to_vec()
    }
}

pub struct MlpHead {
    features: Vec<Feature>,
    mlp: Mlp,
}

impl MlpHead {
    pub fn new(
        cfg: &MlpConfig,
        cosine: bool,
        ctx: &HeadContext,
        vb: VarBuilder,
    ) -> anyhow::Result<Self> {
        let features = Feature::resolve_all(&inputs_or_pooled(&cfg.inputs, ctx), ctx)?;
        let in_dim = features.iter().map(|f| f.dim).sum();
        let mlp = Mlp::new(
            in_dim,
            cfg.hidden,
            ctx.num_labels,
            cfg.dropout,
            cosine,
            ctx,
            vb,
        )?;
        if cfg.queries == Queries::Labels {
            let Some(weight) = mlp.probe_cosine_weight() else {
                anyhow::bail!(
                    "mlp: queries=labels starts the class weights of a cosine linear probe at the \
                     label embeddings: use hidden=0 with --loss angular (or cosine=true)"
                );
            };
            // A checkpoint holds the trained weights; only a head being trained starts them.
            if weight.is_variable() {
                let embeddings = label_embeddings(ctx, "mlp")?;
                let width = embeddings.dim(1)?;
                if width != in_dim {
                    anyhow::bail!(
                        "mlp: the label embeddings are {width} wide but the inputs ({}) are \
                         {in_dim}: choose inputs in the space of the label embeddings",
                        features
                            .iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join("+")
                    );
                }
                start_variable_at(weight, embeddings)?;
            }
        }
        Ok(Self { features, mlp })
    }
}

impl Head for MlpHead {
    fn logit_biases(&self) -> Vec<Tensor> {
        self.mlp.logit_bias().into_iter().cloned().collect()
    }

    fn inputs(&self) -> Vec<String> {
        self.features.iter().flat_map(Feature::inputs).collect()
    }

    /// The features (pooled, then concatenated) and the MLP's layers.
    fn activation_values(&self, rows: usize) -> usize {
        let in_dim: usize = self.features.iter().map(|f| f.dim).sum();
        rows * (2 * in_dim + self.mlp.activation_values_per_row())
    }

    fn forward(&self, x: &Inputs, train: bool) -> Result<Tensor> {
        let parts = self
            .features
            .iter()
            .map(|f| f.forward(x))
            .collect::<Result<Vec<_>>>()?;
        self.mlp.forward(&concat(&parts)?, train)
    }
}
