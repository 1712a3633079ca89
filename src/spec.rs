//! The one grammar of the specs that name a backbone, a head or a loss on the command line and in
//! pipeline files:
//!
//! ```text
//! head       KIND[:KEY=VALUE,...]               mlp   mlp:hidden=0   router:inputs=image+text
//! loss       KIND[:KEY=VALUE,...]               focal   focal:alpha=0.25,gamma=2
//! backbone   FAMILY:LOCATION[:KEY=VALUE,...]    clip:openai/clip-vit-base-patch32:image_tokens=true
//!            several joined by `+`              dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2
//! ```
//!
//! `:` separates the name, the location and the options; `,` separates options; the first `=` of
//! an option separates its key from its value; `+` separates the items of a list: the backbones of
//! a composite spec, the values of a list option (`inputs=image+text`). Options are named, never
//! positional, and a key may be given once. A location or a value that holds one of `:,+"` is
//! written in double quotes, with `""` for a quote inside: `template="A photo, {caption}"`. None of
//! these characters is special to a POSIX shell, so a spec needs shell quotes only around spaces
//! or double quotes.

use anyhow::{Result, bail};

/// A parsed spec: its name (head or loss kind, backbone family), a backbone's location, and the
/// options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub location: Option<String>,
    pub options: Options,
}

/// The `KEY=VALUE` options of a spec, in the order written; every value is a list of one or more
/// items (`inputs=image+text` has two).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pairs: Vec<(String, Vec<String>)>,
}

impl Spec {
    /// Parses `NAME[:KEY=VALUE,...]` (heads, losses).
    pub fn parse(text: &str) -> Result<Self> {
        let fields = split_unquoted(text, ':')?;
        let (name, options) = match fields.as_slice() {
            [name] => (*name, None),
            [name, options] => (*name, Some(*options)),
            _ => bail!(
                "`{text}` has more than one `:`; write NAME[:KEY=VALUE,...], with a value that \
                 holds `:` in double quotes"
            ),
        };
        Ok(Self {
            name: parse_name(name, text)?,
            location: None,
            options: Options::parse(options, text)?,
        })
    }

    /// Parses `NAME:LOCATION[:KEY=VALUE,...]` (one backbone).
    pub fn parse_located(text: &str) -> Result<Self> {
        let fields = split_unquoted(text, ':')?;
        let (name, location, options) = match fields.as_slice() {
            [name, location] => (*name, *location, None),
            [name, location, options] => (*name, *location, Some(*options)),
            [_] => bail!("`{text}` must look like NAME:LOCATION[:KEY=VALUE,...]"),
            _ => bail!(
                "`{text}` has more than two `:`; write NAME:LOCATION[:KEY=VALUE,...], with a \
                 location or value that holds `:` in double quotes"
            ),
        };
        let location = unquote(location.trim(), text)?;
        if location.is_empty() {
            bail!("`{text}` has an empty location");
        }
        Ok(Self {
            name: parse_name(name, text)?,
            location: Some(location),
            options: Options::parse(options, text)?,
        })
    }
}

impl Options {
    fn parse(text: Option<&str>, spec: &str) -> Result<Self> {
        let mut pairs: Vec<(String, Vec<String>)> = Vec::new();
        let Some(text) = text else {
            return Ok(Self { pairs });
        };
        for option in split_unquoted(text, ',')? {
            let option = option.trim();
            let Some((key, value)) = option.split_once('=') else {
                bail!("option `{option}` in `{spec}` is not KEY=VALUE");
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("option `{option}` in `{spec}` needs a key of letters, digits and `_`");
            }
            if pairs.iter().any(|(k, _)| k == key) {
                bail!("option `{key}` is given twice in `{spec}`");
            }
            let items = split_unquoted(value, '+')?
                .into_iter()
                .map(|item| unquote(item.trim(), spec))
                .collect::<Result<Vec<_>>>()?;
            pairs.push((key.to_string(), items));
        }
        Ok(Self { pairs })
    }

