//! Fuzzes the competition csv reader: any input gives records or an error, never a panic, and
//! every image id it returns has been checked.
//!
//! `cargo install cargo-fuzz`, then from the repository root, seeded with the fixtures and the
//! demo (new inputs go to the first folder):
//!
//! ```text
//! mkdir -p fuzz/corpus/csv_reader
//! cargo +nightly fuzz run csv_reader fuzz/corpus/csv_reader tests/fixtures/data/quirky \
//!     tests/fixtures/data/rfc4180 data/demo -- -max_total_time=600
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiclip::data::records::{check_image_id, parse_csv};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(contents) = parse_csv(text) {
        for record in &contents.records {
            if check_image_id(&record.id).is_err() {
                assert!(
                    contents.problems.iter().any(|p| p.line == record.line),
                    "refused id `{}` not reported",
                    record.id
                );
            }
        }
    }
});
