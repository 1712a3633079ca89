//! AdamW with decoupled weight decay that exempts biases and normalisation parameters, and
//! gradient clipping by global norm.
//!
//! `candle_nn::AdamW` decays every variable and has no clipping, so this is our own step. On the
//! CPU the whole update of one parameter (moments, bias correction, decay, step) is one fused pass
//! over its memory, in place, without temporaries; other devices use tensor operations.

use crate::tensor_ops::{self, CHUNK};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// AdamW hyper-parameters (the learning rate itself comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (theta -= lr * weight_decay * theta), for decayed parameters only.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Adam's running moments of one parameter.
enum Moments {
    /// f32 parameters on the CPU: plain vectors, updated in the fused in-place pass.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Anything else: tensors on the parameter's device.
    Device { m: Tensor, v: Tensor },
}

struct Param {
    name: String,
    var: Var,
    decayed: bool,
    moments: Moments,
}

/// What one optimizer step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of all gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
}

/// Whether AdamW should leave this variable undecayed: biases and layer-norm parameters.
pub fn exempt_from_weight_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name == "bias"
        || name.split('.').any(|segment| segment.starts_with("norm"))
}

/// AdamW over named trainable variables (fixed buffers must not be passed in).
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    steps_taken: u64,
}

impl AdamW {
    /// `vars` are (name, variable) pairs; those for which `exempt_from_decay(name)` holds (biases,
    /// norms: see [`exempt_from_weight_decay`]) form the group without weight decay.
    pub fn new(
        vars: Vec<(String, Var)>,
        config: AdamWConfig,
        exempt_from_decay: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            anyhow::ensure!(
                var.dtype().is_float(),
                "trainable variable `{name}` has non-float dtype {:?}",
                var.dtype()
            );
            let moments = if tensor_ops::is_cpu_f32(var.as_tensor()) {
                let n = var.elem_count();
                Moments::Host {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                Moments::Device {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                }
            };
            params.push(Param {
                decayed: !exempt_from_decay(&name),
                name,
                var,
                moments,
            });
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            params,
            config,
            steps_taken: 0,
        })
    }

    /// Names of the parameters that get weight decay and of those that do not.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let names = |decayed: bool| {
            self.params
                .iter()
                .filter(|p| p.decayed == decayed)
                .map(|p| p.name.as_str())
                .collect()
        };
        (names(true), names(false))
    }

    /// The optimised variables, sorted by name.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// Global L2 norm of the gradients of this optimizer's parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let sq = g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                sum += sq as f64;
            }
        }
        Ok(sum.sqrt())
    }

    /// One AdamW step at learning rate `lr`. With `clip_norm`, gradients are first scaled so
    /// that their global norm is at most `clip_norm`. Parameters without a gradient are left
    /// alone (their moments do not move either).
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        clip_norm: Option<f64>,
    ) -> Result<StepStats> {
        let grad_norm = self.grad_norm(grads)?;
        anyhow::ensure!(
            grad_norm.is_finite(),
            "gradient norm is {grad_norm}: the loss diverged (lower the learning rate?)"
        );
        let clip_scale = match clip_norm {
            Some(max) if grad_norm > max => max / grad_norm,
            _ => 1.0,
        };
        self.steps_taken += 1;
        let t = self.steps_taken as i32;
        let c = &self.config;
        let hyper = StepHyper {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            grad_scale: clip_scale,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            decay: 0.0,
        };
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let hyper = StepHyper {
                decay: if p.decayed { lr * c.weight_decay } else { 0.0 },
                ..hyper
            };
            let g = g.contiguous()?;
            match &mut p.moments {
                Moments::Host { m, v } => {
                    let kernel = FusedAdamW {
                        hyper,
                        moments: RefCell::new((m.as_mut_slice(), v.as_mut_slice())),
                    };
                    p.var
                        .as_tensor()
                        .inplace_op2(&g, &kernel)
                        .with_context(|| format!("AdamW step on `{}`", p.name))?;
                }
                Moments::Device { m, v } => {
                    let g = (g.to_dtype(p.var.dtype())? * hyper.grad_scale)?;
                    *m = ((&*m * hyper.beta1)? + (&g * (1.0 - hyper.beta1))?)?;
                    *v = ((&*v * hyper.beta2)? + (g.sqr()? * (1.0 - hyper.beta2))?)?;
                    let m_hat = (&*m / hyper.bias1)?;
                    let v_hat = (&*v / hyper.bias2)?;
                    let update = (m_hat / (v_hat.sqrt()? + hyper.eps)?)?;
                    let theta = (p.var.as_tensor() * (1.0 - hyper.decay))?;
                    p.var.set(&(theta - (update * lr)?)?)?;
                }
            }
        }
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
    }
}

