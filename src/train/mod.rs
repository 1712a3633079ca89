//! Stage 2 training on a memory-mapped cache: the epoch loop with streamed, seeded-shuffled
//! batches, AdamW with decay exemptions and clipping, learning-rate schedules, validation with
//! threshold tuning each epoch, early stopping with a copy of the best weights, the multi-stage
//! recipe, and checkpoints.
//!
//! Memory is bounded by the batch: each step gathers one batch of rows from the cache (f16 rows
//! decoded to f32), never the whole cache. The same seed gives the same numbers: initial weights
//! come from the seeded variable builder, batch order from `(seed, epoch)`, and every reduction
//! runs in a fixed order.

pub mod budget;
pub mod checkpoint;
pub mod early_stop;
pub mod ensemble;
pub mod folds;
pub mod grads;
pub mod history;
pub mod kfold;
pub mod memory;
pub mod multistage;
pub mod optim;
pub mod run;
pub mod schedule;

use crate::cache::{BatchOrder, CacheReader};
use crate::heads::{Head, Inputs};
use crate::labelled::Targets;
use crate::loss::Loss;
use crate::metrics::{self, LabelMetrics, Metrics, TuneObjective};
use crate::model::score::{SCORE_BATCH_ROWS, batch_inputs, score_rows};
use crate::tensor_ops::Precision;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use early_stop::{Criterion, EarlyStopping, Snapshot, Verdict};
use history::EpochRecord;
use indicatif::{ProgressBar, ProgressStyle};
use optim::{AdamW, AdamWConfig};
use schedule::{LrSchedule, ScheduleKind};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Every setting of a training run. Defaults suit small heads on frozen features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate (the original used 1e-4 without schedule; heads on frozen features
    /// converge several times faster with warm-up and cosine decay, and 3e-3 was the best rate
    /// measured on real data, docs/results.md).
    pub lr: f64,
    pub batch_size: usize,
    /// Rows per forward pass when scoring validation rows (no gradients are kept).
    pub eval_batch_size: usize,
    /// Maximum epochs of the main stage (early stopping usually ends sooner).
    pub epochs: usize,
    /// Epochs without improvement of `criterion` before stopping.
    pub patience: usize,
    pub criterion: Criterion,
    pub schedule: ScheduleKind,
    /// Linear warm-up length in epochs (may be fractional).
    pub warmup_epochs: f64,
    pub adamw: AdamWConfig,
    /// Maximum global gradient norm (`None`: no clipping).
    pub clip_grad: Option<f64>,
    pub seed: u64,
    /// Warm up each part of the head (e.g. each modality's expert of a router) before training
    /// the whole.
    pub multistage: bool,
    /// A warm-up stage ends when its train micro-F1 gains less than this in an epoch.
    pub plateau_gain: f64,
    /// The memory the run may need ([`memory`]); where it runs, not how, so not recorded.
    #[serde(skip)]
    pub memory_limit: memory::MemoryLimit,
    /// Refuse, before training, a head (all members of an ensemble together) whose saved
    /// weights exceed this many MB (`budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_head_mb: Option<f64>,
    /// The number type of the head's matrix products (`--precision`, one of
    /// [`TrainConfig::PRECISIONS`]): f32, or bf16 operands with f32 sums in the forward and
    /// backward products (CPU only). Master weights, optimiser state and loss are f32 either
    /// way (`heads::products`).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            batch_size: 256,
            eval_batch_size: SCORE_BATCH_ROWS,
            epochs: 100,
            patience: 10,
            criterion: Criterion::MicroF1,
            schedule: ScheduleKind::Cosine,
            warmup_epochs: 1.0,
            adamw: AdamWConfig::default(),
            clip_grad: Some(1.0),
            seed: 3407,
            multistage: false,
            plateau_gain: 0.01,
            memory_limit: memory::MemoryLimit::default(),
            max_head_mb: None,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// The precisions a head trains in (`--precision`).
    pub const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// Checks every setting, naming the flag that sets it (`--lr`, ...): a learning rate that is
    /// not a positive finite number, a zero batch size or epoch count, negative decay or clipping
    /// (NaN included) are refused rather than trained with. Every problem is listed at once.
    ///
    /// `epochs` may be 0: the checkpoint then keeps the initial weights (label-name queries give
    /// zero-shot classifiers that way) with thresholds tuned on validation.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        let mut require = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        let a = &self.adamw;
        require(
            positive(self.lr),
            format!("--lr must be a finite number above 0 (got {})", self.lr),
        );
        for (flag, value) in [
            ("--batch-size", self.batch_size),
            ("--eval-batch-size", self.eval_batch_size),
            ("--patience", self.patience),
        ] {
            require(
                value >= 1,
                format!("{flag} must be at least 1 (got {value})"),
            );
        }
        for (flag, value) in [
            ("--warmup-epochs", self.warmup_epochs),
            ("--weight-decay", a.weight_decay),
            ("plateau_gain", self.plateau_gain),
        ] {
            require(
                non_negative(value),
                format!("{flag} must be a finite number >= 0 (got {value})"),
            );
        }
        if let Some(clip) = self.clip_grad {
            require(
                positive(clip),
                format!(
                    "--clip-grad must be a finite number >= 0, 0 turning clipping off (got {clip})"
                ),
            );
        }
        for (name, value) in [("adamw.beta1", a.beta1), ("adamw.beta2", a.beta2)] {
            require(
                unit(value),
                format!("{name} must be in [0, 1) (got {value})"),
            );
        }
        require(
            positive(a.eps),
            format!("adamw.eps must be a finite number above 0 (got {})", a.eps),
        );
        require(
            Self::PRECISIONS.contains(&self.precision),
            format!(
                "--precision must be f32 or bf16 for training (got {})",
                self.precision.name()
            ),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("invalid training settings: {}", problems.join("; "))
        }
    }
}

