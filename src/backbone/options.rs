//! Backbone options written after the location in a spec:
//! `clip:openai/clip-vit-large-patch14?template=a photo of {caption}&image_tokens=true`.
//! `key=value` pairs joined by `&`; the spec, options included, is the backbone's id in cache
//! manifests, so a cache made with other options is never mixed up with this one. A value cannot
//! contain `&` or `+` (the spec separator).

use anyhow::{Result, bail};

/// Parsed options; each backbone takes the keys it knows and rejects the rest.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pairs: Vec<(String, String)>,
}

impl Options {
    /// Splits `location?options` into the location and its options.
    pub fn split(location: &str) -> Result<(&str, Self)> {
        let Some((location, query)) = location.split_once('?') else {
            return Ok((location, Self::default()));
        };
        let pairs = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
                _ => bail!("backbone option `{pair}` must look like `key=value`"),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((location, Self { pairs }))
    }

    /// Fails on any key not in `known`, naming the ones that are.
    pub fn check_known(&self, family: &str, known: &[&str]) -> Result<()> {
        for (key, _) in &self.pairs {
            if !known.contains(&key.as_str()) {
                if known.is_empty() {
                    bail!("the {family} backbone takes no options (got `{key}`)");
                }
                bail!(
                    "unknown {family} backbone option `{key}` (known: {})",
                    known.join(", ")
                );
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None | Some("false" | "0" | "no") => Ok(false),
            Some("true" | "1" | "yes" | "") => Ok(true),
            Some(other) => bail!("backbone option `{key}` must be true or false, got `{other}`"),
        }
    }

    /// A caption template: must contain `{caption}`.
    pub fn template(&self, default: &str) -> Result<String> {
        let template = self.get("template").unwrap_or(default);
        if !template.contains("{caption}") {
            bail!("caption template `{template}` must contain `{{caption}}`");
        }
        Ok(template.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_location_and_options() -> Result<()> {
        let (loc, opts) =
            Options::split("models/clip?template=a photo of {caption}&image_tokens=1")?;
        assert_eq!(loc, "models/clip");
        assert_eq!(opts.template("{caption}")?, "a photo of {caption}");
        assert!(opts.flag("image_tokens")?);
        opts.check_known("clip", &["template", "image_tokens"])?;
        assert!(opts.check_known("clip", &["template"]).is_err());
        let (loc, opts) = Options::split("openai/clip-vit-base-patch32")?;
        assert_eq!(loc, "openai/clip-vit-base-patch32");
        assert!(!opts.flag("image_tokens")?);
        Ok(())
    }

    #[test]
    fn rejects_bad_options() {
        assert!(Options::split("x?=v").is_err());
        assert!(Options::split("x?novalue").is_err());
        let (_, opts) = Options::split("x?template=no placeholder").unwrap();
        assert!(opts.template("{caption}").is_err());
        let (_, opts) = Options::split("x?image_tokens=maybe").unwrap();
        assert!(opts.flag("image_tokens").is_err());
    }
}
