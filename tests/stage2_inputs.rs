//! Bad input to stage 2 through the real binary: training settings out of range, head
//! configurations that cannot work or do not fit in memory, checkpoints that were damaged, edited
//! or replaced, caches with rows skipped at extraction, outputs that cannot be written or collide,
//! and names that are taken. Each gives a clear error (exit code 1, never a panic) or the
//! documented behaviour, and nothing that existed is overwritten or lost.

mod support;

use candle_core::Device;
use multiclip::cache::Integrity;
use multiclip::data::split::Split;
use multiclip::loss::Loss;
use multiclip::submission::read_predictions;
use multiclip::train::TrainConfig;
use multiclip::train::run::{TrainRequest, train};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::fixture::Fixture;
use support::synthetic::Synthetic;

const ROWS: usize = 160;

fn synthetic() -> Synthetic {
    Synthetic {
        rows: ROWS,
        dim: 8,
        tokens: Some((4, 1..4)),
        labels: 4,
        seed: 5,
        shard_rows: 50,
        backbone: "synthetic:models/test-backbone".into(),
    }
}

fn fixture() -> Fixture {
    Fixture::new(&synthetic(), |spec, data, cache| {
        spec.write_cache(data, cache)
    })
}

/// The fixture with rows `skipped` left out of its cache, as `extract --on-error skip` leaves an
/// unreadable image out.
fn fixture_skipping(skipped: &[usize]) -> Fixture {
    Fixture::new(&synthetic(), |spec, data, cache| {
        spec.write_cache_skipping(data, cache, skipped)
    })
}

/// A small checkpoint of `head` trained on the fixture through the library; returns its
/// sidecar's path.
fn checkpoint(f: &Fixture, head: &str, out: &str) -> PathBuf {
    train(&TrainRequest {
        cache: f.cache.clone(),
        data: f.data.clone(),
        split: f.split.clone(),
        head: head.parse().unwrap(),
        loss: Loss::Bce,
        config: TrainConfig {
            batch_size: 64,
            epochs: 2,
            ..TrainConfig::default()
        },
        out_dir: f.root.join(out),
        name: None,
        device: Device::Cpu,
        integrity: Integrity::Full,
    })
    .unwrap()
    .checkpoint
}

