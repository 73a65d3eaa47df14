//! `emlab bench ...`: run a benchmark and store the result as a `bench` record.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Time `data import FILE` into fresh temporary stores.
    Import {
        file: PathBuf,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Prefill and decode tokens/s of a local model.
    Generate {
        /// A .gguf file or a Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[command(flatten)]
        weights: super::args::WeightArgs,
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
            prompt_len,
            new_tokens,
            weights,
        } => (
            "model.generate",
            emlab::jobs::bench::bench_generate(
                &model,
                batch,
                prompt_len,
                new_tokens,
                weights.mode(),
            )
            .with_context(|| format!("benchmarking {}", model.display()))?,
        ),
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
