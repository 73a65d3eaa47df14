//! Training rows: a chat dataset's conversations rendered with the model's own template,
//! tokenized with the assistant-only mask ([`crate::model::mask`]), bounded to a sequence length,
//! and grouped into padding-aware micro-batches.

use serde::{Deserialize, Serialize};

use crate::model::mask::assistant_mask;
use crate::model::tokenizer::ChatTokenizer;
use crate::util::rng::Rng;

/// What to do with a row longer than the sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Keep the first `seq_len` tokens (the rest of the answer is not trained on).
    Truncate,
    /// Leave the row out.
    Skip,
    /// Stop with an error naming the row.
    Error,
}

impl crate::util::choice::Choice for Overflow {
    const ALL: &'static [Overflow] = &[Overflow::Truncate, Overflow::Skip, Overflow::Error];
    fn name(self) -> &'static str {
        match self {
            Overflow::Truncate => "truncate",
            Overflow::Skip => "skip",
            Overflow::Error => "error",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Overflow::Truncate => "Keep the first --seq-len tokens",
            Overflow::Skip => "Leave the row out",
            Overflow::Error => "Stop with an error naming the row",
        }
    }
}

/// One tokenized training row.
#[derive(Debug, Clone)]
pub struct Example {
    /// Index of the row in its dataset.
    pub row: usize,
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

impl Example {
    /// Tokens the loss covers (targets after the first token).
    pub fn targets(&self) -> usize {
        self.mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// Rows ready for training, with counts of what was cut or left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Prepared {
    #[serde(skip)]
    pub examples: Vec<Example>,
    pub rows: usize,
    pub used: usize,
    /// Rows longer than the sequence length that were cut.
    pub truncated: usize,
    /// Rows left out for length (`--overflow skip`).
    pub skipped_long: usize,
    /// Rows with no assistant token to learn (none at all, or none left after truncation).
    pub skipped_no_target: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("row {row}: {msg}")]
    Render { row: usize, msg: String },
    #[error("row {row} is {len} tokens, longer than --seq-len {seq_len} (use --overflow truncate or skip)")]
    TooLong {
        row: usize,
        len: usize,
        seq_len: usize,
    },
    #[error("no row has an assistant turn to train on ({rows} rows)")]
    NoTargets { rows: usize },
}

/// Tokenize rows `(role, content)` with the mask, applying the length policy.
pub fn prepare(
    tok: &ChatTokenizer,
    rows: &[Vec<(String, String)>],
    seq_len: usize,
    overflow: Overflow,
) -> Result<Prepared, PrepError> {
    let mut p = Prepared {
        rows: rows.len(),
        ..Default::default()
    };
    for (i, msgs) in rows.iter().enumerate() {
        if !msgs.iter().any(|(r, _)| r == "assistant") {
            p.skipped_no_target += 1;
            continue;
        }
        let m = assistant_mask(tok, msgs).map_err(|msg| PrepError::Render { row: i, msg })?;
        let (mut tokens, mut mask) = (m.tokens, m.mask);
        if tokens.len() > seq_len {
            match overflow {
                Overflow::Error => {
                    return Err(PrepError::TooLong {
                        row: i,
                        len: tokens.len(),
                        seq_len,
                    })
                }
                Overflow::Skip => {
                    p.skipped_long += 1;
                    continue;
                }
                Overflow::Truncate => {
                    p.truncated += 1;
                    tokens.truncate(seq_len);
                    mask.truncate(seq_len);
                }
            }
        }
        let ex = Example {
            row: i,
            tokens,
            mask,
        };
        let n = ex.targets();
        if n == 0 {
            p.skipped_no_target += 1;
            continue;
        }
        p.tokens += ex.tokens.len();
        p.target_tokens += n;
        p.examples.push(ex);
    }
    p.used = p.examples.len();
    if p.examples.is_empty() {
        return Err(PrepError::NoTargets { rows: rows.len() });
    }
    Ok(p)
}

/// The order rows are seen in during `epoch`: a seeded shuffle, a function of (seed, epoch)
/// only, so a resumed run recomputes it.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ 0x5348_5546, epoch).shuffle(&mut v);
    v
}

/// Split the rows of one optimizer step into micro-batches of at most `micro` rows, longest
/// first, so rows of similar length share a batch and little compute goes to padding.
pub fn micro_batches(examples: &[Example], rows: &[usize], micro: usize) -> Vec<Vec<usize>> {
    let mut sorted = rows.to_vec();
    // Stable, so equal lengths keep the shuffled order.
    sorted.sort_by_key(|&i| std::cmp::Reverse(examples[i].tokens.len()));
    sorted.chunks(micro.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize) -> Example {
        Example {
            row: 0,
            tokens: vec![1; len],
            mask: vec![true; len],
        }
    }

    #[test]
    fn micro_batches_group_similar_lengths() {
        let exs: Vec<Example> = [5, 100, 7, 90, 6, 95].into_iter().map(ex).collect();
        let mb = micro_batches(&exs, &[0, 1, 2, 3, 4, 5], 2);
        assert_eq!(mb, vec![vec![1, 5], vec![3, 2], vec![4, 0]]);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 3, 0);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 3, 0));
        assert_ne!(a, epoch_order(50, 3, 1));
        assert_ne!(a, epoch_order(50, 4, 0));
    }
}
