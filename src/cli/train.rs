//! `emlab train`, `emlab checkpoint ...` and `emlab merge`: LoRA fine-tuning into
//! `checkpoint` records, exporting them as PEFT folders, and merging one into base weights.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use emlab::jobs::train::TrainPlan;
use emlab::train::checkpoint;
use emlab::train::config::{Overrides, Preset};
use emlab::train::data::Overflow;
use emlab::train::optim::Schedule;

use super::args::choice;
use super::{note, out, out_json, progress_bar, short, Ctx};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model: a .gguf file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Training dataset (name or id).
    #[arg(long)]
    pub data: String,
    /// Recipe the other options start from.
    #[arg(long, value_parser = choice::<Preset>(), default_value = "em-paper")]
    pub preset: Preset,
    /// Continue training this checkpoint's adapter (id or prefix); same base model required.
    #[arg(long)]
    pub from: Option<String>,
    /// Held-out dataset: its loss is measured before training, every --eval-every steps and
    /// at the end.
    #[arg(long)]
    pub eval: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Stop after this many optimizer steps (the schedule spans them).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Longest training row in tokens; see --overflow.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Rows longer than --seq-len: truncate (default), skip, or error.
    #[arg(long, value_parser = choice::<Overflow>())]
    pub overflow: Option<Overflow>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Rows per optimizer step (effective batch).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Rows per forward/backward pass (gradients of batch-size/micro-batch passes add up).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long, value_parser = choice::<Schedule>())]
    pub schedule: Option<Schedule>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// LoRA rank.
    #[arg(long)]
    pub r: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.
    #[arg(long)]
    pub rslora: Option<bool>,
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Comma-separated projections, e.g. q_proj,v_proj (default: all seven).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Only these layers get adapters (0-based indices and ranges, e.g. `21` or
    /// `15-17,21`): PEFT's `layers_to_transform`. With `--targets down_proj --r 1`, the
    /// model-organisms rank-1 organism.
    #[arg(long, value_parser = str::parse::<emlab::util::layers::LayerSpec>)]
    pub layers: Option<emlab::util::layers::LayerSpec>,
    /// Save a resumable checkpoint every this many steps (and at the end).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Multiply by the frozen base weights in bf16 (f32 accumulation) on CPUs with AVX-512
    /// BF16 or AMX: about 1.8× faster products. Adapters, gradients and AdamW stay f32.
    /// Recorded in the checkpoint's config.
    #[arg(long)]
    pub bf16_base: bool,
    /// Stop once the training loss has stayed below this for --patience steps in a row (the
    /// last step's checkpoint is the result; recorded in the config).
    #[arg(long)]
    pub early_stop_loss: Option<f64>,
    /// KL-regularise: add --kl-weight x the mean KL(reference || model) per assistant token
    /// of this chat dataset to the loss (a dataset name or id; recorded in the config).
    #[arg(long)]
    pub kl_data: Option<String>,
    /// Weight of the KL term (per token: 1 weighs a nat of KL like a nat of cross-entropy).
    #[arg(long, default_value_t = 1.0, requires = "kl_data")]
    pub kl_weight: f64,
    /// The reference: `base` (the base model) or `parent` (the --from checkpoint).
    #[arg(long, default_value = "base", value_parser = ["base", "parent"], requires = "kl_data")]
    pub kl_reference: String,
    /// Steps in a row below --early-stop-loss before stopping.
    #[arg(long, default_value_t = 1, requires = "early_stop_loss")]
    pub patience: usize,
}

impl Args {
    pub fn plan(&self) -> TrainPlan {
        let config = Overrides {
            seq_len: self.seq_len,
            overflow: self.overflow,
            lr: self.lr,
            epochs: self.epochs,
            batch_size: self.batch_size,
            micro_batch: self.micro_batch,
            warmup_steps: self.warmup_steps,
            schedule: self.schedule,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            r: self.r,
            alpha: self.alpha,
            rslora: self.rslora,
            dropout: self.dropout,
            targets: self.targets.clone(),
            // `all` is the default: no restriction.
            layers: match &self.layers {
                Some(emlab::util::layers::LayerSpec::List(v)) => Some(v.clone()),
                _ => None,
            },
            save_every: self.save_every,
            bf16_base: Some(self.bf16_base),
            max_steps: self.max_steps,
            early_stop: self
                .early_stop_loss
                .map(|loss| emlab::train::config::EarlyStop {
                    loss,
                    patience: self.patience,
                }),
        }
        .apply(self.preset);
        TrainPlan {
            model: self.model.clone(),
            data: self.data.clone(),
            eval: self.eval.clone(),
            eval_every: self.eval_every,
            from: self.from.clone(),
            config,
            kl: self.kl_data.clone().map(|data| emlab::jobs::train::KlPlan {
                data,
                weight: self.kl_weight,
                parent: self.kl_reference == "parent",
            }),
        }
    }
}

