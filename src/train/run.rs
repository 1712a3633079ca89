//! One training run from files: a cache, the dataset it was extracted from (for the labels), a
//! split file, a head and a loss -> a checkpoint. The `train` command and pipelines call this.

use super::budget::HeadSize;
use super::checkpoint::{
    Checkpoint, CheckpointMeta, NameParts, SplitRef, backbone_short_name, checkpoint_tensors,
};
use super::folds::FoldRef;
use super::memory::MemoryEstimate;
use super::{TrainConfig, TrainData, TrainOutcome, fit};
use crate::cache::{CacheReader, Integrity};
use crate::data::Record;
use crate::data::labels::{LABELS_FILE, LabelVocab};
use crate::data::split::Split;
use crate::files::sha256_file;
use crate::heads::{self, Head, HeadConfig, HeadContext, LabelCooccurrence};
use crate::labelled::{Targets, labelled_records, rows_for_ids};
use crate::loss::Loss;
use crate::model::checkpoint::FORMAT_VERSION;
use crate::model::{InputSignature, ModelCard};
use crate::tensor_ops::Precision;
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
    /// and the head's parameters, and that the head suits the loss. [`TrainInputs::load`] starts
    /// with it; pipelines run it for every stage before running any.
    pub fn check(&self) -> Result<HeadConfig> {
        self.config.validate()?;
        if self.config.precision == Precision::Bf16 && !self.device.is_cpu() {
            bail!(
                "--precision bf16 trains on the CPU (the AVX512-BF16 products); on {} use \
                 --precision f32",
                crate::tensor_ops::device_name(&self.device)
            );
        }
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
    /// Image ids of the validation rows, in the order of the validation's probabilities.
    pub val_ids: Vec<String>,
}

