//! A trained model on its own: a head with the loss it was trained with (or an ensemble of such
//! checkpoints, their probabilities averaged), its label vocabulary, tuned thresholds and the
//! signature of the inputs it reads, loaded from a checkpoint alone (no cache needed). It scores
//! any [`Inputs`]: a cache batch today, live backbone outputs tomorrow; whether a given cache can
//! feed it is a separate check ([`Model::ensure_compatible`]).
//!
//! Modules: [`checkpoint`] (the checkpoint's files and reading them), [`ensemble`] (ensemble
//! checkpoints), [`signature`] (what the model reads, and the cache check), [`score`] (scoring
//! cache rows in batches).

pub mod checkpoint;
pub mod ensemble;
pub mod score;
pub mod signature;

use crate::cache::CacheReader;
use crate::heads::{self, Head, HeadConfig, Inputs};
use crate::labelled::Targets;
use crate::loss::Loss;
use crate::metrics;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use score::Scores;
pub use signature::{InputSignature, OutputSignature};

/// What a checkpoint's sidecar says about its model: everything needed to rebuild and use the
/// head. The training record (`train::checkpoint::CheckpointMeta`) holds it flattened, so these
/// are top-level fields of `NAME.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub format_version: u32,
    /// The checkpoint's name (file stem).
    pub name: String,
    pub head: HeadConfig,
    pub loss: Loss,
    /// Label names in vocabulary order (logit k is label k).
    pub labels: Vec<String>,
    /// Per-label decision thresholds on probabilities, tuned on validation.
    pub thresholds: Vec<f32>,
    /// The features the head reads (written as `cache` before multiclip 0.1 tidied its names).
    #[serde(alias = "cache")]
    pub inputs: InputSignature,
    /// Seed of the run (dropout streams; fixed buffers are read from the weights).
    pub seed: u64,
}

impl ModelCard {
    /// Checks what the card says on its own: at least one label and each once, one threshold
    /// per label, each a probability in [0, 1], the loss's and the head's parameters in range, and
    /// a head whose outputs (cosines or logits) are those its loss trains on.
    pub fn validate(&self) -> Result<()> {
        let k = self.labels.len();
        if k == 0 {
            bail!("the model card lists no labels");
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(label) = self.labels.iter().find(|l| !seen.insert(l.as_str())) {
            bail!("label `{label}` is listed twice in the model card");
        }
        if self.thresholds.len() != k {
            bail!(
                "the model card has {} thresholds for {k} labels: one per label is needed",
                self.thresholds.len()
            );
        }
        if let Some((j, t)) = self
            .thresholds
            .iter()
            .enumerate()
            .find(|(_, t)| !(0.0..=1.0).contains(*t))
        {
            bail!(
                "the threshold of label `{}` is {t}: thresholds are probabilities in [0, 1]",
                self.labels[j]
            );
        }
        self.loss.validate()?;
        self.head.validate()?;
        if self.head.cosine != self.loss.needs_cosine_logits() {
            bail!(
                "the head has cosine={} but the loss is `{}`: cosine outputs go with the \
                 `angular` loss, and only with it",
                self.head.cosine,
                self.loss.kind()
            );
        }
        Ok(())
    }
}

/// The model card as a sidecar holds it: with its seal.
#[derive(Deserialize)]
struct SealedCard {
    #[serde(flatten)]
    card: ModelCard,
    seal: checkpoint::Seal,
}

/// What using a model needs, the same for one head and for an ensemble: its name, label
/// vocabulary, thresholds and inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Card {
    /// The checkpoint's name (file stem).
    pub name: String,
    /// Label names in vocabulary order (probability column k is label k).
    pub labels: Vec<String>,
    /// Per-label decision thresholds on probabilities.
    pub thresholds: Vec<f32>,
    /// The features the model reads.
    pub inputs: InputSignature,
}

impl Card {
    /// The part of a head's model card that using it needs.
    pub fn of(card: &ModelCard) -> Self {
        Self {
            name: card.name.clone(),
            labels: card.labels.clone(),
            thresholds: card.thresholds.clone(),
            inputs: card.inputs.clone(),
        }
    }
}

/// A checkpoint's model, rebuilt from the checkpoint alone: one head, or an ensemble whose
/// `head` averages its members' probabilities ([`ensemble::EnsembleHead`], with `loss` BCE).
pub struct Model {
    pub card: Card,
    pub head: Box<dyn Head>,
    /// Turns the head's outputs into probabilities (the loss the head was trained with).
    pub loss: Loss,
}

impl Model {
    /// Loads the checkpoint at `path` (`NAME`, `NAME.json` or `NAME.safetensors`) onto `device`,
    /// after checking its card ([`ModelCard::validate`]), its seal (the weights and the card
    /// are the ones written together) and every tensor against the head the card describes.
    /// An ensemble's sidecar loads its members ([`ensemble::load`]).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if ensemble::is_ensemble(path)? {
            return ensemble::load(path, device);
        }
        let SealedCard { card, seal } = checkpoint::read_sidecar(path)?;
        let (weights_path, sidecar_path) = checkpoint::resolve(path);
        card.validate()
            .with_context(|| format!("checkpoint {}", sidecar_path.display()))?;
        let weights = checkpoint::read_weights(path)?;
        seal.check(&card, &weights, path)?;
        checkpoint::check_tensors(&card, &weights, path)?;
        let tensors = candle_core::safetensors::load_buffer(&weights, device)
            .with_context(|| format!("reading checkpoint weights {}", weights_path.display()))?;
        let ctx = card.inputs.head_context(card.labels.len(), card.seed);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let head = heads::build(&card.head, &ctx, vb)
            .with_context(|| format!("rebuilding the head of checkpoint {}", card.name))?;
        Ok(Self {
            card: Card::of(&card),
            head,
            loss: card.loss,
        })
    }

    /// Fails naming both sides when `reader`'s cache cannot feed this model: another backbone,
    /// other weights or preprocessing, or one of the model's inputs missing or with another
    /// per-row shape or dtype.
    pub fn ensure_compatible(&self, reader: &CacheReader) -> Result<()> {
        self.card
            .inputs
            .ensure_compatible(reader)
            .with_context(|| format!("checkpoint {}", self.card.name))
    }

    /// Probabilities `[B, K]` on a batch of inputs (any size: the head runs in micro-batches).
    pub fn probabilities(&self, x: &Inputs) -> Result<Tensor> {
        score::probabilities(self.head.as_ref(), &self.loss, x)
    }

    /// The labels chosen for `probabilities` (`[rows, K]` row-major) at the tuned thresholds;
    /// with `at_least_one`, every row gets at least its label closest to its threshold.
    pub fn decisions(&self, probabilities: &[f32], at_least_one: bool) -> Vec<bool> {
        metrics::apply_thresholds_flat(probabilities, &self.card.thresholds, at_least_one)
    }

    /// Probabilities on `rows` of `reader`'s cache (with the mean loss when `targets` are given),
    /// after checking that the cache can feed the model.
    pub fn score_rows(
        &self,
        reader: &CacheReader,
        rows: &[usize],
        batch_size: usize,
        device: &Device,
        targets: Option<&Targets>,
    ) -> Result<Scores> {
        self.ensure_compatible(reader)?;
        score::score_rows(
            self.head.as_ref(),
            &self.loss,
            reader,
            rows,
            batch_size,
            device,
            targets,
        )
    }
}
