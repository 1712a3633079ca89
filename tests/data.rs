//! Integration tests of the data layer (`multiclip::data`) and the `multiclip dataset` command.
//! Fixtures: tests/fixtures/data/ (made by make_fixtures.py there).

use std::path::{Path, PathBuf};

use image::{GrayImage, ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba, RgbaImage};
use multiclip::data::image::{DEFAULT_MAX_PIXELS, ImageLoadError, image_dimensions, load_rgb};
use multiclip::data::records::{CsvSyntax, parse_csv, read_csv};
use multiclip::data::{Dataset, LabelVocab, Part, Record, Split};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// The rows every reader must return, from expected.json.
fn expected(part: Part) -> Vec<Record> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let mut all: std::collections::HashMap<String, Vec<Record>> =
        serde_json::from_str(&text).unwrap();
    all.remove(part.name()).unwrap()
}

#[test]
fn quirky_competition_csv_is_read_exactly() {
    for part in Part::ALL {
        let path = fixtures().join(format!("quirky/{part}.csv"));
        let contents = read_csv(&path).unwrap();
        assert_eq!(contents.syntax, CsvSyntax::Records, "{part}");
        let want = expected(part);
        assert_eq!(contents.records.len(), want.len(), "{part}: record count");
        for (got, want) in contents.records.iter().zip(&want) {
            assert_eq!(got, want);
        }
        assert!(
            contents
                .problems
                .iter()
                .any(|p| p.message.contains("unescaped double quote"))
        );
    }
}

#[test]
fn quirky_problems_name_their_lines() {
    let contents = read_csv(&fixtures().join("quirky/train.csv")).unwrap();
    let lines_with = |needle: &str| -> Vec<usize> {
        contents
            .problems
            .iter()
            .filter(|p| p.message.contains(needle))
            .map(|p| p.line)
            .collect()
    };
    // First non-RFC row: `1.jpg` on line 3.
    assert_eq!(lines_with("RFC-4180"), [3]);
    assert_eq!(lines_with("spans"), [5, 26]);
    assert_eq!(lines_with("unescaped"), [3, 4, 22, 24, 25, 26]);
}

#[test]
fn rfc4180_csv_gives_the_same_records() {
    for part in Part::ALL {
        let path = fixtures().join(format!("rfc4180/{part}.csv"));
        let contents = read_csv(&path).unwrap();
        assert_eq!(contents.syntax, CsvSyntax::Rfc4180, "{part}");
        assert_eq!(contents.records, expected(part), "{part}");
        assert!(contents.problems.is_empty(), "{:?}", contents.problems);
    }
}

#[test]
fn label_order_and_gaps_are_kept_as_written() {
    let records = read_csv(&fixtures().join("quirky/train.csv"))
        .unwrap()
        .records;
    let labels = |id: &str| {
        records
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .labels
            .clone()
            .unwrap()
    };
    assert_eq!(labels("1.jpg"), ["3", "1"]);
    assert_eq!(labels("2.jpg"), ["19", "2", "13"]);
    assert!(
        records
            .iter()
            .all(|r| !r.labels.as_ref().unwrap().contains(&"12".into()))
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn error_of(dir: &Path, text: &str) -> String {
    let path = write(dir, "train.csv", text);
    format!("{:#}", read_csv(&path).unwrap_err())
}

#[test]
fn rows_without_id_or_caption_are_errors_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let quirky = "ImageID,Labels,Caption\n0.jpg,1,\"a \"b\" c\"\n";
    for (text, line, what) in [
        (format!("{quirky},2,\"no id\"\n"), 3, "no image id"),
        (format!("{quirky}1.jpg,2\n"), 3, "no caption"),
        (
            format!("{quirky}1.jpg,2,\"x\"\nfoo,2,\"y\"\n"),
            4,
            "not an image file name",
        ),
        (
            "ImageID,Labels,Caption\n0.jpg,1,a\n,2,b\n".into(),
            3,
            "no image id",
        ),
        ("ImageID,Caption\n0.jpg,a\n1.jpg\n".into(), 3, "no caption"),
    ] {
        let msg = error_of(dir.path(), &text);
        assert!(msg.contains(&format!("line {line}")), "{text:?}: {msg}");
        assert!(msg.contains(what), "{text:?}: {msg}");
        assert!(msg.contains("train.csv"), "{text:?}: {msg}");
    }
}

/// A present but empty caption (`""` or nothing after the last comma) is read, as a problem naming
/// its line: an image-only extraction can use the row; `extract` with a text backbone refuses it
/// by row, or skips it with `--on-error skip` (tests/extract.rs).
#[test]
fn empty_captions_are_problems_naming_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "train.csv",
        "ImageID,Labels,Caption\n0.jpg,1,\"a \"b\" c\"\n1.jpg,2,\"\"\n2.jpg,2,\n",
    );
    let contents = read_csv(&path).unwrap();
    let captions: Vec<&str> = contents
        .records
        .iter()
        .map(|r| r.caption.as_str())
        .collect();
    assert_eq!(captions, ["a \"b\" c", "", ""]);
    let empty: Vec<usize> = contents
        .problems
        .iter()
        .filter(|p| p.message.contains("empty caption"))
        .map(|p| p.line)
        .collect();
    assert_eq!(empty, [3, 4]);
}

