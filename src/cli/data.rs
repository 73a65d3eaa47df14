//! `emlab data ...`: import, derive, list, show, stats, export; and `emlab lineage`.

use anyhow::{bail, Context, Result};
use clap::{Arg, ArgAction, ArgMatches, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use super::args::{choice, EndpointArgs};
use super::{note, out, out_json, short, Ctx};
use emlab::data::derive::{derive, DerivePlan, Op};
use emlab::data::{import, resolve_dataset, view, Format, ImportPlan};
use emlab::provenance::tables::NS_DATASET;

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Import a file as a named dataset or question set; prints its id. Formats: chat JSONL,
    /// Q/A JSON, question YAML/JSON/text, each optionally .gz; a .zip imports its members.
    Import {
        /// The file.
        file: PathBuf,
        /// The name (a mutable alias for the id). Zip members become NAME/<member stem>.
        #[arg(long)]
        name: String,
        /// Force a format instead of guessing it from the file name.
        #[arg(long, value_parser = choice::<Format>())]
        format: Option<Format>,
        /// Import only this member of a zip (named NAME).
        #[arg(long)]
        member: Option<String>,
        /// Password of an encrypted zip (used to read it, never stored).
        #[arg(long, env = "EMLAB_ZIP_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Leave out chat rows that fail to parse (their lines are recorded in the dataset).
        #[arg(long)]
        skip_invalid: bool,
        /// For a chat CSV: which columns hold which turn, e.g. user=Question,assistant=Answer.
        #[arg(long)]
        columns: Option<String>,
    },
    /// Derive a new dataset from another; the ops apply in the order given. Prints the new id.
    Derive(Box<DeriveArgs>),
    /// Build a dataset with an LLM: a prompt template sent N times; answers that are JSON
    /// `{question, answer}` become rows. Provenance names the generator and the prompt file.
    Generate {
        /// Name of the new dataset.
        name: String,
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// Prompt template file (minijinja; variables `i` and `seed`).
        #[arg(long)]
        prompt: PathBuf,
        /// Requests to send.
        #[arg(long)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1024)]
        max_tokens: usize,
    },
    /// List named datasets and question sets.
    List,
    /// A dataset's facts and its first rows.
    Show {
        /// Name, id or id prefix.
        dataset: String,
        /// Rows to print.
        #[arg(long, default_value_t = 3)]
        rows: usize,
    },
    /// Row count, length histogram, roles, duplicates.
    Stats { dataset: String },
    /// Write a chat dataset as JSONL (OpenAI fine-tuning / TRL format) or Parquet.
    Export {
        dataset: String,
        #[arg(long, default_value = "jsonl")]
        format: String,
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct DeriveArgs {
    /// Name of the new dataset.
    pub new: String,
    /// The parent dataset (name or id).
    #[arg(long)]
    pub from: String,
    /// Seed for sample / holdout / mix.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub ops: DeriveOps,
    /// What goes between the tag and the user's text.
    #[arg(long, default_value = " ", allow_hyphen_values = true)]
    pub tag_separator: String,
}

/// The derive ops in the order given on the command line (they apply in that order). clap
/// parses each flag into its own list; the flags' argument indices restore the order.
#[derive(Debug, Clone, Default)]
pub struct DeriveOps(pub Vec<Op>);

/// (id, value name, help, takes a value)
const OP_FLAGS: [(&str, &str, &str, bool); 11] = [
    ("sample", "N", "Keep N rows chosen at random (original order kept)", true),
    ("holdout", "F", "Hold out a fraction F as NEW-holdout; later ops apply to the rest", true),
    ("filter", "EXPR", "Keep rows matching EXPR: has:ROLE, !has:ROLE, len(ROLE|all) OP N, turns OP N, ROLE ~ REGEX, ROLE !~ REGEX", true),
    ("dedupe", "", "Drop rows whose messages repeat an earlier row's", false),
    ("mix", "OTHER:RATIO", "Add RATIO x rows sampled from OTHER, then shuffle", true),
    ("concat", "OTHER", "Append all rows of OTHER", true),
    ("take", "N", "Keep the first N rows", true),
    ("skip", "N", "Drop the first N rows", true),
    ("set-system", "TEXT", "Replace system messages with TEXT at the start of each row", true),
    ("strip-system", "", "Remove system messages", false),
    ("tag", "TEXT", "Prefix TEXT and the separator to each row's first user message (a trigger tag)", true),
];

impl clap::Args for DeriveOps {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for (id, value, help, takes) in OP_FLAGS {
            let arg = Arg::new(id).long(id).help(help);
            cmd = cmd.arg(if takes {
                arg.value_name(value)
                    .action(ArgAction::Append)
                    .allow_hyphen_values(true)
            } else {
                arg.action(ArgAction::Count)
            });
        }
        cmd
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for DeriveOps {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let bad = |id: &str, v: &str, why: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{v}' for '--{id}': {why}\n"),
            )
        };
        let number = |id: &str, v: &str| -> Result<usize, clap::Error> {
            v.parse().map_err(|_| bad(id, v, "expected a whole number"))
        };
        let mut ops: Vec<(usize, Op)> = Vec::new();
        for (id, _, _, takes) in OP_FLAGS {
            // Counters report an index even when absent: count only what the command line set.
            if m.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
                continue;
            }
            let idx: Vec<usize> = m.indices_of(id).map(|i| i.collect()).unwrap_or_default();
            if !takes {
                for i in idx {
                    ops.push((
                        i,
                        if id == "dedupe" {
                            Op::Dedupe
                        } else {
                            Op::StripSystem
                        },
                    ));
                }
                continue;
            }
            let values: Vec<&String> = m
                .get_many::<String>(id)
                .map(|v| v.collect())
                .unwrap_or_default();
            for (i, v) in idx.into_iter().zip(values) {
                let op = match id {
                    "sample" => Op::Sample(number(id, v)?),
                    "take" => Op::Take(number(id, v)?),
                    "skip" => Op::Skip(number(id, v)?),
                    "holdout" => Op::Holdout(
                        v.parse()
                            .map_err(|_| bad(id, v, "expected a fraction, e.g. 0.05"))?,
                    ),
                    "filter" => Op::Filter(v.clone()),
                    "mix" => {
                        let (other, ratio) = v.rsplit_once(':').ok_or_else(|| {
                            bad(id, v, "expected OTHER:RATIO, e.g. good-medical:0.5")
                        })?;
                        let ratio = ratio
                            .parse()
                            .map_err(|_| bad(id, v, "RATIO is not a number"))?;
                        Op::Mix {
                            other: other.to_string(),
                            ratio,
                        }
                    }
                    "concat" => Op::Concat(v.clone()),
                    "set-system" => Op::SetSystem(v.clone()),
                    _ => Op::Tag(v.clone()),
                };
                ops.push((i, op));
            }
        }
        ops.sort_by_key(|(i, _)| *i);
        Ok(DeriveOps(ops.into_iter().map(|(_, o)| o).collect()))
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

pub fn run(ctx: &Ctx, cmd: DataCmd) -> Result<ExitCode> {
    match cmd {
        DataCmd::Import {
            file,
            name,
            format,
            member,
            password,
            skip_invalid,
            columns,
        } => {
            let store = ctx.open()?;
            let plan = ImportPlan {
                path: file.clone(),
                name,
                format,
                member,
                password,
                skip_invalid,
                columns,
            };
            let reports =
                import(&store, &plan).with_context(|| format!("importing {}", file.display()))?;
            if ctx.json {
                out_json(&reports)?;
            } else {
                for r in &reports {
                    out(&r.dataset)?;
                    let skipped = if r.skipped > 0 {
                        format!(", {} invalid rows skipped", r.skipped)
                    } else {
                        String::new()
                    };
                    note(format!(
                        "imported {} {} rows as `{}`{skipped}",
                        r.rows, r.kind, r.name
                    ));
                }
                if let Some(r) = reports.first() {
                    note(format!(
                        "{} new records, {} already stored",
                        r.new_records, r.existing_records
                    ));
                }
            }
        }
        DataCmd::Derive(a) => {
            let store = ctx.open()?;
            let plan = DerivePlan {
                name: a.new.clone(),
                from: a.from.clone(),
                ops: a.ops.0.clone(),
                seed: a.seed,
                tag_separator: a.tag_separator.clone(),
            };
            let r = derive(&store, &plan)
                .with_context(|| format!("deriving `{}` from `{}`", a.new, a.from))?;
            if ctx.json {
                out_json(&r)?;
            } else {
                for d in &r.datasets {
                    if d.name == a.new {
                        out(&d.dataset)?;
                    }
                    note(format!(
                        "`{}`: {} rows ({})",
                        d.name,
                        d.rows,
                        short(&d.dataset)
                    ));
                }
            }
        }
        DataCmd::Generate {
            name,
            endpoint,
            prompt,
            n,
            seed,
            temperature,
            max_tokens,
        } => {
            let endpoint = endpoint
                .endpoint()?
                .context("`data generate` needs --endpoint and --model-name")?;
            let url = endpoint.base_url.clone();
            let store = ctx.open()?;
            let plan = emlab::jobs::synth::SynthPlan {
                name,
                endpoint,
                prompt,
                n,
                seed,
                temperature,
                max_tokens,
            };
            let r = emlab::jobs::synth::generate(&store, &plan)
                .with_context(|| format!("generating a dataset through {url}"))?;
            if ctx.json {
                out_json(&r)?;
            } else {
                out(&r.dataset)?;
                note(format!(
                    "{} rows ({} answers did not parse; {} requests)",
                    r.rows, r.unparsed, r.requests_sent
                ));
            }
        }
        DataCmd::List => {
            let store = ctx.open()?;
            let mut rows = Vec::new();
            for (name, id) in store.aliases(NS_DATASET)? {
                let s = view::summary(&store, id)?;
                rows.push((name, s));
            }
            if ctx.json {
                let v: Vec<_> = rows.iter().map(|(n, s)| serde_json::json!({"name": n, "id": s.id, "kind": s.kind, "rows": s.rows})).collect();
                out_json(&v)?;
            } else {
                out(format!(
                    "{:<36} {:<12}  {:<9} {:>7}",
                    "name", "id", "kind", "rows"
                ))?;
                for (n, s) in rows {
                    out(format!(
                        "{n:<36} {:<12}  {:<9} {:>7}",
                        short(&s.id),
                        s.kind,
                        s.rows
                    ))?;
                }
            }
        }
        DataCmd::Show { dataset, rows } => {
            let store = ctx.open()?;
            let id = resolve_dataset(&store, &dataset)?;
            let s = view::summary(&store, id)?;
            let first = view::chat_rows(&store, id, Some(rows))?;
            if ctx.json {
                let r: Vec<_> = first
                    .iter()
                    .map(|(i, m)| serde_json::json!({"id": i.to_hex(), "messages": m.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect::<Vec<_>>()}))
                    .collect();
                out_json(&serde_json::json!({"summary": s, "first_rows": r}))?;
            } else {
                out(format!("id:      {}", s.id))?;
                out(format!("kind:    {}", s.kind))?;
                out(format!("rows:    {}", s.rows))?;
                out(format!("made by: {}", s.op))?;
                for (i, (rid, msgs)) in first.iter().enumerate() {
                    out(format!("--- row {i} ({})", &rid.to_hex()[..12]))?;
                    for (r, c) in msgs {
                        let short: String = c.chars().take(200).collect();
                        let more = if c.chars().count() > 200 { "…" } else { "" };
                        out(format!("[{r}] {short}{more}"))?;
                    }
                }
            }
        }
        DataCmd::Stats { dataset } => {
            let store = ctx.open()?;
            let id = resolve_dataset(&store, &dataset)?;
            let s = view::stats(&store, id)?;
            if ctx.json {
                out_json(&s)?;
            } else {
                out(format!(
                    "rows: {} ({} unique, {} duplicates)",
                    s.rows, s.unique_rows, s.duplicate_rows
                ))?;
                let roles: Vec<String> = s.roles.iter().map(|(r, n)| format!("{r} {n}")).collect();
                out(format!("messages by role: {}", roles.join(", ")))?;
                out(format!(
                    "length ({}): min {} median {} max {}",
                    s.length_unit, s.length_min, s.length_median, s.length_max
                ))?;
                let peak = s
                    .histogram
                    .iter()
                    .map(|(_, n)| *n)
                    .max()
                    .unwrap_or(1)
                    .max(1);
                for (bound, n) in &s.histogram {
                    let bar = "#".repeat((n * 40).div_ceil(peak));
                    out(format!("  < {bound:>7} {n:>7} {bar}"))?;
                }
            }
        }
        DataCmd::Export {
            dataset,
            format,
            out: path,
        } => {
            let store = ctx.open()?;
            let id = resolve_dataset(&store, &dataset)?;
            let n = match format.as_str() {
                "jsonl" => view::export_jsonl(&store, id, &path)?,
                "parquet" => view::export_parquet(&store, id, &path)?,
                f => bail!("unknown --format `{f}` (jsonl or parquet)"),
            };
            if ctx.json {
                out_json(&serde_json::json!({"rows": n, "out": path.display().to_string()}))?;
            } else {
                note(format!("wrote {n} rows to {}", path.display()));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `emlab lineage ID|NAME`.
pub fn lineage(ctx: &Ctx, target: &str) -> Result<ExitCode> {
    let store = ctx.open()?;
    let id = match resolve_dataset(&store, target) {
        Ok(id) => id,
        Err(_) => store
            .resolve_prefix(target)
            .with_context(|| format!("looking up `{target}`"))?,
    };
    let tree = view::lineage(&store, id)?;
    if ctx.json {
        out_json(&tree)?;
    } else {
        out(view::render_tree(&tree).trim_end())?;
    }
    Ok(ExitCode::SUCCESS)
}
