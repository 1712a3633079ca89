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
