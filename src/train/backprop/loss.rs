//! The head: final RMSNorm, logits at the target positions only (in chunks, bounding the
//! `[rows, vocab]` buffers), cross-entropy in f32 (f64 for f64 models), and its gradient
//! back to the last layer's output.

use candle_core::{DType, Tensor};

use super::linear::{base_weight, bf16_matmul, FrozenBf16};
use super::norm::{rms_backward, rms_forward};
use super::{ops, Batch, PassOpts, Result};
use crate::model::llama::Model;

/// The summed cross-entropy of the batch's targets and, with `opts.backward` and at least
/// one target, the gradient of `sum / opts.denom` with respect to `x` (`[n, hidden]`).
pub(super) fn head(
    model: &Model,
    x: &Tensor,
    batch: &Batch,
    opts: &PassOpts,
    frozen: Option<&FrozenBf16>,
) -> Result<(f64, Option<Tensor>)> {
    let (dt, dev) = (model.dtype, &model.device);
    let (xf, xnf, invf) = rms_forward(x, &model.w.norm, model.cfg.rms_eps)?;
    let lm = base_weight(&model.w.lm_head)?;
    let ce_dt = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let ntarget = batch.positions.len();
    let mut loss = 0f64;
    let mut dsel = Vec::new();
    let chunk = opts.logit_chunk.max(1);
    let mut start = 0;
    while start < ntarget {
        let c = chunk.min(ntarget - start);
        let pos = Tensor::from_slice(&batch.positions[start..start + c], c, dev)?;
        let lab = Tensor::from_slice(&batch.labels[start..start + c], (c, 1), dev)?;
        let xs = xf.index_select(&pos, 0)?;
        let logits = match frozen {
            Some(f) => bf16_matmul(&xs, &f.lm.0, None)?,
            None => xs.matmul(&lm.t()?)?,
        }
        .to_dtype(ce_dt)?;
        let lse = ops::log_sum_exp(&logits)?;
        if let Some(reference) = &batch.kl_reference {
            // KL(reference || model) = sum_v p_ref (log p_ref - log p_model), per position;
            // its gradient in the logits is softmax(logits) - p_ref.
            let r = reference.narrow(0, start, c)?.to_dtype(ce_dt)?;
            let p_ref = r.exp()?;
            let logp = logits.broadcast_sub(&lse)?;
            loss += (&p_ref * (&r - &logp)?)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            if opts.backward {
                let dl = ((logp.exp()? - p_ref)? / opts.denom)?.to_dtype(dt)?;
                dsel.push(match frozen {
                    Some(f) => bf16_matmul(&dl, &f.lm.1, None)?,
                    None => dl.matmul(lm)?,
                });
            }
            start += c;
            continue;
        }
        let picked = logits.gather(&lab, 1)?;
        loss += (&lse - &picked)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        if opts.backward {
            // d/dlogits of sum(CE) / denom: softmax minus one-hot.
            let dl = ops::cross_entropy_grad(&logits, &lse, &lab, opts.denom)?.to_dtype(dt)?;
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
    let dev = &model.device;
    let (xf, _, _) = rms_forward(x, &model.w.norm, model.cfg.rms_eps)?;
    let lm = base_weight(&model.w.lm_head)?;
    let ce_dt = if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let ntarget = batch.positions.len();
    let chunk = opts.logit_chunk.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < ntarget {
        let c = chunk.min(ntarget - start);
        let pos = Tensor::from_slice(&batch.positions[start..start + c], c, dev)?;
        let xs = xf.index_select(&pos, 0)?;
        let logits = match frozen {
            Some(f) => bf16_matmul(&xs, &f.lm.0, None)?,
            None => xs.matmul(&lm.t()?)?,
        }
        .to_dtype(ce_dt)?;
        let lse = ops::log_sum_exp(&logits)?;
        out.push(logits.broadcast_sub(&lse)?);
        start += c;
    }
    if out.is_empty() {
        return Tensor::zeros((0, model.cfg.vocab), ce_dt, dev);
    }
    Tensor::cat(&out, 0)
}
