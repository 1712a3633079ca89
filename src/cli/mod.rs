//! One module per `multiclip` command: its clap arguments and the function that runs it; and
//! the pipeline files `multiclip run` reads.

pub mod cache;
pub mod dataset;
pub mod evaluate;
pub mod extract;
pub mod pipeline;
pub mod predict;
pub mod run;
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
