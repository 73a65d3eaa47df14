//! The attention block: `x + o(attn(rope(q(h)), rope(k(h)), v(h)))` with `h = RMSNorm(x)`,
//! causal, grouped-query. On f32 CPU tensors the products run on the kernel crate's causal
//! kernels (forward and backward skip the half above the diagonal); elsewhere (CUDA, f64
//! gradient checks) on Candle ops. RoPE's backward is the inverse rotation: the same kernel
//! with `-sin`.

use candle_core::Tensor;
use emlab_kernels::attn_train;

use super::linear::{host_f32, need, with_f32, LinTape, Proj};
use super::norm::{rms_backward, rms_forward};
use super::{ops, Grads, Result};
use crate::model::llama::{Layer, RopeLayout};
use crate::util::prof::{self, Phase};

/// Sizes of one pass and the RoPE tables for its positions.
pub(super) struct Dims {
    pub bsz: usize,
    pub t: usize,
    /// `bsz * t`.
    pub n: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub shape: attn_train::Shape,
    pub cos: Tensor,
    pub sin: Tensor,
    pub rope: RopeLayout,
    pub eps: f64,
}

impl Dims {
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// What the attention forward keeps for its backward.
pub(super) struct Tape {
    xn1: Tensor,
    inv1: Tensor,
    h1: Tensor,
    q: LinTape,
    k: LinTape,
    v: LinTape,
    /// Post-RoPE queries folded as `[b, kv, rep*t, hd]`, keys `[b, kv, t, hd]`, values.
    qf: Tensor,
    kr: Tensor,
    vr: Tensor,
    probs: Tensor,
    attn: Tensor,
    o: LinTape,
}

fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    match layout {
        RopeLayout::Half => candle_nn::rotary_emb::rope(x, cos, sin),
        RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
    }
}

/// Causal attention from post-RoPE queries `[b, kv, rep·t, hd]` (the `rep` query heads of a
/// key/value head stacked), keys and values `[b, kv, t, hd]`: the probabilities (same layout
/// as the scores) and the output `[b, heads, t, hd]`.
fn attn_forward(
    qf: &Tensor,
    kr: &Tensor,
    vr: &Tensor,
    s: attn_train::Shape,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, nh, t, hd) = (s.batch, s.heads, s.t, s.head_dim);
    if host_f32(&[qf, kr, vr]) {
        let (p, o) = with_f32(&[qf, kr, vr], |x| {
            attn_train::forward(x[0], x[1], x[2], s, scale as f32)
        })?;
        let dev = qf.device();
        return Ok((
            Tensor::from_vec(p, (b, s.kv_heads, nh / s.kv_heads * t, t), dev)?,
            Tensor::from_vec(o, (b, nh, t, hd), dev)?,
        ));
    }
    let probs = ops::causal_softmax(&qf.matmul(&kr.t()?)?, scale)?;
    let out = probs.matmul(vr)?.reshape((b, nh, t, hd))?;
    Ok((probs, out))
}

/// Gradients of [`attn_forward`] from `dout` (`[b, kv, rep·t, hd]`): `dq` `[b, heads, t, hd]`,
/// `dk` and `dv` `[b, kv, t, hd]`, before the inverse RoPE.
fn attn_backward(
    tp: &Tape,
    dout: &Tensor,
    s: attn_train::Shape,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, hd) = (s.batch, s.heads, s.t, s.head_dim);
    if host_f32(&[&tp.qf, &tp.kr, &tp.vr, &tp.probs, dout]) {
        let (dq, dk, dv) = with_f32(&[&tp.qf, &tp.kr, &tp.vr, &tp.probs, dout], |x| {
            attn_train::backward(x[0], x[1], x[2], x[3], x[4], s, scale as f32)
        })?;
        let dev = dout.device();
        let kv = (b, s.kv_heads, t, hd);
        return Ok((
            Tensor::from_vec(dq, (b, nh, t, hd), dev)?,
            Tensor::from_vec(dk, kv, dev)?,
            Tensor::from_vec(dv, kv, dev)?,
        ));
    }
    let dv = tp.probs.t()?.matmul(dout)?;
    let dp = dout.matmul(&tp.vr.t()?)?;
    let ds = ops::softmax_backward(&tp.probs, &dp, scale)?;
    let dq = ds.matmul(&tp.kr)?.reshape((b, nh, t, hd))?;
    let dk = ds.t()?.matmul(&tp.qf)?;
    Ok((dq, dk, dv))
}

