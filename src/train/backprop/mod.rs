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

mod attention;
mod linear;
mod loss;
mod mlp;
mod norm;
pub mod ops;

pub use linear::{FrozenBf16, Merged};

use candle_core::{DType, Device, Tensor};

use crate::model::adapter::Projection;
use crate::model::llama::{Embedding, Model};
use crate::train::lora::LoraParams;
use emlab_kernels::attn_train;
use linear::{layer_adapters, Proj};

pub type Result<T> = candle_core::Result<T>;

/// One micro-batch: right-padded token rows and the positions the loss covers.
pub struct Batch {
    /// `[rows, len]` token ids.
    pub tokens: Tensor,
    /// Flat positions `row * len + t` whose next token is a target.
    pub positions: Vec<u32>,
    /// The target token (the token at `t + 1`) for each position.
    pub labels: Vec<u32>,
    /// A KL pass: the reference model's log-probabilities at `positions` (`[targets,
    /// vocab]`); the head then computes `sum KL(reference || model)` over the positions and
    /// its gradient, instead of the cross-entropy.
    pub kl_reference: Option<Tensor>,
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
            kl_reference: None,
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

/// The projections of layer `li` in [`Projection::ALL`] order with their packs and adapters.
fn projections<'a>(
    model: &'a Model,
    li: usize,
    ads: &'a [Option<linear::Adapter>],
    frozen: Option<&'a FrozenBf16>,
) -> Vec<Proj<'a>> {
    let layer = &model.w.layers[li];
    Projection::ALL
        .into_iter()
        .map(|p| Proj {
            lin: p.of(layer),
            pack: frozen.and_then(|f| f.layer(li)[p.index()].as_ref()),
            ad: ads[p.index()].as_ref(),
        })
        .collect()
}

/// [`loss_and_grads`] with merged weights computed beforehand (`cached`) and, with `frozen`,
/// the base products in bf16.
pub fn loss_and_grads_merged(
    model: &Model,
    lora: &LoraParams,
    batch: &Batch,
    opts: PassOpts,
    cached: Option<&Merged>,
    frozen: Option<&FrozenBf16>,
) -> Result<(f64, Option<Grads>)> {
    let (bsz, t) = batch.tokens.dims2()?;
    let dims = dims_of(model, bsz, t)?;
    let (x, tapes, adapters) = forward(model, lora, batch, &opts, cached, frozen, &dims)?;
    let (loss, dx) = loss::head(model, &x, batch, &opts, frozen)?;
    if !opts.backward {
        return Ok((loss, None));
    }
    backward(model, lora, frozen, &dims, tapes, adapters, dx).map(|g| (loss, Some(g)))
}

/// The reference log-probabilities of a KL pass: `model` with adapter `lora` (without
/// pairs: the base model) run by the same forward as training, at `batch`'s target
/// positions, `[targets, vocab]` in the cross-entropy dtype. The same kernels as the
/// trained model's pass: a model equal to its reference has a KL of exactly zero.
pub fn reference_logprobs(
    model: &Model,
    lora: &LoraParams,
    batch: &Batch,
    frozen: Option<&FrozenBf16>,
) -> Result<Tensor> {
    let mut opts = PassOpts::new(1.0);
    opts.backward = false;
    let (bsz, t) = batch.tokens.dims2()?;
    let dims = dims_of(model, bsz, t)?;
    let (x, ..) = forward(model, lora, batch, &opts, None, frozen, &dims)?;
    loss::logprobs(model, &x, batch, &opts, frozen)
}

/// The shapes and RoPE tables of a `[bsz, t]` pass.
fn dims_of(model: &Model, bsz: usize, t: usize) -> Result<attention::Dims> {
    let cfg = &model.cfg;
    let n = bsz * t;
    if t > cfg.max_seq {
        candle_core::bail!(
            "sequence of {t} tokens exceeds the model's context of {}",
            cfg.max_seq
        );
    }
    let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
    let (cos, sin) = model.rope_tables();
    let dims = attention::Dims {
        bsz,
        t,
        n,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f64).sqrt(),
        shape: attn_train::Shape {
            batch: bsz,
            t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        },
        cos: cos.narrow(0, 0, t)?,
        sin: sin.narrow(0, 0, t)?,
        rope: cfg.rope,
        eps: cfg.rms_eps,
    };
    Ok(dims)
}

type Tapes = Vec<(attention::Tape, mlp::Tape)>;
type LayerAdapters = Vec<Vec<Option<linear::Adapter>>>;

/// The layers' forward: the last layer's output, and with `opts.backward` the tapes and
/// adapters the backward needs.
fn forward(
    model: &Model,
    lora: &LoraParams,
    batch: &Batch,
    opts: &PassOpts,
    cached: Option<&Merged>,
    frozen: Option<&FrozenBf16>,
    dims: &attention::Dims,
) -> Result<(Tensor, Tapes, LayerAdapters)> {
    let (cfg, dt, n) = (&model.cfg, model.dtype, dims.n);
    let tokens = batch.tokens.flatten_all()?;
    let mut x = match &model.w.embed {
        Embedding::Dense(e) => e.embedding(&tokens)?.to_dtype(dt)?,
        Embedding::Quant(q) => q.embedding(&tokens)?.to_dtype(dt)?,
        Embedding::Blocks(q) => {
            crate::model::blocks::embedding(q, &tokens.to_vec1::<u32>()?, tokens.device())?
                .to_dtype(dt)?
        }
    };
    let mut tapes = Vec::with_capacity(cfg.layers);
    let mut adapters = Vec::with_capacity(cfg.layers);
    for (li, layer) in model.w.layers.iter().enumerate() {
        let ads = layer_adapters(model, lora, li, n, opts, cached, frozen)?;
        let p = projections(model, li, &ads, frozen);
        let (o, ta) = attention::forward(layer, &p[..4], &x, dims, opts.backward)?;
        let xmid = (&x + o)?;
        let (d, tm) = mlp::forward(layer, &p[4..], &xmid, cfg.rms_eps, opts.backward)?;
        x = (xmid + d)?;
        if opts.backward {
            tapes.push((ta, tm));
            adapters.push(ads);
        }
    }
    Ok((x, tapes, adapters))
}

/// The adapters' gradients from the head's `dx`, back through the tapes.
fn backward(
    model: &Model,
    lora: &LoraParams,
    frozen: Option<&FrozenBf16>,
    dims: &attention::Dims,
    mut tapes: Tapes,
    mut adapters: LayerAdapters,
    dx: Option<Tensor>,
) -> Result<Grads> {
    let cfg = &model.cfg;
    let mut grads = Grads::zeros(lora)?;
    let Some(mut dx) = dx else {
        return Ok(grads);
    };
    // RoPE is a rotation: its backward rotates back (the same kernel with -sin).
    let nsin = dims.sin.neg()?;
    for li in (0..cfg.layers).rev() {
        let layer = &model.w.layers[li];
        let (ta, tm) = tapes
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("tape underflow".into()))?;
        let ads = adapters
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("tape underflow".into()))?;
        let p = projections(model, li, &ads, frozen);
        let dxmid = mlp::backward(layer, &p[4..], &tm, &dx, &mut grads)?;
        match attention::backward(layer, &p[..4], &ta, dims, &nsin, dxmid, &mut grads, li == 0)? {
            Some(d) => dx = d,
            None => break,
        }
    }
    Ok(grads)
}
