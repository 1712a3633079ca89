//! Looking up a head's inputs in a batch: pooled vectors as they are, token sequences pooled by
//! a masked mean, and the error that names a missing cache output.

use anyhow::{Context, bail};
use candle_core::{Result, Tensor};

use super::layers::as_f32;
use super::{HeadContext, Inputs};
use crate::tensor_ops::{is_cpu_f32, l2_normalize, masked_mean};

/// The mask output that goes with token sequence `name`: `<stem>_mask` where `name` is
/// `<stem>_tokens` (`multimodal_tokens` -> `multimodal_mask`), else `<name>_mask`.
pub fn default_mask_name(name: &str) -> String {
    match name.strip_suffix("_tokens") {
        Some(stem) => format!("{stem}_mask"),
        None => format!("{name}_mask"),
    }
}

/// The names of the pooled (one vector per sample) inputs in the context, sorted; masks excluded.
pub fn pooled_inputs(ctx: &HeadContext) -> Vec<String> {
    let mut names: Vec<String> = ctx
        .input_shapes
        .iter()
        .filter(|(name, shape)| shape.len() == 1 && !name.ends_with("_mask"))
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

/// The message for an input the batch (or cache) lacks.
pub fn missing_input_message<'a>(
    missing: &str,
    available: impl Iterator<Item = &'a String>,
) -> String {
    let mut names: Vec<&str> = available.map(String::as_str).collect();
    names.sort_unstable();
    format!(
        "the head needs cache output `{missing}`, but only these are available: {}",
        if names.is_empty() {
            "(none)".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// The tensor called `name` in the batch.
pub fn lookup<'a>(x: &'a Inputs, name: &str) -> Result<&'a Tensor> {
    x.get(name)
        .ok_or_else(|| candle_core::Error::Msg(missing_input_message(name, x.keys())))
}

/// The per-sample shape of input `name`, or an error listing what the context offers.
pub fn shape_of<'a>(ctx: &'a HeadContext, name: &str) -> anyhow::Result<&'a [usize]> {
    match ctx.input_shapes.get(name) {
        Some(shape) => Ok(shape),
        None => bail!(missing_input_message(name, ctx.input_shapes.keys())),
    }
}

/// One input of a head, turned into one f32 vector per sample.
#[derive(Debug, Clone)]
pub struct Feature {
    pub name: String,
    /// The mask output of a token sequence (`None` for pooled inputs, or sequences without mask).
    pub mask: Option<String>,
    /// Width of the vector per sample.
    pub dim: usize,
}

impl Feature {
    /// Resolve `name` against the context: a `[D]` input is used as it is, a `[T, D]` input is
    /// mean-pooled over its real tokens (mask from [`default_mask_name`] when the cache has it).
    pub fn resolve(name: &str, ctx: &HeadContext) -> anyhow::Result<Self> {
        let shape = shape_of(ctx, name)?;
        match shape {
            [dim] => Ok(Self {
                name: name.to_string(),
                mask: None,
                dim: *dim,
            }),
            [_, dim] => {
                let mask = default_mask_name(name);
                let mask = ctx.input_shapes.contains_key(&mask).then_some(mask);
                Ok(Self {
                    name: name.to_string(),
                    mask,
                    dim: *dim,
                })
            }
            other => bail!(
                "cache output `{name}` has per-sample shape {other:?}; heads take [D] vectors or [T, D] token sequences"
            ),
        }
    }

    /// Resolve several inputs (at least one).
    pub fn resolve_all(names: &[String], ctx: &HeadContext) -> anyhow::Result<Vec<Self>> {
        if names.is_empty() {
            bail!("the head has no inputs (list some, or use a cache with pooled outputs)");
        }
        names
            .iter()
            .map(|name| Self::resolve(name, ctx).with_context(|| format!("head input `{name}`")))
            .collect()
    }

    /// The batch entries this feature reads.
    pub fn inputs(&self) -> Vec<String> {
        std::iter::once(self.name.clone())
            .chain(self.mask.clone())
            .collect()
    }

    /// `[B, dim]` f32 features of the batch, each row L2-normalised: backbones store features at
    /// very different scales (DINOv2's CLS has norm ~40, MiniLM's text 1), and concatenated raw the
    /// large ones drown the small ones (measured in docs/results.md), as the original's heads and
    /// the baselines avoid by normalising every feature.
    pub fn forward(&self, x: &Inputs) -> Result<Tensor> {
        let value = lookup(x, &self.name)?;
        let pooled = match value.rank() {
            2 => as_f32(value)?,
            3 => {
                let mask = match &self.mask {
                    Some(mask) => Some(lookup(x, mask)?),
                    None => None,
                };
                masked_mean(&as_f32(value)?, mask)?
            }
            _ => candle_core::bail!(
                "batch entry `{}` has shape {:?}; expected [B, D] or [B, T, D]",
                self.name,
                value.shape()
            ),
        };
        l2_normalize_features(&pooled)
    }
}

/// Each row of `[B, D]` features scaled to unit L2 norm, as [`l2_normalize`] (an all-zero row
/// stays zero), in one fused pass on the CPU when the features need no gradient (cached ones).
pub fn l2_normalize_features(x: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) && !x.track_op() {
        return super::fused::normalize_rows_untracked(x);
    }
    l2_normalize(x)
}

/// Concatenate per-feature `[B, D_i]` tensors along the feature axis.
pub fn concat(parts: &[Tensor]) -> Result<Tensor> {
    if parts.len() == 1 {
        Ok(parts[0].clone())
    } else {
        Tensor::cat(parts, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn features_come_out_with_unit_norm_whatever_their_stored_scale() {
        let ctx = HeadContext {
            input_shapes: [("image".to_string(), vec![2])].into(),
            ..Default::default()
        };
        let feature = Feature::resolve("image", &ctx).unwrap();
        let stored = Tensor::new(&[[30f32, 40.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let x: Inputs = [("image".to_string(), stored)].into();
        let out = feature.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
        // The fused kernel (untracked CPU input) and the basic ops agree.
        let x = Tensor::randn(0f32, 3.0, (5, 7), &Device::Cpu).unwrap();
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let fused = l2_normalize_features(&x).unwrap();
        let basic = l2_normalize_features(var.as_tensor()).unwrap();
        let diff = (fused - basic).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
