//! `gat`: graph attention over the LABEL graph producing one classifier vector per label.
//!
//! Nodes are the K labels, each with a learned embedding, or, with `queries=labels`, the fixed
//! embeddings of the label names (a buffer) through a learned projection, as ML-GCN starts from
//! word vectors. Edges come from the training split's
//! label co-occurrence as in ML-GCN (Chen et al. 2019): P(j | i) = n_ij / n_i, binarised at
//! `threshold`, then re-weighted so node i keeps 1 - p for itself and spreads p over its
//! neighbours (a node without neighbours keeps 1). This fixed adjacency A' is a buffer
//! (`buffers.adjacency`) saved with the weights. Each of the `layers` multi-head GAT layers
//! computes attention e_ij = LeakyReLU(a_src . W h_i + a_dst . W h_j) over the graph's edges only,
//! with weights alpha_ij proportional to A'_ij exp(e_ij) (the ML-GCN weights as a prior); heads
//! are concatenated, LeakyReLU between layers. The last layer's node vectors [K, hidden] are the
//! classifiers: logits = proj(x) . c_k + b_k, where proj maps the concatenated sample features
//! to `hidden`.
//!
//! Precision: only `proj`, the product over the batch's samples, runs in `train --precision`. The
//! label graph (the label projection, each layer's `W h` feeding the attention softmax, and the
//! `features x classifiers` logits, the one path of the gradient into the graph) is f32
//! whatever the precision: its rows are the K labels, so it costs the same at any batch size,
//! and bf16 rounding there moved the trained GAT by up to 0.012 test mAP on openclipart, where
//! f32 label-graph products keep it within 0.004 of f32 over 13 seeds (docs/benchmarks.md).
//!
//! Variables: `proj.*`, `label_embed` `[K, hidden]` (or `label_proj.*` from the label-name
//! buffer `buffers.label_embeddings` `[K, D]`), `layers.<l>.{weight,att_src,att_dst,bias}`,
//! `label_bias` `[K]` (absent for a cosine head).

use anyhow::bail;
use candle_core::{D, Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::features::{Feature, concat};
use super::layers::{Linear, add_bias, l2_normalize_smooth, leaky_relu};
use super::mlp::inputs_or_pooled;
use super::products::matmul_nt;
use super::{Head, HeadContext, Inputs, LabelQueries, Queries, buffer};
use crate::tensor_ops::Precision;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatConfig {
    /// Sample features (concatenated); empty = every pooled output of the cache.
    pub inputs: Vec<String>,
    /// Width of the projected sample feature and of the label vectors.
    pub hidden: usize,
    /// Attention heads per GAT layer (must divide `hidden`).
    pub heads: usize,
    pub layers: usize,
    /// Edge i -> j when P(j | i) >= threshold.
    pub threshold: f32,
    /// ML-GCN re-weighting: the share of a node's weight given to its neighbours.
    pub p: f32,
    /// `labels`: the label nodes start from the label-name embeddings (projected).
    #[serde(skip_serializing_if = "Queries::is_random")]
    pub queries: Queries,
}

impl Default for GatConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            hidden: 512,
            heads: 4,
            layers: 2,
            threshold: 0.4,
            p: 0.2,
            queries: Queries::Random,
        }
    }
}

impl GatConfig {
    /// `hidden` at least 1 and a multiple of `heads`, `threshold` and `p` in [0, 1].
    pub fn validate(&self) -> anyhow::Result<()> {
        super::require_divisible("hidden", self.hidden, self.heads)?;
        super::require_probability("threshold", self.threshold, false)?;
        super::require_probability("p", self.p, false)
    }
}

/// Label co-occurrence counts of a training split: `counts[i][j]` = samples holding both labels
/// i and j; `counts[i][i]` = samples holding label i.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelCooccurrence {
    pub counts: Vec<Vec<f64>>,
}

