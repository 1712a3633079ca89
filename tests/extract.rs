//! End-to-end tests of `multiclip extract` and `multiclip cache` through the binary, with the tiny
//! committed DINOv2 + MiniLM fixtures and a small dataset made in a temporary folder:
//! resume after `kill -9`, multi-worker extraction + merge, verify on damaged shards, bad input.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use multiclip::cache::CacheReader;

fn backbone_spec() -> String {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    format!(
        "dinov2:{}+sentence:{}",
        fixtures.join("dinov2-tiny").display(),
        fixtures.join("minilm-tiny").display()
    )
}

/// A dataset of `n` small PNGs (colours and sizes vary by row) with captions, in train.csv and,
/// when `test_rows` > 0, the last `test_rows` of them in test.csv.
fn make_dataset(dir: &Path, n: usize, test_rows: usize) {
    fs::create_dir_all(dir.join("data")).unwrap();
    let mut train = String::from("ImageID,Labels,Caption\n");
    let mut test = String::from("ImageID,Caption\n");
    for i in 0..n {
        let (w, h) = (30 + (i % 7) as u32 * 3, 28 + (i % 5) as u32 * 4);
        let image = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 8 + i as u32) as u8, (y * 9) as u8, (i * 37) as u8])
        });
        image
            .save(dir.join("data").join(format!("{i}.png")))
            .unwrap();
        let caption = format!(
            "a picture of thing {i} with {} words",
            "many ".repeat(i % 4)
        );
        if i < n - test_rows {
            train.push_str(&format!("{i}.png,{},\"{caption}\"\n", 1 + i % 3));
        } else {
            test.push_str(&format!("{i}.png,\"{caption}\"\n"));
        }
    }
    fs::write(dir.join("train.csv"), train).unwrap();
    if test_rows > 0 {
        fs::write(dir.join("test.csv"), test).unwrap();
    }
}

fn multiclip() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_multiclip"));
    cmd.env("RUST_LOG", "warn")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("SLURM_ARRAY_TASK_MIN")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("MULTICLIP_NUM_WORKERS");
    cmd
}

fn extract_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = multiclip();
    cmd.arg("extract")
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--backbone",
            &backbone_spec(),
            "--part",
            "all",
            "--threads",
            "2",
        ])
        .args(extra);
    cmd
}

fn run_ok(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "{:?} failed:\n{}\n{}",
        cmd,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Every file under `dir` (relative path -> bytes).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    files.sort();
    files
}

