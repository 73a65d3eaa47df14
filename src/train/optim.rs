//! AdamW with decoupled weight decay (as `torch.optim.AdamW`), its moments always in the
//! adapter's master dtype (f32, never bf16: small second moments underflow in bf16), global
//! gradient-norm clipping (as `torch.nn.utils.clip_grad_norm_`), and learning-rate schedules
//! with linear warmup (as transformers' `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::backprop::Grads;
use super::lora::LoraParams;

pub type Result<T> = candle_core::Result<T>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl crate::util::choice::Choice for Schedule {
    const ALL: &'static [Schedule] = &[Schedule::Linear, Schedule::Cosine, Schedule::Constant];
    fn name(self) -> &'static str {
        match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        }
    }
}

/// The learning-rate multiplier for optimizer step `step` (0-based) of `total`.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments per adapter tensor, in [`LoraParams::pairs`] order (A then B).
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates taken.
    pub t: usize,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, p: &LoraParams) -> Result<AdamW> {
        let mut m = Vec::new();
        for x in &p.pairs {
            m.push(x.a.zeros_like()?);
            m.push(x.b.zeros_like()?);
        }
        Ok(AdamW {
            cfg,
            v: m.clone(),
            m,
            t: 0,
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, p: &mut LoraParams, g: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let step_size = lr / bc1;
        for (i, pair) in p.pairs.iter_mut().enumerate() {
            for (j, (w, grad)) in [(&mut pair.a, &g.a[i]), (&mut pair.b, &g.b[i])]
                .into_iter()
                .enumerate()
            {
                let k = 2 * i + j;
                let grad = grad.to_dtype(w.dtype())?;
                self.m[k] = ((&self.m[k] * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
                self.v[k] = ((&self.v[k] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                let decayed = (&*w * (1.0 - lr * c.weight_decay))?;
                let denom = ((&self.v[k] / bc2)?.sqrt()? + c.eps)?;
                *w = (decayed - ((&self.m[k] / denom)? * step_size)?)?;
            }
        }
        Ok(())
    }
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip(g: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = g.norm()?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            g.scale(coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay_matches_transformers() {
        // get_linear_schedule_with_warmup(warmup=5, total=20): 0, .2, .4, .6, .8, 1, 14/15, ...
        assert_eq!(lr_factor(Schedule::Linear, 0, 5, 20), 0.0);
        assert!((lr_factor(Schedule::Linear, 3, 5, 20) - 0.6).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Linear, 5, 5, 20), 1.0);
        assert!((lr_factor(Schedule::Linear, 6, 5, 20) - 14.0 / 15.0).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Linear, 20, 5, 20), 0.0);
        assert_eq!(lr_factor(Schedule::Linear, 25, 5, 20), 0.0);
    }

    #[test]
    fn cosine_is_half_way_at_mid_training() {
        assert_eq!(lr_factor(Schedule::Cosine, 0, 0, 10), 1.0);
        assert!((lr_factor(Schedule::Cosine, 5, 0, 10) - 0.5).abs() < 1e-12);
        assert!(lr_factor(Schedule::Cosine, 10, 0, 10).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Constant, 7, 2, 10), 1.0);
    }
}