impl LabelCooccurrence {
    /// Counts from each sample's label indices (each `< num_labels`; duplicates ignored).
    pub fn from_label_sets<'a>(
        sets: impl IntoIterator<Item = &'a [usize]>,
        num_labels: usize,
    ) -> anyhow::Result<Self> {
        let mut counts = vec![vec![0.0; num_labels]; num_labels];
        for (row, set) in sets.into_iter().enumerate() {
            let mut labels = set.to_vec();
            labels.sort_unstable();
            labels.dedup();
            if let Some(&bad) = labels.iter().find(|&&l| l >= num_labels) {
                bail!("sample {row} has label index {bad}, but there are {num_labels} labels");
            }
            for &i in &labels {
                for &j in &labels {
                    counts[i][j] += 1.0;
                }
            }
        }
        Ok(Self { counts })
    }

    /// Samples carrying each label (the diagonal of the counts).
    pub fn label_counts(&self) -> Vec<usize> {
        (0..self.counts.len())
            .map(|k| self.counts[k][k] as usize)
            .collect()
    }

    /// P(j | i) `[K][K]`: the share of samples with label i that also have label j (0 for a
    /// label without samples).
    pub fn conditional(&self) -> Vec<Vec<f64>> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n_i = row[i];
                row.iter()
                    .map(|&c| if n_i > 0.0 { c / n_i } else { 0.0 })
                    .collect()
            })
            .collect()
    }

    /// The ML-GCN adjacency `[K, K]` row-major: binarised P(j | i) >= `threshold`, neighbours
    /// sharing `p`, the node itself keeping 1 - p (1 without neighbours).
    pub fn adjacency(&self, threshold: f32, p: f32) -> Vec<f32> {
        let k = self.counts.len();
        let mut adj = vec![0f32; k * k];
        for (i, row) in self.conditional().iter().enumerate() {
            let seen = self.counts[i][i] > 0.0;
            let neighbours: Vec<usize> = (0..k)
                .filter(|&j| j != i && seen && row[j] >= f64::from(threshold))
                .collect();
            if neighbours.is_empty() {
                adj[i * k + i] = 1.0;
                continue;
            }
            adj[i * k + i] = 1.0 - p;
            for &j in &neighbours {
                adj[i * k + j] = p / neighbours.len() as f32;
            }
        }
        adj
    }
}

/// One multi-head graph attention layer.
struct GatLayer {
    weight: Linear,
    att_src: Tensor, // [H, 1, dh]
    att_dst: Tensor, // [H, 1, dh]
    bias: Tensor,    // [hidden]
    heads: usize,
}

impl GatLayer {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let dh = dim / heads;
        let att_init = Init::Randn {
            mean: 0.0,
            stdev: (1.0 / dh as f64).sqrt(),
        };
        Ok(Self {
            weight: Linear::without_bias(dim, dim, LABEL_GRAPH, vb.clone())?,
            att_src: vb.get_with_hints((heads, 1, dh), "att_src", att_init)?,
            att_dst: vb.get_with_hints((heads, 1, dh), "att_dst", att_init)?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::init::ZERO)?,
            heads,
        })
    }

    /// Node features `[K, dim]` -> `[K, dim]`; `log_adj` `[K, K]` is log A' (very negative off
    /// the graph).
    fn forward(&self, nodes: &Tensor, log_adj: &Tensor) -> Result<Tensor> {
        let (k, dim) = nodes.dims2()?;
        let wh = self
            .weight
            .forward(nodes)?
            .reshape((k, self.heads, dim / self.heads))?
            .transpose(0, 1)?
            .contiguous()?; // [H, K, dh]
        let src = wh.broadcast_mul(&self.att_src)?.sum_keepdim(D::Minus1)?; // [H, K, 1]
        let dst = wh
            .broadcast_mul(&self.att_dst)?
            .sum(D::Minus1)?
            .unsqueeze(1)?; // [H, 1, K]
        let scores = leaky_relu(&src.broadcast_add(&dst)?, 0.2)?.broadcast_add(log_adj)?;
        let alpha = candle_nn::ops::softmax(&scores, D::Minus1)?; // [H, K, K]
        let nodes_out = alpha
            .matmul(&wh)? // [H, K, dh]
            .transpose(0, 1)?
            .reshape((k, dim))?;
        add_bias(&nodes_out, &self.bias)
    }
}

