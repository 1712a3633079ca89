//! Training losses for multi-label heads, on candle tensors and differentiable through autograd.
//!
//! Every loss takes the head's raw output `[batch, labels]` and multi-hot targets of the same shape
//! (0/1 values; the smoothing loss makes them soft itself) and returns a scalar. All of them stay
//! finite, with finite gradients, for logits of +-100: no loss ever evaluates `exp` of a large
//! positive number or `log` of zero.
//!
//! - `bce`: binary cross-entropy with logits in the stable softplus form
//!   `max(z, 0) - z y + log(1 + e^{-|z|})`, mean over elements (candle-nn's helper is not stable).
//! - `smoothing`: BCE against `y (1 - e) + 0.5 e`.
//! - `focal` (Lin et al. 2017, binary form): `a_t (1 - p_t)^g l` with `l` the elementwise BCE,
//!   `p_t = e^{-l}`, `a_t = a y + (1 - a)(1 - y)`; mean.
//! - `margin`: the original system's "AAM", an additive margin on raw logits (CosFace-like, no
//!   angles): BCE of `s (z - m y)`.
//! - `angular`: a real additive angular margin (ArcFace). The head outputs cosines between
//!   L2-normalised features and class weights ([`Loss::needs_cosine_logits`]); every positive class
//!   gets `s cos(theta + m)`, every negative `s cos(theta)`, then BCE.
//! - `zlpr` (Su et al. 2022): per sample `log(1 + sum_pos e^{-z}) + log(1 + sum_neg e^{z})` by
//!   logsumexp, mean over the batch.
//! - `asl` (Ridnik et al. 2021): asymmetric focusing with probability shifting for negatives.
//!
//! Predictions must go through [`Loss::inference_logits`] (the angular loss trains on cosines, so
//! its logits are `s cos(theta)`); every other loss predicts from the raw output.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// A stand-in for minus infinity that keeps `exp` at exactly zero and every gradient finite.
const MASKED_LOGIT: f64 = -1.0e4;
/// Floor of `1 - cos^2` before the square root of the angular loss: bounds `d sin / d cos`.
const SIN_SQUARED_FLOOR: f64 = 1.0e-7;
/// Floor of the base of a focusing power `x^g`: keeps `g x^{g-1}` finite when `x` is zero.
const POWER_BASE_FLOOR: f64 = 1.0e-12;
/// Probability clamp of the ASL reference implementation (`eps=1e-8`).
const ASL_EPS: f64 = 1.0e-8;

/// A multi-label training loss with its hyper-parameters.
///
/// Serialised tagged by `kind`, e.g. `{"kind":"focal","alpha":0.25,"gamma":2.0}`; parsed from a
/// spec that names its parameters with the same names (`bce`, `smoothing:epsilon=0.1`,
/// `focal:alpha=0.25,gamma=2`, `margin:scale=30,margin=0.5`, `angular:scale=30,margin=0.5`, `zlpr`,
/// `asl:gamma_neg=4,gamma_pos=0,clip=0.05`), where omitted parameters take their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Loss {
    /// Binary cross-entropy with logits.
    Bce,
    /// BCE against targets smoothed towards 0.5 by `epsilon`.
    Smoothing { epsilon: f64 },
    /// Binary focal loss.
    Focal { alpha: f64, gamma: f64 },
    /// Additive margin on raw logits (the original's "AAM"): BCE of `scale (z - margin y)`.
    Margin { scale: f64, margin: f64 },
    /// Additive angular margin (ArcFace) on cosine outputs, angle margin in radians.
    Angular { scale: f64, margin: f64 },
    /// Zero-bounded log-sum-exp pairwise loss.
    Zlpr,
    /// Asymmetric loss: focusing powers for negatives and positives, probability shift `clip`.
    Asl {
        gamma_neg: f64,
        gamma_pos: f64,
        clip: f64,
    },
}

impl Default for Loss {
    /// Label smoothing with its default epsilon: the best loss averaged over every head on real
    /// data (docs/results.md).
    fn default() -> Self {
        Loss::SMOOTHING
    }
}

/// Why a loss specification was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossSpecError {
    #[error(
        "unknown loss '{0}': expected one of bce, smoothing, focal, margin, angular, zlpr, asl"
    )]
    UnknownKind(String),
    #[error("bad loss spec: {0}")]
    Syntax(String),
    #[error("loss '{kind}' has no parameter '{name}' (its parameters: {known})")]
    UnknownParameter {
        kind: &'static str,
        name: String,
        known: String,
    },
    #[error("loss parameter '{name}' is not a number: '{value}'")]
    NotANumber { name: String, value: String },
    #[error("loss '{kind}': {message}")]
    OutOfRange {
        kind: &'static str,
        message: &'static str,
    },
}

