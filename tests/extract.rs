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

/// A write that fails midway (a full disk: here a file-size limit, which makes `write` fail with
/// EFBIG as a full disk fails with ENOSPC) stops the run with the error; the same command run
/// again keeps what was finished and gives the bytes of an uninterrupted run.
#[test]
fn a_failed_write_then_resume_gives_the_uninterrupted_cache() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 30, 0);
    let opts = ["--shard-rows", "4", "--batch-size", "2"];
    let full = tmp.path().join("full");
    run_ok(&mut extract_cmd(&data, &full, &opts));
    let expected = tree(&full);
    let largest_shard = shard_files(&full)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .max()
        .unwrap();
    let manifest = fs::metadata(full.join("manifest.json")).unwrap().len();
    assert!(
        manifest > largest_shard,
        "the limit below must stop only the manifest"
    );
    // No shard fits; then every shard fits but the manifest does not.
    for (limit, shards_left) in [(largest_shard / 2, 0), (largest_shard, 8)] {
        let cache = tmp.path().join(format!("limited-{limit}"));
        let mut cmd = extract_cmd(&data, &cache, &opts);
        // SAFETY: only async-signal-safe calls between fork and exec.
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
        let stderr = failure(&mut cmd);
        assert!(stderr.contains("File too large"), "{limit}: {stderr}");
        assert!(!cache.join("manifest.json").exists());
        assert_eq!(shard_files(&cache).len(), shards_left, "{limit}");
        let output = run_ok(&mut extract_cmd(&data, &cache, &opts));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let reused = format!("{} written, {shards_left} reused", 8 - shards_left);
        assert!(
            stdout.contains(&reused),
            "expected `{reused}` in:\n{stdout}"
        );
        assert_eq!(tree(&cache), expected, "{limit}: the resumed cache differs");
    }
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

// ---------------------------------------------------------------------------------------------
// Writer locks, integrity on read and the exit status of an extraction that stored nothing.

/// A spawned `multiclip` that is stopped (SIGSTOP) while it holds a lock, so that other
/// processes meet that lock for sure; dropping it resumes the process and, unless it was waited
/// for, kills it.
struct Held {
    child: Option<std::process::Child>,
}

impl Held {
    /// Spawns `cmd` and stops it as soon as `lock` (a path under the cache) names it as holder.
    fn start(mut cmd: Command, lock: &Path) -> Self {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut held = Held { child: Some(child) };
        let pid = held.pid();
        let deadline = Instant::now() + Duration::from_secs(120);
        while lock_holder_pid(lock) != Some(pid) {
            assert!(
                Instant::now() < deadline,
                "{} never named pid {pid}",
                lock.display()
            );
            let child = held.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                let output = held.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "the lock holder ended ({status}) before it could be stopped:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        held.signal(libc::SIGSTOP);
        held
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Lets the process go on and waits for it.
    fn finish(mut self) -> Output {
        self.signal(libc::SIGCONT);
        self.child.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The pid recorded in a lock file, if it exists and holds one.
fn lock_holder_pid(lock: &Path) -> Option<u32> {
    let text = fs::read_to_string(lock).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["pid"].as_u64().map(|p| p as u32)
}

fn failure(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap();
    assert!(
        !output.status.success(),
        "{cmd:?} should have failed:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn verify_ok(cache: &Path, data: &Path) {
    run_ok(
        multiclip()
            .args(["cache", "verify"])
            .arg(cache)
            .arg("--data")
            .arg(data),
    );
}

/// Issue 12 #1: a second writer into a cache that another process is writing is refused with
/// the directory and the holder (pid, host, start time), and the first one's cache is intact.
#[test]
fn a_second_writer_meets_the_lock_of_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 200, 0);
    let cache = tmp.path().join("cache");
    let first = Held::start(
        extract_cmd(&data, &cache, &["--shard-rows", "4", "--batch-size", "2"]),
        &cache.join("writer.lock"),
    );
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for other in [["--shard-rows", "8"], ["--shard-rows", "4"]] {
        let mut opts = other.to_vec();
        opts.extend(["--batch-size", "2"]);
        let stderr = failure(&mut extract_cmd(&data, &cache, &opts));
        assert!(
            stderr.contains(&cache.display().to_string())
                && stderr.contains(&format!("pid {}", first.pid()))
                && stderr.contains(host.trim())
                && stderr.contains("since")
                && stderr.contains("being written by another multiclip process"),
            "{stderr}"
        );
    }
    // `cache merge` writes into the directory too.
    let stderr = failure(multiclip().args(["cache", "merge"]).arg(&cache));
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    let output = first.finish();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !cache.join("writer.lock").exists(),
        "the lock file is removed on release"
    );
    verify_ok(&cache, &data);
}

/// Issue 12 #1 as it was found: two extractions with other settings started at once into one
/// directory. At most one may succeed, and what is left verifies.
#[test]
fn concurrent_extracts_never_both_write_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 120, 0);
    for trial in 0..3 {
        let cache = tmp.path().join(format!("cache-{trial}"));
        let children: Vec<_> = [["--shard-rows", "4"], ["--shard-rows", "8"]]
            .iter()
            .map(|opts| {
                extract_cmd(&data, &cache, opts)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outputs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let succeeded = outputs.iter().filter(|o| o.status.success()).count();
        assert_eq!(
            succeeded, 1,
            "trial {trial}: {succeeded} of 2 extractions succeeded"
        );
        let loser = outputs.iter().find(|o| !o.status.success()).unwrap();
        let stderr = String::from_utf8_lossy(&loser.stderr);
        assert!(
            stderr.contains("being written by another multiclip process")
                || stderr.contains("different extraction"),
            "{stderr}"
        );
        verify_ok(&cache, &data);
    }
}

/// Issue 12 #1: a writer killed with SIGKILL leaves its lock file, but not its lock: the next
/// run takes it over, resumes, and removes the file when done.
#[test]
fn the_lock_file_of_a_killed_writer_does_not_block() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 60, 0);
    let opts = ["--shard-rows", "3", "--batch-size", "2"];
    let cache = tmp.path().join("cache");
    assert!(kill_after_shards(extract_cmd(&data, &cache, &opts), &cache, 1) < 20);
    let holder = lock_holder_pid(&cache.join("writer.lock"))
        .expect("the killed writer's lock file stays (its content is information only)");
    assert!(
        !Path::new(&format!("/proc/{holder}")).exists(),
        "the recorded holder {holder} is the killed process"
    );
    let output = run_ok(&mut extract_cmd(&data, &cache, &opts));
    assert!(String::from_utf8_lossy(&output.stdout).contains("reused"));
    assert!(!cache.join("writer.lock").exists());
    verify_ok(&cache, &data);
}

