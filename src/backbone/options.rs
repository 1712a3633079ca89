//! Backbone options, written after the location in a spec (the grammar of [`crate::spec`]):
//! `clip:openai/clip-vit-large-patch14:template="a photo of {caption}",image_tokens=true`. The
//! spec, options included, is the backbone's id in cache manifests, so a cache made with other
//! options is never mixed up with this one. Each backbone takes the keys it knows
//! ([`Options::check_known`]) and rejects the rest.

use anyhow::{Result, bail};

pub use crate::spec::Options;

impl Options {
    /// The caption template (`template=...`, else `default`): must contain `{caption}`.
    pub fn template(&self, default: &str) -> Result<String> {
        let template = self.get("template")?.unwrap_or(default);
        if !template.contains("{caption}") {
            bail!("caption template `{template}` must contain `{{caption}}`");
        }
        Ok(template.to_string())
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::Spec;

    #[test]
    fn templates_need_the_caption_placeholder() {
        let spec = Spec::parse_located("clip:models/clip:template=a photo of {caption}").unwrap();
        assert_eq!(
            spec.options.template("{caption}").unwrap(),
            "a photo of {caption}"
        );
        let plain = Spec::parse_located("clip:models/clip").unwrap();
        assert_eq!(plain.options.template("{caption}").unwrap(), "{caption}");
        let bad = Spec::parse_located("clip:models/clip:template=no placeholder").unwrap();
        assert!(bad.options.template("{caption}").is_err());
    }
}
