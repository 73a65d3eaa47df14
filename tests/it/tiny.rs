//! Tiny random-weight models built in memory (seeded, dense f32): for tests and benchmarks
//! that must run anywhere in milliseconds. Same code path as real models after loading. Test
//! support, not library API: the integration tests and `benches/` include this file.

use candle_core::{DType, Device, Tensor};

use emlab::model::llama::{
    Arch, Config, Embedding, Layer, Linear, Model, Result, RopeLayout, Weights,
};
use emlab::util::rng::Rng;

/// A small Llama-shaped config (GQA 4 heads over 2 KV heads).
pub fn tiny_config(vocab: usize) -> Config {
    Config {
        arch: Arch::Llama,
        vocab,
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_eps: 1e-6,
        max_seq: 512,
        tie_embeddings: false,
        rope: RopeLayout::Half,
    }
}

/// Build a model with uniform(-scale, scale) weights from `seed`.
pub fn random_model(cfg: Config, seed: u64) -> Result<Model> {
    random_model_in(cfg, seed, DType::F32)
}

/// [`random_model`] in another dtype (f64 for finite-difference gradient checks).
pub fn random_model_in(cfg: Config, seed: u64, dtype: DType) -> Result<Model> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed, 0);
    let mut t = |shape: (usize, usize), scale: f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| ((rng.unit() * 2.0 - 1.0) * scale) as f32)
            .collect();
        Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)
    };
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let ones = Tensor::ones(h, dtype, &dev)?;
    let mut layers = Vec::with_capacity(cfg.layers);
    for _ in 0..cfg.layers {
        layers.push(Layer {
            q: Linear::Dense(t((cfg.heads * hd, h), 0.2)?, None),
            k: Linear::Dense(t((cfg.kv_heads * hd, h), 0.2)?, None),
            v: Linear::Dense(t((cfg.kv_heads * hd, h), 0.2)?, None),
            o: Linear::Dense(t((h, cfg.heads * hd), 0.2)?, None),
            gate: Linear::Dense(t((cfg.intermediate, h), 0.2)?, None),
            up: Linear::Dense(t((cfg.intermediate, h), 0.2)?, None),
            down: Linear::Dense(t((h, cfg.intermediate), 0.2)?, None),
            attn_norm: (t((1, h), 0.3)?.squeeze(0)? + &ones)?,
            ffn_norm: (t((1, h), 0.3)?.squeeze(0)? + &ones)?,
        });
    }
    let embed = t((cfg.vocab, h), 0.5)?;
    let lm_head = Linear::Dense(t((cfg.vocab, h), 0.5)?, None);
    let w = Weights {
        embed: Embedding::Dense(embed),
        layers,
        norm: ones,
        lm_head,
    };
    Model::new(cfg, w, dev, dtype)
}