impl Loss {
    /// `smoothing` with its default epsilon.
    pub const SMOOTHING: Loss = Loss::Smoothing { epsilon: 0.1 };
    /// `focal` with the defaults of Lin et al.
    pub const FOCAL: Loss = Loss::Focal {
        alpha: 0.25,
        gamma: 2.0,
    };
    /// `margin` with the original system's scale and margin.
    pub const MARGIN: Loss = Loss::Margin {
        scale: 30.0,
        margin: 0.5,
    };
    /// `angular` with ArcFace's usual scale and margin.
    pub const ANGULAR: Loss = Loss::Angular {
        scale: 30.0,
        margin: 0.5,
    };
    /// `asl` with the defaults of Ridnik et al.
    pub const ASL: Loss = Loss::Asl {
        gamma_neg: 4.0,
        gamma_pos: 0.0,
        clip: 0.05,
    };

    /// The loss's kind, as written on the CLI and in checkpoint names.
    pub fn kind(&self) -> &'static str {
        match self {
            Loss::Bce => "bce",
            Loss::Smoothing { .. } => "smoothing",
            Loss::Focal { .. } => "focal",
            Loss::Margin { .. } => "margin",
            Loss::Angular { .. } => "angular",
            Loss::Zlpr => "zlpr",
            Loss::Asl { .. } => "asl",
        }
    }

    /// The hyper-parameters by name (their serialised field names), in a fixed order.
    pub fn parameters(&self) -> Vec<(&'static str, f64)> {
        let mut copy = *self;
        copy.parameters_mut()
            .into_iter()
            .map(|(name, value)| (name, *value))
            .collect()
    }

    fn parameters_mut(&mut self) -> Vec<(&'static str, &mut f64)> {
        match self {
            Loss::Bce | Loss::Zlpr => vec![],
            Loss::Smoothing { epsilon } => vec![("epsilon", epsilon)],
            Loss::Focal { alpha, gamma } => vec![("alpha", alpha), ("gamma", gamma)],
            Loss::Margin { scale, margin } | Loss::Angular { scale, margin } => {
                vec![("scale", scale), ("margin", margin)]
            }
            Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            } => vec![
                ("gamma_neg", gamma_neg),
                ("gamma_pos", gamma_pos),
                ("clip", clip),
            ],
        }
    }

    fn is_default_of_its_kind(&self) -> bool {
        Loss::default_of_kind(self.kind()).is_ok_and(|d| d == *self)
    }

    /// The short name used in checkpoint names: the kind alone with default hyper-parameters,
    /// `kind-p1-p2` (in the order of [`Loss::parameters`]) otherwise; file-name safe.
    pub fn short_name(&self) -> String {
        let mut name = self.kind().to_string();
        if !self.is_default_of_its_kind() {
            for (_, value) in self.parameters() {
                name.push_str(&format!("-{value}"));
            }
        }
        name
    }

    /// The same kind with its default hyper-parameters.
    fn default_of_kind(kind: &str) -> std::result::Result<Loss, LossSpecError> {
        Ok(match kind {
            "bce" => Loss::Bce,
            "smoothing" => Loss::SMOOTHING,
            "focal" => Loss::FOCAL,
            "margin" => Loss::MARGIN,
            "angular" => Loss::ANGULAR,
            "zlpr" => Loss::Zlpr,
            "asl" => Loss::ASL,
            other => return Err(LossSpecError::UnknownKind(other.to_string())),
        })
    }

    /// Checks the hyper-parameters' ranges (NaN and infinities are rejected too).
    pub fn validate(&self) -> std::result::Result<(), LossSpecError> {
        let non_negative = |x: f64| (0.0..f64::INFINITY).contains(&x);
        let positive = |x: f64| x > 0.0 && x.is_finite();
        let (valid, message) = match *self {
            Loss::Bce | Loss::Zlpr => (true, ""),
            Loss::Smoothing { epsilon } => {
                // epsilon = 1 makes every target 0.5: nothing left to learn.
                ((0.0..1.0).contains(&epsilon), "epsilon must be in [0, 1)")
            }
            Loss::Focal { alpha, gamma } => (
                (0.0..=1.0).contains(&alpha) && non_negative(gamma),
                "alpha must be in [0, 1] and gamma >= 0",
            ),
            Loss::Margin { scale, margin } => (
                positive(scale) && non_negative(margin),
                "scale must be > 0 and margin >= 0",
            ),
            Loss::Angular { scale, margin } => (
                positive(scale) && (0.0..PI / 2.0).contains(&margin),
                "scale must be > 0 and margin (radians) in [0, pi/2)",
            ),
            Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            } => (
                non_negative(gamma_neg) && non_negative(gamma_pos) && (0.0..1.0).contains(&clip),
                "gammas must be >= 0 and clip in [0, 1)",
            ),
        };
        if valid {
            Ok(())
        } else {
            Err(LossSpecError::OutOfRange {
                kind: self.kind(),
                message,
            })
        }
    }

    /// True when the head must output cosines in [-1, 1] (L2-normalised features and class
    /// weights) instead of free logits.
    pub fn needs_cosine_logits(&self) -> bool {
        matches!(self, Loss::Angular { .. })
    }

    /// The logits to predict from (apply a sigmoid for probabilities): `s cos(theta)` for the
    /// angular loss, the head output itself otherwise.
    pub fn inference_logits(&self, head_output: &Tensor) -> Result<Tensor> {
        match *self {
            Loss::Angular { scale, .. } => head_output.affine(scale, 0.0),
            _ => Ok(head_output.clone()),
        }
    }

    /// Probabilities for prediction and metrics: the sigmoid of [`Loss::inference_logits`].
    pub fn probabilities(&self, head_output: &Tensor) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.inference_logits(head_output)?)
    }

    /// The loss of `head_output` (`[batch, labels]`) against multi-hot `targets` of the same shape,
    /// as a scalar tensor of the output's dtype.
    pub fn compute(&self, head_output: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if head_output.shape() != targets.shape() {
            candle_core::bail!(
                "loss {}: head output has shape {:?} but targets have shape {:?}",
                self.kind(),
                head_output.dims(),
                targets.dims()
            );
        }
        let z = head_output;
        let y = &targets.to_dtype(z.dtype())?;
        match *self {
            Loss::Bce => bce_elementwise(z, y)?.mean_all(),
            Loss::Smoothing { epsilon } => {
                let soft = y.affine(1.0 - epsilon, 0.5 * epsilon)?;
                bce_elementwise(z, &soft)?.mean_all()
            }
            Loss::Focal { alpha, gamma } => focal(z, y, alpha, gamma),
            Loss::Margin { scale, margin } => {
                let shifted = ((z - (y * margin)?)? * scale)?;
                bce_elementwise(&shifted, y)?.mean_all()
            }
            Loss::Angular { scale, margin } => angular(z, y, scale, margin),
            Loss::Zlpr => zlpr(z, y),
            Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            } => asl(z, y, gamma_neg, gamma_pos, clip),
        }
    }
}

