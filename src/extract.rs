//! Stage 1 driver: runs a frozen backbone over the selected dataset rows and writes the cache.
//!
//! Work is split into fixed shards (see [`crate::cache`]); only the shards this worker owns and
//! that are not already complete are computed, so re-running after a crash or `kill -9` resumes.
//! Inside a shard, rows go to the backbone in windows of `--batch-size` rows (a row that fails
//! with `--on-error skip` leaves its window one row short). For a backbone that reads text, the
//! windows are formed from the shard's rows sorted by caption length (stable), so that captions
//! of similar length share a batch and the text encoder computes (almost) no padding; the shard
//! stores its rows in dataset order whatever the order of its windows. For images alone, windows
//! are consecutive rows. Windows depend only on the shard's rows and the batch size, so a shard's
//! bytes never depend on which process or run computed it.
//!
//! Threads: a producer thread loads each window's images and captions in parallel (rayon, on all
//! cores unless `--threads` says otherwise) and runs [`Backbone::prepare`], which also copies the
//! pixels to the backbone's device; prepared batches wait in a bounded channel (`prefetch` deep)
//! while the calling thread runs [`Backbone::forward`], brings the outputs back to the host and
//! writes shards. Decoding, preprocessing and (on CUDA, where each thread has its own stream) the
//! host-to-device copy thus overlap the model, and memory stays bounded by `prefetch` batches plus
//! one shard.

use crate::backbone::{Backbone, Prepared, Sample};
use crate::cache::label_names;
use crate::cache::manifest::{FORMAT_VERSION, describe_skipped};
use crate::cache::verify::DatasetRows;
use crate::cache::{
    CacheHeader, CacheWriter, CsvPart, DatasetFingerprint, ShardBuilder, SkippedRow, StoredDtype,
    StoredOutput, WorkerSlot,
};
use crate::data::{Dataset, LabelVocab, Part, image::load_rgb};
use crate::files::sha256_file;
use crate::tensor_ops::Precision;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which csv files of the dataset to extract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartSelection {
    Train,
    Test,
    /// train.csv then test.csv (whichever exist).
    All,
}

impl PartSelection {
    pub const ALL: [PartSelection; 3] = [Self::Train, Self::Test, Self::All];

    /// `train`, `test` or `all`, as written on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            PartSelection::Train => "train",
            PartSelection::Test => "test",
            PartSelection::All => "all",
        }
    }

    fn parts(self, dataset: &Dataset) -> Vec<Part> {
        match self {
            PartSelection::Train => vec![Part::Train],
            PartSelection::Test => vec![Part::Test],
            PartSelection::All => dataset.parts(),
        }
    }
}

impl std::str::FromStr for PartSelection {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .with_context(|| format!("unknown part {name:?}: expected train, test or all"))
    }
}

/// What to do with a row whose image or caption cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Stop with an error naming the file and row.
    Fail,
    /// Record the row as skipped (with its reason) in the manifest and go on.
    Skip,
}

impl OnError {
    pub const ALL: [OnError; 2] = [Self::Fail, Self::Skip];

    /// `fail` or `skip`, as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OnError::Fail => "fail",
            OnError::Skip => "skip",
        }
    }
}

/// One selected dataset row.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub caption: String,
    /// `DIR/data/<id>`, or why the id may not name a file there.
    pub image_path: Result<PathBuf, String>,
    /// Where it comes from, for messages: `train.csv line 12`.
    pub source: String,
}

/// The selected rows of a dataset, in cache order, with their fingerprint.
pub struct SelectedRows {
    pub fingerprint: DatasetFingerprint,
    pub rows: Vec<Row>,
}

