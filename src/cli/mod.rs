//! Argument parsing and dispatch: one module per verb, shared arguments in [`args`]. Each verb
//! turns its clap arguments into a plan, makes one library call, and prints: data on stdout
//! (`--json` for machines), logs and progress on stderr. clap lives here and in `main.rs`
//! only; the library offers plain types.

mod args;
mod batch;
mod bench;
mod data;
mod direction;
mod export;
mod generate;
mod judge;
mod probe;
mod show;
mod stats;
mod study;
mod train;
mod verify;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "emlab",
    version,
    about = "Emergent Misalignment research toolkit",
    args_override_self = true
)]
pub struct Cli {
    /// Store directory (created on first use).
    #[arg(
        long,
        global = true,
        env = "EMLAB_STORE",
        default_value = "emlab-store"
    )]
    pub store: PathBuf,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (-v info, -vv debug); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Store maintenance and statistics.
    Store {
        #[command(subcommand)]
        cmd: stats::StoreCmd,
    },
    /// Print a record as JSON (an id, an unambiguous id prefix, or a dataset name).
    Show(show::Args),
    /// Export records not yet exported as Parquet (for DuckDB).
    Export(export::Args),
    /// Re-hash every record and blob; exit non-zero on any mismatch.
    Verify,
    /// Datasets: import, derive, inspect, export.
    Data {
        #[command(subcommand)]
        cmd: data::DataCmd,
    },
    /// Sample answers to a question set with a local model or an endpoint; writes generation records.
    Generate(Box<generate::Args>),
    /// Answers judged elsewhere (published results).
    Results {
        #[command(subcommand)]
        cmd: judge::ResultsCmd,
    },
    /// Judge stored generations through an OpenAI-compatible endpoint or a local model.
    Judge(Box<judge::JudgeArgs>),
    /// The requests of `judge` or `generate --endpoint` as a JSONL for `vllm run-batch`
    /// (export), and its answers stored (import).
    Batch {
        #[command(subcommand)]
        cmd: batch::BatchCmd,
    },
    /// % misaligned by three definitions with bootstrap 95% intervals; stored as metric records.
    Metrics(judge::MetricsArgs),
    /// The judge-free likelihood probe: how much more likely the model finds misaligned
    /// reference answers than aligned ones; stored as metric records.
    Probe(Box<probe::Args>),
    /// Compute a misalignment direction: per layer, mean activation over misaligned answers
    /// minus over aligned ones; stored as a `direction` record under NAME.
    Activations(Box<direction::ActivationsArgs>),
    /// Stored directions: list, compare (cosine per layer).
    Direction {
        #[command(subcommand)]
        cmd: direction::DirectionCmd,
    },
    /// Run a benchmark and store the result as a `bench` record.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// Fine-tune a LoRA adapter on a chat dataset; prints the checkpoint id.
    Train(Box<train::Args>),
    /// Checkpoints: list, export as PEFT folders.
    Checkpoint {
        #[command(subcommand)]
        cmd: train::CheckpointCmd,
    },
    /// Merge a checkpoint's adapter into its base model; writes an HF model folder.
    Merge(train::MergeArgs),
    /// Run a study from its spec: every step cached by content, resumable.
    Run(study::RunArgs),
    /// A study's steps: done, pending, and why a step reruns.
    Status(study::StatusArgs),
    /// What studies found: EM% by three definitions, mean scores and probes, per model.
    Compare(study::CompareArgs),
    /// A study's static HTML report with its figures, table and spec.
    Report(study::ReportArgs),
    /// This CPU: its model, the extensions emlab's kernels use, and the kernel path each
    /// family takes (`EMLAB_KERNELS=scalar|avx2|avx512|amx` caps them).
    Cpu,
    /// The provenance of a record: its parents back to the source files and their BLAKE3.
    Lineage {
        /// Dataset name, id or id prefix.
        target: String,
    },
}

/// Global options every verb sees.
pub struct Ctx {
    pub store_dir: PathBuf,
    pub json: bool,
}