/// `log(1 + e^z)` without overflow: `max(z, 0) + log(1 + e^{-|z|})`.
///
/// candle's backward gives `relu'(0) = 1` and `abs'(0) = 1`, so the gradient at 0 is exactly 0.5.
fn softplus(z: &Tensor) -> Result<Tensor> {
    let tail = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    z.relu()? + tail
}

/// Elementwise BCE with logits: `softplus(z) - z y`.
fn bce_elementwise(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    softplus(z)? - (z * y)?
}

/// `x^gamma` for `x` in [0, 1], with a finite gradient at `x = 0` and `x^0 = 1` exactly.
fn focusing_power(x: &Tensor, gamma: f64) -> Result<Option<Tensor>> {
    if gamma == 0.0 {
        return Ok(None);
    }
    x.maximum(POWER_BASE_FLOOR)?.powf(gamma).map(Some)
}

fn focal(z: &Tensor, y: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let bce = bce_elementwise(z, y)?;
    // a_t = a y + (1 - a)(1 - y) = (2a - 1) y + (1 - a)
    let alpha_t = y.affine(2.0 * alpha - 1.0, 1.0 - alpha)?;
    let weighted = (alpha_t * &bce)?;
    // 1 - p_t = 1 - e^{-l}
    let miss = (bce.neg()?.exp()?.neg()? + 1.0)?;
    match focusing_power(&miss, gamma)? {
        Some(factor) => (weighted * factor)?.mean_all(),
        None => weighted.mean_all(),
    }
}