fn multiclip<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clean failure (exit code 1, or 2 for a command line clap refuses: an error message,
/// not a panic or a signal); returns stderr.
fn fails(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(1 | 2)),
        "expected a clean error, got {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        output.status,
        text(&output.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Asserts success; returns stderr.
fn succeeds(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert!(
        output.status.success(),
        "failed with {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        output.status,
        text(&output.stdout)
    );
    stderr
}

/// `multiclip train` on the fixture for one epoch, plus `extra` flags (a small MLP unless they
/// give a `--head`).
fn train_cli(f: &Fixture, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "train",
        "--cache",
        f.cache.to_str().unwrap(),
        "--data",
        f.data.to_str().unwrap(),
        "--split",
        f.split.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    if !extra.contains(&"--head") {
        args.extend(["--head".to_string(), "mlp:hidden=8".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    multiclip(&args)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn training_settings_out_of_range_are_refused_naming_the_flag() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    let cases: &[(&[&str], &str)] = &[
        (&["--batch-size", "0"], "--batch-size"),
        (&["--eval-batch-size", "0"], "--eval-batch-size"),
        (&["--lr=-0.01"], "--lr"),
        (&["--lr", "-0.01"], "--lr"),
        (&["--lr", "0"], "--lr"),
        (&["--lr", "NaN"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--weight-decay=-5"], "--weight-decay"),
        (&["--weight-decay", "NaN"], "--weight-decay"),
        (&["--clip-grad=-1"], "--clip-grad"),
        (&["--clip-grad", "-1"], "--clip-grad"),
        (&["--clip-grad", "NaN"], "--clip-grad"),
        (&["--patience", "0"], "--patience"),
        (&["--warmup-epochs=-1"], "--warmup-epochs"),
        (&["--warmup-epochs", "NaN"], "--warmup-epochs"),
        (&["--loss", "smoothing:epsilon=1"], "epsilon"),
        (&["--loss", "focal:gamma=-1"], "gamma"),
        (&["--loss", "focal:alpha=1.5"], "alpha"),
        (&["--loss", "angular:margin=2"], "margin"),
        (&["--loss", "asl:clip=1"], "clip"),
    ];
    for (flags, named) in cases {
        let stderr = fails(&train_cli(&f, &out, flags));
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
    // Clipping off (0) is a setting, not an error.
    succeeds(&train_cli(&f, &out, &["--clip-grad", "0"]));
}

#[test]
fn evaluate_and_predict_refuse_a_zero_batch_size() {
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "checkpoints");
    let ckpt = ckpt.to_str().unwrap();
    let stderr = fails(&multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt,
        "--batch-size",
        "0",
    ]));
    assert!(stderr.contains("--batch-size"), "{stderr}");
    let out = f.root.join("predictions.csv");
    let stderr = fails(&multiclip(&[
        "predict",
        "--cache",
        f.cache.to_str().unwrap(),
        "--checkpoint",
        ckpt,
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "0",
    ]));
    assert!(stderr.contains("--batch-size"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn extract_refuses_zero_sizes_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir_all(data.join("data")).unwrap();
    fs::write(data.join("train.csv"), "ImageID,Labels,Caption\n").unwrap();
    for flag in ["--batch-size", "--shard-rows", "--prefetch", "--max-pixels"] {
        let out = dir.path().join("cache");
        let stderr = fails(&multiclip(&[
            "extract",
            "--data",
            data.to_str().unwrap(),
            "--backbone",
            "dinov2:tests/fixtures/dinov2-tiny",
            "--out",
            out.to_str().unwrap(),
            flag,
            "0",
        ]));
        assert!(stderr.contains(flag), "{flag}: {stderr}");
        assert!(!out.exists(), "{flag}");
    }
}

#[test]
fn head_settings_that_cannot_work_are_refused_naming_the_field() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    for (head, field) in [
        ("gat:hidden=0", "hidden"),
        ("gat:heads=0", "heads"),
        ("gat:hidden=6,heads=4", "heads"),
        ("gat:threshold=1.5", "threshold"),
        ("mlp:dropout=1", "dropout"),
        ("router:dropout=-0.5", "dropout"),
        ("ml_decoder:input=multimodal_tokens,d_model=0", "d_model"),
        ("ml_decoder:input=multimodal_tokens,ffn=0", "ffn"),
        (
            "ml_decoder:input=multimodal_tokens,d_model=10,heads=3",
            "heads",
        ),
    ] {
        let stderr = fails(&train_cli(&f, &out, &["--head", head]));
        assert!(
            stderr.contains(field) && stderr.contains(head),
            "{head}: {stderr}"
        );
    }
    assert!(files_in(&out).is_empty());
}

#[test]
fn a_head_too_large_for_memory_is_refused_before_allocating() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    // 16 inputs x 1e8 hidden + 1e8 x 4 labels: 2.1e9 parameters, 39 GiB with their gradients,
    // AdamW moments and the best epoch's copy, before any activation.
    let stderr = fails(&train_cli(&f, &out, &["--head", "mlp:hidden=100000000"]));
    assert!(
        stderr.contains("GiB") && stderr.contains("--memory-limit"),
        "{stderr}"
    );
    // The limit can be set: a small head over a tiny limit is refused too, naming both numbers.
    let stderr = fails(&train_cli(&f, &out, &["--memory-limit", "1K"]));
    assert!(
        stderr.contains("memory") && stderr.contains("1.0 KiB"),
        "{stderr}"
    );
    assert!(files_in(&out).is_empty());
    succeeds(&train_cli(&f, &out, &["--memory-limit", "1G"]));
}

#[test]
fn train_never_overwrites_a_file_of_the_run() {
    let f = fixture();
    let out = f.root.join("checkpoints");
    fs::create_dir_all(&out).unwrap();
    // An explicit name whose report exists (the checkpoint itself does not) is refused.
    fs::write(out.join("mine.report.html"), "keep me").unwrap();
    let stderr = fails(&train_cli(&f, &out, &["--name", "mine"]));
    assert!(stderr.contains("mine.report.html"), "{stderr}");
    assert_eq!(
        fs::read_to_string(out.join("mine.report.html")).unwrap(),
        "keep me"
    );
    assert_eq!(files_in(&out), ["mine.report.html"]);
    // A generated name skips a version whose metrics file exists.
    let v1 = "mlp_synthetic_smoothing_v1_lr0.003_bs64_seed3407_f1";
    fs::write(out.join(format!("{v1}.metrics.json")), "keep me too").unwrap();
    succeeds(&train_cli(&f, &out, &[]));
    assert_eq!(
        fs::read_to_string(out.join(format!("{v1}.metrics.json"))).unwrap(),
        "keep me too"
    );
    let v2 = "mlp_synthetic_smoothing_v2_lr0.003_bs64_seed3407_f1";
    for ext in ["safetensors", "json", "report.html", "metrics.json"] {
        assert!(out.join(format!("{v2}.{ext}")).is_file(), "{ext}");
    }
}

/// `multiclip predict` of the fixture's cache with `ckpt`, plus `extra` flags.
fn predict_cli(cache: &Path, ckpt: &Path, out: &Path, extra: &[&OsStr]) -> Output {
    let mut args: Vec<&OsStr> = vec![
        "predict".as_ref(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--checkpoint".as_ref(),
        ckpt.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    args.extend_from_slice(extra);
    multiclip(&args)
}

#[test]
fn predict_refuses_one_file_for_both_outputs() {
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "checkpoints");
    let dir = f.root.join("out");
    fs::create_dir_all(dir.join("sub")).unwrap();
    let x = dir.join("x.csv");
    std::os::unix::fs::symlink(&x, dir.join("link.csv")).unwrap();
    std::os::unix::fs::symlink(&dir, f.root.join("dirlink")).unwrap();
    fs::write(&x, "old\n").unwrap();
    for other in [
        x.clone(),
        dir.join(".").join("x.csv"),
        dir.join("sub").join("..").join("x.csv"),
        f.root.join("dirlink").join("x.csv"),
        dir.join("link.csv"),
    ] {
        let output = predict_cli(
            &f.cache,
            &ckpt,
            &x,
            &["--probabilities".as_ref(), other.as_os_str()],
        );
        let stderr = fails(&output);
        assert!(stderr.contains("--probabilities"), "{other:?}: {stderr}");
        assert_eq!(fs::read_to_string(&x).unwrap(), "old\n");
    }
    // Relative spellings of one file, from the working directory.
    let output = Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .current_dir(&dir)
        .args(["predict", "--cache"])
        .arg(&f.cache)
        .arg("--checkpoint")
        .arg(&ckpt)
        .args(["--out", "x.csv", "--probabilities", "./x.csv"])
        .output()
        .unwrap();
    fails(&output);
    assert_eq!(fs::read_to_string(&x).unwrap(), "old\n");
}

#[test]
fn predict_outputs_survive_a_failed_write() {
    use std::os::unix::process::CommandExt;
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "checkpoints");
    let dir = f.root.join("out");
    fs::create_dir_all(&dir).unwrap();
    let predictions = dir.join("predictions.csv");
    let probabilities = dir.join("probabilities.csv");
    // The whole predictions file is about 2 kB, the probabilities about 7 kB.
    for limit in [1024u64, 4096] {
        fs::write(&predictions, "old predictions\n").unwrap();
        fs::write(&probabilities, "old probabilities\n").unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_multiclip"));
        cmd.args(["predict", "--cache"])
            .arg(&f.cache)
            .arg("--checkpoint")
            .arg(&ckpt)
            .arg("--out")
            .arg(&predictions)
            .arg("--probabilities")
            .arg(&probabilities);
        // SAFETY: only async-signal-safe calls between fork and exec. A write past the limit
        // then fails with EFBIG (SIGXFSZ ignored), as a full disk fails with ENOSPC.
        unsafe {
            cmd.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let stderr = fails(&cmd.output().unwrap());
        assert!(stderr.contains("File too large"), "{limit}: {stderr}");
        let after = fs::read_to_string(&predictions).unwrap();
        if limit == 1024 {
            assert_eq!(after, "old predictions\n");
        } else {
            // The predictions fit and are complete; the probabilities are the old ones.
            assert_eq!(read_predictions(&predictions).unwrap().len(), ROWS);
        }
        assert_eq!(
            fs::read_to_string(&probabilities).unwrap(),
            "old probabilities\n"
        );
        assert_eq!(
            files_in(&dir),
            ["predictions.csv", "probabilities.csv"],
            "{limit}: no temporary file is left behind"
        );
    }
}

#[test]
fn predict_lists_rows_skipped_at_extraction_and_needs_a_choice() {
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "checkpoints");
    // The test cache: rows 3 and 77 were unreadable at extraction.
    let test_cache = f.root.join("test-cache");
    synthetic()
        .write_cache_skipping(&f.data, &test_cache, &[3, 77])
        .unwrap();
    let out = f.root.join("predictions.csv");
    let probs = f.root.join("probabilities.csv");
    let listed = |stderr: &str| {
        stderr.contains("2 rows")
            && stderr.contains("3.jpg")
            && stderr.contains("77.jpg")
            && stderr.contains("unexpected end of file")
    };
    let stderr = fails(&predict_cli(&test_cache, &ckpt, &out, &[]));
    assert!(
        listed(&stderr) && stderr.contains("--allow-skipped"),
        "{stderr}"
    );
    assert!(!out.exists());

    // Written with no labels, in dataset order: the submission has every row.
    let output = predict_cli(
        &test_cache,
        &ckpt,
        &out,
        &[
            "--allow-skipped".as_ref(),
            "empty".as_ref(),
            "--probabilities".as_ref(),
            probs.as_os_str(),
        ],
    );
    let stderr = succeeds(&output);
    assert!(listed(&stderr), "{stderr}");
    let records = read_predictions(&out).unwrap();
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let expected: Vec<String> = (0..ROWS).map(Synthetic::id).collect();
    assert_eq!(ids, expected);
    for r in &records {
        let empty = r.labels.as_ref().unwrap().is_empty();
        assert_eq!(empty, r.id == "3.jpg" || r.id == "77.jpg", "{}", r.id);
    }
    let probabilities = fs::read_to_string(&probs).unwrap();
    let line = probabilities.lines().nth(1 + 77).unwrap();
    assert_eq!(line, "77.jpg,NaN,NaN,NaN,NaN");
    assert_eq!(probabilities.lines().count(), 1 + ROWS);

    // Left out: the other rows only.
    let stderr = succeeds(&predict_cli(
        &test_cache,
        &ckpt,
        &out,
        &["--allow-skipped".as_ref(), "omit".as_ref()],
    ));
    assert!(listed(&stderr), "{stderr}");
    let records = read_predictions(&out).unwrap();
    assert_eq!(records.len(), ROWS - 2);
    assert!(records.iter().all(|r| r.id != "3.jpg" && r.id != "77.jpg"));
}

#[test]
fn train_and_evaluate_leave_rows_skipped_at_extraction_out_and_say_which() {
    let skipped = [3, 77, 150];
    let f = fixture_skipping(&skipped);
    let out = f.root.join("checkpoints");
    let output = train_cli(&f, &out, &[]);
    let stderr = succeeds(&output);
    let split = Split::load(&f.split).unwrap();
    for r in skipped {
        let id = Synthetic::id(r);
        assert!(stderr.contains(&id), "{id}: {stderr}");
    }
    let in_val = skipped
        .iter()
        .filter(|&&r| split.val.contains(&Synthetic::id(r)))
        .count();
    assert!(stderr.contains("unexpected end of file"), "{stderr}");
    for (count, side) in [(3 - in_val, "training"), (in_val, "validation")] {
        if count > 0 {
            let said = format!("{count} {side} ids");
            assert!(stderr.contains(&said), "{said}: {stderr}");
        }
    }
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "thresholds tuned on {} validation rows",
            split.val.len() - in_val
        )),
        "{stdout}"
    );
    let name = "mlp_synthetic_smoothing_v1_lr0.003_bs64_seed3407_f1";
    let ckpt = out.join(name);
    let output = multiclip(&["evaluate", "--checkpoint", ckpt.to_str().unwrap()]);
    let stderr = succeeds(&output);
    assert!(stderr.contains("validation ids") || in_val == 0, "{stderr}");
    assert!(
        text(&output.stdout).contains(&format!("{} rows", split.val.len() - in_val)),
        "{}",
        text(&output.stdout)
    );
    let output = multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--part",
        "train",
    ]);
    succeeds(&output);
    assert!(
        text(&output.stdout).contains(&format!("{} rows", split.train.len() - (3 - in_val))),
        "{}",
        text(&output.stdout)
    );
}

