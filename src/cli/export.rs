//! `emlab export [--out DIR | --to URL]`: Parquet for DuckDB, incremental, into a local
//! directory or onto object storage.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory (default: <store>/parquet).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Object storage instead: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX
    /// or file:///PATH; credentials and endpoint from the standard AWS_* (GOOGLE_*, AZURE_*)
    /// variables, never stored.
    #[arg(long, value_name = "URL", conflicts_with = "out")]
    pub to: Option<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open()?;
    let (dir, report) = match &a.to {
        Some(url) => {
            let mut target = emlab::util::remote::ObjectTarget::open(url)?;
            let r = emlab_store::export::export_to(&store, &mut target)
                .with_context(|| format!("exporting to {url}"))?;
            (url.clone(), r)
        }
        None => {
            let dir = a.out.unwrap_or_else(|| store.dir().join("parquet"));
            let r = emlab_store::export::export(&store, &dir)
                .with_context(|| format!("exporting to {}", dir.display()))?;
            (dir.display().to_string(), r)
        }
    };
    if ctx.json {
        out_json(&serde_json::json!({"out": dir, "rows": report.rows, "files": report.files}))?;
    } else {
        let total: u64 = report.rows.values().sum();
        for (t, n) in &report.rows {
            out(format!("{t:<14} {n:>10}"))?;
        }
        note(format!("exported {total} new records to {dir}"));
    }
    Ok(ExitCode::SUCCESS)
}
