//! Batched sampling with a KV cache: [`generate`] runs a batch of [`Request`]s (prompt tokens
//! and a seed each) to completion.
//!
//! When every request has the same prompt (N samples of one question) the prompt is
//! prefilled once and the cache forked to N rows; otherwise prompts are left-padded to one
//! length and masked. Each row draws from its own [`Rng`] seeded by its request, so a sample
//! depends only on its prompt, parameters and seed, not on what else shared its batch.

use candle_core::{Device, Tensor};

use super::llama::{Model, Result};
use crate::util::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Output {
    /// Generated tokens, without the stop token.
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Timings of one [`generate`] call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub decode_tokens: usize,
    pub decode_s: f64,
}

/// Draw a token from logits: greedy at temperature 0, else softmax(logits / T) restricted to
/// the smallest set of top tokens whose mass reaches `top_p`.
pub fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) * inv_t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    if p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let mut keep = 0;
        for &i in &order {
            mass += probs[i] / total;
            keep += 1;
            if mass >= p.top_p {
                break;
            }
        }
        let kept = &order[..keep];
        let kept_total: f64 = kept.iter().map(|&i| probs[i]).sum();
        let mut r = rng.unit() * kept_total;
        for &i in kept {
            r -= probs[i];
            if r < 0.0 {
                return i as u32;
            }
        }
        return kept[keep - 1] as u32;
    }
    let mut r = rng.unit() * total;
    for (i, pr) in probs.iter_mut().enumerate() {
        r -= *pr;
        if r < 0.0 {
            return i as u32;
        }
    }
    argmax(logits)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    logits.to_vec2::<f32>()
}

/// Run the requests to completion (stop token or `max_tokens`).
pub fn generate(
    model: &Model,
    stop_ids: &[u32],
    reqs: &[Request],
    p: &SamplingParams,
) -> Result<(Vec<Output>, Timing)> {
    let n = reqs.len();
    if n == 0 {
        return Ok((Vec::new(), Timing::default()));
    }
    let dev: &Device = &model.device;
    let longest = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    if longest == 0 {
        candle_core::bail!("empty prompt");
    }
    let capacity = longest + p.max_tokens;
    if capacity > model.cfg.max_seq {
        candle_core::bail!(
            "prompt of {longest} tokens plus {} new tokens exceeds the model's context of {}",
            p.max_tokens,
            model.cfg.max_seq
        );
    }
    let mut timing = Timing::default();
    let t0 = std::time::Instant::now();
    let same_prompt = reqs.iter().all(|r| r.prompt == reqs[0].prompt);
    let (mut cache, first) = if same_prompt {
        let mut c = model.new_cache(1, capacity)?;
        let toks = Tensor::from_vec(reqs[0].prompt.clone(), (1, longest), dev)?;
        let logits = model.forward(&toks, &mut c, false)?;
        timing.prefill_tokens = longest;
        let row = rows(&logits)?.remove(0);
        (c.fork(n)?, vec![row; n])
    } else {
        let mut c = model.new_cache(n, capacity)?;
        let mut flat = Vec::with_capacity(n * longest);
        for (b, r) in reqs.iter().enumerate() {
            let pad = longest - r.prompt.len();
            c.pad[b] = pad;
            flat.extend(std::iter::repeat_n(0u32, pad));
            flat.extend_from_slice(&r.prompt);
        }
        let toks = Tensor::from_vec(flat, (n, longest), dev)?;
        let logits = model.forward(&toks, &mut c, false)?;
        timing.prefill_tokens = reqs.iter().map(|r| r.prompt.len()).sum();
        (c, rows(&logits)?)
    };
    timing.prefill_s = t0.elapsed().as_secs_f64();

    let t1 = std::time::Instant::now();
    let mut rngs: Vec<Rng> = reqs.iter().map(|r| Rng::new(r.seed, 0)).collect();
    let mut outs: Vec<Output> = (0..n)
        .map(|_| Output {
            tokens: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; n];
    let mut logits = first;
    let mut last = vec![0u32; n];
    for step in 0..p.max_tokens {
        for b in 0..n {
            if done[b] {
                continue;
            }
            let t = sample_token(&logits[b], p, &mut rngs[b]);
            last[b] = t;
            if stop_ids.contains(&t) {
                done[b] = true;
                outs[b].finish = Finish::Stop;
            } else {
                outs[b].tokens.push(t);
                timing.decode_tokens += 1;
            }
        }
        if done.iter().all(|d| *d) || step + 1 == p.max_tokens {
            break;
        }
        // Finished rows keep stepping on their last token; their logits are ignored.
        let toks = Tensor::from_vec(last.clone(), (n, 1), dev)?;
        logits = rows(&model.forward(&toks, &mut cache, false)?)?;
    }
    timing.decode_s = t1.elapsed().as_secs_f64();
    Ok((outs, timing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let p0 = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: 1,
        };
        assert_eq!(sample_token(&logits, &p0, &mut Rng::new(1, 0)), 1);
        let p1 = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 1,
        };
        let draw = |seed| {
            (0..50)
                .map(|i| sample_token(&logits, &p1, &mut Rng::new(seed, i)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
        // top_p small enough keeps only the best token.
        let p2 = SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            max_tokens: 1,
        };
        assert!((0..50).all(|i| sample_token(&logits, &p2, &mut Rng::new(9, i)) == 1));
        // Every token is reachable at temperature 1 without top_p.
        let seen: std::collections::HashSet<u32> = (0..500)
            .map(|i| sample_token(&logits, &p1, &mut Rng::new(3, i)))
            .collect();
        assert_eq!(seen.len(), 4);
    }
}
