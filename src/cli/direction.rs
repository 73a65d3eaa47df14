//! `emlab activations` (compute a misalignment direction) and `emlab direction` (list and
//! compare stored directions).

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use super::args::WeightArgs;
use super::{note, out, out_json, short, Ctx};
use emlab::jobs::direction::{activations, compare, ActivationsPlan, Selection};
use emlab::jobs::load::AdapterSource;
use emlab::util::layers::LayerSpec;

#[derive(clap::Args, Debug)]
pub struct ActivationsArgs {
    /// The name the direction is stored under (`emlab show NAME`, `--steer NAME:L:S`).
    pub name: String,
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A checkpoint from `emlab train` (id or prefix), applied to --model: the activations
    /// of the fine-tuned model.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// The misaligned answers: a chat dataset (its assistant turns), or stored generations,
    /// `generations:MODEL[:FILTER]`, e.g. `generations:base:aligned<30,coherent>50`.
    #[arg(long, value_parser = str::parse::<Selection>)]
    pub misaligned: Selection,
    /// The aligned answers, as --misaligned, e.g. `generations:base:aligned>70,coherent>50`.
    #[arg(long, value_parser = str::parse::<Selection>)]
    pub aligned: Selection,
    /// Layers to measure: `all`, or indices and ranges such as `15-17,21` (0-based).
    #[arg(long, default_value = "all", value_parser = str::parse::<LayerSpec>)]
    pub layers: LayerSpec,
    /// Answers per forward.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[command(flatten)]
    pub weights: WeightArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum DirectionCmd {
    /// Stored directions: name, id, model, layers, group sizes.
    List,
    /// Cosine similarity of two directions per layer (two fine-tunes, checkpoints or
    /// datasets), with both norms.
    Compare {
        /// A direction name, id or id prefix.
        a: String,
        /// Another.
        b: String,
    },
}

pub fn run_activations(ctx: &Ctx, a: ActivationsArgs) -> Result<ExitCode> {
    let store = ctx.open()?;
    let plan = ActivationsPlan {
        name: a.name.clone(),
        model: a.model.clone(),
        adapter: a
            .checkpoint
            .map(|id| AdapterSource::Checkpoint { id, merge: false }),
        weights: a.weights.mode(),
        misaligned: a.misaligned,
        aligned: a.aligned,
        layers: a.layers,
        batch: a.batch,
    };
    let r = activations(&store, &plan).with_context(|| {
        format!(
            "computing direction `{}` with {}",
            a.name,
            a.model.display()
        )
    })?;
    if ctx.json {
        out_json(&r)?;
    } else {
        out(&r.direction)?;
        let peak = r
            .norms
            .iter()
            .max_by(|x, y| x.norm.total_cmp(&y.norm))
            .map(|n| format!("largest norm {:.3} at layer {}", n.norm, n.layer))
            .unwrap_or_default();
        note(format!(
            "direction `{}`: {} misaligned vs {} aligned answers, {} layers, {peak}; model {}{}",
            r.name,
            r.n_misaligned,
            r.n_aligned,
            r.norms.len(),
            short(&r.model),
            if r.cached {
                " (already stored: nothing computed)".to_string()
            } else {
                format!(" ({:.1} s, {:.0} tokens/s)", r.seconds, r.tokens_per_s)
            }
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(ctx: &Ctx, cmd: DirectionCmd) -> Result<ExitCode> {
    let store = ctx.open()?;
    match cmd {
        DirectionCmd::List => {
            let mut rows = Vec::new();
            for (name, id) in store.aliases(emlab::provenance::tables::NS_DIRECTION)? {
                let d = emlab::jobs::direction::load(&store, &id.to_hex())?;
                let layers = d.directions.layers.iter().filter(|v| v.is_some()).count();
                let get = |c: &str| d.record.get(c).and_then(emlab_store::Value::as_int);
                rows.push(serde_json::json!({
                    "name": name, "id": id.to_hex(),
                    "model": d.record.get("model").and_then(emlab_store::Value::as_id).map(|m| m.to_hex()),
                    "layers": layers, "hidden": d.directions.hidden,
                    "n_misaligned": get("n_misaligned"), "n_aligned": get("n_aligned"),
                }));
            }
            if ctx.json {
                out_json(&rows)?;
            } else {
                out("name\tid\tmodel\tlayers\tmisaligned\taligned")?;
                for r in &rows {
                    out(format!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        r["name"].as_str().unwrap_or(""),
                        short(r["id"].as_str().unwrap_or("")),
                        short(r["model"].as_str().unwrap_or("")),
                        r["layers"],
                        r["n_misaligned"],
                        r["n_aligned"]
                    ))?;
                }
            }
        }
        DirectionCmd::Compare { a, b } => {
            let rows = compare(&store, &a, &b)
                .with_context(|| format!("comparing directions `{a}` and `{b}`"))?;
            if ctx.json {
                out_json(&rows)?;
            } else {
                out("layer\tcosine\tnorm_a\tnorm_b")?;
                for r in &rows {
                    out(format!(
                        "{}\t{:+.4}\t{:.4}\t{:.4}",
                        r.layer, r.cosine, r.norm_a, r.norm_b
                    ))?;
                }
                let mean = rows.iter().map(|r| r.cosine).sum::<f64>() / rows.len() as f64;
                let above = rows.iter().filter(|r| r.cosine > 0.8).count();
                note(format!(
                    "mean cosine {mean:+.4} over {} layers; {above} above 0.8",
                    rows.len()
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
