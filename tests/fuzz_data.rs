//! Property-based tests of the readers of user files (their twin for multiclip's own formats and
//! the specs is `fuzz_formats.rs`): the competition csv reader, the label
//! vocabulary and the split file. Arbitrary input gives `Ok` or `Err`, never a panic (and an
//! accepted file keeps its invariants: lines in order, unique ids, refused ids reported);
//! generated well-formed files read back exactly.
//!
//! The cases are bounded and the seed is fixed so CI runs the same cases every time; to hunt
//! further, raise them from the environment, e.g.
//! `PROPTEST_CASES=20000 PROPTEST_RNG_SEED=7 cargo test --test fuzz_data`.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, contextualize_config};

use multiclip::data::records::{CsvSyntax, check_image_id, parse_csv, read_csv};
use multiclip::data::{LabelVocab, Record, Split};

fn config(cases: u32) -> Config {
    contextualize_config(Config {
        cases,
        rng_seed: RngSeed::Fixed(3407),
        ..Config::default()
    })
}

/// What must hold for any file the reader accepts.
fn check_invariants(text: &str, contents: &multiclip::data::CsvContents) {
    let lines = text.split('\n').count().max(1);
    let mut previous = 1;
    let mut ids = std::collections::HashSet::new();
    for r in &contents.records {
        assert!(
            r.line > previous,
            "record lines must increase: {:?}",
            contents.records
        );
        assert!(
            r.line <= lines,
            "line {} past the end ({lines} lines)",
            r.line
        );
        previous = r.line;
        assert!(!r.id.trim().is_empty(), "empty id accepted: {r:?}");
        assert!(ids.insert(r.id.clone()), "duplicate id accepted: {}", r.id);
        assert_eq!(r.labels.is_some(), contents.has_labels, "{r:?}");
        if check_image_id(&r.id).is_err() {
            assert!(
                contents
                    .problems
                    .iter()
                    .any(|p| p.line == r.line && p.message.contains("is refused")),
                "refused id `{}` without a problem: {:?}",
                r.id,
                contents.problems
            );
        }
    }
    assert!(
        contents.problems.windows(2).all(|w| w[0].line <= w[1].line),
        "problems are not sorted by line: {:?}",
        contents.problems
    );
}

/// Pieces that competition-like files are made of.
const PIECES: &[&str] = &[
    "0.jpg",
    "science/scale_01.png",
    "my cat.png",
    "/etc/x.png",
    "../x.jpg",
    "a\\b.png",
    "readme",
    ".jpg",
    ",",
    ",,",
    "\"",
    "\"\"",
    "/\"",
    "\n",
    "\r\n",
    "\n\n",
    " ",
    "1 3 10",
    "a caption, with a comma",
    "é✓\u{0}",
];

/// Competition-like files: a header, then pieces glued together at random.
fn near_valid_text() -> impl Strategy<Value = String> {
    let header = prop_oneof![
        Just("ImageID,Labels,Caption\n"),
        Just("ImageID,Caption\n"),
        Just("\u{feff}ImageID,Labels,Caption\r\n"),
        Just("\"ImageID\",\"Caption\"\n"),
    ];
    let piece = prop_oneof![
        4 => prop::sample::select(PIECES).prop_map(str::to_owned),
        1 => "[a-z0-9 .,\"/\n]{0,12}",
    ];
    (header, prop::collection::vec(piece, 0..40))
        .prop_map(|(header, pieces)| format!("{header}{}", pieces.concat()))
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        if let Ok(contents) = parse_csv(&text) {
            check_invariants(&text, &contents);
        }
    }

    #[test]
    fn arbitrary_text_after_a_header_never_panics(
        header in prop_oneof![Just("ImageID,Labels,Caption\n"), Just("ImageID,Caption\n")],
        body in any::<String>(),
    ) {
        let text = format!("{header}{body}");
        if let Ok(contents) = parse_csv(&text) {
            check_invariants(&text, &contents);
        }
    }

    #[test]
    fn near_valid_competition_text_never_panics(text in near_valid_text()) {
        if let Ok(contents) = parse_csv(&text) {
            check_invariants(&text.replace("\r\n", "\n"), &contents);
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Through the file: arbitrary bytes (not UTF-8, NUL, ...) are an error naming the file or
    /// a result.
    #[test]
    fn arbitrary_bytes_in_a_file_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        std::fs::write(&path, &bytes).unwrap();
        match read_csv(&path) {
            Ok(contents) => check_invariants(
                &String::from_utf8(bytes).unwrap().replace("\r\n", "\n"),
                &contents,
            ),
            Err(e) => prop_assert!(format!("{e:#}").contains("train.csv"), "{e:#}"),
        }
    }
}