/// The label nodes' input features.
enum LabelNodes {
    /// A learned `[K, hidden]` embedding.
    Learned(Tensor),
    /// Fixed label-name embeddings `[K, D]` (a buffer) through a learned projection.
    Named(LabelQueries),
}

pub struct GatHead {
    features: Vec<Feature>,
    proj: Linear,
    label_nodes: LabelNodes,
    layers: Vec<GatLayer>,
    adjacency_name: String,
    adjacency: Tensor,
    log_adjacency: Tensor,
    label_bias: Option<Tensor>,
}

/// The precision of every label-graph product (the module docs say why).
const LABEL_GRAPH: Precision = Precision::F32;

/// log A' with a large negative value where there is no edge.
fn log_adjacency(adj: &Tensor) -> Result<Tensor> {
    let edge = adj.gt(0f32)?;
    let log = adj.clamp(1e-30f32, f32::INFINITY)?.log()?;
    edge.where_cond(&log, &Tensor::full(-1e9f32, adj.shape(), adj.device())?)
}

impl GatHead {
    pub fn new(
        cfg: &GatConfig,
        cosine: bool,
        ctx: &HeadContext,
        vb: VarBuilder,
    ) -> anyhow::Result<Self> {
        let k = ctx.num_labels;
        let features = Feature::resolve_all(&inputs_or_pooled(&cfg.inputs, ctx), ctx)?;
        let (adjacency_name, adjacency) = buffer(&vb, "adjacency", (k, k), || {
            let Some(cooc) = &ctx.label_cooccurrence else {
                bail!("gat needs the training split's label co-occurrence to build its graph");
            };
            if cooc.counts.len() != k {
                bail!(
                    "label co-occurrence is {0}x{0}, but there are {k} labels",
                    cooc.counts.len()
                );
            }
            Ok(Tensor::from_vec(
                cooc.adjacency(cfg.threshold, cfg.p),
                (k, k),
                vb.device(),
            )?)
        })?;
        let in_dim = features.iter().map(|f| f.dim).sum();
        let layers = (0..cfg.layers)
            .map(|l| GatLayer::new(cfg.hidden, cfg.heads, vb.pp("layers").pp(l)))
            .collect::<Result<Vec<_>>>()?;
        let label_bias = if cosine {
            None
        } else {
            Some(vb.get_with_hints(k, "label_bias", candle_nn::init::ZERO)?)
        };
        let label_nodes = match cfg.queries {
            Queries::Random => LabelNodes::Learned(vb.get_with_hints(
                (k, cfg.hidden),
                "label_embed",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?),
            Queries::Labels => LabelNodes::Named(LabelQueries::new(
                "gat",
                ctx,
                &vb,
                "label_embeddings",
                "label_proj",
                cfg.hidden,
                LABEL_GRAPH,
            )?),
        };
        Ok(Self {
            proj: Linear::new(in_dim, cfg.hidden, ctx.precision, vb.pp("proj"))?,
            label_nodes,
            layers,
            log_adjacency: log_adjacency(&adjacency)?,
            adjacency_name,
            adjacency,
            label_bias,
            features,
        })
    }

    /// The per-label classifier vectors `[K, hidden]`.
    pub fn label_classifiers(&self) -> Result<Tensor> {
        let mut nodes = match &self.label_nodes {
            LabelNodes::Learned(embed) => embed.clone(),
            LabelNodes::Named(queries) => queries.projected()?,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            if l > 0 {
                nodes = leaky_relu(&nodes, 0.2)?;
            }
            nodes = layer.forward(&nodes, &self.log_adjacency)?;
        }
        Ok(nodes)
    }
}

impl Head for GatHead {
    fn logit_biases(&self) -> Vec<Tensor> {
        self.label_bias.iter().cloned().collect()
    }

    fn inputs(&self) -> Vec<String> {
        self.features.iter().flat_map(Feature::inputs).collect()
    }

