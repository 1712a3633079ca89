//! Tensor maths shared by the frozen backbones and the trainable heads, at the bottom of the crate
//! so that both import it from here: L2 normalisation of rows as torch's `F.normalize` does it.

use candle_core::{D, Result, Tensor};

/// Rows (the last dimension) divided by their L2 norm, `x / max(||x||, 1e-12)`: torch's
/// `F.normalize(x, dim=-1)`, which BLIP's retrieval head and sentence-transformers' `Normalize`
/// apply. CLIP divides by the bare norm (`x / x.norm(dim=-1, keepdim=True)`), which is the same
/// number for every row with a norm above 1e-12 and NaN for an all-zero row, which stays zero
/// here.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_get_unit_norm_and_zero_rows_stay_zero() -> Result<()> {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu)?;
        assert_eq!(
            l2_normalize(&x)?.to_vec2::<f32>()?,
            vec![vec![0.6, 0.8], vec![0.0, 0.0]]
        );
        Ok(())
    }
}
