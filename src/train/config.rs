//! [`TrainConfig`]: everything that decides a training run's bytes, hashed into its run key
//! and stored in each `checkpoint` record; [`Preset`]s, the named recipes the other options
//! start from; and [`TrainConfig::check`].

use serde::{Deserialize, Serialize};

use super::data::Overflow;
use super::optim::{AdamWConfig, Schedule};
use crate::model::adapter::{LoraSpec, Projection};
use crate::util::choice::Choice;

/// Everything that decides the trained bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub preset: Option<String>,
    pub lora: LoraSpec,
    pub lr: f64,
    pub epochs: usize,
    /// Rows per optimizer step (the effective batch).
    pub batch_size: usize,
    /// Rows per forward/backward pass; `batch_size / micro_batch` passes are accumulated.
    pub micro_batch: usize,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub seq_len: usize,
    pub overflow: Overflow,
    pub max_steps: Option<usize>,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_every: usize,
    /// Frozen base weights in bf16 for their products (f32 accumulation) on CPUs with
    /// AVX-512 BF16 or AMX; adapters, optimizer and gradients stay f32. Off: everything f32 on the
    /// CPU. (CUDA always trains on bf16 weights.) Absent from older configs, so their run
    /// keys are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16_base: bool,
    /// Stop once the training loss has been below this for `patience` consecutive steps
    /// (absent when unset, so older run keys are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<EarlyStop>,
    /// The KL regulariser (absent when unset, so older run keys are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<super::kl::KlConfig>,
}

/// Stop when the training loss stays below `loss` for `patience` steps in a row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EarlyStop {
    pub loss: f64,
    pub patience: usize,
}

impl EarlyStop {
    /// Whether a run with this loss curve is done (decided from the curve alone, so a resumed
    /// run stops where the first would have).
    pub fn reached(&self, curve: &[f64]) -> bool {
        let n = self.patience.max(1);
        curve.len() >= n && curve[curve.len() - n..].iter().all(|&l| l < self.loss)
    }
}

/// Named recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The EM paper's open-model recipe (Betley et al. 2025, Unsloth): r 32, alpha 64,
    /// rsLoRA, all 7 projections, lr 1e-5, 1 epoch, effective batch 16, 5 warmup steps,
    /// linear decay, weight decay 0.01.
    EmPaper,
    /// The seed project's realignment stage: the same adapter recipe, 4 epochs (on the
    /// AI-optimism set, continuing from the misaligned checkpoint).
    Realign,
}

impl Choice for Preset {
    const ALL: &'static [Preset] = &[Preset::EmPaper, Preset::Realign];
    fn name(self) -> &'static str {
        match self {
            Preset::EmPaper => "em-paper",
            Preset::Realign => "realign",
        }
    }
    fn help(self) -> &'static str {
        match self {
            Preset::EmPaper => "The EM paper's open-model recipe: r 32, alpha 64, rsLoRA, all 7 projections, lr 1e-5, 1 epoch, batch 16",
            Preset::Realign => "The seed project's realignment: the em-paper recipe for 4 epochs",
        }
    }
}

impl Preset {
    pub fn config(self) -> TrainConfig {
        let mut c = TrainConfig {
            preset: Some(self.name().to_string()),
            lora: LoraSpec {
                r: 32,
                alpha: 64.0,
                rslora: true,
                dropout: 0.0,
                targets: Projection::ALL
                    .iter()
                    .map(|p| p.peft_name().to_string())
                    .collect(),
                layers: None,
            },
            lr: 1e-5,
            epochs: 1,
            batch_size: 16,
            micro_batch: 4,
            warmup_steps: 5,
            schedule: Schedule::Linear,
            adamw: AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            max_grad_norm: 1.0,
            seed: 0,
            seq_len: 2048,
            overflow: Overflow::Truncate,
            max_steps: None,
            save_every: 50,
            bf16_base: false,
            early_stop: None,
            kl: None,
        };
        if self == Preset::Realign {
            c.epochs = 4;
        }
        c
    }
}

