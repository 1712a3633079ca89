//! Reading requests: the body within its size limit and deadline; the inputs of `/v1/classify`
//! (multipart with an `image` file and a `caption` field, or JSON `{"image": base64,
//! "caption": ...}`) and of the Open Inference Protocol's infer request (`IMAGE` and `CAPTION`
//! BYTES tensors); decoding images off the async threads; and the JSON error answer
//! `{"error": ...}` with its status and the kind it is counted as.

use super::metrics::ErrorKind;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use multiclip::backbone::Sample;
use multiclip::data::image::{ImageLoadError, decode_rgb};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// A request that cannot be answered: status, counted kind, message, and for 503 the seconds
/// after which to retry.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadRequest, message)
    }

    /// 503 with `Retry-After: 1`.
    pub fn unavailable(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, kind, message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Internal,
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({ "error": self.message }));
        let mut response = (self.status, body).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// What a request may send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of a request body.
    pub max_body: usize,
    /// Time to receive the whole body.
    pub read_timeout: Duration,
    /// Pixels of an image (checked from its header).
    pub max_pixels: u64,
    /// Samples of one infer request.
    pub max_samples: usize,
}

/// Reads the whole body within `limits`: 413 over the size limit, 408 past the deadline. A body
/// over the limit is read on and dropped (up to twice the limit) before the answer, so that a
/// client that sends it all before reading gets the 413 rather than a broken connection; one
/// that announced it with `Expect: 100-continue` is answered before it sends anything.
pub async fn read_body(parts: &Parts, body: Body, limits: &Limits) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTooLarge,
            format!(
                "the request body is over the limit of {} bytes (the server's --max-body-mb)",
                limits.max_body
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let announced_too_large = declared.is_some_and(|n| n > limits.max_body as u64);
    if announced_too_large && expects_continue {
        return Err(too_large());
    }
    let limit = if announced_too_large {
        0
    } else {
        limits.max_body
    };
    let give_up = limits.max_body.saturating_mul(2);
    match tokio::time::timeout(limits.read_timeout, read_limited(body, limit, give_up)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Timeout,
            format!(
                "the request body did not arrive within {} s",
                limits.read_timeout.as_secs_f64()
            ),
        )),
        Ok(Err(error)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {error}"
        ))),
        Ok(Ok(None)) => Err(too_large()),
        Ok(Ok(Some(bytes))) if announced_too_large => {
            drop(bytes);
            Err(too_large())
        }
        Ok(Ok(Some(bytes))) => Ok(bytes),
    }
}

/// The body's bytes, or `None` when it holds more than `limit`; past the limit it is read on
/// and dropped until `give_up` bytes in all.
async fn read_limited(
    mut body: Body,
    limit: usize,
    give_up: usize,
) -> Result<Option<Bytes>, axum::Error> {
    use http_body_util::BodyExt as _;
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len());
        if total <= limit {
            bytes.extend_from_slice(&data);
        } else {
            bytes = Vec::new();
            if total > give_up {
                break;
            }
        }
    }
    Ok((total <= limit).then(|| Bytes::from(bytes)))
}

/// The media type of the request, without parameters, lower-cased.
fn media_type(parts: &Parts) -> Option<String> {
    let value = parts.headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim().to_ascii_lowercase())
}

fn unsupported(found: Option<String>, expected: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorKind::UnsupportedMediaType,
        match found {
            Some(found) => format!("content type {found} is not accepted here: send {expected}"),
            None => format!("the request has no Content-Type: send {expected}"),
        },
    )
}

/// One sample as sent: the image file's bytes and the caption, and how messages name it (after
/// "image": `` `photo.png` ``, `upload`, `IMAGE[3]`).
#[derive(Debug, Default)]
pub struct RawSample {
    pub name: String,
    pub image: Option<Bytes>,
    pub caption: Option<String>,
}

/// Accepts base64 with or without its `=` padding.
fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

fn from_base64(text: &str, what: &str) -> Result<Bytes, ApiError> {
    base64_engine()
        .decode(text.trim())
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request(format!("{what} is not base64: {e}")))
}

