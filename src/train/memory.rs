//! The memory a training run needs, estimated before anything is allocated, against what the
//! machine can give: a head too large for it is refused with the numbers, instead of aborting
//! halfway through an allocation (or being killed by the kernel) later.
//!
//! The estimate counts f32 values: the head's variables five times (the weights, their
//! gradients, AdamW's two moments and the best epoch's copy), its fixed buffers, the targets of
//! every cache row, one gathered batch of inputs, and the activations of one micro-batch with
//! their gradients ([`crate::heads::Head::activation_values`]). Variables are counted exactly (the
//! head is planned over stand-ins, [`crate::heads::shapes`]); activations are an estimate.
//!
//! The limit is by default what is available now: `MemAvailable` of `/proc/meminfo`, or less when
//! the process's cgroup (a container, a Slurm job) has less left under its limit. A fixed cap
//! would be too high for a small machine and too low for a large one; a user who knows better
//! (swap, memory about to be freed) sets `--memory-limit` or turns the check off.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::heads::HeadContext;
use crate::heads::shapes::Planned;

use super::TrainConfig;

/// The most memory a run may need before it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLimit {
    /// What the machine (and the process's cgroup) has available when the run starts.
    #[default]
    Available,
    /// A fixed number of bytes.
    Bytes(u64),
    /// No check.
    Unlimited,
}

impl FromStr for MemoryLimit {
    type Err = String;

    /// `available`, `none`, or a size: bytes, or with a binary suffix `K`, `M`, `G`, `T`
    /// (`512M`, `1.5G`).
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text {
            "available" => return Ok(Self::Available),
            "none" => return Ok(Self::Unlimited),
            _ => {}
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale: u64 = match unit.trim().to_ascii_uppercase().trim_end_matches("IB") {
            "" | "B" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(format!("`{text}`: the unit must be K, M, G or T")),
        };
        match number.parse::<f64>() {
            Ok(value) if value.is_finite() && value > 0.0 => {
                Ok(Self::Bytes((value * scale as f64) as u64))
            }
            _ => Err(format!(
                "`{text}` is not a memory size (e.g. 512M, 16G), `available` or `none`"
            )),
        }
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Available => f.write_str("available"),
            Self::Unlimited => f.write_str("none"),
            Self::Bytes(bytes) => f.write_str(&format_bytes(*bytes)),
        }
    }
}

/// f32 values a training run holds at its peak, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Elements of the head's trainable variables.
    pub parameters: u64,
    /// Elements of its fixed buffers.
    pub buffers: u64,
    /// The multi-hot targets of every cache row.
    pub targets: u64,
    /// Rows gathered per batch (training or validation), and their input values.
    pub batch_rows: u64,
    pub batch_inputs: u64,
    /// Activations of one micro-batch, with their gradients.
    pub activations: u64,
}

/// Copies of each trainable variable: the weights, their gradients, AdamW's two moments and the
/// best epoch's snapshot.
const COPIES_PER_PARAMETER: u64 = 5;

impl MemoryEstimate {
    /// The estimate for training the planned head in `ctx` with `config` on `train_rows` rows of
    /// a cache of `cache_rows` rows.
    pub fn of_run(
        planned: &Planned,
        ctx: &HeadContext,
        config: &TrainConfig,
        train_rows: usize,
        cache_rows: usize,
    ) -> Self {
        let (parameters, buffers) = planned.element_counts();
        let head = planned.head.as_ref();
        let row_values: usize = head
            .inputs()
            .iter()
            .filter_map(|name| ctx.input_shapes.get(name))
            .map(|shape| shape.iter().product::<usize>())
            .sum();
        let batch_rows = config
            .batch_size
            .max(config.eval_batch_size)
            .min(cache_rows);
        let micro_rows = head
            .micro_batch_rows()
            .min(config.batch_size)
            .min(train_rows);
        let wide = |n: usize| n as u64;
        Self {
            parameters: wide(parameters),
            buffers: wide(buffers),
            targets: wide(cache_rows) * wide(ctx.num_labels),
            batch_rows: wide(batch_rows),
            batch_inputs: wide(batch_rows) * wide(row_values),
            activations: 2 * wide(head.activation_values(micro_rows)),
        }
    }

