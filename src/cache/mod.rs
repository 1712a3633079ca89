//! The stage-1 embedding cache: the contract between `extract` and everything downstream.
//!
//! A cache is one directory:
//!
//! ```text
//! cache/NAME/
//!   manifest.json                 the index, written (atomically) once every shard exists
//!   shard-00000.safetensors       dataset rows [0, N) of the selected rows
//!   shard-00001.safetensors       rows [N, 2N) ...
//!   label-names.safetensors       `extract --label-names` only: the label names embedded
//!   parts/worker-0-of-3.json      multi-worker runs only: one worker's shards, until `cache merge`
//!   writer.lock                   while a process writes (see [`lock`]); workers: worker-I-of-N.lock
//! ```
//!
//! **Shards** are plain safetensors files (readable from Python with `safetensors.numpy.load_file`).
//! Each backbone output is one tensor `[rows, ...shape]` named after the output, stored as f16
//! (default) or f32 for features and u8 (0/1) for masks. The row ids and the rest of the shard's
//! own description live in the safetensors metadata under the single key `multiclip`, a JSON object
//! `{"fingerprint", "index", "start", "end", "ids", "skipped"}` (see [`shard::ShardMeta`]).
//!
//! **Rows.** The dataset rows selected by `--part` are numbered `0..rows` in csv order (train before
//! test for `all`). Shard `i` covers the positions `[i*N, min((i+1)*N, rows))`; that fixed partition is
//! what makes resuming and multi-worker extraction deterministic. A row skipped with
//! `--on-error skip` is NOT stored in its shard: it is listed (position, id, reason) in the shard's
//! metadata and in the manifest, so a shard stores `end - start - skipped` rows and the reader's row
//! numbers (`0..len()`) count stored rows only.
//!
//! **Integrity.** The manifest records each shard's size, the hash of its header (row ids) and
//! of its content; readers check them on open ([`integrity`]) and refuse non-finite values
//! where rows are read.
//!
//! **Crash safety.** Every file is written to a temporary name in the same directory, fsynced,
//! renamed into place and the directory fsynced ([`crate::files::write_atomic`]). A shard file that exists
//! under its final name is complete; a re-run recomputes only the missing ones. Shard bytes depend
//! only on the settings recorded in the manifest header (no timestamps, one metadata key), so an
//! interrupted-then-resumed run and a multi-worker run produce byte-identical files.
//!
//! Modules: [`manifest`] (the JSON index), [`layout`] (file names, row partition, worker
//! assignment), [`shard`] (encoding/decoding one shard), [`lock`] (writer locks), [`writer`]
//! (resumable writing), `parts` (the per-worker manifests of a multi-worker run),
//! [`integrity`] (the checks of a cache before it is trusted), [`label_names`] (the label-name
//! embeddings), [`reader`] (memory-mapped
//! reading), [`batches`] (batch iteration), [`verify`] and [`merge`].

pub mod batches;
pub mod integrity;
pub mod label_names;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod merge;
pub(crate) mod parts;
pub mod reader;
pub mod shard;
pub mod verify;
pub mod writer;

pub use batches::{Batch, BatchOrder, BatchPlan};
pub use integrity::Integrity;
pub use layout::WorkerSlot;
pub use manifest::{
    CacheHeader, CsvPart, DatasetFingerprint, Manifest, ShardEntry, SkippedRow, StoredDtype,
    StoredOutput,
};
pub use reader::CacheReader;
pub use shard::ShardBuilder;
pub use writer::CacheWriter;
