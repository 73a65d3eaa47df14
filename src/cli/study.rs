//! `emlab run`, `emlab status`, `emlab compare` and `emlab report`: studies from one spec.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use super::{note, out, out_json, short, Ctx};
use emlab::jobs::study::compare::{compare, By, Rate, Row};
use emlab::jobs::study::spec::Spec;
use emlab::jobs::study::{self, StepLine, StepState};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The study spec (TOML; see docs/studies.md).
    pub spec: PathBuf,
    /// Print the plan (done / pending / why it reruns) without running or storing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// A study spec file, or the name (or id) of a finished study.
    pub study: String,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Studies by name or id (default: every finished study in the store).
    pub studies: Vec<String>,
    /// Row detail and order: question (a row per question), checkpoint (every evaluated
    /// checkpoint), and sort keys stage, condition, seed, model.
    #[arg(long, value_delimiter = ',', value_parser = ["model", "stage", "question", "condition", "seed", "checkpoint"])]
    pub by: Vec<String>,
    /// Comma-separated values instead of a table.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The study's name (its spec's `name`) or id.
    pub study: String,
    /// Output folder: DIR/index.html.
    #[arg(short, long)]
    pub out: PathBuf,
}

fn state(s: StepState) -> &'static str {
    match s {
        StepState::Done => "done",
        StepState::Running => "running",
        StepState::Ran => "ran",
        StepState::Pending => "pending",
        StepState::Waiting => "waiting",
    }
}

fn line(n: usize, l: &StepLine) -> String {
    let id = l
        .step
        .as_deref()
        .map_or(String::from("-"), |s| short(s).to_string());
    let mut t = format!("[{n:>3}] {:<8} {:<12} {}", state(l.state), id, l.label);
    if l.state == StepState::Ran {
        t += &format!(" ({} records, {:.1} s)", l.outputs, l.seconds);
    }
    if let Some(w) = &l.why {
        if l.state != StepState::Ran && l.state != StepState::Done {
            t += &format!(" -- {w}");
        }
    }
    t
}

