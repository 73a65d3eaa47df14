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
    /// AVX-512 BF16; adapters, optimizer and gradients stay f32. Off: everything f32 on the
    /// CPU. (CUDA always trains on bf16 weights.) Absent from older configs, so their run
    /// keys are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16_base: bool,
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
        };
        if self == Preset::Realign {
            c.epochs = 4;
        }
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
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err("--lr must be a finite non-negative number".into());
        }
        Ok(())
    }
}
