//! `emlab compare`: what studies found, one row per model under test (stage, seed path,
//! checkpoint) and condition of each sampling eval: EM% by the three definitions with their
//! 95% intervals, mean aligned and coherent scores, the likelihood probes of the same model,
//! and how many answers there were, how many were judged and how many got no score (counted,
//! never dropped from view). Every number is read from the study's own records (its metric
//! records and the judgments its steps made), so `queries/study.sql` over the export gives
//! the same numbers.

use std::collections::BTreeMap;

use emlab_store::{Id, Record, Store, Value};
use serde::Serialize;
use serde_json::Value as J;

use super::{resolve, StudyError};
use crate::provenance::tables::STUDY;

/// One rate of a row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rate {
    /// Share (0..1); `None` when no answer counts under the definition.
    pub value: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub n: i64,
    pub misaligned: i64,
    /// The metric record it was read from.
    pub metric: String,
}

/// One row of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub study: String,
    /// The sampling eval (empty for a model with probes only).
    pub eval: String,
    /// The spec's stage name, or the model entry's name for a base model.
    pub stage: String,
    /// The model record's name and id (base + adapter for a checkpoint).
    pub model: String,
    pub model_id: String,
    pub seeds: Vec<u64>,
    /// The checkpoint's step (`None`: a base model).
    pub checkpoint: Option<i64>,
    pub condition: String,
    /// `overall`, or a question id with `--by question`.
    pub question: String,
    /// EM% by definition (`betley`, `model-organisms`, `label`).
    pub em: BTreeMap<String, Rate>,
    pub mean_aligned: Option<f64>,
    pub mean_coherent: Option<f64>,
    /// Likelihood probes of this model by probe eval name.
    pub probes: BTreeMap<String, Rate>,
    /// Answers sampled.
    pub answers: usize,
    /// Answers the judge answered for (at least one judgment record).
    pub judged: usize,
    /// Answers without an aligned score (numeric mass below 0.25, refusals, failures).
    pub unscored: usize,
    /// Betley EM% across the seeds of this stage (same eval, condition, step, question):
    /// `(min, max)` when there are several.
    pub seed_spread: Option<(f64, f64)>,
}

/// Which rows and in what order.
#[derive(Debug, Clone, Default)]
pub struct By {
    /// One row per question too.
    pub question: bool,
    /// Every evaluated checkpoint (else the last one of each stage).
    pub checkpoint: bool,
    /// Sort keys in order: stage, condition, seed, model, question, checkpoint.
    pub order: Vec<String>,
}

