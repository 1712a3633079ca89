//! Ensemble checkpoints: a sidecar `NAME.json` (no weights file of its own) that lists member
//! checkpoints, each a full checkpoint in the same folder and loadable alone (`NAME.fold-1-of-5`,
//! or the runs of a sweep), with the sha256 of their two files; the label vocabulary, the
//! thresholds tuned for the ensemble, and the inputs all members read together.
//!
//! The ensemble's probability of a label is the mean of its members' probabilities. As a
//! [`Head`] ([`EnsembleHead`]) it outputs the log-odds of that mean, computed from the members'
//! logits without going through a rounded probability, so that with the BCE loss the model is
//! used like any other: `Model::load` recognises the sidecar and every consumer (evaluate,
//! predict, serve) works unchanged. The training record around this card (how it was made, its
//! metrics) is written by `train::ensemble`.

use super::checkpoint::{read_sidecar, resolve};
use super::{Card, InputSignature, Model};
use crate::files::sha256_file;
use crate::heads::{Head, Inputs};
use crate::loss::Loss;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the members' outputs are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The mean of the members' probabilities.
    MeanProbability,
}

/// One member: a checkpoint in the ensemble's folder and the sha256 of its files when the
/// ensemble was made (a member changed since is refused on load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRef {
    /// The member's checkpoint name (file stem), in the ensemble's folder.
    pub checkpoint: String,
    pub sidecar_sha256: String,
    pub weights_sha256: String,
}

impl MemberRef {
    /// The reference to the checkpoint at `path` (`NAME`, `NAME.json` or `NAME.safetensors`),
    /// its files hashed now.
    pub fn of(path: &Path) -> Result<Self> {
        let (weights, sidecar) = resolve(path);
        let checkpoint = weights
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("checkpoint path {} has no name", path.display()))?;
        Ok(Self {
            checkpoint,
            sidecar_sha256: sha256_file(&sidecar)?,
            weights_sha256: sha256_file(&weights)?,
        })
    }
}

/// What an ensemble's sidecar says about its model (the training record flattens it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleCard {
    pub format_version: u32,
    /// The ensemble's name (file stem of its sidecar).
    pub name: String,
    pub combine: Combine,
    pub members: Vec<MemberRef>,
    /// Label names in vocabulary order, the same for every member.
    pub labels: Vec<String>,
    /// Per-label thresholds on the ensemble's probabilities.
    pub thresholds: Vec<f32>,
    /// Every input some member reads (one backbone).
    pub inputs: InputSignature,
}

/// Whether the sidecar of the checkpoint at `path` is an ensemble's (it lists `members`).
pub fn is_ensemble(path: &Path) -> Result<bool> {
    #[derive(Deserialize)]
    struct Probe {
        members: Option<IgnoredAny>,
    }
    Ok(read_sidecar::<Probe>(path)?.members.is_some())
}

/// The inputs of several members together: one backbone (id, weights, preprocessing), each
/// output once with one shape and dtype.
pub fn combined_inputs<'a>(
    members: impl IntoIterator<Item = (&'a str, &'a InputSignature)>,
) -> Result<InputSignature> {
    let mut combined: Option<InputSignature> = None;
    for (name, inputs) in members {
        let Some(all) = combined.as_mut() else {
            combined = Some(inputs.clone());
            continue;
        };
        if all.backbone != inputs.backbone {
            bail!(
                "member {name} reads backbone `{}` (or other weights or preprocessing) where the \
                 others read `{}`: an ensemble's members share one backbone",
                inputs.backbone.id,
                all.backbone.id
            );
        }
        for output in &inputs.outputs {
            match all.outputs.iter().find(|o| o.name == output.name) {
                Some(known) if known != output => bail!(
                    "member {name} reads `{}` as {:?} {:?}, another member as {:?} {:?}",
                    output.name,
                    output.shape,
                    output.dtype,
                    known.shape,
                    known.dtype
                ),
                Some(_) => {}
                None => all.outputs.push(output.clone()),
            }
        }
    }
    combined.context("an ensemble needs at least one member")
}

