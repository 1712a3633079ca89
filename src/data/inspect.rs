//! Dataset statistics and checks for `multiclip dataset inspect`: rows, label frequencies,
//! labels per row, caption lengths, csv problems, and images that are missing, unreadable or
//! refused (headers only, checked in parallel).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;

use super::image::{ImageLoadError, image_dimensions};
use super::labels::LabelVocab;
use super::records::CsvSyntax;
use super::{Dataset, Part, Problem, Record};

/// How many problem images are listed by name (all are counted).
pub const IMAGE_EXAMPLES: usize = 10;

/// Everything `inspect` reports about a dataset.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub dir: PathBuf,
    pub parts: Vec<PartReport>,
    pub images: ImageReport,
}

/// Statistics of one csv file.
#[derive(Clone, Debug, Serialize)]
pub struct PartReport {
    pub part: Part,
    pub csv: PathBuf,
    pub syntax: CsvSyntax,
    pub rows: usize,
    /// Present for a file with a Labels column.
    pub labels: Option<LabelStats>,
    pub caption_chars: LengthStats,
    pub caption_words: LengthStats,
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LabelStats {
    /// Label frequencies in vocabulary (column) order.
    pub frequencies: Vec<LabelCount>,
    /// Number of rows by number of labels in the row.
    pub per_row: BTreeMap<usize, usize>,
    pub mean_per_row: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LabelCount {
    pub label: String,
    pub rows: usize,
    /// Fraction of the file's rows that carry the label.
    pub fraction: f64,
}

/// Summary of a list of lengths.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LengthStats {
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub median: usize,
    pub p95: usize,
}

impl LengthStats {
    pub fn of(mut values: Vec<usize>) -> LengthStats {
        if values.is_empty() {
            return LengthStats::default();
        }
        values.sort_unstable();
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        LengthStats {
            min: values[0],
            max: values[values.len() - 1],
            mean: values.iter().sum::<usize>() as f64 / values.len() as f64,
            median: at(0.5),
            p95: at(0.95),
        }
    }
}

/// Image header checks over every row of every part.
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub max_pixels: u64,
    pub checked: usize,
    pub ok: usize,
    pub missing: usize,
    /// Corrupt, truncated, not an image, not a regular file, unreadable, or refused (an id that
    /// could name a file outside `data/`).
    pub unreadable: usize,
    pub too_large: usize,
    /// Readable images whose real path (symlinks followed) lies outside `data/`: allowed, and
    /// counted so that a dataset assembled from links can be told apart.
    pub outside_data: usize,
    /// The first few problem images in csv order.
    pub examples: Vec<ImageIssue>,
    /// The image with the most pixels among the readable ones.
    pub largest: Option<ImageSize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageIssue {
    pub part: Part,
    pub id: String,
    /// Where the row starts in its csv.
    pub line: usize,
    pub error: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageSize {
    pub id: String,
    pub width: u32,
    pub height: u32,
}

/// Reads every csv of `dataset` and checks every image header against `max_pixels`.
pub fn inspect(dataset: &Dataset, max_pixels: u64) -> Result<InspectReport> {
    let mut parts = Vec::new();
    let mut all_records: Vec<(Part, Record)> = Vec::new();
    for part in dataset.parts() {
        let contents = dataset.read_csv(part)?;
        let records = &contents.records;
        let labels = if contents.has_labels {
            Some(label_stats(records)?)
        } else {
            None
        };
        parts.push(PartReport {
            part,
            csv: dataset.csv_path(part),
            syntax: contents.syntax,
            rows: records.len(),
            labels,
            caption_chars: LengthStats::of(
                records.iter().map(|r| r.caption.chars().count()).collect(),
            ),
            caption_words: LengthStats::of(
                records
                    .iter()
                    .map(|r| r.caption.split_whitespace().count())
                    .collect(),
            ),
            problems: contents.problems,
        });
        all_records.extend(contents.records.into_iter().map(|r| (part, r)));
    }
    let images = check_images(dataset, &all_records, max_pixels);
    Ok(InspectReport {
        dir: dataset.dir().to_path_buf(),
        parts,
        images,
    })
}

fn label_stats(records: &[Record]) -> Result<LabelStats> {
    // Not `from_records`, which refuses a file without labels: inspect reports it.
    let vocab =
        LabelVocab::from_tokens(records.iter().filter_map(|r| r.labels.as_ref()).flatten())?;
    let mut counts = vec![0usize; vocab.len()];
    let mut per_row = BTreeMap::new();
    let mut total = 0;
    for r in records {
        let labels = r.labels.as_deref().unwrap_or_default();
        for label in labels {
            if let Some(i) = vocab.index(label) {
                counts[i] += 1;
            }
        }
        *per_row.entry(labels.len()).or_insert(0) += 1;
        total += labels.len();
    }
    let n = records.len().max(1) as f64;
    Ok(LabelStats {
        frequencies: vocab
            .names()
            .iter()
            .zip(counts)
            .map(|(label, rows)| LabelCount {
                label: label.clone(),
                rows,
                fraction: rows as f64 / n,
            })
            .collect(),
        per_row,
        mean_per_row: total as f64 / n,
    })
}

/// What checking one row's image found: its size, and whether its real path (symlinks
/// followed) lies outside `data/`.
type ImageCheck = Result<((u32, u32), bool), ImageLoadError>;

fn check_images(dataset: &Dataset, records: &[(Part, Record)], max_pixels: u64) -> ImageReport {
    let data = dataset.dir().join("data").canonicalize().ok();
    let results: Vec<ImageCheck> = records
        .par_iter()
        .map(|(_, r)| {
            let path = dataset.image_file(&r.id)?;
            let size = image_dimensions(&path, max_pixels)?;
            let inside = match (&data, path.canonicalize()) {
                (Some(data), Ok(real)) => real.starts_with(data),
                _ => false,
            };
            Ok((size, !inside))
        })
        .collect();
    let mut report = ImageReport {
        max_pixels,
        checked: records.len(),
        ok: 0,
        missing: 0,
        unreadable: 0,
        too_large: 0,
        outside_data: 0,
        examples: Vec::new(),
        largest: None,
    };
    let mut largest_pixels = 0u64;
    for ((part, record), result) in records.iter().zip(results) {
        let error = match result {
            Ok(((width, height), outside)) => {
                report.ok += 1;
                report.outside_data += outside as usize;
                if width as u64 * height as u64 > largest_pixels {
                    largest_pixels = width as u64 * height as u64;
                    report.largest = Some(ImageSize {
                        id: record.id.clone(),
                        width,
                        height,
                    });
                }
                continue;
            }
            Err(e) => e,
        };
        match error {
            ImageLoadError::Missing { .. } => report.missing += 1,
            ImageLoadError::TooLarge { .. } => report.too_large += 1,
            ImageLoadError::BadId { .. }
            | ImageLoadError::NotAFile { .. }
            | ImageLoadError::Unreadable { .. }
            | ImageLoadError::Corrupt { .. } => report.unreadable += 1,
        }
        if report.examples.len() < IMAGE_EXAMPLES {
            report.examples.push(ImageIssue {
                part: *part,
                id: record.id.clone(),
                line: record.line,
                error: error.to_string(),
            });
        }
    }
    report
}
