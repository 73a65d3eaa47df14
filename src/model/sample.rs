//! Batched sampling with a KV cache. Two schedulers run a list of [`Request`]s (prompt tokens
//! and a seed each) to completion:
//!
//! - [`generate_continuous`] (the default): a fixed number of decode slots; a row that stops
//!   frees its slot for the next request at once. Each distinct prompt is prefilled once and
//!   its KV copied into every slot that samples from it; rows sit at their own positions in a
//!   ragged cache of `slots x capacity`. When nothing is left to start, finished rows leave the
//!   batch (the last row moves into the gap), so no step computes a finished row.
//! - [`generate`] (`static`): one batch to completion. When every request has the same
//!   prompt it is prefilled once and the cache forked; otherwise prompts are left-padded to
//!   one length and masked. Finished rows keep stepping until the longest row ends.
//!
//! Each row draws from its own [`Rng`] seeded by its request, and the CPU kernels compute a
//! row the same whatever else is in its batch, so a sample depends only on its prompt,
//! parameters and seed: the two schedulers, any slot count, request order or thread count
//! give the same tokens (`tests/it/sampling.rs`).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::llama::{Cache, Model, Result};
use crate::util::choice::Choice;
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
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
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

/// How a run's samples share the decode batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Refill a slot as soon as its row stops ([`generate_continuous`]).
    #[default]
    Continuous,
    /// Batches of `batch` requests, each run until its longest row ends ([`generate`]).
    Static,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

impl crate::util::choice::Choice for Scheduler {
    const ALL: &'static [Self] = &[Scheduler::Continuous, Scheduler::Static];
    fn name(self) -> &'static str {
        match self {
            Scheduler::Continuous => "continuous",
            Scheduler::Static => "static",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Scheduler::Continuous => "refill a decode slot as soon as its sample stops",
            Scheduler::Static => "run each batch until its longest sample ends",
        }
    }
}

/// What a [`generate_continuous`] run did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SchedStats {
    pub timing: Timing,
    /// Distinct prompts prefilled.
    pub prompts: usize,
    /// Decode steps (forward passes of the slot batch).
    pub steps: usize,
    /// Mean share of the slots holding a row, over the decode steps.
    pub occupancy: f64,
    /// Bytes of the slots' KV cache.
    pub cache_bytes: usize,
}

/// A prefilled prompt: its one-row cache and next-token logits, kept while requests that
/// sample from it are pending.
struct Prefilled {
    cache: Cache,
    logits: Vec<f32>,
    users: usize,
}

/// The request in a decode slot.
struct Row {
    req: usize,
    rng: Rng,
    tokens: Vec<u32>,
    last: u32,
}

type Done<'d> = &'d mut dyn FnMut(usize, Output) -> Result<()>;

/// The queue of a continuous run: requests not started yet, and the prompts prefilled for
/// them.
struct Queue<'a> {
    model: &'a Model,
    stop_ids: &'a [u32],
    reqs: &'a [Request],
    p: &'a SamplingParams,
    next: usize,
    /// Requests left per prompt, to free a prefilled prompt after its last one.
    users: HashMap<&'a [u32], usize>,
    prefilled: HashMap<&'a [u32], Prefilled>,
    timing: Timing,
    prompts: usize,
}

impl<'a> Queue<'a> {
    /// Start the next pending request in slot `slot` (`== rows.len()` for an empty slot, or
    /// a finished row's); false when nothing is left. A request whose first token ends it
    /// is finished here without taking the slot.
    fn start_into(
        &mut self,
        slot: usize,
        rows: &mut Vec<Row>,
        cache: &mut Cache,
        done: Done<'_>,
    ) -> Result<bool> {
        let dev = &self.model.device;
        while self.next < self.reqs.len() {
            let i = self.next;
            self.next += 1;
            let prompt: &'a [u32] = &self.reqs[i].prompt;
            if !self.prefilled.contains_key(prompt) {
                let t0 = std::time::Instant::now();
                let pre = crate::util::prof::prefill();
                let mut c = self.model.new_cache(1, prompt.len())?;
                let toks = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), dev)?;
                let logits = logit_rows(&self.model.forward(&toks, &mut c, false)?)?.remove(0);
                self.timing.prefill_tokens += prompt.len();
                drop(pre);
                self.timing.prefill_s += t0.elapsed().as_secs_f64();
                self.prompts += 1;
                let users = self.users[prompt];
                self.prefilled.insert(
                    prompt,
                    Prefilled {
                        cache: c,
                        logits,
                        users,
                    },
                );
            }
            let pre = self.prefilled.get_mut(prompt).expect("prefilled above");
            let mut rng = Rng::new(self.reqs[i].seed, 0);
            let t = sample_token(&pre.logits, self.p, &mut rng);
            let finished = if self.stop_ids.contains(&t) {
                Some(Finish::Stop)
            } else if self.p.max_tokens <= 1 {
                Some(Finish::Length)
            } else {
                None
            };
            if finished.is_none() {
                cache.load_row(slot, Some(&pre.cache), 0)?;
            }
            pre.users -= 1;
            if pre.users == 0 {
                self.prefilled.remove(prompt);
            }
            let Some(finish) = finished else {
                self.timing.decode_tokens += 1;
                let row = Row {
                    req: i,
                    rng,
                    tokens: vec![t],
                    last: t,
                };
                if slot == rows.len() {
                    rows.push(row);
                } else {
                    rows[slot] = row;
                }
                return Ok(true);
            };
            let tokens = if finish == Finish::Stop {
                vec![]
            } else {
                vec![t]
            };
            self.timing.decode_tokens += tokens.len();
            done(i, Output { tokens, finish })?;
        }
        Ok(false)
    }
}

