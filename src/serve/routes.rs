//! The HTTP API: the routes, the state they share and their handlers.
//!
//! - `POST /v1/classify`: one image and caption (multipart or JSON) ->
//!   `{"labels": [...], "scores": {label: p}, "model": name}`.
//! - The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP/JSON): `GET /v2`,
//!   `GET /v2/health/live`, `GET /v2/health/ready` (200 once the weights are loaded, 400 before,
//!   as the protocol says), `GET /v2/models/{name}[/versions/1]` (metadata, plus the label
//!   vocabulary and thresholds), `GET .../ready`, `POST .../infer`.
//! - `GET /`: the page; `GET /metrics`: Prometheus text.
//!
//! Every error is JSON `{"error": ...}` with a 4xx status naming the problem (5xx when the
//! server is at fault or full), counted by kind in `/metrics`.

use super::batcher::{Answer, Batcher, Reply};
use super::metrics::{Endpoint, ErrorKind, Metrics};
use super::request::{
    ApiError, LABELS, Limits, PROBABILITIES, RawSample, classify_input, decode, infer_input,
    read_body,
};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use multiclip::backbone::Sample;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::json;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The one version of the served model (its checkpoint).
const VERSION: &str = "1";
/// Longest wait for a queued sample's forward pass (a stuck device, not a busy queue).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const PAGE: &str = include_str!("page.html");

/// What the checkpoint's sidecar says, known before the weights are loaded.
pub struct ModelInfo {
    pub name: String,
    pub labels: Vec<String>,
    pub thresholds: Vec<f32>,
}

/// The loaded model: its queue, and what its backbone reads.
pub struct Ready {
    pub batcher: Batcher,
    pub needs_images: bool,
    pub needs_text: bool,
}

/// Shared by every handler.
pub struct AppState {
    pub model: ModelInfo,
    pub ready: OnceLock<Ready>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// One permit per sample being decoded, queued or computed (`--max-queue`); bodies are read
    /// before, so that a slow client holds a connection only.
    pub admission: Arc<Semaphore>,
    /// One permit per image being decoded at once.
    pub decoding: Arc<Semaphore>,
}

/// Samples admitted; counted in flight until dropped.
struct Admitted {
    _permits: OwnedSemaphorePermit,
    samples: i64,
    metrics: Arc<Metrics>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.metrics.add_in_flight(-self.samples);
    }
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::unavailable(
                ErrorKind::NotReady,
                "the model is still loading (GET /v2/health/ready says when it is ready)",
            )
        })
    }

    /// Admits `samples` more samples, or answers 503 when `--max-queue` are already in.
    fn admit(&self, samples: usize) -> Result<Admitted, ApiError> {
        let permits = self
            .admission
            .clone()
            .try_acquire_many_owned(samples as u32)
            .map_err(|_| {
                ApiError::unavailable(
                    ErrorKind::Overloaded,
                    format!(
                        "the server is full ({} samples in flight, its --max-queue): retry later",
                        self.limits.max_samples
                    ),
                )
            })?;
        self.metrics.add_in_flight(samples as i64);
        Ok(Admitted {
            _permits: permits,
            samples: samples as i64,
            metrics: self.metrics.clone(),
        })
    }

    /// 404 unless `name` (and `version`, when given) is the served model.
    fn check_model(&self, name: &str, version: Option<&str>) -> Result<(), ApiError> {
        if name != self.model.name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorKind::UnknownModel,
                format!(
                    "no model `{name}` here: this server serves `{}`",
                    self.model.name
                ),
            ));
        }
        match version {
            Some(v) if v != VERSION => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorKind::UnknownModel,
                format!("model `{name}` has no version `{v}` (its one version is {VERSION})"),
            )),
            _ => Ok(()),
        }
    }

    /// The answer of a handler, its error counted.
    fn answer(&self, result: Result<Response, ApiError>) -> Response {
        result.unwrap_or_else(|error| {
            self.metrics.error(error.kind);
            if error.status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!("{}: {}", error.status, error.message);
            }
            error.into_response()
        })
    }

    /// Decodes `raws` (concurrently), queues them and waits for their probabilities and
    /// labels.
    async fn compute(
        self: &Arc<Self>,
        ready: &Ready,
        raws: Vec<RawSample>,
    ) -> Result<Vec<Answer>, ApiError> {
        let tasks: Vec<_> = raws
            .into_iter()
            .map(|raw| {
                let state = self.clone();
                let (images, text) = (ready.needs_images, ready.needs_text);
                tokio::spawn(async move {
                    decode(raw, images, text, state.limits.max_pixels, &state.decoding).await
                })
            })
            .collect();
        let mut samples: Vec<Sample> = Vec::with_capacity(tasks.len());
        for task in tasks {
            let decoded = task
                .await
                .map_err(|e| ApiError::internal(format!("decoding failed: {e}")))?;
            samples.push(decoded?);
        }
        let mut answers = Vec::with_capacity(samples.len());
        for sample in samples {
            let answer = ready.batcher.submit(sample).ok_or_else(|| {
                ApiError::unavailable(
                    ErrorKind::Overloaded,
                    "the forward queue is full: retry later",
                )
            })?;
            answers.push(answer);
        }
        let mut rows = Vec::with_capacity(answers.len());
        for answer in answers {
            let reply: Reply = tokio::time::timeout(REPLY_TIMEOUT, answer)
                .await
                .map_err(|_| {
                    ApiError::unavailable(
                        ErrorKind::Timeout,
                        "no forward pass within 120 s: the model is stuck",
                    )
                })?
                .map_err(|_| ApiError::internal("the forward thread stopped"))?;
            rows.push(reply.map_err(ApiError::internal)?);
        }
        Ok(rows)
    }
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/v1/classify", post(classify))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read by `read_body`, with the server's own limit and deadline.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The model name and version of a `/v2/models/{name}[/versions/{version}]` path.
#[derive(serde::Deserialize)]
struct ModelPath {
    name: String,
    version: Option<String>,
}