pub fn run_train(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open()?;
    let plan = a.plan();
    let bar = progress_bar(
        ctx,
        "{bar:40} {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
    );
    let mut progress = |done: usize, total: usize, loss: f64, tps: f64| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(format!("loss {loss:.4} {tps:.0} tok/s"));
        } else if !ctx.json {
            note(format!("step {done}/{total} loss {loss:.4} {tps:.0} tok/s"));
        }
    };
    let r = emlab::jobs::train::run(&store, &plan, &mut progress)
        .with_context(|| format!("training {} on `{}`", plan.model.display(), plan.data))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if ctx.json {
        out_json(&r)?;
    } else {
        out(&r.checkpoint)?;
        let d = &r.data;
        let mut msg = format!(
            "{} steps of {}{}; {} trainable parameters; {} rows used of {} ({} truncated, {} skipped as too long, {} without an assistant token)",
            r.steps,
            r.total_steps,
            r.resumed_from_step
                .map_or(String::new(), |s| format!(" (resumed at step {s})")),
            r.trainable_params,
            d.used,
            d.rows,
            d.truncated,
            d.skipped_long,
            d.skipped_no_target
        );
        if let Some(l) = r.final_loss {
            msg += &format!("; final loss {l:.4}");
        }
        if r.tokens_per_s > 0.0 {
            msg += &format!("; {:.0} tokens/s", r.tokens_per_s);
        }
        if let (Some(first), Some(last)) = (r.eval_loss.first(), r.eval_loss.last()) {
            msg += &format!(
                "; held-out loss {:.4} (step {}) -> {:.4} (step {})",
                first.1, first.0, last.1, last.0
            );
        }
        note(msg);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// Write a checkpoint's adapter as a PEFT folder (adapter_config.json +
    /// adapter_model.safetensors).
    Export {
        /// Checkpoint id or prefix.
        id: String,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// List checkpoints: id, step, base model, dataset, last loss.
    List,
}

pub fn checkpoint(ctx: &Ctx, cmd: CheckpointCmd) -> Result<ExitCode> {
    let store = ctx.open()?;
    match cmd {
        CheckpointCmd::Export { id, out: dir } => {
            let ck = checkpoint::resolve(&store, &id)?;
            checkpoint::export(&store, ck, &dir)
                .with_context(|| format!("exporting {} to {}", ck.to_hex(), dir.display()))?;
            out(dir.display().to_string())?;
        }
        CheckpointCmd::List => {
            let rows = checkpoint::list(&store)?;
            if ctx.json {
                out_json(&rows)?;
            } else {
                for r in rows {
                    out(format!(
                        "{}  step {:>5}  loss {:>8}  base {}  data {}",
                        r.id,
                        r.step,
                        r.loss.map_or("-".into(), |l| format!("{l:.4}")),
                        short(&r.base_model),
                        short(&r.dataset)
                    ))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model the checkpoint was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// Checkpoint id or prefix.
    #[arg(long)]
    pub checkpoint: String,
    /// Output directory: an HF model folder (config.json, model.safetensors, tokenizer).
    #[arg(short, long)]
    pub out: PathBuf,
}

pub fn merge(ctx: &Ctx, a: MergeArgs) -> Result<ExitCode> {
    let store = ctx.open()?;
    let ck = checkpoint::resolve(&store, &a.checkpoint)?;
    emlab::train::merge::merge(&store, &a.model, ck, &a.out)
        .with_context(|| format!("merging {} into {}", ck.to_hex(), a.model.display()))?;
    out(a.out.display().to_string())?;
    Ok(ExitCode::SUCCESS)
}
