//! RMSNorm, forward keeping what its backward needs (Candle's fused `rms_norm` has none).

use candle_core::{Tensor, D};

use super::Result;

/// RMSNorm forward: `(y, x / rms, 1 / rms)`.
pub(super) fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xn = x.broadcast_mul(&inv)?;
    let y = xn.broadcast_mul(w)?;
    Ok((y, xn, inv))
}

/// `dx = inv * (g - xn * mean(g * xn))` with `g = dy * w`.
pub(super) fn rms_backward(xn: &Tensor, inv: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let g = dy.broadcast_mul(w)?;
    let dot = (&g * xn)?.mean_keepdim(D::Minus1)?;
    (g - xn.broadcast_mul(&dot)?)?.broadcast_mul(inv)
}
