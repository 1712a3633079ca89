//! Early stopping on a validation criterion, keeping a real copy of the best weights.

use anyhow::Result;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The validation number that decides which epoch is best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Micro-F1 after per-label threshold tuning on the validation part (higher is better).
    MicroF1,
    /// Mean average precision over labels (higher is better).
    Map,
    /// Validation loss (lower is better).
    Loss,
}

impl Criterion {
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Self::Loss)
    }

    /// Short form used in checkpoint names (`..._seed3407_f1`).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::MicroF1 => "f1",
            Self::Map => "map",
            Self::Loss => "loss",
        }
    }
}

impl FromStr for Criterion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "micro-f1" | "f1" | "micro_f1" => Ok(Self::MicroF1),
            "map" => Ok(Self::Map),
            "loss" | "val-loss" => Ok(Self::Loss),
            other => Err(format!(
                "unknown metric `{other}`: use `micro-f1`, `map` or `loss`"
            )),
        }
    }
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MicroF1 => "micro-f1",
            Self::Map => "map",
            Self::Loss => "loss",
        })
    }
}

/// Deep copies of named variables, independent of later updates to them.
#[derive(Debug, Clone)]
pub struct Snapshot(pub BTreeMap<String, Tensor>);

impl Snapshot {
    /// Copies the current values (new storage, not shared handles).
    pub fn take<'a>(vars: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Result<Self> {
        let mut copies = BTreeMap::new();
        for (name, var) in vars {
            copies.insert(name.clone(), var.as_tensor().copy()?);
        }
        Ok(Self(copies))
    }

    /// Writes the copied values back into the variables of the same names.
    pub fn restore<'a>(&self, vars: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Result<()> {
        for (name, var) in vars {
            let value = self
                .0
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("no saved value for variable `{name}`"))?;
            var.set(value)?;
        }
        Ok(())
    }
}

/// What one validation result means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new best: its weights were copied.
    Improved,
    /// Not better; `epochs_without_improvement` of `patience` used up.
    NoImprovement { epochs_without_improvement: usize },
    /// Patience exhausted: stop training and restore the best weights.
    Stop,
}

/// Tracks the best validation value and its weights.
#[derive(Debug)]
pub struct EarlyStopping {
    criterion: Criterion,
    patience: usize,
    best: Option<(usize, f64)>,
    best_weights: Option<Snapshot>,
    epochs_without_improvement: usize,
}

impl EarlyStopping {
    /// Stops after `patience` epochs in a row without a strict improvement.
    pub fn new(criterion: Criterion, patience: usize) -> Self {
        Self {
            criterion,
            patience: patience.max(1),
            best: None,
            best_weights: None,
            epochs_without_improvement: 0,
        }
    }

    pub fn criterion(&self) -> Criterion {
        self.criterion
    }

    /// The best epoch and its value, if any epoch was observed.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best
    }

    /// The weights of the best epoch.
    pub fn best_weights(&self) -> Option<&Snapshot> {
        self.best_weights.as_ref()
    }

    /// Records `value` for `epoch`; on improvement calls `snapshot` to copy the weights.
    /// A NaN value never counts as an improvement.
    pub fn observe(
        &mut self,
        epoch: usize,
        value: f64,
        snapshot: impl FnOnce() -> Result<Snapshot>,
    ) -> Result<Verdict> {
        let improved = match self.best {
            _ if value.is_nan() => false,
            None => true,
            Some((_, best)) if self.criterion.higher_is_better() => value > best,
            Some((_, best)) => value < best,
        };
        if improved {
            self.best = Some((epoch, value));
            self.best_weights = Some(snapshot()?);
            self.epochs_without_improvement = 0;
            return Ok(Verdict::Improved);
        }
        self.epochs_without_improvement += 1;
        if self.epochs_without_improvement >= self.patience {
            Ok(Verdict::Stop)
        } else {
            Ok(Verdict::NoImprovement {
                epochs_without_improvement: self.epochs_without_improvement,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stops_after_patience_and_keeps_best_epoch() {
        let mut es = EarlyStopping::new(Criterion::MicroF1, 2);
        let snap = || Ok(Snapshot(BTreeMap::new()));
        assert_eq!(es.observe(0, 0.5, snap).unwrap(), Verdict::Improved);
        assert_eq!(es.observe(1, 0.7, snap).unwrap(), Verdict::Improved);
        assert_eq!(
            es.observe(2, 0.7, snap).unwrap(),
            Verdict::NoImprovement {
                epochs_without_improvement: 1
            }
        );
        assert_eq!(es.observe(3, f64::NAN, snap).unwrap(), Verdict::Stop);
        assert_eq!(es.best(), Some((1, 0.7)));
    }

    #[test]
    fn loss_criterion_prefers_lower_values() {
        let mut es = EarlyStopping::new(Criterion::Loss, 3);
        let snap = || Ok(Snapshot(BTreeMap::new()));
        es.observe(0, 1.0, snap).unwrap();
        es.observe(1, 2.0, snap).unwrap();
        es.observe(2, 0.5, snap).unwrap();
        assert_eq!(es.best(), Some((2, 0.5)));
    }

    #[test]
    fn snapshot_is_a_copy_not_a_handle() {
        let var = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        let vars = [("w".to_string(), var.clone())];
        let mut es = EarlyStopping::new(Criterion::Map, 5);
        es.observe(0, 0.9, || Snapshot::take(vars.iter().map(|(n, v)| (n, v))))
            .unwrap();
        // Training goes on and changes the variable in place.
        var.set(&Tensor::new(&[7f32, 8.0], &Device::Cpu).unwrap())
            .unwrap();
        let best = es.best_weights().unwrap();
        assert_eq!(best.0["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        best.restore(vars.iter().map(|(n, v)| (n, v))).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn criterion_names_round_trip() {
        for c in [Criterion::MicroF1, Criterion::Map, Criterion::Loss] {
            assert_eq!(c.to_string().parse::<Criterion>(), Ok(c));
        }
    }
}