/// The context a head is trained in over `reader`'s cache: every output's per-row shape, and
/// the label-name embeddings in `vocab`'s order on `device` when the cache stores them
/// (`extract --label-names`).
pub fn head_context(
    reader: &CacheReader,
    vocab: &LabelVocab,
    label_cooccurrence: Option<LabelCooccurrence>,
    seed: u64,
    device: &Device,
) -> Result<HeadContext> {
    let label_embeddings = match reader.label_names() {
        None => None,
        Some(names) => match names.for_vocab(vocab) {
            Ok(rows) => Some(rows.to_device(device)?),
            Err(e) => {
                // Only heads with queries=labels need them: those fail, naming the cache.
                tracing::warn!("{}: label names not usable: {e:#}", reader.dir().display());
                None
            }
        },
    };
    Ok(HeadContext {
        num_labels: vocab.len(),
        input_shapes: reader
            .outputs()
            .iter()
            .map(|o| (o.name.clone(), o.shape.clone()))
            .collect(),
        label_cooccurrence,
        seed,
        label_embeddings,
        // f32 products; `build_head` sets the run's precision.
        precision: Precision::F32,
    })
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

/// What a run reads from its files: the cache, the labels of its rows, the label vocabulary and
/// the split (checked against the csv).
pub struct TrainInputs {
    pub reader: CacheReader,
    pub records: Vec<Record>,
    pub vocab: LabelVocab,
    pub targets: Targets,
    pub split: Split,
}

impl TrainInputs {
    /// Checks the request ([`TrainRequest::check`]) first.
    pub fn load(request: &TrainRequest) -> Result<Self> {
        request.check()?;
        let reader = CacheReader::open_with(&request.cache, request.integrity)?;
        let records = labelled_records(&request.data, &reader)?;
        let vocab = split_vocabulary(&request.split, &records)?;
        let split = Split::load(&request.split)?;
        split
            .check_matches(&records)
            .with_context(|| format!("split {}", request.split.display()))?;
        let targets = Targets::from_records(reader.ids(), &records, &vocab, false)?;
        Ok(Self {
            reader,
            records,
            vocab,
            targets,
            split,
        })
    }
}

/// A request's head, built to train on some rows: seeded variables, the label graph of those
/// rows, output biases at their label priors, and its size.
pub struct BuiltHead {
    pub config: HeadConfig,
    pub varmap: VarMap,
    pub head: Box<dyn Head>,
    pub cooccurrence: LabelCooccurrence,
    pub size: HeadSize,
}

/// Builds the head of `request` for training on `train_rows` (nothing is trained yet).
pub fn build_head(
    request: &TrainRequest,
    inputs: &TrainInputs,
    train_rows: &[usize],
) -> Result<BuiltHead> {
    let label_sets = inputs.targets.label_sets(train_rows);
    let cooccurrence = LabelCooccurrence::from_label_sets(
        label_sets.iter().map(Vec::as_slice),
        inputs.vocab.len(),
    )?;
    let config = head_for_loss(&request.head, &request.loss)?;
    let seed = request.config.seed;
    let ctx = HeadContext {
        precision: request.config.precision,
        ..head_context(
            &inputs.reader,
            &inputs.vocab,
            Some(cooccurrence.clone()),
            seed,
            &request.device,
        )?
    };
    let planned = heads::shapes::plan(&config, &ctx)?;
    MemoryEstimate::of_run(
        &planned,
        &ctx,
        &request.config,
        train_rows.len(),
        inputs.reader.len(),
    )
    .check(request.config.memory_limit)?;
    drop(planned);
    let varmap = VarMap::new();
    let vb = heads::init::seeded_var_builder(&varmap, seed, &request.device);
    let head = heads::build(&config, &ctx, vb)?;
    heads::init::logit_biases_from_prior(
        head.as_ref(),
        &varmap,
        &cooccurrence.label_counts(),
        train_rows.len(),
    )?;
    let size = HeadSize::of(&checkpoint_tensors(&varmap, head.as_ref())?);
    Ok(BuiltHead {
        config,
        varmap,
        head,
        cooccurrence,
        size,
    })
}

/// What the default name of `request`'s checkpoint of head `head` over `reader`'s cache is made
/// of (the version is chosen when saving).
pub fn default_name(request: &TrainRequest, head: &HeadConfig, reader: &CacheReader) -> NameParts {
    let config = &request.config;
    NameParts {
        head: head.kind.name().to_string(),
        backbone: backbone_short_name(&reader.manifest().header.backbone.id),
        loss: request.loss.short_name(),
        lr: config.lr,
        batch_size: config.batch_size,
        seed: config.seed,
        criterion: config.criterion.short_name().to_string(),
    }
}

/// Trains, validates, tunes thresholds and saves the checkpoint.
pub fn train(request: &TrainRequest) -> Result<TrainReport> {
    let inputs = TrainInputs::load(request)?;
    let train_rows = rows_for_ids(&inputs.reader, &inputs.split.train, "training")?;
    let val_rows = rows_for_ids(&inputs.reader, &inputs.split.val, "validation")?;
    train_on_rows(request, &inputs, train_rows, val_rows, None)
}

/// Trains on `train_rows`, validates (early stopping, thresholds) on `val_rows` and saves the
/// checkpoint; `fold` records which fold of a k-fold ensemble the rows are.
pub fn train_on_rows(
    request: &TrainRequest,
    inputs: &TrainInputs,
    train_rows: Vec<usize>,
    val_rows: Vec<usize>,
    fold: Option<FoldRef>,
) -> Result<TrainReport> {
    let reader = &inputs.reader;
    let vocab = &inputs.vocab;
    let config = &request.config;
    let built = build_head(request, inputs, &train_rows)?;
    built.size.check_budget(config.max_head_mb, "the head")?;
    let head = built.head.as_ref();
    tracing::info!(
        "training {} on {} ({} training / {} validation rows, {} labels) with loss {}: {}",
        built.config.kind.name(),
        reader.dir().display(),
        train_rows.len(),
        val_rows.len(),
        vocab.len(),
        request.loss,
        built.size.describe()
    );
    let val_ids = val_rows.iter().map(|&r| reader.ids()[r].clone()).collect();
    let data = TrainData {
        reader,
        targets: &inputs.targets,
        train_rows,
        val_rows,
        device: request.device.clone(),
    };
    let outcome = fit(head, &built.varmap, &request.loss, &data, config)?;

    let validation = &outcome.validation;
    let meta = CheckpointMeta {
        model: ModelCard {
            format_version: FORMAT_VERSION,
            name: String::new(),
            head: built.config.clone(),
            loss: request.loss,
            labels: vocab.names().to_vec(),
            thresholds: validation.thresholds.clone(),
            inputs: InputSignature::of_cache(reader, &head.inputs())?,
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
        size: built.size,
        fold,
        written_by: format!("multiclip {}", env!("CARGO_PKG_VERSION")),
    };
    let parts = default_name(request, &built.config, reader);
    let mut checkpoint = Checkpoint {
        meta,
        tensors: checkpoint_tensors(&built.varmap, head)?,
    };
    let path = checkpoint.save(&request.out_dir, request.name.as_deref(), &parts)?;
    Ok(TrainReport {
        checkpoint: path,
        meta: checkpoint.meta,
        outcome,
        label_cooccurrence: built.cooccurrence,
        val_ids,
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
