//! The head: final RMSNorm, logits at the target positions only (in chunks, bounding the
//! `[rows, vocab]` buffers), cross-entropy in f32 (f64 for f64 models), and its gradient
//! back to the last layer's output.

use candle_core::{DType, Tensor};

use super::linear::{base_weight, bf16_matmul, FrozenBf16};
use super::norm::{rms_backward, rms_forward};
use super::{ops, Batch, PassOpts, Result};
use crate::model::llama::Model;
use crate::util::prof::{self, Phase};

/// The dtype of the loss arithmetic: f32, f64 for f64 models.
fn ce_dtype(model: &Model) -> DType {
    if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Logits `[positions, vocab]` (in `ce_dt`) of the normed hidden rows `xf` at `positions`,
/// and their log-sum-exp `[positions, 1]`.
fn logits_at(
    xf: &Tensor,
    lm: &Tensor,
    frozen: Option<&FrozenBf16>,
    positions: &[u32],
    ce_dt: DType,
) -> Result<(Tensor, Tensor)> {
    let pos = Tensor::from_slice(positions, positions.len(), xf.device())?;
    let xs = xf.index_select(&pos, 0)?;
    let logits = match frozen {
        Some(f) => bf16_matmul(&xs, &f.lm.0, None)?,
        None => xs.matmul(&lm.t()?)?,
    }
    .to_dtype(ce_dt)?;
    let lse = ops::log_sum_exp(&logits)?;
    Ok((logits, lse))
}

/// The summed cross-entropy of the batch's targets (with `batch.kl_reference`: the summed
/// KL(reference || model) at them) and, with `opts.backward` and at least one target, the
/// gradient of `sum / opts.denom` with respect to `x` (`[n, hidden]`).
pub(super) fn head(
    model: &Model,
    x: &Tensor,
    batch: &Batch,
    opts: &PassOpts,
    frozen: Option<&FrozenBf16>,
) -> Result<(f64, Option<Tensor>)> {
    let _t = prof::span(Phase::Head);
    let (dt, dev) = (model.dtype, &model.device);
    let (xf, xnf, invf) = rms_forward(x, &model.w.norm, model.cfg.rms_eps)?;
    let lm = base_weight(&model.w.lm_head)?;
    let ce_dt = ce_dtype(model);
    let ntarget = batch.positions.len();
    let mut loss = 0f64;
    let mut dsel = Vec::new();
    let chunk = opts.logit_chunk.max(1);
    let mut start = 0;
    while start < ntarget {
        let c = chunk.min(ntarget - start);
        let (logits, lse) = logits_at(&xf, lm, frozen, &batch.positions[start..start + c], ce_dt)?;
        let (part, dl) = match &batch.kl_reference {
            Some(reference) => {
                // KL(reference || model) = sum_v p_ref (log p_ref - log p_model), per
                // position; its gradient in the logits is softmax(logits) - p_ref.
                let r = reference.narrow(0, start, c)?.to_dtype(ce_dt)?;
                let p_ref = r.exp()?;
                let logp = logits.broadcast_sub(&lse)?;
                let part = (&p_ref * (&r - &logp)?)?;
                let dl = if opts.backward {
                    Some(((logp.exp()? - p_ref)? / opts.denom)?)
                } else {
                    None
                };
                (part, dl)
            }
            None => {
                let lab = Tensor::from_slice(&batch.labels[start..start + c], (c, 1), dev)?;
                let part = (&lse - logits.gather(&lab, 1)?)?;
                // d/dlogits of sum(CE) / denom: softmax minus one-hot.
                let dl = if opts.backward {
                    Some(ops::cross_entropy_grad(&logits, &lse, &lab, opts.denom)?)
                } else {
                    None
                };
                (part, dl)
            }
        };
        loss += part.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if let Some(dl) = dl {
            let dl = dl.to_dtype(dt)?;
            dsel.push(match frozen {
                Some(f) => bf16_matmul(&dl, &f.lm.1, None)?,
                None => dl.matmul(lm)?,
            });
        }
        start += c;
    }
    if dsel.is_empty() {
        return Ok((loss, None));
    }
    let dxs = Tensor::cat(&dsel, 0)?;
    drop(xf);
    let n = x.dims()[0];
    let pos = Tensor::from_slice(&batch.positions, ntarget, dev)?;
    let dxf = Tensor::zeros((n, model.cfg.hidden), dt, dev)?.index_add(&pos, &dxs, 0)?;
    Ok((loss, Some(rms_backward(&xnf, &invf, &model.w.norm, &dxf)?)))
}

/// Log-probabilities `[targets, vocab]` (cross-entropy dtype) at the batch's target
/// positions: a KL pass's reference.
pub(super) fn logprobs(
    model: &Model,
    x: &Tensor,
    batch: &Batch,
    opts: &PassOpts,
    frozen: Option<&FrozenBf16>,
) -> Result<Tensor> {
    let (xf, _, _) = rms_forward(x, &model.w.norm, model.cfg.rms_eps)?;
    let lm = base_weight(&model.w.lm_head)?;
    let ce_dt = ce_dtype(model);
    let out = batch
        .positions
        .chunks(opts.logit_chunk.max(1))
        .map(|pos| {
            let (logits, lse) = logits_at(&xf, lm, frozen, pos, ce_dt)?;
            logits.broadcast_sub(&lse)
        })
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        return Tensor::zeros((0, model.cfg.vocab), ce_dt, &model.device);
    }
    Tensor::cat(&out, 0)
}