/// Run the requests to completion with `slots` decode slots, calling `done(i, output)` as
/// each request `i` finishes (in finishing order). Each output is what [`generate`] gives
/// for that request alone. An error from `done` stops the run.
pub fn generate_continuous(
    model: &Model,
    stop_ids: &[u32],
    reqs: &[Request],
    p: &SamplingParams,
    slots: usize,
    done: Done<'_>,
) -> Result<SchedStats> {
    let mut stats = SchedStats::default();
    if reqs.is_empty() {
        return Ok(stats);
    }
    if reqs.iter().any(|r| r.prompt.is_empty()) {
        candle_core::bail!("empty prompt");
    }
    if p.max_tokens == 0 {
        // Nothing to draw, as `generate` draws nothing.
        for i in 0..reqs.len() {
            let (tokens, finish) = (Vec::new(), Finish::Length);
            done(i, Output { tokens, finish })?;
        }
        return Ok(stats);
    }
    let longest = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    // The last token drawn is never fed back: a row holds at most prompt + max_tokens - 1.
    let capacity = longest + p.max_tokens - 1;
    if longest + p.max_tokens > model.cfg.max_seq {
        candle_core::bail!(
            "prompt of {longest} tokens plus {} new tokens exceeds the model's context of {}",
            p.max_tokens,
            model.cfg.max_seq
        );
    }
    let t_all = std::time::Instant::now();
    let slots = slots.clamp(1, reqs.len());
    let mut cache = model.new_ragged_cache(slots, capacity)?;
    stats.cache_bytes = cache.bytes();
    let mut q = Queue {
        model,
        stop_ids,
        reqs,
        p,
        next: 0,
        users: HashMap::new(),
        prefilled: HashMap::new(),
        timing: Timing::default(),
        prompts: 0,
    };
    for r in reqs {
        *q.users.entry(&r.prompt[..]).or_default() += 1;
    }
    let mut rows: Vec<Row> = Vec::with_capacity(slots);
    for slot in 0..slots {
        if !q.start_into(slot, &mut rows, &mut cache, done)? {
            break;
        }
    }
    let mut occupied = 0usize;
    while !rows.is_empty() {
        let n = rows.len();
        let toks = Tensor::from_vec(rows.iter().map(|r| r.last).collect(), (n, 1), &model.device)?;
        let logits = logit_rows(&model.forward(&toks, &mut cache, false)?)?;
        stats.steps += 1;
        occupied += n;
        let mut finished = Vec::new();
        for (b, row) in rows.iter_mut().enumerate() {
            let t = sample_token(&logits[b], p, &mut row.rng);
            if stop_ids.contains(&t) {
                finished.push((b, Finish::Stop));
                continue;
            }
            row.tokens.push(t);
            row.last = t;
            q.timing.decode_tokens += 1;
            if row.tokens.len() >= p.max_tokens {
                finished.push((b, Finish::Length));
            }
        }
        // Highest rows first: a row moved into a gap comes from above and is still running.
        for &(b, finish) in finished.iter().rev() {
            let tokens = std::mem::take(&mut rows[b].tokens);
            done(rows[b].req, Output { tokens, finish })?;
            if !q.start_into(b, &mut rows, &mut cache, done)? {
                let last = rows.len() - 1;
                if b != last {
                    cache.load_row(b, None, last)?;
                    rows.swap(b, last);
                }
                rows.pop();
            }
        }
    }
    stats.timing = Timing {
        decode_s: t_all.elapsed().as_secs_f64() - q.timing.prefill_s,
        ..q.timing
    };
    stats.prompts = q.prompts;
    stats.occupancy = if stats.steps == 0 {
        0.0
    } else {
        occupied as f64 / (stats.steps * slots) as f64
    };
    Ok(stats)
}

fn logit_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
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
    let pre = crate::util::prof::prefill();
    let same_prompt = reqs.iter().all(|r| r.prompt == reqs[0].prompt);
    let (mut cache, first) = if same_prompt {
        let mut c = model.new_cache(1, capacity)?;
        let toks = Tensor::from_vec(reqs[0].prompt.clone(), (1, longest), dev)?;
        let logits = model.forward(&toks, &mut c, false)?;
        timing.prefill_tokens = longest;
        let row = logit_rows(&logits)?.remove(0);
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
        (c, logit_rows(&logits)?)
    };
    drop(pre);
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
        logits = logit_rows(&model.forward(&toks, &mut cache, false)?)?;
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
