//! The error gallery of a report: the most confident false positives and false negatives on the
//! rows the report shows (validation or out-of-fold), for the labels with most errors and
//! overall. Each card shows a small inline thumbnail (a JPEG of about [`THUMB_PX`] px as a base64
//! data URI, a few kB), the caption, the true labels and the predicted labels with their scores.
//! Without readable images (a text-only dataset, or images not under `--data`) the cards keep
//! their captions and the section says why; the page stays self-contained either way.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use image::codecs::jpeg::JpegEncoder;

use super::escape;
use crate::data::image::{DEFAULT_MAX_PIXELS, load_rgb};
use crate::data::{Dataset, Part};
use crate::metrics::apply_thresholds_flat;

/// Longest side of a thumbnail, in pixels.
pub const THUMB_PX: u32 = 96;
/// JPEG quality of the thumbnails.
const JPEG_QUALITY: u8 = 70;
/// Labels with most errors that get their own row of cards.
pub const GALLERY_LABELS: usize = 6;
/// Cards per label (half false positives, half false negatives when both exist).
pub const PER_LABEL: usize = 8;
/// Cards of the overall row.
pub const OVERALL: usize = 16;
/// Characters of a caption shown on a card.
const CAPTION_CHARS: usize = 140;

/// The scored rows a gallery is drawn from.
pub struct GalleryInput<'a> {
    /// The dataset folder (`train.csv` for captions, `data/` for images).
    pub data_dir: &'a Path,
    /// Image ids of the rows, in the order of `probabilities`.
    pub ids: &'a [String],
    /// `[rows, labels]` row-major probabilities and multi-hot truth.
    pub probabilities: &'a [f32],
    pub truth: &'a [f32],
    pub thresholds: &'a [f32],
    pub labels: &'a [String],
}

/// One wrong decision: row, label, and whether it is a false positive.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mistake {
    row: usize,
    label: usize,
    false_positive: bool,
    /// How sure the model was of the wrong answer: p for a false positive, 1 - p otherwise.
    confidence: f32,
}

/// The gallery as an HTML section, or the line that says why there is none.
pub fn section(input: &GalleryInput) -> String {
    let k = input.labels.len();
    if k == 0 || input.ids.is_empty() || input.probabilities.len() != input.ids.len() * k {
        return "<h2>Error gallery</h2><p>No gallery: no scored rows.</p>".to_string();
    }
    let decided = apply_thresholds_flat(input.probabilities, input.thresholds, true);
    let mistakes: Vec<Mistake> = (0..input.probabilities.len())
        .filter(|&i| decided[i] != (input.truth[i] >= 0.5))
        .map(|i| Mistake {
            row: i / k,
            label: i % k,
            false_positive: decided[i],
            confidence: if decided[i] {
                input.probabilities[i]
            } else {
                1.0 - input.probabilities[i]
            },
        })
        .collect();
    if mistakes.is_empty() {
        return "<h2>Error gallery</h2><p>No gallery: every decision on these rows is right.</p>"
            .to_string();
    }
    let groups = groups(&mistakes, input.labels);
    let mut rows: Vec<usize> = groups
        .iter()
        .flat_map(|(_, m)| m.iter().map(|m| m.row))
        .collect();
    rows.sort_unstable();
    rows.dedup();
    let pictures = Pictures::load(input, &rows);
    let mut html = String::from(
        "<h2>Error gallery</h2><p>The most confident mistakes: false positives (FP, a label \
         predicted but not true) and false negatives (FN, a true label missed), by the score of \
         the wrong answer. Predicted labels are listed with their scores.</p>",
    );
    if let Some(reason) = &pictures.missing {
        let _ = write!(
            html,
            "<p class=\"note\">Thumbnails left out: {}.</p>",
            escape(reason)
        );
    }
    for (title, group) in &groups {
        let _ = write!(html, "<h3>{}</h3><div class=\"gallery\">", escape(title));
        for mistake in group {
            html.push_str(&card(input, &pictures, mistake));
        }
        html.push_str("</div>");
    }
    html
}

/// The rows of cards: overall, then each of the labels with most mistakes.
fn groups(mistakes: &[Mistake], labels: &[String]) -> Vec<(String, Vec<Mistake>)> {
    let k = labels.len();
    let mut per_label = vec![0usize; k];
    for m in mistakes {
        per_label[m.label] += 1;
    }
    let mut worst: Vec<usize> = (0..k).filter(|&l| per_label[l] > 0).collect();
    worst.sort_by_key(|&l| (std::cmp::Reverse(per_label[l]), l));
    let overall = pick(mistakes.iter().copied(), OVERALL, true);
    let mut out = vec![(format!("Overall ({} mistakes)", mistakes.len()), overall)];
    for label in worst.into_iter().take(GALLERY_LABELS) {
        let of_label = mistakes.iter().copied().filter(|m| m.label == label);
        let title = format!("{} ({} mistakes)", labels[label], per_label[label]);
        out.push((title, pick(of_label, PER_LABEL, false)));
    }
    out
}

