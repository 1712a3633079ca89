//! A backbone made of several (`dinov2:DIR+sentence:DIR`): every part sees the same samples and the
//! outputs of all parts are returned side by side.

use anyhow::{Result, bail};
use candle_core::Tensor;

use super::contract::{Backbone, BackboneInfo, OutputSpec, Prepared, Sample, TextEmbeddings};

pub struct CompositeBackbone {
    id: String,
    parts: Vec<Box<dyn Backbone>>,
}

impl CompositeBackbone {
    /// Joins `parts`; their output names must be distinct.
    pub fn new(id: &str, parts: Vec<Box<dyn Backbone>>) -> Result<Self> {
        let mut names = std::collections::HashSet::new();
        for part in &parts {
            for output in part.outputs() {
                if !names.insert(output.name.clone()) {
                    bail!(
                        "backbone spec {id}: two parts both produce an output named `{}`",
                        output.name
                    );
                }
            }
        }
        Ok(Self {
            id: id.to_string(),
            parts,
        })
    }
}

impl Backbone for CompositeBackbone {
    fn info(&self) -> BackboneInfo {
        let infos: Vec<BackboneInfo> = self.parts.iter().map(|p| p.info()).collect();
        BackboneInfo {
            id: self.id.clone(),
            weights_sha256: infos
                .iter()
                .flat_map(|info| {
                    info.weights_sha256
                        .iter()
                        .map(|(file, sha)| (format!("{}/{file}", info.id), sha.clone()))
                })
                .collect(),
            preprocessing: serde_json::Value::Object(
                infos
                    .iter()
                    .map(|info| (info.id.clone(), info.preprocessing.clone()))
                    .collect(),
            ),
            text_template: infos.iter().find_map(|info| info.text_template.clone()),
        }
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        self.parts.iter().flat_map(|p| p.outputs()).collect()
    }

    fn needs_images(&self) -> bool {
        self.parts.iter().any(|p| p.needs_images())
    }

    fn needs_text(&self) -> bool {
        self.parts.iter().any(|p| p.needs_text())
    }

    fn prepare(&self, batch: &[Sample]) -> Result<Prepared> {
        let prepared = self
            .parts
            .iter()
            .map(|p| p.prepare(batch))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(prepared))
    }

    fn forward(&self, prepared: Prepared) -> Result<Vec<Tensor>> {
        let Ok(prepared) = prepared.downcast::<Vec<Prepared>>() else {
            bail!("composite forward got a batch prepared by another backbone");
        };
        let mut outputs = Vec::new();
        for (part, batch) in self.parts.iter().zip(*prepared) {
            outputs.extend(part.forward(batch)?);
        }
        Ok(outputs)
    }

    /// The first part's with a text encoder.
    fn embed_texts(&self, texts: &[String]) -> Result<Option<TextEmbeddings>> {
        for part in &self.parts {
            if let Some(embeddings) = part.embed_texts(texts)? {
                return Ok(Some(embeddings));
            }
        }
        Ok(None)
    }
}