/// Starts `cmd`, waits until `dir` holds at least `shards` finished shard files, then kills the
/// process with SIGKILL. Returns how many shards existed right after the kill.
fn kill_after_shards(mut cmd: Command, dir: &Path, shards: usize) -> usize {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while shard_files(dir).len() < shards {
        assert!(
            Instant::now() < deadline,
            "no shard appeared in {}",
            dir.display()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("extract ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix: no chance to clean up.
    child.wait().unwrap();
    shard_files(dir).len()
}

#[test]
fn kill_9_then_resume_gives_the_uninterrupted_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 240, 40);
    let opts = ["--shard-rows", "3", "--batch-size", "2"];

    let full = tmp.path().join("full");
    run_ok(&mut extract_cmd(&data, &full, &opts));
    let expected = tree(&full);
    assert_eq!(shard_files(&full).len(), 80);

    let resumed = tmp.path().join("resumed");
    let after_first = kill_after_shards(extract_cmd(&data, &resumed, &opts), &resumed, 1);
    assert!(after_first < 80, "the first run was not interrupted");
    assert!(!resumed.join("manifest.json").exists());
    // A second interruption, later in the run.
    let after_second = kill_after_shards(
        extract_cmd(&data, &resumed, &opts),
        &resumed,
        after_first + 5,
    );
    assert!(after_second < 80, "the second run was not interrupted");
    // Leftovers of a write that was cut short: the re-run removes them.
    fs::write(
        resumed.join(".shard-00079.safetensors.tmp.4242"),
        b"half a shard",
    )
    .unwrap();

    let output = run_ok(&mut extract_cmd(&data, &resumed, &opts));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reused = format!("{} written, {after_second} reused", 80 - after_second);
    assert!(
        stdout.contains(&reused),
        "expected `{reused}` in:\n{stdout}"
    );
    assert_eq!(
        tree(&resumed),
        expected,
        "resumed cache differs from the uninterrupted one"
    );

    run_ok(
        multiclip()
            .args(["cache", "verify"])
            .arg(&resumed)
            .arg("--data")
            .arg(&data),
    );
    let reader = CacheReader::open(&resumed).unwrap();
    assert_eq!(reader.len(), 240);
    assert_eq!(reader.ids()[239], "239.png");
    let image = reader
        .gather("image", &[0, 200, 239], &Device::Cpu)
        .unwrap();
    assert_eq!(image.dims()[0], 3);
    let text = reader.gather("text", &[5], &Device::Cpu).unwrap();
    let norm: f32 = text.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(
        (norm - 1.0).abs() < 1e-2,
        "text embeddings are L2-normalised, got {norm}"
    );

    // Other settings into the same directory are refused, naming the difference.
    let output = extract_cmd(
        &data,
        &resumed,
        &["--shard-rows", "3", "--batch-size", "2", "--dtype", "f32"],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("different extraction") && stderr.contains("--dtype"),
        "{stderr}"
    );
}

#[test]
fn three_workers_and_merge_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 40, 10);
    let opts = ["--shard-rows", "4", "--batch-size", "3"];

    let single = tmp.path().join("single");
    run_ok(&mut extract_cmd(&data, &single, &opts));

    let multi = tmp.path().join("multi");
    // Worker 0 from flags, worker 1 as a Slurm array task (array 1-3), worker 2 as a Kubernetes
    // Indexed Job pod; all three at once.
    let mut w0 = extract_cmd(&data, &multi, &opts);
    w0.args(["--num-workers", "3", "--worker-index", "0"]);
    let mut w1 = extract_cmd(&data, &multi, &opts);
    w1.env("SLURM_ARRAY_TASK_COUNT", "3")
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_MIN", "1");
    let mut w2 = extract_cmd(&data, &multi, &opts);
    w2.env("JOB_COMPLETION_INDEX", "2")
        .env("MULTICLIP_NUM_WORKERS", "3");
    let children: Vec<_> = [w0, w1, w2]
        .iter_mut()
        .map(|c| {
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(!multi.join("manifest.json").exists());
    for i in 0..3 {
        assert!(multi.join(format!("parts/worker-{i}-of-3.json")).exists());
    }
    let output = multiclip()
        .args(["cache", "info"])
        .arg(&multi)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "info on an unmerged cache must say so"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("cache merge"));

    run_ok(multiclip().args(["cache", "merge"]).arg(&multi));
    assert_eq!(
        tree(&multi),
        tree(&single),
        "merged cache differs from the single-process one"
    );
    run_ok(
        multiclip()
            .args(["cache", "verify"])
            .arg(&multi)
            .arg("--data")
            .arg(&data),
    );
}

#[test]
fn verify_names_truncated_and_altered_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 12, 0);
    let cache = tmp.path().join("cache");
    run_ok(&mut extract_cmd(&data, &cache, &["--shard-rows", "4"]));
    run_ok(multiclip().args(["cache", "verify"]).arg(&cache));

    let truncated = cache.join("shard-00000.safetensors");
    let bytes = fs::read(&truncated).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let altered = cache.join("shard-00002.safetensors");
    let mut bytes = fs::read(&altered).unwrap();
    let middle = bytes.len() - 50;
    bytes[middle] = bytes[middle].wrapping_add(1);
    fs::write(&altered, &bytes).unwrap();

    let output = multiclip()
        .args(["cache", "verify"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("shard-00000.safetensors") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shard-00002.safetensors") && stderr.contains("altered"),
        "{stderr}"
    );
    assert!(!stderr.contains("shard-00001"), "{stderr}");
}