/// Up to `n` mistakes, the most confident first, half of each kind when both have enough; with
/// `distinct_rows`, one card per row.
fn pick(mistakes: impl Iterator<Item = Mistake>, n: usize, distinct_rows: bool) -> Vec<Mistake> {
    let mut sorted: Vec<Mistake> = mistakes.collect();
    sorted.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then(a.row.cmp(&b.row))
            .then(a.label.cmp(&b.label))
    });
    if distinct_rows {
        let mut seen = std::collections::HashSet::new();
        sorted.retain(|m| seen.insert(m.row));
    }
    let (fp, fn_): (Vec<Mistake>, Vec<Mistake>) =
        sorted.into_iter().partition(|m| m.false_positive);
    let take_fp = fp.len().min(n.div_ceil(2).max(n.saturating_sub(fn_.len())));
    let take_fn = fn_.len().min(n - take_fp);
    let mut out: Vec<Mistake> = fp.into_iter().take(take_fp).collect();
    out.extend(fn_.into_iter().take(take_fn));
    out
}

/// Captions and thumbnails of the rows on cards.
struct Pictures {
    captions: HashMap<String, String>,
    thumbnails: HashMap<usize, String>,
    /// Why thumbnails are missing (all or some), when they are.
    missing: Option<String>,
}

impl Pictures {
    fn load(input: &GalleryInput, rows: &[usize]) -> Self {
        let mut pictures = Self {
            captions: HashMap::new(),
            thumbnails: HashMap::new(),
            missing: None,
        };
        let dataset = match Dataset::open(input.data_dir) {
            Ok(dataset) => dataset,
            Err(e) => {
                pictures.missing = Some(format!("the dataset folder could not be read ({e:#})"));
                return pictures;
            }
        };
        if let Ok(records) = dataset.records(Part::Train) {
            pictures.captions = records.into_iter().map(|r| (r.id, r.caption)).collect();
        }
        let images = input.data_dir.join("data");
        if !images.is_dir() {
            pictures.missing = Some(format!(
                "{} holds no images (a text-only dataset?): captions only",
                images.display()
            ));
            return pictures;
        }
        let mut failed = Vec::new();
        for &row in rows {
            let id = &input.ids[row];
            match thumbnail(&dataset, id) {
                Ok(uri) => {
                    pictures.thumbnails.insert(row, uri);
                }
                Err(reason) => failed.push(format!("{id}: {reason}")),
            }
        }
        if !failed.is_empty() {
            pictures.missing = Some(format!(
                "{} of {} images could not be read (first: {})",
                failed.len(),
                rows.len(),
                failed[0]
            ));
        }
        pictures
    }
}

/// Image `id` of `dataset` as a `data:image/jpeg;base64,...` thumbnail.
fn thumbnail(dataset: &Dataset, id: &str) -> Result<String, String> {
    let path = dataset.image_file(id).map_err(|e| e.to_string())?;
    let image = load_rgb(&path, DEFAULT_MAX_PIXELS).map_err(|e| e.to_string())?;
    let (width, height) = image.dimensions();
    let longest = width.max(height);
    let small = if longest <= THUMB_PX {
        image
    } else {
        // The longest side to THUMB_PX, the aspect ratio kept.
        let scale = |side: u32| {
            ((side as u64 * THUMB_PX as u64 + longest as u64 / 2) / longest as u64).max(1) as u32
        };
        image::imageops::thumbnail(&image, scale(width), scale(height))
    };
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
        .encode_image(&small)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(jpeg)
    ))
}

fn card(input: &GalleryInput, pictures: &Pictures, mistake: &Mistake) -> String {
    let k = input.labels.len();
    let row = mistake.row;
    let id = &input.ids[row];
    let scores = &input.probabilities[row * k..(row + 1) * k];
    let truth = &input.truth[row * k..(row + 1) * k];
    let decided = apply_thresholds_flat(scores, input.thresholds, true);
    let name = |l: usize| escape(&input.labels[l]);
    let true_labels: Vec<String> = (0..k).filter(|&l| truth[l] >= 0.5).map(name).collect();
    let mut predicted: Vec<usize> = (0..k).filter(|&l| decided[l]).collect();
    predicted.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let predicted: Vec<String> = predicted
        .iter()
        .map(|&l| format!("{} {:.2}", name(l), scores[l]))
        .collect();
    let caption = pictures.captions.get(id).map_or("", String::as_str);
    let caption: String = if caption.chars().count() > CAPTION_CHARS {
        caption.chars().take(CAPTION_CHARS).chain(['…']).collect()
    } else {
        caption.to_string()
    };
    let picture = match pictures.thumbnails.get(&row) {
        Some(uri) => format!("<img src=\"{uri}\" alt=\"{}\">", escape(id)),
        None => String::new(),
    };
    format!(
        "<div class=\"shot\">{picture}<div class=\"why {}\">{} {} {:.2}</div><div class=\"id\">{}</div>\
         <div class=\"cap\">{}</div><div><b>true:</b> {}</div><div><b>predicted:</b> {}</div></div>",
        if mistake.false_positive { "fp" } else { "fn" },
        if mistake.false_positive { "FP" } else { "FN" },
        name(mistake.label),
        scores[mistake.label],
        escape(id),
        escape(&caption),
        true_labels.join(" "),
        predicted.join(", ")
    )
}

