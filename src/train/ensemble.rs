//! Writing ensemble checkpoints: the members of `train --folds`, or the best runs of a sweep
//! averaged. The sidecar is the card of [`crate::model::ensemble`] (what loading needs) flattened
//! into the record of how the ensemble was made: cache, data and split, what its thresholds were
//! tuned on and the metrics there, each member's own run, and the size of all members together.

use super::budget::HeadSize;
use super::checkpoint::{CheckpointMeta, SplitRef, reserve_name};
use super::folds::FoldRef;
use super::history::EpochRecord;
use super::{Validation, measure};
use crate::cache::CacheReader;
use crate::data::labels::LabelVocab;
use crate::data::split::Split;
use crate::files::write_atomic;
use crate::heads::{HeadConfig, LabelCooccurrence};
use crate::labelled::{Targets, labelled_records, rows_for_ids};
use crate::loss::Loss;
use crate::metrics::Metrics;
use crate::model::checkpoint::{FORMAT_VERSION, checkpoint_files, read_sidecar};
use crate::model::ensemble::{
    Combine, EnsembleCard, EnsembleHead, MemberRef, combined_inputs, is_ensemble,
};
use crate::model::{Card, Model};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the ensemble's thresholds were tuned on (and its `metrics` measured on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TunedOn {
    /// Every folded row, scored by the member that did not train on it.
    OutOfFold,
    /// The split's validation rows, scored by the ensemble.
    Validation,
}

/// One member's own run, as its checkpoint records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRun {
    pub name: String,
    pub head: HeadConfig,
    pub loss: Loss,
    pub lr: f64,
    /// Rows it was validated on (its fold, or the split's validation rows).
    pub val_rows: usize,
    pub best_epoch: usize,
    /// Its validation metrics at its own tuned thresholds.
    pub metrics: Metrics,
    pub val_loss: f64,
    pub size: HeadSize,
    pub history: Vec<EpochRecord>,
}

impl MemberRun {
    pub fn of(meta: &CheckpointMeta) -> Self {
        Self {
            name: meta.model.name.clone(),
            head: meta.model.head.clone(),
            loss: meta.model.loss,
            lr: meta.training.lr,
            val_rows: meta.metrics.rows,
            best_epoch: meta.best_epoch,
            metrics: meta.metrics.clone(),
            val_loss: meta.val_loss,
            size: meta.size,
            history: meta.history.clone(),
        }
    }
}

/// Validation rows never trained on, scored by the ensemble at its tuned thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    pub metrics: Metrics,
    pub loss: f64,
}

/// The sidecar of an ensemble checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnsembleMeta {
    #[serde(flatten)]
    pub card: EnsembleCard,
    pub cache_dir: PathBuf,
    pub data_dir: PathBuf,
    pub split: SplitRef,
    /// The folds of a k-fold ensemble.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<FoldRef>,
    /// The image ids of each fold (member `i` was validated on fold `i`), in csv order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fold_ids: Vec<Vec<String>>,
    pub tuned_on: TunedOn,
    /// Metrics where the thresholds were tuned (the rows of `tuned_on`), with the BCE of the
    /// probabilities there.
    pub metrics: Metrics,
    pub val_loss: f64,
    /// The split's validation rows when no member trained on them (`--fold-rows train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<HeldOut>,
    pub member_runs: Vec<MemberRun>,
    /// All members together.
    pub size: HeadSize,
    pub written_by: String,
}

/// An ensemble as it was made: its sidecar, and what its report shows.
pub struct EnsembleReport {
    pub checkpoint: PathBuf,
    pub meta: EnsembleMeta,
    /// The rows the report shows (out-of-fold rows, or validation rows) and their image ids.
    pub shown: Validation,
    pub shown_ids: Vec<String>,
    /// What the shown rows are: `out-of-fold`, or `val` (the split's validation rows).
    pub shown_part: String,
    /// Label co-occurrence of the rows the members trained on.
    pub label_cooccurrence: LabelCooccurrence,
}

/// Removes a reserved sidecar whose ensemble was not made.
pub fn release(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(checkpoint_files(dir, name).1);
}

/// Writes the sidecar of `meta` (named `meta.card.name`, reserved in `dir`) atomically.
pub fn save(dir: &Path, meta: &EnsembleMeta) -> Result<PathBuf> {
    let (_, sidecar) = checkpoint_files(dir, &meta.card.name);
    let json = serde_json::to_string_pretty(meta)? + "\n";
    write_atomic(&sidecar, json.as_bytes())?;
    Ok(sidecar)
}