#[test]
fn bad_rows_fail_by_name_or_are_recorded_as_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 10, 0);
    fs::remove_file(data.join("data/3.png")).unwrap();
    fs::write(data.join("data/5.png"), b"\x89PNG but not really").unwrap();
    image::RgbImage::new(100, 100)
        .save(data.join("data/7.png"))
        .unwrap();
    let cache = tmp.path().join("cache");
    let opts = ["--shard-rows", "4", "--max-pixels", "5000"];

    let output = extract_cmd(&data, &cache, &opts).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("row 3") && stderr.contains("3.png") && stderr.contains("train.csv line 5"),
        "{stderr}"
    );

    let mut skip = extract_cmd(&data, &cache, &opts);
    skip.args(["--on-error", "skip"]);
    let output = run_ok(&mut skip);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("skipped      3 rows"), "{stdout}");
    for (row, what) in [
        (3, "does not exist"),
        (5, "corrupt"),
        (7, "over the limit of 5000 pixels"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("row {row} ({row}.png): ")))
            .unwrap_or("");
        assert!(
            line.contains(what),
            "row {row} should say `{what}`:\n{stdout}"
        );
    }
    let info = run_ok(multiclip().args(["cache", "info"]).arg(&cache));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("7 stored, 3 skipped") && info.contains("row 5 (5.png)"),
        "{info}"
    );
    run_ok(
        multiclip()
            .args(["cache", "verify"])
            .arg(&cache)
            .arg("--data")
            .arg(&data),
    );

    let reader = CacheReader::open(&cache).unwrap();
    assert_eq!(reader.len(), 7);
    assert_eq!(reader.index_of("5.png"), None);
    assert_eq!(reader.index_of("6.png"), Some(4));
    let skipped: Vec<_> = reader
        .manifest()
        .skipped()
        .map(|s| (s.row, s.id.as_str()))
        .collect();
    assert_eq!(skipped, vec![(3, "3.png"), (5, "5.png"), (7, "7.png")]);

    // An empty caption: a hard error naming the row, file and line with the text backbone, or a
    // row recorded as skipped with --on-error skip.
    let csv = fs::read_to_string(data.join("train.csv")).unwrap();
    let csv = csv.replace(
        "2.png,3,\"a picture of thing 2 with many many  words\"",
        "2.png,3,\"\"",
    );
    assert!(csv.contains("2.png,3,\"\""));
    fs::write(data.join("train.csv"), csv).unwrap();
    let other = tmp.path().join("other");
    let output = extract_cmd(&data, &other, &opts).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("train.csv line 4")
            && stderr.contains("2.png")
            && stderr.contains("empty caption"),
        "{stderr}"
    );
    let mut skip = extract_cmd(&data, &other, &opts);
    skip.args(["--on-error", "skip"]);
    let stdout = String::from_utf8_lossy(&run_ok(&mut skip).stdout).into_owned();
    assert!(stdout.contains("row 2 (2.png): empty caption"), "{stdout}");
    let skipped: Vec<usize> = CacheReader::open(&other)
        .unwrap()
        .manifest()
        .skipped()
        .map(|s| s.row)
        .collect();
    assert_eq!(skipped, vec![2, 3, 5, 7]);
}

/// Two `[[extract]]` stages of one `multiclip run` with different `--threads`: the second runs on
/// the pool the first set up (and says so) instead of failing, and the caches are the same bytes.
#[test]
fn a_second_extract_stage_with_other_threads_runs_on_the_first_pool() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_dataset(&data, 6, 0);
    let (one, two) = (root.path().join("one"), root.path().join("two"));
    let stage = |out: &Path, threads: usize| {
        format!(
            "[[extract]]\ndata = \"{}\"\nbackbone = \"{}\"\nout = \"{}\"\nthreads = {threads}\n",
            data.display(),
            backbone_spec(),
            out.display()
        )
    };
    let pipeline = root.path().join("threads.toml");
    fs::write(
        &pipeline,
        format!(
            "[pipeline]\nname = \"threads\"\n\n{}\n{}",
            stage(&one, 1),
            stage(&two, 2)
        ),
    )
    .unwrap();
    let output = run_ok(multiclip().arg("run").arg(&pipeline));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--threads 2") && stderr.contains("uses those 1"),
        "{stderr}"
    );
    assert_eq!(tree(&one), tree(&two));
}
