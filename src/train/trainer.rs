//! One optimizer step, the same for the training job and `bench train`: [`Trainer::step`]
//! accumulates the gradients of a step's micro-batches ([`step_grads`]), clips their global
//! norm, and applies AdamW, unless the loss or the norm is not finite (then nothing is
//! applied and the caller decides). [`Trainer::eval_loss`] measures a held-out set.

use candle_core::Device;

use super::backprop::{loss_and_grads_merged, Batch, FrozenBf16, Grads, Merged, PassOpts};
use super::data::{micro_batches, Example};
use super::lora::LoraParams;
use super::optim::{clip, AdamW};
use super::TrainError;
use crate::model::llama::Model;
use crate::model::{load, Loaded, ModelError};

/// Load a base model for training: dense weights in the activation dtype.
pub fn load_base(path: &std::path::Path) -> Result<Loaded, TrainError> {
    let device = crate::model::device();
    let mut loaded = load(path, &device)?;
    loaded.model.dequantize().map_err(ModelError::from)?;
    Ok(loaded)
}

/// The micro-batch of `examples[idx]`.
fn batch_of(examples: &[Example], idx: &[usize], dev: &Device) -> candle_core::Result<Batch> {
    let rows: Vec<(&[u32], &[bool])> = idx
        .iter()
        .map(|&i| (examples[i].tokens.as_slice(), examples[i].mask.as_slice()))
        .collect();
    Batch::new(&rows, dev)
}

/// Mean loss per target token over `examples`, no gradients; the base products in bf16
/// when `frozen` is given.
pub fn eval_loss(
    model: &Model,
    params: &LoraParams,
    examples: &[Example],
    micro: usize,
    frozen: Option<&FrozenBf16>,
) -> Result<f64, TrainError> {
    let idx: Vec<usize> = (0..examples.len()).collect();
    let merged = match frozen {
        None => Some(Merged::new(model, params)?),
        Some(_) => None,
    };
    let mut sum = 0.0;
    let mut n = 0usize;
    for mb in micro_batches(examples, &idx, micro) {
        let batch = batch_of(examples, &mb, &model.device)?;
        let mut o = PassOpts::new(1.0);
        o.backward = false;
        sum += loss_and_grads_merged(model, params, &batch, o, merged.as_ref(), frozen)?.0;
        n += batch.targets();
    }
    Ok(sum / n.max(1) as f64)
}

/// What one step's gradients cover.
pub struct StepGrads {
    /// Summed loss over the step's target tokens.
    pub loss_sum: f64,
    /// Target tokens (the loss's denominator).
    pub targets: usize,
    /// Tokens processed, padding excluded.
    pub tokens: usize,
    pub grads: Grads,
}

/// One optimizer step's gradients over `rows` (indices into `examples`), accumulated over
/// micro-batches of `micro` rows. The base products run in bf16 when `frozen` is given.
pub fn step_grads(
    model: &Model,
    params: &LoraParams,
    examples: &[Example],
    rows: &[usize],
    micro: usize,
    dropout_seed: u64,
    frozen: Option<&FrozenBf16>,
) -> Result<StepGrads, TrainError> {
    let denom: usize = rows.iter().map(|&i| examples[i].targets()).sum();
    let mut grads = Grads::zeros(params)?;
    let mut loss = 0.0;
    let mut tokens = 0;
    let merged = if params.spec.dropout == 0.0 && frozen.is_none() {
        Some(Merged::new(model, params)?)
    } else {
        None
    };
    for (k, mb) in micro_batches(examples, rows, micro).into_iter().enumerate() {
        tokens += mb.iter().map(|&i| examples[i].tokens.len()).sum::<usize>();
        let batch = batch_of(examples, &mb, &model.device)?;
        let mut o = PassOpts::new(denom.max(1) as f64);
        o.dropout_seed = dropout_seed.wrapping_add(k as u64);
        let (l, g) = loss_and_grads_merged(model, params, &batch, o, merged.as_ref(), frozen)?;
        loss += l;
        if let Some(g) = g {
            grads.add(&g)?;
        }
    }
    Ok(StepGrads {
        loss_sum: loss,
        targets: denom,
        tokens,
        grads,
    })
}

