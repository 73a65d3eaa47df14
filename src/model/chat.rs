//! [`LocalChat`]: any model emlab can load, answering chat-completion requests with its own
//! next-token log-probabilities, so judging runs offline through the same code as an
//! endpoint. [`LocalChat::chat`] takes and returns the same JSON an OpenAI-compatible server
//! would; [`LocalChat::chat_many`] answers many at once: one-token logprob requests (what a
//! 0-100 judge sends) are prefilled together, rows that share a prompt prefix (a question's
//! judge prompts, up to the answer) computing that prefix once. The CPU kernels compute a
//! token the same whatever else is in its batch or chunk, so each answer is the one
//! [`LocalChat::chat`] gives.

use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value as J};

use super::sample::{generate, Request, SamplingParams};
use super::{Loaded, ModelError};

pub struct LocalChat {
    pub loaded: Loaded,
}

impl LocalChat {
    pub fn load(path: &Path) -> Result<LocalChat, ModelError> {
        let mut loaded = super::load(path, &super::device())?;
        super::WeightMode::Auto.apply(&mut loaded.model)?;
        Ok(LocalChat { loaded })
    }

    /// Prompt tokens of a request body.
    pub fn prompt_len(&self, body: &J) -> Result<usize, String> {
        Ok(self.prompt(body)?.0.len())
    }

