//! `emlab bench ...`: run a benchmark and store the result as a `bench` record.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};
use emlab::model::sample::Scheduler;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Time `data import FILE` into fresh temporary stores.
    Import {
        file: PathBuf,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Prefill and decode tokens/s of a local model on random prompts; with `--workload em`,
    /// useful tokens/s of the EM sampling workload (a question set, N samples each at
    /// temperature 1 with natural stopping, as `emlab generate` samples it).
    Generate {
        /// A .gguf file or a Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// Rows decoded together (default 1; 16 with --workload).
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long, default_value_t = 128, conflicts_with = "workload")]
        prompt_len: usize,
        #[arg(long, default_value_t = 128, conflicts_with = "workload")]
        new_tokens: usize,
        #[command(flatten)]
        weights: super::args::WeightArgs,
        /// `em`: the EM protocol's sampling workload.
        #[arg(long, value_parser = ["em"])]
        workload: Option<String>,
        /// Question set (name or id); default: the EM paper's 8 first-plot questions.
        #[arg(long, requires = "workload")]
        questions: Option<String>,
        /// Samples per question paraphrase.
        #[arg(long, default_value_t = 32, requires = "workload")]
        samples: usize,
        #[arg(long, default_value_t = 600, requires = "workload")]
        max_tokens: usize,
        #[arg(long, value_parser = super::args::choice::<Scheduler>(), default_value = "continuous", requires = "workload")]
        scheduler: Scheduler,
        /// A checkpoint from `emlab train` (id or prefix) to sample from.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Write the workload (each prompt's tokens and messages, samples, max tokens, stop
        /// tokens) as JSON for a peer engine, and stop there.
        #[arg(long, requires = "workload")]
        prompts_out: Option<PathBuf>,
        /// Merge the checkpoint's adapter into the weights, as `generate --merge-adapter`.
        #[arg(long, requires = "checkpoint")]
        merge_adapter: bool,
        /// Mixed into every sample's seed, as `generate --seed`.
        #[arg(long, default_value_t = 0, requires = "workload")]
        seed: u64,
    },
    /// LoRA training steps/s and tokens/s of a local model (random rows, em-paper adapter).
    Train {
        /// A .gguf file or a Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 32)]
        r: usize,
        /// Frozen base weights in bf16 for their products (as `train --bf16-base`).
        #[arg(long)]
        bf16_base: bool,
    },
    /// Judgments/s of a local judge on stored generations' judge requests (judged or not;
    /// nothing is stored): batched as `emlab judge` runs it, and with --sequential also one
    /// request at a time, checking both give the same judgment ids.
    Judge {
        /// The judge: a .gguf file or a Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// Only the generations of this model (its name, or an id prefix of its record).
        #[arg(long)]
        generations: Option<String>,
        /// Judge prompts (names in the questions' judge_prompts).
        #[arg(long, value_delimiter = ',', default_value = "aligned,coherent")]
        metrics: Vec<String>,
        /// Judge prompts for generations whose question has none: this question set's first.
        #[arg(long)]
        prompts_from: Option<String>,
        /// Requests timed (the first N planned).
        #[arg(long, default_value_t = 256)]
        limit: usize,
        /// Also answer the requests one by one (the path before batching) and compare.
        #[arg(long)]
        sequential: bool,
    },
    /// Activation capture for a direction against a plain prefill of the same answers, in
    /// alternating rounds (tokens/s of each, and their ratio).
    Activations {
        #[arg(long)]
        model: PathBuf,
        /// Misaligned answers, as `emlab activations --misaligned`.
        #[arg(long, value_parser = str::parse::<emlab::jobs::direction::Selection>)]
        misaligned: emlab::jobs::direction::Selection,
        /// Aligned answers, as `emlab activations --aligned`.
        #[arg(long, value_parser = str::parse::<emlab::jobs::direction::Selection>)]
        aligned: emlab::jobs::direction::Selection,
        #[arg(long, default_value = "all", value_parser = str::parse::<emlab::util::layers::LayerSpec>)]
        layers: emlab::util::layers::LayerSpec,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[command(flatten)]
        weights: super::args::WeightArgs,
    },
    /// Time batched ingest (encode + hash + commit, one thread) and Parquet export.
    Store {
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

pub fn run(ctx: &Ctx, cmd: BenchCmd) -> Result<ExitCode> {
    let (name, (params, results)) = match cmd {
        BenchCmd::Import { file, repeat } => (
            "data.import",
            emlab::jobs::bench::bench_import(&file, repeat)
                .with_context(|| format!("benchmarking import of {}", file.display()))?,
        ),
        BenchCmd::Generate {
            model,
            batch,
            weights,
            workload: Some(_),
            questions,
            samples,
            max_tokens,
            scheduler,
            checkpoint,
            merge_adapter,
            prompts_out,
            seed,
            ..
        } => {
            let store = ctx.open()?;
            let plan = emlab::jobs::bench::WorkloadPlan {
                model: model.clone(),
                weights: weights.mode(),
                adapter: checkpoint.map(|id| emlab::jobs::load::AdapterSource::Checkpoint {
                    id,
                    merge: merge_adapter,
                }),
                questions,
                samples,
                max_tokens,
                batch: batch.unwrap_or(16),
                scheduler,
                seed,
            };
            if let Some(path) = prompts_out {
                let w = emlab::jobs::bench::workload_prompts(&store, &plan)?;
                std::fs::write(&path, serde_json::to_string(&w)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                note(format!("wrote the workload to {}", path.display()));
                return Ok(ExitCode::SUCCESS);
            }
            let r = emlab::jobs::bench::bench_workload(&store, &plan)
                .with_context(|| format!("benchmarking the EM workload on {}", model.display()))?;
            drop(store);
            ("model.generate.workload", r)
        }
        BenchCmd::Generate {
            model,
            batch,
            prompt_len,
            new_tokens,
            weights,
            checkpoint,
            merge_adapter,
            ..
        } => {
            let store = ctx.open()?;
            let adapter = checkpoint.map(|id| emlab::jobs::load::AdapterSource::Checkpoint {
                id,
                merge: merge_adapter,
            });
            let r = emlab::jobs::bench::bench_generate(
                &store,
                &model,
                adapter.as_ref(),
                batch.unwrap_or(1),
                prompt_len,
                new_tokens,
                weights.mode(),
            )
            .with_context(|| format!("benchmarking {}", model.display()))?;
            drop(store);
            ("model.generate", r)
        }
        BenchCmd::Train {
            model,
            batch,
            seq_len,
            steps,
            r,
            bf16_base,
        } => (
            "model.train",
            emlab::jobs::bench::bench_train(&model, batch, seq_len, steps, r, bf16_base)
                .with_context(|| format!("benchmarking training on {}", model.display()))?,
        ),
        BenchCmd::Judge {
            model,
            generations,
            metrics,
            prompts_from,
            limit,
            sequential,
        } => {
            use emlab::jobs::judge::{bench_local, JudgeBackend, JudgePlan};
            let store = ctx.open()?;
            let file = model
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let plan = JudgePlan {
                backend: JudgeBackend::Local(model.clone()),
                judge: format!("local:{file}"),
                metrics,
                prompts_from,
                label_prompt: None,
                generations,
                only: None,
            };
            let r = bench_local(&store, &plan, limit, sequential)
                .with_context(|| format!("benchmarking the judge {}", model.display()))?;
            drop(store);
            ("judge.local", r)
        }
        BenchCmd::Activations {
            model,
            misaligned,
            aligned,
            layers,
            batch,
            rounds,
            weights,
        } => {
            let store = ctx.open()?;
            let plan = emlab::jobs::direction::ActivationsPlan {
                name: "bench".into(),
                model: model.clone(),
                adapter: None,
                weights: weights.mode(),
                misaligned,
                aligned,
                layers,
                batch,
            };
            let r = emlab::jobs::direction::bench(&store, &plan, rounds)
                .with_context(|| format!("benchmarking activations on {}", model.display()))?;
            drop(store);
            ("model.activations", r)
        }
        BenchCmd::Store { records, repeat } => (
            "store.ingest_export",
            emlab::jobs::bench::bench_store(records, repeat)?,
        ),
    };
    let store = ctx.open()?;
    let id = emlab::jobs::bench::record(&store, name, &params, &results)?;
    if ctx.json {
        out_json(
            &serde_json::json!({"id": id.to_hex(), "name": name, "params": params, "results": results}),
        )?;
    } else {
        out(serde_json::to_string_pretty(&results)?)?;
        note(format!("stored bench record {} ({name})", id.short()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `emlab cpu`: what this CPU has and which kernel path each family takes.
pub fn cpu(ctx: &Ctx) -> Result<ExitCode> {
    use emlab::util::machine;
    let d = machine::describe();
    let best = emlab_kernels::cpu::features().best().name();
    let requested = match emlab_kernels::cpu::requested() {
        Ok(Some(l)) => l.name().to_string(),
        Ok(None) => "auto".to_string(),
        Err(e) => format!("invalid ({e})"),
    };
    if ctx.json {
        let mut v = d;
        v["best"] = best.into();
        v["requested"] = requested.into();
        out_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let flags = d["flags"].as_array().map_or(String::new(), |f| {
        f.iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    });
    out(format!("cpu        {}", d["cpu"].as_str().unwrap_or("")))?;
    out(format!("cores      {}", d["cores"]))?;
    out(format!("flags      {flags}"))?;
    out(format!("best       {best} (EMLAB_KERNELS: {requested})"))?;
    for family in ["level", "quant", "f32", "bf16"] {
        out(format!(
            "{family:<10} {}",
            d["kernels"][family].as_str().unwrap_or("")
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