impl SelectedRows {
    /// Reads the csv files of `selection` (train before test) and hashes them.
    pub fn read(data_dir: &Path, selection: PartSelection) -> Result<Self> {
        let dataset = Dataset::open(data_dir)?;
        let mut parts = Vec::new();
        let mut rows = Vec::new();
        for part in selection.parts(&dataset) {
            let csv = dataset.csv_path(part);
            let records = dataset.records(part)?;
            let file = csv
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            parts.push(CsvPart {
                part: part.name().to_string(),
                file: file.clone(),
                sha256: sha256_file(&csv)?,
                rows: records.len(),
            });
            rows.extend(records.into_iter().map(|r| Row {
                image_path: dataset.image_file(&r.id).map_err(|e| e.to_string()),
                source: format!("{file} line {}", r.line),
                id: r.id,
                caption: r.caption,
            }));
        }
        let mut seen: HashMap<&str, &str> = HashMap::with_capacity(rows.len());
        for row in &rows {
            if let Some(first) = seen.insert(&row.id, &row.source) {
                bail!(
                    "image id {} appears twice ({first} and {}): ids must be unique across the \
                     selected csv files",
                    row.id,
                    row.source
                );
            }
        }
        Ok(Self {
            fingerprint: DatasetFingerprint {
                selection: selection.name().to_string(),
                parts,
                rows: rows.len(),
            },
            rows,
        })
    }

    /// What `cache verify --data` compares a cache with.
    pub fn into_dataset_rows(self) -> DatasetRows {
        DatasetRows {
            fingerprint: self.fingerprint,
            ids: self.rows.into_iter().map(|r| r.id).collect(),
        }
    }
}

/// Rows per forward pass unless told otherwise (`extract --batch-size`).
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Dataset rows per shard unless told otherwise (`extract --shard-rows`).
pub const DEFAULT_SHARD_ROWS: usize = 4096;

/// Settings of one `extract` run.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    pub out: PathBuf,
    pub batch_size: usize,
    pub shard_rows: usize,
    pub dtype: StoredDtype,
    /// The backbone's forward precision (part of the cache's identity).
    pub precision: Precision,
    /// Where the backbone runs (`cpu`, `cuda:0`): recorded beside each shard written.
    pub device: String,
    pub slot: WorkerSlot,
    pub on_error: OnError,
    pub max_pixels: u64,
    /// Prepared batches waiting for the forward (2-4 is plenty).
    pub prefetch: usize,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

/// What an `extract` run did.
#[derive(Debug)]
pub struct ExtractSummary {
    /// Rows selected in the dataset.
    pub dataset_rows: usize,
    pub shards_total: usize,
    /// Shards this worker owns.
    pub shards_owned: usize,
    pub shards_written: usize,
    pub shards_reused: usize,
    /// Rows computed by this run (stored + skipped).
    pub rows_processed: usize,
    /// Skipped rows of this worker's shards (including reused ones).
    pub skipped: Vec<SkippedRow>,
    pub elapsed: Duration,
    /// Time the model thread spent in [`Backbone::forward`], the outputs' copy to the host
    /// included (on CUDA, where the forward only queues work, that copy waits for it).
    pub forward: Duration,
    /// Time the model thread waited for decoded, prepared batches (the input pipeline was the
    /// bottleneck for that long).
    pub input_wait: Duration,
    /// `manifest.json` or this worker's part.
    pub index_file: PathBuf,
}

