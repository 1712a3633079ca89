//! `multiclip predict --data` (raw images through the checkpoint's live backbone) against
//! `extract` then `predict --cache` on the same rows, with the tiny fixtures: the same files byte
//! for byte for an f32 and an f16 cache; the backbone root; weights that are not the
//! checkpoint's; bad rows.

mod live_support;

use live_support::{Trained, extract, multiclip, repo, run_ok};
use multiclip::data::{Dataset, Part};
use std::path::Path;

/// `predict` of `checkpoint` with `source` (`--cache DIR` or `--data DIR ...`): the predictions
/// and probabilities files.
fn predict(checkpoint: &Path, out: &Path, source: &[&std::ffi::OsStr]) -> (String, String) {
    let (predictions, probabilities) = (out.join("predictions.csv"), out.join("probs.csv"));
    run_ok(
        multiclip()
            .arg("predict")
            .args(source)
            .arg("--checkpoint")
            .arg(checkpoint)
            .arg("--out")
            .arg(&predictions)
            .arg("--probabilities")
            .arg(&probabilities),
    );
    (
        std::fs::read_to_string(predictions).unwrap(),
        std::fs::read_to_string(probabilities).unwrap(),
    )
}

fn assert_live_equals_cache(dtype: &str) {
    let t = Trained::new(dtype, 40, 24);
    let cache = t.dir.path().join("cache-test");
    extract(&t.data, "test", &cache, &["--dtype", dtype]);
    let from_cache = predict(
        &t.checkpoint,
        &t.dir.path().join("cache"),
        &["--cache".as_ref(), cache.as_os_str()],
    );
    let live = predict(
        &t.checkpoint,
        &t.dir.path().join("live"),
        &["--data".as_ref(), t.data.as_os_str()],
    );
    assert_eq!(from_cache.0.lines().count(), 25, "{}", from_cache.0);
    assert_eq!(live.0, from_cache.0);
    assert_eq!(live.1, from_cache.1);
}

#[test]
fn live_predictions_equal_extract_then_predict_for_an_f32_cache() {
    assert_live_equals_cache("f32");
}

/// The head reads features rounded to f16 as it was trained on them, so f16 gives equal files too.
#[test]
fn live_predictions_equal_extract_then_predict_for_an_f16_cache() {
    assert_live_equals_cache("f16");
}

/// Copies `from` (a folder of files) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            copy_dir(&path, &to.join(path.file_name().unwrap()));
        } else {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn backbones_load_from_the_root_and_other_weights_are_refused() {
    let t = Trained::new("f16", 24, 6);
    let root = t.dir.path().join("root");
    for model in ["dinov2-tiny", "minilm-tiny"] {
        copy_dir(
            &repo().join("tests/fixtures").join(model),
            &root.join("tests/fixtures").join(model),
        );
    }
    let predict_from = |root: &Path| {
        multiclip()
            .current_dir(t.dir.path())
            .arg("predict")
            .arg("--data")
            .arg(&t.data)
            .arg("--checkpoint")
            .arg(&t.checkpoint)
            .arg("--out")
            .arg(t.dir.path().join("p.csv"))
            .arg("--backbone-root")
            .arg(root)
            .output()
            .unwrap()
    };
    let ok = predict_from(&root);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // One byte of a weight changed: another sha256, refused naming the file and both hashes.
    let weights = root.join("tests/fixtures/minilm-tiny/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let refused = predict_from(&root);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains(&weights.display().to_string())
            && err.contains("but the checkpoint was trained on sha256")
            && err.matches("sha256 ").count() >= 2,
        "{err}"
    );

    // A root without the models: the recorded location is named.
    let missing = predict_from(t.dir.path());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && err.contains("tests/fixtures/dinov2-tiny"),
        "{err}"
    );
}

#[test]
fn bad_rows_fail_or_are_listed_and_refused_unless_allowed() {
    let t = Trained::new("f32", 24, 8);
    let records = Dataset::open(&t.data).unwrap().records(Part::Test).unwrap();
    let broken_id = records[2].id.as_str();
    std::fs::write(t.data.join("data").join(broken_id), b"not an image").unwrap();
    let live = |extra: &[&str]| {
        multiclip()
            .arg("predict")
            .arg("--data")
            .arg(&t.data)
            .arg("--checkpoint")
            .arg(&t.checkpoint)
            .arg("--out")
            .arg(t.dir.path().join("live.csv"))
            .arg("--probabilities")
            .arg(t.dir.path().join("live-probs.csv"))
            .args(extra)
            .output()
            .unwrap()
    };

    let failed = live(&[]);
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success() && err.contains("row 2") && err.contains(broken_id),
        "{err}"
    );
    let refused = live(&["--on-error", "skip"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains(&format!("skipped row 2 ({broken_id})"))
            && err.contains("--allow-skipped"),
        "{err}"
    );
    assert!(!t.dir.path().join("live.csv").exists());

    // Allowed, the rows that did not load are left out or written empty, as for a cache
    // extracted with --on-error skip.
    let cache = t.dir.path().join("cache-test");
    extract(
        &t.data,
        "test",
        &cache,
        &["--dtype", "f32", "--on-error", "skip"],
    );
    for how in ["omit", "empty"] {
        let allowed = live(&["--on-error", "skip", "--allow-skipped", how]);
        let err = String::from_utf8_lossy(&allowed.stderr);
        assert!(allowed.status.success(), "{err}");
        assert!(
            err.contains(&format!("skipped row 2 ({broken_id})")),
            "{err}"
        );
        let from_cache = predict(
            &t.checkpoint,
            t.dir.path(),
            &[
                "--cache".as_ref(),
                cache.as_os_str(),
                "--allow-skipped".as_ref(),
                how.as_ref(),
            ],
        );
        let live_files = (
            std::fs::read_to_string(t.dir.path().join("live.csv")).unwrap(),
            std::fs::read_to_string(t.dir.path().join("live-probs.csv")).unwrap(),
        );
        assert_eq!(live_files, from_cache, "--allow-skipped {how}");
        assert_eq!(live_files.0.contains(broken_id), how == "empty", "{how}");
    }
}

#[test]
fn cache_and_data_are_exclusive() {
    let out = multiclip()
        .args([
            "predict",
            "--cache",
            "c",
            "--data",
            "d",
            "--checkpoint",
            "x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot be used with"),
        "{err}"
    );
    let out = multiclip()
        .args(["predict", "--checkpoint", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--cache"), "{err}");
}
