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
    /// Base model: a .gguf file or a Hugging Face model directory (--backend local).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `local`: LoRA with Candle on this machine. `openai`: a hosted fine-tuning API (OpenAI's
    /// or one speaking its protocol): the dataset is checked, uploaded and trained there, and
    /// the checkpoint names the fine-tuned model (`ft:...`). A rerun follows the same job.
    #[arg(long, default_value = "local", value_parser = ["local", "openai"])]
    pub backend: String,
    /// --backend openai: the API's base URL.
    #[arg(long, default_value = emlab::jobs::hosted::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// --backend openai: the model to fine-tune, e.g. gpt-4o-2024-08-06 (with --from: the
    /// parent's `ft:` model, which may be left out).
    #[arg(long)]
    pub model_name: Option<String>,
    /// --backend openai: a validation dataset (name or id), uploaded beside the training file.
    #[arg(long)]
    pub validation: Option<String>,
    /// --backend openai: the learning-rate multiplier (the EM paper: 2).
    #[arg(long)]
    pub lr_multiplier: Option<f64>,
    /// --backend openai: a suffix for the fine-tuned model's name.
    #[arg(long)]
    pub suffix: Option<String>,
    /// --backend openai: the environment variable holding the API key (never stored or logged).
    #[arg(long, default_value = emlab::jobs::hosted::DEFAULT_KEY_ENV)]
    pub api_key_env: String,
    /// --backend openai: seconds between polls of a running job (backing off to ten times
    /// that while nothing changes).
    #[arg(long, default_value_t = 30.0)]
    pub poll_interval: f64,
    /// --backend openai: start a new job when the last one for the same request failed or was
    /// cancelled (without it, a rerun reports the failure).
    #[arg(long)]
    pub retry_failed: bool,
    /// --backend openai: retries of a request that failed in a way worth retrying.
    #[arg(long, default_value_t = emlab::endpoint::Endpoint::DEFAULT_MAX_RETRIES)]
    pub max_retries: u32,
    /// --backend openai: seconds before a request is abandoned (and retried).
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
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
            model: self.model.clone().unwrap_or_default(),
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

    /// Options that belong to the other backend, named as on the command line.
    fn misplaced(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.backend == "openai" {
            let local = [
                (self.model.is_some(), "--model"),
                (self.eval.is_some(), "--eval (use --validation)"),
                (self.lr.is_some(), "--lr (use --lr-multiplier)"),
                (self.r.is_some(), "--r"),
                (self.max_steps.is_some(), "--max-steps"),
                (self.kl_data.is_some(), "--kl-data"),
                (self.bf16_base, "--bf16-base"),
            ];
            v.extend(local.iter().filter(|(set, _)| *set).map(|(_, n)| *n));
        } else {
            let hosted = [
                (self.model_name.is_some(), "--model-name"),
                (self.validation.is_some(), "--validation (use --eval)"),
                (self.lr_multiplier.is_some(), "--lr-multiplier (use --lr)"),
                (self.suffix.is_some(), "--suffix"),
                (self.retry_failed, "--retry-failed"),
                (
                    self.endpoint != emlab::jobs::hosted::DEFAULT_ENDPOINT,
                    "--endpoint",
                ),
            ];
            v.extend(hosted.iter().filter(|(set, _)| *set).map(|(_, n)| *n));
        }
        v
    }

    pub fn hosted_plan(&self) -> emlab::jobs::hosted::HostedPlan {
        emlab::jobs::hosted::HostedPlan {
            endpoint: self.endpoint.clone(),
            api_key_env: self.api_key_env.clone(),
            base: self.model_name.clone(),
            data: self.data.clone(),
            validation: self.validation.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr_multiplier: self.lr_multiplier,
            seed: self.seed,
            suffix: self.suffix.clone(),
            from: self.from.clone(),
            retry_failed: self.retry_failed,
            poll_interval: self.poll_interval,
            max_retries: self.max_retries,
            timeout_s: self.timeout,
        }
    }
}

fn run_hosted(ctx: &Ctx, a: &Args) -> Result<ExitCode> {
    let store = ctx.open()?;
    let plan = a.hosted_plan();
    let json = ctx.json;
    let mut say = |m: &str| {
        if !json {
            note(m);
        }
    };
    let r = emlab::jobs::hosted::run(&store, &plan, &mut say).with_context(|| {
        format!(
            "fine-tuning `{}` through {}",
            plan.data,
            plan.endpoint.trim_end_matches('/')
        )
    })?;
    if ctx.json {
        out_json(&r)?;
    } else {
        out(&r.checkpoint)?;
        let mut msg = if r.already_stored {
            format!("already stored: job {} -> {}", r.job, r.fine_tuned_model)
        } else {
            format!(
                "job {} ({}) -> {}; {} steps; files: {} uploaded, {} reused; {} requests",
                r.job,
                if r.created_job { "created" } else { "followed" },
                r.fine_tuned_model,
                r.steps,
                r.uploaded_files,
                r.reused_files,
                r.requests
            )
        };
        if let Some(l) = r.final_loss {
            msg += &format!("; final loss {l:.4}");
        }
        note(msg);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_train(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let wrong = a.misplaced();
    if !wrong.is_empty() {
        anyhow::bail!(
            "{} do not apply to --backend {}",
            wrong.join(", "),
            a.backend
        );
    }
    if a.backend == "openai" {
        return run_hosted(ctx, &a);
    }
    if a.model.is_none() {
        anyhow::bail!("--model (the base model: a .gguf file or a Hugging Face folder) is required; --backend openai fine-tunes through an API instead");
    }
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
