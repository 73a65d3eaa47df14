//! Projections in the training pass: the frozen base product (f32, bf16 on packed weights, or
//! merged with its adapter) plus the LoRA pair's share, forward ([`Proj::forward`]) and
//! backward ([`Proj::backward`]: the input gradient, and the pair's weight gradients only;
//! the frozen weight never gets one).

use candle_core::{DType, Tensor};

use super::{Grads, PassOpts, Result};
use crate::model::adapter::Projection;
use crate::model::llama::{Linear, Model};
use crate::train::lora::LoraParams;
use crate::util::prof::{self, Phase};
use crate::util::rng::Rng;
use emlab_kernels::{bf16, lowrank};

/// A LoRA pair as used in one pass: weights in the compute dtype and the scale.
pub(super) struct Adapter {
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

/// The adapters of layer `li` for one pass over `n` token positions, in
/// [`Projection::ALL`] order (`None` where the layer's projection has none).
pub(super) fn layer_adapters(
    model: &Model,
    lora: &LoraParams,
    li: usize,
    n: usize,
    opts: &PassOpts,
    cached: Option<&Merged>,
    frozen: Option<&FrozenBf16>,
) -> Result<Vec<Option<Adapter>>> {
    let layer = &model.w.layers[li];
    let spec = &lora.spec;
    let lscale = spec.scale();
    let (dt, dev) = (model.dtype, &model.device);
    Projection::ALL
        .into_iter()
        .map(|p| {
            let m = p.index();
            let Some(slot) = lora.index[li][m] else {
                return Ok(None);
            };
            let inp = p.of(layer).dims()?.1;
            let pair = &lora.pairs[slot];
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
            let (a, bs) = (pair.a.to_dtype(dt)?, (pair.b.to_dtype(dt)? * lscale)?);
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
        })
        .collect()
}

/// What a projection's forward keeps for its backward.
pub(super) struct LinTape {
    /// `x A^T` (after dropout) when the projection has an adapter.
    u: Option<Tensor>,
}

pub(super) fn base_weight(lin: &Linear) -> Result<&Tensor> {
    match lin {
        Linear::Dense(w, _) => Ok(w),
        _ => candle_core::bail!("training needs dense base weights"),
    }
}

/// Adapter-merged projection weights (`W + s B A`) in [`LoraParams::pairs`] order: computed
/// once per optimizer step and shared by its micro-batches.
pub struct Merged(Vec<Option<Tensor>>);

fn merge_one(model: &Model, lora: &LoraParams, slot: usize) -> Result<Tensor> {
    let p = &lora.pairs[slot];
    let dt = model.dtype;
    let w = base_weight(p.proj.of(&model.w.layers[p.layer]))?;
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
pub(super) type Pack = (bf16::PackedB, bf16::PackedB);

/// The frozen base weights packed for bf16 products with f32 accumulation (CPUs with
/// AVX-512 BF16, or AMX): every dense projection and the LM head, in the forward and the
/// input-gradient layouts. Packed once per run. Adapters, attention, norms and every
/// gradient stay in f32; the adapters are never folded into a bf16 weight.
pub struct FrozenBf16 {
    lins: Vec<Vec<Option<Pack>>>,
    pub(super) lm: Pack,
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
                "bf16 base products need a CPU with AVX-512 BF16 or AMX, on kernels at level \
                 avx512 or amx (here: {}, kernels {}; `emlab cpu` says what it has)",
                emlab_kernels::cpu::model_name(),
                emlab_kernels::cpu::paths().level.name()
            )
        }
        let lins = model
            .w
            .layers
            .iter()
            .map(|l| {
                Projection::ALL
                    .into_iter()
                    .map(|p| match p.of(l) {
                        Linear::Dense(w, _) => pack(w).map(Some),
                        _ => Ok(None),
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let lm = pack(base_weight(&model.w.lm_head)?)?;
        Ok(FrozenBf16 { lins, lm })
    }

    /// The packs of layer `li`'s projections, in [`Projection::ALL`] order.
    pub(super) fn layer(&self, li: usize) -> &[Option<Pack>] {
        &self.lins[li]
    }
}

/// Run `f` on the elements of f32 CPU tensors, in order (each copied only when not
/// contiguous).
pub(super) fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
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
pub(super) fn bf16_matmul(
    x: &Tensor,
    b: &bf16::PackedB,
    add: Option<(&Tensor, &[f32])>,
) -> Result<Tensor> {
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
pub(super) fn host_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The input gradient a backward was asked for.
pub(super) fn need(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg("missing input gradient".into()))
}

/// One projection of a layer in a pass: its weight, bf16 pack and adapter.
pub(super) struct Proj<'a> {
    pub lin: &'a Linear,
    pub pack: Option<&'a Pack>,
    pub ad: Option<&'a Adapter>,
}

impl Proj<'_> {
    /// `x Wᵀ (+ bias)` plus the adapter's share; keeps `x Aᵀ` for the backward when `keep`.
    pub fn forward(&self, x: &Tensor, keep: bool) -> Result<(Tensor, LinTape)> {
        let (lin, pack, ad) = (self.lin, self.pack, self.ad);
        if let Some(Adapter {
            merged: Some(w), a, ..
        }) = ad
        {
            let y = {
                let _t = prof::span(Phase::Base);
                x.matmul(&w.t()?)?
            };
            let y = match lin {
                Linear::Dense(_, Some(b)) => y.broadcast_add(b)?,
                _ => y,
            };
            let _t = prof::span(Phase::Adapter);
            let u = if keep { Some(x.matmul(&a.t()?)?) } else { None };
            return Ok((y, LinTape { u }));
        }
        let u = match ad {
            None => None,
            Some(ad) => {
                let _t = prof::span(Phase::Adapter);
                let xin = match &ad.drop {
                    Some(m) => (x * m)?,
                    None => x.clone(),
                };
                Some(xin.matmul(&ad.a.t()?)?)
            }
        };
        let y = match (pack, ad.and_then(|a| a.host.as_ref()), &u) {
            (Some(p), Some(h), Some(u)) => {
                let _t = prof::span(Phase::Base);
                bf16_matmul(x, &p.0, Some((u, &h.0)))?
            }
            _ => {
                let y = {
                    let _t = prof::span(Phase::Base);
                    match pack {
                        Some(p) => bf16_matmul(x, &p.0, None)?,
                        None => x.matmul(&base_weight(lin)?.t()?)?,
                    }
                };
                match (ad, &u) {
                    (Some(ad), Some(u)) => {
                        let _t = prof::span(Phase::Adapter);
                        (y + u.matmul(&ad.bs.t()?)?)?
                    }
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

    /// Backward: returns `dx` (when `need_dx`), and adds the adapter's gradients to `grads`.
    pub fn backward(
        &self,
        tape: &LinTape,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let (lin, pack, ad) = (self.lin, self.pack, self.ad);
        // The frozen weight gets no gradient: only dx = dy W (W + s B A when merged, which
        // already holds the adapter's share of dx).
        let merged = ad.and_then(|a| a.merged.as_ref());
        let base_dx = |add: Option<(&Tensor, &[f32])>| -> Result<Option<Tensor>> {
            let _t = prof::span(Phase::Base);
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
        let adapter = prof::span(Phase::Adapter);
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
        drop(adapter);
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
                let _t = prof::span(Phase::Adapter);
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
}