    /// Per sample: the features, the projection and the logits; per batch: each GAT layer's
    /// node features and attention over the label graph.
    fn activation_values(&self, rows: usize) -> usize {
        let k = self.adjacency.dims().first().copied().unwrap_or(0);
        let hidden = self.proj.out_dim();
        let in_dim: usize = self.features.iter().map(|f| f.dim).sum();
        let graph: usize = self
            .layers
            .iter()
            .map(|l| 4 * k * hidden + 3 * l.heads * k * k)
            .sum();
        rows * (2 * in_dim + hidden + 2 * k) + graph
    }

    fn forward(&self, x: &Inputs, _train: bool) -> Result<Tensor> {
        let parts = self
            .features
            .iter()
            .map(|f| f.forward(x))
            .collect::<Result<Vec<_>>>()?;
        let sample = self.proj.forward(&concat(&parts)?)?;
        let classifiers = self.label_classifiers()?;
        match &self.label_bias {
            Some(bias) => add_bias(&matmul_nt(&sample, &classifiers, LABEL_GRAPH)?, bias),
            None => matmul_nt(
                &l2_normalize_smooth(&sample)?,
                &l2_normalize_smooth(&classifiers)?,
                LABEL_GRAPH,
            )?
            .clamp(-1f32, 1f32),
        }
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut buffers = vec![(self.adjacency_name.clone(), self.adjacency.clone())];
        if let LabelNodes::Named(queries) = &self.label_nodes {
            buffers.push((queries.buffer_name.clone(), queries.embeddings.clone()));
        }
        buffers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacency_follows_ml_gcn() -> anyhow::Result<()> {
        // Label 0 in 4 samples, 1 in 2 (always with 0), 2 alone once, 3 never.
        let sets: [&[usize]; 5] = [&[0, 1], &[0, 1], &[0], &[0], &[2]];
        let cooc = LabelCooccurrence::from_label_sets(sets, 4)?;
        assert_eq!(cooc.counts[0][0], 4.0);
        assert_eq!(cooc.counts[0][1], 2.0);
        let adj = cooc.adjacency(0.4, 0.2);
        // P(1|0) = 0.5 >= 0.4: 0 keeps 0.8 and gives 0.2 to 1; P(0|1) = 1: same for 1.
        assert_eq!(&adj[0..4], &[0.8, 0.2, 0.0, 0.0]);
        assert_eq!(&adj[4..8], &[0.2, 0.8, 0.0, 0.0]);
        // No neighbours (2) or never seen (3): self-loop of weight 1.
        assert_eq!(&adj[8..12], &[0.0, 0.0, 1.0, 0.0]);
        assert_eq!(&adj[12..16], &[0.0, 0.0, 0.0, 1.0]);
        // A higher threshold cuts the 0 -> 1 edge (0.5) but keeps 1 -> 0 (1.0).
        let adj = cooc.adjacency(0.6, 0.2);
        assert_eq!(&adj[0..2], &[1.0, 0.0]);
        assert_eq!(&adj[4..6], &[0.2, 0.8]);
        assert!(LabelCooccurrence::from_label_sets([&[5usize][..]], 4).is_err());
        Ok(())
    }

    #[test]
    fn attention_stays_on_graph_edges() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let map = candle_nn::VarMap::new();
        let vb = crate::heads::init::seeded_var_builder(&map, 2, &dev);
        let layer = GatLayer::new(8, 2, vb)?;
        // Two components: {0, 1} and {2}; node 2's output depends on node 2 only.
        let adj = Tensor::new(
            &[[0.8f32, 0.2, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]],
            &dev,
        )?;
        let log_adj = log_adjacency(&adj)?;
        let nodes = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let out = layer.forward(&nodes, &log_adj)?;
        let moved = Tensor::cat(
            &[
                nodes.narrow(0, 0, 2)?.affine(3.0, 1.0)?,
                nodes.narrow(0, 2, 1)?,
            ],
            0,
        )?;
        let out2 = layer.forward(&moved, &log_adj)?;
        let diff = (out.get(2)? - out2.get(2)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
