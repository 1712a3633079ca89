//! The tensors a head configuration needs, found without allocating them: the head is built over
//! a backend that records the name and shape of every tensor asked for and hands out a
//! zero-strided stand-in (one broadcast scalar, whatever the shape). Training uses it to estimate
//! a head's memory before creating any variable (`train::memory`); loading a checkpoint uses it
//! to check the weights file against the head configuration of the sidecar (`model`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::{Head, HeadConfig, HeadContext};

/// A head built over stand-ins, and the tensors it asked for.
pub struct Planned {
    /// Every tensor of the head by full name (trainable variables and fixed buffers alike, see
    /// [`super::is_buffer`]), with its shape.
    pub tensors: BTreeMap<String, Vec<usize>>,
    /// The head itself: its inputs, parts and activation estimate are real; its weights are
    /// stand-ins and must not be used to compute anything.
    pub head: Box<dyn Head>,
}

impl Planned {
    /// Elements of the trainable variables and of the fixed buffers.
    pub fn element_counts(&self) -> (usize, usize) {
        let (mut variables, mut buffers) = (0, 0);
        for (name, shape) in &self.tensors {
            let count: usize = shape.iter().product();
            if super::is_buffer(name) {
                buffers += count;
            } else {
                variables += count;
            }
        }
        (variables, buffers)
    }
}

/// Builds the head of `cfg` in `ctx` over stand-ins (the configuration is validated first, as by
/// [`super::build`]). Fixed buffers are asked for like any tensor, so a `gat` plans without the
/// label graph.
pub fn plan(cfg: &HeadConfig, ctx: &HeadContext) -> anyhow::Result<Planned> {
    plan_over(cfg, ctx, BTreeMap::new())
}

/// [`plan`] for a head read back from a file whose tensors have `shapes`: a tensor the head
/// takes as saved, whatever its shape (label-name embeddings), has the shape the file gives it.
pub fn plan_for_file(
    cfg: &HeadConfig,
    ctx: &HeadContext,
    shapes: BTreeMap<String, Vec<usize>>,
) -> anyhow::Result<Planned> {
    plan_over(cfg, ctx, shapes)
}

fn plan_over(
    cfg: &HeadConfig,
    ctx: &HeadContext,
    given: BTreeMap<String, Vec<usize>>,
) -> anyhow::Result<Planned> {
    let asked = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = Recorder {
        asked: asked.clone(),
        given,
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let head = super::build(cfg, ctx, vb)?;
    let tensors = std::mem::take(
        &mut *asked
            .lock()
            .map_err(|_| anyhow::anyhow!("tensor recorder lock poisoned"))?,
    );
    Ok(Planned { tensors, head })
}

/// Records what is asked for; every tensor "exists" (so buffers are asked for, not made).
struct Recorder {
    asked: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    /// Shapes of the tensors asked for without one (from a file).
    given: BTreeMap<String, Vec<usize>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.asked
            .lock()
            .map_err(|_| candle_core::Error::Msg("tensor recorder lock poisoned".into()))?
            .insert(name.to_string(), shape.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.given.get(name) {
            Some(shape) => self.get(
                shape.as_slice().into(),
                name,
                candle_nn::Init::Const(0.0),
                dtype,
                dev,
            ),
            None => {
                candle_core::bail!("the head asked for tensor `{name}` without giving its shape")
            }
        }
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::init::seeded_var_builder;
    use crate::heads::{LabelCooccurrence, build};
    use candle_nn::VarMap;
    use std::collections::HashMap;

    #[test]
    fn the_plan_names_every_tensor_a_built_head_saves() {
        let ctx = HeadContext {
            num_labels: 3,
            input_shapes: HashMap::from([
                ("image".into(), vec![6]),
                ("text".into(), vec![5]),
                ("multimodal_tokens".into(), vec![4, 6]),
                ("multimodal_mask".into(), vec![4]),
            ]),
            label_cooccurrence: Some(
                LabelCooccurrence::from_label_sets([&[0usize, 1][..], &[2]], 3).unwrap(),
            ),
            label_embeddings: None,
            seed: 1,
            precision: Default::default(),
        };
        for spec in [
            "mlp:hidden=7",
            "mlp:hidden=0,cosine=true",
            "router:hidden=4,router_hidden=3",
            "ensemble:hidden=4",
            "gat:hidden=8,heads=2",
            "ml_decoder:d_model=8,heads=2,ffn=5",
        ] {
            let cfg: HeadConfig = spec.parse().unwrap();
            let planned = plan(&cfg, &ctx).unwrap();
            let varmap = VarMap::new();
            let head = build(&cfg, &ctx, seeded_var_builder(&varmap, 1, &Device::Cpu)).unwrap();
            let mut saved: BTreeMap<String, Vec<usize>> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(name, var)| (name.clone(), var.dims().to_vec()))
                .collect();
            saved.extend(
                head.buffers()
                    .into_iter()
                    .map(|(name, t)| (name, t.dims().to_vec())),
            );
            assert_eq!(planned.tensors, saved, "{spec}");
            assert_eq!(planned.head.inputs(), head.inputs(), "{spec}");
            let (variables, _) = planned.element_counts();
            assert_eq!(
                variables,
                varmap
                    .all_vars()
                    .iter()
                    .map(|v| v.elem_count())
                    .sum::<usize>(),
                "{spec}"
            );
        }
    }
}
