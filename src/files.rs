//! Crash-safe file writing and checksums, at the bottom of the crate so that every stage can use
//! them (the cache's shards and manifest, weight and csv hashes in backbone, extract, train and
//! predict). Writing goes to a temporary name beside the target, fsync, rename into place, fsync
//! the directory: a reader (or a re-run after `kill -9`) therefore sees either the complete old
//! state or the complete new file, never a partial one.
//!
//! Checksums: sha256 identifies inputs (csv files, weights); a [`ContentHash`] is a digest tagged
//! with its algorithm (`xxh3-128:…`, `sha256:…`), for data that is checked on every read.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fmt;
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

/// An algorithm of [`ContentHash`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha256,
    /// XXH3, 128-bit: not cryptographic, 16 times cheaper than sha256 here (README, "Integrity").
    Xxh3_128,
}

impl HashAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Xxh3_128 => "xxh3-128",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [HashAlgorithm::Sha256, HashAlgorithm::Xxh3_128]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Lower-case hex digest of `bytes` (xxh3-128 in its canonical big-endian form, as
    /// Python's `xxhash.xxh3_128_hexdigest` writes it).
    fn hex(self, bytes: &[u8]) -> String {
        match self {
            HashAlgorithm::Sha256 => sha256_hex(bytes),
            HashAlgorithm::Xxh3_128 => format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes)),
        }
    }
}

/// A digest and the algorithm that made it, written `algorithm:hex` (`xxh3-128:9f0c…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentHash {
    pub algorithm: HashAlgorithm,
    pub hex: String,
}

impl ContentHash {
    pub fn of(algorithm: HashAlgorithm, bytes: &[u8]) -> Self {
        Self {
            algorithm,
            hex: algorithm.hex(bytes),
        }
    }

    /// The hash of `bytes` with this hash's algorithm, when it differs from this one.
    pub fn mismatch(&self, bytes: &[u8]) -> Option<ContentHash> {
        let actual = Self::of(self.algorithm, bytes);
        (actual != *self).then_some(actual)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl std::str::FromStr for ContentHash {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let Some((name, hex)) = s.split_once(':') else {
            bail!("{s:?} is not a hash of the form algorithm:hex");
        };
        let Some(algorithm) = HashAlgorithm::from_name(name) else {
            bail!("unknown hash algorithm {name:?} in {s:?} (expected sha256 or xxh3-128)");
        };
        let digits = algorithm.hex(b"").len();
        if hex.len() != digits
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            bail!("{s:?}: a {name} digest is {digits} lower-case hex digits");
        }
        Ok(Self {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

impl serde::Serialize for ContentHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ContentHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
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

    #[test]
    fn content_hashes_name_their_algorithm_and_parse_back() {
        // The reference value of XXH3-128 of no bytes (xxHash's test vectors).
        let empty = ContentHash::of(HashAlgorithm::Xxh3_128, b"");
        assert_eq!(
            empty.to_string(),
            "xxh3-128:99aa06d3014798d86001c324468d497f"
        );
        let sha = ContentHash::of(HashAlgorithm::Sha256, b"abc");
        assert_eq!(sha.to_string(), format!("sha256:{}", sha256_hex(b"abc")));
        for hash in [&empty, &sha] {
            assert_eq!(&hash.to_string().parse::<ContentHash>().unwrap(), hash);
            let json = serde_json::to_string(hash).unwrap();
            assert_eq!(&serde_json::from_str::<ContentHash>(&json).unwrap(), hash);
        }
        assert_eq!(empty.mismatch(b""), None);
        assert_eq!(
            empty.mismatch(b"x"),
            Some(ContentHash::of(HashAlgorithm::Xxh3_128, b"x"))
        );
        for bad in [
            "",
            "xxh3-128",
            "md5:00",
            "sha256:abc",
            "xxh3-128:99AA06D3014798D86001C324468D497F",
        ] {
            assert!(bad.parse::<ContentHash>().is_err(), "{bad}");
        }
    }
}
