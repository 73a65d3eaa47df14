//! The transformer emlab owns: Llama (Llama-3.x, SmolLM2) and Qwen2 (attention biases, tied
//! embeddings) decoder-only models, with a preallocated KV cache and a padding-aware mask.
//!
//! [`Config`] holds the hyper-parameters, [`Weights`] the tensors ([`Linear`]: GGML blocks on
//! emlab's CPU kernels, Candle's `QMatMul` for CUDA and block types without a kernel, dense
//! tensors, or an unmerged LoRA over any of them), and [`Model::forward`] runs a batch of
//! token rows at given cache positions. Why not candle-transformers: its llama grows the KV cache by
//! concatenation every step and has no padding mask, and training (the LoRA issue) needs
//! model code we control.
//!
//! Batches are left-padded: row `b` has `pad[b]` padding slots before its first real token.
//! Padding slots are masked out of attention and do not advance RoPE positions, so a padded
//! row computes the same logits as the row alone (up to float rounding).

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};

use super::blocks::{self, QMatrix};
use crate::util::prof::{self, Phase};

pub type Result<T> = candle_core::Result<T>;

/// Model families with their weight-layout differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// How query/key pairs are laid out for rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RopeLayout {
    /// Pairs are `(x[i], x[i + d/2])`: HF checkpoints, and GGUF Qwen2.
    Half,
    /// Pairs are `(x[2i], x[2i+1])`: GGUF Llama (llama.cpp permutes q/k on conversion).
    Interleaved,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub max_seq: usize,
    pub tie_embeddings: bool,
    pub rope: RopeLayout,
}

/// A projection: quantized (GGUF) or dense, with an optional bias (Qwen2 q/k/v).
pub enum Linear {
    /// GGML blocks on the CPU, multiplied by emlab's batch-invariant kernels.
    Blocks(Arc<QMatrix>, Option<Tensor>),
    /// GGML blocks through Candle (CUDA, and block types emlab has no kernel for).
    Quant(QMatMul, Option<Tensor>),
    Dense(Tensor, Option<Tensor>),
    /// An unmerged LoRA adapter over a base projection: `base(x) + scale * (x A^T) B^T`.
    /// On the CPU in f32, `host` holds `A^T` and `scale * B^T` as plain buffers: the
    /// adapter's share is then added into the base product's output buffer.
    Lora {
        base: Box<Linear>,
        a: Tensor,
        b: Tensor,
        scale: f64,
        host: Option<Arc<blocks::LowRank>>,
    },
}

impl Linear {
    /// The dense (dequantized) form of this projection, in `dtype`.
    pub fn to_dense(&self, dtype: DType) -> Result<Linear> {
        Ok(match self {
            Linear::Blocks(q, b) => Linear::Dense(
                blocks::dequantize(q, &candle_core::Device::Cpu)?.to_dtype(dtype)?,
                b.clone(),
            ),
            Linear::Quant(q, b) => {
                let w = match q {
                    QMatMul::QTensor(t) => t.dequantize(&t.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
                };
                Linear::Dense(w.to_dtype(dtype)?, b.clone())
            }
            Linear::Dense(w, b) => Linear::Dense(w.to_dtype(dtype)?, b.clone()),
            Linear::Lora {
                base, a, b, scale, ..
            } => {
                let Linear::Dense(w, bias) = base.to_dense(dtype)? else {
                    candle_core::bail!("LoRA base did not become dense")
                };
                let delta = (b.to_dtype(dtype)?.matmul(&a.to_dtype(dtype)?)? * *scale)?;
                Linear::Dense((w + delta)?, bias)
            }
        })
    }

    /// `(out, in)` of the weight.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Linear::Blocks(q, _) => Ok((q.rows(), q.cols())),
            Linear::Quant(q, _) => match q {
                QMatMul::QTensor(t) => t.shape().dims2(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2(),
            },
            Linear::Dense(w, _) => w.dims2(),
            Linear::Lora { base, .. } => base.dims(),
        }
    }

