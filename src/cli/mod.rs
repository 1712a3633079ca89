//! One module per `multiclip` command: its clap arguments and the function that runs it; the
//! pipeline files `multiclip run` reads; and what several commands share (`--device`, value
//! parsers, logging).

use anyhow::{Context, Result, bail};
use candle_core::Device;

pub mod cache;
pub mod checkpoint;
pub mod dataset;
pub mod evaluate;
pub mod extract;
pub mod live;
pub mod pipeline;
pub mod predict;
pub mod run;
pub mod serve;
pub mod sweep;
pub mod train;

/// A clap value parser for one of a closed set of library values: `all` lists them and `name`
/// names each (help and errors show the names). The library itself stays free of clap.
pub fn one_of<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    name: fn(T) -> &'static str,
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(all.iter().map(|&value| name(value))).try_map(
        move |chosen: String| {
            all.iter()
                .copied()
                .find(|&value| name(value) == chosen)
                .ok_or("not one of the listed values")
        },
    )
}

/// `--trust-cache`, shared by the commands that read a cache.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct CacheCheck {
    /// Skip the content hash of the cache's shards when opening it (sizes, headers, row ids and
    /// non-finite values are still checked): for a cache verified already, on storage where
    /// reading it whole costs too much.
    #[arg(long)]
    pub trust_cache: bool,
}

impl CacheCheck {
    pub fn integrity(self) -> multiclip::cache::Integrity {
        if self.trust_cache {
            multiclip::cache::Integrity::Headers
        } else {
            multiclip::cache::Integrity::Full
        }
    }
}

/// `--device`: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        let gpu = |index: &str| index.parse().map(DeviceArg::Cuda).ok();
        match name {
            "cpu" => Some(DeviceArg::Cpu),
            "cuda" => Some(DeviceArg::Cuda(0)),
            _ => name.strip_prefix("cuda:").and_then(gpu),
        }
        .ok_or_else(|| format!("unknown device {name:?}: expected cpu, cuda or cuda:N"))
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// A clap value parser for a count of rows (or items) that must be at least 1.
pub fn at_least_one_row() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

impl DeviceArg {
    /// The candle device; a clear error when this binary has no CUDA support or the GPU cannot
    /// be opened.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(_) if !candle_core::utils::cuda_is_available() => bail!(
                "--device {self}: this multiclip was built without the `cuda` feature; build it \
                 with `cargo build --release --features cuda` (README, GPU extraction)"
            ),
            DeviceArg::Cuda(index) => Device::new_cuda(index)
                .with_context(|| format!("--device {self}: cannot open GPU {index}")),
        }
    }
}

/// Logs go to stderr through `tracing`; `RUST_LOG` selects the level (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
