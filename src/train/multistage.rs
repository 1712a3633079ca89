//! The multi-stage recipe of the original CLIP router: before the whole head is trained, each of
//! its parts (e.g. the image expert and the text expert of a router) is trained on its own until
//! its training micro-F1 gains less than `plateau_gain` (0.01) in an epoch. That micro-F1 is
//! measured on the epoch's training outputs with thresholds tuned on them.

use super::history::EpochRecord;
use super::optim::{AdamW, exempt_from_weight_decay};
use super::schedule::{LrSchedule, ScheduleKind};
use super::{EpochPass, TrainConfig, TrainData, run_epoch};
use crate::cache::BatchOrder;
use crate::heads::{Head, Inputs};
use crate::loss::Loss;
use anyhow::{Result, bail};
use candle_core::Var;
use std::time::Instant;

/// Warms up every part of `head` in turn (variables named `<part prefix>...` only), at the
/// constant base learning rate, for at most `config.epochs` epochs each.
pub fn warm_up_parts(
    head: &dyn Head,
    vars: &[(String, Var)],
    loss: &Loss,
    data: &TrainData,
    config: &TrainConfig,
    history: &mut Vec<EpochRecord>,
) -> Result<()> {
    let parts = head.parts();
    if parts.is_empty() {
        bail!(
            "--multistage needs a head made of parts to warm up (e.g. `router`); this head has none"
        );
    }
    for (index, part) in parts.iter().enumerate() {
        let part_vars: Vec<(String, Var)> = vars
            .iter()
            .filter(|(name, _)| name.starts_with(&part.var_prefix))
            .cloned()
            .collect();
        if part_vars.is_empty() {
            bail!(
                "head part `{}` has no variables under `{}`",
                part.name,
                part.var_prefix
            );
        }
        let mut optimizer = AdamW::new(part_vars, config.adamw, exempt_from_weight_decay)?;
        let schedule = LrSchedule::new(ScheduleKind::Constant, config.lr, 0, 1);
        let stage = format!("warmup:{}", part.name);
        let forward = |x: &Inputs| head.part_forward(&part.name, x, true);
        let mut previous_f1: Option<f64> = None;
        let mut step = 0;
        for epoch in 0..config.epochs {
            let started = Instant::now();
            let pass = EpochPass {
                stage: &stage,
                epoch,
                // Each stage gets its own shuffling streams, apart from the main stage's.
                order: BatchOrder::Shuffled {
                    seed: config.seed,
                    epoch: ((index as u64 + 1) << 32) | epoch as u64,
                },
                collect_outputs: true,
                micro_batch_rows: head.micro_batch_rows(),
            };
            let trained = run_epoch(
                &pass,
                &forward,
                &head.inputs(),
                loss,
                data,
                config,
                &mut optimizer,
                &schedule,
                &mut step,
            )?;
            let truth = data.targets.rows(&trained.rows);
            // Thresholds tuned on the epoch's own outputs: the gain measures how much better the
            // part separates the labels, whatever the calibration of its probabilities (a focal
            // or margin loss keeps them far from 0.5 early on).
            let f1 = super::measure(
                trained.probabilities,
                truth,
                data.targets.num_labels(),
                trained.mean_loss,
            )
            .micro_f1();
            tracing::info!(
                "{stage} epoch {:>3}  loss {:.4}  train micro-F1 {:.4}",
                epoch + 1,
                trained.mean_loss,
                f1
            );
            history.push(EpochRecord {
                stage: stage.clone(),
                epoch: epoch + 1,
                train_loss: trained.mean_loss,
                train_micro_f1: Some(f1),
                val_loss: None,
                val_micro_f1: None,
                val_macro_f1: None,
                val_map: None,
                lr: trained.last_lr,
                train_seconds: started.elapsed().as_secs_f64(),
                seconds: started.elapsed().as_secs_f64(),
            });
            if previous_f1.is_some_and(|previous| f1 - previous < config.plateau_gain) {
                break;
            }
            previous_f1 = Some(f1);
        }
    }
    Ok(())
}
