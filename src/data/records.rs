//! Reader for the competition csv files: `train.csv` (`ImageID,Labels,Caption`) and `test.csv`
//! (`ImageID,Caption`).
//!
//! The competition files are not valid CSV: inner double quotes are not escaped, a comma can stand
//! right before an inner quote, captions span several lines (one holds 14 blank lines) and some
//! end with `/"`. A file is first read as strict RFC-4180 (`""` escapes a quote, fields quoted only
//! when needed, as written by Python's `csv`, pandas or the `csv` crate). When that fails, the file
//! is read by records instead: a record starts at a line that begins with an image id followed by a
//! comma (an id is a token without spaces, commas or quotes that ends in an image extension, such
//! as `0.jpg` or `science/scale_01.png`; one with spaces when it is quoted or followed by the row's
//! other fields), and its caption lies between the first and the last double quote of the record,
//! taken verbatim.
//!
//! Ids are checked as paths inside the dataset's `data/` folder ([`check_image_id`]); a refused
//! id is a problem of its line, and the row is still read.
//!
//! Line breaks are normalised: `\r\n` becomes `\n` (also inside multi-line captions).
//! Everything else in a caption comes back exactly as written.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// File name extensions that mark a token as an image id (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp"];

/// One row of a competition csv.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Image file name relative to the dataset's `data/` folder, e.g. `0.jpg`.
    pub id: String,
    /// Label tokens in file order (`None` for a file without a `Labels` column).
    pub labels: Option<Vec<String>>,
    pub caption: String,
    /// 1-based line of the file where the record starts.
    pub line: usize,
}

/// Something odd but recoverable found while reading (for `multiclip dataset inspect`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// 1-based line of the file.
    pub line: usize,
    pub message: String,
}

/// How a file was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsvSyntax {
    /// Well-formed RFC-4180: `""` inside a quoted field is one `"`.
    Rfc4180,
    /// The competition's raw layout, split into records at lines starting with `<image id>,`.
    Records,
}

impl std::fmt::Display for CsvSyntax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CsvSyntax::Rfc4180 => "RFC-4180 csv",
            CsvSyntax::Records => "raw competition records",
        })
    }
}

/// Everything read from one csv file.
#[derive(Clone, Debug)]
pub struct CsvContents {
    /// Whether the header has a `Labels` column.
    pub has_labels: bool,
    pub syntax: CsvSyntax,
    pub records: Vec<Record>,
    pub problems: Vec<Problem>,
}

/// Reads a competition csv file. Hard errors (missing id or caption, duplicate ids, bad header)
/// name the file and the line; oddities are returned in [`CsvContents::problems`].
pub fn read_csv(path: &Path) -> Result<CsvContents> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    parse_csv(&text).with_context(|| format!("cannot read records from {}", path.display()))
}

/// Parses the text of a competition csv (see the module docs). Errors name the line.
pub fn parse_csv(text: &str) -> Result<CsvContents> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let text = text.replace("\r\n", "\n");
    let (header, body) = text.split_once('\n').unwrap_or((&text, ""));
    let has_labels = parse_header(header)?;
    let n_fields = if has_labels { 3 } else { 2 };
    let mut problems = Vec::new();
    let (syntax, records) = match parse_rfc4180(body, 2, n_fields) {
        Ok(rows) => {
            let mut records = Vec::with_capacity(rows.len());
            for row in rows {
                records.push(record_from_fields(row, has_labels, &mut problems)?);
            }
            (CsvSyntax::Rfc4180, records)
        }
        Err(syntax_error) => {
            problems.push(Problem {
                line: syntax_error.line,
                message: format!(
                    "not well-formed RFC-4180 csv ({}); read by records instead",
                    syntax_error.message
                ),
            });
            (
                CsvSyntax::Records,
                parse_by_records(body, 2, has_labels, &mut problems)?,
            )
        }
    };
    check_unique_ids(&records)?;
    problems.sort_by_key(|p| p.line);
    Ok(CsvContents {
        has_labels,
        syntax,
        records,
        problems,
    })
}

/// Whether `name` ends in an image extension after a non-empty stem (`0.jpg`, `my cat.PNG`).
pub fn has_image_extension(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((stem, ext)) => {
            !stem.is_empty() && IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
        }
        None => false,
    }
}

