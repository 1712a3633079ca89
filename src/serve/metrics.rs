//! The server's counters and histograms, rendered in the Prometheus text exposition format
//! (version 0.0.4): `# HELP` and `# TYPE` lines, then one sample per line; a histogram's
//! `_bucket{le="..."}` samples are cumulative and end with `le="+Inf"`, followed by `_sum` and
//! `_count`.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a request failed, as counted in `multiclip_request_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotAnImage,
    TooManyPixels,
    BodyTooLarge,
    MissingCaption,
    MissingImage,
    UnsupportedMediaType,
    BadRequest,
    UnknownModel,
    NotFound,
    MethodNotAllowed,
    Timeout,
    Overloaded,
    NotReady,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 14] = [
        Self::NotAnImage,
        Self::TooManyPixels,
        Self::BodyTooLarge,
        Self::MissingCaption,
        Self::MissingImage,
        Self::UnsupportedMediaType,
        Self::BadRequest,
        Self::UnknownModel,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::Timeout,
        Self::Overloaded,
        Self::NotReady,
        Self::Internal,
    ];

    /// The `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotAnImage => "not_an_image",
            Self::TooManyPixels => "too_many_pixels",
            Self::BodyTooLarge => "body_too_large",
            Self::MissingCaption => "missing_caption",
            Self::MissingImage => "missing_image",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::BadRequest => "bad_request",
            Self::UnknownModel => "unknown_model",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::NotReady => "not_ready",
            Self::Internal => "internal",
        }
    }
}

/// The endpoints counted in `multiclip_requests_total{endpoint}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Classify,
    Infer,
    Metadata,
    Health,
    Page,
    Metrics,
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 7] = [
        Self::Classify,
        Self::Infer,
        Self::Metadata,
        Self::Health,
        Self::Page,
        Self::Metrics,
        Self::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Classify => "classify",
            Self::Infer => "infer",
            Self::Metadata => "metadata",
            Self::Health => "health",
            Self::Page => "page",
            Self::Metrics => "metrics",
            Self::Other => "other",
        }
    }
}

/// A histogram with fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Default)]
struct HistogramState {
    /// Observations per bucket (not cumulative), one more than `bounds` for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.counts[bucket] += 1;
        state.sum += value;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&state.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += state.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", state.sum);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const SECONDS_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Everything `/metrics` shows.
pub struct Metrics {
    requests: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    batch_size: Histogram,
    latency: Histogram,
    forward: Histogram,
    queue_depth: AtomicU64,
    in_flight: AtomicU64,
    ready: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Endpoint::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            errors: ErrorKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            batch_size: Histogram::new(BATCH_BOUNDS),
            latency: Histogram::new(SECONDS_BOUNDS),
            forward: Histogram::new(SECONDS_BOUNDS),
            queue_depth: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            ready: AtomicU64::new(0),
        }
    }
}

fn index<T: PartialEq>(all: &[T], value: &T) -> usize {
    all.iter().position(|v| v == value).unwrap_or(0)
}

impl Metrics {
    pub fn request(&self, endpoint: Endpoint) {
        self.requests[index(&Endpoint::ALL, &endpoint)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[index(&ErrorKind::ALL, &kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// One forward pass of `rows` rows that took `elapsed`.
    pub fn batch(&self, rows: usize, elapsed: Duration) {
        self.batch_size.observe(rows as f64);
        self.forward.observe(elapsed.as_secs_f64());
    }

    /// A classification request answered (successfully or not) after `elapsed`.
    pub fn latency(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }

    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.store(depth as u64, Ordering::Relaxed);
    }

    pub fn add_in_flight(&self, delta: i64) {
        if delta >= 0 {
            self.in_flight.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.in_flight
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(1, Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP multiclip_requests_total HTTP requests received, by endpoint.\n\
             # TYPE multiclip_requests_total counter"
        );
        for (endpoint, count) in Endpoint::ALL.iter().zip(&self.requests) {
            let _ = writeln!(
                out,
                "multiclip_requests_total{{endpoint=\"{}\"}} {}",
                endpoint.name(),
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP multiclip_request_errors_total Requests answered with an error, by kind.\n\
             # TYPE multiclip_request_errors_total counter"
        );
        for (kind, count) in ErrorKind::ALL.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "multiclip_request_errors_total{{kind=\"{}\"}} {}",
                kind.name(),
                count.load(Ordering::Relaxed)
            );
        }
        self.batch_size.render(
            &mut out,
            "multiclip_batch_size",
            "Samples per forward pass of the model.",
        );
        self.forward.render(
            &mut out,
            "multiclip_forward_seconds",
            "Time of one forward pass (preprocessing, backbone and head) of a batch.",
        );
        self.latency.render(
            &mut out,
            "multiclip_request_duration_seconds",
            "Time from receiving a classification request to its answer.",
        );
        let gauges = [
            (
                "multiclip_queue_depth",
                "Samples waiting for a forward pass.",
                &self.queue_depth,
            ),
            (
                "multiclip_requests_in_flight",
                "Samples being decoded, queued or computed.",
                &self.in_flight,
            ),
            (
                "multiclip_model_ready",
                "1 once the checkpoint and its backbone are loaded.",
                &self.ready,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_end_with_inf_sum_and_count() {
        let metrics = Metrics::default();
        for rows in [1, 3, 3, 300] {
            metrics.batch(rows, Duration::from_millis(20));
        }
        metrics.error(ErrorKind::NotAnImage);
        metrics.request(Endpoint::Classify);
        let text = metrics.render();
        for line in [
            "# TYPE multiclip_batch_size histogram",
            "multiclip_batch_size_bucket{le=\"1\"} 1",
            "multiclip_batch_size_bucket{le=\"2\"} 1",
            "multiclip_batch_size_bucket{le=\"4\"} 3",
            "multiclip_batch_size_bucket{le=\"256\"} 3",
            "multiclip_batch_size_bucket{le=\"+Inf\"} 4",
            "multiclip_batch_size_sum 307",
            "multiclip_batch_size_count 4",
            "multiclip_request_errors_total{kind=\"not_an_image\"} 1",
            "multiclip_requests_total{endpoint=\"classify\"} 1",
            "multiclip_queue_depth 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Every sample line is `name{labels} value` or `name value`, with a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