/// A space is legal in a file name: an id with spaces is an image name in both syntaxes (in the
/// raw layout, when quoted or followed by the row's fields). Only what is not an image name is
/// a problem: no image extension, or whitespace at either end.
#[test]
fn ids_with_spaces_are_image_names() {
    let read = |text: &str| parse_csv(text).unwrap();
    let ids = |c: &multiclip::data::CsvContents| -> Vec<String> {
        c.records.iter().map(|r| r.id.clone()).collect()
    };
    let rfc = read("ImageID,Labels,Caption\nmy cat.png,2,the cat\n\"a, b.png\",1,x\n");
    assert_eq!(rfc.syntax, CsvSyntax::Rfc4180);
    assert_eq!(ids(&rfc), ["my cat.png", "a, b.png"]);
    assert!(rfc.problems.is_empty(), "{:?}", rfc.problems);

    let odd = read("ImageID,Caption\n a.png,x\nnotes.txt,y\n");
    let messages: Vec<(usize, &str)> = odd
        .problems
        .iter()
        .map(|p| (p.line, p.message.as_str()))
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].0 == 2 && messages[0].1.contains("begins or ends with whitespace"));
    assert!(messages[1].0 == 3 && messages[1].1.contains("does not end in an image extension"));

    for (text, want_ids, want_captions) in [
        (
            "ImageID,Labels,Caption\n0.jpg,1,\"a \"q\" b\"\nmy cat.png,2,\"the cat\"\n\"my dog.png\",2,\"the dog\"\n",
            vec!["0.jpg", "my cat.png", "my dog.png"],
            vec!["a \"q\" b", "the cat", "the dog"],
        ),
        (
            "ImageID,Caption\n0.jpg,\"a \"q\"\"\nmy cat.png, \"the cat\"\n",
            vec!["0.jpg", "my cat.png"],
            vec!["a \"q\"", "the cat"],
        ),
        // Caption text that merely mentions a file name stays caption text.
        (
            "ImageID,Labels,Caption\n0.jpg,1,\"a \"q\"\nsee my photo.jpg, nice\"\n",
            vec!["0.jpg"],
            vec!["a \"q\"\nsee my photo.jpg, nice"],
        ),
    ] {
        let raw = read(text);
        assert_eq!(raw.syntax, CsvSyntax::Records, "{text}");
        assert_eq!(ids(&raw), want_ids, "{text}");
        let captions: Vec<&str> = raw.records.iter().map(|r| r.caption.as_str()).collect();
        assert_eq!(captions, want_captions, "{text}");
    }
}

/// Reading by records is linear in the file: one record spanning 100,000 lines (a caption
/// whose quote never closes until the end) reads in well under the limit; the reader used to
/// rejoin the record's lines at every line, which took minutes here.
#[test]
fn a_record_over_many_lines_reads_in_linear_time() {
    let lines = 100_000;
    let mut text = String::from("ImageID,Labels,Caption\n0.jpg,1,\"a \"b\" c\n");
    text += &"x\n".repeat(lines);
    text += "end\"\n1.jpg,2,\"next\"\n";
    let contents = within_timeout("parse_csv", move || parse_csv(&text).unwrap());
    assert_eq!(contents.syntax, CsvSyntax::Records);
    assert_eq!(contents.records.len(), 2);
    assert_eq!(contents.records[0].caption.matches('\n').count(), lines + 1);
    assert_eq!(contents.records[1].line, lines + 4);
}

#[test]
fn duplicate_ids_are_an_error_naming_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    let msg = error_of(
        dir.path(),
        "ImageID,Labels,Caption\n0.jpg,1,\"a\"\n1.jpg,1,\"b \"q\"\"\n0.jpg,2,\"c\"\n",
    );
    assert!(
        msg.contains("`0.jpg` appears twice: on line 2 and on line 4"),
        "{msg}"
    );
}

#[test]
fn dataset_layout() {
    let ds = Dataset::open(fixtures().join("quirky")).unwrap();
    assert_eq!(ds.parts(), [Part::Train, Part::Test]);
    assert_eq!(ds.records(Part::Train).unwrap(), expected(Part::Train));
    assert_eq!(ds.records(Part::Test).unwrap(), expected(Part::Test));
    assert_eq!(
        ds.image_file("science/scale_01.png").unwrap(),
        fixtures().join("quirky/data/science/scale_01.png")
    );
    assert_eq!(ds.csv_path(Part::Test), fixtures().join("quirky/test.csv"));

    let empty = tempfile::tempdir().unwrap();
    let msg = format!("{:#}", Dataset::open(empty.path()).unwrap_err());
    assert!(msg.contains("neither train.csv nor test.csv"), "{msg}");
    write(empty.path(), "test.csv", "ImageID,Caption\n1.jpg,x\n");
    let ds = Dataset::open(empty.path()).unwrap();
    assert_eq!(ds.parts(), [Part::Test]);
    let msg = format!("{:#}", ds.records(Part::Train).unwrap_err());
    assert!(msg.contains("train.csv does not exist"), "{msg}");
}