    /// Bytes of the parameters with their copies.
    pub fn parameter_bytes(&self) -> u64 {
        4 * COPIES_PER_PARAMETER * self.parameters
    }

    /// Bytes of one batch's inputs and activations.
    pub fn batch_bytes(&self) -> u64 {
        4 * (self.batch_inputs + self.activations)
    }

    /// Every byte counted.
    pub fn bytes(&self) -> u64 {
        self.parameter_bytes() + self.batch_bytes() + 4 * (self.buffers + self.targets)
    }

    /// Fails with the numbers when the estimate exceeds `limit`.
    pub fn check(&self, limit: MemoryLimit) -> Result<()> {
        let (limit, what) = match limit {
            MemoryLimit::Unlimited => return Ok(()),
            MemoryLimit::Bytes(bytes) => (bytes, "the --memory-limit".to_string()),
            MemoryLimit::Available => match available_memory() {
                Some((bytes, source)) => (bytes, format!("the memory available ({source})")),
                None => {
                    tracing::debug!("available memory unknown: the memory check is skipped");
                    return Ok(());
                }
            },
        };
        tracing::debug!("memory estimate {} of {limit} bytes ({what})", self.bytes());
        if self.bytes() > limit {
            bail!(
                "training this head needs about {} of memory, more than {what} of {}: its {} \
                 parameters take {} with their gradients, AdamW moments and the best epoch's \
                 copy; a batch of {} rows and its activations {}; the targets and fixed buffers \
                 {}. Use a smaller head or --batch-size, or set --memory-limit (a size such as \
                 64G, or none) if you know the machine has more",
                format_bytes(self.bytes()),
                format_bytes(limit),
                self.parameters,
                format_bytes(self.parameter_bytes()),
                self.batch_rows,
                format_bytes(self.batch_bytes()),
                format_bytes(4 * (self.buffers + self.targets)),
            );
        }
        Ok(())
    }
}

/// `1.0 KiB`, `21.4 GiB`: bytes with a binary unit and one decimal.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The bytes this process can allocate now and where that number comes from: `MemAvailable`
/// of `/proc/meminfo`, lowered to what the process's cgroup has left under its limit. `None`
/// where neither can be read (not Linux).
fn available_memory() -> Option<(u64, &'static str)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((kib * 1024, "MemAvailable in /proc/meminfo"))
        });
    let read =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    // cgroup v2, else v1 (whose "no limit" is a huge number, harmless here).
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ]
    .iter()
    .find_map(|(limit, usage)| {
        let left = read(limit)?.saturating_sub(read(usage)?);
        Some((left, "left under the cgroup's memory limit"))
    });
    match (meminfo, cgroup) {
        (Some(m), Some(c)) => Some(if c.0 < m.0 { c } else { m }),
        (m, c) => m.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_as_sizes_or_words() {
        assert_eq!("available".parse(), Ok(MemoryLimit::Available));
        assert_eq!("none".parse(), Ok(MemoryLimit::Unlimited));
        assert_eq!("1K".parse(), Ok(MemoryLimit::Bytes(1024)));
        assert_eq!("1.5G".parse(), Ok(MemoryLimit::Bytes(3 << 29)));
        assert_eq!("512MiB".parse(), Ok(MemoryLimit::Bytes(512 << 20)));
        assert_eq!("2048".parse(), Ok(MemoryLimit::Bytes(2048)));
        for bad in ["", "0", "-1G", "12X", "G", "NaN"] {
            assert!(bad.parse::<MemoryLimit>().is_err(), "{bad}");
        }
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1000), "1000 B");
        assert_eq!(format_bytes(21 << 30), "21.0 GiB");
    }

    #[test]
    fn an_estimate_over_the_limit_is_refused_with_its_parts() {
        let estimate = MemoryEstimate {
            parameters: 1 << 30,
            buffers: 0,
            targets: 0,
            batch_rows: 256,
            batch_inputs: 0,
            activations: 0,
        };
        assert_eq!(estimate.bytes(), 20 << 30);
        estimate.check(MemoryLimit::Bytes(20 << 30)).unwrap();
        estimate.check(MemoryLimit::Unlimited).unwrap();
        let err = estimate
            .check(MemoryLimit::Bytes(16 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("20.0 GiB") && err.contains("16.0 GiB") && err.contains("--memory-limit"),
            "{err}"
        );
    }
}
