//! The KL regulariser of fine-tuning (one of the in-training defences against emergent
//! misalignment, Kaczér et al. 2025): the loss adds `weight x` the mean, over a KL dataset's
//! assistant target tokens, of `KL(reference || model)` between the next-token distributions,
//! the reference being the base model or the `--from` checkpoint.
//!
//! Normalised per token, not per vocabulary entry: the model-organisms trainer divides by the
//! vocabulary size as well, so its weights (1e5 and up) mean something different for every
//! vocabulary; here a weight of 1 weighs a nat of KL per token like a nat of cross-entropy.
//!
//! The reference's log-probabilities are computed on the fly, in the same step, by the same
//! forward as the trained model's ([`crate::train::backprop::reference_logprobs`]): nothing is
//! cached, and a model equal to its reference (adapter `B = 0`, reference the base) has a KL of
//! exactly zero. Step `s` uses the KL rows `s x batch .. (s + 1) x batch` (cyclically), so a
//! resumed run sees the same rows.

use serde::{Deserialize, Serialize};

use super::backprop::{
    loss_and_grads_merged, reference_logprobs, Batch, FrozenBf16, Grads, Merged, PassOpts,
};
use super::data::{micro_batches, Example};
use super::lora::LoraParams;
use crate::model::llama::Model;

/// The KL term as recorded in the training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlConfig {
    /// The KL dataset's id.
    pub data: String,
    pub weight: f64,
    /// `base` or `parent` (the `--from` checkpoint).
    pub reference: String,
}

/// What a run regularises towards, ready to use.
pub struct KlTerm {
    pub examples: Vec<Example>,
    pub weight: f64,
    /// The reference adapter: no pairs for the base model, the parent's for `parent`.
    pub reference: LoraParams,
    /// KL rows per step.
    pub rows_per_step: usize,
}

impl KlTerm {
    /// The KL rows of step `step` (0-based).
    pub fn rows(&self, step: usize) -> Vec<usize> {
        let n = self.examples.len().max(1);
        (0..self.rows_per_step.min(n))
            .map(|i| (step * self.rows_per_step + i) % n)
            .collect()
    }
}

/// The base model as a reference: an adapter without pairs.
pub fn base_reference(like: &LoraParams, model: &Model) -> candle_core::Result<LoraParams> {
    let mut spec = like.spec.clone();
    spec.targets.clear();
    LoraParams::init(spec, model, 0)
}

/// `rows` of `examples` in micro-batches: the summed KL over their target tokens, the
/// tokens, and (with `grads`) the gradient of `weight x sum / tokens`. `dropout_seed` seeds
/// the adapters' dropout masks (micro-batch `k` adds `k`), as the cross-entropy pass does.
#[allow(clippy::too_many_arguments)]
pub fn kl_pass(
    model: &Model,
    params: &LoraParams,
    reference: &LoraParams,
    examples: &[Example],
    rows: &[usize],
    micro: usize,
    weight: f64,
    grads: bool,
    merged: Option<&Merged>,
    frozen: Option<&FrozenBf16>,
    dropout_seed: u64,
) -> candle_core::Result<(f64, usize, Option<Grads>)> {
    let targets: usize = rows.iter().map(|&i| examples[i].targets()).sum();
    let mut sum = 0.0;
    let mut acc = if grads {
        Some(Grads::zeros(params)?)
    } else {
        None
    };
    for (k, mb) in micro_batches(examples, rows, micro).into_iter().enumerate() {
        let r: Vec<(&[u32], &[bool])> = mb
            .iter()
            .map(|&i| (examples[i].tokens.as_slice(), examples[i].mask.as_slice()))
            .collect();
        let mut batch = Batch::new(&r, &model.device)?;
        if batch.targets() == 0 {
            continue;
        }
        batch.kl_reference = Some(reference_logprobs(model, reference, &batch, frozen)?);
        // The gradient of weight * sum / targets.
        let mut o = PassOpts::new(targets.max(1) as f64 / weight);
        o.backward = grads && weight != 0.0;
        o.dropout_seed = dropout_seed.wrapping_add(k as u64);
        let (l, g) = loss_and_grads_merged(model, params, &batch, o, merged, frozen)?;
        sum += l;
        if let (Some(acc), Some(g)) = (acc.as_mut(), g) {
            acc.add(&g)?;
        }
    }
    Ok((sum, targets, acc))
}

/// Mean KL(reference || model) per target token over `examples` (held-out KL).
pub fn mean_kl(
    model: &Model,
    params: &LoraParams,
    reference: &LoraParams,
    examples: &[Example],
    micro: usize,
) -> candle_core::Result<f64> {
    let rows: Vec<usize> = (0..examples.len()).collect();
    let (sum, n, _) = kl_pass(
        model, params, reference, examples, &rows, micro, 1.0, false, None, None, 0,
    )?;
    Ok(sum / n.max(1) as f64)
}
