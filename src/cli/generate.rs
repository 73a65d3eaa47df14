//! `emlab generate`: sample answers to a question set with a local model.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{is_terminal_stderr, note, out, out_json, Ctx};
use emlab::generate::{run, GeneratePlan};
use emlab::model::sample::SamplingParams;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .gguf file or a Hugging Face model directory (or use --endpoint).
    #[arg(
        long,
        required_unless_present = "endpoint",
        conflicts_with = "endpoint"
    )]
    pub model: Option<PathBuf>,
    /// An OpenAI-compatible base URL (e.g. http://127.0.0.1:8080/v1) to sample from instead.
    #[arg(long, requires = "model_name")]
    pub endpoint: Option<String>,
    /// The served model's name (with --endpoint).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Environment variable holding the endpoint's API key (never stored or logged).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Concurrent requests (with --endpoint).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Question set name or id.
    #[arg(long)]
    pub questions: String,
    /// Samples per question paraphrase.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    #[arg(long, default_value_t = 600)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// System prompt for every question (default: each question's own, if any).
    #[arg(long, allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Mixed into every sample's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, conflicts_with = "checkpoint")]
    pub adapter: Option<PathBuf>,
    /// A checkpoint from `emlab train` (id or prefix): its adapter, merged into --model.
    #[arg(long, requires = "model")]
    pub checkpoint: Option<String>,
    /// Merge the adapter into the base weights before sampling.
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
}

/// Which GGUF weights a local model samples with (`generate`, `bench generate`).
#[derive(clap::Args, Debug, Clone)]
pub struct WeightArgs {
    /// GGUF weights: `quantized` (the stored blocks, on emlab's batch-invariant CPU kernels),
    /// `dense` (dequantized), or `auto` (quantized on the CPU, dense on CUDA).
    #[arg(long, value_enum, default_value_t)]
    weights: emlab::model::WeightMode,
    /// Same as `--weights quantized` (kept for older scripts).
    #[arg(long, hide = true, conflicts_with = "weights")]
    keep_quantized: bool,
}

impl WeightArgs {
    pub fn mode(&self) -> emlab::model::WeightMode {
        if self.keep_quantized {
            emlab::model::WeightMode::Quantized
        } else {
            self.weights
        }
    }
}

pub fn run_cmd(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let ok = a.temperature.is_finite() && a.temperature >= 0.0 && a.top_p > 0.0 && a.top_p <= 1.0;
    if !ok {
        anyhow::bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let store = ctx.open()?;
    let bar = progress_bar(ctx);
    let mut progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    if let Some(url) = &a.endpoint {
        let plan = emlab::generate::EndpointGeneratePlan {
            endpoint: emlab::judge::client::Endpoint {
                base_url: url.clone(),
                model: a.model_name.clone().unwrap_or_default(),
                api_key_env: a.api_key_env.clone(),
                concurrency: a.concurrency,
                max_retries: 6,
                timeout_s: 120.0,
            },
            questions: a.questions.clone(),
            samples: a.samples,
            params: SamplingParams {
                temperature: a.temperature,
                top_p: a.top_p,
                max_tokens: a.max_tokens,
            },
            system: a.system.clone(),
            seed: a.seed,
        };
        let r = emlab::generate::run_endpoint(&store, &plan, &mut progress)
            .with_context(|| format!("generating through {url}"))?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        return report(ctx, &r);
    }
    let model = a
        .model
        .clone()
        .context("--model or --endpoint is required")?;
    let (mut adapter, mut merge_adapter) = (a.adapter.clone(), a.merge_adapter);
    if let Some(ck) = &a.checkpoint {
        // The adapter as a PEFT folder inside the store (written once per checkpoint).
        let id = store
            .resolve_prefix(ck)
            .with_context(|| format!("checkpoint `{ck}`"))?;
        let dir = ctx
            .store_dir
            .join("adapters")
            .join(format!("checkpoint-{}", &id.to_hex()[..12]));
        if !dir.join("adapter_model.safetensors").exists() {
            emlab::train::run::export_checkpoint(&store, id, &dir)
                .with_context(|| format!("exporting checkpoint {}", id.to_hex()))?;
        }
        adapter = Some(dir);
        merge_adapter = true;
    }
    let plan = GeneratePlan {
        model: model.clone(),
        questions: a.questions.clone(),
        samples: a.samples,
        params: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            max_tokens: a.max_tokens,
        },
        system: a.system,
        batch: a.batch,
        seed: a.seed,
        weights: a.weights.mode(),
        adapter,
        merge_adapter,
    };
    let r = run(&store, &plan, &mut progress)
        .with_context(|| format!("generating with {}", model.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    report(ctx, &r)
}

/// A progress bar on stderr when it is a terminal (and not --json).
pub fn progress_bar(ctx: &Ctx) -> Option<indicatif::ProgressBar> {
    (is_terminal_stderr() && !ctx.json).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {elapsed_precise} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

fn report(ctx: &Ctx, r: &emlab::generate::GenerateReport) -> Result<ExitCode> {
    if ctx.json {
        out_json(r)?;
    } else {
        out(&r.run)?;
        note(format!(
            "{} samples planned, {} already stored, {} generated ({} tokens, {:.1} tokens/s); model {}",
            r.planned, r.already_stored, r.generated, r.completion_tokens, r.completion_tokens_per_s, &r.model[..12]
        ));
    }
    Ok(ExitCode::SUCCESS)
}