    /// The prompt tokens of a request body, and its `max_tokens`.
    fn prompt(&self, body: &J) -> Result<(Vec<u32>, usize), String> {
        let messages: Vec<(String, String)> = body["messages"]
            .as_array()
            .ok_or("request has no messages")?
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap_or("user").to_string(),
                    m["content"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let tok = &self.loaded.tokenizer;
        let text = tok.render(&messages, true)?;
        let ids = tok.encode(&text)?;
        let max_tokens = body["max_tokens"].as_u64().unwrap_or(16) as usize;
        let m = &self.loaded.model;
        if ids.len() + max_tokens > m.cfg.max_seq {
            return Err(format!("prompt of {} tokens plus {max_tokens} new tokens exceeds the model's context of {}", ids.len(), m.cfg.max_seq));
        }
        Ok((ids, max_tokens))
    }

    /// The `logprobs` object of a response from the first token's log-probabilities, and
    /// the most likely token.
    fn top_logprobs(&self, lp: &[f32], body: &J) -> (J, Option<u32>) {
        let tok = &self.loaded.tokenizer;
        let k = body["top_logprobs"].as_u64().unwrap_or(20) as usize;
        let mut order: Vec<usize> = (0..lp.len()).collect();
        order.sort_unstable_by(|a, b| lp[*b].total_cmp(&lp[*a]));
        let top: Vec<J> = order[..k.min(order.len())]
            .iter()
            .map(|&i| json!({"token": tok.decode(&[i as u32]).unwrap_or_default(), "logprob": lp[i]}))
            .collect();
        let logprobs = json!({"content": [{"token": top.first().map_or(J::Null, |t| t["token"].clone()), "top_logprobs": top}]});
        (logprobs, order.first().map(|&i| i as u32))
    }

    /// The response to a one-token request: the most likely token.
    fn one_token_answer(&self, first: u32, logprobs: J) -> Result<J, String> {
        let tok = &self.loaded.tokenizer;
        let content = if tok.stop_ids.contains(&first) {
            String::new()
        } else {
            tok.decode(&[first])?
        };
        Ok(
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": "length"}]}),
        )
    }

    /// Answer a chat-completion request body: greedy text up to `max_tokens`, and with
    /// `logprobs` the `top_logprobs` most likely first tokens.
    pub fn chat(&self, body: &J) -> Result<J, String> {
        let (ids, max_tokens) = self.prompt(body)?;
        let tok = &self.loaded.tokenizer;
        let m = &self.loaded.model;
        let mut logprobs = J::Null;
        let mut first: Option<u32> = None;
        if body["logprobs"].as_bool() == Some(true) {
            let mut cache = m.new_cache(1, ids.len()).map_err(|e| e.to_string())?;
            let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &m.device)
                .map_err(|e| e.to_string())?;
            let logits = m
                .forward(&t, &mut cache, false)
                .map_err(|e| e.to_string())?;
            let lp = super::llama::log_softmax(&logits)
                .and_then(|x| x.squeeze(0)?.to_vec1::<f32>())
                .map_err(|e| e.to_string())?;
            (logprobs, first) = self.top_logprobs(&lp, body);
        }
        // A one-token answer is the most likely token: no second prefill.
        if let (Some(t), true) = (first, max_tokens <= 1) {
            return self.one_token_answer(t, logprobs);
        }
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: max_tokens.max(1),
        };
        let (out, _) = generate(
            m,
            &tok.stop_ids,
            &[Request {
                prompt: ids,
                seed: 0,
            }],
            &p,
        )
        .map_err(|e| e.to_string())?;
        let content = tok.decode(&out[0].tokens)?;
        Ok(
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": out[0].finish.as_str()}]}),
        )
    }

    /// Answer many request bodies; the same answers as [`LocalChat::chat`] on each, in order.
    /// One-token logprob requests (what a 0-100 judge sends) are prefilled together: sorted
    /// by their tokens, they form a prefix tree; every prefix that at least two requests
    /// share by [`MIN_SHARED`] tokens more than their parent is computed once and copied into
    /// the rows below it, and the rows' own suffixes run as right-padded batches of rows of
    /// similar length. Other requests are answered one by one.
    pub fn chat_many(&self, bodies: &[J]) -> Vec<Result<J, String>> {
        let mut out: Vec<Option<Result<J, String>>> = vec![None; bodies.len()];
        let mut batchable: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            let one = b["logprobs"].as_bool() == Some(true)
                && b["max_tokens"].as_u64().unwrap_or(16) <= 1;
            if !one {
                out[i] = Some(self.chat(b));
                continue;
            }
            match self.prompt(b) {
                Ok((ids, _)) => batchable.push((i, ids)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        batchable.sort_by(|a, b| a.1.cmp(&b.1));
        let rows: Vec<&[u32]> = batchable.iter().map(|(_, ids)| &ids[..]).collect();
        let mut lps: Vec<Option<Result<Vec<f32>, String>>> = vec![None; rows.len()];
        self.level(&rows, 0, None, 0, &mut lps);
        for ((i, _), lp) in batchable.iter().zip(lps) {
            let body = &bodies[*i];
            out[*i] = Some(lp.expect("every row computed").and_then(|lp| {
                let (logprobs, first) = self.top_logprobs(&lp, body);
                let first = first.ok_or("empty vocabulary")?;
                self.one_token_answer(first, logprobs)
            }));
        }
        out.into_iter()
            .map(|o| o.expect("every request answered"))
            .collect()
    }

    /// Rows `rows` (sorted, the first at index `at` of the whole list), all past the first
    /// `base_len` tokens already in `base`: runs sharing at least [`MIN_SHARED`] more tokens
    /// get their common prefix computed once and recurse; the other rows are computed here.
    fn level(
        &self,
        rows: &[&[u32]],
        at: usize,
        base: Option<&super::llama::Cache>,
        base_len: usize,
        out: &mut [Option<Result<Vec<f32>, String>>],
    ) {
        // The longest prefix a row may share: all but its last token, which it computes.
        let room = |r: &[u32]| r.len().saturating_sub(1);
        let need = base_len + MIN_SHARED;
        let mut leaves = Vec::new();
        let mut s = 0;
        while s < rows.len() {
            let mut e = s + 1;
            let mut shared = room(rows[s]);
            while e < rows.len() {
                let l = lcp(rows[e - 1], rows[e]).min(room(rows[e]));
                if l < need {
                    break;
                }
                shared = shared.min(l);
                e += 1;
            }
            if e - s == 1 || shared < need {
                // Too little shared (a row no longer than the prefix): each is a leaf here.
                leaves.extend(s..e);
            } else {
                match self.extend(base, base_len, &rows[s][..shared]) {
                    Ok(c) => self.level(&rows[s..e], at + s, Some(&c), shared, out),
                    Err(err) => {
                        for o in &mut out[at + s..at + e] {
                            *o = Some(Err(err.to_string()));
                        }
                    }
                }
            }
            s = e;
        }
        // The rest, by length, in groups that pad little.
        leaves.sort_by_key(|&r| rows[r].len());
        let mut g0 = 0;
        while g0 < leaves.len() {
            let mut g1 = g0 + 1;
            let mut real = rows[leaves[g0]].len() - base_len;
            while g1 < leaves.len() && g1 - g0 < MAX_ROWS {
                let len = rows[leaves[g1]].len() - base_len;
                // Rows are sorted, so this one is the longest: padding is n*len - real.
                if (g1 - g0 + 1) * len > real + len + len / 4 + 16 {
                    break;
                }
                real += len;
                g1 += 1;
            }
            let group: Vec<&[u32]> = leaves[g0..g1]
                .iter()
                .map(|&r| &rows[r][base_len..])
                .collect();
            let r = self.group_logprobs(&group, base, base_len);
            for (k, &leaf) in leaves[g0..g1].iter().enumerate() {
                out[at + leaf] = Some(match &r {
                    Ok(lps) => Ok(lps[k].clone()),
                    Err(e) => Err(e.to_string()),
                });
            }
            g0 = g1;
        }
    }

    /// A one-row cache holding `prefix`: `base` (its first `base_len` tokens) extended.
    fn extend(
        &self,
        base: Option<&super::llama::Cache>,
        base_len: usize,
        prefix: &[u32],
    ) -> candle_core::Result<super::llama::Cache> {
        let m = &self.loaded.model;
        let mut c = m.new_ragged_cache(1, prefix.len())?;
        if let Some(b) = base {
            c.load_row(0, Some(b), 0)?;
        }
        let rest = &prefix[base_len..];
        let t = Tensor::from_vec(rest.to_vec(), (1, rest.len()), &m.device)?;
        m.forward_hidden(&t, &mut c)?;
        Ok(c)
    }

    /// Log-probabilities of the next token after each of `suffixes`, each following the
    /// `base_len` tokens of `base`: right-padded to the longest, in one forward.
    fn group_logprobs(
        &self,
        suffixes: &[&[u32]],
        base: Option<&super::llama::Cache>,
        base_len: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let m = &self.loaded.model;
        let n = suffixes.len();
        let t = suffixes.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut cache = m.new_ragged_cache(n, base_len + t)?;
        if let Some(p) = base {
            for row in 0..n {
                cache.load_row(row, Some(p), 0)?;
            }
        }
        // Padding after a row's last token: later positions cannot change earlier ones.
        let mut toks = Vec::with_capacity(n * t);
        for s in suffixes {
            toks.extend_from_slice(s);
            toks.extend(std::iter::repeat_n(0u32, t - s.len()));
        }
        let toks = Tensor::from_vec(toks, (n, t), &m.device)?;
        let hidden = m.forward_hidden(&toks, &mut cache)?;
        let last: Vec<Tensor> = suffixes
            .iter()
            .enumerate()
            .map(|(b, s)| hidden.narrow(0, b, 1)?.narrow(1, s.len() - 1, 1))
            .collect::<candle_core::Result<_>>()?;
        let last = Tensor::cat(&last, 0)?.contiguous()?;
        let logits = m.logits(&last)?.squeeze(1)?;
        super::llama::log_softmax(&logits)?.to_vec2::<f32>()
    }
}

/// Tokens a run of requests must share beyond its parent prefix for that prefix to be
/// computed once for them.
pub const MIN_SHARED: usize = 16;
/// Rows prefilled together.
const MAX_ROWS: usize = 16;

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