pub fn run(ctx: &Ctx, a: RunArgs) -> Result<ExitCode> {
    let spec = Spec::load(&a.spec).map_err(study::StudyError::from)?;
    let store = ctx.open()?;
    let mut n = 0;
    let dry = a.dry_run;
    let json = ctx.json;
    let mut progress = |l: &StepLine| {
        if l.state != StepState::Running {
            n += 1;
        }
        if dry {
            return;
        }
        if !json {
            note(line(n + usize::from(l.state == StepState::Running), l));
        }
    };
    let r = study::run(&store, &spec, a.dry_run, &mut progress)
        .with_context(|| format!("running study {}", a.spec.display()))?;
    if ctx.json {
        out_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.dry_run {
        for (i, l) in r.steps.iter().enumerate() {
            out(line(i + 1, l))?;
        }
        note(format!(
            "{} steps: {} done, {} to run (dry run: nothing ran, nothing stored)",
            r.steps.len(),
            r.done,
            r.pending
        ));
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = &r.study {
        out(id)?;
    }
    note(format!(
        "study `{}`: {} steps, {} ran, {} already done",
        r.name,
        r.steps.len(),
        r.ran,
        r.done
    ));
    Ok(ExitCode::SUCCESS)
}

pub fn status(ctx: &Ctx, a: StatusArgs) -> Result<ExitCode> {
    let store = ctx.open()?;
    let path = PathBuf::from(&a.study);
    if path.is_file() {
        let spec = Spec::load(&path).map_err(study::StudyError::from)?;
        let r = study::run(&store, &spec, true, &mut |_| {})?;
        if ctx.json {
            out_json(&r)?;
        } else {
            for (i, l) in r.steps.iter().enumerate() {
                out(line(i + 1, l))?;
            }
            note(format!(
                "study `{}`: {} of {} steps done",
                r.name,
                r.done,
                r.steps.len()
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = study::resolve(&store, &a.study)?;
    let rec = store.get(id)?;
    let steps = rec
        .get("steps")
        .map(emlab_store::Value::id_list)
        .unwrap_or_default();
    let recs = store.get_many(&steps)?;
    if ctx.json {
        let v: Vec<_> = steps
            .iter()
            .zip(&recs)
            .map(|(s, r)| serde_json::json!({"record": s.to_hex(), "label": r.get("label").and_then(|v| v.as_str()), "kind": r.get("kind").and_then(|v| v.as_str())}))
            .collect();
        out_json(&serde_json::json!({"study": id.to_hex(), "steps": v}))?;
    } else {
        for (i, (s, r)) in steps.iter().zip(&recs).enumerate() {
            let label = r.get("label").and_then(|v| v.as_str()).unwrap_or("");
            out(format!("[{:>3}] done     {} {label}", i + 1, s.short()))?;
        }
        note(format!(
            "study {}: finished, {} steps",
            short(&id.to_hex()),
            steps.len()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn pct(r: Option<&Rate>) -> String {
    match r.and_then(|r| r.value.map(|v| (v, r))) {
        Some((v, r)) => match (r.ci_low, r.ci_high) {
            (Some(l), Some(h)) => format!("{:.1} [{:.1}, {:.1}]", v * 100.0, l * 100.0, h * 100.0),
            _ => format!("{:.1}", v * 100.0),
        },
        None => format!("- (n {})", r.map_or(0, |r| r.n)),
    }
}

fn probe(r: Option<&Rate>) -> String {
    match r.and_then(|r| r.value.map(|v| (v, r))) {
        Some((v, r)) => match (r.ci_low, r.ci_high) {
            (Some(l), Some(h)) => format!("{v:+.3} [{l:+.3}, {h:+.3}]"),
            _ => format!("{v:+.3}"),
        },
        None => "-".into(),
    }
}

fn model_cell(r: &Row) -> String {
    let mut s = r.stage.clone();
    if !r.seeds.is_empty() {
        let v: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        s += &format!(" s{}", v.join("/"));
    }
    if let Some(c) = r.checkpoint {
        s += &format!(" @{c}");
    }
    s
}

pub fn compare_cmd(ctx: &Ctx, a: CompareArgs) -> Result<ExitCode> {
    let store = ctx.open()?;
    let by = By {
        question: a.by.iter().any(|b| b == "question"),
        checkpoint: a.by.iter().any(|b| b == "checkpoint"),
        order: a.by.clone(),
    };
    let rows = compare(&store, &a.studies, &by)?;
    if ctx.json {
        out_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let by_model = a.by.iter().any(|b| b == "model");
    let mut probes: Vec<String> = rows.iter().flat_map(|r| r.probes.keys().cloned()).collect();
    probes.sort();
    probes.dedup();
    let studies: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.study.as_str()).collect();
    let mut head: Vec<String> = Vec::new();
    if studies.len() > 1 {
        head.push("study".into());
    }
    head.extend(
        [
            if by_model { "model" } else { "stage" },
            "eval",
            "condition",
        ]
        .map(String::from),
    );
    if by.question {
        head.push("question".into());
    }
    head.extend(
        [
            "EM% betley [95% CI]",
            "EM% model-organisms",
            "EM% label",
            "aligned",
            "coherent",
        ]
        .map(String::from),
    );
    head.extend(probes.iter().map(|p| format!("probe {p}")));
    head.extend(["answers", "judged", "no score", "seed spread"].map(String::from));
    let mut table: Vec<Vec<String>> = Vec::new();
    for r in &rows {
        let mut c = Vec::new();
        if studies.len() > 1 {
            c.push(r.study.clone());
        }
        c.push(if by_model {
            r.model.clone()
        } else {
            model_cell(r)
        });
        c.push(r.eval.clone());
        c.push(r.condition.clone());
        if by.question {
            c.push(r.question.clone());
        }
        c.push(pct(r.em.get("betley")));
        c.push(pct(r.em.get("model-organisms")));
        c.push(pct(r.em.get("label")));
        c.push(r.mean_aligned.map_or("-".into(), |v| format!("{v:.1}")));
        c.push(r.mean_coherent.map_or("-".into(), |v| format!("{v:.1}")));
        for p in &probes {
            c.push(probe(r.probes.get(p)));
        }
        c.push(r.answers.to_string());
        c.push(r.judged.to_string());
        c.push(r.unscored.to_string());
        c.push(r.seed_spread.map_or(String::new(), |(l, h)| {
            format!("{:.1}-{:.1}", l * 100.0, h * 100.0)
        }));
        table.push(c);
    }
    if a.csv {
        let mut w = csv::Writer::from_writer(std::io::stdout().lock());
        w.write_record(&head)?;
        for row in &table {
            w.write_record(row)?;
        }
        w.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::ASCII_MARKDOWN)
        .set_header(head)
        .add_rows(table);
    out(t.to_string())?;
    if rows.is_empty() {
        note("no finished study in this store (emlab run SPEC finishes one)");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn report(ctx: &Ctx, a: ReportArgs) -> Result<ExitCode> {
    let store = ctx.open()?;
    let path = study::report::write(&store, &a.study, &a.out)
        .with_context(|| format!("writing the report of `{}`", a.study))?;
    out(path.display().to_string())?;
    Ok(ExitCode::SUCCESS)
}