/// Whether `token` looks like an image id where a record may start in the raw layout: an image
/// extension and no spaces, commas or quotes.
pub fn looks_like_image_id(token: &str) -> bool {
    !token.contains(|c: char| c.is_whitespace() || c == ',' || c == '"')
        && has_image_extension(token)
}

/// Whether `name` could be an image id with spaces in the raw layout: an image extension, no
/// quote or line break, and no whitespace at either end.
fn is_spaced_image_name(name: &str) -> bool {
    name.trim() == name && !name.contains(['"', '\n']) && has_image_extension(name)
}

/// The problem of an id read from a well-formed csv that does not look like an image file name.
fn image_name_problem(id: &str) -> Option<String> {
    if id.trim() != id {
        Some(format!(
            "image id `{}` begins or ends with whitespace (the file name must match exactly)",
            printable_id(id)
        ))
    } else if !has_image_extension(id) {
        Some(format!(
            "image id `{}` does not end in an image extension ({})",
            printable_id(id),
            IMAGE_EXTENSIONS.join(", ")
        ))
    } else {
        None
    }
}

/// Why `id` cannot name an image, or `Ok` for a usable id. An id is a path relative to the
/// dataset's `data/` folder with `/` between folders: one that could name a file outside the
/// folder (absolute, `..`, a Windows drive or separator) or give a file of the folder a second
/// name (`.`, an empty folder name) is refused, and so is one holding a control character.
pub fn check_image_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(format!("holds a control character (U+{:04X})", c as u32));
    }
    if id.starts_with('/') {
        return Err("is an absolute path".into());
    }
    if id.contains('\\') {
        return Err("holds a backslash (a folder separator on Windows; use `/`)".into());
    }
    if let [drive, b':', ..] = id.as_bytes()
        && drive.is_ascii_alphabetic()
    {
        return Err("starts with a drive letter (`C:`)".into());
    }
    for component in id.split('/') {
        match component {
            "" => return Err("has an empty folder name (`//` or a trailing `/`)".into()),
            "." => return Err("has a `.` component".into()),
            ".." => return Err("has a `..` component".into()),
            _ => {}
        }
    }
    Ok(())
}

/// `id` for a one-line message: control characters escaped (`\n`, `\u{0}`).
pub fn printable_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Reads the header line; returns whether it has a `Labels` column.
fn parse_header(header: &str) -> Result<bool> {
    let names: Vec<String> = header
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_ascii_lowercase())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    match names.as_slice() {
        ["imageid", "labels", "caption"] => Ok(true),
        ["imageid", "caption"] => Ok(false),
        _ => bail!(
            "line 1: header is `{header}`, expected `ImageID,Labels,Caption` (train) or \
             `ImageID,Caption` (test)"
        ),
    }
}

/// A row's fields before validation.
struct RawRow {
    line: usize,
    fields: Vec<String>,
}

struct SyntaxError {
    line: usize,
    message: String,
}

/// Strict RFC-4180 parse of `body` whose first line is `first_line`. Blank lines between rows are
/// skipped; every row must have exactly `n_fields` fields.
fn parse_rfc4180(
    body: &str,
    first_line: usize,
    n_fields: usize,
) -> std::result::Result<Vec<RawRow>, SyntaxError> {
    let mut rows = Vec::new();
    let mut chars = body.chars().peekable();
    let mut line = first_line;
    loop {
        // Skip blank lines between rows.
        while chars.peek() == Some(&'\n') {
            chars.next();
            line += 1;
        }
        if chars.peek().is_none() {
            return Ok(rows);
        }
        let row_line = line;
        let mut fields = Vec::new();
        loop {
            let mut field = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let open_line = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err(SyntaxError {
                                line: open_line,
                                message: "a quoted field never closes".into(),
                            });
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                    }
                }
                if let Some(&c) = chars.peek()
                    && c != ','
                    && c != '\n'
                {
                    return Err(SyntaxError {
                        line,
                        message: format!("`{c}` follows a closing quote"),
                    });
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '\n' {
                        break;
                    }
                    if c == '"' {
                        return Err(SyntaxError {
                            line,
                            message: "a quote inside an unquoted field".into(),
                        });
                    }
                    field.push(c);
                    chars.next();
                }
            }
            fields.push(field);
            match chars.next() {
                Some(',') => continue,
                Some('\n') => {
                    line += 1;
                    break;
                }
                _ => break,
            }
        }
        if fields.len() != n_fields {
            return Err(SyntaxError {
                line: row_line,
                message: format!("{} fields where {n_fields} were expected", fields.len()),
            });
        }
        rows.push(RawRow {
            line: row_line,
            fields,
        });
    }
}