/// ArcFace's logits: `s cos(theta + m)` on positives, `s cos(theta)` on negatives, then BCE.
///
/// `cos(theta + m) = cos cos(m) - sin sin(m)` with `sin = sqrt(max(1 - cos^2, 1e-7))`. Past
/// `theta > pi - m`, `cos(theta + m)` would grow again as theta grows (rewarding a worse angle), so
/// there the positive logit continues as `cos(theta) - m sin(m)` (insightface's fallback), which is
/// continuous at the switch and decreasing in theta.
fn angular(cos: &Tensor, y: &Tensor, scale: f64, margin: f64) -> Result<Tensor> {
    let cos = cos.clamp(-1.0, 1.0)?;
    let sin = (cos.sqr()?.neg()? + 1.0)?
        .maximum(SIN_SQUARED_FLOOR)?
        .sqrt()?;
    let cos_plus_margin = (cos.affine(margin.cos(), 0.0)? - sin.affine(margin.sin(), 0.0)?)?;
    let fallback = cos.affine(1.0, -margin * margin.sin())?;
    let positive = cos
        .gt((PI - margin).cos())?
        .where_cond(&cos_plus_margin, &fallback)?;
    // y positive + (1 - y) cos, exact for 0/1 targets.
    let logits = ((y * positive)? + ((y.affine(-1.0, 1.0))? * &cos)?)?;
    bce_elementwise(&logits.affine(scale, 0.0)?, y)?.mean_all()
}

/// `log(1 + sum_j e^{a_j})` per row, i.e. logsumexp over the row with a zero appended.
/// The max is detached: the gradient of logsumexp does not depend on the shift.
fn log_one_plus_sum_exp(a: &Tensor) -> Result<Tensor> {
    let zero = Tensor::zeros((a.dim(0)?, 1), a.dtype(), a.device())?;
    let a = Tensor::cat(&[a, &zero], 1)?;
    let shift = a.max_keepdim(1)?.detach();
    let sum = a.broadcast_sub(&shift)?.exp()?.sum_keepdim(1)?;
    sum.log()? + shift
}

fn zlpr(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    // Positives contribute -z, negatives are masked out by a large negative constant (and vice
    // versa); multiplying by the 0/1 mask keeps the masked entries' gradients exactly zero.
    let negatives = y.affine(-1.0, 1.0)?;
    let pos_terms = ((z.neg()? * y)? + negatives.affine(MASKED_LOGIT, 0.0)?)?;
    let neg_terms = ((z * &negatives)? + y.affine(MASKED_LOGIT, 0.0)?)?;
    (log_one_plus_sum_exp(&pos_terms)? + log_one_plus_sum_exp(&neg_terms)?)?.mean_all()
}

/// ASL as in the authors' `AsymmetricLoss`, with the focusing weights differentiated (their
/// default) and the probability clamp `eps = 1e-8`:
/// positives `-(1 - p)^{g+} log(max(p, eps))`, negatives `-p_m^{g-} log(max(1 - p_m, eps))` with the
/// shifted probability `p_m = max(p - clip, 0)`.
///
/// Reduction: mean over elements, where the reference sums over elements. The sum is the mean times
/// `batch * labels`, a constant factor that only rescales the gradient; the mean keeps the loss on
/// the same scale as BCE and focal, so one learning rate and one weight decay work for all losses and
/// the value does not change with the batch size.
fn asl(z: &Tensor, y: &Tensor, gamma_neg: f64, gamma_pos: f64, clip: f64) -> Result<Tensor> {
    let log_eps = ASL_EPS.ln();
    // log p = -softplus(-z), log(1 - p) = -softplus(z): exact and finite where log(sigmoid) is not.
    let log_p_exact = softplus(&z.neg()?)?.neg()?;
    let p = log_p_exact.exp()?;
    let log_p = log_p_exact.maximum(log_eps)?;
    let positive_loss = match focusing_power(&(p.affine(-1.0, 1.0))?, gamma_pos)? {
        Some(weight) => (weight * log_p)?,
        None => log_p,
    };
    let log_not_shifted = if clip > 0.0 {
        // 1 - p_m = min(1 - p + clip, 1) >= clip > eps.
        (p.affine(-1.0, 1.0 + clip))?.minimum(1.0)?.log()?
    } else {
        softplus(z)?.neg()?.maximum(log_eps)?
    };
    let shifted_p = (p - clip)?.maximum(0.0)?;
    let negative_loss = match focusing_power(&shifted_p, gamma_neg)? {
        Some(weight) => (weight * log_not_shifted)?,
        None => log_not_shifted,
    };
    let negatives = y.affine(-1.0, 1.0)?;
    ((y * positive_loss)? + (negatives * negative_loss)?)?
        .neg()?
        .mean_all()
}

impl fmt::Display for Loss {
    /// The spec form (the grammar of [`crate::spec`], parsed back by [`FromStr`]): the kind alone
    /// with default hyper-parameters, else `kind:name=value,...` with every parameter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())?;
        if !self.is_default_of_its_kind() {
            for (i, (name, value)) in self.parameters().into_iter().enumerate() {
                write!(f, "{}{name}={value}", if i == 0 { ':' } else { ',' })?;
            }
        }
        Ok(())
    }
}