impl Ctx {
    pub fn open(&self) -> Result<emlab_store::Store> {
        emlab::open_store(&self.store_dir)
            .with_context(|| format!("opening store {}", self.store_dir.display()))
    }
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let ctx = Ctx {
        store_dir: cli.store,
        json: cli.json,
    };
    if !matches!(cli.command, Command::Cpu) {
        emlab::util::machine::check_kernel_request()?;
    }
    match cli.command {
        Command::Cpu => bench::cpu(&ctx),
        Command::Store { cmd } => stats::run(&ctx, cmd),
        Command::Show(a) => show::run(&ctx, a),
        Command::Export(a) => export::run(&ctx, a),
        Command::Verify => verify::run(&ctx),
        Command::Data { cmd } => data::run(&ctx, cmd),
        Command::Lineage { target } => data::lineage(&ctx, &target),
        Command::Bench { cmd } => bench::run(&ctx, cmd),
        Command::Activations(a) => direction::run_activations(&ctx, *a),
        Command::Direction { cmd } => direction::run(&ctx, cmd),
        Command::Generate(a) => generate::run_cmd(&ctx, *a),
        Command::Results { cmd } => judge::results(&ctx, cmd),
        Command::Metrics(a) => judge::metrics(&ctx, a),
        Command::Probe(a) => probe::run(&ctx, *a),
        Command::Judge(a) => judge::judge(&ctx, *a),
        Command::Batch { cmd } => batch::run(&ctx, cmd),
        Command::Train(a) => train::run_train(&ctx, *a),
        Command::Checkpoint { cmd } => train::checkpoint(&ctx, cmd),
        Command::Merge(a) => train::merge(&ctx, a),
        Command::Run(a) => study::run(&ctx, a),
        Command::Status(a) => study::status(&ctx, a),
        Command::Compare(a) => study::compare_cmd(&ctx, a),
        Command::Report(a) => study::report(&ctx, a),
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && is_terminal_stderr())
        .try_init();
}

pub fn is_terminal_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Write a line of data to stdout (errors, e.g. a closed pipe, propagate).
pub fn out(s: impl AsRef<str>) -> Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{}", s.as_ref())?;
    Ok(())
}

/// Pretty JSON to stdout.
pub fn out_json(v: &impl serde::Serialize) -> Result<()> {
    out(serde_json::to_string_pretty(v)?)
}

/// A note for humans on stderr.
pub fn note(s: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "{}", s.as_ref());
}

/// A progress bar on stderr when it is a terminal (and not --json).
pub fn progress_bar(ctx: &Ctx, template: &str) -> Option<indicatif::ProgressBar> {
    (is_terminal_stderr() && !ctx.json).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

/// The first 12 hex digits of an id for display; the whole text when it is shorter (a
/// record without the field shows as empty, never a panic).
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The fix for an error whose fix is known: the `hint:` of the first cause in the chain
/// whose type knows one (every library error type implements [`Hint`], delegating to the
/// errors it wraps).
pub fn hint_for(err: &anyhow::Error) -> Option<String> {
    use emlab::util::hint::Hint;
    fn of<T: Hint + std::error::Error + 'static>(
        e: &(dyn std::error::Error + 'static),
    ) -> Option<Option<String>> {
        e.downcast_ref::<T>().map(Hint::hint)
    }
    for cause in err.chain() {
        let found = of::<emlab_store::Error>(cause)
            .or_else(|| of::<emlab::data::DataError>(cause))
            .or_else(|| of::<emlab::model::ModelError>(cause))
            .or_else(|| of::<emlab::train::TrainError>(cause))
            .or_else(|| of::<emlab::jobs::generate::GenerateError>(cause))
            .or_else(|| of::<emlab::jobs::judge::JudgeError>(cause))
            .or_else(|| of::<emlab::jobs::synth::SynthError>(cause))
            .or_else(|| of::<emlab::judge::Error>(cause))
            .or_else(|| of::<emlab::jobs::bench::BenchError>(cause))
            .or_else(|| of::<emlab::jobs::probe::ProbeError>(cause))
            .or_else(|| of::<emlab::jobs::direction::DirectionError>(cause))
            .or_else(|| of::<emlab::jobs::study::StudyError>(cause))
            .or_else(|| of::<emlab::jobs::hosted::HostedError>(cause))
            .or_else(|| of::<emlab::endpoint::ClientError>(cause));
        if let Some(Some(h)) = found {
            return Some(h);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_ids_never_panic() {
        let id = "28cb1441b83ee31b66fdc3d905766e69d2ebf6dea317743d36c88449e3da8017";
        assert_eq!(super::short(id), "28cb1441b83e");
        // A record without the field shows as empty; slicing `[..12]` panicked here.
        assert_eq!(super::short(""), "");
        assert_eq!(super::short("abc"), "abc");
    }
}
