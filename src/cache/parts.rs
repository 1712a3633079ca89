//! The per-worker parts of a multi-worker extraction (`parts/worker-I-of-N.json`): each worker's
//! manifest of its own shards, written when the worker finishes, read back by a resumed worker and
//! by `cache merge`, and removed once merged into `manifest.json`.

use super::layout::{
    PARTS_DIR, WorkerSlot, is_part_file_name, parse_part_file_name, part_file_name,
};
use super::manifest::Manifest;
use crate::files::{self, remove_stale_temps};
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};

/// Part files in `dir/parts`, sorted by name.
pub(crate) fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let parts = dir.join(PARTS_DIR);
    if !parts.exists() {
        return Ok(Vec::new());
    }
    let mut paths = Vec::new();
    for entry in fs::read_dir(&parts).with_context(|| format!("cannot list {}", parts.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", parts.display()))?
            .path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| is_part_file_name(&n)) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The worker slot a part file is named after (`worker-I-of-N.json`).
pub(crate) fn slot_of(path: &Path) -> Result<WorkerSlot> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match parse_part_file_name(&name) {
        Some((index, count)) => WorkerSlot::new(index, count)
            .with_context(|| format!("{}: invalid part name", path.display())),
        None => bail!("{}: not a worker-I-of-N.json part name", path.display()),
    }
}

/// Writes `manifest` as worker `slot`'s part of `dir` (atomically, after removing temporary files
/// of an interrupted write); returns its path.
pub(crate) fn save(dir: &Path, slot: WorkerSlot, manifest: &Manifest) -> Result<PathBuf> {
    let parts = dir.join(PARTS_DIR);
    fs::create_dir_all(&parts).with_context(|| format!("cannot create {}", parts.display()))?;
    let name = part_file_name(slot);
    remove_stale_temps(&parts, &name)?;
    let path = parts.join(name);
    manifest.save(&path)?;
    Ok(path)
}

/// Removes `dir/parts` (after its content went into `manifest.json`).
pub(crate) fn remove(dir: &Path) -> Result<()> {
    let parts = dir.join(PARTS_DIR);
    if parts.exists() {
        fs::remove_dir_all(&parts).with_context(|| format!("cannot remove {}", parts.display()))?;
        files::sync_dir(dir)?;
    }
    Ok(())
}