/// Validates one RFC-4180 row and turns it into a record.
fn record_from_fields(
    row: RawRow,
    has_labels: bool,
    problems: &mut Vec<Problem>,
) -> Result<Record> {
    let mut fields = row.fields.into_iter();
    let id = fields.next().unwrap_or_default();
    let labels = if has_labels { fields.next() } else { None };
    let caption = fields.next().unwrap_or_default();
    if let Some(message) = image_name_problem(&id).filter(|_| !id.is_empty()) {
        problems.push(Problem {
            line: row.line,
            message,
        });
    }
    build_record(row.line, id, labels.as_deref(), caption, problems)
}

/// Common checks for both syntaxes: id and caption present, labels split into tokens.
fn build_record(
    line: usize,
    id: String,
    labels: Option<&str>,
    caption: String,
    problems: &mut Vec<Problem>,
) -> Result<Record> {
    if id.trim().is_empty() {
        bail!("line {line}: row has no image id");
    }
    if let Err(reason) = check_image_id(&id) {
        // Kept: `extract` refuses the row by name (or records it as skipped).
        problems.push(Problem {
            line,
            message: format!(
                "image id `{}` is refused: it {reason}; ids name files inside the dataset's \
                 data/ folder",
                printable_id(&id)
            ),
        });
    }
    if caption.trim().is_empty() {
        // Kept: an image-only backbone does not need it, and `extract` refuses it for a text
        // backbone by row (or records it as skipped with `--on-error skip`).
        problems.push(Problem {
            line,
            message: format!("row `{id}` has an empty caption"),
        });
    }
    let labels = labels.map(|field| {
        let tokens: Vec<String> = field.split_whitespace().map(str::to_owned).collect();
        if tokens.is_empty() {
            problems.push(Problem {
                line,
                message: format!("row `{id}` has no labels"),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for t in &tokens {
            if !seen.insert(t) {
                problems.push(Problem {
                    line,
                    message: format!("row `{id}` lists label `{t}` twice"),
                });
            }
        }
        tokens
    });
    Ok(Record {
        id,
        labels,
        caption,
        line,
    })
}

/// Splits `line` into (id, rest after the comma) when it starts a record: an image id followed
/// by a comma. A quoted id may hold spaces; an unquoted one only when the rest of the line has
/// the shape of the row's other fields (so caption text such as `see my photo.jpg, nice` stays
/// caption text).
fn record_start(line: &str, has_labels: bool) -> Option<(&str, &str)> {
    if let Some(quoted) = line.strip_prefix('"') {
        let (id, rest) = quoted.split_once('"')?;
        let rest = rest.strip_prefix(',')?;
        return is_spaced_image_name(id).then_some((id, rest));
    }
    let (id, rest) = line.split_once(',')?;
    let starts = looks_like_image_id(id)
        || (is_spaced_image_name(id) && has_row_shape_after_id(rest, has_labels));
    starts.then_some((id, rest))
}

/// Whether `rest`, what follows `<id>,`, has the shape of the other fields of a row: for train
/// the labels field and a comma, then (for both) a quote.
fn has_row_shape_after_id(rest: &str, has_labels: bool) -> bool {
    let caption = if has_labels {
        match rest.split_once(',') {
            Some((labels, after)) if !labels.contains('"') => after,
            _ => return false,
        }
    } else {
        rest
    };
    caption.trim_start().starts_with('"')
}

/// Whether a line that does not start a record still has the shape of a row (`<field>,` then the
/// labels field and a comma for train, then a quote): a row whose id is missing or malformed.
fn looks_like_row(line: &str, has_labels: bool) -> bool {
    let Some((first, rest)) = line.split_once(',') else {
        return false;
    };
    !first.contains(|c: char| c.is_whitespace() || c == '"')
        && has_row_shape_after_id(rest, has_labels)
}

/// The record-based reader for the competition's raw layout (see the module docs).
fn parse_by_records(
    body: &str,
    first_line: usize,
    has_labels: bool,
    problems: &mut Vec<Problem>,
) -> Result<Vec<Record>> {
    // Group physical lines into records.
    let mut groups: Vec<LineGroup> = Vec::new();
    for (offset, line) in body.split('\n').enumerate() {
        let number = first_line + offset;
        if record_start(line, has_labels).is_some() {
            groups.push(LineGroup::new(number, line, has_labels));
            continue;
        }
        match groups.last_mut() {
            None if line.trim().is_empty() => {}
            None => bail!(
                "line {number}: row does not start with an image id (`<name>.jpg,` or similar): \
                 `{}`",
                preview(line)
            ),
            Some(group) => {
                let start = group.start;
                if looks_like_image_id(line.trim()) {
                    bail!("line {number}: row `{}` has no caption", line.trim());
                }
                if !line.trim().is_empty() && !group.caption_is_quoted {
                    bail!(
                        "line {number} does not start with an image id (`<name>.jpg,` or \
                         similar) and cannot continue the unquoted caption of line {start}: `{}`",
                        preview(line)
                    );
                }
                if group.looks_complete() && looks_like_row(line, has_labels) {
                    let first = line.split(',').next().unwrap_or_default();
                    if first.is_empty() {
                        bail!("line {number}: row has no image id: `{}`", preview(line));
                    }
                    bail!(
                        "line {number}: row starts with `{first}`, which is not an image file \
                         name (expected an extension such as .jpg or .png); the record of line \
                         {start} would swallow it"
                    );
                }
                group.push(line);
            }
        }
    }
    groups
        .into_iter()
        .map(|g| record_from_lines(g.start, &g.lines, has_labels, problems))
        .collect()
}

/// The physical lines of one record in the raw layout, with what the reader asks of them at
/// every following line kept up to date (so reading stays linear in the file).
struct LineGroup<'a> {
    /// Line number of the first line.
    start: usize,
    lines: Vec<&'a str>,
    caption_is_quoted: bool,
    quotes: usize,
    /// The last non-whitespace character so far.
    last: Option<char>,
}

impl<'a> LineGroup<'a> {
    fn new(start: usize, first: &'a str, has_labels: bool) -> Self {
        let mut group = LineGroup {
            start,
            lines: Vec::new(),
            caption_is_quoted: caption_is_quoted(first, has_labels),
            quotes: 0,
            last: None,
        };
        group.push(first);
        group
    }

    fn push(&mut self, line: &'a str) {
        self.quotes += line.matches('"').count();
        if let Some(c) = line.trim_end().chars().next_back() {
            self.last = Some(c);
        }
        self.lines.push(line);
    }

    /// Whether the record so far ends with a closing quote, i.e. a following line is not
    /// obviously part of its caption.
    fn looks_complete(&self) -> bool {
        self.last == Some('"') && self.quotes >= 2
    }
}

/// Whether the caption field of a record's first line starts with a quote.
fn caption_is_quoted(first_line: &str, has_labels: bool) -> bool {
    let Some((_, rest)) = record_start(first_line, has_labels) else {
        return false;
    };
    let caption_field = if has_labels {
        split_labels_field(rest).map_or("", |(_, caption)| caption)
    } else {
        rest
    };
    caption_field.trim_start().starts_with('"')
}

/// Splits `<labels>,<caption...>` (labels optionally quoted) into the labels and the rest.
fn split_labels_field(rest: &str) -> Option<(&str, &str)> {
    match rest.strip_prefix('"') {
        Some(quoted) => {
            let (labels, after) = quoted.split_once('"')?;
            Some((labels, after.strip_prefix(',')?))
        }
        None => rest.split_once(','),
    }
}

/// Builds one record from its physical lines.
fn record_from_lines(
    line: usize,
    lines: &[&str],
    has_labels: bool,
    problems: &mut Vec<Problem>,
) -> Result<Record> {
    let text = lines.join("\n");
    let (id, rest) = record_start(&text, has_labels).context("internal: record without id")?;
    let (labels, caption_field) = if has_labels {
        match split_labels_field(rest) {
            Some((labels, caption)) => (Some(labels), caption),
            None => bail!("line {line}: row `{id}` has no caption"),
        }
    } else {
        (None, rest)
    };
    // Spaces before the opening quote (`, "caption"`) are not part of the caption.
    let quoted = caption_field.trim_start();
    let caption = if quoted.starts_with('"') {
        let last = quoted.rfind('"').unwrap_or(0);
        if last == 0 {
            bail!("line {line}: the caption of `{id}` opens a quote that never closes");
        }
        let trailing = quoted[last + 1..].trim();
        if !trailing.is_empty() {
            problems.push(Problem {
                line,
                message: format!(
                    "text after the closing quote of `{id}` is ignored: `{}`",
                    preview(trailing)
                ),
            });
        }
        quoted[1..last].to_owned()
    } else {
        problems.push(Problem {
            line,
            message: format!("caption of `{id}` is not quoted"),
        });
        caption_field.trim_end().to_owned()
    };
    let inner_quotes = caption.matches('"').count();
    if inner_quotes > 0 {
        problems.push(Problem {
            line,
            message: format!("caption of `{id}` holds {inner_quotes} unescaped double quote(s)"),
        });
    }
    let breaks = caption.matches('\n').count();
    if breaks > 0 {
        problems.push(Problem {
            line,
            message: format!("caption of `{id}` spans {} lines", breaks + 1),
        });
    }
    build_record(line, id.to_owned(), labels, caption, problems)
}

/// Duplicate ids are an error naming both lines.
fn check_unique_ids(records: &[Record]) -> Result<()> {
    let mut first_line: HashMap<&str, usize> = HashMap::with_capacity(records.len());
    for r in records {
        if let Some(previous) = first_line.insert(&r.id, r.line) {
            bail!(
                "image id `{}` appears twice: on line {previous} and on line {}",
                r.id,
                r.line
            );
        }
    }
    Ok(())
}

/// The start of a line, short enough for an error message.
fn preview(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captions(text: &str) -> Vec<String> {
        parse_csv(text)
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.caption)
            .collect()
    }

    #[test]
    fn strict_csv_unescapes_doubled_quotes() {
        let c = parse_csv("ImageID,Caption\n1.jpg,\"a \"\"b\"\", c\"\n2.jpg,plain\n").unwrap();
        assert_eq!(c.syntax, CsvSyntax::Rfc4180);
        assert_eq!(captions_of(&c), ["a \"b\", c", "plain"]);
        assert!(c.problems.is_empty());
    }

    fn captions_of(c: &CsvContents) -> Vec<&str> {
        c.records.iter().map(|r| r.caption.as_str()).collect()
    }

    #[test]
    fn raw_inner_quotes_fall_back_to_records() {
        let text = "ImageID,Labels,Caption\n1.jpg,1,\"a \"b\" c\"\n2.jpg,2 1,\"x ,\"y\"\"\n";
        let c = parse_csv(text).unwrap();
        assert_eq!(c.syntax, CsvSyntax::Records);
        assert_eq!(captions_of(&c), ["a \"b\" c", "x ,\"y\""]);
        assert_eq!(c.records[1].labels, Some(vec!["2".into(), "1".into()]));
        assert_eq!(c.records[1].line, 3);
    }

    #[test]
    fn space_before_the_opening_quote_is_skipped() {
        let c = parse_csv("ImageID,Labels,Caption\n1.jpg,1, \"a \"b\"\"\n").unwrap();
        assert_eq!(captions_of(&c), ["a \"b\""]);
    }

    #[test]
    fn crlf_and_bom_are_accepted() {
        assert_eq!(
            captions("\u{feff}ImageID,Caption\r\n1.jpg,\"a\r\nb\"\r\n"),
            ["a\nb"]
        );
    }

    #[test]
    fn missing_id_and_caption_name_the_line() {
        let err = parse_csv("ImageID,Labels,Caption\n1.jpg,1,\"ok\"\n,2,\"no id\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
        let err =
            parse_csv("ImageID,Labels,Caption\n1.jpg,1,\"a \"q\" b\"\n,2,\"x\"\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("line 3: row has no image id"),
            "{err:#}"
        );
        let err = parse_csv("ImageID,Labels,Caption\n1.jpg,1,\"ok\"\n2.jpg,1\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
        assert!(format!("{err:#}").contains("no caption"), "{err:#}");
    }

    #[test]
    fn bad_header_is_an_error() {
        let err = parse_csv("id,caption\n1.jpg,x\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"));
    }

    #[test]
    fn duplicate_ids_name_both_lines() {
        let err = parse_csv("ImageID,Caption\n1.jpg,a\n2.jpg,b\n1.jpg,c\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("line 2") && msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn image_ids() {
        assert!(looks_like_image_id("0.jpg"));
        assert!(looks_like_image_id("science/scale_01.PNG"));
        assert!(!looks_like_image_id(".jpg"));
        assert!(!looks_like_image_id("a b.jpg"));
        assert!(!looks_like_image_id("readme.txt"));
    }
}