/// Ids are paths relative to `DIR/data`: one that could name a file outside it (absolute, `..`,
/// Windows prefixes or separators) or another name of the same file (`.`, empty components) is
/// refused; no file is looked at.
#[test]
fn image_ids_are_confined_to_the_data_folder() {
    let ds = Dataset::open(fixtures().join("quirky")).unwrap();
    let data = fixtures().join("quirky/data");
    for id in [
        "0.jpg",
        "science/scale_01.png",
        "my cat.png",
        "a..b.png",
        "..x.png",
        "x../y.png",
    ] {
        assert_eq!(ds.image_file(id).unwrap(), data.join(id), "{id}");
    }
    for (id, why) in [
        ("/some/where/computer2.png", "absolute path"),
        ("../../../etc/computer2.png", "`..`"),
        ("science/../../x.png", "`..`"),
        ("science/..", "`..`"),
        ("./0.jpg", "`.`"),
        ("science/./x.png", "`.`"),
        ("science//x.png", "empty folder name"),
        ("science/", "empty folder name"),
        ("..\\..\\x.png", "backslash"),
        ("C:/x.png", "drive"),
        ("c:x.png", "drive"),
        ("a\0b.png", "control character"),
        ("a\nb.png", "control character"),
    ] {
        let err = ds.image_file(id).unwrap_err();
        assert!(matches!(err, ImageLoadError::BadId { .. }), "{id:?}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(why), "{id:?}: {msg}");
        assert!(msg.contains("quirky/data"), "{id:?}: {msg}");
        assert!(!msg.contains(['\n', '\0']), "{id:?}: {msg:?}");
    }
}

/// A refused id is a problem of its csv line (both syntaxes); the row is still read, so that
/// `extract --on-error skip` can record it as skipped.
#[test]
fn refused_ids_are_problems_of_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    for text in [
        "ImageID,Labels,Caption\n0.jpg,1,\"a\"\n/some/where/computer2.png,1,\"b\"\n../../x.png,2,\"c\"\n",
        "ImageID,Labels,Caption\n0.jpg,1,\"a \"q\"\"\n/some/where/computer2.png,1,\"b\"\n../../x.png,2,\"c\"\n",
    ] {
        let contents = read_csv(&write(dir.path(), "train.csv", text)).unwrap();
        assert_eq!(contents.records.len(), 3, "{text}");
        let refused: Vec<(usize, &str)> = contents
            .problems
            .iter()
            .filter(|p| p.message.contains("refused"))
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(refused.len(), 2, "{:?}", contents.problems);
        assert_eq!(refused[0].0, 3);
        assert!(
            refused[0].1.contains("`/some/where/computer2.png`")
                && refused[0].1.contains("absolute")
        );
        assert_eq!(refused[1].0, 4);
        assert!(refused[1].1.contains("`../../x.png`") && refused[1].1.contains("`..`"));
    }
}

/// A csv with a header and no rows is an error naming it wherever its records are used
/// (extract, split, train), while `dataset inspect` reports it with 0 rows.
#[test]
fn a_csv_without_rows_is_an_error_naming_it_but_inspect_reports_zero_rows() {
    for text in [
        "ImageID,Labels,Caption\n",
        "ImageID,Labels,Caption",
        "ImageID,Labels,Caption\r\n\r\n\n",
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train.csv", text);
        let ds = Dataset::open(dir.path()).unwrap();
        let msg = format!("{:#}", ds.records(Part::Train).unwrap_err());
        assert!(
            msg.contains("train.csv") && msg.contains("no rows"),
            "{text:?}: {msg}"
        );
        assert!(ds.read_csv(Part::Train).unwrap().records.is_empty());

        let d = dir.path().to_str().unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&stdout_of(&["dataset", "inspect", d, "--json"])).unwrap();
        assert_eq!(report["parts"][0]["rows"], 0);
        assert_eq!(report["images"]["checked"], 0);
        let split = multiclip(&["dataset", "split", d]);
        assert!(!split.status.success());
        let stderr = String::from_utf8_lossy(&split.stderr);
        assert!(
            stderr.contains("train.csv") && stderr.contains("no rows"),
            "{stderr}"
        );
    }
    // Rows without any label are reported too (no label frequencies), not an error.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "train.csv",
        "ImageID,Labels,Caption\n0.jpg,,\"x\"\n",
    );
    let d = dir.path().to_str().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&stdout_of(&["dataset", "inspect", d, "--json"])).unwrap();
    assert_eq!(report["parts"][0]["rows"], 1);
    assert_eq!(
        report["parts"][0]["labels"]["frequencies"],
        serde_json::json!([])
    );
}

// ---- images ----

fn save(dir: &Path, name: &str, img: impl Into<image::DynamicImage>) -> PathBuf {
    let path = dir.join(name);
    img.into().save(&path).unwrap();
    path
}

#[test]
fn decodes_every_color_layout_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let load = |p: &Path| load_rgb(p, DEFAULT_MAX_PIXELS).unwrap();

    let rgb = RgbImage::from_fn(4, 3, |x, y| Rgb([x as u8 * 60, y as u8 * 100, 7]));
    assert_eq!(load(&save(d, "rgb.png", rgb.clone())), rgb);

    let gray = GrayImage::from_fn(4, 3, |x, _| Luma([x as u8 * 80]));
    assert_eq!(load(&save(d, "gray.png", gray)).get_pixel(3, 0).0, [240; 3]);

    let rgba = RgbaImage::from_fn(2, 1, |x, _| Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }]));
    let out = load(&save(d, "rgba.png", rgba));
    assert_eq!(out.get_pixel(0, 0).0, [255; 3], "transparent -> white");
    assert_eq!(out.get_pixel(1, 0).0, [0; 3]);

    let la: ImageBuffer<LumaA<u8>, _> = ImageBuffer::from_pixel(1, 1, LumaA([0, 51]));
    // 255 * (255 - 51) / 255 = 204
    assert_eq!(load(&save(d, "la.png", la)).get_pixel(0, 0).0, [204; 3]);

    let gray16: ImageBuffer<Luma<u16>, _> =
        ImageBuffer::from_fn(3, 1, |x, _| Luma([[0, 32896, 65535][x as usize]]));
    let out = load(&save(d, "gray16.png", gray16));
    // round(32896 * 255 / 65535) = 128
    assert_eq!(out.get_pixel(1, 0).0, [128; 3]);
    assert_eq!(out.get_pixel(2, 0).0, [255; 3]);

    let rgb16: ImageBuffer<Rgb<u16>, _> = ImageBuffer::from_pixel(2, 2, Rgb([65535, 257, 0]));
    assert_eq!(
        load(&save(d, "rgb16.png", rgb16)).get_pixel(1, 1).0,
        [255, 1, 0]
    );

    let jpeg = RgbImage::from_pixel(16, 16, Rgb([200, 30, 30]));
    let out = load(&save(d, "rgb.jpg", jpeg));
    assert_eq!(out.dimensions(), (16, 16));
    assert!(
        out.get_pixel(8, 8)
            .0
            .iter()
            .zip([200, 30, 30])
            .all(|(&a, b)| a.abs_diff(b) <= 4)
    );

    let gray_jpeg = GrayImage::from_pixel(8, 8, Luma([90]));
    let out = load(&save(d, "gray.jpg", gray_jpeg));
    assert!(out.get_pixel(4, 4).0.iter().all(|&v| v.abs_diff(90) <= 2));
}

