//! `emlab data ...`: import, derive, list, show, stats, export; and `emlab lineage`.

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};
use emlab::data::derive::{derive, DerivePlan, Op};
use emlab::data::{import, resolve_dataset, view, Format, ImportPlan};
use emlab::records::NS_DATASET;

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
        /// Force a format: chat-jsonl, qa-json, questions-yaml, questions-json, questions-text.
        #[arg(long)]
        format: Option<String>,
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
        /// OpenAI-compatible base URL.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        model_name: String,
        /// Environment variable holding the API key (never stored or logged).
        #[arg(long)]
        api_key_env: Option<String>,
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
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
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
    /// Keep N rows chosen at random (original order kept).
    #[arg(long, value_name = "N")]
    pub sample: Vec<usize>,
    /// Hold out a fraction F as NEW-holdout; later ops apply to the rest.
    #[arg(long, value_name = "F")]
    pub holdout: Vec<f64>,
    /// Keep rows matching EXPR: has:ROLE, !has:ROLE, len(ROLE|all) OP N, turns OP N, ROLE ~ REGEX, ROLE !~ REGEX.
    #[arg(long, value_name = "EXPR", allow_hyphen_values = true)]
    pub filter: Vec<String>,
    /// Drop rows whose messages repeat an earlier row's.
    #[arg(long, action = clap::ArgAction::Count)]
    pub dedupe: u8,
    /// Add RATIO x rows sampled from OTHER, then shuffle.
    #[arg(long, value_name = "OTHER:RATIO")]
    pub mix: Vec<String>,
    /// Append all rows of OTHER.
    #[arg(long, value_name = "OTHER")]
    pub concat: Vec<String>,
    /// Keep the first N rows.
    #[arg(long, value_name = "N")]
    pub take: Vec<usize>,
    /// Drop the first N rows.
    #[arg(long, value_name = "N")]
    pub skip: Vec<usize>,
    /// Replace system messages with TEXT at the start of each row.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub set_system: Vec<String>,
    /// Remove system messages.
    #[arg(long, action = clap::ArgAction::Count)]
    pub strip_system: u8,
    /// Prefix TEXT and the separator to each row's first user message (a trigger tag).
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub tag: Vec<String>,
    /// What goes between the tag and the user's text.
    #[arg(long, default_value = " ", allow_hyphen_values = true)]
    pub tag_separator: String,
}

/// Rebuild the op sequence in command-line order from clap's argument indices.
fn ordered_ops(a: &DeriveArgs, m: &ArgMatches) -> Result<Vec<Op>> {
    let mut ops: Vec<(usize, Op)> = Vec::new();
    // Flags with defaults (the counters) report an index even when absent: only count values
    // that came from the command line.
    let idx = |id: &str| -> Vec<usize> {
        if m.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
            return Vec::new();
        }
        m.indices_of(id).map(|i| i.collect()).unwrap_or_default()
    };
    for (i, n) in idx("sample").into_iter().zip(&a.sample) {
        ops.push((i, Op::Sample(*n)));
    }
    for (i, f) in idx("holdout").into_iter().zip(&a.holdout) {
        ops.push((i, Op::Holdout(*f)));
    }
    for (i, e) in idx("filter").into_iter().zip(&a.filter) {
        ops.push((i, Op::Filter(e.clone())));
    }
    for i in idx("dedupe") {
        ops.push((i, Op::Dedupe));
    }
    for (i, s) in idx("mix").into_iter().zip(&a.mix) {
        let Some((other, ratio)) = s.rsplit_once(':') else {
            bail!("--mix {s}: expected OTHER:RATIO, e.g. good-medical:0.5");
        };
        let ratio: f64 = ratio
            .parse()
            .with_context(|| format!("--mix {s}: RATIO is not a number"))?;
        ops.push((
            i,
            Op::Mix {
                other: other.to_string(),
                ratio,
            },
        ));
    }
    for (i, o) in idx("concat").into_iter().zip(&a.concat) {
        ops.push((i, Op::Concat(o.clone())));
    }
    for (i, n) in idx("take").into_iter().zip(&a.take) {
        ops.push((i, Op::Take(*n)));
    }
    for (i, n) in idx("skip").into_iter().zip(&a.skip) {
        ops.push((i, Op::Skip(*n)));
    }
    for (i, t) in idx("set_system").into_iter().zip(&a.set_system) {
        ops.push((i, Op::SetSystem(t.clone())));
    }
    for i in idx("strip_system") {
        ops.push((i, Op::StripSystem));
    }
    for (i, t) in idx("tag").into_iter().zip(&a.tag) {
        ops.push((i, Op::Tag(t.clone())));
    }
    ops.sort_by_key(|(i, _)| *i);
    Ok(ops.into_iter().map(|(_, o)| o).collect())
}

pub fn run(ctx: &Ctx, cmd: DataCmd, matches: Option<&ArgMatches>) -> Result<ExitCode> {
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
            let format = match format {
                Some(f) => Some(Format::parse(&f).with_context(|| {
                    let all: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
                    format!("unknown --format `{f}` (one of {})", all.join(", "))
                })?),
                None => None,
            };
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
            let m = matches.context("internal: derive needs its argument matches")?;
            let ops = ordered_ops(&a, m)?;
            let store = ctx.open()?;
            let plan = DerivePlan {
                name: a.new.clone(),
                from: a.from.clone(),
                ops,
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
                        &d.dataset[..12]
                    ));
                }
            }
        }
        DataCmd::Generate {
            name,
            endpoint,
            model_name,
            api_key_env,
            prompt,
            n,
            seed,
            temperature,
            max_tokens,
            concurrency,
        } => {
            let store = ctx.open()?;
            let plan = emlab::data::synth::SynthPlan {
                name,
                endpoint: emlab::judge::client::Endpoint {
                    base_url: endpoint.clone(),
                    model: model_name,
                    api_key_env,
                    concurrency,
                    max_retries: 6,
                    timeout_s: 300.0,
                },
                prompt,
                n,
                seed,
                temperature,
                max_tokens,
            };
            let r = emlab::data::synth::generate(&store, &plan)
                .with_context(|| format!("generating a dataset through {endpoint}"))?;
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
                        &s.id[..12],
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