/// The block's output (to add to the residual stream `x`) and its tape. `p` holds the
/// layer's q, k, v and o projections.
pub(super) fn forward(
    layer: &Layer,
    p: &[Proj<'_>],
    x: &Tensor,
    d: &Dims,
    keep: bool,
) -> Result<(Tensor, Tape)> {
    let [pq, pk, pv, po] = p else {
        candle_core::bail!("the attention block takes four projections")
    };
    let (bsz, t, nh, nkv, hd) = (d.bsz, d.t, d.heads, d.kv_heads, d.head_dim);
    let (h1, xn1, inv1) = rms_forward(x, &layer.attn_norm, d.eps)?;
    let (q, tq) = pq.forward(&h1, keep)?;
    let (k, tk) = pk.forward(&h1, keep)?;
    let (v, tv) = pv.forward(&h1, keep)?;
    let q = q.reshape((bsz, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k
        .reshape((bsz, t, nkv, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let vr = v
        .reshape((bsz, t, nkv, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let q = rope(&q, &d.cos, &d.sin, d.rope)?;
    let kr = rope(&k, &d.cos, &d.sin, d.rope)?;
    let qf = q.reshape((bsz, nkv, d.rep() * t, hd))?;
    let (probs, attn) = {
        let _t = prof::span(Phase::Attention);
        attn_forward(&qf, &kr, &vr, d.shape, d.scale)?
    };
    let attn = attn.transpose(1, 2)?.reshape((d.n, nh * hd))?;
    let (o, to) = po.forward(&attn, keep)?;
    Ok((
        o,
        Tape {
            xn1,
            inv1,
            h1,
            q: tq,
            k: tk,
            v: tv,
            qf,
            kr,
            vr,
            probs,
            attn,
            o: to,
        },
    ))
}

/// Backward from `dx` (the residual stream's gradient after the block): the gradient before
/// it, or `None` for the first layer (its input is the frozen embedding, whose gradient
/// nothing needs), with the adapters' gradients added to `grads`. `nsin` is `-sin`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    layer: &Layer,
    p: &[Proj<'_>],
    tp: &Tape,
    d: &Dims,
    nsin: &Tensor,
    dx: Tensor,
    grads: &mut Grads,
    first: bool,
) -> Result<Option<Tensor>> {
    let [pq, pk, pv, po] = p else {
        candle_core::bail!("the attention block takes four projections")
    };
    let (bsz, t, nh, nkv, hd, n) = (d.bsz, d.t, d.heads, d.kv_heads, d.head_dim, d.n);
    let dattn = need(po.backward(&tp.o, &tp.attn, &dx, grads, true)?)?;
    let dout = dattn
        .reshape((bsz, t, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((bsz, nkv, d.rep() * t, hd))?;
    let (dq, dk, dv) = {
        let _t = prof::span(Phase::Attention);
        attn_backward(tp, &dout, d.shape, d.scale)?
    };
    let dq = rope(&dq.contiguous()?, &d.cos, nsin, d.rope)?;
    let dk = rope(&dk.contiguous()?, &d.cos, nsin, d.rope)?;
    let dq = dq.transpose(1, 2)?.reshape((n, nh * hd))?;
    let dk = dk.transpose(1, 2)?.reshape((n, nkv * hd))?;
    let dv = dv.transpose(1, 2)?.reshape((n, nkv * hd))?;
    let parts = [
        pq.backward(&tp.q, &tp.h1, &dq, grads, !first)?,
        pk.backward(&tp.k, &tp.h1, &dk, grads, !first)?,
        pv.backward(&tp.v, &tp.h1, &dv, grads, !first)?,
    ];
    if first {
        return Ok(None);
    }
    let [Some(a), Some(b), Some(c)] = parts else {
        candle_core::bail!("missing input gradient");
    };
    let dh1 = ((a + b)? + c)?;
    Ok(Some(
        (dx + rms_backward(&tp.xn1, &tp.inv1, &layer.attn_norm, &dh1)?)?,
    ))
}