/// Rows of a train.csv: unique ids (image file names, possibly with spaces, commas or quotes),
/// label tokens and captions of any text.
fn generated_rows() -> impl Strategy<Value = Vec<(String, Vec<String>, String)>> {
    let id = "[a-zA-Z0-9_][a-zA-Z0-9_ ,\"'-]{0,10}(/[a-zA-Z0-9_-]{1,6})?\\.(jpg|png|JPEG|webp)";
    let labels = prop::collection::vec("[a-z0-9_]{1,4}", 0..4);
    let caption = any::<String>();
    prop::collection::vec((id, labels, caption), 0..12).prop_map(|mut rows| {
        let mut seen = std::collections::HashSet::new();
        rows.retain(|(id, _, _)| seen.insert(id.clone()));
        rows
    })
}

/// The records expected from `rows` written one after the other below a header, with the
/// reader's only normalisation (`\r\n` -> `\n`).
fn expected_records(
    rows: &[(String, Vec<String>, String)],
    labelled: bool,
    line_breaks: impl Fn(&(String, Vec<String>, String)) -> usize,
) -> Vec<Record> {
    let mut line = 2;
    rows.iter()
        .map(|row| {
            let record = Record {
                id: row.0.clone(),
                labels: labelled.then(|| row.1.clone()),
                caption: row.2.replace("\r\n", "\n"),
                line,
            };
            line += 1 + line_breaks(row);
            record
        })
        .collect()
}

