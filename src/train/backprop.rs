//! The training forward and backward pass, written out by hand.
//!
//! Why not Candle's autograd: its matmul backward computes the gradient of both operands, so
//! every frozen base weight would get a full-size gradient (a third more FLOPs and a weight's
//! worth of memory per projection), and its fused `rms_norm`, `softmax_last_dim` and `rope`
//! have no backward at all and silently cut the graph. Here the forward keeps what the
//! backward needs (a per-layer tape), and [`loss_and_grads`] walks back through the layers
//! computing input gradients for the frozen projections and weight gradients for the LoRA
//! pairs only. The fused kernels stay in the forward (they are fast); their backward is
//! written below: RMSNorm, RoPE (the inverse rotation), softmax, SiLU, cross-entropy.
//!
//! On the CPU in f32, attention runs on the kernel crate's causal products (forward and
//! backward skip the half above the diagonal), and with `--bf16-base` the frozen products run
//! in bf16 with each adapter's share added into their output buffers; Candle ops serve CUDA
//! and f64 (the finite-difference checks).
//!
//! Batches are right-padded rows starting at position 0. A padded position only sees keys at
//! or before itself, so real positions never see padding, and padding positions carry no loss,
//! so no gradient flows from them.

use candle_core::{DType, Device, Tensor, D};

use super::kernels;
use super::lora::LoraParams;
use crate::model::llama::{Linear, Model, RopeLayout};
use crate::rng::Rng;
use emlab_kernels::{attn_train, bf16, lowrank};

pub type Result<T> = candle_core::Result<T>;

/// One micro-batch: right-padded token rows and the positions the loss covers.
pub struct Batch {
    /// `[rows, len]` token ids.
    pub tokens: Tensor,
    /// Flat positions `row * len + t` whose next token is a target.
    pub positions: Vec<u32>,
    /// The target token (the token at `t + 1`) for each position.
    pub labels: Vec<u32>,
}

impl Batch {
    /// Build from token rows and per-token loss masks (a token is a target when its mask bit
    /// is set; the first token of a row never is).
    pub fn new(rows: &[(&[u32], &[bool])], dev: &Device) -> Result<Batch> {
        let len = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut toks = Vec::with_capacity(rows.len() * len);
        let mut positions = Vec::new();
        let mut labels = Vec::new();
        for (ri, (t, m)) in rows.iter().enumerate() {
            toks.extend_from_slice(t);
            toks.extend(std::iter::repeat_n(0u32, len - t.len()));
            for i in 1..t.len() {
                if m[i] {
                    positions.push((ri * len + i - 1) as u32);
                    labels.push(t[i]);
                }
            }
        }
        Ok(Batch {
            tokens: Tensor::from_vec(toks, (rows.len(), len), dev)?,
            positions,
            labels,
        })
    }

    pub fn targets(&self) -> usize {
        self.labels.len()
    }
}

/// Gradients of the adapter pairs, in [`LoraParams::pairs`] order, in the master dtype.
pub struct Grads {
    pub a: Vec<Tensor>,
    pub b: Vec<Tensor>,
}

impl Grads {
    pub fn zeros(p: &LoraParams) -> Result<Grads> {
        Ok(Grads {
            a: p.pairs
                .iter()
                .map(|x| x.a.zeros_like())
                .collect::<Result<_>>()?,
            b: p.pairs
                .iter()
                .map(|x| x.b.zeros_like())
                .collect::<Result<_>>()?,
        })
    }

    pub fn add(&mut self, o: &Grads) -> Result<()> {
        for (x, y) in self.a.iter_mut().zip(&o.a) {
            *x = (&*x + y)?;
        }
        for (x, y) in self.b.iter_mut().zip(&o.b) {
            *x = (&*x + y)?;
        }
        Ok(())
    }

