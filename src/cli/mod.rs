//! One module per `multiclip` command: its clap arguments and the function that runs it; and
//! the pipeline files `multiclip run` reads.

pub mod cache;
pub mod checkpoint;
pub mod dataset;
pub mod evaluate;
pub mod extract;
pub mod pipeline;
pub mod predict;
pub mod run;
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

/// A clap value parser for a count of rows (or items) that must be at least 1.
pub fn at_least_one_row() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
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
