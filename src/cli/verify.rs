//! `emlab verify`: re-hash everything, list each mismatch, exit 1 if any.

use anyhow::Result;
use std::process::ExitCode;

use super::{note, out, out_json, Ctx};

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let mut store = ctx.open()?;
    let r = store.verify()?;
    if ctx.json {
        let problems: Vec<_> = r
            .problems
            .iter()
            .map(|p| serde_json::json!({"id": p.id, "problem": p.what}))
            .collect();
        out_json(
            &serde_json::json!({"ok": r.ok(), "records": r.records, "blobs": r.blobs, "problems": problems}),
        )?;
    } else {
        for p in &r.problems {
            out(format!("MISMATCH {}: {}", p.id, p.what))?;
        }
        note(format!(
            "checked {} records and {} blobs: {}",
            r.records,
            r.blobs,
            if r.ok() {
                "all ok".to_string()
            } else {
                format!("{} problems", r.problems.len())
            }
        ));
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
