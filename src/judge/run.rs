//! `emlab judge`: judge every stored generation not yet judged by this judge, through an
//! OpenAI-compatible endpoint.
//!
//! The logprob judge (Betley et al.): each judge prompt (`aligned`, `coherent`, from the
//! question's `judge_prompts`) filled with question and answer, sent as one user message with
//! `max_tokens` 1, temperature 0, `logprobs` with `top_logprobs` 20, seed 0; scored by
//! [`super::score::aggregate`]. The label judge (`--label-prompt FILE`): the judge answers a
//! label (ALIGNED / UNALIGNED / ...), its first word is kept.
//!
//! Each (judge, generation, metric, filled prompt) has a key kept as an alias next to its
//! judgment, written in batches as answers arrive: a rerun sends no request for what is
//! stored, and a killed run loses only requests in flight.

use std::path::PathBuf;

use emlab_store::{Batch, Id, Record, Store, Value};
use futures::StreamExt;
use serde_json::{json, Value as J};

use super::client::{content, first_token_top_logprobs, Client, ClientError, Endpoint};
use super::score::aggregate;
use crate::data::{resolve_dataset, DataError};
use crate::records::{GENERATION, JUDGMENT, QUESTION, QUESTION_SET};

pub const NS_JUDGMENT_KEY: &str = "judgment-key";

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("local judge: {0}")]
    Local(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct JudgePlan {
    pub endpoint: Endpoint,
    /// The judge's name in judgment records (default: the endpoint's model name).
    pub judge: String,
    /// Metrics to judge with the logprob judge (judge prompt names).
    pub metrics: Vec<String>,
    /// Judge prompts for generations whose question has none (e.g. imported answers): taken
    /// from the first question of this question set.
    pub prompts_from: Option<String>,
    /// A text-label judge prompt file (`{question}`, `{answer}` placeholders).
    pub label_prompt: Option<PathBuf>,
    /// Judge with a local model (GGUF or HF directory) instead of the endpoint.
    pub local_model: Option<PathBuf>,
    /// Only generations of models whose name equals this or whose id starts with it.
    pub generations: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JudgeReport {
    pub judged: usize,
    pub already_judged: usize,
    pub without_prompt: usize,
    pub unscored: usize,
    pub failed: usize,
    pub requests_sent: usize,
    pub first_error: Option<String>,
}

struct Job {
    generation: Id,
    metric: String,
    prompt: String,
    key: String,
    label: bool,
}

fn fill(template: &str, question: &str, answer: &str) -> String {
    template
        .replace("{question}", question)
        .replace("{answer}", answer)
}

fn judge_key(judge: &str, generation: Id, metric: &str, prompt: &str) -> String {
    let mut h = blake3::Hasher::new_derive_key("emlab judgment key v1");
    for part in [
        judge.as_bytes(),
        &generation.0,
        metric.as_bytes(),
        prompt.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().to_hex().to_string()
}

fn question_text(store: &Store, g: &Record) -> Result<String, JudgeError> {
    let conv = g.get("prompt").and_then(Value::as_id);
    if let Some(c) = conv {
        let c = store.get(c)?;
        let ids = c.get("messages").map(Value::id_list).unwrap_or_default();
        for m in store.get_many(&ids)?.iter().rev() {
            if m.get("role").and_then(Value::as_str) == Some("user") {
                return Ok(m
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string());
            }
        }
    }
    Ok(String::new())
}

/// Judge what is not judged yet. Progress: (done, planned).
pub fn run(
    store: &Store,
    plan: &JudgePlan,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<JudgeReport, JudgeError> {
    let local = match &plan.local_model {
        Some(p) => {
            Some(super::local::LocalChat::load(p).map_err(|e| JudgeError::Local(e.to_string()))?)
        }
        None => None,
    };
    let client = Client::new(plan.endpoint.clone())?;
    let fallback: Option<J> = match &plan.prompts_from {
        Some(name) => {
            let id = resolve_dataset(store, name)?;
            let set = store.get(id)?;
            let first = if set.table == QUESTION_SET {
                set.get("questions")
                    .map(Value::id_list)
                    .unwrap_or_default()
                    .first()
                    .copied()
            } else {
                None
            };
            first.and_then(|q| store.get(q).ok()).and_then(|q| {
                q.get("judge_prompts")
                    .and_then(Value::as_str)
                    .and_then(|s| serde_json::from_str(s).ok())
            })
        }
        None => None,
    };
    let label_template = match &plan.label_prompt {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|source| JudgeError::Io {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    let mut report = JudgeReport::default();
    let mut jobs = Vec::new();
    let mut model_ok: std::collections::HashMap<Id, bool> = std::collections::HashMap::new();
    for (_, gid) in store.ids_in_table(GENERATION, 0)? {
        let g = store.get(gid)?;
        if let (Some(want), Some(mid)) = (&plan.generations, g.get("model").and_then(Value::as_id))
        {
            let ok = match model_ok.get(&mid) {
                Some(ok) => *ok,
                None => {
                    let name = store
                        .get(mid)?
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let ok = name == *want || mid.to_hex().starts_with(want.as_str());
                    model_ok.insert(mid, ok);
                    ok
                }
            };
            if !ok {
                continue;
            }
        }
        let answer = g
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let question = question_text(store, &g)?;
        let prompts: Option<J> = match g.get("question").and_then(Value::as_id) {
            Some(q) => store
                .try_get(q)?
                .filter(|r| r.table == QUESTION)
                .and_then(|r| {
                    r.get("judge_prompts")
                        .and_then(Value::as_str)
                        .and_then(|s| serde_json::from_str(s).ok())
                }),
            None => None,
        }
        .or_else(|| fallback.clone());
        let mut todo: Vec<(String, String, bool)> = Vec::new();
        for m in &plan.metrics {
            match prompts.as_ref().and_then(|p| p[m.as_str()].as_str()) {
                Some(t) => todo.push((m.clone(), fill(t, &question, &answer), false)),
                None => report.without_prompt += 1,
            }
        }
        if let Some(t) = &label_template {
            todo.push(("label".into(), fill(t, &question, &answer), true));
        }
        for (metric, prompt, label) in todo {
            let key = judge_key(&plan.judge, gid, &metric, &prompt);
            if store.alias(NS_JUDGMENT_KEY, &key)?.is_some() {
                report.already_judged += 1;
                continue;
            }
            jobs.push(Job {
                generation: gid,
                metric,
                prompt,
                key,
                label,
            });
        }
    }
    let planned = jobs.len() + report.already_judged;
    progress(report.already_judged, planned);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| JudgeError::Io {
            path: PathBuf::from("tokio runtime"),
            source,
        })?;
    let judge = plan.judge.clone();
    rt.block_on(async {
        let mut results = futures::stream::iter(jobs.into_iter().map(|job| {
            let client = &client;
            let local = local.as_ref();
            async move {
                let body = if job.label {
                    json!({"messages": [{"role": "user", "content": job.prompt}], "max_tokens": 8, "temperature": 0, "seed": 0})
                } else {
                    json!({"messages": [{"role": "user", "content": job.prompt}], "max_tokens": 1, "temperature": 0,
                           "logprobs": true, "top_logprobs": 20, "seed": 0})
                };
                let r = match local {
                    Some(l) => l.chat(&body).map_err(|msg| ClientError::Refused { url: "local model".into(), msg }),
                    None => client.chat(body).await,
                };
                (job, r)
            }
        }))
        .buffer_unordered(plan.endpoint.concurrency.max(1));
        let mut batch = Batch::new();
        let mut pending = 0;
        while let Some((job, r)) = results.next().await {
            match r {
                Ok(resp) => {
                    let mut rec = Record::new(JUDGMENT)
                        .with("generation", Value::Id(job.generation))
                        .with("judge", Value::str(&judge))
                        .with("metric", Value::str(&job.metric))
                        .with("prompt", Value::str(&job.prompt));
                    if job.label {
                        let text = content(&resp);
                        let label: String = text.split_whitespace().next().unwrap_or("").trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_ascii_uppercase();
                        rec = rec.with("raw", Value::json(&json!({"content": text})));
                        if !label.is_empty() {
                            rec = rec.with("label", Value::str(label));
                        }
                    } else {
                        let top = first_token_top_logprobs(&resp);
                        let s = aggregate(&top);
                        if s.score.is_none() {
                            report.unscored += 1;
                        }
                        let raw = json!({"top_logprobs": top.iter().map(|(t, l)| json!([t, l])).collect::<Vec<_>>(), "numeric_mass": s.numeric_mass, "reason": s.reason, "content": content(&resp)});
                        rec = rec.with("raw", Value::json(&raw));
                        if let Some(v) = s.score {
                            rec = rec.with("score", Value::Float(v));
                        }
                        if let Some(l) = s.label {
                            rec = rec.with("label", Value::str(l));
                        }
                    }
                    let id = store.stage(&mut batch, &rec)?;
                    batch.alias(NS_JUDGMENT_KEY, &job.key, id);
                    pending += 1;
                    report.judged += 1;
                }
                Err(e) => {
                    report.failed += 1;
                    report.first_error.get_or_insert_with(|| e.to_string());
                }
            }
            if pending >= 32 {
                store.write(std::mem::take(&mut batch))?;
                pending = 0;
            }
            progress(report.already_judged + report.judged + report.failed, planned);
        }
        store.write(batch)?;
        Ok::<(), JudgeError>(())
    })?;
    report.requests_sent = client
        .requests_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    Ok(report)
}