/// The sidecar of `ckpt` as JSON.
fn sidecar(ckpt: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(ckpt).unwrap()).unwrap()
}

fn write_sidecar(ckpt: &Path, value: &serde_json::Value) {
    fs::write(ckpt, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// `evaluate` and `predict` of `ckpt` both fail cleanly with a message containing `needle`.
fn refused_on_load(f: &Fixture, ckpt: &Path, needle: &str) {
    let stderr = fails(&multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]));
    assert!(stderr.contains(needle), "evaluate: {stderr}");
    let out = f.root.join("refused.csv");
    let stderr = fails(&predict_cli(&f.cache, ckpt, &out, &[]));
    assert!(stderr.contains(needle), "predict: {stderr}");
    assert!(!out.exists());
}

fn seal(ckpt: &Path) -> Output {
    multiclip(&["checkpoint".as_ref(), "seal".as_ref(), ckpt.as_os_str()])
}

#[test]
fn checkpoint_sidecars_are_validated_on_load() {
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "checkpoints");
    let good = sidecar(&ckpt);
    let edited = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut value = good.clone();
        edit(&mut value);
        write_sidecar(&ckpt, &value);
    };
    // Fewer thresholds than labels: refused, and `seal` refuses to accept it.
    edited(&|v| {
        v["thresholds"].as_array_mut().unwrap().truncate(2);
    });
    refused_on_load(&f, &ckpt, "2 thresholds for 4 labels");
    assert!(fails(&seal(&ckpt)).contains("2 thresholds for 4 labels"));
    for (value, needle) in [
        (serde_json::json!(1.5), "in [0, 1]"),
        (serde_json::json!(-0.1), "in [0, 1]"),
        (serde_json::json!(null), "null"),
    ] {
        edited(&|v| v["thresholds"][1] = value.clone());
        refused_on_load(&f, &ckpt, needle);
    }
    edited(&|v| v["labels"][1] = v["labels"][0].clone());
    refused_on_load(&f, &ckpt, "twice");
    edited(&|v| v["loss"] = serde_json::json!({"kind": "focal", "alpha": 2.0, "gamma": 2.0}));
    refused_on_load(&f, &ckpt, "alpha");
    edited(&|v| v["head"]["dropout"] = serde_json::json!(1.0));
    refused_on_load(&f, &ckpt, "dropout");
    // A head configuration that does not fit the weights: named tensor and both shapes, and
    // `seal` refuses to accept it.
    edited(&|v| v["head"]["hidden"] = serde_json::json!(9));
    let stderr = fails(&seal(&ckpt));
    assert!(
        stderr.contains("hidden.weight")
            && stderr.contains("[9, 16]")
            && stderr.contains("[8, 16]"),
        "{stderr}"
    );
    edited(&|v| v["head"]["hidden"] = serde_json::json!(0));
    let stderr = fails(&seal(&ckpt));
    assert!(
        stderr.contains("hidden.weight") && stderr.contains("not used"),
        "{stderr}"
    );
    // The intact sidecar still works.
    write_sidecar(&ckpt, &good);
    succeeds(&multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]));
}