    /// Global L2 norm over every gradient.
    pub fn norm(&self) -> Result<f64> {
        let mut s = 0f64;
        for t in self.a.iter().chain(&self.b) {
            s += t
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(s.sqrt())
    }

    pub fn scale(&mut self, f: f64) -> Result<()> {
        for t in self.a.iter_mut().chain(self.b.iter_mut()) {
            *t = (&*t * f)?;
        }
        Ok(())
    }
}

/// A LoRA pair as used in one pass: weights in the compute dtype and the scale.
struct Adapter {
    a: Tensor,
    /// `s B`: the scale folded into the (small) up-projection once per pass instead of
    /// into every `[tokens, out]` product.
    bs: Tensor,
    /// `(s B)ᵀ` and `A` as row-major f32 for [`lowrank::add_product`] (bf16 base products,
    /// where the adapter's share is added into the base product's output buffer).
    host: Option<(Vec<f32>, Vec<f32>)>,
    scale: f64,
    /// Dropout keep-mask already divided by the keep probability, `[n, in]`.
    drop: Option<Tensor>,
    /// `W + s B A`: with it the projection is one GEMM forward and one backward (the
    /// low-rank products remain only for the adapter's own gradients). Not with dropout,
    /// which applies to the adapter's input alone.
    merged: Option<Tensor>,
    slot: usize,
}

/// What a projection's forward keeps for its backward.
struct LinTape {
    /// `x A^T` (after dropout) when the projection has an adapter.
    u: Option<Tensor>,
}

fn base_weight(lin: &Linear) -> Result<&Tensor> {
    match lin {
        Linear::Dense(w, _) => Ok(w),
        _ => candle_core::bail!("training needs dense base weights"),
    }
}

fn lin_forward(
    lin: &Linear,
    pack: Option<&Pack>,
    ad: Option<&Adapter>,
    x: &Tensor,
    keep: bool,
) -> Result<(Tensor, LinTape)> {
    if let Some(Adapter {
        merged: Some(w), a, ..
    }) = ad
    {
        let y = x.matmul(&w.t()?)?;
        let y = match lin {
            Linear::Dense(_, Some(b)) => y.broadcast_add(b)?,
            _ => y,
        };
        let u = if keep { Some(x.matmul(&a.t()?)?) } else { None };
        return Ok((y, LinTape { u }));
    }
    let u = match ad {
        None => None,
        Some(ad) => {
            let xin = match &ad.drop {
                Some(m) => (x * m)?,
                None => x.clone(),
            };
            Some(xin.matmul(&ad.a.t()?)?)
        }
    };
    let y = match (pack, ad.and_then(|a| a.host.as_ref()), &u) {
        (Some(p), Some(h), Some(u)) => bf16_matmul(x, &p.0, Some((u, &h.0)))?,
        _ => {
            let y = match pack {
                Some(p) => bf16_matmul(x, &p.0, None)?,
                None => x.matmul(&base_weight(lin)?.t()?)?,
            };
            match (ad, &u) {
                (Some(ad), Some(u)) => (y + u.matmul(&ad.bs.t()?)?)?,
                _ => y,
            }
        }
    };
    let y = match lin {
        Linear::Dense(_, Some(b)) => y.broadcast_add(b)?,
        _ => y,
    };
    Ok((y, LinTape { u }))
}

/// Backward of a projection: returns `dx` (when `need_dx`), and adds the adapter's
/// gradients to `grads`.
#[allow(clippy::too_many_arguments)]
fn lin_backward(
    lin: &Linear,
    pack: Option<&Pack>,
    ad: Option<&Adapter>,
    tape: &LinTape,
    x: &Tensor,
    dy: &Tensor,
    grads: &mut Grads,
    need_dx: bool,
) -> Result<Option<Tensor>> {
    // The frozen weight gets no gradient: only dx = dy W (W + s B A when merged, which
    // already holds the adapter's share of dx).
    let merged = ad.and_then(|a| a.merged.as_ref());
    let base_dx = |add: Option<(&Tensor, &[f32])>| -> Result<Option<Tensor>> {
        Ok(match (need_dx, merged, pack) {
            (false, _, _) => None,
            (true, Some(w), _) => Some(dy.matmul(w)?),
            (true, None, Some(p)) => Some(bf16_matmul(dy, &p.1, add)?),
            (true, None, None) => Some(dy.matmul(base_weight(lin)?)?),
        })
    };
    let (Some(ad), Some(u)) = (ad, &tape.u) else {
        return base_dx(None);
    };
    let dt = grads.a[ad.slot].dtype();
    // dB = s dy^T u ; du = s dy B ; dA = du^T x_in ; dx += du A (through the dropout mask).
    let db = (dy.t()?.matmul(u)? * ad.scale)?;
    let du = dy.matmul(&ad.bs)?;
    let xin = match &ad.drop {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let da = du.t()?.matmul(&xin)?;
    grads.b[ad.slot] = (&grads.b[ad.slot] + db.to_dtype(dt)?)?;
    grads.a[ad.slot] = (&grads.a[ad.slot] + da.to_dtype(dt)?)?;
    if merged.is_some() {
        return base_dx(None);
    }
    // bf16 base products add du A into their own output buffer (without dropout, whose
    // mask applies to du A alone).
    if let (Some(_), Some((_, a)), None) = (pack, &ad.host, &ad.drop) {
        return base_dx(Some((&du, a)));
    }
    match base_dx(None)? {
        Some(dx) => {
            let dxl = du.matmul(&ad.a)?;
            let dxl = match &ad.drop {
                Some(m) => (dxl * m)?,
                None => dxl,
            };
            Ok(Some((dx + dxl)?))
        }
        None => Ok(None),
    }
}

fn need(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg("missing input gradient".into()))
}

/// RMSNorm forward keeping `x / rms` and `1 / rms`.
fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xn = x.broadcast_mul(&inv)?;
    let y = xn.broadcast_mul(w)?;
    Ok((y, xn, inv))
}

