//! `train --folds K`: a k-fold ensemble. The folded rows are cut into K folds by the split's
//! iterative stratification ([`stratified_folds`], seeded by the run's seed); member `i` trains on
//! the other K-1 folds and is validated (early stopping, its own thresholds) on fold `i`. Every
//! folded row is then scored by the one member that did not train on it, the ensemble's
//! thresholds are tuned on these out-of-fold probabilities, and the members are written as full
//! checkpoints (`NAME.fold-I-of-K`) beside the ensemble's sidecar `NAME.json`, which averages
//! their probabilities (`model::ensemble`).
//!
//! Which rows are folded ([`FoldRows`]): by default every row of the split file, training and
//! validation ids alike, so that no row is kept out of training and the thresholds see all of
//! them; the ensemble's metrics are then out-of-fold (each row scored by a member that never
//! trained on it; only the thresholds were tuned on the same rows, as for a single run's
//! validation), and only a separate test set measures the ensemble itself. With
//! `FoldRows::Train` the split's validation ids stay out of every member and measure the whole
//! ensemble at the out-of-fold thresholds: an honest validation number, for 15% fewer rows.
//!
//! Members train side by side on `jobs` threads, each in a rayon pool of its share of the
//! process's threads; the budget (`--max-head-mb`) counts all K members before any trains.

use super::budget::HeadSize;
use super::checkpoint::CheckpointMeta;
use super::ensemble::{self, EnsembleMeta, EnsembleReport, HeldOut, MemberRun, TunedOn};
use super::folds::{FoldRef, FoldRows};
use super::run::{TrainInputs, TrainReport, TrainRequest, build_head, default_name, train_on_rows};
use super::{TrainConfig, measure, measure_at};
use crate::data::split::stratified_folds;
use crate::heads::LabelCooccurrence;
use crate::labelled::rows_for_ids;
use crate::loss::Loss;
use crate::model::ensemble::EnsembleHead;
use crate::model::{Card, Model};
use crate::parallel::{run_indexed, threads_per_job};
use anyhow::{Context, Result, bail};

/// A k-fold run: the training request of every member, K, the rows folded and the members
/// trained at once.
#[derive(Debug, Clone)]
pub struct KFoldRequest {
    pub train: TrainRequest,
    pub folds: usize,
    pub rows: FoldRows,
    pub jobs: usize,
}