/// The card of an ensemble of `members` (checkpoints in `dir`, already written).
pub fn card(
    name: &str,
    dir: &Path,
    members: &[CheckpointMeta],
    thresholds: Vec<f32>,
) -> Result<EnsembleCard> {
    let labels = members
        .first()
        .map(|m| m.model.labels.clone())
        .context("an ensemble needs at least one member")?;
    if let Some(other) = members.iter().find(|m| m.model.labels != labels) {
        bail!(
            "member {} has another label vocabulary than {}",
            other.model.name,
            members[0].model.name
        );
    }
    Ok(EnsembleCard {
        format_version: FORMAT_VERSION,
        name: name.to_string(),
        combine: Combine::MeanProbability,
        members: members
            .iter()
            .map(|m| MemberRef::of(&dir.join(&m.model.name)))
            .collect::<Result<_>>()?,
        labels,
        thresholds,
        inputs: combined_inputs(
            members
                .iter()
                .map(|m| (m.model.name.as_str(), &m.model.inputs)),
        )?,
    })
}

/// Averages single-head checkpoints (the best runs of a sweep, all trained on one split) into an
/// ensemble called `name` (`name-v2`, ... when taken) in the folder of the first: thresholds
/// tuned on the split's validation rows, scored by the ensemble.
pub fn average(members: &[PathBuf], name: &str, device: &Device) -> Result<EnsembleReport> {
    let mut metas = Vec::with_capacity(members.len());
    for path in members {
        if is_ensemble(path)? {
            bail!(
                "{} is an ensemble: only single-head checkpoints are averaged",
                path.display()
            );
        }
        metas.push(read_sidecar::<CheckpointMeta>(path)?);
    }
    let first = metas.first().context("no checkpoints to average")?;
    if let Some(other) = metas.iter().find(|m| m.split.sha256 != first.split.sha256) {
        bail!(
            "{} was trained on another split than {}: average runs of one split",
            other.model.name,
            first.model.name
        );
    }
    let dir = members[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let models = members
        .iter()
        .map(|p| Model::load(p, device))
        .collect::<Result<Vec<_>>>()?;
    let reader = CacheReader::open(&first.cache_dir)?;
    let records = labelled_records(&first.data_dir, &reader)?;
    let split = Split::load(&first.split.path)?;
    let vocab = LabelVocab::from_ordered(first.model.labels.clone())?;
    let targets = Targets::from_records(reader.ids(), &records, &vocab, false)?;
    let val_rows = rows_for_ids(&reader, &split.val, "validation")?;
    let train_rows = rows_for_ids(&reader, &split.train, "training")?;
    let label_sets = targets.label_sets(&train_rows);
    let label_cooccurrence =
        LabelCooccurrence::from_label_sets(label_sets.iter().map(Vec::as_slice), vocab.len())?;

    let inputs = combined_inputs(
        metas
            .iter()
            .map(|m| (m.model.name.as_str(), &m.model.inputs)),
    )?;
    let ensemble = Model {
        card: Card {
            name: name.to_string(),
            labels: vocab.names().to_vec(),
            thresholds: vec![0.5; vocab.len()],
            inputs,
        },
        head: Box::new(EnsembleHead::new(models)),
        loss: Loss::Bce,
    };
    let batch = first.training.eval_batch_size;
    let scores = ensemble.score_rows(&reader, &val_rows, batch, device, Some(&targets))?;
    let shown = measure(
        scores.probabilities,
        targets.rows(&val_rows),
        vocab.len(),
        scores.loss.unwrap_or(f64::NAN),
    );
    let name = reserve_name(&dir, None, |version| match version {
        1 => name.to_string(),
        v => format!("{name}-v{v}"),
    })?;
    let made = (|| -> Result<EnsembleReport> {
        let meta = EnsembleMeta {
            card: card(&name, &dir, &metas, shown.thresholds.clone())?,
            cache_dir: first.cache_dir.clone(),
            data_dir: first.data_dir.clone(),
            split: first.split.clone(),
            fold: None,
            fold_ids: Vec::new(),
            tuned_on: TunedOn::Validation,
            metrics: shown.metrics.clone(),
            val_loss: shown.loss,
            held_out: None,
            member_runs: metas.iter().map(MemberRun::of).collect(),
            size: HeadSize::total(metas.iter().map(|m| m.size)),
            written_by: format!("multiclip {}", env!("CARGO_PKG_VERSION")),
        };
        let checkpoint = save(&dir, &meta)?;
        Ok(EnsembleReport {
            checkpoint,
            meta,
            shown_ids: val_rows.iter().map(|&r| reader.ids()[r].clone()).collect(),
            shown,
            shown_part: "val".to_string(),
            label_cooccurrence,
        })
    })();
    if made.is_err() {
        release(&dir, &name);
    }
    made
}