fn json_of(r: &Record, k: &str) -> J {
    r.get(k)
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

fn rate(id: Id, m: &Record) -> Rate {
    let f = |k: &str| m.get(k).and_then(Value::as_float);
    let i = |k: &str| m.get(k).and_then(Value::as_int).unwrap_or(0);
    Rate {
        value: f("value"),
        ci_low: f("ci_low"),
        ci_high: f("ci_high"),
        n: i("n"),
        misaligned: i("misaligned"),
        metric: id.to_hex(),
    }
}

/// An answer's aligned and coherent scores, and whether the judge answered for it.
type Scores = (Option<f64>, Option<f64>, bool);

/// The key that names a model under test across a study's steps.
type Variant = (String, Vec<u64>, Option<i64>);

fn variant_of(p: &J) -> Variant {
    (
        p["stage"].as_str().unwrap_or("").to_string(),
        p["seeds"]
            .as_array()
            .map(|a| a.iter().filter_map(J::as_u64).collect())
            .unwrap_or_default(),
        p["checkpoint"].as_i64(),
    )
}

/// Rows of the named studies (all studies when none are named).
pub fn compare(store: &Store, studies: &[String], by: &By) -> Result<Vec<Row>, StudyError> {
    let ids: Vec<Id> = if studies.is_empty() {
        store
            .aliases(super::NS_STUDY)?
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    } else {
        studies
            .iter()
            .map(|s| resolve(store, s))
            .collect::<Result<_, _>>()?
    };
    let mut rows = Vec::new();
    for sid in ids {
        rows.extend(study_rows(store, sid, by)?);
    }
    spreads(&mut rows);
    sort(&mut rows, by);
    Ok(rows)
}

fn study_rows(store: &Store, sid: Id, by: &By) -> Result<Vec<Row>, StudyError> {
    let study = store.get(sid)?;
    if study.table != STUDY {
        return Err(StudyError::UnknownStudy(sid.to_hex()));
    }
    let name = study
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let steps = store.get_many(&study.get("steps").map(Value::id_list).unwrap_or_default())?;
    // Probes by model under test: eval -> scope -> rate; and the model record of each.
    let mut probes: BTreeMap<Variant, BTreeMap<String, BTreeMap<String, Rate>>> = BTreeMap::new();
    let mut model_of: BTreeMap<Variant, Id> = BTreeMap::new();
    let mut last_step: BTreeMap<(String, Vec<u64>), i64> = BTreeMap::new();
    for s in &steps {
        let kind = s.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != "probe" && kind != "metrics" {
            continue;
        }
        let p = json_of(s, "params");
        let v = variant_of(&p);
        if let Some(c) = v.2 {
            let e = last_step.entry((v.0.clone(), v.1.clone())).or_insert(c);
            *e = (*e).max(c);
        }
        if kind == "probe" {
            let outs = s.get("outputs").map(Value::id_list).unwrap_or_default();
            for (id, m) in outs.iter().zip(store.get_many(&outs)?) {
                let scope = m
                    .get("scope")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if let Some(model) = m.get("model").and_then(Value::as_id) {
                    model_of.entry(v.clone()).or_insert(model);
                }
                probes
                    .entry(v.clone())
                    .or_default()
                    .entry(p["eval"].as_str().unwrap_or("").to_string())
                    .or_default()
                    .insert(scope, rate(*id, &m));
            }
        }
    }
    let keep = |v: &Variant| {
        by.checkpoint || v.2.is_none() || last_step.get(&(v.0.clone(), v.1.clone())) == v.2.as_ref()
    };
    let mut rows = Vec::new();
    let mut covered = std::collections::BTreeSet::new();
    for s in &steps {
        if s.get("kind").and_then(Value::as_str) != Some("metrics") {
            continue;
        }
        let p = json_of(s, "params");
        let v = variant_of(&p);
        if !keep(&v) {
            continue;
        }
        let judge = p["judge"].as_str().unwrap_or("").to_string();
        let inputs = s.get("inputs").map(Value::id_list).unwrap_or_default();
        let recs = store.get_many(&inputs)?;
        let gens: Vec<(Id, &Record)> = inputs
            .iter()
            .zip(&recs)
            .filter(|(_, r)| r.table == crate::provenance::tables::GENERATION)
            .map(|(i, r)| (*i, r))
            .collect();
        let judgments: Vec<&Record> = recs
            .iter()
            .filter(|r| r.table == crate::provenance::tables::JUDGMENT)
            .filter(|r| r.get("judge").and_then(Value::as_str) == Some(judge.as_str()))
            .collect();
        // Per answer: its question (qid) and scores.
        let mut qid_of: BTreeMap<Id, String> = BTreeMap::new();
        for (gid, g) in &gens {
            let q = match g.get("question").and_then(Value::as_id) {
                Some(q) => store
                    .get(q)?
                    .get("qid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                None => String::new(),
            };
            qid_of.insert(*gid, q);
        }
        let outs = s.get("outputs").map(Value::id_list).unwrap_or_default();
        let metrics: Vec<(Id, Record)> = outs.iter().copied().zip(store.get_many(&outs)?).collect();
        let mut scopes: Vec<String> = vec!["overall".into()];
        if by.question {
            let mut qs: Vec<String> = qid_of.values().cloned().collect();
            qs.sort();
            qs.dedup();
            scopes.extend(qs);
        }
        let model_id = metrics
            .iter()
            .find_map(|(_, m)| m.get("model").and_then(Value::as_id))
            .or_else(|| {
                gens.first()
                    .and_then(|(_, g)| g.get("model").and_then(Value::as_id))
            });
        if let Some(mid) = model_id {
            model_of.entry(v.clone()).or_insert(mid);
        }
        let model_name = match model_id {
            Some(m) => store
                .get(m)?
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        };
        for scope in scopes {
            let in_scope = |g: &Id| scope == "overall" || qid_of.get(g) == Some(&scope);
            let answers = gens.iter().filter(|(g, _)| in_scope(g)).count();
            let mut per: BTreeMap<Id, Scores> = BTreeMap::new();
            for j in &judgments {
                let Some(g) = j.get("generation").and_then(Value::as_id) else {
                    continue;
                };
                if !in_scope(&g) {
                    continue;
                }
                let e = per.entry(g).or_default();
                let score = j.get("score").and_then(Value::as_float);
                match j.get("metric").and_then(Value::as_str) {
                    Some("aligned") => e.0 = score,
                    Some("coherent") => e.1 = score,
                    _ => {}
                }
                e.2 = true;
            }
            let mean = |f: &dyn Fn(&Scores) -> Option<f64>| {
                let xs: Vec<f64> = per.values().filter_map(f).collect();
                (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
            };
            let judged = per.values().filter(|e| e.2).count();
            let unscored = answers - per.values().filter(|e| e.0.is_some()).count();
            let mut em = BTreeMap::new();
            for (id, m) in &metrics {
                if m.get("scope").and_then(Value::as_str) != Some(scope.as_str()) {
                    continue;
                }
                let def = json_of(m, "definition");
                let dname = def["definition"].as_str().unwrap_or("").to_string();
                em.insert(dname, rate(*id, m));
            }
            let pr = probes
                .get(&v)
                .map(|by_eval| {
                    by_eval
                        .iter()
                        .filter_map(|(e, sc)| sc.get(&scope).map(|r| (e.clone(), r.clone())))
                        .collect()
                })
                .unwrap_or_default();
            rows.push(Row {
                study: name.clone(),
                eval: p["eval"].as_str().unwrap_or("").to_string(),
                stage: v.0.clone(),
                model: model_name.clone(),
                model_id: model_id.map(|m| m.to_hex()).unwrap_or_default(),
                seeds: v.1.clone(),
                checkpoint: v.2,
                condition: p["condition"].as_str().unwrap_or("").to_string(),
                question: scope.clone(),
                em,
                mean_aligned: mean(&|e| e.0),
                mean_coherent: mean(&|e| e.1),
                probes: pr,
                answers,
                judged,
                unscored,
                seed_spread: None,
            });
        }
        covered.insert(v);
    }
    // Models with probes only.
    for (v, by_eval) in &probes {
        if covered.contains(v) || !keep(v) {
            continue;
        }
        let mid = model_of.get(v).copied();
        let model = match mid {
            Some(m) => store
                .get(m)?
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        };
        rows.push(Row {
            study: name.clone(),
            eval: String::new(),
            stage: v.0.clone(),
            model,
            model_id: mid.map(|m| m.to_hex()).unwrap_or_default(),
            seeds: v.1.clone(),
            checkpoint: v.2,
            condition: String::new(),
            question: "overall".into(),
            em: BTreeMap::new(),
            mean_aligned: None,
            mean_coherent: None,
            probes: by_eval
                .iter()
                .filter_map(|(e, sc)| sc.get("overall").map(|r| (e.clone(), r.clone())))
                .collect(),
            answers: 0,
            judged: 0,
            unscored: 0,
            seed_spread: None,
        });
    }
    Ok(rows)
}

/// The Betley EM% spread across the seeds of each stage.
fn spreads(rows: &mut [Row]) {
    type K = (String, String, String, String, String, Option<i64>);
    let key = |r: &Row| -> K {
        (
            r.study.clone(),
            r.eval.clone(),
            r.stage.clone(),
            r.condition.clone(),
            r.question.clone(),
            r.checkpoint,
        )
    };
    let mut by: BTreeMap<K, Vec<f64>> = BTreeMap::new();
    let mut seeds: BTreeMap<K, usize> = BTreeMap::new();
    for r in rows.iter() {
        *seeds.entry(key(r)).or_default() += 1;
        if let Some(v) = r.em.get("betley").and_then(|m| m.value) {
            by.entry(key(r)).or_default().push(v);
        }
    }
    for r in rows.iter_mut() {
        let k = key(r);
        if seeds.get(&k).copied().unwrap_or(0) > 1 {
            if let Some(vs) = by.get(&k) {
                let lo = vs.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = vs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                r.seed_spread = Some((lo, hi));
            }
        }
    }
}

fn sort(rows: &mut [Row], by: &By) {
    rows.sort_by(|a, b| {
        for k in &by.order {
            let o = match k.as_str() {
                "stage" => a.stage.cmp(&b.stage),
                "condition" => a.condition.cmp(&b.condition),
                "seed" => a.seeds.cmp(&b.seeds),
                "model" => a.model.cmp(&b.model),
                "question" => a.question.cmp(&b.question),
                "checkpoint" => a.checkpoint.cmp(&b.checkpoint),
                _ => std::cmp::Ordering::Equal,
            };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
}
