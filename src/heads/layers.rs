//! Differentiable building blocks shared by the heads: trainable variables with their
//! initialisation (the frozen backbones have forward-only twins, `FrozenLinear` and
//! `FrozenLayerNorm` in `crate::backbone::layers`).
//!
//! Everything here records a backward op for every trainable tensor (candle_nn's layer-norm fast
//! path has none): on the CPU the bias add and the layer norm are fused kernels with hand-written
//! backward passes ([`super::fused`]), elsewhere they are basic differentiable ops. Softmax is
//! `candle_nn::ops::softmax`; dropout draws its mask from a seeded stream so a run is
//! reproducible.

use std::sync::Mutex;

use candle_core::{D, DType, Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::init::stream;
use super::{HeadContext, fused, products};
use crate::tensor_ops::{Precision, is_cpu_f32};

/// `x + b` over the last dimension (fused on the CPU: its bias gradient avoids candle's slow
/// strided sum over rows).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) {
        fused::bias_add(x, b)
    } else {
        x.broadcast_add(b)
    }
}

/// A fully-connected layer `y = x W^T + b` on the last dimension of an input of any rank, its
/// product in `precision` ([`products`]). Variables `weight` `[out, in]` (Kaiming normal) and
/// `bias` `[out]` (uniform +-1/sqrt(in)), as in `candle_nn::linear`.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    precision: Precision,
}

impl Linear {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut linear = Self::without_bias(in_dim, out_dim, precision, vb.clone())?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        linear.bias = Some(vb.get_with_hints(out_dim, "bias", init)?);
        Ok(linear)
    }

    pub fn without_bias(
        in_dim: usize,
        out_dim: usize,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", init)?,
            bias: None,
            precision,
        })
    }
}

impl Linear {
    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// `y = x W^T + b`, followed by a ReLU when `relu` (fused with the bias add on the CPU).
    fn forward_act(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        match x.rank() {
            0 => candle_core::bail!("a linear layer's input needs at least one dimension"),
            1 => return self.forward_act(&x.unsqueeze(0)?, relu)?.squeeze(0),
            _ => {}
        }
        let y = products::matmul_nt(x, &self.weight, self.precision)?;
        match &self.bias {
            Some(b) if relu && is_cpu_f32(&y) => fused::bias_relu(&y, b),
            Some(b) if relu => add_bias(&y, b)?.relu(),
            Some(b) => add_bias(&y, b),
            None if relu => y.relu(),
            None => Ok(y),
        }
    }

    /// `relu(x W^T + b)`.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// Inverted dropout with a seeded mask stream (identity in evaluation or when `p` is 0).
pub struct Dropout {
    p: f32,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    /// A dropout layer whose masks come from the stream of (`seed`, `vb` path + `name`); it has no
    /// variables, `vb` only names the stream.
    pub fn new(p: f32, seed: u64, name: &str, vb: &VarBuilder) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        let key = format!("dropout:{}.{name}", vb.prefix());
        Ok(Self {
            p,
            rng: Mutex::new(stream(seed, &key)),
        })
    }

