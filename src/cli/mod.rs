//! One module per `multiclip` command: its clap arguments and the function that runs it; and
//! the pipeline files `multiclip run` reads.

pub mod cache;
pub mod dataset;
pub mod evaluate;
pub mod extract;
pub mod pipeline;
pub mod predict;
pub mod run;
pub mod train;

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