/// The input of `POST /v1/classify`.
pub async fn classify_input(parts: Parts, body: Bytes) -> Result<RawSample, ApiError> {
    const EXPECTED: &str = "multipart/form-data (an `image` file and a `caption` field) or \
                            application/json ({\"image\": base64, \"caption\": text})";
    match media_type(&parts).as_deref() {
        Some("multipart/form-data") => multipart_input(parts, body).await,
        Some("application/json") => json_input(&body),
        other => Err(unsupported(other.map(str::to_string), EXPECTED)),
    }
}

async fn multipart_input(parts: Parts, body: Bytes) -> Result<RawSample, ApiError> {
    let request = Request::from_parts(parts, Body::from(body));
    let mut form = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    })?;
    let mut sample = RawSample {
        name: "upload".into(),
        ..RawSample::default()
    };
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    };
    while let Some(field) = form.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" if sample.image.is_none() => {
                if let Some(file) = field.file_name() {
                    sample.name = format!("`{file}`");
                }
                sample.image = Some(field.bytes().await.map_err(malformed)?);
            }
            "caption" if sample.caption.is_none() => {
                sample.caption = Some(field.text().await.map_err(malformed)?);
            }
            "image" | "caption" => {
                return Err(ApiError::bad_request(format!(
                    "the form has two `{name}` fields"
                )));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown form field `{other}` (expected `image` and `caption`)"
                )));
            }
        }
    }
    Ok(sample)
}

fn json_input(body: &[u8]) -> Result<RawSample, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Classify {
        image: Option<String>,
        caption: Option<String>,
    }
    let parsed: Classify = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(RawSample {
        name: "upload".into(),
        image: parsed
            .image
            .map(|text| from_base64(&text, "`image`"))
            .transpose()?,
        caption: parsed.caption,
    })
}

/// The output names of the infer endpoint.
pub const PROBABILITIES: &str = "PROBABILITIES";
pub const LABELS: &str = "LABELS";

