//! Writer locks: two processes never write into one cache directory at once.
//!
//! A lock is an advisory `flock` (std's `File::try_lock`) on a lock file. The kernel releases it
//! when its process ends, however it ends, so a `kill -9` leaves the file behind but never the
//! lock; the file's content (a JSON [`Holder`]: pid, host, start time, what, command line) only
//! tells whoever is kept out who holds it.
//!
//! - A process that writes the whole cache (`extract` in one process, `cache merge`) holds
//!   `writer.lock` exclusively.
//! - A worker of a multi-worker extraction holds `writer.lock` shared, so the workers of one job
//!   run side by side (on one machine, or on many sharing the storage), and its own
//!   `worker-I-of-N.lock` (beside it) exclusively: it locks only what it writes. Having both, it checks
//!   that every other live worker runs the same extraction (settings fingerprint and worker
//!   count).
//!
//! Readers take no lock (a finished cache may sit on read-only storage); they rely on the
//! manifest appearing only once every shard is complete.
//!
//! The last holder removes the lock file before letting go, so a finished cache holds none;
//! a process that opened the file just before it was removed finds that the path no longer names
//! the file it locked, and starts over.

use super::layout::{LOCK_FILE, WorkerSlot, parse_worker_lock_file_name, worker_lock_file_name};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How long a busy lock is tried again before giving up: long enough for another process to
/// finish a probe or to write its holder record, short next to any real hold.
const GRACE: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(20);
/// Characters of the holder's command line kept in its record.
const COMMAND_CHARS: usize = 400;

/// Who holds a lock, as written into its lock file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    /// Start of the hold, `2026-05-01 10:22:03 UTC`.
    since: String,
    /// `extract`, `extract worker 1 of 3`, `cache merge`.
    what: String,
    /// The settings fingerprint of a worker's extraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    command: String,
}

impl Holder {
    fn of_this_process(what: &str, fingerprint: Option<&str>) -> Self {
        let command: String = std::env::args()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(COMMAND_CHARS)
            .collect();
        Self {
            pid: std::process::id(),
            host: host_name(),
            since: utc_timestamp(SystemTime::now()),
            what: what.to_string(),
            fingerprint: fingerprint.map(str::to_string),
            command,
        }
    }

    fn read(path: &Path) -> Option<Self> {
        serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
    }

    /// `extract, pid 4242 on host node7, since 2026-05-01 10:22:03 UTC, running `multiclip …``.
    fn describe(&self) -> String {
        format!(
            "{}, pid {} on host {}, since {}, running `{}`",
            self.what, self.pid, self.host, self.since, self.command
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Exclusive,
    Shared,
}

/// One held lock file.
struct LockFile {
    file: File,
    path: PathBuf,
    mode: Mode,
}

impl LockFile {
    /// Takes the lock of `path` (created if missing), trying again for [`GRACE`] while another
    /// process holds it; `None` when it is still held then.
    fn acquire(path: &Path, mode: Mode) -> Result<Option<Self>> {
        let deadline = Instant::now() + GRACE;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("cannot open lock file {}", path.display()))?;
            let attempt = match mode {
                Mode::Exclusive => file.try_lock(),
                Mode::Shared => file.try_lock_shared(),
            };
            match attempt {
                Ok(()) if names_file(path, &file) => {
                    return Ok(Some(Self {
                        file,
                        path: path.to_path_buf(),
                        mode,
                    }));
                }
                // Its last holder removed the file meanwhile: lock the one the path names now.
                Ok(()) => continue,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(RETRY)
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => bail!(
                    "cannot lock {}: {e} (the cache directory must be on a file system with \
                     file locks)",
                    path.display()
                ),
            }
        }
    }