/// A palette PNG with a transparent entry (tRNS), written with the png crate.
#[test]
fn decodes_palette_png_with_transparency() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("palette.png");
    let file = std::fs::File::create(&path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 3, 1);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(vec![255, 0, 0, 0, 0, 255, 9, 9, 9]);
    encoder.set_trns(vec![255, 255, 0]);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&[0, 1, 2]).unwrap();
    writer.finish().unwrap();
    let out = load_rgb(&path, DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!(out.get_pixel(0, 0).0, [255, 0, 0]);
    assert_eq!(out.get_pixel(1, 0).0, [0, 0, 255]);
    assert_eq!(
        out.get_pixel(2, 0).0,
        [255, 255, 255],
        "transparent entry -> white"
    );
}

#[test]
fn decodes_cmyk_jpeg() {
    // 16x8, left half CMYK (0, 255, 255, 0) = red, right half no ink = white (made with Pillow).
    let out = load_rgb(&fixtures().join("cmyk.jpg"), DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!(out.dimensions(), (16, 8));
    let near = |p: [u8; 3], q: [u8; 3]| p.iter().zip(q).all(|(&a, b)| a.abs_diff(b) <= 6);
    assert!(
        near(out.get_pixel(2, 2).0, [255, 0, 0]),
        "{:?}",
        out.get_pixel(2, 2)
    );
    assert!(
        near(out.get_pixel(13, 5).0, [255, 255, 255]),
        "{:?}",
        out.get_pixel(13, 5)
    );
}

/// PNG bytes with a valid IHDR for `width x height` and then the start of an IDAT chunk that is
/// cut off: a header that decoders read, with no pixel data.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(13u32.to_be_bytes());
    bytes.extend(&ihdr);
    bytes.extend(crc32fast::hash(&ihdr).to_be_bytes());
    bytes.extend(1000u32.to_be_bytes());
    bytes.extend(b"IDAT\x78\x9c");
    bytes
}

#[test]
fn image_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let missing = d.join("missing.png");
    let err = load_rgb(&missing, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImageLoadError::Missing { .. }), "{err}");
    assert_eq!(err.path(), missing);

    let text = write(d, "notes.jpg", "this is not an image\n");
    let err = load_rgb(&text, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImageLoadError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("notes.jpg"), "{err}");

    for (name, img) in [
        (
            "cut.png",
            image::DynamicImage::from(RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 3]))),
        ),
        (
            "cut.jpg",
            RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8 * 3, y as u8, 3])).into(),
        ),
    ] {
        let path = save(d, name, img);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_rgb(&path, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(
            matches!(err, ImageLoadError::Corrupt { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }

    // 20000 x 30000 with no pixel data: refused from the header, before any decoding.
    let huge = d.join("huge.png");
    std::fs::write(&huge, png_header_only(20_000, 30_000)).unwrap();
    let err = load_rgb(&huge, DEFAULT_MAX_PIXELS).unwrap_err();
    match &err {
        ImageLoadError::TooLarge {
            width,
            height,
            limit,
            ..
        } => assert_eq!(
            (*width, *height, *limit),
            (20_000, 30_000, DEFAULT_MAX_PIXELS)
        ),
        other => panic!("expected TooLarge, got {other}"),
    }
    assert!(err.to_string().contains("huge.png"), "{err}");
    assert!(matches!(
        image_dimensions(&huge, DEFAULT_MAX_PIXELS),
        Err(ImageLoadError::TooLarge { .. })
    ));
    assert_eq!(
        image_dimensions(&huge, 600_000_000).unwrap(),
        (20_000, 30_000)
    );
    // Under the limit, the header reads fine and decoding then finds the pixel data missing.
    let empty = d.join("empty.png");
    std::fs::write(&empty, png_header_only(300, 200)).unwrap();
    assert_eq!(
        image_dimensions(&empty, DEFAULT_MAX_PIXELS).unwrap(),
        (300, 200)
    );
    let err = load_rgb(&empty, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImageLoadError::Corrupt { .. }), "{err}");

    // The limit is inclusive: exactly max_pixels loads.
    let small = save(d, "small.png", RgbImage::new(10, 10));
    assert!(load_rgb(&small, 100).is_ok());
    assert!(matches!(
        load_rgb(&small, 99),
        Err(ImageLoadError::TooLarge { .. })
    ));
}

/// Runs `f` on another thread and fails the test when it does not return within 20 s (a read
/// that blocks forever, as opening a FIFO does, must fail the test rather than hang it).
fn within_timeout<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || send.send(f()));
    receive
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} did not return within 20 s (blocked?)"))
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Only regular files are images: a FIFO (opening it would block until a writer comes), a
/// directory, a socket or a device is refused by its type before it is opened, also through a
/// symlink.
#[test]
fn only_regular_files_are_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mkfifo(&d.join("fifo.png"));
    std::fs::create_dir(d.join("folder.png")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(d.join("socket.png")).unwrap();
    std::os::unix::fs::symlink("/dev/null", d.join("null.png")).unwrap();
    std::os::unix::fs::symlink(d.join("fifo.png"), d.join("to-fifo.png")).unwrap();
    for (name, kind) in [
        ("fifo.png", "a FIFO"),
        ("folder.png", "a directory"),
        ("socket.png", "a socket"),
        ("null.png", "a character device"),
        ("to-fifo.png", "a FIFO"),
    ] {
        let path = d.join(name);
        let err = within_timeout(name, {
            let path = path.clone();
            move || load_rgb(&path, DEFAULT_MAX_PIXELS).unwrap_err()
        });
        assert!(
            matches!(err, ImageLoadError::NotAFile { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains(kind), "{name}: {msg}");
        assert!(msg.contains("not a regular file"), "{name}: {msg}");
        let err = within_timeout(name, move || {
            image_dimensions(&path, DEFAULT_MAX_PIXELS).unwrap_err()
        });
        assert!(
            matches!(err, ImageLoadError::NotAFile { .. }),
            "{name}: {err}"
        );
    }
    // A symlink to a regular image is an image.
    save(d, "real.png", RgbImage::new(4, 3));
    std::os::unix::fs::symlink(d.join("real.png"), d.join("link.png")).unwrap();
    assert_eq!(
        image_dimensions(&d.join("link.png"), DEFAULT_MAX_PIXELS).unwrap(),
        (4, 3)
    );
}

/// Decoder messages come back as one trimmed line: the JPEG decoder ends some with a newline
/// (`Not enough bytes ...\n`) and quotes others with an escaped one (`"...length:0\n"`).
#[test]
fn decoder_messages_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(
        dir.path(),
        "cut.jpg",
        RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8 * 3, y as u8, 3])),
    );
    let good = std::fs::read(&path).unwrap();
    let mut marker_length_zero = good.clone();
    // FF D8 FF E0 <length>: the APP0 segment's length set to 0.
    assert_eq!(good[2..4], [0xFF, 0xE0]);
    marker_length_zero[4..6].copy_from_slice(&[0, 0]);
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("truncated header", good[..20].to_vec()),
        ("APP0 length 0", marker_length_zero),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = load_rgb(&path, DEFAULT_MAX_PIXELS).unwrap_err();
        let ImageLoadError::Corrupt { message, .. } = &err else {
            panic!("{what}: {err}");
        };
        assert!(!message.is_empty(), "{what}");
        assert!(
            !message.contains('\n') && !message.contains("\\n") && message.trim() == message,
            "{what}: {message:?}"
        );
    }
}