/// Trains the K members, tunes the ensemble's thresholds out of fold and writes the ensemble.
pub fn train_folds(request: &KFoldRequest) -> Result<EnsembleReport> {
    let train = &request.train;
    let config = &train.config;
    let k = request.folds;
    let inputs = TrainInputs::load(train)?;
    let reader = &inputs.reader;
    let ids: Vec<String> = match request.rows {
        FoldRows::All => inputs.records.iter().map(|r| r.id.clone()).collect(),
        FoldRows::Train => inputs.split.train.clone(),
    };
    let rows = rows_for_ids(reader, &ids, "k-fold")?;
    let num_labels = inputs.vocab.len();
    let label_sets = inputs.targets.label_sets(&rows);
    let fold_of = stratified_folds(&label_sets, num_labels, k, config.seed)?;
    // A member's size does not depend on its rows: all K are counted before any trains.
    let probe = build_head(train, &inputs, &rows)?;
    probe
        .size
        .times(k)
        .check_budget(config.max_head_mb, &format!("the {k}-fold ensemble"))?;
    let default = default_name(train, &probe.config, reader);
    drop(probe);
    let name = super::checkpoint::reserve_name(&train.out_dir, train.name.as_deref(), |version| {
        format!("{}_{k}fold", default.name(version))
    })?;
    let fold_ref = |index| FoldRef {
        count: k,
        seed: config.seed,
        rows: request.rows,
        index,
    };
    let made = (|| -> Result<EnsembleReport> {
        let threads = threads_per_job(request.jobs);
        let trained = run_indexed(request.jobs, k, |fold| -> Result<TrainReport> {
            // Log lines carry the fold (entered where the member trains: a pool thread).
            let span = tracing::info_span!("fold", fold = fold + 1);
            let side = |validation: bool| -> Vec<usize> {
                rows.iter()
                    .zip(&fold_of)
                    .filter(|&(_, &f)| (f == fold) == validation)
                    .map(|(&row, _)| row)
                    .collect()
            };
            let member = TrainRequest {
                name: Some(format!("{name}.fold-{}-of-{k}", fold + 1)),
                config: TrainConfig {
                    max_head_mb: None,
                    ..config.clone()
                },
                ..train.clone()
            };
            let run = || {
                let _span = span.enter();
                train_on_rows(
                    &member,
                    &inputs,
                    side(false),
                    side(true),
                    Some(fold_ref(Some(fold + 1))),
                )
            };
            if request.jobs > 1 {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .context("starting a member's thread pool")?
                    .install(run)
            } else {
                run()
            }
        });
        let members = trained
            .into_iter()
            .enumerate()
            .map(|(fold, r)| r.with_context(|| format!("member {} of {k}", fold + 1)))
            .collect::<Result<Vec<_>>>()?;

        // Every folded row scored by the member validated on its fold.
        let mut oof = vec![0f32; rows.len() * num_labels];
        for (fold, member) in members.iter().enumerate() {
            let positions: Vec<usize> = (0..rows.len()).filter(|&p| fold_of[p] == fold).collect();
            let probabilities = &member.outcome.validation.probabilities;
            if probabilities.len() != positions.len() * num_labels {
                bail!(
                    "member {} scored {} values for its {} fold rows",
                    fold + 1,
                    probabilities.len(),
                    positions.len()
                );
            }
            for (chunk, &p) in probabilities.chunks(num_labels).zip(&positions) {
                oof[p * num_labels..(p + 1) * num_labels].copy_from_slice(chunk);
            }
        }
        let truth = inputs.targets.rows(&rows);
        let loss = mean_bce(&oof, &truth);
        let out_of_fold = measure(oof, truth, num_labels, loss);

        let metas: Vec<CheckpointMeta> = members.iter().map(|m| m.meta.clone()).collect();
        let card = ensemble::card(
            &name,
            &train.out_dir,
            &metas,
            out_of_fold.thresholds.clone(),
        )?;
        // The split's validation ids, when no member trained on them, scored by the ensemble.
        let held_out = match request.rows {
            FoldRows::All => None,
            FoldRows::Train => {
                let models = members
                    .iter()
                    .map(|m| Model::load(&m.checkpoint, &train.device))
                    .collect::<Result<Vec<_>>>()?;
                let model = Model {
                    card: Card {
                        name: name.clone(),
                        labels: card.labels.clone(),
                        thresholds: card.thresholds.clone(),
                        inputs: card.inputs.clone(),
                    },
                    head: Box::new(EnsembleHead::new(models)),
                    loss: Loss::Bce,
                };
                let val_rows = rows_for_ids(reader, &inputs.split.val, "validation")?;
                let scores = model.score_rows(
                    reader,
                    &val_rows,
                    config.eval_batch_size,
                    &train.device,
                    Some(&inputs.targets),
                )?;
                let measured = measure_at(
                    scores.probabilities,
                    inputs.targets.rows(&val_rows),
                    card.thresholds.clone(),
                    scores.loss.unwrap_or(f64::NAN),
                );
                Some((measured, val_rows))
            }
        };
        let meta = EnsembleMeta {
            card,
            cache_dir: train.cache.clone(),
            data_dir: train.data.clone(),
            split: metas[0].split.clone(),
            fold: Some(fold_ref(None)),
            fold_ids: (0..k)
                .map(|fold| {
                    (ids.iter().zip(&fold_of))
                        .filter(|&(_, &f)| f == fold)
                        .map(|(id, _)| id.clone())
                        .collect()
                })
                .collect(),
            tuned_on: TunedOn::OutOfFold,
            metrics: out_of_fold.metrics.clone(),
            val_loss: out_of_fold.loss,
            held_out: held_out.as_ref().map(|(v, _)| HeldOut {
                metrics: v.metrics.clone(),
                loss: v.loss,
            }),
            member_runs: metas.iter().map(MemberRun::of).collect(),
            size: HeadSize::total(metas.iter().map(|m| m.size)),
            written_by: format!("multiclip {}", env!("CARGO_PKG_VERSION")),
        };
        let checkpoint = ensemble::save(&train.out_dir, &meta)?;
        let ids_of = |rows: &[usize]| rows.iter().map(|&r| reader.ids()[r].clone()).collect();
        let label_cooccurrence =
            LabelCooccurrence::from_label_sets(label_sets.iter().map(Vec::as_slice), num_labels)?;
        let (shown, shown_ids, shown_part) = match held_out {
            Some((validation, val_rows)) => (validation, ids_of(&val_rows), "val"),
            None => (out_of_fold, ids_of(&rows), "out-of-fold"),
        };
        Ok(EnsembleReport {
            checkpoint,
            meta,
            shown,
            shown_ids,
            shown_part: shown_part.to_string(),
            label_cooccurrence,
        })
    })();
    if made.is_err() {
        ensemble::release(&train.out_dir, &name);
    }
    made
}

/// Mean binary cross-entropy of probabilities against multi-hot truth (probabilities clamped to
/// [1e-12, 1 - 1e-12]).
fn mean_bce(probabilities: &[f32], truth: &[f32]) -> f64 {
    let sum: f64 = probabilities
        .iter()
        .zip(truth)
        .map(|(&p, &y)| {
            let p = f64::from(p).clamp(1e-12, 1.0 - 1e-12);
            let y = f64::from(y);
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    sum / probabilities.len().max(1) as f64
}