/// Issue 12 #1 with several workers: each locks only its own slot, so the workers of one
/// extraction run side by side, while a second copy of a running worker, a worker of another
/// split of the job, a single-process writer and `cache merge` are refused until it is done.
#[test]
fn workers_lock_their_slot_and_share_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 160, 0);
    let opts = ["--shard-rows", "4", "--batch-size", "2"];
    let cache = tmp.path().join("cache");
    let worker = |index: &str, count: &str| {
        let mut all = opts.to_vec();
        all.extend(["--num-workers", count, "--worker-index", index]);
        extract_cmd(&data, &cache, &all)
    };
    let first = Held::start(worker("0", "2"), &cache.join("worker-0-of-2.lock"));
    let holder = format!("pid {}", first.pid());

    run_ok(&mut worker("1", "2"));
    let stderr = failure(&mut worker("0", "2"));
    assert!(
        stderr.contains("worker 0 of 2")
            && stderr.contains("already running")
            && stderr.contains(&holder),
        "{stderr}"
    );
    let stderr = failure(&mut worker("1", "3"));
    assert!(
        stderr.contains("worker 0 of 2")
            && stderr.contains(&holder)
            && stderr.contains("same arguments"),
        "{stderr}"
    );
    let stderr = failure(&mut extract_cmd(&data, &cache, &opts));
    assert!(
        stderr.contains("worker 0 of 2") && stderr.contains(&holder),
        "{stderr}"
    );
    let stderr = failure(multiclip().args(["cache", "merge"]).arg(&cache));
    assert!(
        stderr.contains("worker 0 of 2") && stderr.contains(&holder),
        "{stderr}"
    );

    let output = first.finish();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    run_ok(multiclip().args(["cache", "merge"]).arg(&cache));
    verify_ok(&cache, &data);
    let single = tmp.path().join("single");
    run_ok(&mut extract_cmd(&data, &single, &opts));
    assert_eq!(tree(&cache), tree(&single));
}

/// Issue 12 #16: `--on-error skip` with every row unreadable stored nothing: that is an error,
/// and nothing is kept, so that the same command run again after fixing the images extracts
/// them.
#[test]
fn an_extraction_that_stores_no_row_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 24, 0);
    let images = tmp.path().join("good-images");
    fs::rename(data.join("data"), &images).unwrap();
    fs::create_dir(data.join("data")).unwrap();
    for i in 0..24 {
        fs::write(data.join(format!("data/{i}.png")), b"not a png").unwrap();
    }
    let cache = tmp.path().join("cache");
    let opts = ["--shard-rows", "8", "--on-error", "skip"];
    let stderr = failure(&mut extract_cmd(&data, &cache, &opts));
    assert!(
        stderr.contains("all 24 rows were skipped") && stderr.contains("row 0 (0.png)"),
        "{stderr}"
    );
    assert!(!cache.join("manifest.json").exists());
    assert!(shard_files(&cache).is_empty(), "{:?}", shard_files(&cache));

    fs::remove_dir_all(data.join("data")).unwrap();
    fs::rename(&images, data.join("data")).unwrap();
    run_ok(&mut extract_cmd(&data, &cache, &opts));
    assert_eq!(CacheReader::open(&cache).unwrap().len(), 24);
}