#[test]
fn checkpoints_are_sealed_and_any_change_is_detected() {
    let f = fixture();
    let ckpt = checkpoint(&f, "mlp:hidden=8", "a");
    let other = checkpoint(&f, "mlp:hidden=8,dropout=0.1", "b");
    let weights = ckpt.with_extension("safetensors");
    let original = fs::read(&weights).unwrap();
    let good = sidecar(&ckpt);
    assert!(good["seal"]["weights_sha256"].is_string(), "{good}");

    // A flipped weight byte (the last byte is tensor data).
    let mut flipped = original.clone();
    *flipped.last_mut().unwrap() ^= 0x10;
    fs::write(&weights, &flipped).unwrap();
    refused_on_load(&f, &ckpt, "do not match");
    // Another run's weights of the same shapes.
    fs::copy(other.with_extension("safetensors"), &weights).unwrap();
    refused_on_load(&f, &ckpt, "do not match");
    fs::write(&weights, &original).unwrap();

    // An edited model card: cosine (which then contradicts the loss), a label, a threshold.
    let mut value = good.clone();
    value["head"]["cosine"] = serde_json::json!(true);
    write_sidecar(&ckpt, &value);
    refused_on_load(&f, &ckpt, "cosine");
    let edits: [&dyn Fn(&mut serde_json::Value); 2] =
        [&|v| v["labels"][0] = serde_json::json!("renamed"), &|v| {
            v["thresholds"][0] = serde_json::json!(0.123)
        }];
    for edit in edits {
        let mut value = good.clone();
        edit(&mut value);
        write_sidecar(&ckpt, &value);
        refused_on_load(&f, &ckpt, "checkpoint seal");
    }
    // A threshold edited on purpose is accepted once sealed again.
    let stdout = text(&seal(&ckpt).stdout);
    assert!(stdout.contains("sealed"), "{stdout}");
    succeeds(&multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]));
    assert_eq!(sidecar(&ckpt)["thresholds"][0], serde_json::json!(0.123));

    // A checkpoint written before seals (format 1) is refused until sealed.
    let mut old = good.clone();
    old["format_version"] = serde_json::json!(1);
    old.as_object_mut().unwrap().remove("seal");
    write_sidecar(&ckpt, &old);
    refused_on_load(&f, &ckpt, "checkpoint seal");
    succeeds(&seal(&ckpt));
    succeeds(&multiclip(&[
        "evaluate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
    ]));
    assert_eq!(sidecar(&ckpt)["format_version"], serde_json::json!(2));
}
