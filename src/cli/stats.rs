//! `emlab store stats`: records per table, blobs, file sizes.

use anyhow::Result;
use clap::Subcommand;
use std::process::ExitCode;

use super::{out, out_json, Ctx};

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Records per table and the size of the store.
    Stats,
}

pub fn run(ctx: &Ctx, cmd: StoreCmd) -> Result<ExitCode> {
    match cmd {
        StoreCmd::Stats => {
            let store = ctx.open()?;
            let counts = store.counts()?;
            let (blobs, blob_bytes) = blob_usage(&store.dir().join("blobs"));
            let db_bytes = std::fs::metadata(store.dir().join("store.redb"))
                .map(|m| m.len())
                .unwrap_or(0);
            if ctx.json {
                out_json(&serde_json::json!({
                    "store": store.dir().display().to_string(),
                    "tables": counts,
                    "records": counts.values().sum::<u64>(),
                    "blobs": blobs,
                    "blob_bytes": blob_bytes,
                    "db_bytes": db_bytes,
                }))?;
            } else {
                out(format!("{:<14} {:>10}", "table", "records"))?;
                for (t, n) in &counts {
                    out(format!("{t:<14} {n:>10}"))?;
                }
                out(format!(
                    "{:<14} {:>10}",
                    "total",
                    counts.values().sum::<u64>()
                ))?;
                out(format!(
                    "blobs: {blobs} ({blob_bytes} bytes); database: {db_bytes} bytes"
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn blob_usage(dir: &std::path::Path) -> (u64, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for shard in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            n += 1;
            bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (n, bytes)
}
