//! `multiclip serve` as a child process on an ephemeral loopback port, with a real HTTP client
//! and the tiny fixtures: answers equal `predict --data` on the same inputs; every bad request is
//! a 4xx JSON error naming it; slow clients hold up no one; a full queue is a 503 with
//! Retry-After; concurrent requests share forward passes; SIGTERM lets requests in flight finish,
//! then the process exits 0.

mod live_support;

use base64::Engine as _;
use live_support::{Trained, multiclip, run_ok};
use multiclip::data::{Dataset, Part};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running `multiclip serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    name: String,
}

impl Server {
    /// Starts the server on `checkpoint` with `extra` flags and waits until it is ready.
    fn start(checkpoint: &Path, extra: &[&str]) -> Server {
        let mut child = multiclip()
            .arg("serve")
            .arg("--checkpoint")
            .arg(checkpoint)
            .args(["--addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "serving NAME on http://127.0.0.1:PORT"
        let mut words = line.split_whitespace().skip(1);
        let name = words
            .next()
            .expect("the first line names the model")
            .to_string();
        let url = words.nth(1).expect("and the address").to_string();
        let server = Server { child, url, name };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match ureq::get(&server.at("/v2/health/ready")).call() {
                Ok(response) if response.status() == 200 => return server,
                _ if Instant::now() > deadline => panic!("the server never became ready"),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `/v2/models/NAME{rest}`.
    fn model_path(&self, rest: &str) -> String {
        format!("/v2/models/{}{rest}", self.name)
    }

    fn model(&self, rest: &str) -> String {
        self.at(&self.model_path(rest))
    }

    fn metrics(&self) -> String {
        ureq::get(&self.at("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// The value of the sample line `name` in /metrics.
    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and JSON body of a response (error statuses included).
fn answer(result: Result<ureq::Response, ureq::Error>) -> (u16, Value, Option<String>) {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => panic!("no HTTP answer: {other}"),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(str::to_string);
    let text = response.into_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, body, retry_after)
}

const BOUNDARY: &str = "multiclip-test-boundary";

/// A multipart/form-data body with the given fields: (name, file name, bytes).
fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file, bytes) in fields {
        let file = file.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        body.extend(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
            )
            .bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{BOUNDARY}--\r\n").bytes());
    body
}

fn post_form(server: &Server, fields: &[(&str, Option<&str>, &[u8])]) -> (u16, Value) {
    let (status, body, _) = answer(
        ureq::post(&server.at("/v1/classify"))
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .send_bytes(&multipart(fields)),
    );
    (status, body)
}

fn post_json(server: &Server, path: &str, body: &Value) -> (u16, Value, Option<String>) {
    answer(
        ureq::post(&server.at(path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    )
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One test row: id, image bytes, caption.
struct Row {
    id: String,
    image: Vec<u8>,
    caption: String,
}

fn test_rows(data: &Path) -> Vec<Row> {
    let dataset = Dataset::open(data).unwrap();
    dataset
        .records(Part::Test)
        .unwrap()
        .into_iter()
        .map(|r| Row {
            image: std::fs::read(dataset.image_file(&r.id).unwrap()).unwrap(),
            id: r.id,
            caption: r.caption,
        })
        .collect()
}

/// `predict --data` of the test rows, each alone through the backbone and the head: id ->
/// (labels, probabilities as written with 6 decimals).
fn predict_one_by_one(t: &Trained) -> HashMap<String, (String, Vec<String>)> {
    let (predictions, probabilities) = (t.dir.path().join("p.csv"), t.dir.path().join("q.csv"));
    run_ok(
        multiclip()
            .args(["predict", "--backbone-batch-size", "1", "--batch-size", "1"])
            .arg("--data")
            .arg(&t.data)
            .arg("--checkpoint")
            .arg(&t.checkpoint)
            .arg("--out")
            .arg(&predictions)
            .arg("--probabilities")
            .arg(&probabilities),
    );
    let labels: HashMap<String, String> = std::fs::read_to_string(predictions)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (id, labels) = l.split_once(',').unwrap();
            (id.to_string(), labels.to_string())
        })
        .collect();
    std::fs::read_to_string(probabilities)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let mut fields = l.split(',').map(str::to_string);
            let id = fields.next().unwrap();
            (id.clone(), (labels[&id].clone(), fields.collect()))
        })
        .collect()
}

/// (labels joined by spaces, probabilities with 6 decimals) of a `/v1/classify` answer.
fn classify_answer(body: &Value, vocabulary: &[String]) -> (String, Vec<String>) {
    let labels: Vec<&str> = body["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let scores = &body["scores"];
    let probabilities = vocabulary
        .iter()
        .map(|label| format!("{:.6}", scores[label].as_f64().unwrap() as f32))
        .collect();
    (labels.join(" "), probabilities)
}

fn vocabulary(server: &Server) -> Vec<String> {
    let (status, metadata, _) = answer(ureq::get(&server.model("")).call());
    assert_eq!(status, 200, "{metadata}");
    serde_json::from_value(metadata["labels"].clone()).unwrap()
}

#[test]
fn answers_equal_predict_on_the_same_inputs() {
    let t = Trained::new("f16", 40, 12);
    let expected = predict_one_by_one(&t);
    let server = Server::start(&t.checkpoint, &["--max-batch", "1"]);
    let vocabulary = vocabulary(&server);
    let rows = test_rows(&t.data);
    for row in &rows {
        let (status, body) = post_form(
            &server,
            &[
                ("image", Some("x.png"), &row.image),
                ("caption", None, row.caption.as_bytes()),
            ],
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], server.name.as_str());
        assert_eq!(
            classify_answer(&body, &vocabulary),
            expected[&row.id],
            "{}",
            row.id
        );
        // The same sample as JSON gives the same answer.
        let (status, json_body, _) = post_json(
            &server,
            "/v1/classify",
            &json!({"image": base64(&row.image), "caption": row.caption}),
        );
        assert_eq!((status, &json_body), (200, &body));
    }

    // The Open Inference Protocol: all rows in one request.
    let request = json!({
        "id": "42",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [rows.len()],
             "data": rows.iter().map(|r| base64(&r.image)).collect::<Vec<_>>()},
            {"name": "CAPTION", "datatype": "BYTES", "shape": [rows.len(), 1],
             "data": rows.iter().map(|r| vec![r.caption.clone()]).collect::<Vec<_>>()},
        ],
    });
    let (status, body, _) = post_json(&server, &server.model_path("/infer"), &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "42");
    assert_eq!(body["model_name"], server.name.as_str());
    let outputs = body["outputs"].as_array().unwrap();
    let k = vocabulary.len();
    assert_eq!(outputs[0]["name"], "PROBABILITIES");
    assert_eq!(outputs[0]["datatype"], "FP32");
    assert_eq!(outputs[0]["shape"], json!([rows.len(), k]));
    assert_eq!(outputs[1]["name"], "LABELS");
    assert_eq!(outputs[1]["shape"], json!([rows.len()]));
    let probabilities = outputs[0]["data"].as_array().unwrap();
    for (i, row) in rows.iter().enumerate() {
        let got: Vec<String> = probabilities[i * k..(i + 1) * k]
            .iter()
            .map(|p| format!("{:.6}", p.as_f64().unwrap() as f32))
            .collect();
        let labels = outputs[1]["data"][i].as_str().unwrap().to_string();
        assert_eq!((labels, got), expected[&row.id], "{}", row.id);
    }
    // Only the outputs asked for.
    let mut only_labels = request.clone();
    only_labels["outputs"] = json!([{"name": "LABELS"}]);
    let (status, body, _) = post_json(
        &server,
        &server.model_path("/versions/1/infer"),
        &only_labels,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(body["outputs"][0]["name"], "LABELS");
}

#[test]
fn metadata_and_health_follow_the_protocol() {
    let t = Trained::new("f16", 24, 2);
    let server = Server::start(&t.checkpoint, &[]);
    let (status, live, _) = answer(ureq::get(&server.at("/v2/health/live")).call());
    assert_eq!((status, live), (200, json!({"live": true})));
    let (status, ready, _) = answer(ureq::get(&server.at("/v2/health/ready")).call());
    assert_eq!((status, ready), (200, json!({"ready": true})));
    let (status, ready, _) = answer(ureq::get(&server.model("/ready")).call());
    assert_eq!(
        (status, ready),
        (200, json!({"name": server.name, "ready": true}))
    );
    let (status, meta, _) = answer(ureq::get(&server.model("")).call());
    assert_eq!(status, 200);
    assert_eq!(meta["name"], server.name.as_str());
    assert_eq!(meta["versions"], json!(["1"]));
    assert!(meta["platform"].is_string());
    assert_eq!(
        meta["inputs"],
        json!([
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "CAPTION", "datatype": "BYTES", "shape": [-1]},
        ])
    );
    let k = meta["labels"].as_array().unwrap().len();
    assert!(k > 1);
    assert_eq!(meta["thresholds"].as_array().unwrap().len(), k);
    assert_eq!(
        meta["outputs"],
        json!([
            {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, k]},
            {"name": "LABELS", "datatype": "BYTES", "shape": [-1]},
        ])
    );
    let (status, versioned, _) = answer(ureq::get(&server.model("/versions/1")).call());
    assert_eq!((status, &versioned), (200, &meta));
    let (status, server_meta, _) = answer(ureq::get(&server.at("/v2")).call());
    assert_eq!(status, 200);
    assert_eq!(server_meta["name"], "multiclip");
    // The page names the model and loads nothing from elsewhere.
    let page = ureq::get(&server.url)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains(&server.name));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    let metrics = server.metrics();
    assert!(
        metrics.contains("# TYPE multiclip_batch_size histogram"),
        "{metrics}"
    );
    assert_eq!(server.metric("multiclip_model_ready"), 1.0);
}

/// A PNG of `width` x `height` pixels.
fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, 90])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

#[test]
fn bad_requests_get_4xx_json_naming_the_problem() {
    let t = Trained::new("f16", 24, 2);
    let server = Server::start(
        &t.checkpoint,
        &["--max-pixels", "1000", "--max-body-mb", "1"],
    );
    let good = png(20, 20);
    let caption: &[u8] = b"a caption";
    let expect = |(status, body): (u16, Value), want: u16, says: &str| {
        assert_eq!(status, want, "{body}");
        let error = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
        assert!(error.contains(says), "{error:?} should say {says:?}");
    };
    let form = |fields: &[(&str, Option<&str>, &[u8])]| post_form(&server, fields);
    let json = |path: &str, body: Value| {
        let (status, body, _) = post_json(&server, path, &body);
        (status, body)
    };

    expect(
        form(&[
            ("image", Some("a.png"), b"not an image"),
            ("caption", None, caption),
        ]),
        400,
        "`a.png` is corrupt, truncated or not an image",
    );
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    expect(
        form(&[
            ("image", Some("t.png"), &truncated),
            ("caption", None, caption),
        ]),
        400,
        "`t.png`",
    );
    expect(
        form(&[
            ("image", Some("big.png"), &png(40, 40)),
            ("caption", None, caption),
        ]),
        413,
        "40x40 = 1600 pixels, over the limit of 1000 pixels",
    );
    expect(
        form(&[
            ("image", None, &vec![0u8; 1_100_000]),
            ("caption", None, caption),
        ]),
        413,
        "over the limit of 1048576 bytes",
    );
    expect(form(&[("image", None, &good)]), 400, "no caption");
    expect(
        form(&[("image", None, &good), ("caption", None, b"   ")]),
        400,
        "no caption",
    );
    expect(form(&[("caption", None, caption)]), 400, "no image");
    expect(
        form(&[
            ("image", None, &good),
            ("caption", None, caption),
            ("extra", None, b"1"),
        ]),
        400,
        "unknown form field `extra`",
    );
    let (status, body, _) = answer(
        ureq::post(&server.at("/v1/classify"))
            .set("Content-Type", "text/plain")
            .send_string("hello"),
    );
    expect(
        (status, body),
        415,
        "content type text/plain is not accepted",
    );
    let (status, body, _) = answer(ureq::post(&server.at("/v1/classify")).send_bytes(b"x"));
    expect((status, body), 415, "no Content-Type");
    expect(
        json("/v1/classify", json!({"image": "%%%", "caption": "c"})),
        400,
        "`image` is not base64",
    );
    expect(
        json("/v1/classify", json!({"imag": "", "caption": "c"})),
        400,
        "unknown field `imag`",
    );
    let (status, body, _) = answer(
        ureq::post(&server.at("/v1/classify"))
            .set("Content-Type", "application/json")
            .send_string("{not json"),
    );
    expect((status, body), 400, "invalid JSON body");

    // The Open Inference Protocol.
    let infer = server.model_path("/infer");
    let tensor = |name: &str, datatype: &str, shape: Value, data: Value| json!({"name": name, "datatype": datatype, "shape": shape, "data": data});
    let image = tensor("IMAGE", "BYTES", json!([1]), json!([base64(&good)]));
    let text = tensor("CAPTION", "BYTES", json!([1]), json!(["a caption"]));
    expect(
        json("/v2/models/nope/infer", json!({"inputs": [image, text]})),
        404,
        "no model `nope`",
    );
    let (status, body, _) = answer(ureq::get(&server.at("/v2/models/nope")).call());
    expect((status, body), 404, "no model `nope`");
    let versioned = server.model_path("/versions/7/infer");
    expect(
        json(&versioned, json!({"inputs": [image, text]})),
        404,
        "no version `7`",
    );
    expect(json(&infer, json!({"inputs": [image]})), 400, "no caption");
    expect(json(&infer, json!({"inputs": [text]})), 400, "no image");
    expect(
        json(
            &infer,
            json!({"inputs": [tensor("IMAGE", "FP32", json!([1]), json!([1.0])), text]}),
        ),
        400,
        "datatype FP32, expected BYTES",
    );
    expect(
        json(
            &infer,
            json!({"inputs": [tensor("IMAGE", "BYTES", json!([2]), json!([base64(&good)])), text]}),
        ),
        400,
        "shape [2] but 1 elements",
    );
    expect(
        json(
            &infer,
            json!({"inputs": [image, text, tensor("X", "BYTES", json!([1]), json!(["x"]))]}),
        ),
        400,
        "unknown input `X`",
    );
    expect(
        json(
            &infer,
            json!({"inputs": [image, text], "outputs": [{"name": "SCORES"}]}),
        ),
        400,
        "unknown output `SCORES`",
    );
    expect(
        json(
            &infer,
            json!({"inputs": [tensor("IMAGE", "BYTES", json!([1]), json!(["!!"])), text]}),
        ),
        400,
        "IMAGE[0] is not base64",
    );
    expect(
        json(
            &infer,
            json!({"inputs": [tensor("IMAGE", "BYTES", json!([1]), json!([base64(b"nope")])), text]}),
        ),
        400,
        "IMAGE[0] is corrupt",
    );
    let (status, body, _) = answer(ureq::get(&server.at("/v2/nothing")).call());
    expect((status, body), 404, "no endpoint GET /v2/nothing");
    let (status, body, _) = answer(ureq::get(&server.at("/v1/classify")).call());
    expect((status, body), 405, "GET is not allowed on /v1/classify");

    // Nothing above hurt the server, and each kind was counted.
    let (status, body) = form(&[("image", None, &good), ("caption", None, caption)]);
    assert_eq!(status, 200, "{body}");
    for (kind, at_least) in [
        ("not_an_image", 3.0),
        ("too_many_pixels", 1.0),
        ("body_too_large", 1.0),
        ("missing_caption", 3.0),
        ("missing_image", 2.0),
        ("unsupported_media_type", 2.0),
        ("unknown_model", 3.0),
        ("bad_request", 8.0),
        ("not_found", 1.0),
        ("method_not_allowed", 1.0),
    ] {
        let count = server.metric(&format!(
            "multiclip_request_errors_total{{kind=\"{kind}\"}}"
        ));
        assert!(count >= at_least, "{kind}: {count}");
    }
}

#[test]
fn odd_but_valid_inputs_are_answered() {
    let t = Trained::new("f16", 24, 2);
    let server = Server::start(&t.checkpoint, &[]);
    let cmyk = std::fs::read(live_support::repo().join("tests/fixtures/data/cmyk.jpg")).unwrap();
    let long_caption = "word ".repeat(20_000);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        // Resized whole, 1 x 200,000 pixels would be 36 x 7.2 million pixels.
        ("thin", png(1, 200_000), "a thin line"),
        ("one pixel", png(1, 1), "a dot"),
        ("cmyk jpeg", cmyk, "ink"),
        ("long caption", png(30, 30), &long_caption),
        ("unicode", png(30, 30), "Ünïcödé 🚀 日本語 \u{0}"),
    ];
    for (what, image, caption) in cases {
        let start = Instant::now();
        let (status, body) = post_form(
            &server,
            &[
                ("image", Some("x"), &image),
                ("caption", None, caption.as_bytes()),
            ],
        );
        assert_eq!(status, 200, "{what}: {body}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: {:?}",
            start.elapsed()
        );
    }
}

/// Writes the headers of a classify request announcing `length` body bytes and `sent` of them,
/// then stalls.
fn stalled_request(server: &Server, length: usize, sent: usize) -> TcpStream {
    let address = server.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n{}",
        "{".repeat(sent)
    )
    .unwrap();
    stream
}

#[test]
fn slow_or_vanished_clients_hold_up_no_one() {
    let t = Trained::new("f16", 24, 2);
    let server = Server::start(
        &t.checkpoint,
        &[
            "--read-timeout-s",
            "2",
            "--header-timeout-s",
            "2",
            "--max-queue",
            "4",
        ],
    );
    let image = png(30, 30);
    let classify = || {
        post_form(
            &server,
            &[("image", None, &image), ("caption", None, b"a caption")],
        )
        .0
    };
    // More stalled bodies than --max-queue, a connection that sends nothing, one that sends
    // half its headers, and one that goes away mid-body.
    let mut stalled: Vec<TcpStream> = (0..6).map(|_| stalled_request(&server, 1000, 10)).collect();
    let address = server.url.trim_start_matches("http://");
    let silent = TcpStream::connect(address).unwrap();
    let mut half = TcpStream::connect(address).unwrap();
    write!(half, "POST /v1/classify HTTP/1.1\r\nHost: x\r\n").unwrap();
    drop(stalled_request(&server, 1000, 10));
    std::thread::sleep(Duration::from_millis(300));

    // Meanwhile others are answered at once.
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(classify(), 200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    // The stalled bodies get 408 once their time is up; the silent connections are closed.
    for stream in &mut stalled {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(reply.contains("did not arrive within 2 s"), "{reply}");
    }
    for mut stream in [silent, half] {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = Vec::new();
        let closed = stream.read_to_end(&mut reply);
        assert!(closed.is_ok(), "{closed:?}");
    }
    assert_eq!(classify(), 200);
    assert!(server.metric("multiclip_request_errors_total{kind=\"timeout\"}") >= 1.0);
    assert_eq!(server.metric("multiclip_requests_in_flight"), 0.0);
}

#[test]
fn a_full_queue_is_answered_503_with_retry_after() {
    let t = Trained::new("f16", 24, 2);
    // One sample may be in flight, and it waits 2 s for company.
    let server = Server::start(
        &t.checkpoint,
        &[
            "--max-queue",
            "1",
            "--max-batch",
            "2",
            "--max-wait-ms",
            "2000",
        ],
    );
    let image = png(30, 30);
    let body = json!({"image": base64(&image), "caption": "a caption"});
    std::thread::scope(|scope| {
        let first = scope.spawn(|| post_json(&server, "/v1/classify", &body));
        std::thread::sleep(Duration::from_millis(500));
        let (status, error, retry_after) = post_json(&server, "/v1/classify", &body);
        assert_eq!(status, 503, "{error}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(error["error"].as_str().unwrap().contains("full"), "{error}");
        assert_eq!(first.join().unwrap().0, 200);
    });
    assert!(server.metric("multiclip_request_errors_total{kind=\"overloaded\"}") >= 1.0);
}

#[test]
fn concurrent_requests_share_forward_passes() {
    let t = Trained::new("f16", 40, 16);
    let expected = predict_one_by_one(&t);
    let server = Server::start(&t.checkpoint, &["--max-batch", "8", "--max-wait-ms", "300"]);
    let vocabulary = vocabulary(&server);
    let rows = test_rows(&t.data);
    let answers: Vec<(String, Value)> = std::thread::scope(|scope| {
        let threads: Vec<_> = rows
            .iter()
            .map(|row| {
                let server = &server;
                scope.spawn(move || {
                    let (status, body) = post_form(
                        server,
                        &[
                            ("image", None, &row.image),
                            ("caption", None, row.caption.as_bytes()),
                        ],
                    );
                    assert_eq!(status, 200, "{body}");
                    (row.id.clone(), body)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let batches = server.metric("multiclip_batch_size_count");
    let singles = server.metric("multiclip_batch_size_bucket{le=\"1\"}");
    assert!(
        batches < rows.len() as f64 && singles < batches,
        "{}",
        server.metrics()
    );
    // In a batch a caption is padded to the longest of its forward pass, which moves the text
    // features by float rounding (about 1e-7): the probabilities agree to within 1e-5 of
    // predict's, one sample at a time.
    for (id, body) in &answers {
        let (_, got) = classify_answer(body, &vocabulary);
        for (g, e) in got.iter().zip(&expected[id].1) {
            let (g, e): (f64, f64) = (g.parse().unwrap(), e.parse().unwrap());
            assert!((g - e).abs() <= 1e-5, "{id}: {g} vs {e}");
        }
    }
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits_0() {
    let t = Trained::new("f16", 24, 2);
    // Requests wait up to 1.5 s in the queue for company: SIGTERM comes while they do.
    let mut server = Server::start(
        &t.checkpoint,
        &["--max-batch", "64", "--max-wait-ms", "1500"],
    );
    let image = png(30, 30);
    let body = json!({"image": base64(&image), "caption": "a caption"});
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let requests: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| post_json(&server, "/v1/classify", &body).0))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(server.metric("multiclip_requests_in_flight"), 4.0);
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        requests.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 4]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(server.url.trim_start_matches("http://")).is_err());
}
