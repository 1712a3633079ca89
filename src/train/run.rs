//! One training run from files: a cache, the dataset it was extracted from (for the labels), a
//! split file, a head and a loss -> a checkpoint. The `train` command and pipelines call this.

use super::checkpoint::{
    Checkpoint, CheckpointMeta, NameParts, SplitRef, backbone_short_name, checkpoint_tensors,
};
use super::memory::MemoryEstimate;
use super::{TrainConfig, TrainData, TrainOutcome, fit};
use crate::cache::{CacheReader, Integrity};
use crate::data::Record;
use crate::data::labels::{LABELS_FILE, LabelVocab};
use crate::data::split::Split;
use crate::files::sha256_file;
use crate::heads::{self, HeadConfig, HeadContext, LabelCooccurrence};
use crate::labelled::{Targets, labelled_records, rows_for_ids};
use crate::loss::Loss;
use crate::model::checkpoint::FORMAT_VERSION;
use crate::model::{InputSignature, ModelCard};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_nn::VarMap;
use std::path::{Path, PathBuf};

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// The cache folder (`cache/NAME`).
    pub cache: PathBuf,
    /// The dataset folder the cache was extracted from (its `train.csv` gives the labels).
    pub data: PathBuf,
    /// The split file (`train` / `val` ids).
    pub split: PathBuf,
    pub head: HeadConfig,
    pub loss: Loss,
    pub config: TrainConfig,
    /// Folder of the checkpoints (`checkpoints/`).
    pub out_dir: PathBuf,
    /// Explicit checkpoint name (refused if taken); default: the original's naming scheme.
    pub name: Option<String>,
    pub device: Device,
    /// How much of the cache is checked when it is opened.
    pub integrity: Integrity,
}

impl TrainRequest {
    /// Checks what can be checked without reading anything: every training setting, the loss's
    /// and the head's parameters, and that the head suits the loss. [`train`] starts with it;
    /// pipelines run it for every stage before running any.
    pub fn check(&self) -> Result<HeadConfig> {
        self.config.validate()?;
        self.loss.validate()?;
        self.head.validate()?;
        head_for_loss(&self.head, &self.loss)
    }
}

/// What a run produced.
pub struct TrainReport {
    /// The checkpoint's sidecar.
    pub checkpoint: PathBuf,
    pub meta: CheckpointMeta,
    pub outcome: TrainOutcome,
    /// Label co-occurrence counts of the training rows (the `gat` graph, and the report's map).
    pub label_cooccurrence: LabelCooccurrence,
}

/// The context a head is trained in over `reader`'s cache: every output's per-row shape.
pub fn head_context(
    reader: &CacheReader,
    num_labels: usize,
    label_cooccurrence: Option<LabelCooccurrence>,
    seed: u64,
) -> HeadContext {
    HeadContext {
        num_labels,
        input_shapes: reader
            .outputs()
            .iter()
            .map(|o| (o.name.clone(), o.shape.clone()))
            .collect(),
        label_cooccurrence,
        seed,
    }
}

/// The label vocabulary written beside the split file (`labels.json`, by `multiclip dataset
/// split`), or, without one, the vocabulary of the labelled records.
pub fn split_vocabulary(split: &Path, records: &[Record]) -> Result<LabelVocab> {
    let beside = split.with_file_name(LABELS_FILE);
    if beside.is_file() {
        LabelVocab::load(&beside)
    } else {
        LabelVocab::from_records(records)
    }
}

/// The head configuration adapted to the loss: the angular loss needs a head that outputs
/// cosines; every other loss needs free logits.
pub fn head_for_loss(head: &HeadConfig, loss: &Loss) -> Result<HeadConfig> {
    match (loss.needs_cosine_logits(), head.cosine) {
        (true, false) => {
            tracing::info!(
                "loss `{}` trains on cosines: head set to cosine=true",
                loss.kind()
            );
            Ok(HeadConfig {
                cosine: true,
                ..head.clone()
            })
        }
        (false, true) => bail!(
            "the head outputs cosines (cosine=true), which only the `angular` loss trains on; \
             drop cosine=true or use --loss angular"
        ),
        _ => Ok(head.clone()),
    }
}