impl FromStr for Loss {
    type Err = LossSpecError;

    /// Parses `kind[:name=value,...]` (the grammar of [`crate::spec`]), e.g. `focal`,
    /// `focal:gamma=3`, `asl:gamma_neg=2,clip=0`; parameters not given keep their defaults.
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let spec =
            crate::spec::Spec::parse(text).map_err(|e| LossSpecError::Syntax(format!("{e:#}")))?;
        let mut loss = Loss::default_of_kind(&spec.name)?;
        let kind = loss.kind();
        let known = loss.parameters();
        for (name, items) in spec.options.iter() {
            let value = items.join("+");
            let mut parameters = loss.parameters_mut();
            let Some((_, slot)) = parameters.iter_mut().find(|(n, _)| *n == name) else {
                let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
                return Err(LossSpecError::UnknownParameter {
                    kind,
                    name: name.to_string(),
                    known: if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    },
                });
            };
            **slot = value.parse().map_err(|_| LossSpecError::NotANumber {
                name: name.to_string(),
                value: value.clone(),
            })?;
        }
        loss.validate()?;
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    const EVERY_KIND: [&str; 7] = [
        "bce",
        "smoothing",
        "focal",
        "margin",
        "angular",
        "zlpr",
        "asl",
    ];

    fn matrix(rows: &[&[f64]], dtype: DType) -> Tensor {
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("test matrix")
    }

    fn value(loss: Loss, z: &Tensor, y: &Tensor) -> f64 {
        let out = loss.compute(z, y).expect("loss");
        assert_eq!(out.dims(), &[] as &[usize], "{loss} must be a scalar");
        out.to_dtype(DType::F64)
            .and_then(|t| t.to_vec0())
            .expect("scalar")
    }

    fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: got {actual}, expected {expected}"
        );
    }

    // Shared tiny input for the logit losses. softplus(x) = ln(1 + e^x):
    // softplus(-1) = 0.313262, softplus(1) = 1.313262, softplus(0.5) = 0.974077,
    // softplus(-0.5) = 0.474077, softplus(0) = ln 2 = 0.693147, softplus(3) = 3.048587.
    fn tiny() -> (Tensor, Tensor) {
        let z = matrix(&[&[1.0, -1.0, 0.5], &[0.5, -0.5, 0.0]], DType::F32);
        let y = matrix(&[&[1.0, 1.0, 0.0], &[0.0, 0.0, 0.0]], DType::F32);
        (z, y)
    }

    #[test]
    fn bce_matches_hand_computation() {
        // BCE = softplus(z) - z y = softplus(-z) for y = 1, softplus(z) for y = 0:
        // 0.313262 + 1.313262 + 0.974077 + 0.974077 + 0.474077 + 0.693147 = 4.741902; / 6.
        let (z, y) = tiny();
        assert_close(value(Loss::Bce, &z, &y), 0.790317, 1e-5, "bce");
    }

    #[test]
    fn smoothing_matches_hand_computation() {
        // e = 0.1: y' = 0.95 / 0.05. softplus(z) - z y':
        // 1.313262 - 0.95 = 0.363262; 0.313262 + 0.95 = 1.263262; 0.974077 - 0.025 = 0.949077 (x2);
        // 0.474077 + 0.025 = 0.499077; 0.693147. Sum 4.716902; / 6.
        let (z, y) = tiny();
        assert_close(value(Loss::SMOOTHING, &z, &y), 0.786150, 1e-5, "smoothing");
    }

    #[test]
    fn focal_matches_hand_computation() {
        // a_t = 0.25 (pos) / 0.75 (neg); p_t = e^{-l}; term = a_t (1 - p_t)^2 l:
        // l = 0.313262: p_t = 0.731059, 0.268941^2 = 0.072329, * 0.25 * l = 0.005665
        // l = 1.313262: p_t = 0.268941, 0.731059^2 = 0.534447, * 0.25 * l = 0.175464
        // l = 0.974077: p_t = 0.377541, 0.622459^2 = 0.387455, * 0.75 * l = 0.283057 (x2)
        // l = 0.474077: p_t = 0.622459, 0.377541^2 = 0.142537, * 0.75 * l = 0.050680
        // l = 0.693147: p_t = 0.5, 0.25 * 0.75 * l = 0.129965
        // Sum 0.927888; / 6.
        let (z, y) = tiny();
        assert_close(value(Loss::FOCAL, &z, &y), 0.154648, 1e-5, "focal");
    }

    #[test]
    fn margin_matches_hand_computation() {
        // s = 2, m = 0.5: s (z - m y) = [[1, -3, 1], [1, -1, 0]]; BCE of those against y:
        // softplus(-1) + softplus(3) + softplus(1) + softplus(1) + softplus(-1) + softplus(0)
        // = 0.313262 + 3.048587 + 1.313262 + 1.313262 + 0.313262 + 0.693147 = 6.994782; / 6.
        let (z, y) = tiny();
        let loss = Loss::Margin {
            scale: 2.0,
            margin: 0.5,
        };
        assert_close(value(loss, &z, &y), 1.165797, 1e-5, "margin");
    }

    #[test]
    fn zlpr_matches_hand_computation() {
        // Row 1, positives z = 1, -1, negative 0.5:
        //   ln(1 + e^-1 + e^1) + ln(1 + e^0.5) = ln(4.086161) + ln(2.648721) = 1.407606 + 0.974077
        // Row 2, no positives: ln(1) + ln(1 + e^0.5 + e^-0.5 + e^0) = 0 + ln(4.255252) = 1.448152
        // Mean over rows: (2.381683 + 1.448152) / 2.
        let (z, y) = tiny();
        assert_close(value(Loss::Zlpr, &z, &y), 1.914918, 1e-5, "zlpr");
    }

    #[test]
    fn asl_matches_hand_computation() {
        // gamma_pos = 0: positives give -ln sigmoid(z): 0.313262 + 1.313262.
        // Negatives: p = sigmoid(z), p_m = p - 0.05, term = -p_m^4 ln(1 - p_m):
        //   z = 0.5: p_m = 0.572459, 0.107392 * -ln(0.427541) = 0.107392 * 0.849786 = 0.091262 (x2)
        //   z = -0.5: p_m = 0.327541, 0.011510 * -ln(0.672459) = 0.011510 * 0.396878 = 0.004568
        //   z = 0: p_m = 0.45, 0.041006 * -ln(0.55) = 0.041006 * 0.597837 = 0.024515
        // Sum 1.838131; / 6 (mean over elements). The authors' reference code gives 6x this.
        let (z, y) = tiny();
        assert_close(value(Loss::ASL, &z, &y), 0.306352, 1e-5, "asl");
    }

    #[test]
    fn angular_matches_hand_computation() {
        // s = 2, m = 0.5: cos m = 0.877583, sin m = 0.479426; pi - m = 2.641593.
        // Positive cos 0.8: sin = 0.6, cos(theta + m) = 0.702066 - 0.287655 = 0.414411,
        //   logit 0.828822, BCE softplus(-0.828822) = 0.362257.
        // Positive cos -0.9: theta = 2.690566 > pi - m, fallback -0.9 - 0.5 * 0.479426 = -1.139713,
        //   logit -2.279426, BCE softplus(2.279426) = 2.376842.
        // Negatives cos -0.2, 0.1, 0.3, 0: logits -0.4, 0.2, 0.6, 0, BCE softplus of those
        //   = 0.513015 + 0.798139 + 1.037488 + 0.693147.
        // Sum 5.780888; / 6.
        let z = matrix(&[&[0.8, -0.2, 0.1], &[0.3, -0.9, 0.0]], DType::F32);
        let y = matrix(&[&[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0]], DType::F32);
        let loss = Loss::Angular {
            scale: 2.0,
            margin: 0.5,
        };
        assert_close(value(loss, &z, &y), 0.963481, 1e-5, "angular");
    }

    /// Head outputs for the gradient checks, extreme values included. Cosines near +-1 for the
    /// angular loss; logits at +-100 for the others. Kinks (ASL's clamp near z = -18.4, the angular
    /// fallback switch at cos = -0.8776) are kept away from the finite-difference steps.
    fn gradient_case(loss: Loss) -> (Tensor, Tensor) {
        let y = matrix(
            &[
                &[1.0, 0.0, 1.0, 0.0],
                &[0.0, 1.0, 1.0, 0.0],
                &[1.0, 1.0, 0.0, 0.0],
            ],
            DType::F64,
        );
        let z = if loss.needs_cosine_logits() {
            matrix(
                &[
                    &[0.9999, -0.9999, 0.3, -0.5],
                    &[0.99, -0.95, -0.9999, 0.9999],
                    &[-0.2, 0.6, 0.0, 0.95],
                ],
                DType::F64,
            )
        } else {
            matrix(
                &[
                    &[100.0, -100.0, 0.3, -2.0],
                    &[-100.0, 100.0, -100.0, 100.0],
                    &[1.5, -0.7, 0.0, 4.0],
                ],
                DType::F64,
            )
        };
        (z, y)
    }

    #[test]
    fn gradients_match_central_differences() {
        let step = 1e-6;
        for kind in EVERY_KIND {
            let loss: Loss = kind.parse().expect("kind");
            let (z, y) = gradient_case(loss);
            let var = Var::from_tensor(&z).expect("var");
            let grads = loss
                .compute(var.as_tensor(), &y)
                .and_then(|l| l.backward())
                .expect("backward");
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .expect("gradient recorded")
                .flatten_all()
                .and_then(|g| g.to_vec1())
                .expect("gradient values");
            let base: Vec<f64> = z.flatten_all().and_then(|t| t.to_vec1()).expect("z");
            for (i, &g) in analytic.iter().enumerate() {
                let at = |delta: f64| {
                    let mut shifted = base.clone();
                    shifted[i] += delta;
                    let t = Tensor::from_vec(shifted, z.shape(), &Device::Cpu).expect("z");
                    value(loss, &t, &y)
                };
                let numeric = (at(step) - at(-step)) / (2.0 * step);
                assert!(
                    (g - numeric).abs() <= 1e-6 + 1e-4 * numeric.abs(),
                    "{kind}: d/dz[{i}] (z = {}) autograd {g} vs central difference {numeric}",
                    base[i]
                );
            }
        }
    }

    #[test]
    fn values_and_gradients_stay_finite_at_extremes() {
        for kind in EVERY_KIND {
            let loss: Loss = kind.parse().expect("kind");
            let extreme = if loss.needs_cosine_logits() {
                1.0
            } else {
                100.0
            };
            let z = matrix(
                &[
                    &[extreme, -extreme, extreme],
                    &[-extreme, extreme, -extreme],
                ],
                DType::F32,
            );
            for y in [
                matrix(&[&[1.0, 1.0, 0.0], &[0.0, 0.0, 1.0]], DType::F32),
                matrix(&[&[0.0, 0.0, 0.0], &[1.0, 1.0, 1.0]], DType::F32),
            ] {
                let var = Var::from_tensor(&z).expect("var");
                let out = loss.compute(var.as_tensor(), &y).expect("loss");
                let v: f32 = out.to_vec0().expect("scalar");
                assert!(v.is_finite() && v >= 0.0, "{kind}: loss {v}");
                let grads = out.backward().expect("backward");
                let g: Vec<f32> = grads
                    .get(var.as_tensor())
                    .expect("gradient recorded")
                    .flatten_all()
                    .and_then(|g| g.to_vec1())
                    .expect("gradient values");
                assert!(g.iter().all(|x| x.is_finite()), "{kind}: gradient {g:?}");
            }
        }
    }

    #[test]
    fn confident_right_answers_cost_almost_nothing() {
        let z = matrix(&[&[100.0, -100.0]], DType::F32);
        let y = matrix(&[&[1.0, 0.0]], DType::F32);
        for loss in [Loss::Bce, Loss::FOCAL, Loss::MARGIN, Loss::Zlpr, Loss::ASL] {
            assert!(value(loss, &z, &y) < 1e-6, "{loss}");
        }
        // A wrong answer at 100 costs 100 per element under BCE: (100 + 100) / 2.
        let wrong = matrix(&[&[0.0, 1.0]], DType::F32);
        assert_close(value(Loss::Bce, &z, &wrong), 100.0, 1e-4, "bce wrong");
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let z = matrix(&[&[1.0, 2.0]], DType::F32);
        let y = matrix(&[&[1.0], &[0.0]], DType::F32);
        let err = Loss::Bce.compute(&z, &y).expect_err("mismatch");
        assert!(err.to_string().contains("shape"), "{err}");
    }

    #[test]
    fn cosine_outputs_only_for_angular() {
        for kind in EVERY_KIND {
            let loss: Loss = kind.parse().expect("kind");
            assert_eq!(loss.needs_cosine_logits(), kind == "angular");
            let z = matrix(&[&[0.5, -0.25]], DType::F32);
            let logits: Vec<f32> = loss
                .inference_logits(&z)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("logits");
            let expected = if kind == "angular" {
                [15.0, -7.5]
            } else {
                [0.5, -0.25]
            };
            assert_eq!(logits, expected, "{kind}");
            let probabilities: Vec<f32> = loss
                .probabilities(&z)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("probabilities");
            for (p, l) in probabilities.iter().zip(expected) {
                assert!(
                    (p - 1.0 / (1.0 + (-l).exp())).abs() < 1e-6,
                    "{kind}: {p} for {l}"
                );
            }
        }
    }

    #[test]
    fn parses_cli_specs() {
        let cases = [
            ("bce", Loss::Bce),
            ("BCE", Loss::Bce),
            ("smoothing", Loss::SMOOTHING),
            ("smoothing:epsilon=0.2", Loss::Smoothing { epsilon: 0.2 }),
            ("smoothing:epsilon=1e-3", Loss::Smoothing { epsilon: 0.001 }),
            ("focal", Loss::FOCAL),
            (
                "focal:alpha=0.5,gamma=3",
                Loss::Focal {
                    alpha: 0.5,
                    gamma: 3.0,
                },
            ),
            (
                "focal:gamma=3",
                Loss::Focal {
                    alpha: 0.25,
                    gamma: 3.0,
                },
            ),
            ("margin:scale=30,margin=0.5", Loss::MARGIN),
            (
                "angular:margin=0.3,scale=64",
                Loss::Angular {
                    scale: 64.0,
                    margin: 0.3,
                },
            ),
            ("zlpr", Loss::Zlpr),
            ("asl", Loss::ASL),
            (
                "asl:gamma_neg=2, gamma_pos=1, clip=0",
                Loss::Asl {
                    gamma_neg: 2.0,
                    gamma_pos: 1.0,
                    clip: 0.0,
                },
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(spec.parse::<Loss>(), Ok(expected), "{spec}");
        }
        for bad in [
            "hinge",
            "focal:0.25",
            "focal:0.25,2",
            "focal:beta=1",
            "zlpr:x=1",
            "focal:alpha=x",
            "focal:alpha=0.25,alpha=0.5",
            "focal-0.25-2",
            "smoothing:epsilon=1.5",
            "smoothing:epsilon=1",
            "smoothing:epsilon=NaN",
            "focal:gamma=-1",
            "focal:gamma=inf",
            "focal:alpha=NaN",
            "margin:margin=NaN",
            "angular:scale=inf",
            "angular:margin=2",
            "asl:clip=1",
            "margin:scale=0",
        ] {
            assert!(bad.parse::<Loss>().is_err(), "{bad} should be rejected");
        }
        let err = "focal:beta=1".parse::<Loss>().unwrap_err().to_string();
        assert!(err.contains("alpha, gamma"), "{err}");
    }

    #[test]
    fn short_names_are_file_name_safe_and_display_parses_back() {
        assert_eq!(Loss::Bce.short_name(), "bce");
        assert_eq!(Loss::FOCAL.short_name(), "focal");
        assert_eq!(Loss::ASL.short_name(), "asl");
        let custom = Loss::Focal {
            alpha: 0.5,
            gamma: 3.0,
        };
        assert_eq!(custom.short_name(), "focal-0.5-3");
        assert_eq!(custom.to_string(), "focal:alpha=0.5,gamma=3");
        assert_eq!(Loss::FOCAL.to_string(), "focal");
        let losses = [
            custom,
            Loss::Smoothing { epsilon: 0.05 },
            Loss::Angular {
                scale: 16.0,
                margin: 0.25,
            },
            Loss::Asl {
                gamma_neg: 2.0,
                gamma_pos: 1.0,
                clip: 0.0,
            },
        ];
        for loss in losses {
            let name = loss.short_name();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
            );
            assert_eq!(loss.to_string().parse::<Loss>(), Ok(loss), "{loss}");
        }
    }

    #[test]
    fn parameter_names_are_the_serialised_field_names() {
        for kind in EVERY_KIND {
            let loss: Loss = kind.parse().expect("kind");
            let json = serde_json::to_value(loss).expect("write");
            let mut fields: Vec<&str> = json
                .as_object()
                .expect("an object")
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "kind")
                .collect();
            let mut names: Vec<&str> = loss.parameters().iter().map(|(n, _)| *n).collect();
            fields.sort_unstable();
            names.sort_unstable();
            assert_eq!(fields, names, "{kind}");
        }
    }

    #[test]
    fn serde_is_tagged_by_kind() {
        let json = r#"{"kind":"focal","alpha":0.25,"gamma":2.0}"#;
        let loss: Loss = serde_json::from_str(json).expect("parse");
        assert_eq!(loss, Loss::FOCAL);
        assert_eq!(serde_json::to_string(&loss).expect("write"), json);
        assert_eq!(
            serde_json::to_string(&Loss::Zlpr).expect("write"),
            r#"{"kind":"zlpr"}"#
        );
        for kind in EVERY_KIND {
            let loss: Loss = kind.parse().expect("kind");
            let back: Loss =
                serde_json::from_str(&serde_json::to_string(&loss).expect("write")).expect("read");
            assert_eq!(back, loss);
        }
    }
}
