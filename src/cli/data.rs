//! `emlab data ...`: import datasets, list them.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};
use emlab::data::{import, ImportPlan};
use emlab::records::NS_DATASET;

#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Import a file as a named dataset; prints the dataset id.
    Import {
        /// The file (chat JSONL, optionally .gz).
        file: PathBuf,
        /// The dataset's name (a mutable alias for its id).
        #[arg(long)]
        name: String,
    },
    /// List named datasets.
    List,
}

pub fn run(ctx: &Ctx, cmd: DataCmd) -> Result<ExitCode> {
    match cmd {
        DataCmd::Import { file, name } => {
            let store = ctx.open()?;
            let plan = ImportPlan {
                path: file.clone(),
                name,
            };
            let r =
                import(&store, &plan).with_context(|| format!("importing {}", file.display()))?;
            if ctx.json {
                out_json(&r)?;
            } else {
                out(&r.dataset)?;
                note(format!(
                    "imported {} rows from {} as `{}` ({} new records, {} already stored)",
                    r.rows,
                    file.display(),
                    r.name,
                    r.new_records,
                    r.existing_records
                ));
            }
        }
        DataCmd::List => {
            let store = ctx.open()?;
            let mut rows = Vec::new();
            for (name, id) in store.aliases(NS_DATASET)? {
                let rec = store.get(id)?;
                let n = rec
                    .get("rows")
                    .and_then(|v| v.as_list())
                    .map_or(0, |l| l.len());
                let kind = rec
                    .get("kind")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string();
                rows.push((name, id, kind, n));
            }
            if ctx.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, id, k, r)| serde_json::json!({"name": n, "id": id.to_hex(), "kind": k, "rows": r}))
                    .collect();
                out_json(&v)?;
            } else {
                out(format!(
                    "{:<32} {:<12} {:<10} {:>8}",
                    "name", "id", "kind", "rows"
                ))?;
                for (n, id, k, r) in rows {
                    out(format!("{n:<32} {:<12} {k:<10} {r:>8}", id.short()))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
