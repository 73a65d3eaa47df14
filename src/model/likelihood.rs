//! Teacher-forced likelihood of answers: each conversation is rendered with the model's own
//! chat template, its assistant tokens found as training finds them ([`super::mask`]: the
//! answer's text and the end-of-turn marker), and the log-probability the model gives each of
//! those tokens after everything before it is summed.
//!
//! Rows run in left-padded batches, longest first; logits are computed only at the positions
//! that predict an answer token (the LM head over a whole 300-token row would cost a tenth of
//! the forward). On the CPU with GGML blocks the products are batch-invariant, so an
//! answer's value does not depend on what shared its batch.

use candle_core::{Tensor, D};

use super::llama::{Cache, Model};
use super::mask::assistant_mask;
use super::tokenizer::ChatTokenizer;
use super::ModelError;

/// The log-likelihood of one answer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AnswerLikelihood {
    /// Answer tokens scored (the end-of-turn marker included).
    pub tokens: usize,
    /// Sum of their log-probabilities (natural log).
    pub sum: f64,
}

impl AnswerLikelihood {
    /// Mean log-probability per answer token.
    pub fn mean(&self) -> f64 {
        self.sum / self.tokens.max(1) as f64
    }
}

/// A conversation rendered and masked: its tokens and which of them are the answer's.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

/// Render and mask conversations (`(role, content)` lists ending in the assistant's answer).
pub fn render(
    tok: &ChatTokenizer,
    conversations: &[Vec<(String, String)>],
) -> Result<Vec<Rendered>, String> {
    conversations
        .iter()
        .enumerate()
        .map(|(i, msgs)| {
            let m = assistant_mask(tok, msgs).map_err(|e| format!("answer {i}: {e}"))?;
            if !m.mask.iter().skip(1).any(|&b| b) {
                return Err(format!("answer {i}: no assistant token to score"));
            }
            Ok(Rendered {
                tokens: m.tokens,
                mask: m.mask,
            })
        })
        .collect()
}

/// Row indices longest first, ties by content: batches are the same whatever order the rows
/// came in, so a row's result does not depend on the input order even where the products are
/// not batch-invariant (dense weights).
pub fn longest_first(rows: &[Rendered]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| {
        (
            std::cmp::Reverse(rows[a].tokens.len()),
            &rows[a].tokens,
            &rows[a].mask,
        )
            .cmp(&(
                std::cmp::Reverse(rows[b].tokens.len()),
                &rows[b].tokens,
                &rows[b].mask,
            ))
    });
    order
}

/// The rows `group` (longest first) as one left-padded batch: tokens `[rows, longest]` and a
/// cache of capacity `longest` holding each row's padding. A row longer than the model's
/// context is refused.
pub fn left_padded(
    model: &Model,
    rows: &[Rendered],
    group: &[usize],
) -> Result<(Tensor, Cache), ModelError> {
    let longest = group
        .iter()
        .map(|&i| rows[i].tokens.len())
        .max()
        .unwrap_or(0);
    if longest > model.cfg.max_seq {
        return Err(ModelError::TooLong {
            tokens: longest,
            new: 0,
            limit: model.cfg.max_seq,
        });
    }
    let mut cache = model.new_cache(group.len(), longest)?;
    let mut flat = Vec::with_capacity(group.len() * longest);
    for (b, &i) in group.iter().enumerate() {
        let pad = longest - rows[i].tokens.len();
        cache.pad[b] = pad;
        flat.extend(std::iter::repeat_n(0u32, pad));
        flat.extend_from_slice(&rows[i].tokens);
    }
    let toks = Tensor::from_vec(flat, (group.len(), longest), &model.device)?;
    Ok((toks, cache))
}

/// Target rows of logits computed at once (bounds the `[rows, vocab]` buffers).
const LOGIT_CHUNK: usize = 256;

/// The likelihood of each rendered answer, `batch` rows per forward.
pub fn likelihoods(
    model: &Model,
    rows: &[Rendered],
    batch: usize,
) -> Result<Vec<AnswerLikelihood>, ModelError> {
    let mut out = vec![
        AnswerLikelihood {
            tokens: 0,
            sum: 0.0
        };
        rows.len()
    ];
    for group in longest_first(rows).chunks(batch.max(1)) {
        let (toks, mut cache) = left_padded(model, rows, group)?;
        let longest = cache.capacity;
        // (answer index, flat hidden row, target token) for every scored token.
        let mut targets: Vec<(usize, usize, u32)> = Vec::new();
        for (b, &i) in group.iter().enumerate() {
            let (r, pad) = (&rows[i], cache.pad[b]);
            for j in 1..r.tokens.len() {
                if r.mask[j] {
                    targets.push((i, b * longest + pad + j - 1, r.tokens[j]));
                }
            }
        }
        let hidden = model.forward_hidden(&toks, &mut cache)?;
        let hidden = hidden.reshape((group.len() * longest, model.cfg.hidden))?;
        for chunk in targets.chunks(LOGIT_CHUNK) {
            let idx: Vec<u32> = chunk.iter().map(|t| t.1 as u32).collect();
            let idx = Tensor::from_vec(idx, chunk.len(), &model.device)?;
            let logits = model.logits(&hidden.index_select(&idx, 0)?)?;
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let labels: Vec<u32> = chunk.iter().map(|t| t.2).collect();
            let labels = Tensor::from_vec(labels, (chunk.len(), 1), &model.device)?;
            let picked = lp.gather(&labels, 1)?.flatten_all()?.to_vec1::<f32>()?;
            for ((i, _, _), p) in chunk.iter().zip(picked) {
                out[*i].tokens += 1;
                out[*i].sum += f64::from(p);
            }
        }
    }
    Ok(out)
}