/// What a run trains and validates on.
pub struct TrainData<'a> {
    pub reader: &'a CacheReader,
    /// Targets of every cache row (rows of `train_rows` and `val_rows` must be labelled).
    pub targets: &'a Targets,
    pub train_rows: Vec<usize>,
    pub val_rows: Vec<usize>,
    pub device: Device,
}

impl TrainData<'_> {
    fn check(&self) -> Result<()> {
        if self.train_rows.is_empty() || self.val_rows.is_empty() {
            bail!(
                "training needs training and validation rows (got {} and {})",
                self.train_rows.len(),
                self.val_rows.len()
            );
        }
        self.targets
            .ensure_labelled(&self.train_rows, self.reader.ids())?;
        self.targets
            .ensure_labelled(&self.val_rows, self.reader.ids())?;
        Ok(())
    }
}

/// Validation of one pass over the validation rows, thresholds tuned on them.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub rows: usize,
    pub loss: f64,
    /// `[rows, labels]` row-major probabilities and multi-hot truth of the validation rows.
    pub probabilities: Vec<f32>,
    pub truth: Vec<f32>,
    /// Per-label thresholds tuned for micro-F1 on these rows.
    pub thresholds: Vec<f32>,
    /// Metrics at those thresholds, with the at-least-one-label rule.
    pub metrics: Metrics,
    pub per_label: Vec<LabelMetrics>,
}

impl Validation {
    pub fn micro_f1(&self) -> f64 {
        self.metrics.averages.micro.f1
    }

    pub fn macro_f1(&self) -> f64 {
        self.metrics.averages.macro_avg.f1
    }

    /// The number early stopping watches.
    pub fn value(&self, criterion: Criterion) -> f64 {
        match criterion {
            Criterion::MicroF1 => self.micro_f1(),
            Criterion::Map => self.metrics.map,
            Criterion::Loss => self.loss,
        }
    }
}

/// The result of [`fit`]: the head's variables hold the best epoch's weights.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub history: Vec<EpochRecord>,
    /// 1-based epoch of the main stage whose weights were kept (0: the initial weights, with
    /// `--epochs 0`).
    pub best_epoch: usize,
    pub stopped_early: bool,
    /// Validation of the kept weights (thresholds tuned on validation).
    pub validation: Validation,
}