async fn page(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.request(Endpoint::Page);
    // The name as a JSON string, safe inside the page's <script>.
    let name = serde_json::to_string(&state.model.name)
        .unwrap_or_default()
        .replace('<', "\\u003c");
    Html(PAGE.replace("\"__MODEL_NAME__\"", &name)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.request(Endpoint::Metrics);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn live(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.request(Endpoint::Health);
    Json(json!({ "live": true })).into_response()
}

/// 200 `{"ready": true}` once loaded, 400 `{"ready": false}` before (the protocol's 4xx).
fn readiness(state: &AppState, body: serde_json::Value) -> Response {
    let status = if state.ready.get().is_some() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Json(body)).into_response()
}

async fn server_ready(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.request(Endpoint::Health);
    readiness(&state, json!({ "ready": state.ready.get().is_some() }))
}

async fn model_ready(State(state): State<Arc<AppState>>, Path(path): Path<ModelPath>) -> Response {
    state.metrics.request(Endpoint::Health);
    let checked = state.check_model(&path.name, path.version.as_deref());
    match checked {
        Ok(()) => readiness(
            &state,
            json!({ "name": path.name, "ready": state.ready.get().is_some() }),
        ),
        Err(error) => state.answer(Err(error)),
    }
}

async fn server_metadata(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.request(Endpoint::Metadata);
    Json(json!({
        "name": "multiclip",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
    .into_response()
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Response {
    state.metrics.request(Endpoint::Metadata);
    let result = (|| {
        state.check_model(&path.name, path.version.as_deref())?;
        let ready = state.ready()?;
        let tensor = |name: &str, datatype: &str, shape: serde_json::Value| json!({ "name": name, "datatype": datatype, "shape": shape });
        let mut inputs = Vec::new();
        if ready.needs_images {
            inputs.push(tensor("IMAGE", "BYTES", json!([-1])));
        }
        if ready.needs_text {
            inputs.push(tensor("CAPTION", "BYTES", json!([-1])));
        }
        let k = state.model.labels.len();
        Ok(Json(json!({
            "name": state.model.name,
            "versions": [VERSION],
            "platform": "multiclip_safetensors",
            "inputs": inputs,
            "outputs": [
                tensor(PROBABILITIES, "FP32", json!([-1, k])),
                tensor(LABELS, "BYTES", json!([-1])),
            ],
            "labels": state.model.labels,
            "thresholds": state.model.thresholds,
        }))
        .into_response())
    })();
    state.answer(result)
}

/// `{label: probability}` in vocabulary order.
struct Scores<'a> {
    labels: &'a [String],
    probabilities: &'a [f32],
}

impl Serialize for Scores<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.labels.len()))?;
        for (label, p) in self.labels.iter().zip(self.probabilities) {
            map.serialize_entry(label, p)?;
        }
        map.end()
    }
}

