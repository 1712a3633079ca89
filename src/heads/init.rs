//! Seeded initialisation of trainable variables.
//!
//! candle's CPU device cannot be seeded, so a `VarBuilder::from_varmap` gives different initial
//! weights on every run. [`seeded_var_builder`] wraps a [`VarMap`] in a backend that creates each
//! missing variable from its own ChaCha8 stream, derived from the run seed and the variable's full
//! name: the same seed gives the same weights whatever order the variables are created in.
//! Existing variables (e.g. after a second build over the same map) are returned as they are.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap, init::NormalOrUniform};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarBuilder` that creates missing variables in `varmap` with seeded random values.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// Starts every logit bias of `head` ([`super::Head::logit_biases`]) at the log-odds of its
/// label's frequency: `positives[k]` of `rows` training samples carry label `k` (add-half
/// smoothing, so an unseen label starts finite and very negative).
pub fn logit_biases_from_prior(
    head: &dyn super::Head,
    varmap: &VarMap,
    positives: &[usize],
    rows: usize,
) -> anyhow::Result<()> {
    let prior: Vec<f32> = positives
        .iter()
        .map(|&count| {
            let p = (count as f64 + 0.5) / (rows as f64 + 1.0);
            (p / (1.0 - p)).ln() as f32
        })
        .collect();
    let vars = varmap.all_vars();
    for bias in head.logit_biases() {
        anyhow::ensure!(
            bias.dims() == [prior.len()],
            "a logit bias of shape {:?} for {} labels",
            bias.dims(),
            prior.len()
        );
        let Some(var) = vars.iter().find(|v| v.as_tensor().id() == bias.id()) else {
            anyhow::bail!("a logit bias of the head is not one of its trainable variables");
        };
        var.set(&Tensor::new(prior.as_slice(), bias.device())?)?;
    }
    Ok(())
}

/// Starts the trainable variable behind `var` (a tensor a `VarMap`-backed builder returned) at
/// `value` instead of its random initial values.
pub fn start_variable_at(var: &Tensor, value: &Tensor) -> anyhow::Result<()> {
    anyhow::ensure!(
        var.is_variable(),
        "only a trainable variable can be started at a value"
    );
    anyhow::ensure!(
        var.shape() == value.shape(),
        "a variable of shape {:?} cannot start at a value of shape {:?}",
        var.dims(),
        value.dims()
    );
    Var::from_tensor(var)?.set(value)?;
    Ok(())
}

/// A random stream for the object called `name` under the run seed `seed`.
pub fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    // FNV-1a: stable across platforms and Rust versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ hash.rotate_left(17))
}

/// A tensor drawn from `init` with the stream of (`seed`, `name`).
pub fn seeded_tensor(
    shape: &Shape,
    init: Init,
    seed: u64,
    name: &str,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = stream(seed, name);
    let n = shape.elem_count();
    let values: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(&mut rng, n, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, n, -bound, bound)
                }
                NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std),
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), device)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, up: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
        .collect()
}

/// Box-Muller normal samples.
fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, stdev: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
            let u2 = rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (mean + stdev * z) as f32
        })
        .collect()
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(var) = vars.get(name) {
            let tensor = var.as_tensor();
            if tensor.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` has shape {:?}, the head needs {s:?}",
                    tensor.shape()
                );
            }
            return tensor.to_dtype(dtype);
        }
        let value = seeded_tensor(&s, h, self.seed, name, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        match vars.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("no variable `{name}` in the map"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|vars| vars.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_different_seed_different_weights() -> Result<()> {
        let dev = Device::Cpu;
        let make = |seed| -> Result<Vec<f32>> {
            let map = VarMap::new();
            let vb = seeded_var_builder(&map, seed, &dev);
            let lin = candle_nn::linear(4, 3, vb.pp("fc"))?;
            lin.weight().flatten_all()?.to_vec1()
        };
        assert_eq!(make(1)?, make(1)?);
        assert_ne!(make(1)?, make(2)?);
        Ok(())
    }

    #[test]
    fn variables_land_in_the_map_and_are_reused() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 7, &dev);
        let a = vb.get_with_hints((2, 2), "w", candle_nn::init::ONE)?;
        let b = vb.get_with_hints((2, 2), "w", candle_nn::init::ZERO)?;
        assert_eq!(map.all_vars().len(), 1);
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert!(
            vb.get_with_hints((3, 2), "w", candle_nn::init::ZERO)
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn normal_samples_have_the_requested_moments() {
        let mut rng = stream(3, "x");
        let v = normal(&mut rng, 20_000, 1.0, 2.0);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
