//! Every pipeline file in pipelines/ parses, and each of its stages parses as its command's
//! flags (`multiclip run --dry-run` runs nothing).

use std::process::Command;

#[test]
fn every_pipeline_file_parses_as_commands() {
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"))
        .expect("pipelines/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "demo",
        "clip_router",
        "blip_naive",
        "blip_ensemble",
        "blip_gat",
        "blip_ml_decoder",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "pipelines/{expected}.toml is missing"
        );
    }
    for file in &files {
        let out = Command::new(env!("CARGO_BIN_EXE_multiclip"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("run")
            .arg(file)
            .arg("--dry-run")
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}\n{stdout}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        for stage in ["extract", "train", "evaluate", "predict"] {
            assert!(
                stdout.contains(&format!("== multiclip {stage} ")),
                "{}: no {stage}\n{stdout}",
                file.display()
            );
        }
    }
}

#[test]
fn overrides_reach_the_command_and_bad_flags_name_the_section() {
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_multiclip"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["run", "pipelines/demo.toml", "--dry-run"])
            .args(extra)
            .output()
            .expect("runs")
    };
    let out = run(&["--set", "train.head=router", "--set", "train.lr=0.003"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("--head router") && stdout.contains("--lr 0.003"),
        "{stdout}"
    );

    let out = run(&["--set", "train.no_such_flag=1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[train]") && stderr.contains("--no-such-flag"),
        "{stderr}"
    );
}

#[test]
fn every_stage_is_checked_before_any_stage_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cache) = (dir.path().join("data"), dir.path().join("cache"));
    let out = dir.path().join("predictions.csv");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        format!(
            "[pipeline]\nname = \"bad\"\n\n[[extract]]\ndata = {data:?}\npart = \"train\"\n\
             backbone = \"dinov2:tests/fixtures/dinov2-tiny\"\nout = {cache:?}\n\n\
             [train]\ncache = {cache:?}\ndata = {data:?}\nsplit = \"split.json\"\n\
             head = \"mlp\"\n\n[predict]\ncache = {cache:?}\nout = {out:?}\n"
        ),
    )
    .unwrap();
    for (set, section, named) in [
        ("train.learning_rate=0.1", "[train]", "--learning-rate"),
        ("train.lr=-1.0", "[train]", "--lr"),
        ("train.batch_size=0", "[train]", "--batch-size"),
        ("train.head=gat:hidden=0", "[train]", "hidden"),
        (
            &format!("predict.probabilities={}", out.display()),
            "[predict]",
            "--probabilities",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_multiclip"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("run")
            .arg(&file)
            .args(["--set", set])
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{set}: {stdout}\n{stderr}");
        assert!(
            stderr.contains(section) && stderr.contains(named),
            "{set}: {stderr}"
        );
        assert!(!stdout.contains("== multiclip extract"), "{set}: {stdout}");
        assert!(!cache.exists() && !out.exists(), "{set}");
    }
}
