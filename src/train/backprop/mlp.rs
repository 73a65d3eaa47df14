//! The MLP block: `x + down(silu(gate(h)) * up(h))` with `h = RMSNorm(x)`, forward and
//! backward (the SiLU-gate product and its backward are fused kernels, [`super::ops`]).

use candle_core::Tensor;

use super::linear::{need, LinTape, Proj};
use super::norm::{rms_backward, rms_forward};
use super::{ops, Grads, Result};
use crate::model::llama::Layer;

/// What the MLP forward keeps for its backward.
pub(super) struct Tape {
    xn2: Tensor,
    inv2: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    gate: LinTape,
    up: LinTape,
    down: LinTape,
}

/// The block's output (to add to the residual stream `x`) and its tape. `p` holds the
/// layer's gate, up and down projections.
pub(super) fn forward(
    layer: &Layer,
    p: &[Proj<'_>],
    x: &Tensor,
    eps: f64,
    keep: bool,
) -> Result<(Tensor, Tape)> {
    let [gate, up, down] = p else {
        candle_core::bail!("the MLP block takes three projections")
    };
    let (h2, xn2, inv2) = rms_forward(x, &layer.ffn_norm, eps)?;
    let (g, tg) = gate.forward(&h2, keep)?;
    let (u, tu) = up.forward(&h2, keep)?;
    let act = ops::silu_mul(&g, &u)?;
    let (d, td) = down.forward(&act, keep)?;
    Ok((
        d,
        Tape {
            xn2,
            inv2,
            h2,
            g,
            u,
            gate: tg,
            up: tu,
            down: td,
        },
    ))
}

/// Backward from `dx` (the residual stream's gradient after the block): the gradient before
/// it, with the adapters' gradients added to `grads`.
pub(super) fn backward(
    layer: &Layer,
    p: &[Proj<'_>],
    tp: &Tape,
    dx: &Tensor,
    grads: &mut Grads,
) -> Result<Tensor> {
    let [gate, up, down] = p else {
        candle_core::bail!("the MLP block takes three projections")
    };
    let act = ops::silu_mul(&tp.g, &tp.u)?;
    let dact = need(down.backward(&tp.down, &act, dx, grads, true)?)?;
    drop(act);
    let (dg, du) = ops::silu_mul_backward(&tp.g, &tp.u, &dact)?;
    let dh2 = (need(gate.backward(&tp.gate, &tp.h2, &dg, grads, true)?)?
        + need(up.backward(&tp.up, &tp.h2, &du, grads, true)?)?)?;
    dx + rms_backward(&tp.xn2, &tp.inv2, &layer.ffn_norm, &dh2)?
}