/// Trains, validates, tunes thresholds and saves the checkpoint.
pub fn train(request: &TrainRequest) -> Result<TrainReport> {
    let head_config = request.check()?;
    let reader = CacheReader::open_with(&request.cache, request.integrity)?;
    let records = labelled_records(&request.data, &reader)?;
    let vocab = split_vocabulary(&request.split, &records)?;
    let split = Split::load(&request.split)?;
    split
        .check_matches(&records)
        .with_context(|| format!("split {}", request.split.display()))?;
    let train_rows = rows_for_ids(&reader, &split.train, "training")?;
    let val_rows = rows_for_ids(&reader, &split.val, "validation")?;
    let targets = Targets::from_records(reader.ids(), &records, &vocab, false)?;
    let label_sets = targets.label_sets(&train_rows);
    let cooccurrence =
        LabelCooccurrence::from_label_sets(label_sets.iter().map(Vec::as_slice), vocab.len())?;

    let config = &request.config;
    let positives = cooccurrence.label_counts();
    let ctx = head_context(
        &reader,
        vocab.len(),
        Some(cooccurrence.clone()),
        config.seed,
    );
    let planned = heads::shapes::plan(&head_config, &ctx)?;
    MemoryEstimate::of_run(&planned, &ctx, config, train_rows.len(), reader.len())
        .check(config.memory_limit)?;
    drop(planned);
    let varmap = VarMap::new();
    let vb = heads::init::seeded_var_builder(&varmap, config.seed, &request.device);
    let head = heads::build(&head_config, &ctx, vb)?;
    heads::init::logit_biases_from_prior(head.as_ref(), &varmap, &positives, train_rows.len())?;
    tracing::info!(
        "training {} on {} ({} training / {} validation rows, {} labels) with loss {}",
        head_config.kind.name(),
        reader.dir().display(),
        train_rows.len(),
        val_rows.len(),
        vocab.len(),
        request.loss
    );
    let data = TrainData {
        reader: &reader,
        targets: &targets,
        train_rows,
        val_rows,
        device: request.device.clone(),
    };
    let outcome = fit(head.as_ref(), &varmap, &request.loss, &data, config)?;

    let validation = &outcome.validation;
    let meta = CheckpointMeta {
        model: ModelCard {
            format_version: FORMAT_VERSION,
            name: String::new(),
            head: head_config.clone(),
            loss: request.loss,
            labels: vocab.names().to_vec(),
            thresholds: validation.thresholds.clone(),
            inputs: InputSignature::of_cache(&reader, &head.inputs())?,
            seed: config.seed,
        },
        cache_dir: request.cache.clone(),
        data_dir: request.data.clone(),
        split: SplitRef {
            path: request.split.clone(),
            sha256: sha256_file(&request.split)?,
        },
        training: config.clone(),
        metrics: validation.metrics.clone(),
        val_loss: validation.loss,
        best_epoch: outcome.best_epoch,
        history: outcome.history.clone(),
        written_by: format!("multiclip {}", env!("CARGO_PKG_VERSION")),
    };
    let backbone = backbone_short_name(&reader.manifest().header.backbone.id);
    let loss_name = request.loss.short_name();
    let parts = NameParts {
        head: head_config.kind.name(),
        backbone: &backbone,
        loss: &loss_name,
        lr: config.lr,
        batch_size: config.batch_size,
        seed: config.seed,
        criterion: config.criterion.short_name(),
    };
    let mut checkpoint = Checkpoint {
        meta,
        tensors: checkpoint_tensors(&varmap, head.as_ref())?,
    };
    let path = checkpoint.save(&request.out_dir, request.name.as_deref(), &parts)?;
    Ok(TrainReport {
        checkpoint: path,
        meta: checkpoint.meta,
        outcome,
        label_cooccurrence: cooccurrence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_angular_loss_turns_the_head_to_cosines_and_others_refuse_them() {
        let mlp: HeadConfig = "mlp".parse().unwrap();
        let angular = Loss::ANGULAR;
        assert!(head_for_loss(&mlp, &angular).unwrap().cosine);
        assert!(!head_for_loss(&mlp, &Loss::Bce).unwrap().cosine);
        let cosine: HeadConfig = "mlp:cosine=true".parse().unwrap();
        let err = head_for_loss(&cosine, &Loss::Bce).unwrap_err().to_string();
        assert!(err.contains("angular"), "{err}");
    }
}
