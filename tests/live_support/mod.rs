//! What the tests of the live path (`predict --data`, `serve`) share: a small copy of data/demo,
//! its caches extracted with the tiny committed DINOv2 + MiniLM fixtures (the spec written
//! relative to the repository, as a user's checkpoint records `models/...`), and a head trained on
//! them, all through the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use multiclip::data::{Dataset, Part};

/// The backbone spec, relative to the repository root (commands run there).
pub const BACKBONE: &str = "dinov2:tests/fixtures/dinov2-tiny+sentence:tests/fixtures/minilm-tiny";

/// The repository root: where the relative fixture locations resolve.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `multiclip` run in the repository root, quiet logs.
pub fn multiclip() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_multiclip"));
    cmd.current_dir(repo())
        .env("RUST_LOG", "warn")
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("MULTICLIP_NUM_WORKERS");
    cmd
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Writes `dir` with the first `train_rows` rows of data/demo's train.csv and the first
/// `test_rows` of its test.csv (RFC-4180 quoted), and their images.
pub fn demo_copy(dir: &Path, train_rows: usize, test_rows: usize) {
    let demo = Dataset::open(repo().join("data/demo")).unwrap();
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for (part, rows) in [(Part::Train, train_rows), (Part::Test, test_rows)] {
        let mut csv = match part {
            Part::Train => String::from("ImageID,Labels,Caption\n"),
            Part::Test => String::from("ImageID,Caption\n"),
        };
        for record in demo.records(part).unwrap().into_iter().take(rows) {
            let target = dir.join("data").join(&record.id);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(demo.image_file(&record.id).unwrap(), &target).unwrap();
            match &record.labels {
                Some(labels) => csv.push_str(&format!(
                    "{},{},{}\n",
                    record.id,
                    labels.join(" "),
                    quote(&record.caption)
                )),
                None => csv.push_str(&format!("{},{}\n", record.id, quote(&record.caption))),
            }
        }
        std::fs::write(dir.join(format!("{}.csv", part.name())), csv).unwrap();
    }
}

/// `multiclip extract` of `part` of `data` into `out` with the fixtures.
pub fn extract(data: &Path, part: &str, out: &Path, extra: &[&str]) {
    run_ok(
        multiclip()
            .args(["extract", "--backbone", BACKBONE, "--part", part, "--data"])
            .arg(data)
            .arg("--out")
            .arg(out)
            .args(extra),
    );
}

/// A demo copy in a temporary folder, its train cache stored as `dtype`, and an MLP head trained
/// on it.
pub struct Trained {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub checkpoint: PathBuf,
}

impl Trained {
    pub fn new(dtype: &str, train_rows: usize, test_rows: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        demo_copy(&data, train_rows, test_rows);
        let cache = dir.path().join("cache-train");
        extract(&data, "train", &cache, &["--dtype", dtype]);
        run_ok(multiclip().args(["dataset", "split"]).arg(&data));
        let out = dir.path().join("checkpoints");
        run_ok(
            multiclip()
                .args(["train", "--head", "mlp:hidden=32", "--epochs", "3"])
                .args(["--batch-size", "16", "--cache"])
                .arg(&cache)
                .arg("--data")
                .arg(&data)
                .arg("--split")
                .arg(data.join("split.json"))
                .arg("--out")
                .arg(&out),
        );
        let checkpoint = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .expect("train wrote a checkpoint");
        Trained {
            dir,
            data,
            checkpoint,
        }
    }
}
