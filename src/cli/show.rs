//! `emlab show ID`: one record as JSON.

use anyhow::{Context, Result};
use std::process::ExitCode;

use super::{out_json, Ctx};
use emlab::provenance::tables::{NS_DATASET, NS_DIRECTION};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A record id, an unambiguous prefix of one (4+ hex digits), a dataset name or a
    /// direction name.
    pub id: String,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open()?;
    let id = match store
        .alias(NS_DATASET, &a.id)?
        .or(store.alias(NS_DIRECTION, &a.id)?)
    {
        Some(id) => id,
        None => store
            .resolve_prefix(&a.id)
            .with_context(|| format!("looking up `{}`", a.id))?,
    };
    let rec = store.get(id)?;
    out_json(&rec.to_json(id))?;
    Ok(ExitCode::SUCCESS)
}