/// The trainable variables of `varmap`, sorted by name.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// Trains `head` (whose trainable variables are those of `varmap`) with `loss` on `data`;
/// leaves the best epoch's weights in the variables.
pub fn fit(
    head: &dyn Head,
    varmap: &VarMap,
    loss: &Loss,
    data: &TrainData,
    config: &TrainConfig,
) -> Result<TrainOutcome> {
    config.validate()?;
    loss.validate()?;
    data.check()?;
    let vars = named_vars(varmap)?;
    if vars.is_empty() {
        bail!("the head has no trainable variables");
    }
    let mut history = Vec::new();
    if config.multistage {
        multistage::warm_up_parts(head, &vars, loss, data, config, &mut history)?;
    }

    let steps_per_epoch = data.train_rows.len().div_ceil(config.batch_size);
    let schedule = LrSchedule::new(
        config.schedule,
        config.lr,
        (config.warmup_epochs * steps_per_epoch as f64).round() as usize,
        config.epochs * steps_per_epoch,
    );
    let mut optimizer = AdamW::new(vars.clone(), config.adamw, optim::exempt_from_weight_decay)?;
    let mut stopper = EarlyStopping::new(config.criterion, config.patience);
    let mut step = 0;
    let mut stopped_early = false;
    for epoch in 0..config.epochs {
        let started = Instant::now();
        let pass = EpochPass {
            stage: "train",
            epoch,
            order: BatchOrder::Shuffled {
                seed: config.seed,
                epoch: epoch as u64,
            },
            collect_outputs: false,
            micro_batch_rows: head.micro_batch_rows(),
        };
        let trained = run_epoch(
            &pass,
            &|x: &Inputs| head.forward(x, true),
            &head.inputs(),
            loss,
            data,
            config,
            &mut optimizer,
            &schedule,
            &mut step,
        )?;
        let train_seconds = started.elapsed().as_secs_f64();
        let validation = validate(head, loss, data, config)?;
        let record = EpochRecord {
            stage: pass.stage.to_string(),
            epoch: epoch + 1,
            train_loss: trained.mean_loss,
            train_micro_f1: None,
            val_loss: Some(validation.loss),
            val_micro_f1: Some(validation.micro_f1()),
            val_macro_f1: Some(validation.macro_f1()),
            val_map: Some(validation.metrics.map),
            lr: trained.last_lr,
            train_seconds,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            "epoch {:>3}/{}  loss {:.4}  val loss {:.4}  micro-F1 {:.4}  macro-F1 {:.4}  mAP {:.4}  \
             lr {:.2e}  {:.1}s",
            record.epoch,
            config.epochs,
            record.train_loss,
            validation.loss,
            validation.micro_f1(),
            validation.macro_f1(),
            validation.metrics.map,
            record.lr,
            record.seconds
        );
        history.push(record);
        let verdict = stopper.observe(epoch + 1, validation.value(config.criterion), || {
            Snapshot::take(vars.iter().map(|(n, v)| (n, v)))
        })?;
        if verdict == Verdict::Stop {
            tracing::info!(
                "no {} improvement for {} epochs: stopping",
                config.criterion,
                config.patience
            );
            stopped_early = true;
            break;
        }
    }
    // With `--epochs 0` the initial weights are kept (validated, thresholds tuned): label
    // priors in the output biases, or class weights from label embeddings.
    let best_epoch = if config.epochs == 0 {
        0
    } else {
        let (best_epoch, _) = stopper.best().context("early stopping saw no epoch")?;
        let best = stopper
            .best_weights()
            .context("early stopping kept no weights")?;
        best.restore(vars.iter().map(|(n, v)| (n, v)))?;
        best_epoch
    };
    let validation = validate(head, loss, data, config)?;
    Ok(TrainOutcome {
        history,
        best_epoch,
        stopped_early,
        validation,
    })
}

/// Which pass over the training rows this is.
struct EpochPass<'a> {
    stage: &'a str,
    epoch: usize,
    order: BatchOrder,
    /// Keep the outputs' probabilities (for the warm-up's train micro-F1).
    collect_outputs: bool,
    /// Rows per forward/backward piece of a batch ([`Head::micro_batch_rows`]).
    micro_batch_rows: usize,
}

/// What one pass over the training rows gave.
struct EpochResult {
    mean_loss: f64,
    last_lr: f64,
    /// Rows in visiting order and their probabilities, when collected.
    rows: Vec<usize>,
    probabilities: Vec<f32>,
}