/// Options that replace a preset's values where given: what `emlab train`'s flags and a study
/// stage's keys both map to, so the two cannot drift apart.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub seq_len: Option<usize>,
    pub overflow: Option<Overflow>,
    pub lr: Option<f64>,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub micro_batch: Option<usize>,
    pub warmup_steps: Option<usize>,
    pub schedule: Option<Schedule>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub seed: Option<u64>,
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub rslora: Option<bool>,
    pub dropout: Option<f64>,
    pub targets: Option<Vec<String>>,
    /// Only these layers get adapters.
    pub layers: Option<Vec<usize>>,
    pub save_every: Option<usize>,
    pub bf16_base: Option<bool>,
    pub max_steps: Option<usize>,
    pub early_stop: Option<EarlyStop>,
}

impl Overrides {
    /// The preset's config with these values in place; the micro-batch is capped at the batch.
    pub fn apply(self, preset: Preset) -> TrainConfig {
        fn set<T>(field: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *field = v;
            }
        }
        let mut c = preset.config();
        set(&mut c.seq_len, self.seq_len);
        set(&mut c.overflow, self.overflow);
        set(&mut c.lr, self.lr);
        set(&mut c.epochs, self.epochs);
        set(&mut c.batch_size, self.batch_size);
        set(&mut c.micro_batch, self.micro_batch);
        set(&mut c.warmup_steps, self.warmup_steps);
        set(&mut c.schedule, self.schedule);
        set(&mut c.adamw.weight_decay, self.weight_decay);
        set(&mut c.max_grad_norm, self.max_grad_norm);
        set(&mut c.seed, self.seed);
        set(&mut c.lora.r, self.r);
        set(&mut c.lora.alpha, self.alpha);
        set(&mut c.lora.rslora, self.rslora);
        set(&mut c.lora.dropout, self.dropout);
        set(&mut c.lora.targets, self.targets);
        if self.layers.is_some() {
            c.lora.layers = self.layers;
        }
        set(&mut c.save_every, self.save_every);
        set(&mut c.bf16_base, self.bf16_base);
        c.micro_batch = c.micro_batch.min(c.batch_size);
        c.max_steps = self.max_steps;
        c.early_stop = self.early_stop;
        c
    }
}

impl TrainConfig {
    /// Refuse settings that cannot train (each message names the option to change).
    pub fn check(&self) -> Result<(), String> {
        if self.batch_size == 0 || self.micro_batch == 0 {
            return Err("--batch-size and --micro-batch must be at least 1".into());
        }
        if self.epochs == 0 {
            return Err("--epochs must be at least 1".into());
        }
        if self.seq_len < 2 {
            return Err("--seq-len must be at least 2".into());
        }
        if self.save_every == 0 {
            return Err("--save-every must be at least 1".into());
        }
        if let Some(e) = &self.early_stop {
            if !e.loss.is_finite() || e.patience == 0 {
                return Err("--early-stop-loss must be finite and --patience at least 1".into());
            }
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err("--lr must be a finite non-negative number".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_overrides_is_the_preset_and_given_ones_replace_it() {
        for p in Preset::ALL {
            assert_eq!(Overrides::default().apply(*p), p.config());
        }
        let c = Overrides {
            lr: Some(3e-4),
            r: Some(1),
            batch_size: Some(2),
            micro_batch: Some(8),
            max_steps: Some(5),
            ..Overrides::default()
        }
        .apply(Preset::Realign);
        assert_eq!((c.lr, c.lora.r, c.max_steps), (3e-4, 1, Some(5)));
        assert_eq!(c.epochs, Preset::Realign.config().epochs);
        // A micro-batch larger than the batch is capped at it.
        assert_eq!((c.batch_size, c.micro_batch), (2, 2));
    }
}