    /// Several projections of the same input. GGML blocks share one activation
    /// quantization and one parallel loop (q/k/v, gate/up: fewer, larger tasks at batch 1);
    /// an unmerged adapter over blocks adds its share into that product's output.
    pub fn forward_group(lins: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        type Part<'a> = (&'a QMatrix, &'a Option<Tensor>, Option<&'a blocks::LowRank>);
        let blocks: Option<Vec<Part>> = lins
            .iter()
            .map(|l| match l {
                Linear::Blocks(q, b) => Some((q.as_ref(), b, None)),
                Linear::Lora {
                    base,
                    host: Some(h),
                    ..
                } => match base.as_ref() {
                    Linear::Blocks(q, b) => Some((q.as_ref(), b, Some(h.as_ref()))),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let Some(blocks) = blocks else {
            return lins.iter().map(|l| l.forward_one(x)).collect();
        };
        let ms: Vec<&QMatrix> = blocks.iter().map(|(q, ..)| *q).collect();
        let low: Vec<Option<&blocks::LowRank>> = blocks.iter().map(|(.., h)| *h).collect();
        let _t = prof::span(Phase::Base);
        blocks::matmul_many(&ms, &low, x)?
            .into_iter()
            .zip(&blocks)
            .map(|(y, (_, b, _))| match b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            })
            .collect()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Blocks(..) | Linear::Lora { host: Some(_), .. } => {
                let mut y = Linear::forward_group(&[self], x)?;
                Ok(y.remove(0))
            }
            _ => self.forward_one(x),
        }
    }

