//! `emlab generate`: sample answers to a question set with a local model or an endpoint.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use super::args::{choice, BatchApiArgs, EditArgs, EndpointArgs, WeightArgs};
use super::{note, out, out_json, progress_bar, short, Ctx};
use emlab::jobs::generate::{
    run, run_endpoint, AdapterSource, EndpointGeneratePlan, GeneratePlan, GenerateReport,
};
use emlab::model::sample::{SamplingParams, Scheduler};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .gguf file or a Hugging Face model directory (or use --endpoint).
    #[arg(
        long,
        required_unless_present_any = ["endpoint", "endpoints", "checkpoint"],
        conflicts_with_all = ["endpoint", "endpoints"]
    )]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    #[command(flatten)]
    pub batch_api: BatchApiArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Sequences decoded together (decode slots).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// `continuous`: a slot is refilled as soon as its sample stops; `static`: batches run
    /// until their longest sample ends. The samples are the same either way.
    #[arg(long, value_parser = choice::<Scheduler>(), default_value = "continuous")]
    pub scheduler: Scheduler,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, conflicts_with = "checkpoint")]
    pub adapter: Option<PathBuf>,
    /// A checkpoint from `emlab train` (id or prefix): its adapter, applied to --model
    /// alongside the base weights (on quantized weights its share is added into each block
    /// product), or merged into them with --merge-adapter. A hosted checkpoint (`train
    /// --backend openai`) is sampled through its API instead: leave --model out.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Merge the adapter into the base weights before sampling (dense weights: 4x the
    /// memory of Q4 blocks, and slower on the CPU).
    #[arg(long)]
    pub merge_adapter: bool,
    #[command(flatten)]
    pub edits: EditArgs,
}

/// What to sample: the arguments `generate` and `batch export|import generate` share.
#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
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
    /// Mixed into every sample's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SampleArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let ok = self.temperature.is_finite()
            && self.temperature >= 0.0
            && self.top_p > 0.0
            && self.top_p <= 1.0;
        if !ok {
            anyhow::bail!("--temperature must be >= 0 and --top-p in (0, 1]");
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
        })
    }

    /// A plan sampling through `endpoints` (or sent as a batch by `batch`).
    pub fn endpoint_plan(
        &self,
        endpoints: Vec<emlab::endpoint::Endpoint>,
        checkpoint: Option<emlab_store::Id>,
        batch: Option<emlab::jobs::batch::Mode>,
    ) -> Result<EndpointGeneratePlan> {
        Ok(EndpointGeneratePlan {
            endpoints,
            questions: self.questions.clone(),
            samples: self.samples,
            params: self.params()?,
            system: self.system.clone(),
            seed: self.seed,
            checkpoint,
            batch,
        })
    }
}

/// Sample through endpoints with a progress bar (batch news printed above it).
pub fn run_endpoint_plan(
    ctx: &Ctx,
    store: &emlab_store::Store,
    plan: &EndpointGeneratePlan,
) -> Result<GenerateReport> {
    let url = plan
        .endpoints
        .iter()
        .map(|e| e.base_url.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let bar = progress_bar(ctx, "{bar:40} {pos}/{len} {elapsed_precise} eta {eta}");
    let mut progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let mut tell = |m: &str| match &bar {
        Some(b) => b.println(m),
        None => note(m),
    };
    let r = run_endpoint(store, plan, &mut progress, &mut tell)
        .with_context(|| format!("generating through {url}"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(r)
}

pub fn run_cmd(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let params = a.sample.params()?;
    let store = ctx.open()?;
    let mut endpoints = a.endpoint.endpoints()?;
    // A hosted checkpoint: its fine-tuned model, through its API.
    let mut hosted = None;
    if let (Some(c), None) = (&a.checkpoint, &a.model) {
        let ck = emlab::train::checkpoint::resolve(&store, c)?;
        let mut e = emlab::jobs::hosted::checkpoint_endpoint(&store, ck)?.with_context(|| {
            format!(
                "checkpoint {c} has a local adapter: sample it with --model BASE --checkpoint {c}"
            )
        })?;
        if let Some(other) = endpoints.first() {
            e.base_url = other.base_url.clone();
        }
        if let Some(k) = &a.endpoint.api_key_env {
            e.api_key_env = Some(k.clone());
        }
        e.concurrency = a.endpoint.concurrency;
        e.max_retries = a.endpoint.max_retries;
        e.timeout_s = a.endpoint.timeout;
        endpoints = vec![e];
        hosted = Some(ck);
    }
    let r = if !endpoints.is_empty() {
        if !a.edits.spec().is_empty() {
            anyhow::bail!("--steer and --ablate edit a local model's residual stream: use --model, not --endpoint");
        }
        let batch = a.batch_api.mode(&endpoints)?;
        let plan = a.sample.endpoint_plan(endpoints, hosted, batch)?;
        run_endpoint_plan(ctx, &store, &plan)?
    } else {
        if a.batch_api.batch_api {
            anyhow::bail!(
                "--batch-api sends through an endpoint: give --endpoint (or a hosted --checkpoint)"
            );
        }
        let model = a.model.context("--model or --endpoint is required")?;
        let adapter = match (a.adapter, a.checkpoint) {
            (Some(dir), _) => Some(AdapterSource::Folder {
                dir,
                merge: a.merge_adapter,
            }),
            (None, Some(id)) => Some(AdapterSource::Checkpoint {
                id,
                merge: a.merge_adapter,
            }),
            (None, None) => None,
        };
        let s = a.sample;
        let plan = GeneratePlan {
            model: model.clone(),
            questions: s.questions,
            samples: s.samples,
            params,
            system: s.system,
            batch: a.batch,
            scheduler: a.scheduler,
            seed: s.seed,
            weights: a.weights.mode(),
            adapter,
            edits: a.edits.spec(),
        };
        let bar = progress_bar(ctx, "{bar:40} {pos}/{len} {elapsed_precise} eta {eta}");
        let mut progress = |done: usize, total: usize| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        };
        let r = run(&store, &plan, &mut progress)
            .with_context(|| format!("generating with {}", model.display()))?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        r
    };
    if ctx.json {
        out_json(&r)?;
    } else {
        out(&r.run)?;
        note(format!(
            "{} samples planned, {} already stored, {} generated ({} tokens, {:.1} tokens/s); model {}",
            r.planned,
            r.already_stored,
            r.generated,
            r.completion_tokens,
            r.completion_tokens_per_s,
            short(&r.model)
        ));
        super::judge::note_endpoints(&r.endpoints);
        if let Some(b) = &r.batch {
            super::batch::note_batch(b);
        }
    }
    Ok(ExitCode::SUCCESS)
}