/// The answer of `/v1/classify`.
#[derive(Serialize)]
struct ClassifyResponse<'a> {
    labels: Vec<&'a str>,
    scores: Scores<'a>,
    model: &'a str,
}

/// The answer of an infer request (the protocol's `$inference_response`).
#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<TensorOutput>,
}

/// One `$response_output`: `data` flat, row-major.
#[derive(Serialize)]
struct TensorOutput {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    data: TensorData,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TensorData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

/// The labels chosen in `decisions`, in vocabulary order.
fn chosen<'a>(labels: &'a [String], decisions: &[bool]) -> Vec<&'a str> {
    labels
        .iter()
        .zip(decisions)
        .filter(|(_, on)| **on)
        .map(|(label, _)| label.as_str())
        .collect()
}

async fn classify(State(state): State<Arc<AppState>>, request: Request<Body>) -> Response {
    let start = Instant::now();
    state.metrics.request(Endpoint::Classify);
    let result = async {
        // The body first, so that the client reads the answer rather than a closed connection.
        let (parts, body) = request.into_parts();
        let bytes = read_body(&parts, body, &state.limits).await?;
        let ready = state.ready()?;
        let raw = classify_input(parts, bytes).await?;
        let _admitted = state.admit(1)?;
        let mut rows = state.compute(ready, vec![raw]).await?;
        let answer = rows.pop().ok_or_else(|| ApiError::internal("no row"))?;
        let labels = &state.model.labels;
        Ok(Json(ClassifyResponse {
            labels: chosen(labels, &answer.decisions),
            scores: Scores {
                labels,
                probabilities: &answer.probabilities,
            },
            model: &state.model.name,
        })
        .into_response())
    }
    .await;
    state.metrics.latency(start.elapsed());
    state.answer(result)
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
    request: Request<Body>,
) -> Response {
    let start = Instant::now();
    state.metrics.request(Endpoint::Infer);
    let result = async {
        // The body first, so that the client reads the answer rather than a closed connection.
        let (parts, body) = request.into_parts();
        let bytes = read_body(&parts, body, &state.limits).await?;
        state.check_model(&path.name, path.version.as_deref())?;
        let ready = state.ready()?;
        let input = infer_input(&parts, &bytes, &state.limits)?;
        drop(bytes);
        let n = input.samples.len();
        let _admitted = state.admit(n)?;
        let rows = state.compute(ready, input.samples).await?;
        let labels = &state.model.labels;
        let outputs = input
            .outputs
            .iter()
            .map(|&name| match name {
                PROBABILITIES => TensorOutput {
                    name,
                    datatype: "FP32",
                    shape: vec![n, labels.len()],
                    data: TensorData::Fp32(
                        rows.iter()
                            .flat_map(|a| a.probabilities.iter().copied())
                            .collect(),
                    ),
                },
                _ => TensorOutput {
                    name,
                    datatype: "BYTES",
                    shape: vec![n],
                    data: TensorData::Bytes(
                        rows.iter()
                            .map(|a| chosen(labels, &a.decisions).join(" "))
                            .collect(),
                    ),
                },
            })
            .collect();
        let response = InferResponse {
            model_name: &state.model.name,
            model_version: VERSION,
            id: input.id,
            outputs,
        };
        Ok(Json(response).into_response())
    }
    .await;
    state.metrics.latency(start.elapsed());
    state.answer(result)
}

async fn not_found(State(state): State<Arc<AppState>>, request: Request<Body>) -> Response {
    state.metrics.request(Endpoint::Other);
    state.answer(Err(ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorKind::NotFound,
        format!(
            "no endpoint {} {} (there are /v1/classify, /v2/..., /metrics and /)",
            request.method(),
            request.uri().path()
        ),
    )))
}

async fn method_not_allowed(
    State(state): State<Arc<AppState>>,
    request: Request<Body>,
) -> Response {
    state.metrics.request(Endpoint::Other);
    state.answer(Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::MethodNotAllowed,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )))
}