/// `dx = inv * (g - xn * mean(g * xn))` with `g = dy * w`.
fn rms_backward(xn: &Tensor, inv: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let g = dy.broadcast_mul(w)?;
    let dot = (&g * xn)?.mean_keepdim(D::Minus1)?;
    (g - xn.broadcast_mul(&dot)?)?.broadcast_mul(inv)
}

fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    match layout {
        RopeLayout::Half => candle_nn::rotary_emb::rope(x, cos, sin),
        RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
    }
}

struct LayerTape {
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
    xn2: Tensor,
    inv2: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    gate: LinTape,
    up: LinTape,
    down: LinTape,
}

/// Options of one pass.
#[derive(Clone, Copy)]
pub struct PassOpts {
    /// Divide the loss (and so the gradients) by this many target tokens.
    pub denom: f64,
    /// Seed for LoRA dropout masks (used only when the spec has dropout).
    pub dropout_seed: u64,
    /// Rows of logits computed at once (bounds the `[rows, vocab]` buffers).
    pub logit_chunk: usize,
    /// Compute gradients (else: loss only, for evaluation).
    pub backward: bool,
    /// Fold each adapter into its weight for the pass (`W + s B A`): one GEMM per
    /// projection instead of three; a copy of the projection weights in memory.
    pub merge: bool,
}

impl PassOpts {
    pub fn new(denom: f64) -> PassOpts {
        PassOpts {
            denom,
            dropout_seed: 0,
            logit_chunk: 128,
            backward: true,
            merge: true,
        }
    }
}

/// Adapter-merged projection weights (`W + s B A`) in [`LoraParams::pairs`] order: computed
/// once per optimizer step and shared by its micro-batches.
pub struct Merged(Vec<Option<Tensor>>);

fn merge_one(model: &Model, lora: &LoraParams, slot: usize) -> Result<Tensor> {
    let p = &lora.pairs[slot];
    let dt = model.dtype;
    let w = base_weight(super::lora::projection(&model.w.layers[p.layer], p.module))?;
    w + (p.b.to_dtype(dt)?.matmul(&p.a.to_dtype(dt)?)? * lora.spec.scale())?
}

