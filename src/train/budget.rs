//! The model-size budget: the trainable parameters and saved bytes of a head, counted from its
//! built variables and buffers (cheap: nothing is trained), and the `--max-head-mb` refusal that
//! runs before any training. An ensemble counts all its members.

use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Bytes per MB of the budget (decimal, as course rules such as "< 100 MB" mean it).
pub const BYTES_PER_MB: f64 = 1e6;

/// The size of a model: what training optimises and what its checkpoint weighs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSize {
    /// Trainable values (the optimised variables).
    pub parameters: u64,
    /// Values of fixed buffers saved with them (ML-Decoder queries, GAT adjacency).
    pub buffer_values: u64,
    /// Bytes of every saved tensor (the safetensors file adds a header of a few kB).
    pub bytes: u64,
}

impl HeadSize {
    /// Counts the tensors a checkpoint saves (`train::checkpoint::checkpoint_tensors`): trainable
    /// variables and fixed buffers (by name, [`crate::heads::is_buffer`]).
    pub fn of(tensors: &HashMap<String, Tensor>) -> Self {
        let mut size = Self::default();
        for (name, tensor) in tensors {
            let values = tensor.elem_count() as u64;
            if crate::heads::is_buffer(name) {
                size.buffer_values += values;
            } else {
                size.parameters += values;
            }
            size.bytes += values * tensor.dtype().size_in_bytes() as u64;
        }
        size
    }

    /// `copies` models of this size (the members of an ensemble).
    pub fn times(self, copies: usize) -> Self {
        let n = copies as u64;
        Self {
            parameters: self.parameters * n,
            buffer_values: self.buffer_values * n,
            bytes: self.bytes * n,
        }
    }

    /// The sum of several sizes (an ensemble of different members).
    pub fn total(sizes: impl IntoIterator<Item = Self>) -> Self {
        sizes.into_iter().fold(Self::default(), |a, b| Self {
            parameters: a.parameters + b.parameters,
            buffer_values: a.buffer_values + b.buffer_values,
            bytes: a.bytes + b.bytes,
        })
    }

    pub fn megabytes(&self) -> f64 {
        self.bytes as f64 / BYTES_PER_MB
    }

    /// `1,234,567 trainable parameters, 4.94 MB` (with the buffers when there are any).
    pub fn describe(&self) -> String {
        let buffers = if self.buffer_values > 0 {
            format!(" (+{} fixed buffer values)", thousands(self.buffer_values))
        } else {
            String::new()
        };
        format!(
            "{} trainable parameters{buffers}, {:.2} MB",
            thousands(self.parameters),
            self.megabytes()
        )
    }

    /// Refuses a model over `max_mb` (when a budget is set), naming `what` and both sizes.
    pub fn check_budget(&self, max_mb: Option<f64>, what: &str) -> Result<()> {
        match max_mb {
            Some(max) if self.megabytes() > max => bail!(
                "{what} is over the size budget: {} > --max-head-mb {max} (shrink the head, \
                 e.g. hidden=..., or use fewer members)",
                self.describe()
            ),
            _ => Ok(()),
        }
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::{self, HeadContext};
    use crate::train::checkpoint::checkpoint_tensors;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn counts_the_built_head_and_refuses_it_over_budget() {
        let ctx = HeadContext {
            num_labels: 3,
            input_shapes: [("image".to_string(), vec![10])].into(),
            ..Default::default()
        };
        let varmap = VarMap::new();
        let vb = heads::init::seeded_var_builder(&varmap, 1, &Device::Cpu);
        let head = heads::build(&"mlp:hidden=4".parse().unwrap(), &ctx, vb).unwrap();
        let size = HeadSize::of(&checkpoint_tensors(&varmap, head.as_ref()).unwrap());
        // hidden 10x4 + 4, out 4x3 + 3, f32.
        let parameters = 10 * 4 + 4 + 4 * 3 + 3;
        assert_eq!(
            size,
            HeadSize {
                parameters,
                buffer_values: 0,
                bytes: 4 * parameters,
            }
        );
        assert_eq!(size.times(5).parameters, 5 * parameters);
        assert_eq!(HeadSize::total([size, size]), size.times(2));
        size.check_budget(None, "the head").unwrap();
        size.check_budget(Some(0.001), "the head").unwrap();
        let err = size.check_budget(Some(0.0001), "the head").unwrap_err();
        assert!(
            err.to_string()
                .contains("59 trainable parameters, 0.00 MB > --max-head-mb 0.0001"),
            "{err}"
        );
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
