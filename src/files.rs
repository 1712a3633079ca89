//! Crash-safe file writing and checksums, at the bottom of the crate so that every stage can use
//! them (the cache's shards and manifest, weight and csv hashes in backbone, extract, train and
//! predict). Writing goes to a temporary name beside the target, fsync, rename into place, fsync
//! the directory: a reader (or a re-run after `kill -9`) therefore sees either the complete old
//! state or the complete new file, never a partial one.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;

/// Prefix and infix of temporary files: `.<final name>.tmp.<pid>`.
fn temp_prefix(final_name: &str) -> String {
    format!(".{final_name}.tmp")
}

/// Whether `name` is a temporary file of an interrupted [`write_atomic`] (of any target).
pub fn is_temp_file_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp")
}

/// Writes `bytes` to `path` atomically (temp file + fsync + rename + fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    let name = file_name(path)?;
    let temp = dir.join(format!("{}.{}", temp_prefix(name), std::process::id()));
    let result = (|| -> Result<()> {
        let mut file = File::create(&temp)
            .with_context(|| format!("cannot create temporary file {}", temp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", temp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot fsync {}", temp.display()))?;
        fs::rename(&temp, path)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), path.display()))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes temporary files left by an interrupted [`write_atomic`] of `dir/final_name`.
/// Returns how many were removed.
pub fn remove_stale_temps(dir: &Path, final_name: &str) -> Result<usize> {
    let prefix = temp_prefix(final_name);
    let mut removed = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// fsyncs a directory so that a rename inside it survives a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // Opening a directory for fsync works on Unix; elsewhere there is nothing to do.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}

/// Lower-case hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn file_name(path: &Path) -> Result<&str> {
    path.file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_are_removed_only_for_their_target() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".a.json.tmp.123"), b"x").unwrap();
        fs::write(dir.path().join(".b.json.tmp.123"), b"x").unwrap();
        assert!(is_temp_file_name(".b.json.tmp.123") && !is_temp_file_name("b.json"));
        assert_eq!(remove_stale_temps(dir.path(), "a.json").unwrap(), 1);
        assert!(dir.path().join(".b.json.tmp.123").exists());
    }

    #[test]
    fn sha256_of_file_matches_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), sha256_hex(b"abc"));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