impl Merged {
    pub fn new(model: &Model, lora: &LoraParams) -> Result<Merged> {
        (0..lora.pairs.len())
            .map(|k| merge_one(model, lora, k).map(Some))
            .collect::<Result<_>>()
            .map(Merged)
    }
}

/// A frozen weight packed for bf16 products: `(x · Wᵀ, dy · W)`.
type Pack = (bf16::PackedB, bf16::PackedB);

/// The frozen base weights packed for bf16 products with f32 accumulation (CPUs with
/// AVX-512 BF16): every dense projection and the LM head, in the forward and the
/// input-gradient layouts. Packed once per run. Adapters, attention, norms and every
/// gradient stay in f32; the adapters are never folded into a bf16 weight.
pub struct FrozenBf16 {
    lins: Vec<Vec<Option<Pack>>>,
    lm: Pack,
}

fn pack(w: &Tensor) -> Result<Pack> {
    let (n, k) = w.dims2()?;
    let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((
        bf16::PackedB::from_transposed(&v, n, k),
        bf16::PackedB::from_rows(&v, n, k),
    ))
}

impl FrozenBf16 {
    /// Whether this machine can run them.
    pub fn available() -> bool {
        bf16::available()
    }

    pub fn new(model: &Model) -> Result<FrozenBf16> {
        if !bf16::available() || !model.device.is_cpu() {
            candle_core::bail!(
                "bf16 base products need a CPU with AVX-512 BF16 (this one has none)"
            )
        }
        let lins = model
            .w
            .layers
            .iter()
            .map(|l| {
                (0..7)
                    .map(|m| match super::lora::projection(l, m) {
                        Linear::Dense(w, _) => pack(w).map(Some),
                        _ => Ok(None),
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let lm = pack(base_weight(&model.w.lm_head)?)?;
        Ok(FrozenBf16 { lins, lm })
    }
}

/// Run `f` on the elements of f32 CPU tensors, in order (each copied only when not
/// contiguous).
fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (st, l) in &guards {
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((s, e))) =
            (&**st, l.contiguous_offsets())
        else {
            candle_core::bail!("the CPU kernels take f32 CPU tensors")
        };
        slices.push(&v[s..e]);
    }
    Ok(f(&slices))
}

/// `x · B` for a packed `B`, `x` f32 `[..., k]` on the CPU, plus `u · w` (`u` `[rows, r]`,
/// `w` row-major `[r, n]`) when given: a LoRA adapter's share, added into the same buffer.
fn bf16_matmul(x: &Tensor, b: &bf16::PackedB, add: Option<(&Tensor, &[f32])>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / b.k();
    let mut out = vec![0f32; rows * b.n()];
    with_f32(&[x], |v| bf16::gemm(v[0], b, &mut out))?;
    if let Some((u, w)) = add {
        let r = w.len() / b.n();
        with_f32(&[u], |u| lowrank::add_product(&mut out, u[0], w, r, b.n()))?;
    }
    *dims.last_mut().unwrap() = b.n();
    Tensor::from_vec(out, dims, x.device())
}

/// Whether the kernel crate's f32 CPU kernels apply.
fn host_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Causal attention from post-RoPE queries `[b, kv, rep·t, hd]` (the `rep` query heads of a
/// key/value head stacked), keys and values `[b, kv, t, hd]`: the probabilities (same layout
/// as the scores) and the output `[b, heads, t, hd]`. On f32 CPU tensors the kernel crate's
/// causal products (half the FLOPs of a dense batched GEMM); elsewhere Candle ops.
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
    let probs = kernels::causal_softmax(&qf.matmul(&kr.t()?)?, scale)?;
    let out = probs.matmul(vr)?.reshape((b, nh, t, hd))?;
    Ok((probs, out))
}

/// Gradients of [`attn_forward`] from `dout` (`[b, kv, rep·t, hd]`): `dq` `[b, heads, t, hd]`,
/// `dk` and `dv` `[b, kv, t, hd]`, before the inverse RoPE.
fn attn_backward(
    tp: &LayerTape,
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
    let ds = kernels::softmax_backward(&tp.probs, &dp, scale)?;
    let dq = ds.matmul(&tp.kr)?.reshape((b, nh, t, hd))?;
    let dk = ds.t()?.matmul(&tp.qf)?;
    Ok((dq, dk, dv))
}

/// The summed cross-entropy of a batch's targets and, with `opts.backward`, the gradients of
/// `sum / opts.denom` for every adapter pair.
pub fn loss_and_grads(
    model: &Model,
    lora: &LoraParams,
    batch: &Batch,
    opts: PassOpts,
) -> Result<(f64, Option<Grads>)> {
    loss_and_grads_merged(model, lora, batch, opts, None, None)
}

/// [`loss_and_grads`] with merged weights computed beforehand.
pub fn loss_and_grads_merged(
    model: &Model,
    lora: &LoraParams,
    batch: &Batch,
    opts: PassOpts,
    cached: Option<&Merged>,
    frozen: Option<&FrozenBf16>,
) -> Result<(f64, Option<Grads>)> {
    let cfg = &model.cfg;
    let dt = model.dtype;
    let dev = &model.device;
    let (bsz, t) = batch.tokens.dims2()?;
    let n = bsz * t;
    if t > cfg.max_seq {
        candle_core::bail!(
            "sequence of {t} tokens exceeds the model's context of {}",
            cfg.max_seq
        );
    }
    let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let ashape = attn_train::Shape {
        batch: bsz,
        t,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
    };
    let (cos, sin) = model.rope_tables();
    let cos = cos.narrow(0, 0, t)?;
    let sin = sin.narrow(0, 0, t)?;
    let spec = &lora.spec;
    let lscale = spec.scale();

    // Adapter weights in the compute dtype, with this pass's dropout masks.
    let adapter = |li: usize, m: usize, inp: usize| -> Result<Option<Adapter>> {
        let Some(slot) = lora.index[li][m] else {
            return Ok(None);
        };
        let p = &lora.pairs[slot];
        let drop = if spec.dropout > 0.0 && opts.backward {
            let keep = 1.0 - spec.dropout;
            let mut rng = Rng::new(opts.dropout_seed, li * 7 + m);
            let v: Vec<f32> = (0..n * inp)
                .map(|_| {
                    if rng.unit() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            Some(Tensor::from_vec(v, (n, inp), dev)?.to_dtype(dt)?)
        } else {
            None
        };
        let (a, bs) = (p.a.to_dtype(dt)?, (p.b.to_dtype(dt)? * lscale)?);
        let host = match frozen {
            Some(_) => Some((
                bs.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
                a.flatten_all()?.to_vec1::<f32>()?,
            )),
            _ => None,
        };
        // With bf16 base products the adapters stay separate: folded into a bf16 weight,
        // their small updates would round away.
        let merged = match (opts.merge && drop.is_none() && frozen.is_none(), cached) {
            (false, _) => None,
            (true, Some(c)) => c.0[slot].clone(),
            (true, None) => Some(merge_one(model, lora, slot)?),
        };
        Ok(Some(Adapter {
            a,
            bs,
            host,
            scale: lscale,
            drop,
            merged,
            slot,
        }))
    };

    let tokens = batch.tokens.flatten_all()?;
    let mut x = match &model.w.embed {
        crate::model::llama::Embedding::Dense(e) => e.embedding(&tokens)?.to_dtype(dt)?,
        crate::model::llama::Embedding::Quant(q) => q.embedding(&tokens)?.to_dtype(dt)?,
        crate::model::llama::Embedding::Blocks(q) => {
            crate::model::blocks::embedding(q, &tokens.to_vec1::<u32>()?, tokens.device())?
                .to_dtype(dt)?
        }
    };
    let mut tapes = Vec::with_capacity(cfg.layers);
    let mut adapters = Vec::with_capacity(cfg.layers);
    let packs = |li: usize| frozen.map(|f| &f.lins[li]);
    for (li, layer) in model.w.layers.iter().enumerate() {
        let pk = |m: usize| packs(li).and_then(|p| p[m].as_ref());
        let ads: Vec<Option<Adapter>> = (0..7)
            .map(|m| {
                let inp = super::lora::projection(layer, m).dims()?.1;
                adapter(li, m, inp)
            })
            .collect::<Result<_>>()?;
        let (h1, xn1, inv1) = rms_forward(&x, &layer.attn_norm, cfg.rms_eps)?;
        let (q, tq) = lin_forward(&layer.q, pk(0), ads[0].as_ref(), &h1, opts.backward)?;
        let (k, tk) = lin_forward(&layer.k, pk(1), ads[1].as_ref(), &h1, opts.backward)?;
        let (v, tv) = lin_forward(&layer.v, pk(2), ads[2].as_ref(), &h1, opts.backward)?;
        let q = q.reshape((bsz, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k
            .reshape((bsz, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let vr = v
            .reshape((bsz, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rope(&q, &cos, &sin, cfg.rope)?;
        let kr = rope(&k, &cos, &sin, cfg.rope)?;
        let qf = q.reshape((bsz, nkv, rep * t, hd))?;
        let (probs, attn) = attn_forward(&qf, &kr, &vr, ashape, scale)?;
        let attn = attn.transpose(1, 2)?.reshape((n, nh * hd))?;
        let (o, to) = lin_forward(&layer.o, pk(3), ads[3].as_ref(), &attn, opts.backward)?;
        let xmid = (&x + o)?;
        let (h2, xn2, inv2) = rms_forward(&xmid, &layer.ffn_norm, cfg.rms_eps)?;
        let (g, tg) = lin_forward(&layer.gate, pk(4), ads[4].as_ref(), &h2, opts.backward)?;
        let (u, tu) = lin_forward(&layer.up, pk(5), ads[5].as_ref(), &h2, opts.backward)?;
        let act = kernels::silu_mul(&g, &u)?;
        let (d, td) = lin_forward(&layer.down, pk(6), ads[6].as_ref(), &act, opts.backward)?;
        x = (xmid + d)?;
        if opts.backward {
            tapes.push(LayerTape {
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
                xn2,
                inv2,
                h2,
                g,
                u,
                gate: tg,
                up: tu,
                down: td,
            });
            adapters.push(ads);
        }
    }
    let (xf, xnf, invf) = rms_forward(&x, &model.w.norm, cfg.rms_eps)?;

    // Logits only at target positions, in chunks; cross-entropy in f32 (f64 for f64 models).
    let lm = base_weight(&model.w.lm_head)?;
    let ce_dt = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let ntarget = batch.positions.len();
    let mut loss = 0f64;
    let mut dsel = Vec::new();
    let chunk = opts.logit_chunk.max(1);
    let mut start = 0;
    while start < ntarget {
        let c = chunk.min(ntarget - start);
        let pos = Tensor::from_slice(&batch.positions[start..start + c], c, dev)?;
        let lab = Tensor::from_slice(&batch.labels[start..start + c], (c, 1), dev)?;
        let xs = xf.index_select(&pos, 0)?;
        let logits = match frozen {
            Some(f) => bf16_matmul(&xs, &f.lm.0, None)?,
            None => xs.matmul(&lm.t()?)?,
        }
        .to_dtype(ce_dt)?;
        let lse = kernels::log_sum_exp(&logits)?;
        let picked = logits.gather(&lab, 1)?;
        loss += (&lse - &picked)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        if opts.backward {
            // d/dlogits of sum(CE) / denom: softmax minus one-hot.
            let dl = kernels::cross_entropy_grad(&logits, &lse, &lab, opts.denom)?.to_dtype(dt)?;
            dsel.push(match frozen {
                Some(f) => bf16_matmul(&dl, &f.lm.1, None)?,
                None => dl.matmul(lm)?,
            });
        }
        start += c;
    }
    if !opts.backward {
        return Ok((loss, None));
    }
    let mut grads = Grads::zeros(lora)?;
    if dsel.is_empty() {
        return Ok((loss, Some(grads)));
    }
    let dxs = Tensor::cat(&dsel, 0)?;
    drop(xf);
    // RoPE is a rotation: its backward rotates back (the same kernel with -sin).
    let nsin = sin.neg()?;
    let pos = Tensor::from_slice(&batch.positions, ntarget, dev)?;
    let dxf = Tensor::zeros((n, cfg.hidden), dt, dev)?.index_add(&pos, &dxs, 0)?;
    let mut dx = rms_backward(&xnf, &invf, &model.w.norm, &dxf)?;

    for li in (0..cfg.layers).rev() {
        let layer = &model.w.layers[li];
        let pk = |m: usize| packs(li).and_then(|p| p[m].as_ref());
        let tp = tapes
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("tape underflow".into()))?;
        let ads = adapters
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("tape underflow".into()))?;
        // MLP: x = xmid + down(silu(g) * u).
        let act = kernels::silu_mul(&tp.g, &tp.u)?;
        let dact = need(lin_backward(
            &layer.down,
            pk(6),
            ads[6].as_ref(),
            &tp.down,
            &act,
            &dx,
            &mut grads,
            true,
        )?)?;
        drop(act);
        let (dg, du) = kernels::silu_mul_backward(&tp.g, &tp.u, &dact)?;
        let dh2 = (need(lin_backward(
            &layer.gate,
            pk(4),
            ads[4].as_ref(),
            &tp.gate,
            &tp.h2,
            &dg,
            &mut grads,
            true,
        )?)? + need(lin_backward(
            &layer.up,
            pk(5),
            ads[5].as_ref(),
            &tp.up,
            &tp.h2,
            &du,
            &mut grads,
            true,
        )?)?)?;
        let dxmid = (&dx + rms_backward(&tp.xn2, &tp.inv2, &layer.ffn_norm, &dh2)?)?;

        // Attention.
        let dattn = need(lin_backward(
            &layer.o,
            pk(3),
            ads[3].as_ref(),
            &tp.o,
            &tp.attn,
            &dxmid,
            &mut grads,
            true,
        )?)?;
        let dout = dattn
            .reshape((bsz, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((bsz, nkv, rep * t, hd))?;
        let (dq, dk, dv) = attn_backward(&tp, &dout, ashape, scale)?;
        let dq = rope(&dq.contiguous()?, &cos, &nsin, cfg.rope)?;
        let dk = rope(&dk.contiguous()?, &cos, &nsin, cfg.rope)?;
        let dq = dq.transpose(1, 2)?.reshape((n, nh * hd))?;
        let dk = dk.transpose(1, 2)?.reshape((n, nkv * hd))?;
        let dv = dv.transpose(1, 2)?.reshape((n, nkv * hd))?;
        // The first layer's input is the frozen embedding: its gradient is not needed.
        let first = li == 0;
        let parts = [
            lin_backward(
                &layer.q,
                pk(0),
                ads[0].as_ref(),
                &tp.q,
                &tp.h1,
                &dq,
                &mut grads,
                !first,
            )?,
            lin_backward(
                &layer.k,
                pk(1),
                ads[1].as_ref(),
                &tp.k,
                &tp.h1,
                &dk,
                &mut grads,
                !first,
            )?,
            lin_backward(
                &layer.v,
                pk(2),
                ads[2].as_ref(),
                &tp.v,
                &tp.h1,
                &dv,
                &mut grads,
                !first,
            )?,
        ];
        if first {
            break;
        }
        let [Some(a), Some(b), Some(c)] = parts else {
            candle_core::bail!("missing input gradient");
        };
        let dh1 = ((a + b)? + c)?;
        dx = (dxmid + rms_backward(&tp.xn1, &tp.inv1, &layer.attn_norm, &dh1)?)?;
    }
    Ok((loss, Some(grads)))
}