    fn forward_one(&self, x: &Tensor) -> Result<Tensor> {
        if let Linear::Lora {
            base, a, b, scale, ..
        } = self
        {
            let low = {
                let _t = prof::span(Phase::Adapter);
                (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * *scale)?
            };
            return base.forward(x)? + low;
        }
        // The product only: the bias is added outside the span, as the rest of the layer.
        let (y, bias) = {
            let _t = prof::span(Phase::Base);
            match self {
                Linear::Blocks(q, b) => (blocks::matmul(q, x)?, b),
                Linear::Quant(q, b) => (q.forward(x)?, b),
                Linear::Dense(w, b) => (x.broadcast_matmul(&w.t()?)?, b),
                Linear::Lora { .. } => unreachable!("adapters return above"),
            }
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub struct Layer {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Token embeddings: quantized rows are dequantized on lookup.
pub enum Embedding {
    Blocks(Arc<QMatrix>),
    Quant(Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

pub struct Weights {
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

/// Per-layer key/value buffers of shape `[batch, kv_heads, capacity, head_dim]`, written in
/// place. A plain cache has `len` slots filled in every row (rows are left-padded); a ragged
/// one ([`Model::new_ragged_cache`], for continuous batching) keeps a length per row, rows being
/// separate sequences at their own positions. Memory is `batch x capacity` either way.
pub struct Cache {
    kv: Kv,
    pub len: usize,
    pub capacity: usize,
    /// Padding slots at the start of each row.
    pub pad: Vec<usize>,
    /// Filled slots per row of a ragged cache (`None`: every row has `len`).
    row_len: Option<Vec<usize>>,
    kv_heads: usize,
    head_dim: usize,
}

impl Cache {
    pub fn new(
        cfg: &Config,
        batch: usize,
        capacity: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Cache> {
        Cache::of_kind(cfg, batch, capacity, dtype, dev, false)
    }

    /// `tensors`: Candle tensors even where plain f32 buffers would do (the CUDA path's
    /// cache, on the CPU).
    fn of_kind(
        cfg: &Config,
        batch: usize,
        capacity: usize,
        dtype: DType,
        dev: &Device,
        tensors: bool,
    ) -> Result<Cache> {
        let shape = (batch, cfg.kv_heads, capacity, cfg.head_dim);
        let kv = if dev.is_cpu() && dtype == DType::F32 && !tensors {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            Kv::Host {
                k: (0..cfg.layers).map(|_| vec![0f32; n]).collect(),
                v: (0..cfg.layers).map(|_| vec![0f32; n]).collect(),
            }
        } else {
            let mut k = Vec::with_capacity(cfg.layers);
            let mut v = Vec::with_capacity(cfg.layers);
            for _ in 0..cfg.layers {
                k.push(Tensor::zeros(shape, dtype, dev)?);
                v.push(Tensor::zeros(shape, dtype, dev)?);
            }
            Kv::Tensors { k, v }
        };
        Ok(Cache {
            kv,
            len: 0,
            capacity,
            pad: vec![0; batch],
            row_len: None,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// Filled slots of row `b`.
    pub fn row_len(&self, b: usize) -> usize {
        match &self.row_len {
            Some(r) => r[b],
            None => self.len,
        }
    }

    /// Bytes held by the key/value buffers.
    pub fn bytes(&self) -> usize {
        match &self.kv {
            Kv::Host { k, v } => k.iter().chain(v).map(|x| x.len() * 4).sum(),
            Kv::Tensors { k, v } => k
                .iter()
                .chain(v)
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
        }
    }

    /// Fill row `row` of this ragged cache with row `from` of `src` (its filled slots only):
    /// a prefilled prompt forked into a decode slot, or a slot moved within this cache
    /// (`src` = `None`).
    pub fn load_row(&mut self, row: usize, src: Option<&Cache>, from: usize) -> Result<()> {
        let Some(lens) = &self.row_len else {
            candle_core::bail!("load_row needs a ragged cache")
        };
        let n = match src {
            Some(c) => {
                if c.pad[from] != 0 {
                    candle_core::bail!("load_row: a padded source row");
                }
                c.row_len(from)
            }
            None => lens[from],
        };
        if n > self.capacity {
            candle_core::bail!(
                "row of {n} slots exceeds the cache capacity {}",
                self.capacity
            );
        }
        let (cap, kvh, hd) = (self.capacity, self.kv_heads, self.head_dim);
        match &mut self.kv {
            Kv::Host { k, v } => {
                let (sk, sv, scap) = match src {
                    Some(c) => match &c.kv {
                        Kv::Host { k, v } => (Some(k), Some(v), c.capacity),
                        Kv::Tensors { .. } => {
                            candle_core::bail!("load_row: caches of different kinds")
                        }
                    },
                    None => (None, None, cap),
                };
                for li in 0..k.len() {
                    for (dst, s) in [
                        (&mut k[li], sk.map(|x| &x[li])),
                        (&mut v[li], sv.map(|x| &x[li])),
                    ] {
                        for h in 0..kvh {
                            let d0 = (row * kvh + h) * cap * hd;
                            let s0 = (from * kvh + h) * scap * hd;
                            match s {
                                Some(s) => {
                                    dst[d0..d0 + n * hd].copy_from_slice(&s[s0..s0 + n * hd])
                                }
                                None => dst.copy_within(s0..s0 + n * hd, d0),
                            }
                        }
                    }
                }
            }
            Kv::Tensors { k, v } => {
                for li in 0..k.len() {
                    for (which, dst) in [&k[li], &v[li]].into_iter().enumerate() {
                        let s = match src.map(|c| &c.kv) {
                            Some(Kv::Tensors { k: sk, v: sv }) => {
                                if which == 0 {
                                    &sk[li]
                                } else {
                                    &sv[li]
                                }
                            }
                            None => dst,
                            Some(Kv::Host { .. }) => {
                                candle_core::bail!("load_row: caches of different kinds")
                            }
                        };
                        // A copy in its own contiguous storage (a row may move within
                        // this very tensor).
                        let part = s.narrow(0, from, 1)?.narrow(2, 0, n)?;
                        let part = if part.is_contiguous() {
                            part.copy()?
                        } else {
                            part.contiguous()?
                        };
                        dst.narrow(0, row, 1)?.slice_set(&part, 2, 0)?;
                    }
                }
            }
        }
        if let Some(lens) = &mut self.row_len {
            lens[row] = n;
        }
        self.pad[row] = 0;
        Ok(())
    }

    /// A cache of `n` rows, each a copy of row 0 of this one: one prefill serves `n` samples.
    pub fn fork(&self, n: usize) -> Result<Cache> {
        if self.row_len.is_some() {
            candle_core::bail!("fork of a ragged cache");
        }
        let kv = match &self.kv {
            Kv::Tensors { k, v } => {
                let rep = |t: &Tensor| -> Result<Tensor> {
                    let row = t.narrow(0, 0, 1)?;
                    row.repeat((n, 1, 1, 1))?.contiguous()
                };
                Kv::Tensors {
                    k: k.iter().map(rep).collect::<Result<_>>()?,
                    v: v.iter().map(rep).collect::<Result<_>>()?,
                }
            }
            Kv::Host { k, v } => {
                let per_row = k[0].len() / self.batch();
                let rep = |t: &Vec<f32>| t[..per_row].repeat(n);
                Kv::Host {
                    k: k.iter().map(rep).collect(),
                    v: v.iter().map(rep).collect(),
                }
            }
        };
        Ok(Cache {
            kv,
            len: self.len,
            capacity: self.capacity,
            pad: vec![self.pad[0]; n],
            row_len: None,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        })
    }
}

/// Where the cache lives: Candle tensors (CUDA, bf16), or plain f32 buffers that emlab's CPU
/// attention kernel reads and writes.
enum Kv {
    Tensors { k: Vec<Tensor>, v: Vec<Tensor> },
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
}

pub struct Model {
    pub cfg: Config,
    pub w: Weights,
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain f32, for the CPU attention path.
    rope_host: (Vec<f32>, Vec<f32>),
    pub device: Device,
    /// Activation dtype: f32 on the CPU, bf16 on CUDA.
    pub dtype: DType,
    /// Keep the KV cache in Candle tensors and attend with Candle's ops, as on CUDA, even on
    /// the CPU in f32 (tests of the CUDA path's cache logic on a machine without a GPU).
    pub tensor_kv: bool,
    /// Edits of the residual stream at layer outputs (steering, ablation), applied by every
    /// forward.
    pub intervention: Option<super::steer::Intervention>,
}

/// Called with each layer's output (`[batch, t, hidden]`, after any intervention).
pub type Capture<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<()>;

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // Inference only: the fused kernel has no backward, which training must avoid.
    candle_nn::ops::rms_norm(x, w, eps as f32)
}

impl Model {
    pub fn new(cfg: Config, w: Weights, device: Device, dtype: DType) -> Result<Model> {
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &device)?;
        let pos = Tensor::arange(0u32, cfg.max_seq as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_seq, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let cos = freqs.cos()?.to_dtype(dtype)?;
        let sin = freqs.sin()?.to_dtype(dtype)?;
        let rope_host = if device.is_cpu() && dtype == DType::F32 {
            (
                cos.flatten_all()?.to_vec1::<f32>()?,
                sin.flatten_all()?.to_vec1::<f32>()?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Model {
            cfg,
            w,
            cos,
            sin,
            rope_host,
            device,
            dtype,
            tensor_kv: false,
            intervention: None,
        })
    }

    /// Replace quantized projections with dense `dtype` ones: more memory, but batched
    /// matmuls then run on the dense GEMM kernels, and gradients can flow (training).
    pub fn dequantize(&mut self) -> Result<()> {
        let dt = self.dtype;
        for l in &mut self.w.layers {
            for lin in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                *lin = lin.to_dense(dt)?;
            }
        }
        self.w.lm_head = self.w.lm_head.to_dense(dt)?;
        match &self.w.embed {
            Embedding::Quant(q) => {
                self.w.embed = Embedding::Dense(q.dequantize(&self.device)?.to_dtype(dt)?)
            }
            Embedding::Blocks(q) => {
                self.w.embed = Embedding::Dense(blocks::dequantize(q, &self.device)?.to_dtype(dt)?)
            }
            Embedding::Dense(_) => {}
        }
        Ok(())
    }

    /// Whether any projection still holds quantized blocks.
    pub fn is_quantized(&self) -> bool {
        fn q(l: &Linear) -> bool {
            match l {
                Linear::Blocks(..) | Linear::Quant(..) => true,
                Linear::Dense(..) => false,
                Linear::Lora { base, .. } => q(base),
            }
        }
        q(&self.w.lm_head)
            || self.w.layers.iter().any(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .any(q)
            })
    }

    /// RoPE `cos` and `sin` tables, `[max_seq, head_dim / 2]` (training writes its own
    /// forward with them).
    pub fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<Cache> {
        Cache::of_kind(
            &self.cfg,
            batch,
            capacity.min(self.cfg.max_seq),
            self.dtype,
            &self.device,
            self.tensor_kv,
        )
    }

    /// A cache of `rows` empty rows, each an independent sequence with its own length: the
    /// decode slots of continuous batching. Rows are filled by [`Cache::load_row`].
    pub fn new_ragged_cache(&self, rows: usize, capacity: usize) -> Result<Cache> {
        let mut c = self.new_cache(rows, capacity)?;
        c.row_len = Some(vec![0; rows]);
        Ok(c)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.w.embed {
            Embedding::Blocks(q) => {
                let (b, t) = ids.dims2()?;
                let flat = ids.flatten_all()?.to_vec1::<u32>()?;
                blocks::embedding(q, &flat, &self.device)?
                    .reshape((b, t, self.cfg.hidden))?
                    .to_dtype(self.dtype)
            }
            Embedding::Quant(q) => {
                let flat = ids.flatten_all()?;
                let rows = q.embedding(&flat)?;
                let (b, t) = ids.dims2()?;
                rows.reshape((b, t, self.cfg.hidden))?.to_dtype(self.dtype)
            }
            Embedding::Dense(e) => {
                let (b, t) = ids.dims2()?;
                e.embedding(&ids.flatten_all()?)?
                    .reshape((b, t, self.cfg.hidden))?
                    .to_dtype(self.dtype)
            }
        }
    }

    /// Run `tokens` (`[batch, t]`, written at cache slots `cache.len..cache.len+t`) and return
    /// the logits of the last position of each row, `[batch, vocab]` in f32. With
    /// `all_logits`, return `[batch, t, vocab]`.
    pub fn forward(&self, tokens: &Tensor, cache: &mut Cache, all_logits: bool) -> Result<Tensor> {
        let t = tokens.dims2()?.1;
        let x = self.forward_hidden(tokens, cache)?;
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?.contiguous()?
        };
        let logits = self.logits(&x)?;
        if all_logits {
            Ok(logits)
        } else {
            logits.squeeze(1)
        }
    }

    /// The LM head on final hidden states `[..., hidden]`: logits `[..., vocab]` in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let _t = prof::span(Phase::Head);
        self.w.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// Like [`Model::forward`], but return the final (normed) hidden states `[batch, t,
    /// hidden]` of every position, for callers that need logits at a few positions only.
    pub fn forward_hidden(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.forward_hidden_capture(tokens, cache, None)
    }

    /// [`Model::forward_hidden`], handing each layer's output to `capture` (activations for
    /// directions; the output is the residual stream after the layer, as the model-organisms
    /// work reads it).
    pub fn forward_hidden_capture(
        &self,
        tokens: &Tensor,
        cache: &mut Cache,
        mut capture: Option<Capture<'_>>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        // A ragged cache may hold more rows than this step runs (its first `b`).
        if b > cache.batch() || (cache.row_len.is_none() && b != cache.batch()) {
            candle_core::bail!("{b} token rows for a cache of {} rows", cache.batch());
        }
        let starts: Vec<usize> = (0..b).map(|r| cache.row_len(r)).collect();
        let longest = starts.iter().max().copied().unwrap_or(0) + t;
        if longest > cache.capacity {
            candle_core::bail!(
                "sequence of {longest} tokens exceeds the cache capacity {}",
                cache.capacity
            );
        }
        // RoPE positions: slot index minus the row's padding (padding slots reuse position 0).
        let mut pos = Vec::with_capacity(b * t);
        for (&p, &start) in cache.pad.iter().zip(&starts) {
            for s in start..start + t {
                pos.push(s.saturating_sub(p) as u32);
            }
        }
        let tables = match cache.kv {
            Kv::Host { .. } => None,
            Kv::Tensors { .. } => Some(self.rope_and_mask(&pos, cache, &starts, t)?),
        };

        let mut x = self.embed(tokens)?;
        for (li, layer) in self.w.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps)?;
            let a = match &tables {
                Some((cos, sin, mask)) => {
                    self.attention(li, layer, &h, cos, sin, mask, cache, &starts)?
                }
                None => self.attention_host(li, layer, &h, &pos, cache, &starts)?,
            };
            x = (x + a)?;
            let h = rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps)?;
            let [g, u]: [Tensor; 2] = Linear::forward_group(&[&layer.gate, &layer.up], &h)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up".into()))?;
            let m = layer.down.forward(&(candle_nn::ops::silu(&g)? * u)?)?;
            x = (x + m)?;
            if let Some(iv) = &self.intervention {
                x = iv.apply(li, x)?;
            }
            if let Some(c) = capture.as_mut() {
                c(li, &x)?;
            }
        }
        match &mut cache.row_len {
            Some(lens) => lens[..b].iter_mut().for_each(|l| *l += t),
            None => cache.len += t,
        }
        rms_norm(&x, &self.w.norm, self.cfg.rms_eps)
    }

    /// RoPE tables for the positions and the additive attention mask `[b, 1, t, total]`
    /// (causal, padding slots hidden), for the tensor attention path.
    fn rope_and_mask(
        &self,
        pos: &[u32],
        cache: &Cache,
        starts: &[usize],
        t: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let b = starts.len();
        let total = starts.iter().max().copied().unwrap_or(0) + t;
        let pos = Tensor::from_slice(pos, b * t, &self.device)?;
        let half = self.cfg.head_dim / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, t, half))?;
        let mut mask = Vec::with_capacity(b * t * total);
        for (&p, &start) in cache.pad.iter().zip(starts) {
            for i in 0..t {
                let qpos = start + i;
                for j in 0..total {
                    // A padding query sees only itself: a row with every key masked would
                    // turn into NaN, and NaN values in the cache poison the real rows too.
                    let visible = (j <= qpos && j >= p) || (qpos < p && j == qpos);
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, total), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin, mask))
    }

    /// Attention on the CPU in f32 with emlab's kernels: RoPE, the cache write and causal
    /// attention over each row's real slots only, so a row's result does not depend on its
    /// padding or on the other rows.
    fn attention_host(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        pos: &[u32],
        cache: &mut Cache,
        starts: &[usize],
    ) -> Result<Tensor> {
        use emlab_kernels::attn;
        let (b, t, _) = h.dims3()?;
        let (nh, nkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let host = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let qkv = Linear::forward_group(&[&layer.q, &layer.k, &layer.v], h)?;
        let mut q = host(&qkv[0])?;
        let mut k = host(&qkv[1])?;
        let v = host(&qkv[2])?;
        let attn_span = prof::span(Phase::Attention);
        let layout = match self.cfg.rope {
            RopeLayout::Half => attn::Rope::Half,
            RopeLayout::Interleaved => attn::Rope::Interleaved,
        };
        let (cos, sin) = &self.rope_host;
        attn::rope(&mut q, nh, hd, pos, cos, sin, layout);
        attn::rope(&mut k, nkv, hd, pos, cos, sin, layout);
        let cap = cache.capacity;
        let Kv::Host { k: kc, v: vc } = &mut cache.kv else {
            candle_core::bail!("host attention on a tensor cache")
        };
        let (kc, vc) = (&mut kc[li], &mut vc[li]);
        // [b, t, kv_heads, hd] → slots start..start+t of [b, kv_heads, cap, hd].
        for (bi, &st) in starts.iter().enumerate() {
            for ti in 0..t {
                for kh in 0..nkv {
                    let src = ((bi * t + ti) * nkv + kh) * hd;
                    let dst = ((bi * nkv + kh) * cap + st + ti) * hd;
                    kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                    vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
        }
        let shape = attn::AttnShape {
            batch: b,
            t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            cap,
        };
        let mut out = vec![0f32; q.len()];
        let scale = 1.0 / (hd as f32).sqrt();
        attn::attention(&q, kc, vc, shape, starts, &cache.pad[..b], scale, &mut out);
        drop(attn_span);
        layer
            .o
            .forward(&Tensor::from_vec(out, (b, t, nh * hd), &self.device)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: &mut Cache,
        starts: &[usize],
    ) -> Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let (nh, nkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let q = layer
            .q
            .forward(h)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = layer
            .k
            .forward(h)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = layer
            .v
            .forward(h)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let attn_span = prof::span(Phase::Attention);
        let (q, k) = match self.cfg.rope {
            RopeLayout::Half => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            RopeLayout::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
        };
        let Kv::Tensors { k: ck, v: cv } = &cache.kv else {
            candle_core::bail!("tensor attention on a host cache")
        };
        let rows = ck[li].dim(0)?;
        if cache.row_len.is_none() {
            ck[li].slice_set(&k, 2, starts[0])?;
            cv[li].slice_set(&v, 2, starts[0])?;
        } else {
            // Ragged rows: each writes at its own position.
            for (bi, &st) in starts.iter().enumerate() {
                ck[li]
                    .narrow(0, bi, 1)?
                    .slice_set(&k.narrow(0, bi, 1)?.contiguous()?, 2, st)?;
                cv[li]
                    .narrow(0, bi, 1)?
                    .slice_set(&v.narrow(0, bi, 1)?.contiguous()?, 2, st)?;
            }
        }
        let total = starts.iter().max().copied().unwrap_or(0) + t;
        let (kc, vc) = if rows == b {
            (ck[li].clone(), cv[li].clone())
        } else {
            (ck[li].narrow(0, 0, b)?, cv[li].narrow(0, 0, b)?)
        };
        let kc = kc.narrow(2, 0, total)?;
        let vc = vc.narrow(2, 0, total)?;
        // Grouped-query attention without copying K/V per head: fold the `rep` query heads that
        // share a KV head into the query length.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&kc.t()?)? * scale)?;
        let scores = scores.reshape((b, nkv, rep, t, total))?;
        let scores = scores.broadcast_add(&mask.unsqueeze(1)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let probs = probs.reshape((b, nkv, rep * t, total))?;
        let out = probs.matmul(&vc.contiguous()?)?;
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        drop(attn_span);
        layer.o.forward(&out)
    }
}

/// Log-softmax of a logits row, for log-probabilities.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
}