/// Figures of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss per target token.
    pub loss: f64,
    pub targets: usize,
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the loss or the norm was not finite: the update was not applied.
    pub applied: bool,
    /// Mean KL(reference || model) per token over the step's KL rows (a KL-regularised run).
    pub kl: Option<f64>,
}

/// A model, its trainable adapter and optimizer, and how steps are run.
pub struct Trainer<'m> {
    pub model: &'m Model,
    pub params: LoraParams,
    pub opt: AdamW,
    /// The frozen weights packed for bf16 products, when the run asks for them.
    pub frozen: Option<FrozenBf16>,
    pub micro_batch: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// The KL regulariser, when the run has one.
    pub kl: Option<super::kl::KlTerm>,
}

impl<'m> Trainer<'m> {
    /// `bf16_base` packs the frozen weights for bf16 products (CPU only; CUDA trains in the
    /// model's own dtype).
    pub fn new(
        model: &'m Model,
        params: LoraParams,
        opt: AdamW,
        bf16_base: bool,
        micro_batch: usize,
        max_grad_norm: f64,
    ) -> Result<Trainer<'m>, TrainError> {
        let frozen = if bf16_base && model.device.is_cpu() {
            Some(FrozenBf16::new(model)?)
        } else {
            None
        };
        Ok(Trainer {
            model,
            params,
            opt,
            frozen,
            micro_batch,
            max_grad_norm,
            kl: None,
        })
    }

    /// One optimizer step on `rows` of `examples` with learning rate `lr`: gradients,
    /// clipping, then AdamW, unless the loss or gradient norm is not finite.
    pub fn step(
        &mut self,
        examples: &[Example],
        rows: &[usize],
        dropout_seed: u64,
        lr: f64,
    ) -> Result<StepStats, TrainError> {
        self.step_at(examples, rows, None, dropout_seed, lr)
    }

    /// [`Trainer::step`] as step `index` (0-based) of its run: with a KL term, the step's KL
    /// rows add `weight x` their mean KL to the reference to the objective (the reported
    /// `loss` stays the cross-entropy; `kl` is the KL).
    pub fn step_at(
        &mut self,
        examples: &[Example],
        rows: &[usize],
        index: Option<usize>,
        dropout_seed: u64,
        lr: f64,
    ) -> Result<StepStats, TrainError> {
        let mut g = step_grads(
            self.model,
            &self.params,
            examples,
            rows,
            self.micro_batch,
            dropout_seed,
            self.frozen.as_ref(),
        )?;
        let loss = g.loss_sum / g.targets.max(1) as f64;
        let mut kl = None;
        if let (Some(term), Some(index)) = (&self.kl, index) {
            let krows = term.rows(index);
            let (sum, n, kg) = super::kl::kl_pass(
                self.model,
                &self.params,
                &term.reference,
                &term.examples,
                &krows,
                self.micro_batch,
                term.weight,
                true,
                None,
                self.frozen.as_ref(),
                // Other masks than the cross-entropy pass's.
                dropout_seed ^ 0x4B4C_4B4C_4B4C_4B4C,
            )?;
            if let Some(kg) = kg {
                g.grads.add(&kg)?;
            }
            kl = Some(sum / n.max(1) as f64);
        }
        let norm = clip(&mut g.grads, self.max_grad_norm)?;
        let applied = loss.is_finite() && norm.is_finite() && kl.is_none_or(f64::is_finite);
        if applied {
            self.opt.step(&mut self.params, &g.grads, lr)?;
        }
        Ok(StepStats {
            loss,
            targets: g.targets,
            tokens: g.tokens,
            grad_norm: norm,
            applied,
            kl,
        })
    }

    /// Mean held-out loss per target token with the current adapter.
    pub fn eval_loss(&self, examples: &[Example]) -> Result<f64, TrainError> {
        eval_loss(
            self.model,
            &self.params,
            examples,
            self.micro_batch,
            self.frozen.as_ref(),
        )
    }
}
