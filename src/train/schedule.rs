//! Learning-rate schedules, evaluated per optimizer step: an optional linear warm-up followed by a
//! constant rate or a cosine decay to zero at the last step of the run.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The shape of the learning rate after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// The base rate until the end.
    Constant,
    /// Half a cosine from the base rate down to zero at the last step.
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            other => Err(format!(
                "unknown learning-rate schedule `{other}`: use `constant` or `cosine`"
            )),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Constant => "constant",
            Self::Cosine => "cosine",
        })
    }
}

/// A learning rate for every optimizer step of a run of `total_steps` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
    base_lr: f64,
    warmup_steps: usize,
    total_steps: usize,
}

impl LrSchedule {
    /// `warmup_steps` linear steps up to `base_lr` (the first step already uses
    /// `base_lr / warmup_steps`), then `kind` until `total_steps`.
    pub fn new(kind: ScheduleKind, base_lr: f64, warmup_steps: usize, total_steps: usize) -> Self {
        Self {
            kind,
            base_lr,
            warmup_steps: warmup_steps.min(total_steps),
            total_steps: total_steps.max(1),
        }
    }

    /// The rate for step `step` (0-based). Steps past the end keep the last rate.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Cosine => {
                let decay_steps = self.total_steps - self.warmup_steps;
                if decay_steps == 0 {
                    return self.base_lr;
                }
                let progress =
                    ((step - self.warmup_steps) as f64 / decay_steps as f64).clamp(0.0, 1.0);
                0.5 * self.base_lr * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_without_warmup_is_flat() {
        let s = LrSchedule::new(ScheduleKind::Constant, 1e-3, 0, 100);
        assert!((0..150).all(|t| s.lr_at(t) == 1e-3));
    }

    #[test]
    fn warmup_rises_linearly_to_the_base_rate() {
        let s = LrSchedule::new(ScheduleKind::Constant, 1.0, 4, 100);
        let lrs: Vec<f64> = (0..6).map(|t| s.lr_at(t)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn cosine_decays_from_base_to_zero_after_warmup() {
        let s = LrSchedule::new(ScheduleKind::Cosine, 2.0, 10, 110);
        assert_eq!(s.lr_at(9), 2.0);
        assert_eq!(s.lr_at(10), 2.0);
        assert!(
            (s.lr_at(60) - 1.0).abs() < 1e-12,
            "half way: {}",
            s.lr_at(60)
        );
        assert!(s.lr_at(110).abs() < 1e-12);
        assert!(s.lr_at(500).abs() < 1e-12);
        let decay: Vec<f64> = (10..=110).map(|t| s.lr_at(t)).collect();
        assert!(decay.windows(2).all(|w| w[1] <= w[0]), "monotone decay");
    }

    #[test]
    fn parses_and_prints_names() {
        for kind in [ScheduleKind::Constant, ScheduleKind::Cosine] {
            assert_eq!(kind.to_string().parse::<ScheduleKind>(), Ok(kind));
        }
        assert!("linear".parse::<ScheduleKind>().is_err());
    }
}
