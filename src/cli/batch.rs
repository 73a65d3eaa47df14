//! `emlab batch export|import`: the requests `judge` or `generate --endpoint` would send, as
//! a JSONL in the OpenAI Batch API's format for `vllm run-batch` on a cluster, and the
//! answers of its output stored as the direct path would store them.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

use super::generate::{run_endpoint_plan, SampleArgs};
use super::judge::{run_judge, JudgeSelect};
use super::{note, out, out_json, Ctx};
use emlab::endpoint::Endpoint;
use emlab::jobs::batch::{BatchReport, Mode};
use emlab::jobs::judge::JudgeBackend;

#[derive(Subcommand, Debug)]
pub enum BatchCmd {
    /// Write the requests not answered yet as a JSONL (`custom_id`, `method`, `url`, `body`
    /// per line: what `vllm run-batch -i` and the OpenAI Batch API read). Nothing is sent.
    Export {
        /// The request file to write.
        #[arg(long, global = true)]
        out: Option<PathBuf>,
        #[command(subcommand)]
        what: BatchWhat,
    },
    /// Store the answers of a result JSONL (`vllm run-batch -o`, or a Batch API output or
    /// error file), joined to the requests on `custom_id`, as direct answers would be.
    Import {
        /// The result file to read.
        #[arg(long, global = true)]
        results: Option<PathBuf>,
        #[command(subcommand)]
        what: BatchWhat,
    },
}

#[derive(Subcommand, Debug)]
pub enum BatchWhat {
    /// The requests of `emlab judge` (same arguments, without the endpoint).
    Judge {
        /// The judge model's name, as the server that answers serves it.
        #[arg(long)]
        model_name: String,
        #[command(flatten)]
        select: JudgeSelect,
    },
    /// The requests of `emlab generate --endpoint` (same arguments).
    Generate {
        /// The sampled model's name, as the server that answers serves it.
        #[arg(long)]
        model_name: String,
        /// What serves it: with the model name, this names the generations' model record
        /// (as `--endpoint` does for a direct run).
        #[arg(long, default_value = "vllm run-batch")]
        served_by: String,
        #[command(flatten)]
        sample: SampleArgs,
    },
}

pub fn run(ctx: &Ctx, cmd: BatchCmd) -> Result<ExitCode> {
    let (mode, what) = match cmd {
        BatchCmd::Export { out, what } => {
            let Some(out) = out else {
                anyhow::bail!("batch export needs --out FILE (the request JSONL to write)");
            };
            (Mode::Export(out), what)
        }
        BatchCmd::Import { results, what } => {
            let Some(results) = results else {
                anyhow::bail!("batch import needs --results FILE (the result JSONL to read)");
            };
            (Mode::Import(results), what)
        }
    };
    let store = ctx.open()?;
    let endpoint = |base_url: &str, model: &str| Endpoint {
        base_url: base_url.to_string(),
        model: model.to_string(),
        api_key_env: None,
        concurrency: 1,
        max_retries: 0,
        timeout_s: Endpoint::DEFAULT_TIMEOUT_S,
    };
    match what {
        BatchWhat::Judge { model_name, select } => {
            let e = endpoint("batch", &model_name);
            let plan = select.plan(JudgeBackend::Batch(e, mode.clone()), model_name);
            match mode {
                Mode::Export(path) => {
                    let code = run_judge(ctx, &store, &plan, "an exported batch")?;
                    note(format!("requests written to {}", path.display()));
                    Ok(code)
                }
                _ => run_judge(ctx, &store, &plan, "a result file"),
            }
        }
        BatchWhat::Generate {
            model_name,
            served_by,
            sample,
        } => {
            let plan = sample.endpoint_plan(
                vec![endpoint(&served_by, &model_name)],
                None,
                Some(mode.clone()),
            )?;
            let r = run_endpoint_plan(ctx, &store, &plan)?;
            if ctx.json {
                out_json(&r)?;
            } else {
                out(&r.run)?;
                note(format!(
                    "{} samples planned, {} already stored, {} stored now",
                    r.planned, r.already_stored, r.generated
                ));
                if let Some(b) = &r.batch {
                    note_batch(b);
                }
                if let Mode::Export(path) = &mode {
                    note(format!("requests written to {}", path.display()));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What a batched run did, for people.
pub fn note_batch(b: &BatchReport) {
    if b.exported > 0 {
        note(format!("{} requests exported", b.exported));
    }
    if !b.batches.is_empty() || b.created + b.followed > 0 {
        note(format!(
            "batches: {} read ({}), {} created, {} followed; files: {} uploaded, {} reused",
            b.batches.len(),
            b.batches.join(", "),
            b.created,
            b.followed,
            b.uploaded_files,
            b.reused_files
        ));
    }
    if b.unmatched > 0 {
        note(format!(
            "{} result lines answered requests not planned here (already stored, or another run's)",
            b.unmatched
        ));
    }
}