/// Loads the ensemble whose sidecar is at `path`, and its members from the same folder; refuses
/// a member whose files changed since the ensemble was made.
pub fn load(path: &Path, device: &Device) -> Result<Model> {
    let card: EnsembleCard = read_sidecar(path)?;
    let (_, sidecar) = resolve(path);
    let dir = sidecar.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut members = Vec::with_capacity(card.members.len());
    for member in &card.members {
        let member_path = dir.join(&member.checkpoint);
        check_unchanged(&card.name, member, &member_path)?;
        let model = Model::load(&member_path, device)
            .with_context(|| format!("member {} of ensemble {}", member.checkpoint, card.name))?;
        if model.card.labels != card.labels {
            bail!(
                "member {} of ensemble {} has another label vocabulary than the ensemble",
                member.checkpoint,
                card.name
            );
        }
        members.push(model);
    }
    if members.is_empty() {
        bail!("ensemble {} lists no members", card.name);
    }
    combined_inputs(
        members
            .iter()
            .map(|m| (m.card.name.as_str(), &m.card.inputs)),
    )
    .with_context(|| format!("ensemble {}", card.name))?;
    Ok(Model {
        card: Card {
            name: card.name,
            labels: card.labels,
            thresholds: card.thresholds,
            inputs: card.inputs,
        },
        head: Box::new(EnsembleHead { members }),
        loss: Loss::Bce,
    })
}

fn check_unchanged(ensemble: &str, member: &MemberRef, path: &Path) -> Result<()> {
    let (weights, sidecar) = resolve(path);
    for (file, want) in [
        (&sidecar, &member.sidecar_sha256),
        (&weights, &member.weights_sha256),
    ] {
        let have = sha256_file(file)
            .with_context(|| format!("member {} of ensemble {ensemble}", member.checkpoint))?;
        if &have != want {
            bail!(
                "{} changed since ensemble {ensemble} was made (sha256 {} where the ensemble \
                 recorded {}): retrain the ensemble, or restore the member",
                file.display(),
                &have[..12],
                &want[..want.len().min(12)]
            );
        }
    }
    Ok(())
}

/// The members' paths of the ensemble at `path`, in order.
pub fn member_paths(path: &Path) -> Result<Vec<PathBuf>> {
    let card: EnsembleCard = read_sidecar(path)?;
    let (_, sidecar) = resolve(path);
    let dir = sidecar.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(card
        .members
        .iter()
        .map(|m| dir.join(&m.checkpoint))
        .collect())
}

/// The members of an ensemble as one head: log-odds of the mean of their probabilities.
pub struct EnsembleHead {
    members: Vec<Model>,
}

impl EnsembleHead {
    pub fn new(members: Vec<Model>) -> Self {
        Self { members }
    }

    pub fn members(&self) -> &[Model] {
        &self.members
    }

    /// `log(sum_i sigmoid(z_i)) - log(sum_i sigmoid(-z_i))` over the members' inference logits
    /// `z_i`: the log-odds of the mean probability, exact also where a probability rounds to 1.
    fn combine(
        &self,
        output: impl Fn(&Model) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut positive: Option<Tensor> = None;
        let mut negative: Option<Tensor> = None;
        for member in &self.members {
            let z = member.loss.inference_logits(&output(member)?)?;
            let (p, q) = (
                candle_nn::ops::sigmoid(&z)?,
                candle_nn::ops::sigmoid(&z.neg()?)?,
            );
            positive = Some(match positive {
                Some(sum) => (sum + p)?,
                None => p,
            });
            negative = Some(match negative {
                Some(sum) => (sum + q)?,
                None => q,
            });
        }
        match (positive, negative) {
            // Clamped where a sum underflows (|log-odds| > 80: probabilities below 2e-35 of 1).
            (Some(p), Some(q)) => (p.log()? - q.log()?)?.clamp(-80f32, 80f32),
            _ => candle_core::bail!("an ensemble without members"),
        }
    }
}

impl Head for EnsembleHead {
    fn inputs(&self) -> Vec<String> {
        let mut names: Vec<String> = self.members.iter().flat_map(|m| m.head.inputs()).collect();
        names.sort();
        names.dedup();
        names
    }

    fn activation_values(&self, rows: usize) -> usize {
        self.members
            .iter()
            .map(|m| m.head.activation_values(rows))
            .sum()
    }

    /// Members are never trained through the ensemble: `train` is ignored.
    fn forward(&self, x: &Inputs, _train: bool) -> candle_core::Result<Tensor> {
        self.combine(|m| m.head.forward(x, false))
    }

    fn predict(&self, x: &Inputs) -> candle_core::Result<Tensor> {
        self.combine(|m| m.head.predict(x))
    }
}