proptest! {
    #![proptest_config(config(256))]

    /// A well-formed RFC-4180 file, as the `csv` crate (or Python's csv, pandas) writes it, with
    /// `\n` or `\r\n` line ends, reads back exactly.
    #[test]
    fn rfc4180_files_round_trip(
        rows in generated_rows(),
        labelled in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let mut writer = csv::WriterBuilder::new()
            .terminator(if crlf { csv::Terminator::CRLF } else { csv::Terminator::Any(b'\n') })
            .from_writer(Vec::new());
        if labelled {
            writer.write_record(["ImageID", "Labels", "Caption"]).unwrap();
        } else {
            writer.write_record(["ImageID", "Caption"]).unwrap();
        }
        for (id, labels, caption) in &rows {
            if labelled {
                writer.write_record([id, &labels.join(" "), caption]).unwrap();
            } else {
                writer.write_record([id, caption]).unwrap();
            }
        }
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        let contents = parse_csv(&text).unwrap();
        prop_assert_eq!(contents.syntax, CsvSyntax::Rfc4180);
        prop_assert_eq!(contents.has_labels, labelled);
        let want = expected_records(&rows, labelled, |row| {
            row.2.replace("\r\n", "\n").matches('\n').count()
        });
        prop_assert_eq!(contents.records, want);
    }

    /// The competition's raw layout (`id,labels,"caption"` with the caption's inner quotes left
    /// unescaped, captions over several lines) reads back exactly, caption between the first
    /// and last quote of the record.
    #[test]
    fn raw_competition_records_round_trip(
        first in "[a-z ]{0,5}\"[a-z]{1,5}\"[a-z ]{0,5}",
        rows in prop::collection::vec(
            (
                prop::collection::vec("[a-z0-9]{1,3}", 0..4),
                // No `.` (so no line inside a caption looks like an image id) and every
                // continuation line starts with a space (so none looks like a row).
                "[a-zA-Z0-9 \",'!/]{0,20}(\n [a-zA-Z0-9 \",'!/]{0,20}){0,3}",
            ),
            0..10,
        ),
        labelled in any::<bool>(),
    ) {
        // The first caption holds a lone inner quote, so the file is not valid RFC-4180.
        let mut all = vec![(Vec::new(), first)];
        all.extend(rows);
        let rows: Vec<(String, Vec<String>, String)> = all
            .into_iter()
            .enumerate()
            .map(|(i, (labels, caption))| (format!("{i}.jpg"), labels, caption))
            .collect();
        let mut text = String::from(if labelled { "ImageID,Labels,Caption\n" } else { "ImageID,Caption\n" });
        for (id, labels, caption) in &rows {
            if labelled {
                text += &format!("{id},{},\"{caption}\"\n", labels.join(" "));
            } else {
                text += &format!("{id},\"{caption}\"\n");
            }
        }
        let contents = parse_csv(&text).unwrap();
        prop_assert_eq!(contents.syntax, CsvSyntax::Records);
        let want = expected_records(&rows, labelled, |row| row.2.matches('\n').count());
        prop_assert_eq!(contents.records, want);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn label_and_split_files_never_panic(text in any::<String>(), json_ish in "[\\[\\]{}\":,a-z0-9. -]{0,60}") {
        let dir = tempfile::tempdir().unwrap();
        for body in [&text, &json_ish] {
            let path = dir.path().join("labels.json");
            std::fs::write(&path, body).unwrap();
            if let Err(e) = LabelVocab::load(&path) {
                prop_assert!(format!("{e:#}").contains("labels.json"), "{e:#}");
            }
            let path = dir.path().join("split.json");
            std::fs::write(&path, body).unwrap();
            if let Err(e) = Split::load(&path) {
                prop_assert!(format!("{e:#}").contains("split.json"), "{e:#}");
            }
        }
    }

    /// A vocabulary of any tokens without whitespace keeps its order through save and load;
    /// one with an empty, spaced or repeated token is an error.
    #[test]
    fn label_files_round_trip(names in prop::collection::vec("\\PC{0,6}", 0..8)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.json");
        match LabelVocab::from_ordered(names.clone()) {
            Ok(vocab) => {
                prop_assert!(names.iter().all(|n| !n.is_empty() && !n.contains(char::is_whitespace)));
                vocab.save(&path).unwrap();
                let loaded = LabelVocab::load(&path).unwrap();
                prop_assert_eq!(loaded.names(), &names[..]);
            }
            Err(_) => {
                let unique: std::collections::HashSet<_> = names.iter().collect();
                prop_assert!(
                    unique.len() < names.len()
                        || names.iter().any(|n| n.is_empty() || n.contains(char::is_whitespace))
                );
            }
        }
    }

    /// Any labelled rows split into two disjoint sides holding every row, the same for the same
    /// seed; fractions outside (0, 1) are an error.
    #[test]
    fn splits_of_arbitrary_label_sets_partition_the_rows(
        label_sets in prop::collection::vec(prop::collection::vec(0u8..6, 0..4), 0..40),
        val_fraction in prop_oneof![0.0..1.0f64, Just(0.0), Just(1.0), Just(-0.5), Just(f64::NAN)],
        seed in any::<u64>(),
    ) {
        let records: Vec<Record> = label_sets
            .iter()
            .enumerate()
            .map(|(i, set)| Record {
                id: format!("{i}.jpg"),
                labels: Some(set.iter().map(|l| l.to_string()).collect()),
                caption: String::new(),
                line: i + 2,
            })
            .collect();
        let Ok(vocab) = LabelVocab::from_records(&records) else {
            prop_assert!(label_sets.iter().all(Vec::is_empty));
            return Ok(());
        };
        match Split::stratified(&records, &vocab, val_fraction, seed) {
            Ok(split) => {
                prop_assert!(val_fraction > 0.0 && val_fraction < 1.0);
                split.check_matches(&records).unwrap();
                prop_assert_eq!(split, Split::stratified(&records, &vocab, val_fraction, seed).unwrap());
            }
            Err(_) => prop_assert!(!(val_fraction > 0.0 && val_fraction < 1.0)),
        }
    }
}