    /// The options as written: key and value items.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Fails on any key not in `known`, naming the ones that are; `what` names the spec's owner
    /// (`clip backbone`, `focal loss`).
    pub fn check_known(&self, what: &str, known: &[&str]) -> Result<()> {
        for (key, _) in &self.pairs {
            if !known.contains(&key.as_str()) {
                if known.is_empty() {
                    bail!("the {what} takes no options (got `{key}`)");
                }
                bail!(
                    "unknown {what} option `{key}` (known: {})",
                    known.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The value of `key`, which must be a single item (not a `+` list).
    pub fn get(&self, key: &str) -> Result<Option<&str>> {
        match self.pairs.iter().find(|(k, _)| k == key) {
            None => Ok(None),
            Some((_, items)) => match items.as_slice() {
                [one] => Ok(Some(one)),
                _ => bail!(
                    "option `{key}` takes one value, got the list `{}` (quote a value that holds `+`)",
                    items.join("+")
                ),
            },
        }
    }

    /// A `true`/`false` option (also `1`/`0`, `yes`/`no`); absent is false.
    pub fn flag(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            None | Some("false" | "0" | "no") => Ok(false),
            Some("true" | "1" | "yes") => Ok(true),
            Some(other) => bail!("option `{key}` must be true or false, got `{other}`"),
        }
    }
}

/// Splits `text` at every `separator` outside double quotes (the pieces keep their quotes).
pub fn split_unquoted(text: &str, separator: char) -> Result<Vec<&str>> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            pieces.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    if quoted {
        bail!("`{text}` has an unclosed double quote");
    }
    pieces.push(&text[start..]);
    Ok(pieces)
}

/// A name: letters, digits, `_` and `-`, lower-cased.
fn parse_name(name: &str, spec: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        bail!("`{spec}` must start with a name of letters, digits, `_` or `-` (got `{name}`)");
    }
    Ok(name.to_ascii_lowercase())
}

/// A bare piece as it is, or a double-quoted one without its quotes (`""` inside is one `"`).
fn unquote(piece: &str, spec: &str) -> Result<String> {
    match piece.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
        Some(inner) if !inner.replace("\"\"", "").contains('"') => Ok(inner.replace("\"\"", "\"")),
        _ if piece.contains('"') => bail!(
            "`{piece}` in `{spec}`: a double quote may only enclose a whole location or value \
             (write `\"\"` for a quote inside it)"
        ),
        _ => Ok(piece.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(spec: &Spec) -> Vec<(&str, Vec<&str>)> {
        spec.options
            .iter()
            .map(|(k, v)| (k, v.iter().map(String::as_str).collect()))
            .collect()
    }

    #[test]
    fn names_and_named_options() {
        let spec = Spec::parse("router:inputs=image+text,hidden=512").unwrap();
        assert_eq!(spec.name, "router");
        assert_eq!(spec.location, None);
        assert_eq!(
            options(&spec),
            [("inputs", vec!["image", "text"]), ("hidden", vec!["512"])]
        );
        assert_eq!(spec.options.get("hidden").unwrap(), Some("512"));
        assert!(spec.options.get("inputs").is_err());
        assert_eq!(spec.options.get("absent").unwrap(), None);
        let bare = Spec::parse(" Focal ").unwrap();
        assert_eq!((bare.name.as_str(), options(&bare)), ("focal", vec![]));
        assert_eq!(
            Spec::parse("focal:alpha=0.25,gamma=1e-3")
                .unwrap()
                .options
                .get("gamma")
                .unwrap(),
            Some("1e-3")
        );
    }

    #[test]
    fn locations_and_quoted_values() {
        let spec = Spec::parse_located(
            r#"clip:models/clip-b32:template="A photo, {caption}: ""nice""",image_tokens=true"#,
        )
        .unwrap();
        assert_eq!(spec.name, "clip");
        assert_eq!(spec.location.as_deref(), Some("models/clip-b32"));
        assert_eq!(
            spec.options.get("template").unwrap(),
            Some(r#"A photo, {caption}: "nice""#)
        );
        assert!(spec.options.flag("image_tokens").unwrap());
        let spec = Spec::parse_located(r#"clip:"C:\models\clip+b""#).unwrap();
        assert_eq!(spec.location.as_deref(), Some(r"C:\models\clip+b"));
        assert!(options(&spec).is_empty());
        assert_eq!(
            split_unquoted(r#"a:x:t="1+2"+b:y"#, '+').unwrap(),
            [r#"a:x:t="1+2""#, "b:y"]
        );
    }

    #[test]
    fn malformed_specs_are_refused() {
        for bad in [
            "",
            ":x",
            "mlp:hidden",
            "mlp:=3",
            "mlp:hidden=1,hidden=2",
            "mlp:a=1:b=2",
            r#"mlp:input="open"#,
            r#"mlp:input=a"b"c"#,
            "ml decoder",
        ] {
            assert!(Spec::parse(bad).is_err(), "{bad:?} should be refused");
        }
        for bad in ["dinov2", "dinov2:", "dinov2:a:b:c", r#"dinov2:"""#] {
            assert!(
                Spec::parse_located(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        let spec = Spec::parse("x:flag=maybe").unwrap();
        assert!(spec.options.flag("flag").is_err());
        assert!(spec.options.check_known("x head", &["other"]).is_err());
        assert!(spec.options.check_known("x head", &["flag"]).is_ok());
    }
}
