//! `multiclip serve`: a checkpoint on its live backbone behind HTTP (axum on tokio).
//!
//! The server listens at once and loads the weights on a thread of its own; it is ready
//! (`/v2/health/ready`) when they are loaded and checked. Requests are read within a size limit
//! and a deadline, their images decoded on blocking threads, and their samples queued for the
//! dedicated forward thread, which batches them ([`batcher`]). Every resource is bounded:
//! connections (`--max-connections`; more wait in the kernel's backlog), bytes per body
//! (`--max-body-mb`, so bodies being read hold at most connections x that), time to send the
//! headers and the body (a slow client holds only its connection), samples decoded, queued or
//! computed (`--max-queue`; more are answered 503 with `Retry-After`) and pixels per image
//! (`--max-pixels`). On SIGTERM or
//! Ctrl-C the server stops accepting, lets the requests in flight finish (for at most
//! `--shutdown-timeout-s`), then returns.
//!
//! Modules: [`routes`] (the endpoints), [`request`] (reading and checking requests),
//! [`batcher`] (dynamic batching), [`metrics`] (Prometheus text).

mod batcher;
mod metrics;
mod request;
mod routes;

pub use batcher::BatchPolicy;
pub use request::Limits;

use anyhow::{Context, Result, anyhow};
use candle_core::Device;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use metrics::Metrics;
use multiclip::classify::Classifier;
use multiclip::model::ModelCard;
use multiclip::model::checkpoint::read_sidecar;
use routes::{AppState, ModelInfo, Ready};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

/// Everything `multiclip serve` is told.
pub struct ServeOptions {
    pub checkpoint: PathBuf,
    pub addr: String,
    pub backbone_root: PathBuf,
    pub device: Device,
    pub policy: BatchPolicy,
    pub limits: Limits,
    pub max_connections: usize,
    /// Time for a client to send a request's headers (also an idle keep-alive connection's
    /// life).
    pub header_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Images decoded at once.
    pub decode_threads: usize,
}

/// Serves until SIGTERM or Ctrl-C (then finishes the requests in flight), or until loading the
/// model fails.
pub fn run(options: ServeOptions) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
        .context("starting the async runtime")?
        .block_on(serve(options))
}

async fn serve(options: ServeOptions) -> Result<()> {
    let card: ModelCard = read_sidecar(&options.checkpoint)?;
    let listener = TcpListener::bind(&options.addr)
        .await
        .with_context(|| format!("cannot listen on {} (--addr)", options.addr))?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState {
        model: ModelInfo {
            name: card.name.clone(),
            labels: card.labels.clone(),
            thresholds: card.thresholds.clone(),
        },
        ready: OnceLock::new(),
        limits: options.limits,
        metrics: metrics.clone(),
        admission: Arc::new(Semaphore::new(options.limits.max_samples)),
        decoding: Arc::new(Semaphore::new(options.decode_threads.max(1))),
    });
    // The first line on stdout says where to connect (a test or script reads it).
    println!("serving {} on http://{addr}", card.name);
    let _ = std::io::stdout().flush();
    tracing::info!("loading the weights of {}", card.name);

    let (loaded, load_result) = oneshot::channel();
    let (checkpoint, root, device) = (
        options.checkpoint.clone(),
        options.backbone_root.clone(),
        options.device.clone(),
    );
    std::thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            let _ = loaded.send(Classifier::load(&checkpoint, &root, &device));
        })
        .context("starting the loading thread")?;
    let become_ready = async {
        let classifier = load_result
            .await
            .map_err(|_| anyhow!("the loading thread stopped"))?
            .context("cannot serve the checkpoint")?;
        let ready = Ready {
            needs_images: classifier.needs_images(),
            needs_text: classifier.needs_text(),
            batcher: batcher::Batcher::start(classifier, options.policy, metrics.clone())
                .context("starting the forward thread")?,
        };
        let _ = state.ready.set(ready);
        metrics.set_ready();
        tracing::info!("ready: {} on http://{addr}", card.name);
        std::future::pending::<Result<()>>().await
    };
    tokio::select! {
        served = accept(listener, routes::router(state.clone()), &options) => served,
        failed = become_ready => failed,
    }
}

/// Accepts connections until SIGTERM or Ctrl-C, then waits for them to finish.
async fn accept(listener: TcpListener, app: axum::Router, options: &ServeOptions) -> Result<()> {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut signal = std::pin::pin!(shutdown_signal());
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit?,
            () = &mut signal => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // E.g. out of file descriptors: wait for connections to close.
                    tracing::warn!("cannot accept a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_timeout)
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(app.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!("connection from {peer}: {error}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing the requests in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("every connection closed"),
        () = tokio::time::sleep(options.shutdown_timeout) => tracing::warn!(
            "connections still open after {} s (--shutdown-timeout-s): exiting anyway",
            options.shutdown_timeout.as_secs()
        ),
    }
    Ok(())
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {error}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