    /// Records `holder` as the file's content (exclusive holds only).
    fn record(&mut self, holder: &Holder) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(holder).expect("a holder always serialises");
        json.push(b'\n');
        self.file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| self.file.write_all(&json))
            .with_context(|| format!("cannot write lock file {}", self.path.display()))
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed while still locked exclusively (a shared holder that turns out to be the last
        // one upgrades first), so nobody can lock this file and then find it gone unnoticed;
        // closing the file then releases the lock.
        if self.mode == Mode::Exclusive || self.file.try_lock().is_ok() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` still names the file `file` was opened from.
fn names_file(path: &Path, file: &File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(path), file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, file);
        true
    }
}

/// Whether some process holds the lock of the existing file `path` (probed with a brief
/// exclusive lock of our own, which a process about to take it rides out within [`GRACE`]).
fn is_held(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).write(true).open(path) else {
        return false;
    };
    matches!(file.try_lock(), Err(TryLockError::WouldBlock))
}

/// Whether `writer.lock` is held shared only (by workers): a shared probe gets in.
fn held_shared_only(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .is_ok_and(|file| file.try_lock_shared().is_ok())
}

/// The live workers of `dir` (slot and holder), from their lock files.
fn live_workers(dir: &Path) -> Vec<(WorkerSlot, PathBuf, Option<Holder>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut workers: Vec<_> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (index, count) = parse_worker_lock_file_name(&name)?;
            let slot = WorkerSlot::new(index, count).ok()?;
            let path = entry.path();
            is_held(&path).then(|| (slot, path.clone(), Holder::read(&path)))
        })
        .collect();
    workers.sort_by_key(|(slot, _, _)| (slot.count, slot.index));
    workers
}

fn describe_worker(slot: WorkerSlot, holder: Option<&Holder>) -> String {
    match holder {
        Some(holder) => holder.describe(),
        None => format!(
            "extract worker {} of {} (it has not recorded itself yet)",
            slot.index, slot.count
        ),
    }
}

/// The writer locks a process holds on one cache directory, released when dropped (in order:
/// a worker's own slot first).
pub struct WriterLock {
    _files: Vec<LockFile>,
}

impl WriterLock {
    /// Locks all of `dir` for `what` (`extract`, `cache merge`), which writes into any part of it.
    pub fn whole(dir: &Path, what: &str) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let Some(mut file) = LockFile::acquire(&path, Mode::Exclusive)? else {
            bail!(busy_message(dir, &path, what));
        };
        file.record(&Holder::of_this_process(what, None))?;
        Ok(Self { _files: vec![file] })
    }

    /// Locks worker `slot`'s part of `dir` for an extraction whose settings fingerprint is
    /// `fingerprint`, after checking that every other live worker runs the same extraction.
    pub fn worker(dir: &Path, slot: WorkerSlot, fingerprint: &str) -> Result<Self> {
        let what = format!("extract worker {} of {}", slot.index, slot.count);
        let cache_path = dir.join(LOCK_FILE);
        let Some(cache) = LockFile::acquire(&cache_path, Mode::Shared)? else {
            bail!(busy_message(dir, &cache_path, &what));
        };
        let own_path = dir.join(worker_lock_file_name(slot));
        let Some(mut own) = LockFile::acquire(&own_path, Mode::Exclusive)? else {
            let holder = Holder::read(&own_path);
            bail!(
                "{}: worker {} of {} is already running: {}. This copy cannot write into it \
                 meanwhile (two copies of one worker would write the same files): wait for it to \
                 finish, or stop it first. (Lock file: {}.)",
                dir.display(),
                slot.index,
                slot.count,
                describe_worker(slot, holder.as_ref()),
                own_path.display()
            );
        };
        own.record(&Holder::of_this_process(&what, Some(fingerprint)))?;
        check_other_workers(dir, slot, fingerprint, &what)?;
        Ok(Self {
            _files: vec![own, cache],
        })
    }
}

/// Errors when a live worker of `dir` other than `slot` runs another extraction or another
/// split of the job. A worker's record may lag its lock by a moment: a mismatch is read again
/// for up to [`GRACE`] before it counts.
fn check_other_workers(dir: &Path, slot: WorkerSlot, fingerprint: &str, what: &str) -> Result<()> {
    let same_run = |other: WorkerSlot, holder: &Option<Holder>| {
        other.count == slot.count
            && holder
                .as_ref()
                .is_some_and(|h| h.fingerprint.as_deref() == Some(fingerprint))
    };
    for (other, path, mut holder) in live_workers(dir) {
        if other == slot {
            continue;
        }
        let deadline = Instant::now() + GRACE;
        while !same_run(other, &holder) && Instant::now() < deadline {
            std::thread::sleep(RETRY);
            holder = Holder::read(&path);
        }
        if same_run(other, &holder) {
            continue;
        }
        let mut differences = Vec::new();
        if other.count != slot.count {
            differences.push(format!(
                "--num-workers {} instead of {}",
                other.count, slot.count
            ));
        }
        if let Some(theirs) = holder.as_ref().and_then(|h| h.fingerprint.as_deref())
            && theirs != fingerprint
        {
            differences.push(format!(
                "other extraction settings (fingerprint {} instead of {})",
                &theirs[..theirs.len().min(12)],
                &fingerprint[..fingerprint.len().min(12)]
            ));
        }
        bail!(
            "{} is being written by {}, with {}. This {what} cannot join it: all workers of one \
             cache must be started with the same arguments, but for their --worker-index. (Lock \
             file: {}.)",
            dir.display(),
            describe_worker(other, holder.as_ref()),
            if differences.is_empty() {
                "settings it has not recorded".to_string()
            } else {
                differences.join(" and ")
            },
            path.display()
        );
    }
    Ok(())
}

/// The error of `what` meeting a held `writer.lock` of `dir`: who holds it and what to do.
fn busy_message(dir: &Path, path: &Path, what: &str) -> String {
    let holders = if held_shared_only(path) {
        let workers: Vec<String> = live_workers(dir)
            .iter()
            .map(|(slot, _, holder)| describe_worker(*slot, holder.as_ref()))
            .collect();
        if workers.is_empty() {
            "workers of a multi-worker extraction that are just starting".to_string()
        } else {
            format!(
                "the workers of a multi-worker extraction: {}",
                workers.join("; ")
            )
        }
    } else {
        match Holder::read(path) {
            Some(holder) => holder.describe(),
            None => "a process that has not recorded itself yet".to_string(),
        }
    };
    format!(
        "{} is being written by another multiclip process: {holders}. This {what} cannot write \
         into it meanwhile (two writers at once would corrupt the cache): wait for that to \
         finish, or use another directory. (A process that ends, even by kill -9, frees its \
         lock at once, so the holder is running. Lock file: {}.)",
        dir.display(),
        path.display()
    )
}

/// This machine's name (`unknown` when it cannot be read).
fn host_name() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
    }
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "unknown".to_string())
}

/// `2026-05-01 10:22:03 UTC` (the civil date from days since 1970, proleptic Gregorian).
fn utc_timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm, for days >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let at = |secs: u64| utc_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_777_630_923), "2026-05-01 10:22:03 UTC");
    }

    #[test]
    fn a_second_writer_is_refused_and_the_lock_file_goes_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = WriterLock::whole(dir.path(), "extract").unwrap();
        let holder = Holder::read(&dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(holder.pid, std::process::id());
        // flock locks belong to open files: a second open in this process is kept out too.
        let err = WriterLock::whole(dir.path(), "cache merge")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("being written by another multiclip process")
                && err.contains(&format!("extract, pid {}", std::process::id()))
                && err.contains("This cache merge"),
            "{err}"
        );
        assert!(WriterLock::worker(dir.path(), WorkerSlot::new(0, 2).unwrap(), "f").is_err());
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists());
        drop(WriterLock::whole(dir.path(), "extract").unwrap());
    }

    #[test]
    fn a_stale_lock_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOCK_FILE), b"{\"pid\": 1}").unwrap();
        fs::write(dir.path().join("worker-0-of-2.lock"), b"").unwrap();
        let lock = WriterLock::worker(dir.path(), WorkerSlot::new(0, 2).unwrap(), "f").unwrap();
        let holder = Holder::read(&dir.path().join("worker-0-of-2.lock")).unwrap();
        assert_eq!(holder.what, "extract worker 0 of 2");
        assert_eq!(holder.fingerprint.as_deref(), Some("f"));
        drop(lock);
        assert!(!dir.path().join("worker-0-of-2.lock").exists());
        // The last of the workers sharing the cache-wide lock removes its file.
        assert!(!dir.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn workers_share_the_cache_but_not_a_slot_or_other_settings() {
        let dir = tempfile::tempdir().unwrap();
        let slot = |i, n| WorkerSlot::new(i, n).unwrap();
        let w0 = WriterLock::worker(dir.path(), slot(0, 2), "f").unwrap();
        let w1 = WriterLock::worker(dir.path(), slot(1, 2), "f").unwrap();
        let err = WriterLock::worker(dir.path(), slot(1, 2), "f")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("worker 1 of 2 is already running"), "{err}");
        drop(w1);
        for (other, differs) in [
            (slot(1, 3), "--num-workers 2 instead of 3"),
            (slot(1, 2), "other extraction settings"),
        ] {
            let err =
                WriterLock::worker(dir.path(), other, if other.count == 3 { "f" } else { "g" })
                    .err()
                    .unwrap()
                    .to_string();
            assert!(
                err.contains("extract worker 0 of 2") && err.contains(differs),
                "{err}"
            );
        }
        let err = WriterLock::whole(dir.path(), "extract")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("the workers of a multi-worker extraction: extract worker 0 of 2"),
            "{err}"
        );
        // While one worker holds the shared lock, another one leaving keeps its file.
        let w1 = WriterLock::worker(dir.path(), slot(1, 2), "f").unwrap();
        drop(w1);
        assert!(dir.path().join(LOCK_FILE).exists());
        drop(w0);
        assert!(!dir.path().join(LOCK_FILE).exists());
        drop(WriterLock::whole(dir.path(), "cache merge").unwrap());
    }
}