/// The byte range of a shard's safetensors header (length prefix and JSON).
fn header_end(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Replaces `from` by `to` (same length) once inside the header of `shard`.
fn edit_header(shard: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(shard).unwrap();
    let end = header_end(&bytes);
    let at = bytes[..end]
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} is not in the header of {}", shard.display()));
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    fs::write(shard, bytes).unwrap();
}

/// Swaps the ids `a` and `b` (of equal length) in the header of `shard`.
fn swap_ids(shard: &Path, a: &str, b: &str) {
    let quoted = |id: &str| format!("\\\"{id}\\\"");
    let placeholder = "#".repeat(a.len());
    edit_header(shard, &quoted(a), &quoted(&placeholder));
    edit_header(shard, &quoted(b), &quoted(a));
    edit_header(shard, &quoted(&placeholder), &quoted(b));
}

/// Issue 12 #3: train and predict check the cache when they open it (row ids against the
/// manifest, content hash) and refuse a damaged one in the words of `cache verify`.
#[test]
fn train_and_predict_refuse_damaged_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 40, 0);
    let cache = tmp.path().join("cache");
    run_ok(&mut extract_cmd(&data, &cache, &["--shard-rows", "16"]));
    let split = tmp.path().join("split.json");
    run_ok(
        multiclip()
            .args(["dataset", "split"])
            .arg(&data)
            .arg("--out")
            .arg(&split),
    );
    let checkpoints = tmp.path().join("checkpoints");
    let train = |name: &str| {
        let mut cmd = multiclip();
        cmd.arg("train")
            .arg("--cache")
            .arg(&cache)
            .arg("--data")
            .arg(&data)
            .arg("--split")
            .arg(&split)
            .args([
                "--head",
                "mlp:hidden=0",
                "--epochs",
                "1",
                "--name",
                name,
                "--out",
            ])
            .arg(&checkpoints);
        cmd
    };
    let predict = || {
        let mut cmd = multiclip();
        cmd.arg("predict")
            .arg("--cache")
            .arg(&cache)
            .arg("--checkpoint")
            .arg(checkpoints.join("probe"))
            .arg("--out")
            .arg(tmp.path().join("predictions.csv"));
        cmd
    };
    run_ok(&mut train("probe"));
    run_ok(&mut predict());
    let first = cache.join("shard-00000.safetensors");
    let pristine = fs::read(&first).unwrap();

    // Two ids swapped in a shard's metadata: their rows would carry each other's labels.
    swap_ids(&first, "3.png", "4.png");
    let verify = failure(multiclip().args(["cache", "verify"]).arg(&cache));
    let problem = verify
        .lines()
        .find(|l| l.contains("shard-00000.safetensors") && l.contains("row ids"))
        .unwrap_or_else(|| panic!("verify names the edited ids:\n{verify}"))
        .trim_start_matches("error: ")
        .to_string();
    for stderr in [failure(&mut train("swapped")), failure(&mut predict())] {
        assert!(
            stderr.contains(&problem) && stderr.contains("cache verify"),
            "the words of verify ({problem}) and where to look:\n{stderr}"
        );
    }

    // One id edited: predict would write it to the submission as it is.
    fs::write(&first, &pristine).unwrap();
    edit_header(&first, "\\\"3.png\\\"", "\\\"x.png\\\"");
    let stderr = failure(&mut predict());
    assert!(
        stderr.contains("shard-00000.safetensors") && stderr.contains("row ids"),
        "{stderr}"
    );

    // A NaN over a stored feature value (f16 0x7e00) of the last shard.
    fs::write(&first, &pristine).unwrap();
    let last = cache.join("shard-00002.safetensors");
    let mut bytes = fs::read(&last).unwrap();
    let at = header_end(&bytes) + 10;
    bytes[at..at + 2].copy_from_slice(&[0x00, 0x7e]);
    fs::write(&last, bytes).unwrap();
    for stderr in [failure(&mut predict()), failure(&mut train("nan"))] {
        assert!(
            stderr.contains("shard-00002.safetensors") && stderr.contains("altered"),
            "{stderr}"
        );
    }
    // --trust-cache skips the content hash only: the NaN is still refused when its row is read,
    let stderr = failure(predict().arg("--trust-cache"));
    assert!(
        stderr.contains("shard-00002.safetensors") && stderr.contains("NaN"),
        "{stderr}"
    );
    // and a finite change of a feature value (f16 1.0) is read as it is.
    bytes = fs::read(&last).unwrap();
    bytes[at..at + 2].copy_from_slice(&[0x00, 0x3c]);
    fs::write(&last, bytes).unwrap();
    assert!(failure(&mut predict()).contains("altered"));
    run_ok(predict().arg("--trust-cache"));
    run_ok(train("trusted").arg("--trust-cache"));
}