/// Scalars of one parameter's update.
#[derive(Debug, Clone, Copy)]
struct StepHyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    grad_scale: f64,
    /// 1 - beta1^t and 1 - beta2^t.
    bias1: f64,
    bias2: f64,
    /// lr * weight_decay, or 0 for exempt parameters.
    decay: f64,
}

/// The CPU update of one f32 parameter in place, given its contiguous gradient.
struct FusedAdamW<'a> {
    hyper: StepHyper,
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        theta_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let theta = tensor_ops::contiguous_f32_mut(theta, theta_layout, "fused AdamW")?;
        let grad = tensor_ops::contiguous_f32(grad, grad_layout, "fused AdamW")?;
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if theta.len() != grad.len() || theta.len() != m.len() {
            candle_core::bail!(
                "fused AdamW: parameter of {} values, gradient of {}, moments of {}",
                theta.len(),
                grad.len(),
                m.len()
            );
        }
        let h = self.hyper;
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let gs = h.grad_scale as f32;
        let keep = (1.0 - h.decay) as f32;
        // theta -= lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / bias1, v_hat = v / bias2.
        let step = (h.lr / h.bias1) as f32;
        let inv_sqrt_bias2 = (1.0 / h.bias2.sqrt()) as f32;
        let eps = h.eps as f32;
        theta
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((theta, grad), m), v)| {
                for i in 0..theta.len() {
                    let g = grad[i] * gs;
                    let mi = b1 * m[i] + (1.0 - b1) * g;
                    let vi = b2 * v[i] + (1.0 - b2) * g * g;
                    m[i] = mi;
                    v[i] = vi;
                    theta[i] = theta[i] * keep - step * mi / (vi.sqrt() * inv_sqrt_bias2 + eps);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn exempt(name: &str) -> bool {
        name.ends_with("bias") || name.contains("norm")
    }

    fn var(values: &[f32], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Gradient of 0.5 * sum(theta^2) is theta itself.
    fn quadratic_grads(vars: &[&Var]) -> GradStore {
        let loss = vars
            .iter()
            .map(|v| v.as_tensor().sqr().unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        (loss * 0.5).unwrap().backward().unwrap()
    }

    #[test]
    fn biases_and_norms_are_exempt_from_decay() {
        let w = var(&[1.0; 4], &[2, 2]);
        let b = var(&[1.0; 2], &[2]);
        let norm = var(&[1.0; 4], &[2, 2]);
        let opt = AdamW::new(
            vec![
                ("fc1.weight".into(), w),
                ("fc1.bias".into(), b),
                ("decoder.norm1.weight".into(), norm),
            ],
            AdamWConfig::default(),
            exempt,
        )
        .unwrap();
        let (decayed, exempt) = opt.groups();
        assert_eq!(decayed, vec!["fc1.weight"]);
        assert_eq!(exempt, vec!["decoder.norm1.weight", "fc1.bias"]);
    }

    #[test]
    fn zero_gradient_decays_weights_but_not_biases() {
        // With a zero gradient Adam's update is 0, so only the decoupled decay moves theta.
        let w = var(&[2.0; 4], &[2, 2]);
        let b = var(&[2.0; 2], &[2]);
        let mut opt = AdamW::new(
            vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
            AdamWConfig {
                weight_decay: 0.5,
                ..AdamWConfig::default()
            },
            exempt,
        )
        .unwrap();
        let mut grads = GradStore::default();
        grads.insert(w.as_tensor(), w.zeros_like().unwrap());
        grads.insert(b.as_tensor(), b.zeros_like().unwrap());
        opt.step(&grads, 0.1, None).unwrap();
        let w_now = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b_now = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            w_now
                .iter()
                .all(|x| (x - 2.0 * (1.0 - 0.1 * 0.5)).abs() < 1e-6),
            "{w_now:?}"
        );
        assert_eq!(b_now, vec![2.0, 2.0]);
    }

    #[test]
    fn first_steps_match_hand_computed_adam() {
        // Adam's first step moves every coordinate by lr * sign(g) (up to eps).
        let w = var(&[3.0, -2.0, 0.5, -0.25], &[2, 2]);
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone())],
            AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            exempt,
        )
        .unwrap();
        let grads = quadratic_grads(&[&w]);
        opt.step(&grads, 0.01, None).unwrap();
        let got = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [2.99, -1.99, 0.49, -0.24];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn cpu_fused_step_matches_tensor_step() {
        // The same parameters on the host path and on the tensor path (f64 forces it).
        let values: Vec<f32> = (0..40).map(|i| (i as f32 - 17.0) / 7.0).collect();
        let fast = var(&values, &[5, 8]);
        let slow = Var::from_tensor(&fast.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let config = AdamWConfig::default();
        let mut fast_opt = AdamW::new(vec![("w".into(), fast.clone())], config, exempt).unwrap();
        let mut slow_opt = AdamW::new(vec![("w".into(), slow.clone())], config, exempt).unwrap();
        for step in 0..5 {
            let lr = 0.05 / (step + 1) as f64;
            fast_opt
                .step(&quadratic_grads(&[&fast]), lr, Some(3.0))
                .unwrap();
            slow_opt
                .step(&quadratic_grads(&[&slow]), lr, Some(3.0))
                .unwrap();
        }
        let a = fast
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = slow.as_tensor().to_dtype(DType::F32).unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?}\n{b:?}");
        }
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        // Gradients (3, 4) and (12): global norm 13. Clipped to 1.3, the first moment after one
        // step is (1 - beta1) * g / 10; with beta1 = 0 the update is lr * sign, so check norm only.
        let a = var(&[3.0, 4.0], &[1, 2]);
        let b = var(&[12.0], &[1, 1]);
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
            exempt,
        )
        .unwrap();
        let grads = quadratic_grads(&[&a, &b]);
        assert!((opt.grad_norm(&grads).unwrap() - 13.0).abs() < 1e-5);
        let stats = opt.step(&grads, 0.0, Some(1.3)).unwrap();
        assert!((stats.grad_norm - 13.0).abs() < 1e-5);
        assert!((stats.clip_scale - 0.1).abs() < 1e-6);
        let unclipped = opt.step(&grads, 0.0, Some(100.0)).unwrap();
        assert_eq!(unclipped.clip_scale, 1.0);
        match &opt.params[0].moments {
            // after two steps: m = beta2-free check of the first moment of `a`:
            // m1 = 0.1 * 0.3 = 0.03; m2 = 0.9 * 0.03 + 0.1 * 3 = 0.327
            Moments::Host { m, .. } => assert!((m[0] - 0.327).abs() < 1e-6, "{m:?}"),
            Moments::Device { .. } => panic!("f32 on the CPU uses the host path"),
        }
    }

    #[test]
    fn non_finite_gradients_are_an_error() {
        let w = var(&[f32::INFINITY, 1.0], &[1, 2]);
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone())],
            AdamWConfig::default(),
            exempt,
        )
        .unwrap();
        assert!(opt.step(&quadratic_grads(&[&w]), 0.1, None).is_err());
    }
}
