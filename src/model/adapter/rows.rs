//! Row order of q/k projections. llama.cpp permutes the q and k rows of Llama (and Mistral)
//! weights when it converts them to GGUF, so that rotary pairs sit next to each other
//! (`RopeLayout::Interleaved`). Anything written in Hugging Face order (a PEFT `B`, an HF
//! weight) must be permuted to be used with such a model's weights, and back to be written.

use candle_core::Tensor;

use super::Projection;
use crate::model::llama::{Config, RopeLayout};

/// Row order of a q or k projection in a GGUF Llama file, relative to HF's: GGUF row
/// `h*hd + 2i + j` holds HF row `h*hd + j*hd/2 + i`.
fn gguf_rows(heads: usize, hd: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(heads * hd);
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                v.push((h * hd + j * hd / 2 + i) as u32);
            }
        }
    }
    v
}

fn inverse(p: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; p.len()];
    for (i, &x) in p.iter().enumerate() {
        inv[x as usize] = i as u32;
    }
    inv
}

/// For a permuted (GGUF Llama) model, the row permutation taking HF-order rows of projection
/// `p` to the model's order, if any.
fn row_perm(cfg: &Config, p: Projection) -> Option<Vec<u32>> {
    if cfg.rope != RopeLayout::Interleaved {
        return None;
    }
    match p {
        Projection::Q => Some(gguf_rows(cfg.heads, cfg.head_dim)),
        Projection::K => Some(gguf_rows(cfg.kv_heads, cfg.head_dim)),
        _ => None,
    }
}

fn permute_rows(t: &Tensor, perm: &[u32]) -> candle_core::Result<Tensor> {
    let idx = Tensor::from_slice(perm, perm.len(), t.device())?;
    t.index_select(&idx, 0)
}

/// Put the rows of a LoRA `B` (or any output-major matrix) of projection `p`, given in HF
/// order, into the model's own order.
pub fn hf_to_model_rows(cfg: &Config, p: Projection, t: &Tensor) -> candle_core::Result<Tensor> {
    match row_perm(cfg, p) {
        Some(perm) => permute_rows(t, &perm),
        None => Ok(t.clone()),
    }
}

/// Put the rows of projection `p`'s weight (or LoRA `B`), in the model's order, into HF order.
pub fn model_to_hf_rows(cfg: &Config, p: Projection, t: &Tensor) -> candle_core::Result<Tensor> {
    match row_perm(cfg, p) {
        Some(perm) => permute_rows(t, &inverse(&perm)),
        None => Ok(t.clone()),
    }
}
