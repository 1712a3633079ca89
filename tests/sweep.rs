//! `multiclip sweep` end to end with real child processes on a small synthetic cache: the grid
//! trains, ranks on validation and averages the best; a re-run skips finished configurations
//! and retrains only an interrupted one; Slurm array and Indexed Job tasks.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::fixture::{Fixture, fixture, multiclip};

fn sweep_file(f: &Fixture, epochs: usize) -> PathBuf {
    let path = f.root.join("sweep.toml");
    let text = format!(
        "[sweep]\nout = {out:?}\nsbatch = [\"--time=00:05:00\"]\n\n[train]\ncache = {cache:?}\n\
         data = {data:?}\nsplit = {split:?}\nepochs = {epochs}\nbatch_size = 64\n\n[grid]\n\
         head = [\"mlp:hidden=8\", \"mlp:hidden=0\"]\nlr = [0.003, 0.03]\n",
        out = f.root.join("runs"),
        cache = f.cache,
        data = f.data,
        split = f.split,
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn sweep(file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["sweep", file.to_str().unwrap()];
    args.extend(extra);
    String::from_utf8_lossy(&multiclip(&args).stdout).into_owned()
}

/// The sweep's checkpoints with their bytes and modification times.
fn checkpoints(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            let modified = std::fs::metadata(&p).unwrap().modified().unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap(), modified)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn a_sweep_trains_ranks_averages_and_resumes() {
    let f = fixture();
    let file = sweep_file(&f, 2);
    let runs = f.root.join("runs");
    let first = sweep(&file, &["--jobs", "2", "--ensemble-top", "2"]);
    assert!(
        first.contains("4 configurations, 0 finished, 4 to train"),
        "{first}"
    );
    let trained = checkpoints(&runs);
    assert_eq!(trained.len(), 4, "{first}");
    // Ranked on validation micro-F1: the csv's rows in decreasing order.
    let csv = std::fs::read_to_string(runs.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("rank,run,head,lr,val micro-F1"),
        "{csv}"
    );
    let micro: Vec<f64> = lines[1..]
        .iter()
        .map(|l| {
            // The head values hold commas only inside quotes; none here.
            l.split(',').nth(4).unwrap().parse().unwrap()
        })
        .collect();
    assert!(micro.windows(2).all(|w| w[0] >= w[1]), "{csv}");
    let html = std::fs::read_to_string(runs.join("sweep.html")).unwrap();
    assert!(html.matches("<svg").count() >= 8 && !html.contains("<script"));
    assert!(
        std::fs::read_to_string(runs.join("sweep.md"))
            .unwrap()
            .contains("| 1 |")
    );
    // The two best averaged into one ensemble checkpoint.
    let best: Vec<&str> = lines[1..3]
        .iter()
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    let top: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("top-2.json")).unwrap()).unwrap();
    let members: Vec<&str> = top["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["checkpoint"].as_str().unwrap())
        .collect();
    assert_eq!(members, best);
    assert!(runs.join("top-2.report.html").is_file());

    // A re-run trains nothing and keeps the ensemble.
    let again = sweep(&file, &["--ensemble-top", "2"]);
    assert!(again.contains("4 finished, 0 to train"), "{again}");
    assert!(again.contains("up to date"), "{again}");
    assert_eq!(checkpoints(&runs), trained);

    // An interrupted run (its metrics never written) is cleared and retrained, alone.
    let victim = best[1];
    std::fs::remove_file(runs.join(format!("{victim}.metrics.json"))).unwrap();
    let resumed = sweep(&file, &[]);
    assert!(resumed.contains("3 finished, 1 to train"), "{resumed}");
    assert!(
        resumed.contains(&format!("{victim}: val micro-F1")),
        "{resumed}"
    );
    let after = checkpoints(&runs);
    for (before, now) in trained.iter().zip(&after) {
        assert_eq!(before.1, now.1, "same seed, same weights: {}", before.0);
        assert_eq!(
            before.2 == now.2,
            !before.0.starts_with(victim),
            "{}",
            before.0
        );
    }

    // Another shared flag makes every configuration new.
    let changed = sweep_file(&f, 3);
    let listed = sweep(&changed, &["--list"]);
    assert_eq!(listed.matches("pending").count(), 4, "{listed}");
}

#[test]
fn slurm_arrays_and_indexed_jobs_run_one_configuration_per_task() {
    let f = fixture();
    let file = sweep_file(&f, 1);
    let printed = sweep(&file, &["--slurm", "--ensemble-top", "2"]);
    assert!(
        printed.contains(
            "jid=$(sbatch --parsable --array=0-3 --job-name=multiclip-sweep --time=00:05:00 --wrap"
        ) && printed.contains(" --task'")
            && printed.contains("sbatch --dependency=afterok:$jid")
            && printed.contains("--rank --ensemble-top 2'"),
        "{printed}"
    );

    // Task 2 of an Indexed Job (JOB_COMPLETION_INDEX), then task 0 of a Slurm array starting at 1.
    let task = |env: (&str, &str)| -> Output {
        Command::new(env!("CARGO_BIN_EXE_multiclip"))
            .args(["sweep", file.to_str().unwrap(), "--task"])
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .env(env.0, env.1)
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .output()
            .unwrap()
    };
    let out = task(("JOB_COMPLETION_INDEX", "2"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration 2 "));
    let out = task(("SLURM_ARRAY_TASK_ID", "1"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration 0 "));
    let listed = sweep(&file, &["--list"]);
    assert_eq!(listed.matches("finished").count(), 2, "{listed}");
    // The array now holds only what is missing; --submit runs sbatch (a stand-in here).
    let bin = f.root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = f.root.join("sbatch-calls");
    let fake = bin.join("sbatch");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\necho 4242\n", calls.display()),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(["sweep", file.to_str().unwrap(), "--slurm", "--submit"])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0].contains("--array=1,3") && calls[0].contains("--task"),
        "{calls:?}"
    );
    assert!(calls[1].starts_with("--dependency=afterok:4242") && calls[1].contains("--rank"));
}

#[test]
fn a_configuration_that_is_not_a_train_flag_is_refused_before_anything_runs() {
    let f = fixture();
    let file = sweep_file(&f, 1);
    let text = std::fs::read_to_string(&file).unwrap() + "no_such_flag = [1, 2]\n";
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(["sweep", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    assert!(!f.root.join("runs").exists());
}
