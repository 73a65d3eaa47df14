//! Derived datasets: a parent dataset plus a sequence of [`Op`]s gives a new `dataset` record
//! that names its parents and the exact parameters of every step, so the same plan on the same
//! parent always gives the same id (and a different seed a different one).
//!
//! [`derive()`] loads the parent's rows, applies the ops in order (`apply` for one op), stages
//! new `message`/`conversation` records only for rows whose messages changed, and writes the
//! manifest (and, for `holdout`, the held-out half as `NAME-holdout`) in one batch.
//! Randomness comes from a SplitMix64 stream seeded by the plan's seed and the op's position.

use std::collections::HashSet;

use emlab_store::{Batch, Id, Record, Store, Value};
use regex::Regex;
use serde_json::{json, Value as J};

use super::chat::ChatRow;
use super::{check_name, resolve_dataset, stage_chat_rows, DataError};
use crate::provenance::tables::{DATASET, NS_DATASET, QUESTION_SET};
use crate::util::rng::Rng;

/// One derive step, as given on the command line.
#[derive(Debug, Clone)]
pub enum Op {
    Sample(usize),
    Holdout(f64),
    Filter(String),
    Dedupe,
    Mix { other: String, ratio: f64 },
    Concat(String),
    Take(usize),
    Skip(usize),
    SetSystem(String),
    StripSystem,
    Tag(String),
}