/// One epoch of optimisation of `forward`'s output over the training rows.
#[allow(clippy::too_many_arguments)]
fn run_epoch(
    pass: &EpochPass,
    forward: &dyn Fn(&Inputs) -> candle_core::Result<Tensor>,
    inputs: &[String],
    loss: &Loss,
    data: &TrainData,
    config: &TrainConfig,
    optimizer: &mut AdamW,
    schedule: &LrSchedule,
    step: &mut usize,
) -> Result<EpochResult> {
    let names: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let batches = data.reader.batches(
        &data.train_rows,
        config.batch_size,
        pass.order,
        &names,
        &data.device,
    )?;
    let bar = epoch_bar(
        data.train_rows.len().div_ceil(config.batch_size) as u64,
        pass,
    );
    let mut loss_sum = 0f64;
    let mut last_lr = schedule.lr_at(*step);
    let mut rows = Vec::new();
    let mut probabilities = Vec::new();
    let vars = optimizer.vars();
    for batch in batches {
        let batch = batch?;
        let batch_rows = batch.rows.clone();
        let y = data.targets.gather(&batch_rows, &data.device)?;
        // Micro-batches: the same gradients as one pass over the batch, with activation memory
        // bounded whatever the batch size.
        let computed = grads::loss_and_grads(
            forward,
            &batch_inputs(batch),
            &y,
            pass.micro_batch_rows,
            &vars,
            &|output, targets| loss.compute(output, targets),
        )
        .context("head forward and backward pass")?;
        last_lr = schedule.lr_at(*step);
        optimizer.step(&computed.grads, last_lr, config.clip_grad)?;
        *step += 1;
        let value = computed.loss as f64;
        loss_sum += value * batch_rows.len() as f64;
        if pass.collect_outputs {
            let probs = candle_nn::ops::sigmoid(&loss.inference_logits(&computed.outputs)?)?;
            probabilities.extend(probs.flatten_all()?.to_vec1::<f32>()?);
            rows.extend(batch_rows);
        }
        bar.set_message(format!("loss {value:.4}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(EpochResult {
        mean_loss: loss_sum / data.train_rows.len() as f64,
        last_lr,
        rows,
        probabilities,
    })
}

/// The per-epoch progress bar (hidden when stderr is not a terminal).
fn epoch_bar(batches: u64, pass: &EpochPass) -> ProgressBar {
    let bar = ProgressBar::new(batches);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} batches {per_sec} ETA {eta} {msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} epoch {}", pass.stage, pass.epoch + 1));
    bar
}

/// Scores the validation rows and measures them, tuning thresholds on them.
pub fn validate(
    head: &dyn Head,
    loss: &Loss,
    data: &TrainData,
    config: &TrainConfig,
) -> Result<Validation> {
    let scores = score_rows(
        head,
        loss,
        data.reader,
        &data.val_rows,
        config.eval_batch_size,
        &data.device,
        Some(data.targets),
    )?;
    let truth = data.targets.rows(&data.val_rows);
    Ok(measure(
        scores.probabilities,
        truth,
        data.targets.num_labels(),
        scores.loss.unwrap_or(f64::NAN),
    ))
}

/// Validation metrics of probabilities against multi-hot truth, with per-label thresholds tuned
/// for micro-F1 on them and the at-least-one-label rule applied.
pub fn measure(
    probabilities: Vec<f32>,
    truth: Vec<f32>,
    num_labels: usize,
    loss: f64,
) -> Validation {
    let thresholds =
        metrics::tune_thresholds(&probabilities, &truth, num_labels, TuneObjective::default());
    measure_at(probabilities, truth, thresholds, loss)
}

/// Metrics of probabilities against multi-hot truth at given thresholds (tuned elsewhere), with
/// the at-least-one-label rule applied.
pub fn measure_at(
    probabilities: Vec<f32>,
    truth: Vec<f32>,
    thresholds: Vec<f32>,
    loss: f64,
) -> Validation {
    let num_labels = thresholds.len();
    Validation {
        rows: probabilities.len() / num_labels.max(1),
        loss,
        metrics: Metrics::compute(&probabilities, &truth, &thresholds, true),
        per_label: metrics::per_label_table(&probabilities, &truth, &thresholds, true),
        thresholds,
        probabilities,
        truth,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_naming_each_flag() {
        TrainConfig::default().validate().unwrap();
        // No epoch keeps the initial weights (zero-shot label queries), a valid run.
        TrainConfig {
            epochs: 0,
            ..TrainConfig::default()
        }
        .validate()
        .unwrap();
        let bad = TrainConfig {
            lr: -0.01,
            batch_size: 0,
            eval_batch_size: 0,
            patience: 0,
            warmup_epochs: f64::NAN,
            adamw: AdamWConfig {
                weight_decay: -5.0,
                beta1: 1.0,
                eps: 0.0,
                ..AdamWConfig::default()
            },
            clip_grad: Some(f64::NAN),
            plateau_gain: -1.0,
            ..TrainConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        for named in [
            "--lr",
            "--batch-size",
            "--eval-batch-size",
            "--patience",
            "--warmup-epochs",
            "--weight-decay",
            "--clip-grad",
            "plateau_gain",
            "adamw.beta1",
            "adamw.eps",
        ] {
            assert!(err.contains(named), "{named}: {err}");
        }
        for lr in [0.0, f64::INFINITY, f64::NAN] {
            assert!(
                TrainConfig {
                    lr,
                    ..TrainConfig::default()
                }
                .validate()
                .is_err()
            );
        }
        for clip in [-1.0, 0.0, f64::INFINITY] {
            let config = TrainConfig {
                clip_grad: Some(clip),
                ..TrainConfig::default()
            };
            assert!(config.validate().is_err(), "{clip}");
        }
    }
}