/// An Open Inference Protocol inference request, read.
pub struct InferInput {
    pub id: Option<String>,
    pub samples: Vec<RawSample>,
    /// The outputs asked for, in the order asked (all when the request names none).
    pub outputs: Vec<&'static str>,
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    inputs: Vec<TensorInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct TensorInput {
    name: String,
    shape: Vec<u64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
}

/// The input of `POST /v2/models/{name}/infer`: `IMAGE` (base64 strings of image files) and
/// `CAPTION` (strings), BYTES tensors of shape `[n]` or `[n, 1]`, `data` flat or nested.
pub fn infer_input(parts: &Parts, body: &[u8], limits: &Limits) -> Result<InferInput, ApiError> {
    match media_type(parts).as_deref() {
        Some("application/json") | None => {}
        Some(other) => {
            return Err(unsupported(
                Some(other.to_string()),
                "application/json (an inference request)",
            ));
        }
    }
    let request: InferRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid inference request: {e}")))?;
    let mut images = None;
    let mut captions = None;
    for input in &request.inputs {
        let slot = match input.name.as_str() {
            "IMAGE" => &mut images,
            "CAPTION" => &mut captions,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown input `{other}`: the model reads IMAGE and CAPTION"
                )));
            }
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!(
                "input `{}` is given twice",
                input.name
            )));
        }
        *slot = Some(bytes_tensor(input, limits)?);
    }
    let n = match (&images, &captions) {
        (Some(i), Some(c)) if i.len() != c.len() => {
            return Err(ApiError::bad_request(format!(
                "IMAGE has {} elements but CAPTION has {}: one of each per sample",
                i.len(),
                c.len()
            )));
        }
        (Some(values), _) | (None, Some(values)) => values.len(),
        (None, None) => return Err(ApiError::bad_request("the request has no inputs")),
    };
    let mut samples: Vec<RawSample> = (0..n)
        .map(|i| RawSample {
            name: format!("IMAGE[{i}]"),
            ..RawSample::default()
        })
        .collect();
    for (i, text) in images.into_iter().flatten().enumerate() {
        samples[i].image = Some(from_base64(&text, &format!("IMAGE[{i}]"))?);
    }
    for (i, text) in captions.into_iter().flatten().enumerate() {
        samples[i].caption = Some(text);
    }
    let outputs = match request.outputs {
        None => vec![PROBABILITIES, LABELS],
        Some(asked) => asked
            .iter()
            .map(|o| match o.name.as_str() {
                PROBABILITIES => Ok(PROBABILITIES),
                LABELS => Ok(LABELS),
                other => Err(ApiError::bad_request(format!(
                    "unknown output `{other}`: the model gives PROBABILITIES and LABELS"
                ))),
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(InferInput {
        id: request.id,
        samples,
        outputs,
    })
}

/// The strings of a BYTES tensor of shape `[n]` or `[n, 1]`.
fn bytes_tensor(input: &TensorInput, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let name = &input.name;
    if input.datatype != "BYTES" {
        return Err(ApiError::bad_request(format!(
            "input `{name}` has datatype {}, expected BYTES",
            input.datatype
        )));
    }
    let n = match input.shape.as_slice() {
        [n] | [n, 1] => *n,
        other => {
            return Err(ApiError::bad_request(format!(
                "input `{name}` has shape {other:?}, expected [n] or [n, 1] (n samples)"
            )));
        }
    };
    let mut values = Vec::new();
    flatten_strings(&input.data, name, &mut values)?;
    if values.len() as u64 != n {
        return Err(ApiError::bad_request(format!(
            "input `{name}` has shape {:?} but {} elements",
            input.shape,
            values.len()
        )));
    }
    if values.is_empty() || values.len() > limits.max_samples {
        return Err(ApiError::bad_request(format!(
            "input `{name}` has {} samples; a request holds 1 to {} (the server's --max-queue)",
            values.len(),
            limits.max_samples
        )));
    }
    Ok(values)
}

fn flatten_strings(data: &Value, name: &str, out: &mut Vec<String>) -> Result<(), ApiError> {
    match data {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => {
            for item in items {
                flatten_strings(item, name, out)?;
            }
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "input `{name}` holds {other}, but BYTES elements are strings in JSON (base64 for \
                 IMAGE)"
            )));
        }
    }
    Ok(())
}

/// Turns a sent sample into a backbone sample: the image decoded on a blocking thread (at most
/// as many at once as `decoding` has permits), after checking that what the backbone reads is
/// there.
pub async fn decode(
    raw: RawSample,
    needs_images: bool,
    needs_text: bool,
    max_pixels: u64,
    decoding: &Arc<Semaphore>,
) -> Result<Sample, ApiError> {
    let caption = raw.caption.unwrap_or_default();
    if needs_text && caption.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::MissingCaption,
            format!(
                "no caption for {}: this model's backbone reads text, send a non-empty caption",
                raw.name
            ),
        ));
    }
    let image = match (raw.image, needs_images) {
        (Some(bytes), true) => {
            let _permit = decoding
                .acquire()
                .await
                .map_err(|_| ApiError::internal("the decoder pool is closed"))?;
            let name = raw.name.clone();
            let decoded = tokio::task::spawn_blocking(move || {
                decode_rgb(&bytes, Path::new(&name), max_pixels)
            })
            .await
            .map_err(|e| ApiError::internal(format!("decoding {} failed: {e}", raw.name)))?;
            Some(decoded.map_err(image_error)?)
        }
        (None, true) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::MissingImage,
                format!(
                    "no image for {}: this model's backbone reads images",
                    raw.name
                ),
            ));
        }
        (_, false) => None,
    };
    Ok(Sample {
        id: raw.name,
        image,
        caption,
    })
}

fn image_error(error: ImageLoadError) -> ApiError {
    match error {
        ImageLoadError::TooLarge {
            path,
            width,
            height,
            limit,
        } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooManyPixels,
            format!(
                "{} is {width}x{height} = {} pixels, over the limit of {limit} pixels (the \
                 server's --max-pixels)",
                path.display(),
                width as u64 * height as u64
            ),
        ),
        other => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::NotAnImage,
            other.to_string(),
        ),
    }
}