impl ExtractSummary {
    pub fn rows_per_second(&self) -> f64 {
        self.rows_processed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The manifest header of extracting `dataset` with `backbone` and `options`.
pub fn cache_header(
    backbone: &dyn Backbone,
    dataset: &DatasetFingerprint,
    options: &ExtractOptions,
) -> CacheHeader {
    CacheHeader {
        format_version: FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        backbone: backbone.info(),
        precision: options.precision,
        outputs: backbone
            .outputs()
            .iter()
            .map(|spec| StoredOutput::from_spec(spec, options.dtype))
            .collect(),
        dataset: dataset.clone(),
        shard_rows: options.shard_rows,
        batch_size: options.batch_size,
    }
}

/// One window of rows, loaded and prepared by the producer.
struct PreparedWindow {
    shard: usize,
    /// (dataset position, id) of the rows in `prepared`.
    rows: Vec<(usize, String)>,
    skipped: Vec<SkippedRow>,
    prepared: Option<Prepared>,
    last_of_shard: bool,
}

/// Extracts the rows of `selected` with `backbone` into `options.out`.
pub fn extract(
    backbone: &dyn Backbone,
    selected: &SelectedRows,
    options: &ExtractOptions,
) -> Result<ExtractSummary> {
    if options.batch_size == 0 || options.shard_rows == 0 {
        bail!("--batch-size and --shard-rows must be at least 1");
    }
    if selected.rows.is_empty() {
        let files: Vec<&str> = selected
            .fingerprint
            .parts
            .iter()
            .map(|p| p.file.as_str())
            .collect();
        bail!(
            "nothing to extract: the selected csv files ({}) hold no rows",
            files.join(", ")
        );
    }
    let start = Instant::now();
    let header = cache_header(backbone, &selected.fingerprint, options);
    let mut writer = CacheWriter::open(&options.out, header, options.slot)?;
    writer.set_device(options.device.clone());
    let ranges = writer.shard_ranges().to_vec();
    let pending = writer.pending();
    let pending_rows: usize = pending.iter().map(|&i| ranges[i].len()).sum();
    let shards_owned = (0..ranges.len()).filter(|&i| options.slot.owns(i)).count();
    tracing::info!(
        "{}: {} rows in {} shards; worker {} of {} owns {}, {} already complete, {} to compute \
         ({} rows)",
        options.out.display(),
        selected.rows.len(),
        ranges.len(),
        options.slot.index,
        options.slot.count,
        shards_owned,
        writer.reused(),
        pending.len(),
        pending_rows
    );

    let bar = progress_bar(pending_rows as u64, options.progress);
    let (mut input_wait, mut forward) = (Duration::ZERO, Duration::ZERO);
    let (sender, receiver) =
        crossbeam_channel::bounded::<Result<PreparedWindow>>(options.prefetch.max(1));
    std::thread::scope(|scope| -> Result<()> {
        // The producer owns the sender: when it is done, the channel closes and the loop below ends.
        let (ranges, pending) = (&ranges, &pending);
        scope.spawn(move || produce(backbone, selected, options, ranges, pending, sender));
        let receiver = receiver; // Dropped on return, which unblocks the producer.
        let mut builder: Option<ShardBuilder> = None;
        let mut rows_done = 0usize;
        loop {
            let waiting = Instant::now();
            let Ok(item) = receiver.recv() else { break };
            input_wait += waiting.elapsed();
            let window = item?;
            let current = match builder.as_mut() {
                Some(b) if b.index() == window.shard => b,
                _ => builder.insert(writer.builder(window.shard)),
            };
            let done = window.rows.len() + window.skipped.len();
            for skipped in window.skipped {
                current.skip(skipped)?;
            }
            if let Some(prepared) = window.prepared {
                let forward_start = Instant::now();
                let outputs = backbone
                    .forward(prepared)
                    .and_then(|outputs| to_host(&outputs))
                    .with_context(|| {
                        format!(
                            "backbone forward failed on {} of shard {}",
                            describe_rows(&window.rows),
                            window.shard
                        )
                    })?;
                forward += forward_start.elapsed();
                current.push(&window.rows, &outputs)?;
            }
            bar.inc(done as u64);
            rows_done += done;
            if window.last_of_shard {
                let complete = builder.take().context("shard builder missing")?;
                writer.write_shard(complete)?;
                if bar.is_hidden() {
                    // No terminal (a batch job's log): one progress line per shard instead.
                    log_progress(window.shard, rows_done, pending_rows, start.elapsed());
                }
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();

    let skipped: Vec<SkippedRow> = writer.skipped().cloned().collect();
    let (shards_written, shards_reused) = (writer.written(), writer.reused());
    if writer.stored_rows() == 0 && !skipped.is_empty() {
        if options.slot.is_single() {
            // Nothing computed is lost: keeping the shards would only make a re-run after
            // fixing the inputs reuse them.
            writer.discard()?;
            bail!(
                "{}: all {} rows were skipped, so the cache would hold nothing ({}). Nothing was \
                 kept: fix the inputs and run the same command again",
                options.out.display(),
                skipped.len(),
                describe_skipped(&skipped, skipped.len())
            );
        }
        tracing::warn!(
            "{}: worker {} of {} stored no row: all {} of its rows were skipped ({})",
            options.out.display(),
            options.slot.index,
            options.slot.count,
            skipped.len(),
            describe_skipped(&skipped, skipped.len())
        );
    }
    let index_file = writer.finish()?;
    Ok(ExtractSummary {
        dataset_rows: selected.rows.len(),
        shards_total: ranges.len(),
        shards_owned,
        shards_written,
        shards_reused,
        rows_processed: pending_rows,
        skipped,
        elapsed: start.elapsed(),
        forward,
        input_wait,
        index_file,
    })
}

/// What [`extract_label_names`] stored.
#[derive(Debug)]
pub struct LabelNamesSummary {
    pub labels: usize,
    pub dim: usize,
    /// The pooled output whose space the embeddings are in.
    pub output: String,
    pub file: PathBuf,
}

/// `extract --label-names`: embeds the name of every label of `data_dir`'s train.csv
/// ([`label_names::label_texts`]) with the backbone's text encoder and stores them beside the
/// cache that `extract` writes with the same `backbone`, `selected` rows and `options`.
pub fn extract_label_names(
    backbone: &dyn Backbone,
    data_dir: &Path,
    selected: &SelectedRows,
    options: &ExtractOptions,
) -> Result<LabelNamesSummary> {
    let records = Dataset::open(data_dir)?.records(Part::Train)?;
    let vocab = LabelVocab::from_records(&records).context("--label-names")?;
    let names = label_names::label_texts(data_dir, &vocab)?;
    let Some(embedded) = backbone.embed_texts(&names)? else {
        bail!(
            "--label-names: backbone {} has no text encoder to embed the label names with",
            backbone.info().id
        );
    };
    let fingerprint = cache_header(backbone, &selected.fingerprint, options).fingerprint();
    label_names::save(
        &options.out,
        &fingerprint,
        vocab.names(),
        &names,
        &embedded.output,
        &embedded.values,
    )?;
    let (labels, dim) = embedded.values.dims2()?;
    Ok(LabelNamesSummary {
        labels,
        dim,
        output: embedded.output,
        file: options.out.join(label_names::LABEL_NAMES_FILE),
    })
}

/// The backbone's outputs on the host (a no-op on the CPU).
fn to_host(outputs: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(outputs
        .iter()
        .map(|t| t.to_device(&Device::Cpu))
        .collect::<candle_core::Result<_>>()?)
}

/// The producer thread: loads and prepares the windows of the `pending` shards in order and
/// sends them to the model thread. Stops after the first error (sent on) or when the model thread
/// hangs up.
fn produce(
    backbone: &dyn Backbone,
    selected: &SelectedRows,
    options: &ExtractOptions,
    ranges: &[std::ops::Range<usize>],
    pending: &[usize],
    sender: crossbeam_channel::Sender<Result<PreparedWindow>>,
) {
    for &shard in pending {
        let windows = shard_windows(
            &selected.rows,
            ranges[shard].clone(),
            options.batch_size,
            backbone.needs_text(),
        );
        for (k, window) in windows.iter().enumerate() {
            let item = prepare_window(backbone, selected, options, shard, window).map(|mut w| {
                w.last_of_shard = k + 1 == windows.len();
                w
            });
            let failed = item.is_err();
            if sender.send(item).is_err() || failed {
                return;
            }
        }
    }
}

/// The windows (dataset positions, increasing in each) in which the rows of one shard go to the
/// backbone: `batch_size` consecutive rows, or, `by_caption_length`, `batch_size` rows at a time
/// of the shard's rows sorted by caption length (ties in dataset order).
pub fn shard_windows(
    rows: &[Row],
    range: std::ops::Range<usize>,
    batch_size: usize,
    by_caption_length: bool,
) -> Vec<Vec<usize>> {
    let mut positions: Vec<usize> = range.collect();
    if by_caption_length {
        positions.sort_by_key(|&p| rows[p].caption.chars().count());
    }
    positions
        .chunks(batch_size)
        .map(|window| {
            let mut window = window.to_vec();
            window.sort_unstable();
            window
        })
        .collect()
}

/// The rows of a window that loaded: (dataset position, sample).
pub type LoadedRows = Vec<(usize, Sample)>;

/// Loads the rows at `window` of `selected` in parallel: (position, sample) of those that loaded,
/// and those that did not as skipped rows with `on_error` skip (an error naming the row with
/// fail). Shared by extract and the live path (`predict --data`, serve's rows).
pub fn load_window(
    selected: &SelectedRows,
    window: &[usize],
    (needs_images, needs_text): (bool, bool),
    max_pixels: u64,
    on_error: OnError,
) -> Result<(LoadedRows, Vec<SkippedRow>)> {
    let results: Vec<(usize, Result<Sample, String>)> = window
        .par_iter()
        .map(|&position| {
            let row = &selected.rows[position];
            let sample = load_sample(row, needs_images, needs_text, max_pixels);
            (position, sample)
        })
        .collect();
    let mut loaded = Vec::new();
    let mut skipped = Vec::new();
    for (position, result) in results {
        let row = &selected.rows[position];
        match result {
            Ok(sample) => loaded.push((position, sample)),
            Err(reason) if on_error == OnError::Skip => skipped.push(SkippedRow {
                row: position,
                id: row.id.clone(),
                reason,
            }),
            Err(reason) => bail!(
                "row {position} (id {}, {}): {reason}. Fix the input, or pass --on-error skip to \
                 record such rows as skipped and go on",
                row.id,
                row.source
            ),
        }
    }
    Ok((loaded, skipped))
}

/// Loads the rows of `window` in parallel and prepares those that loaded.
fn prepare_window(
    backbone: &dyn Backbone,
    selected: &SelectedRows,
    options: &ExtractOptions,
    shard: usize,
    window: &[usize],
) -> Result<PreparedWindow> {
    let needs = (backbone.needs_images(), backbone.needs_text());
    let (loaded, skipped) = load_window(
        selected,
        window,
        needs,
        options.max_pixels,
        options.on_error,
    )?;
    let (rows, samples): (Vec<(usize, String)>, Vec<Sample>) = loaded
        .into_iter()
        .map(|(position, sample)| ((position, selected.rows[position].id.clone()), sample))
        .unzip();
    let prepared = if samples.is_empty() {
        None
    } else {
        Some(backbone.prepare(&samples).with_context(|| {
            format!(
                "cannot preprocess {} of shard {shard}",
                describe_rows(&rows)
            )
        })?)
    };
    Ok(PreparedWindow {
        shard,
        rows,
        skipped,
        prepared,
        last_of_shard: false,
    })
}

/// `rows 3, 8, 9` (dataset positions of a window's rows), the first and last few of a long one.
fn describe_rows(rows: &[(usize, String)]) -> String {
    const SHOWN: usize = 6;
    let list = |rows: &[(usize, String)]| {
        rows.iter()
            .map(|r| r.0.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if rows.len() <= SHOWN {
        format!("rows {}", list(rows))
    } else {
        format!(
            "{} rows: {}, ..., {}",
            rows.len(),
            list(&rows[..SHOWN / 2]),
            list(&rows[rows.len() - SHOWN / 2..])
        )
    }
}

/// Reads what the backbone needs of one row; the error is the reason the row cannot be used.
pub fn load_sample(
    row: &Row,
    needs_images: bool,
    needs_text: bool,
    max_pixels: u64,
) -> Result<Sample, String> {
    // A bad id is refused even by a text-only backbone: it never reaches the outputs.
    let image_path = row.image_path.as_ref().map_err(Clone::clone)?;
    if needs_text && row.caption.trim().is_empty() {
        return Err("empty caption".to_string());
    }
    let image = if needs_images {
        Some(load_rgb(image_path, max_pixels).map_err(|e| e.to_string())?)
    } else {
        None
    };
    Ok(Sample {
        id: row.id.clone(),
        image,
        caption: row.caption.clone(),
    })
}

/// The progress line logged after each shard when no progress bar is drawn.
fn log_progress(shard: usize, done: usize, total: usize, elapsed: Duration) {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let eta = (total - done.min(total)) as f64 / rate.max(1e-9);
    tracing::info!(
        "shard {shard} written: {done}/{total} rows ({:.0}%), {rate:.1} rows/s, ETA {eta:.0} s",
        100.0 * done as f64 / total.max(1) as f64
    );
}

fn progress_bar(len: u64, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} rows  {per_sec}  ETA {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{BackboneInfo, OutputKind, OutputSpec};
    use crate::cache::CacheReader;

    /// A backbone without weights: `image` = mean RGB of the image / 255 and `text` =
    /// [caption length, batch size seen, longest caption of the batch].
    struct MeanColour;

    impl Backbone for MeanColour {
        fn info(&self) -> BackboneInfo {
            BackboneInfo {
                id: "test:mean-colour".into(),
                weights_sha256: vec![],
                preprocessing: serde_json::json!({}),
                text_template: None,
            }
        }
        fn outputs(&self) -> Vec<OutputSpec> {
            vec![
                OutputSpec {
                    name: "image".into(),
                    shape: vec![3],
                    kind: OutputKind::Feature,
                },
                OutputSpec {
                    name: "text".into(),
                    shape: vec![3],
                    kind: OutputKind::Feature,
                },
            ]
        }
        fn needs_images(&self) -> bool {
            true
        }
        fn needs_text(&self) -> bool {
            true
        }
        fn prepare(&self, batch: &[Sample]) -> Result<Prepared> {
            let n = batch.len();
            let longest = batch.iter().map(|s| s.caption.len()).max().unwrap_or(0);
            let mut image = Vec::new();
            let mut text = Vec::new();
            for s in batch {
                let img = s.image.as_ref().context("no image")?;
                let pixels = (img.width() * img.height()) as f32;
                for c in 0..3 {
                    image.push(img.pixels().map(|p| p[c] as f32).sum::<f32>() / pixels / 255.0);
                }
                text.extend([s.caption.len() as f32, n as f32, longest as f32]);
            }
            Ok(Box::new((image, text, n)))
        }
        fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>> {
            let (image, text, n) = *prepared
                .downcast::<(Vec<f32>, Vec<f32>, usize)>()
                .map_err(|_| anyhow::anyhow!("foreign batch"))?;
            Ok(vec![
                Tensor::from_vec(image, (n, 3), &Device::Cpu)?,
                Tensor::from_vec(text, (n, 3), &Device::Cpu)?,
            ])
        }
    }

    /// A dataset of `n` solid-colour PNGs captioned `caption {i}`; the images in `broken` are
    /// not PNGs.
    fn dataset(n: usize, broken: &[usize]) -> tempfile::TempDir {
        let captions: Vec<String> = (0..n).map(|i| format!("caption {i}")).collect();
        dataset_with(&captions, broken)
    }

    fn dataset_with(captions: &[String], broken: &[usize]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let mut csv = String::from("ImageID,Labels,Caption\n");
        for (i, caption) in captions.iter().enumerate() {
            let path = dir.path().join("data").join(format!("{i}.png"));
            if broken.contains(&i) {
                std::fs::write(&path, b"not an image").unwrap();
            } else {
                image::RgbImage::from_pixel(4, 3, image::Rgb([i as u8 * 10, 0, 255]))
                    .save(&path)
                    .unwrap();
            }
            csv.push_str(&format!("{i}.png,1,\"{caption}\"\n"));
        }
        std::fs::write(dir.path().join("train.csv"), csv).unwrap();
        dir
    }

    fn options(out: &Path, on_error: OnError) -> ExtractOptions {
        ExtractOptions {
            out: out.to_path_buf(),
            batch_size: 3,
            shard_rows: 4,
            dtype: StoredDtype::F32,
            precision: Precision::F32,
            device: "cpu".into(),
            slot: WorkerSlot::SINGLE,
            on_error,
            max_pixels: 1_000_000,
            prefetch: 2,
            progress: false,
        }
    }

    #[test]
    fn extracts_every_row_in_dataset_order() {
        let data = dataset(10, &[]);
        let out = tempfile::tempdir().unwrap();
        let selected = SelectedRows::read(data.path(), PartSelection::Train).unwrap();
        let summary = extract(&MeanColour, &selected, &options(out.path(), OnError::Fail)).unwrap();
        assert_eq!((summary.shards_total, summary.shards_written), (3, 3));
        let reader = CacheReader::open(out.path()).unwrap();
        assert_eq!(reader.len(), 10);
        assert_eq!(reader.ids()[7], "7.png");
        let image = reader.gather("image", &[7], &Device::Cpu).unwrap();
        assert_eq!(
            image.to_vec2::<f32>().unwrap()[0],
            vec![70.0 / 255.0, 0.0, 1.0]
        );
        // Windows of 3 inside shards of 4: rows 4, 5, 6 form one batch, row 7 another.
        let text = reader.gather("text", &[4, 7], &Device::Cpu).unwrap();
        assert_eq!(
            text.to_vec2::<f32>().unwrap(),
            vec![[9.0, 3.0, 9.0], [9.0, 1.0, 9.0]]
        );
        // Running again computes nothing.
        let again = extract(&MeanColour, &selected, &options(out.path(), OnError::Fail)).unwrap();
        assert_eq!((again.shards_written, again.shards_reused), (0, 3));
    }

    #[test]
    fn captions_of_similar_length_share_a_batch_and_rows_keep_dataset_order() {
        let captions: Vec<String> = [9, 1, 8, 2, 7, 3, 1]
            .iter()
            .map(|&n| "w".repeat(n))
            .collect();
        let data = dataset_with(&captions, &[]);
        let out = tempfile::tempdir().unwrap();
        let selected = SelectedRows::read(data.path(), PartSelection::Train).unwrap();
        let mut opts = options(out.path(), OnError::Fail);
        opts.shard_rows = 7;
        extract(&MeanColour, &selected, &opts).unwrap();
        let reader = CacheReader::open(out.path()).unwrap();
        let text = reader
            .gather("text", &(0..7).collect::<Vec<_>>(), &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Sorted by length: [1, 1, 2] [3, 7, 8] [9]; each row's own length in dataset order.
        let expected = [
            [9.0, 1.0, 9.0],
            [1.0, 3.0, 2.0],
            [8.0, 3.0, 8.0],
            [2.0, 3.0, 2.0],
            [7.0, 3.0, 8.0],
            [3.0, 3.0, 8.0],
            [1.0, 3.0, 2.0],
        ];
        assert_eq!(text, expected.map(|r| r.to_vec()).to_vec());
        assert_eq!(reader.ids()[4], "4.png");
    }

    #[test]
    fn windows_are_consecutive_rows_or_sorted_by_caption_length() {
        let rows: Vec<Row> = (0..7)
            .map(|i| Row {
                id: i.to_string(),
                caption: "w".repeat(7 - i),
                image_path: Ok(PathBuf::new()),
                source: String::new(),
            })
            .collect();
        assert_eq!(
            shard_windows(&rows, 1..7, 4, false),
            vec![vec![1, 2, 3, 4], vec![5, 6]]
        );
        assert_eq!(
            shard_windows(&rows, 1..7, 4, true),
            vec![vec![3, 4, 5, 6], vec![1, 2]]
        );
    }

    #[test]
    fn bad_rows_fail_by_name_or_are_recorded() {
        let data = dataset(6, &[2]);
        let out = tempfile::tempdir().unwrap();
        let selected = SelectedRows::read(data.path(), PartSelection::Train).unwrap();
        let err = extract(&MeanColour, &selected, &options(out.path(), OnError::Fail))
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 2") && err.contains("2.png"), "{err}");
        let summary = extract(&MeanColour, &selected, &options(out.path(), OnError::Skip)).unwrap();
        assert_eq!(summary.skipped.len(), 1);
        assert_eq!(summary.skipped[0].id, "2.png");
        assert!(
            summary.skipped[0].reason.contains("2.png"),
            "{}",
            summary.skipped[0].reason
        );
        let reader = CacheReader::open(out.path()).unwrap();
        assert_eq!(reader.len(), 5);
        assert_eq!(reader.index_of("2.png"), None);
        assert_eq!(reader.manifest().skipped_rows, 1);
    }

    /// Issue 12 #16: a header-only csv is an error, not an empty cache. (The data layer may
    /// refuse it first; either way nothing is written.)
    #[test]
    fn a_csv_without_rows_extracts_nothing() {
        let data = dataset(0, &[]);
        let out = tempfile::tempdir().unwrap();
        let cache = out.path().join("cache");
        if let Ok(selected) = SelectedRows::read(data.path(), PartSelection::Train) {
            let err = extract(&MeanColour, &selected, &options(&cache, OnError::Fail))
                .unwrap_err()
                .to_string();
            assert!(err.contains("train.csv) hold no rows"), "{err}");
        }
        assert!(!cache.exists());
    }

    #[test]
    fn an_extraction_that_skips_every_row_fails_and_keeps_nothing() {
        let data = dataset(6, &[0, 1, 2, 3, 4, 5]);
        let out = tempfile::tempdir().unwrap();
        let selected = SelectedRows::read(data.path(), PartSelection::Train).unwrap();
        let err = extract(&MeanColour, &selected, &options(out.path(), OnError::Skip))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("all 6 rows were skipped")
                && err.contains("row 0 (0.png): ")
                && err.contains("and 3 more"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
}
