//! `emlab export [--out DIR]`: Parquet for DuckDB, incremental.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory (default: <store>/parquet).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open()?;
    let dir = a.out.unwrap_or_else(|| store.dir().join("parquet"));
    let report = emlab_store::export::export(&store, &dir)
        .with_context(|| format!("exporting to {}", dir.display()))?;
    if ctx.json {
        out_json(
            &serde_json::json!({"out": dir.display().to_string(), "rows": report.rows, "files": report.files}),
        )?;
    } else {
        let total: u64 = report.rows.values().sum();
        for (t, n) in &report.rows {
            out(format!("{t:<14} {n:>10}"))?;
        }
        note(format!("exported {total} new records to {}", dir.display()));
    }
    Ok(ExitCode::SUCCESS)
}