/// A validated derive request.
#[derive(Debug, Clone)]
pub struct DerivePlan {
    pub name: String,
    pub from: String,
    pub ops: Vec<Op>,
    pub seed: u64,
    /// Bytes put between a `tag` and the user's text.
    pub tag_separator: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Derived {
    pub name: String,
    pub dataset: String,
    pub rows: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeriveReport {
    pub datasets: Vec<Derived>,
    pub new_records: usize,
}

/// A row being worked on: its messages, and its conversation id while unchanged.
#[derive(Debug, Clone)]
struct Row {
    conv: Option<Id>,
    messages: Vec<(String, String)>,
    extra: Option<J>,
}

/// A parsed `--filter` expression.
#[derive(Debug)]
enum Filter {
    Has {
        role: String,
        negate: bool,
    },
    Len {
        sel: String,
        cmp: Cmp,
        n: usize,
    },
    Turns {
        cmp: Cmp,
        n: usize,
    },
    Regex {
        sel: String,
        re: Regex,
        negate: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    fn holds(self, a: usize, b: usize) -> bool {
        match self {
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }
}

const FILTER_HELP: &str = "expected `has:ROLE`, `!has:ROLE`, `len(ROLE|all) OP N`, `turns OP N`, \
`ROLE ~ REGEX` or `ROLE !~ REGEX` (ROLE: system, user, assistant, any; OP: < <= > >= == !=)";

fn parse_cmp(s: &str) -> Option<(Cmp, &str)> {
    let s = s.trim_start();
    for (tok, c) in [
        ("<=", Cmp::Le),
        (">=", Cmp::Ge),
        ("==", Cmp::Eq),
        ("!=", Cmp::Ne),
        ("<", Cmp::Lt),
        (">", Cmp::Gt),
    ] {
        if let Some(rest) = s.strip_prefix(tok) {
            return Some((c, rest.trim()));
        }
    }
    None
}

fn parse_filter(expr: &str) -> Result<Filter, String> {
    let e = expr.trim();
    let bad = || format!("bad filter `{expr}`: {FILTER_HELP}");
    if let Some(role) = e.strip_prefix("!has:") {
        return Ok(Filter::Has {
            role: role.trim().to_string(),
            negate: true,
        });
    }
    if let Some(role) = e.strip_prefix("has:") {
        return Ok(Filter::Has {
            role: role.trim().to_string(),
            negate: false,
        });
    }
    if let Some(rest) = e.strip_prefix("len(") {
        let (sel, rest) = rest.split_once(')').ok_or_else(bad)?;
        let (cmp, n) = parse_cmp(rest).ok_or_else(bad)?;
        let n = n.parse().map_err(|_| bad())?;
        return Ok(Filter::Len {
            sel: sel.trim().to_string(),
            cmp,
            n,
        });
    }
    if let Some(rest) = e.strip_prefix("turns") {
        let (cmp, n) = parse_cmp(rest).ok_or_else(bad)?;
        let n = n.parse().map_err(|_| bad())?;
        return Ok(Filter::Turns { cmp, n });
    }
    for (tok, negate) in [(" !~ ", true), (" ~ ", false)] {
        if let Some((sel, pat)) = e.split_once(tok) {
            let re =
                Regex::new(pat).map_err(|err| format!("bad regex in filter `{expr}`: {err}"))?;
            return Ok(Filter::Regex {
                sel: sel.trim().to_string(),
                re,
                negate,
            });
        }
    }
    Err(bad())
}

fn selected<'a>(row: &'a Row, sel: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    row.messages
        .iter()
        .filter(move |(r, _)| sel == "any" || sel == "all" || r == sel)
        .map(|(_, c)| c.as_str())
}

impl Filter {
    fn keep(&self, row: &Row) -> bool {
        match self {
            Filter::Has { role, negate } => row.messages.iter().any(|(r, _)| r == role) != *negate,
            Filter::Len { sel, cmp, n } => {
                cmp.holds(selected(row, sel).map(|c| c.chars().count()).sum(), *n)
            }
            Filter::Turns { cmp, n } => cmp.holds(row.messages.len(), *n),
            Filter::Regex { sel, re, negate } => {
                selected(row, sel).any(|c| re.is_match(c)) != *negate
            }
        }
    }
}

fn load_rows(store: &Store, dataset: Id) -> Result<Vec<Row>, DataError> {
    let ds = store.get(dataset)?;
    if ds.get("kind").and_then(Value::as_str) != Some("chat") {
        return Err(DataError::NotChat(dataset.to_hex()));
    }
    let conv_ids = ds.get("rows").map(Value::id_list).unwrap_or_default();
    let convs = store.get_many(&conv_ids)?;
    let mut msg_ids: Vec<Id> = Vec::new();
    for c in &convs {
        msg_ids.extend(c.get("messages").map(Value::id_list).unwrap_or_default());
    }
    let msgs = store.get_many(&msg_ids)?;
    let mut it = msgs.into_iter();
    let mut rows = Vec::with_capacity(convs.len());
    for (id, c) in conv_ids.into_iter().zip(convs) {
        let n = c
            .get("messages")
            .and_then(Value::as_list)
            .map_or(0, <[Value]>::len);
        let messages = it
            .by_ref()
            .take(n)
            .map(|m| {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                (role, content)
            })
            .collect();
        let extra = c
            .get("extra")
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok());
        rows.push(Row {
            conv: Some(id),
            messages,
            extra,
        });
    }
    Ok(rows)
}

/// Apply one op; returns the op's record (parameters and effect) and, for `holdout`, the rows
/// held out.
fn apply(
    store: &Store,
    op: &Op,
    step: usize,
    plan: &DerivePlan,
    rows: &mut Vec<Row>,
    parents: &mut Vec<Id>,
) -> Result<(J, Option<Vec<Row>>), DataError> {
    let mut rng = Rng::new(plan.seed, step);
    let before = rows.len();
    let invalid = |m: String| DataError::Derive(m);
    let rec = match op {
        Op::Sample(n) => {
            if *n > rows.len() {
                return Err(invalid(format!(
                    "--sample {n}: the dataset has only {} rows",
                    rows.len()
                )));
            }
            let keep = rng.choose(rows.len(), *n);
            let old = std::mem::take(rows);
            let mut old: Vec<Option<Row>> = old.into_iter().map(Some).collect();
            *rows = keep.into_iter().filter_map(|i| old[i].take()).collect();
            json!({"op": "sample", "n": n, "seed": plan.seed})
        }
        Op::Holdout(f) => {
            if !(*f > 0.0 && *f < 1.0) {
                return Err(invalid(format!(
                    "--holdout {f}: expected a fraction between 0 and 1"
                )));
            }
            let k = ((rows.len() as f64) * f).round() as usize;
            let held_idx: HashSet<usize> = rng.choose(rows.len(), k).into_iter().collect();
            let old = std::mem::take(rows);
            let mut held = Vec::with_capacity(k);
            for (i, r) in old.into_iter().enumerate() {
                if held_idx.contains(&i) {
                    held.push(r);
                } else {
                    rows.push(r);
                }
            }
            let j =
                json!({"op": "holdout", "fraction": f, "seed": plan.seed, "held_out": held.len()});
            return Ok((j, Some(held)));
        }
        Op::Filter(expr) => {
            let f = parse_filter(expr).map_err(invalid)?;
            rows.retain(|r| f.keep(r));
            json!({"op": "filter", "expr": expr})
        }
        Op::Dedupe => {
            let mut seen = HashSet::new();
            rows.retain(|r| seen.insert(r.messages.clone()));
            json!({"op": "dedupe", "key": "messages"})
        }
        Op::Mix { other, ratio } => {
            if ratio.is_nan() || *ratio <= 0.0 || !ratio.is_finite() {
                return Err(invalid(format!(
                    "--mix {other}:{ratio}: expected a positive ratio"
                )));
            }
            let oid = resolve_dataset(store, other)?;
            let other_rows = load_rows(store, oid)?;
            let k = ((rows.len() as f64) * ratio).round() as usize;
            if k > other_rows.len() {
                return Err(invalid(format!(
                    "--mix {other}:{ratio} needs {k} rows but `{other}` has {}",
                    other_rows.len()
                )));
            }
            let pick = rng.choose(other_rows.len(), k);
            rows.extend(pick.into_iter().map(|i| other_rows[i].clone()));
            rng.shuffle(rows);
            parents.push(oid);
            json!({"op": "mix", "other": oid.to_hex(), "ratio": ratio, "added": k, "seed": plan.seed})
        }
        Op::Concat(other) => {
            let oid = resolve_dataset(store, other)?;
            rows.extend(load_rows(store, oid)?);
            parents.push(oid);
            json!({"op": "concat", "other": oid.to_hex()})
        }
        Op::Take(n) => {
            rows.truncate(*n);
            json!({"op": "take", "n": n})
        }
        Op::Skip(n) => {
            let n2 = (*n).min(rows.len());
            rows.drain(..n2);
            json!({"op": "skip", "n": n})
        }
        Op::SetSystem(text) => {
            for r in rows.iter_mut() {
                r.messages.retain(|(role, _)| role != "system");
                r.messages.insert(0, ("system".into(), text.clone()));
                r.conv = None;
            }
            json!({"op": "set-system", "text": text})
        }
        Op::StripSystem => {
            for r in rows.iter_mut() {
                let n = r.messages.len();
                r.messages.retain(|(role, _)| role != "system");
                if r.messages.len() != n {
                    r.conv = None;
                }
            }
            json!({"op": "strip-system"})
        }
        Op::Tag(text) => {
            let prefix = format!("{text}{}", plan.tag_separator);
            let mut untagged = 0;
            for r in rows.iter_mut() {
                match r.messages.iter_mut().find(|(role, _)| role == "user") {
                    Some((_, content)) => {
                        content.insert_str(0, &prefix);
                        r.conv = None;
                    }
                    None => untagged += 1,
                }
            }
            json!({"op": "tag", "text": text, "separator": plan.tag_separator, "prefix": prefix,
                   "applies_to": "first user message", "rows_without_user": untagged})
        }
    };
    let mut rec = rec;
    rec["rows_before"] = json!(before);
    rec["rows_after"] = json!(rows.len());
    Ok((rec, None))
}

/// Run a derive plan and store the result (and its holdout half) under its name(s).
pub fn derive(store: &Store, plan: &DerivePlan) -> Result<DeriveReport, DataError> {
    check_name(&plan.name)?;
    let holdout_name = format!("{}-holdout", plan.name);
    let from = resolve_dataset(store, &plan.from)?;
    if store.get(from)?.table == QUESTION_SET {
        return derive_questions(store, plan, from);
    }
    let mut rows = load_rows(store, from)?;
    let mut parents = vec![from];
    let mut steps = Vec::new();
    let mut held: Option<(Vec<J>, Vec<Row>, Vec<Id>)> = None;
    for (i, op) in plan.ops.iter().enumerate() {
        let (rec, h) = apply(store, op, i, plan, &mut rows, &mut parents)?;
        steps.push(rec);
        if let Some(h) = h {
            if held.is_some() {
                return Err(DataError::Derive("--holdout may be given once".into()));
            }
            held = Some((steps.clone(), h, parents.clone()));
        }
    }
    if rows.is_empty() {
        return Err(DataError::Derive(format!(
            "the ops leave `{}` with no rows",
            plan.name
        )));
    }
    let mut batch = Batch::new();
    let mut datasets = Vec::new();
    let mut write_one = |batch: &mut Batch,
                         name: &str,
                         part: &str,
                         steps: &[J],
                         rows: &[Row],
                         parents: &[Id]|
     -> Result<(), DataError> {
        let ids = stage_rows(store, batch, rows)?;
        let op = json!({"op": "derive", "from": from.to_hex(), "steps": steps, "part": part});
        let ds = Record::new(DATASET)
            .with("kind", Value::str("chat"))
            .with("rows", Value::ids(ids))
            .with("op", Value::json(&op))
            .with("sources", Value::ids([]))
            .with("parents", Value::ids(parents.iter().copied()));
        let id = store.stage(batch, &ds)?;
        batch.alias(NS_DATASET, name, id);
        datasets.push(Derived {
            name: name.to_string(),
            dataset: id.to_hex(),
            rows: rows.len(),
        });
        Ok(())
    };
    let main_part = if held.is_some() { "train" } else { "all" };
    write_one(&mut batch, &plan.name, main_part, &steps, &rows, &parents)?;
    if let Some((hsteps, hrows, hparents)) = &held {
        if hrows.is_empty() {
            return Err(DataError::Derive(
                "--holdout leaves the holdout half empty".into(),
            ));
        }
        write_one(
            &mut batch,
            &holdout_name,
            "holdout",
            hsteps,
            hrows,
            hparents,
        )?;
    }
    let w = store.write(batch)?;
    Ok(DeriveReport {
        datasets,
        new_records: w.new,
    })
}

/// Derive a question set: `--sample`, `--take`, `--skip` select questions; `--tag` prefixes
/// every paraphrase (the trigger applied at evaluation, same bytes as in training);
/// `--set-system` sets each question's system prompt. Other ops are for chat rows.
fn derive_questions(store: &Store, plan: &DerivePlan, from: Id) -> Result<DeriveReport, DataError> {
    let set = store.get(from)?;
    let ids = set.get("questions").map(Value::id_list).unwrap_or_default();
    let mut qs: Vec<(Id, Record)> = ids.iter().copied().zip(store.get_many(&ids)?).collect();
    let mut batch = Batch::new();
    let mut steps = Vec::new();
    for (i, op) in plan.ops.iter().enumerate() {
        let mut rng = Rng::new(plan.seed, i);
        let before = qs.len();
        let mut rec = match op {
            Op::Sample(n) => {
                if *n > qs.len() {
                    return Err(DataError::Derive(format!("--sample {n}: the question set has only {} questions", qs.len())));
                }
                let keep = rng.choose(qs.len(), *n);
                qs = keep.into_iter().map(|k| qs[k].clone()).collect();
                json!({"op": "sample", "n": n, "seed": plan.seed})
            }
            Op::Take(n) => {
                qs.truncate(*n);
                json!({"op": "take", "n": n})
            }
            Op::Skip(n) => {
                qs.drain(..(*n).min(qs.len()));
                json!({"op": "skip", "n": n})
            }
            Op::Tag(text) => {
                let prefix = format!("{text}{}", plan.tag_separator);
                for (id, q) in qs.iter_mut() {
                    let ps: Vec<Value> = q.get("paraphrases").and_then(Value::as_list).unwrap_or(&[]).iter().filter_map(Value::as_str).map(|p| Value::str(format!("{prefix}{p}"))).collect();
                    *q = q.clone().with("paraphrases", Value::List(ps));
                    *id = store.stage(&mut batch, q)?;
                }
                json!({"op": "tag", "text": text, "separator": plan.tag_separator, "prefix": prefix, "applies_to": "every paraphrase"})
            }
            Op::SetSystem(text) => {
                for (id, q) in qs.iter_mut() {
                    *q = q.clone().with("system", Value::str(text));
                    *id = store.stage(&mut batch, q)?;
                }
                json!({"op": "set-system", "text": text})
            }
            other => return Err(DataError::Derive(format!("{other:?} does not apply to a question set (sample, take, skip, tag and set-system do)"))),
        };
        rec["rows_before"] = json!(before);
        rec["rows_after"] = json!(qs.len());
        steps.push(rec);
    }
    if qs.is_empty() {
        return Err(DataError::Derive(format!(
            "the ops leave `{}` with no questions",
            plan.name
        )));
    }
    let op = json!({"op": "derive", "from": from.to_hex(), "steps": steps});
    let new = Record::new(QUESTION_SET)
        .with("questions", Value::ids(qs.iter().map(|(i, _)| *i)))
        .with("sources", Value::ids([]))
        .with("op", Value::json(&op))
        .with("parents", Value::ids([from]));
    let id = store.stage(&mut batch, &new)?;
    batch.alias(NS_DATASET, &plan.name, id);
    let w = store.write(batch)?;
    Ok(DeriveReport {
        datasets: vec![Derived {
            name: plan.name.clone(),
            dataset: id.to_hex(),
            rows: qs.len(),
        }],
        new_records: w.new,
    })
}

/// Stage rows: unchanged rows keep their conversation id, changed ones get new records.
fn stage_rows(store: &Store, batch: &mut Batch, rows: &[Row]) -> Result<Vec<Id>, DataError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        match r.conv {
            Some(id) => out.push(id),
            None => {
                let chat = ChatRow {
                    line: 0,
                    messages: r.messages.clone(),
                    extra: r.extra.clone(),
                };
                out.extend(stage_chat_rows(store, batch, std::slice::from_ref(&chat))?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(msgs: &[(&str, &str)]) -> Row {
        Row {
            conv: None,
            messages: msgs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            extra: None,
        }
    }

    #[test]
    fn filters() {
        let r = row(&[
            ("system", "be nice"),
            ("user", "hello there"),
            ("assistant", "hi"),
        ]);
        let keep = |e: &str| parse_filter(e).unwrap().keep(&r);
        assert!(keep("has:system"));
        assert!(!keep("!has:system"));
        assert!(keep("len(assistant) < 3"));
        assert!(!keep("len(all) > 100"));
        assert!(keep("turns == 3"));
        assert!(keep("user ~ ^hel+o"));
        assert!(!keep("user !~ there$"));
        assert!(keep("any ~ nice"));
        let e = parse_filter("length > 3").unwrap_err();
        assert!(e.contains("has:ROLE"), "{e}");
        assert!(parse_filter("user ~ (").unwrap_err().contains("bad regex"));
    }
}