// ---- vocabulary and split ----

/// Synthetic competition-like rows: 18 integer labels (1..19 without 12), label 1 in ~76% of
/// rows, a long tail, 1..=4 labels per row.
fn synthetic_records(n: usize, seed: u64) -> Vec<Record> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (1..=19).filter(|&l| l != 12).collect();
    (0..n)
        .map(|i| {
            let mut labels = Vec::new();
            if rng.random_bool(0.76) {
                labels.push("1".to_string());
            }
            while labels.is_empty() || (labels.len() < 4 && rng.random_bool(0.3)) {
                // Geometric-ish tail: label k with weight ~ 1/k^1.5.
                let k = loop {
                    let k = rng.random_range(1..ids.len());
                    if rng.random_bool(1.0 / (k as f64).powf(1.5)) {
                        break k;
                    }
                };
                let label = ids[k].to_string();
                if !labels.contains(&label) {
                    labels.push(label);
                }
            }
            Record {
                id: format!("{i}.jpg"),
                labels: Some(labels),
                caption: "c".into(),
                line: i + 2,
            }
        })
        .collect()
}

fn label_counts(records: &[Record], ids: &[String]) -> std::collections::HashMap<String, usize> {
    let set: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut counts = std::collections::HashMap::new();
    for r in records.iter().filter(|r| set.contains(r.id.as_str())) {
        for l in r.labels.as_ref().unwrap() {
            *counts.entry(l.clone()).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn vocabulary_from_fixture_round_trips() {
    let records = read_csv(&fixtures().join("quirky/train.csv"))
        .unwrap()
        .records;
    let vocab = LabelVocab::from_records(&records).unwrap();
    let names: Vec<&str> = vocab.names().iter().map(String::as_str).collect();
    assert_eq!(
        names,
        ["1", "2", "3", "4", "5", "7", "10", "11", "13", "19"]
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.json");
    vocab.save(&path).unwrap();
    let loaded = LabelVocab::load(&path).unwrap();
    assert_eq!(loaded, vocab);
    for r in &records {
        let hot = loaded.encode(r.labels.as_ref().unwrap()).unwrap();
        let flags: Vec<bool> = hot.iter().map(|&v| v == 1.0).collect();
        let mut want = r.labels.clone().unwrap();
        want.sort_by_key(|l| vocab.index(l));
        assert_eq!(loaded.decode(&flags), want);
    }
}

#[test]
fn split_is_deterministic_disjoint_complete_and_stratified() {
    let records = synthetic_records(6000, 5);
    let vocab = LabelVocab::from_records(&records).unwrap();
    let start = std::time::Instant::now();
    let split = Split::stratified(&records, &vocab, 0.15, 3407).unwrap();
    eprintln!("split of {} rows: {:?}", records.len(), start.elapsed());
    assert_eq!(
        split,
        Split::stratified(&records, &vocab, 0.15, 3407).unwrap()
    );
    assert_ne!(split, Split::stratified(&records, &vocab, 0.15, 1).unwrap());
    split.check_matches(&records).unwrap();
    assert_eq!(split.train.len() + split.val.len(), records.len());

    let fraction = split.val.len() as f64 / records.len() as f64;
    assert!((fraction - 0.15).abs() < 0.005, "val fraction {fraction}");
    let all = label_counts(
        &records,
        &records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
    );
    let val = label_counts(&records, &split.val);
    for (label, &total) in &all {
        let v = val.get(label).copied().unwrap_or(0);
        assert!(v >= 1 && v < total, "label {label}: {v} of {total} in val");
        // Stratified: each label's val share is close to the fraction.
        let share = v as f64 / total as f64;
        assert!(
            (share - 0.15).abs() <= 0.02 + 1.5 / total as f64,
            "label {label}: {v} of {total} in val"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("split.json");
    split.save(&path).unwrap();
    assert_eq!(Split::load(&path).unwrap(), split);
}

#[test]
fn split_keeps_labels_with_two_rows_on_both_sides() {
    let records = read_csv(&fixtures().join("quirky/train.csv"))
        .unwrap()
        .records;
    let vocab = LabelVocab::from_records(&records).unwrap();
    for seed in 0..20 {
        let split = Split::stratified(&records, &vocab, 0.15, seed).unwrap();
        split.check_matches(&records).unwrap();
        let all = label_counts(
            &records,
            &records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        );
        let (train, val) = (
            label_counts(&records, &split.train),
            label_counts(&records, &split.val),
        );
        for (label, &total) in &all {
            if total >= 2 {
                assert!(
                    train.contains_key(label) && val.contains_key(label),
                    "seed {seed}: label {label}"
                );
            }
        }
    }
}

#[test]
fn split_mismatch_is_reported() {
    let records = synthetic_records(50, 1);
    let vocab = LabelVocab::from_records(&records).unwrap();
    let split = Split::stratified(&records, &vocab, 0.15, 3407).unwrap();
    let err = split.check_matches(&records[..40]).unwrap_err().to_string();
    assert!(err.contains("does not have"), "{err}");
    let err = split
        .check_matches(&synthetic_records(51, 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`50.jpg` (line 52) is in neither side"),
        "{err}"
    );
}

// ---- the `multiclip dataset` command ----

fn multiclip(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

/// `multiclip(args)`, killed and failing the test when it does not end within 20 s.
fn multiclip_within_timeout(args: &[&str]) -> std::process::Output {
    use std::process::Stdio;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_multiclip"))
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("multiclip {args:?} did not end within 20 s (blocked?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stdout_of(args: &[&str]) -> String {
    let out = multiclip(args);
    assert!(
        out.status.success(),
        "multiclip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The quirky fixture as a dataset folder with images: all fine except `0.jpg` (missing),
/// `1.jpg` (not an image) and `2.jpg` (a 20000 x 30000 header).
fn quirky_dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for part in Part::ALL {
        std::fs::copy(
            fixtures().join(format!("quirky/{part}.csv")),
            dir.path().join(format!("{part}.csv")),
        )
        .unwrap();
    }
    let data = dir.path().join("data");
    for record in expected(Part::Train)
        .into_iter()
        .chain(expected(Part::Test))
    {
        let path = data.join(&record.id);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match record.id.as_str() {
            "0.jpg" => {}
            "1.jpg" => std::fs::write(&path, "not an image").unwrap(),
            "2.jpg" => std::fs::write(&path, png_header_only(20_000, 30_000)).unwrap(),
            _ => {
                let format = image::ImageFormat::from_path(&path).unwrap();
                RgbImage::from_pixel(8, 6, Rgb([1, 2, 3]))
                    .save_with_format(&path, format)
                    .unwrap()
            }
        }
    }
    dir
}

#[test]
fn cli_inspect_reports_rows_labels_problems_and_images() {
    let ds = quirky_dataset();
    let dir = ds.path().to_str().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&stdout_of(&["dataset", "inspect", dir, "--json"])).unwrap();
    let train = &report["parts"][0];
    assert_eq!(train["part"], "train");
    assert_eq!(train["rows"], 12);
    assert_eq!(train["syntax"], "records");
    assert_eq!(train["labels"]["frequencies"][0]["label"], "1");
    assert_eq!(train["labels"]["frequencies"][0]["rows"], 6);
    assert_eq!(train["labels"]["frequencies"].as_array().unwrap().len(), 10);
    assert_eq!(
        train["labels"]["per_row"],
        serde_json::json!({"1": 6, "2": 5, "3": 1})
    );
    assert!(
        train["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["line"] == 5 && p["message"].as_str().unwrap().contains("spans 16 lines"))
    );
    let test = &report["parts"][1];
    assert_eq!(test["rows"], 4);
    assert!(test["labels"].is_null());
    let images = &report["images"];
    assert_eq!(images["checked"], 16);
    assert_eq!(images["ok"], 13);
    assert_eq!(images["missing"], 1);
    assert_eq!(images["unreadable"], 1);
    assert_eq!(images["too_large"], 1);
    assert_eq!(images["examples"][0]["id"], "0.jpg");

    let text = stdout_of(&["dataset", "inspect", dir, "--max-pixels", "700000000"]);
    assert!(text.contains("train ("), "{text}");
    assert!(text.contains("12 rows"), "{text}");
    assert!(
        text.contains("line 5: caption of `3.jpg` spans 16 lines"),
        "{text}"
    );
    assert!(
        text.contains("14 ok, 1 missing, 1 unreadable, 0 too large"),
        "{text}"
    );
    assert!(text.contains("largest: 2.jpg (20000x30000)"), "{text}");
}

/// `dataset inspect` over a dataset with a FIFO among its images reports it and returns.
#[test]
fn cli_inspect_refuses_a_fifo_without_hanging() {
    let ds = quirky_dataset();
    let fifo = ds.path().join("data/fifo.png");
    mkfifo(&fifo);
    let test_csv = ds.path().join("test.csv");
    let mut text = std::fs::read_to_string(&test_csv).unwrap();
    text += "fifo.png,\"a named pipe\"\n";
    std::fs::write(&test_csv, text).unwrap();
    let out =
        multiclip_within_timeout(&["dataset", "inspect", ds.path().to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let images = &report["images"];
    assert_eq!(images["checked"], 17);
    assert_eq!(images["unreadable"], 2);
    let issue = images["examples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "fifo.png")
        .unwrap();
    assert!(
        issue["error"].as_str().unwrap().contains("is a FIFO"),
        "{issue}"
    );
}

/// `dataset inspect` lists ids that leave `data/` as csv problems of their lines and as images
/// that cannot be used, even when the file they name exists; a symlink inside `data/` is
/// followed wherever it points, and counted.
#[test]
fn cli_inspect_reports_ids_outside_the_data_folder() {
    let ds = quirky_dataset();
    let outside = ds.path().join("outside.png");
    RgbImage::new(5, 5).save(&outside).unwrap();
    std::fs::create_dir(ds.path().join("store")).unwrap();
    RgbImage::new(6, 6)
        .save(ds.path().join("store/s.png"))
        .unwrap();
    std::os::unix::fs::symlink("../outside.png", ds.path().join("data/link.png")).unwrap();
    std::os::unix::fs::symlink("../store", ds.path().join("data/shared")).unwrap();
    let test_csv = ds.path().join("test.csv");
    let mut text = std::fs::read_to_string(&test_csv).unwrap();
    let first_new_line = text.lines().count() + 1;
    text += &format!(
        "{},\"absolute\"\n../outside.png,\"dot dot\"\nlink.png,\"a link\"\nshared/s.png,\"a linked folder\"\n",
        outside.display()
    );
    std::fs::write(&test_csv, text).unwrap();

    let dir = ds.path().to_str().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&stdout_of(&["dataset", "inspect", dir, "--json"])).unwrap();
    let problems: Vec<(u64, String)> = report["parts"][1]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["message"].as_str().unwrap().contains("refused"))
        .map(|p| {
            (
                p["line"].as_u64().unwrap(),
                p["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0].0 as usize, first_new_line);
    assert!(problems[0].1.contains("absolute"), "{problems:?}");
    assert_eq!(problems[1].0 as usize, first_new_line + 1);
    assert!(problems[1].1.contains("`..`"), "{problems:?}");
    let images = &report["images"];
    assert_eq!(images["checked"], 20);
    assert_eq!(images["ok"], 15, "{images}");
    assert_eq!(images["unreadable"], 3, "{images}");
    assert_eq!(images["outside_data"], 2, "{images}");
    let text = stdout_of(&["dataset", "inspect", dir]);
    assert!(
        text.contains("2 images reached through symlinks that point outside data/"),
        "{text}"
    );
    let errors: Vec<&str> = images["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["error"].as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("absolute path")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("`..`")), "{errors:?}");

    let text = stdout_of(&["dataset", "inspect", dir]);
    assert!(
        text.contains(&format!(
            "line {}: image id `../outside.png` is refused",
            first_new_line + 1
        )),
        "{text}"
    );
}

/// A small dataset of `n` PNGs `0.png`.. in train.csv (RFC-4180), for extract runs.
fn png_dataset(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let mut csv = String::from("ImageID,Labels,Caption\n");
    for i in 0..n {
        RgbImage::from_pixel(16, 12, Rgb([i as u8 * 20, 3, 4]))
            .save(dir.path().join(format!("data/{i}.png")))
            .unwrap();
        csv += &format!("{i}.png,{},\"picture {i}\"\n", 1 + i % 2);
    }
    write(dir.path(), "train.csv", &csv);
    dir
}

fn extract_args<'a>(data: &'a str, out: &'a str, on_error: &'a str) -> Vec<&'a str> {
    vec![
        "extract",
        "--data",
        data,
        "--out",
        out,
        "--backbone",
        concat!(
            "dinov2:",
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dinov2-tiny"
        ),
        "--part",
        "train",
        "--threads",
        "2",
        "--on-error",
        on_error,
    ]
}

/// Runs `extract` over `dataset` with `--on-error fail`, which must fail, then with `--on-error
/// skip`, which must succeed: (stderr of the first, stdout of the second).
fn extract_fail_then_skip(dataset: &Path) -> (String, String) {
    let data = dataset.to_str().unwrap();
    let out = dataset.join("cache");
    let out = out.to_str().unwrap();
    let failed = multiclip_within_timeout(&extract_args(data, out, "fail"));
    assert!(!failed.status.success());
    let skipped = multiclip_within_timeout(&extract_args(data, out, "skip"));
    let stdout = String::from_utf8_lossy(&skipped.stdout).into_owned();
    assert!(
        skipped.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    (String::from_utf8_lossy(&failed.stderr).into_owned(), stdout)
}

/// `extract` over a dataset whose `2.png` is a FIFO: `--on-error fail` stops naming the row,
/// `--on-error skip` records it as skipped; neither blocks.
#[test]
fn extract_refuses_a_fifo_by_row_without_hanging() {
    let ds = png_dataset(4);
    let fifo = ds.path().join("data/2.png");
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    let (stderr, stdout) = extract_fail_then_skip(ds.path());
    assert!(
        stderr.contains("row 2")
            && stderr.contains("train.csv line 4")
            && stderr.contains("is a FIFO"),
        "{stderr}"
    );
    assert!(
        stdout.contains("row 2 (2.png): image") && stdout.contains("is a FIFO"),
        "{stdout}"
    );
}

/// `extract` refuses an id that leaves `data/` by row, even when the file it names exists:
/// `--on-error fail` stops naming row, id and line; `--on-error skip` records it.
#[test]
fn extract_refuses_ids_outside_the_data_folder_by_row() {
    let ds = png_dataset(3);
    let outside = ds.path().join("outside.png");
    RgbImage::new(16, 12).save(&outside).unwrap();
    let csv = ds.path().join("train.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text += &format!(
        "{},1,\"absolute\"\n../outside.png,2,\"dot dot\"\n",
        outside.display()
    );
    std::fs::write(&csv, text).unwrap();
    let (stderr, stdout) = extract_fail_then_skip(ds.path());
    assert!(
        stderr.contains("row 3")
            && stderr.contains(&outside.display().to_string())
            && stderr.contains("train.csv line 5")
            && stderr.contains("absolute path"),
        "{stderr}"
    );
    assert!(stdout.contains("skipped      2 rows"), "{stdout}");
    assert!(
        stdout.contains("row 4 (../outside.png): image id `../outside.png` is refused"),
        "{stdout}"
    );
}

/// `extract` of a csv without rows stops with an error naming it instead of writing an empty
/// cache.
#[test]
fn extract_of_a_csv_without_rows_fails_naming_it() {
    let ds = png_dataset(0);
    let data = ds.path().to_str().unwrap();
    let out = ds.path().join("cache");
    let output = multiclip_within_timeout(&extract_args(data, out.to_str().unwrap(), "fail"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("train.csv") && stderr.contains("no rows"),
        "{stderr}"
    );
    assert!(!out.join("manifest.json").exists());
}

#[test]
fn cli_records_prints_exactly_what_was_read() {
    let dir = fixtures().join("quirky");
    let dir = dir.to_str().unwrap();
    let parse = |text: String| -> Vec<Record> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let all = parse(stdout_of(&["dataset", "records", dir]));
    let want: Vec<Record> = expected(Part::Train)
        .into_iter()
        .chain(expected(Part::Test))
        .collect();
    assert_eq!(all, want);
    let test = parse(stdout_of(&["dataset", "records", dir, "--part", "test"]));
    assert_eq!(test, expected(Part::Test));
}

#[test]
fn cli_split_writes_split_and_vocabulary_and_never_overwrites_silently() {
    let ds = quirky_dataset();
    let dir = ds.path().to_str().unwrap();
    let text = stdout_of(&["dataset", "split", dir]);
    assert!(text.contains("split 12 rows (seed 3407)"), "{text}");
    let split = Split::load(&ds.path().join("split.json")).unwrap();
    assert_eq!((split.seed, split.val_fraction), (3407, 0.15));
    split.check_matches(&expected(Part::Train)).unwrap();
    let vocab = LabelVocab::load(&ds.path().join("labels.json")).unwrap();
    assert_eq!(vocab.len(), 10);
    // Every label row of the table: label, train, val, share.
    let row_19 = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("19"))
        .unwrap();
    let cells: Vec<&str> = row_19.split_whitespace().collect();
    assert_eq!(cells[1..3], ["1", "1"], "{text}");

    let again = multiclip(&["dataset", "split", dir, "--seed", "1"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("split.json already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(Split::load(&ds.path().join("split.json")).unwrap(), split);

    stdout_of(&["dataset", "split", dir, "--seed", "1", "--force"]);
    assert_eq!(Split::load(&ds.path().join("split.json")).unwrap().seed, 1);

    let out = ds.path().join("runs/s2.json");
    stdout_of(&[
        "dataset",
        "split",
        dir,
        "--val-fraction",
        "0.3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(Split::load(&out).unwrap().val_fraction, 0.3);
    assert!(ds.path().join("runs/labels.json").is_file());
}

/// A fraction the stratification cannot come near (`--val-fraction 0.99` on the demo gives
/// about 97%) is explained in a warning; the default fraction gives none.
#[test]
fn cli_split_explains_a_fraction_it_cannot_reach() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo");
    let out = tempfile::tempdir().unwrap();
    let split = out.path().join("split.json");
    let run = |fraction: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_multiclip"))
            .args([
                "dataset",
                "split",
                demo.to_str().unwrap(),
                "--force",
                "--out",
            ])
            .arg(&split)
            .args(["--val-fraction", fraction])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stderr).unwrap()
    };
    let stderr = run("0.99");
    let note = stderr
        .lines()
        .find(|l| l.contains("validation rows"))
        .unwrap_or_else(|| panic!("no explanation: {stderr}"));
    let saved = Split::load(&split).unwrap();
    assert!(
        note.contains(&format!("{} validation rows", saved.val.len()))
            && note.contains("0.99")
            && note.contains("on both sides"),
        "{note}"
    );
    let stderr = run("0.15");
    assert!(!stderr.contains("validation rows"), "{stderr}");
}

#[test]
fn cli_errors_and_help() {
    let empty = tempfile::tempdir().unwrap();
    let out = multiclip(&["dataset", "inspect", empty.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither train.csv nor test.csv"));
    for sub in ["inspect", "records", "split"] {
        let help = stdout_of(&["dataset", sub, "--help"]);
        assert!(help.contains("Examples:"), "{sub}: {help}");
    }
}