/// The gallery's styles (added to the report's).
pub const STYLE: &str = ".gallery{display:flex;flex-wrap:wrap;gap:8px}\
.shot{width:180px;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}\
.shot img{display:block;max-width:96px;max-height:96px;margin-bottom:4px}\
.shot .why{font-weight:600}.shot .fp{color:#b00}.shot .fn{color:#a60}\
.shot .id{color:#666;word-break:break-all}.shot .cap{font-style:italic;margin:2px 0}.note{color:#a60}";

#[cfg(test)]
mod tests {
    use super::*;

    fn mistake(row: usize, false_positive: bool, confidence: f32) -> Mistake {
        Mistake {
            row,
            label: 0,
            false_positive,
            confidence,
        }
    }

    /// A dataset of `rows` rows over 8 labels in `dir` (with images when `images`), and scores
    /// that get about a third of the decisions wrong.
    fn scored(dir: &Path, rows: usize, images: bool) -> (Vec<String>, Vec<f32>, Vec<f32>) {
        let k = 8;
        let ids: Vec<String> = (0..rows).map(|r| format!("img/{r}.png")).collect();
        let mut csv = String::from("ImageID,Labels,Caption\n");
        for (r, id) in ids.iter().enumerate() {
            csv.push_str(&format!("{id},l{},\"a <caption> of row {r}\"\n", r % k));
        }
        std::fs::write(dir.join("train.csv"), csv).unwrap();
        if images {
            std::fs::create_dir_all(dir.join("data/img")).unwrap();
            for (r, id) in ids.iter().enumerate() {
                let picture = image::RgbImage::from_fn(400, 250, |x, y| {
                    image::Rgb([(x + r as u32) as u8, y as u8, 128])
                });
                picture.save(dir.join("data").join(id)).unwrap();
            }
        }
        let truth: Vec<f32> = (0..rows * k)
            .map(|i| f32::from(u8::from(i % k == (i / k) % k)))
            .collect();
        let probabilities: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 37) % 100) as f32 / 100.0)
            .collect();
        (ids, probabilities, truth)
    }

    #[test]
    fn shows_capped_thumbnails_with_images_and_says_why_without() {
        let labels: Vec<String> = (0..8).map(|l| format!("l{l}")).collect();
        let thresholds = vec![0.5; 8];
        for images in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (ids, probabilities, truth) = scored(dir.path(), 40, images);
            let html = section(&GalleryInput {
                data_dir: dir.path(),
                ids: &ids,
                probabilities: &probabilities,
                truth: &truth,
                thresholds: &thresholds,
                labels: &labels,
            });
            let cards = html.matches("class=\"shot\"").count();
            assert_eq!(html.matches("<h3>").count(), 1 + GALLERY_LABELS);
            assert!(
                cards <= OVERALL + GALLERY_LABELS * PER_LABEL && cards > 16,
                "{cards}"
            );
            assert!(
                html.contains("a &lt;caption&gt; of row"),
                "captions, escaped"
            );
            assert!(html.contains("<b>true:</b> l"));
            assert!(!html.contains("<script"));
            let thumbnails: Vec<&str> = html.split("data:image/jpeg;base64,").skip(1).collect();
            if images {
                assert_eq!(thumbnails.len(), cards);
                for t in thumbnails {
                    let encoded = &t[..t.find('"').unwrap()];
                    let jpeg = base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .unwrap();
                    assert!(jpeg.len() < 6000, "{} bytes", jpeg.len());
                    let small = image::load_from_memory(&jpeg).unwrap();
                    assert_eq!((small.width(), small.height()), (THUMB_PX, 60));
                }
                assert!(!html.contains("left out"));
            } else {
                assert!(thumbnails.is_empty());
                assert!(html.contains("Thumbnails left out:") && html.contains("holds no images"));
            }
        }
    }

    #[test]
    fn picks_the_most_confident_of_each_kind() {
        let all = [
            mistake(0, true, 0.6),
            mistake(1, true, 0.9),
            mistake(2, false, 0.8),
            mistake(3, true, 0.7),
            mistake(4, false, 0.95),
        ];
        let rows = |picked: Vec<Mistake>| picked.iter().map(|m| m.row).collect::<Vec<_>>();
        assert_eq!(rows(pick(all.iter().copied(), 4, false)), [1, 3, 4, 2]);
        // Too few false negatives: false positives fill the rest.
        assert_eq!(rows(pick(all.iter().copied(), 5, false)), [1, 3, 0, 4, 2]);
        assert_eq!(rows(pick(all.iter().copied(), 2, false)), [1, 4]);
        let same_row = vec![mistake(7, true, 0.9), mistake(7, false, 0.8)];
        assert_eq!(rows(pick(same_row.into_iter(), 4, true)), [7]);
    }
}