    /// Whether `forward` changes anything in this mode.
    pub fn is_active(&self, train: bool) -> bool {
        train && self.p > 0.0
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !self.is_active(train) {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - self.p);
        // Compare 32-bit draws against an integer threshold: cheap even for large activations.
        let threshold = (f64::from(self.p) * f64::from(u32::MAX)) as u32;
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout stream lock poisoned".into()))?;
            (0..n)
                .map(|_| {
                    if rng.random::<u32>() >= threshold {
                        keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        if is_cpu_f32(x) {
            fused::mul_by_mask(x, &mask)
        } else {
            x.mul(&mask)
        }
    }
}

/// Layer normalisation over the last dimension, written from differentiable basic ops.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::init::ONE)?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::init::ZERO)?,
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if is_cpu_f32(x) {
            fused::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else {
            self.forward_basic(x)
        }
    }
}

impl LayerNorm {
    /// The same maths from basic differentiable ops (any device).
    fn forward_basic(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Rows of `x` scaled to unit L2 norm for trainable tensors (class weights, GAT and ML-Decoder
/// outputs): `x / sqrt(||x||^2 + 1e-12)`, the epsilon inside the root so that an all-zero row has
/// a finite gradient (the gradient of [`crate::tensor_ops::l2_normalize`]'s clamped norm is 0/0
/// there). In f32 both give the same value for any row with `||x||^2` above ~2e-5.
pub fn l2_normalize_smooth(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// LeakyReLU from two ReLUs (both have a backward op).
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    x.relu()? - (x.neg()?.relu()? * slope)?
}

/// The last layer of a head: a linear map with bias, or a cosine classifier.
///
/// The cosine classifier L2-normalises the features and each class weight and returns
/// cos(theta) in [-1, 1] (no bias): the input the angular-margin loss expects.
pub enum Classifier {
    Linear(Linear),
    Cosine {
        weight: Tensor,
        precision: Precision,
    },
}

impl Classifier {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        cosine: bool,
        precision: Precision,
        vb: VarBuilder,
    ) -> Result<Self> {
        if cosine {
            let weight = vb.get_with_hints(
                (out_dim, in_dim),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?;
            Ok(Self::Cosine { weight, precision })
        } else {
            Ok(Self::Linear(Linear::new(in_dim, out_dim, precision, vb)?))
        }
    }
}

impl Classifier {
    /// The bias added to the logits (none for a cosine classifier).
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Linear(linear) => linear.bias.as_ref(),
            Self::Cosine { .. } => None,
        }
    }

    /// The class weights `[out, in]` of a cosine classifier.
    pub fn cosine_weight(&self) -> Option<&Tensor> {
        match self {
            Self::Linear(_) => None,
            Self::Cosine { weight, .. } => Some(weight),
        }
    }
}

impl Module for Classifier {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(linear) => linear.forward(x),
            Self::Cosine { weight, precision } => {
                let cos = products::matmul_nt(
                    &l2_normalize_smooth(x)?,
                    &l2_normalize_smooth(weight)?,
                    *precision,
                )?;
                cos.clamp(-1f32, 1f32)
            }
        }
    }
}

/// Linear -> ReLU -> dropout -> classifier, or the classifier alone (a linear probe) when
/// `hidden` is 0, in the precision of `ctx` (whose seed draws the dropout masks). Variables:
/// `hidden.{weight,bias}` and `out.*`.
pub struct Mlp {
    hidden: Option<(Linear, Dropout)>,
    out: Classifier,
}

impl Mlp {
    pub fn new(
        in_dim: usize,
        hidden: usize,
        out_dim: usize,
        dropout: f32,
        cosine: bool,
        ctx: &HeadContext,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (hidden, out_in) = if hidden == 0 {
            (None, in_dim)
        } else {
            let linear = Linear::new(in_dim, hidden, ctx.precision, vb.pp("hidden"))?;
            let drop = Dropout::new(dropout, ctx.seed, "hidden", &vb)?;
            (Some((linear, drop)), hidden)
        };
        let out = Classifier::new(out_in, out_dim, cosine, ctx.precision, vb.pp("out"))?;
        Ok(Self { hidden, out })
    }

    /// The bias added to the logits (none for a cosine classifier).
    pub fn logit_bias(&self) -> Option<&Tensor> {
        self.out.bias()
    }

    /// Values one sample produces: the hidden layer (after ReLU and dropout) and the outputs.
    pub fn activation_values_per_row(&self) -> usize {
        let out = match &self.out {
            Classifier::Linear(linear) => linear.out_dim(),
            Classifier::Cosine { weight, .. } => weight.dims().first().copied().unwrap_or(0),
        };
        let hidden = self
            .hidden
            .as_ref()
            .map_or(0, |(linear, _)| linear.out_dim());
        2 * hidden + out
    }

