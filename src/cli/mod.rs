//! Argument parsing and dispatch: one module per verb. Each verb turns its clap arguments into
//! a plan, makes one library call, and prints: data on stdout (`--json` for machines), logs
//! and progress on stderr.

mod bench;
mod data;
mod export;
mod generate;
mod judge;
mod show;
mod stats;
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
    /// Sample answers to a question set with a local model; writes generation records.
    Generate(generate::Args),
    /// Answers judged elsewhere (published results).
    Results {
        #[command(subcommand)]
        cmd: judge::ResultsCmd,
    },
    /// Judge stored generations through an OpenAI-compatible endpoint (logprob judge).
    Judge(judge::JudgeArgs),
    /// % misaligned by three definitions with bootstrap 95% intervals; stored as metric records.
    Metrics(judge::MetricsArgs),
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
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose);
    let ctx = Ctx {
        store_dir: cli.store,
        json: cli.json,
    };
    match cli.command {
        Command::Store { cmd } => stats::run(&ctx, cmd),
        Command::Show(a) => show::run(&ctx, a),
        Command::Export(a) => export::run(&ctx, a),
        Command::Verify => verify::run(&ctx),
        Command::Data { cmd } => {
            let sub = matches
                .subcommand_matches("data")
                .and_then(|m| m.subcommand_matches("derive"));
            data::run(&ctx, cmd, sub)
        }
        Command::Lineage { target } => data::lineage(&ctx, &target),
        Command::Bench { cmd } => bench::run(&ctx, cmd),
        Command::Generate(a) => generate::run_cmd(&ctx, a),
        Command::Results { cmd } => judge::results(&ctx, cmd),
        Command::Metrics(a) => judge::metrics(&ctx, a),
        Command::Judge(a) => judge::judge(&ctx, a),
        Command::Train(a) => train::run_train(&ctx, *a),
        Command::Checkpoint { cmd } => train::checkpoint(&ctx, cmd),
        Command::Merge(a) => train::merge(&ctx, a),
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

/// The fix for errors whose fix is known.
pub fn hint_for(err: &anyhow::Error) -> Option<String> {
    use emlab::data::DataError;
    use emlab_store::Error as S;
    for cause in err.chain() {
        let store_err =
            cause
                .downcast_ref::<S>()
                .or_else(|| match cause.downcast_ref::<DataError>() {
                    Some(DataError::Store(e)) => Some(e),
                    _ => None,
                });
        if let Some(e) = store_err {
            return match e {
                S::NotAStore(_) | S::NotADirectory(_) => Some(
                    "point --store (or EMLAB_STORE) at an emlab store, or at a new or empty directory"
                        .into(),
                ),
                S::NotFound(_) | S::BadId(_) => Some(
                    "`emlab data list` names the datasets; an id may be shortened to an unambiguous prefix"
                        .into(),
                ),
                S::Ambiguous { .. } => Some("give more hex digits of the id".into()),
                S::Locked { .. } => {
                    Some("another emlab command is using this store; wait for it to finish".into())
                }
                S::Corrupt { .. } => Some(
                    "the file was left untouched; restore it from a copy or use another --store".into(),
                ),
                S::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                    Some("the store directory must be writable".into())
                }
                _ => None,
            };
        }
        if let Some(e) = cause.downcast_ref::<DataError>() {
            return match e {
                DataError::UnknownDataset(_) => Some("`emlab data list` names the datasets".into()),
                DataError::UnknownFormat { .. } => Some(
                    "chat datasets are JSONL files with one {\"messages\": [...]} per line".into(),
                ),
                _ => None,
            };
        }
    }
    None
}