    /// The class weights of a cosine linear probe (`hidden` 0), the only layer between the
    /// features and the cosines.
    pub fn probe_cosine_weight(&self) -> Option<&Tensor> {
        match self.hidden {
            None => self.out.cosine_weight(),
            Some(_) => None,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.hidden {
            Some((linear, drop)) => {
                let h = drop.forward(&linear.forward_relu(x)?, train)?;
                self.out.forward(&h)
            }
            None => self.out.forward(x),
        }
    }
}

/// A float tensor as f32 (a no-op when it already is).
pub fn as_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::init::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn layer_norm_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 1, &dev);
        let ln = LayerNorm::new(6, vb.pp("ln"))?;
        let x = Tensor::randn(0f32, 3.0, (4, 6), &dev)?;
        let ours = ln.forward(&x)?;
        let reference = candle_nn::LayerNorm::new(
            Tensor::ones(6, DType::F32, &dev)?,
            Tensor::zeros(6, DType::F32, &dev)?,
            1e-5,
        )
        .forward(&x)?;
        let diff = (ours.clone() - reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        let grads = (ours.sqr()?.sum_all()? + ours.sum_all()?)?.backward()?;
        for var in map.all_vars() {
            let g = grads.get(var.as_tensor()).expect("gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn fused_kernels_match_basic_ops_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 4, &dev);
        let mut ln = LayerNorm::new(7, vb.pp("ln"))?;
        ln.weight = (Tensor::randn(1f32, 0.5, 7, &dev)?).contiguous()?;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 50, 7), &dev)?)?;
        let b = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, 7, &dev)?)?;
        let w = candle_core::Var::from_tensor(&ln.weight)?;
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: ln.bias,
            eps: ln.eps,
        };
        let target = Tensor::randn(0f32, 1.0, (3, 50, 7), &dev)?;
        let check = |fast: Tensor, slow: Tensor, tracked: &[&candle_core::Var]| -> Result<()> {
            assert!(max_diff(&fast, &slow)? < 1e-5);
            let gf = (fast * &target)?.sum_all()?.backward()?;
            let gs = (slow * &target)?.sum_all()?.backward()?;
            for var in tracked {
                let (a, b) = (gf.get(var.as_tensor()), gs.get(var.as_tensor()));
                let diff = max_diff(a.expect("fused grad"), b.expect("basic grad"))?;
                assert!(diff < 1e-4, "gradient differs by {diff}");
            }
            Ok(())
        };
        check(ln.forward(&x)?, ln.forward_basic(&x)?, &[&x, &w])?;
        check(add_bias(&x, &b)?, x.broadcast_add(&b)?, &[&x, &b])?;
        check(
            fused::bias_relu(&x, &b)?,
            x.broadcast_add(&b)?.relu()?,
            &[&x, &b],
        )?;
        // A linear layer on an untracked input: only the weight's gradient is computed.
        let input = Tensor::randn(0f32, 1.0, (150, 7), &dev)?;
        let mut linear = Linear::without_bias(7, 7, Precision::F32, vb.pp("lin"))?;
        let lw = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 7), &dev)?)?;
        linear.weight = lw.as_tensor().clone();
        let reference = input.matmul(&lw.as_tensor().t()?)?;
        check(
            linear.forward(&input)?.reshape((3, 50, 7))?,
            reference.reshape((3, 50, 7))?,
            &[&lw],
        )?;
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
    }

    /// What a CUDA tensor meets, shown on the CPU: a tensor that is not CPU f32 (here f64, which
    /// every fused kernel refuses) goes through the same entry points to candle's generic ops, with
    /// the values and gradients of the fused f32 path.
    #[test]
    fn tensors_the_fused_kernels_refuse_take_the_generic_ops() -> Result<()> {
        let dev = Device::Cpu;
        let var = |t: Tensor| candle_core::Var::from_tensor(&t);
        let x = var(Tensor::randn(0f32, 2.0, (3, 50, 7), &dev)?)?;
        let w = var(Tensor::randn(0f32, 0.5, (7, 7), &dev)?)?;
        let b = var(Tensor::randn(0f32, 1.0, 7, &dev)?)?;
        let g = var(Tensor::randn(1f32, 0.3, 7, &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (3, 50, 7), &dev)?;
        // x -> relu(x W^T + b) -> layer norm (g, b), plus x + b: every dispatching layer.
        let run = |dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
            let vars = [&x, &w, &b, &g].map(|v| v.as_tensor().to_dtype(dtype).and_then(&var));
            let [x, w, b, g] = vars.map(|v| v.expect("variable"));
            let linear = Linear {
                weight: w.as_tensor().clone(),
                bias: Some(b.as_tensor().clone()),
                precision: Precision::F32,
            };
            let norm = LayerNorm {
                weight: g.as_tensor().clone(),
                bias: b.as_tensor().clone(),
                eps: 1e-5,
            };
            let y = (norm.forward(&linear.forward_relu(&x)?)? + add_bias(&x, &b)?)?;
            let loss = (&y * target.to_dtype(dtype)?)?.sum_all()?;
            let grads = loss.backward()?;
            let grads = [&x, &w, &b, &g]
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .expect("gradient")
                        .to_dtype(DType::F32)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((y.to_dtype(DType::F32)?, grads))
        };
        let (fused, fused_grads) = run(DType::F32)?;
        let (generic, generic_grads) = run(DType::F64)?;
        // f32 against f64: the error scales with the values' size (outputs up to ~10 from these
        // unseeded inputs, gradients up to ~30), so the bound is relative to it.
        let agree = |f: &Tensor, g: &Tensor, what: &str| -> Result<()> {
            let diff = max_diff(f, g)?;
            let scale = g.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5 * (1.0 + scale),
                "{what} differs by {diff} (scale {scale})"
            );
            Ok(())
        };
        agree(&fused, &generic, "output")?;
        for (f, g) in fused_grads.iter().zip(&generic_grads) {
            agree(f, g, "gradient")?;
        }
        Ok(())
    }

    #[test]
    fn dropout_is_seeded_scaled_and_off_in_eval() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 1, &dev);
        let x = Tensor::ones((100, 100), DType::F32, &dev)?;
        let a = Dropout::new(0.3, 5, "d", &vb)?.forward(&x, true)?;
        let b = Dropout::new(0.3, 5, "d", &vb)?.forward(&x, true)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        let kept = a
            .ne(0f32)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((kept - 0.7).abs() < 0.03, "kept {kept}");
        let mean = a.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        let eval = Dropout::new(0.3, 5, "d", &vb)?.forward(&x, false)?;
        assert_eq!(eval.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
        // The gradient of sum(w * dropout(x)) is w times the mask (the output for x = 1).
        let x = candle_core::Var::from_tensor(&x)?;
        let w = Tensor::randn(0f32, 1.0, (100, 100), &dev)?;
        let y = Dropout::new(0.3, 5, "d", &vb)?.forward(x.as_tensor(), true)?;
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let grad = grads.get(x.as_tensor()).expect("gradient of x");
        assert_eq!(grad.to_vec2::<f32>()?, (&w * &a)?.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn cosine_classifier_stays_in_unit_range() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 1, &dev);
        let cls = Classifier::new(8, 5, true, Precision::F32, vb)?;
        let x = (Tensor::randn(0f32, 1.0, (16, 8), &dev)? * 100.0)?;
        let y = cls.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(y.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(y.iter().any(|v| v.abs() > 0.2));
        Ok(())
    }
}
