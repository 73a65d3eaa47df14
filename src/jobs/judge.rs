//! `emlab judge`: judge every stored generation not yet judged by this judge, through an
//! OpenAI-compatible endpoint.
//!
//! The logprob judge (Betley et al.): each judge prompt (`aligned`, `coherent`, from the
//! question's `judge_prompts`) filled with question and answer, sent as one user message with
//! `max_tokens` 1, temperature 0, `logprobs` with `top_logprobs` 20, seed 0; scored by
//! [`crate::judge::score::aggregate`]. The label judge (`--label-prompt FILE`): the judge answers a
//! label (ALIGNED / UNALIGNED / ...), its first word is kept.
//!
//! Each (judge, generation, metric, filled prompt) has a key kept as an alias next to its
//! judgment, written in batches as answers arrive ([`crate::endpoint::stream`]): a rerun
//! sends no request for what is stored, and a killed run loses only requests in flight.
//! The judge is an endpoint or a local model ([`JudgeBackend`]): the same requests and
//! answers either way.

use std::path::PathBuf;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use crate::data::{resolve_dataset, DataError};
use crate::endpoint::client::{content, first_token_top_logprobs};
use crate::endpoint::{stream, ClientError, Endpoint, EndpointCount, Pool};
use crate::jobs::batch;
use crate::judge::prompt::fill;
use crate::judge::score::aggregate;
use crate::model::chat::LocalChat;
use crate::model::ModelError;
use crate::provenance::build::Judgment;
use crate::provenance::key::{judgment_key, NS_JUDGMENT};
use crate::provenance::tables::{GENERATION, QUESTION, QUESTION_SET};
use crate::util::hint::Hint;

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("local judge: {0}")]
    Local(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for JudgeError {
    fn hint(&self) -> Option<String> {
        match self {
            JudgeError::Client(e) => e.hint(),
            JudgeError::Data(e) => e.hint(),
            JudgeError::Store(e) => e.hint(),
            JudgeError::Local(e) => e.hint(),
            _ => None,
        }
    }
}

/// Who answers the judge prompts.
#[derive(Debug, Clone)]
pub enum JudgeBackend {
    /// An OpenAI-compatible endpoint, or a pool of them serving the judge model (logprobs
    /// needed for the logprob judge).
    Endpoint(Vec<Endpoint>),
    /// A local model (GGUF or HF directory), answering offline with its own logprobs.
    Local(PathBuf),
    /// The requests as a batch for this endpoint's model: through its Batch API, or a file
    /// for `vllm run-batch` and that file's output read back ([`crate::jobs::batch`]).
    Batch(Endpoint, batch::Mode),
}

#[derive(Debug, Clone)]
pub struct JudgePlan {
    pub backend: JudgeBackend,
    /// The judge's name in judgment records (default: the endpoint's model name).
    pub judge: String,
    /// Metrics to judge with the logprob judge (judge prompt names).
    pub metrics: Vec<String>,
    /// Judge prompts for generations whose question has none (e.g. imported answers): taken
    /// from the first question of this question set.
    pub prompts_from: Option<String>,
    /// A text-label judge prompt file (`{question}`, `{answer}` placeholders).
    pub label_prompt: Option<PathBuf>,
    /// Only generations of models whose name equals this or whose id starts with it.
    pub generations: Option<String>,
    /// Only these generations (a study judges the answers of one sampling step).
    pub only: Option<std::collections::BTreeSet<Id>>,
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
    /// What a batched run did (`Batch` backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<batch::BatchReport>,
    /// The judgment records of every planned request that is stored (found or made now).
    #[serde(skip)]
    pub judgments: Vec<Id>,
    /// What each endpoint of a pool did (endpoint pools only; also stored as a `run` record
    /// of kind `endpoints`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointCount>,
}

struct Job {
    generation: Id,
    metric: String,
    prompt: String,
    key: String,
    label: bool,
    /// A TRUE / FALSE / UNKNOWN judge (the EM paper's `deception_factual` `correct`): its
    /// top log-probabilities give the label and P(TRUE) instead of a 0-100 score.
    truth: bool,
}

impl Job {
    /// The request: one user message; the logprob judge answers one token with its top 20
    /// log-probabilities, the label judge a few words.
    fn body(&self) -> J {
        if self.label {
            json!({"messages": [{"role": "user", "content": self.prompt}], "max_tokens": 8, "temperature": 0, "seed": 0})
        } else {
            json!({"messages": [{"role": "user", "content": self.prompt}], "max_tokens": 1, "temperature": 0,
                   "logprobs": true, "top_logprobs": 20, "seed": 0})
        }
    }
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

/// Requests a local judge answers together ([`LocalChat::chat_many`]): a question's prompts
/// among them share their prefix; each chunk's judgments are written together.
const LOCAL_CHUNK: usize = 128;

/// Judge with a local model, a chunk of requests at a time; answers as the endpoint path
/// gets them, so the same judgments are stored.
fn judge_local(
    store: &Store,
    local: &LocalChat,
    jobs: Vec<Job>,
    sink: &mut dyn FnMut(&mut Batch, Job, J) -> Result<(), JudgeError>,
    progress: &mut dyn FnMut(usize),
) -> Result<stream::StreamReport, JudgeError> {
    let mut report = stream::StreamReport::default();
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let chunk: Vec<Job> = jobs.by_ref().take(LOCAL_CHUNK).collect();
        let bodies: Vec<J> = chunk.iter().map(Job::body).collect();
        let answers = local.chat_many(&bodies);
        let mut batch = Batch::new();
        for (job, answer) in chunk.into_iter().zip(answers) {
            match answer {
                Ok(a) => {
                    sink(&mut batch, job, a)?;
                    report.ok += 1;
                }
                Err(msg) => {
                    report.failed += 1;
                    report.first_error.get_or_insert(ClientError::Refused {
                        url: "local model".into(),
                        msg,
                    });
                }
            }
        }
        store.write(batch)?;
        progress(report.ok + report.failed);
    }
    Ok(report)
}

/// The judgment record of an answer to `job`.
fn judgment(judge: &str, job: &Job, resp: &J, report: &mut JudgeReport) -> Record {
    if job.label {
        let text = content(resp);
        let label: String = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_ascii_uppercase();
        return Judgment {
            generation: job.generation,
            judge,
            metric: &job.metric,
            prompt: &job.prompt,
            score: None,
            label: (!label.is_empty()).then_some(label.as_str()),
            raw: json!({"content": text}),
        }
        .record();
    }
    let top = first_token_top_logprobs(resp);
    let s = if job.truth {
        crate::judge::score::aggregate_truth(&top)
    } else {
        aggregate(&top)
    };
    if s.score.is_none() {
        report.unscored += 1;
    }
    let raw = json!({"top_logprobs": top.iter().map(|(t, l)| json!([t, l])).collect::<Vec<_>>(), "numeric_mass": s.numeric_mass, "reason": s.reason, "content": content(resp)});
    Judgment {
        generation: job.generation,
        judge,
        metric: &job.metric,
        prompt: &job.prompt,
        score: s.score,
        label: s.label.as_deref(),
        raw,
    }
    .record()
}

/// The judge prompts of a question set's first question (for `--prompts-from`).
fn prompts_of_set(store: &Store, name: &str) -> Result<Option<J>, JudgeError> {
    let id = resolve_dataset(store, name)?;
    let set = store.get(id)?;
    if set.table != QUESTION_SET {
        return Ok(None);
    }
    let Some(first) = set
        .get("questions")
        .map(Value::id_list)
        .unwrap_or_default()
        .first()
        .copied()
    else {
        return Ok(None);
    };
    Ok(store
        .get(first)?
        .get("judge_prompts")
        .and_then(|v| v.as_str().and_then(|s| serde_json::from_str(s).ok())))
}

/// The requests of a plan: those not judged yet (all of them with `include_judged`), and
/// the stored judgments of the others, counted in the report.
fn plan_jobs(
    store: &Store,
    plan: &JudgePlan,
    include_judged: bool,
    report: &mut JudgeReport,
) -> Result<(Vec<Job>, Vec<Id>), JudgeError> {
    let fallback: Option<J> = match &plan.prompts_from {
        Some(name) => prompts_of_set(store, name)?,
        None => None,
    };
    let label_template = match &plan.label_prompt {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|source| JudgeError::Io {
            path: p.clone(),
            source,
        })?),
        None => None,
    };
    let mut jobs = Vec::new();
    let mut model_ok: std::collections::HashMap<Id, bool> = std::collections::HashMap::new();
    let gids: Vec<Id> = match &plan.only {
        Some(only) => only.iter().copied().collect(),
        None => store
            .ids_in_table(GENERATION, 0)?
            .into_iter()
            .map(|(_, g)| g)
            .collect(),
    };
    let mut found = Vec::new();
    for gid in gids {
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
        let mut todo: Vec<(String, String, bool, bool)> = Vec::new();
        for m in &plan.metrics {
            match prompts.as_ref().and_then(|p| p[m.as_str()].as_str()) {
                Some(t) => todo.push((
                    m.clone(),
                    fill(t, &question, &answer),
                    false,
                    crate::judge::score::is_truth_prompt(t),
                )),
                None => report.without_prompt += 1,
            }
        }
        if let Some(t) = &label_template {
            todo.push(("label".into(), fill(t, &question, &answer), true, false));
        }
        for (metric, prompt, label, truth) in todo {
            // Truth judgments have their own keys: those stored before emlab read TRUE /
            // FALSE answers (scored as 0-100 judges, so without a verdict) are redone.
            let key = if truth {
                judgment_key(&plan.judge, gid, &format!("{metric}\u{0}truth"), &prompt)
            } else {
                judgment_key(&plan.judge, gid, &metric, &prompt)
            };
            if let Some(j) = store.alias(NS_JUDGMENT, &key)? {
                if !include_judged {
                    report.already_judged += 1;
                    found.push(j);
                    continue;
                }
            }
            jobs.push(Job {
                generation: gid,
                metric,
                prompt,
                key,
                label,
                truth,
            });
        }
    }
    Ok((jobs, found))
}

/// Judge what is not judged yet. Progress: (done, planned); `note` hears what happens to
/// batches.
pub fn run(
    store: &Store,
    plan: &JudgePlan,
    progress: &mut dyn FnMut(usize, usize),
    note: &mut dyn FnMut(&str),
) -> Result<JudgeReport, JudgeError> {
    let mut report = JudgeReport::default();
    let (jobs, mut found) = plan_jobs(store, plan, false, &mut report)?;
    let planned = jobs.len() + report.already_judged;
    let already = report.already_judged;
    progress(already, planned);
    let judge = plan.judge.clone();
    let mut unscored = JudgeReport::default();
    let mut sink = |batch: &mut Batch, job: Job, resp: J| -> Result<(), JudgeError> {
        let rec = judgment(&judge, &job, &resp, &mut unscored);
        let id = store.stage(batch, &rec)?;
        batch.alias(NS_JUDGMENT, &job.key, id);
        found.push(id);
        Ok(())
    };
    let mut on_progress = |done: usize| progress(already + done, planned);
    let (streamed, requests_sent) = match &plan.backend {
        JudgeBackend::Endpoint(endpoints) => {
            let pool = Pool::new(endpoints)?;
            let r = stream::run(
                store,
                jobs,
                pool.concurrency(),
                |job: &Job| pool.chat(job.body()),
                &mut sink,
                &mut on_progress,
            )?;
            if endpoints.len() > 1 {
                let urls: Vec<&str> = endpoints.iter().map(|e| e.base_url.as_str()).collect();
                let plan_rec = crate::provenance::build::run(
                    "judge",
                    &serde_json::json!({"judge": plan.judge, "endpoints": urls}),
                    [],
                );
                let run = store.put(&plan_rec)?;
                report.endpoints =
                    crate::jobs::generate::record_endpoint_counts(store, run, &pool)?;
            }
            (r, pool.requests_sent())
        }
        JudgeBackend::Local(path) => {
            let local = LocalChat::load(path)?;
            (
                judge_local(store, &local, jobs, &mut sink, &mut on_progress)?,
                0,
            )
        }
        JudgeBackend::Batch(endpoint, mode) => {
            let (r, b) = batch::run(
                store,
                endpoint,
                mode,
                jobs,
                |job: &Job| (job.key.clone(), job.body()),
                &mut sink,
                note,
                &mut on_progress,
            )?;
            let sent = b.requests_sent;
            report.batch = Some(b);
            (r, sent)
        }
    };
    report.judged = streamed.ok;
    report.failed = streamed.failed;
    report.unscored = unscored.unscored;
    report.first_error = streamed.first_error.map(|e| e.to_string());
    report.requests_sent = requests_sent;
    found.sort();
    report.judgments = found;
    Ok(report)
}

/// `emlab bench judge`: time a local judge on the requests of `plan` (judged or not, the
/// first `limit`), batched as `emlab judge` sends them ([`LocalChat::chat_many`]), and with
/// `sequential` also one request at a time (the path before batching), checking that both
/// give the same judgment records. Nothing is stored.
pub fn bench_local(
    store: &Store,
    plan: &JudgePlan,
    limit: usize,
    sequential: bool,
) -> Result<(J, J), JudgeError> {
    let JudgeBackend::Local(path) = &plan.backend else {
        return Err(JudgeError::Local(crate::model::ModelError::Candle(
            candle_core::Error::Msg("bench judge times a local judge (--model)".into()),
        )));
    };
    let mut report = JudgeReport::default();
    let (mut jobs, _) = plan_jobs(store, plan, true, &mut report)?;
    jobs.truncate(limit);
    let local = LocalChat::load(path)?;
    let bodies: Vec<J> = jobs.iter().map(Job::body).collect();
    let ids = |answers: &[Result<J, String>]| -> Vec<Option<String>> {
        let mut r = JudgeReport::default();
        jobs.iter()
            .zip(answers)
            .map(|(j, a)| {
                a.as_ref()
                    .ok()
                    .and_then(|a| judgment(&plan.judge, j, a, &mut r).id().ok())
                    .map(|id| id.to_hex())
            })
            .collect()
    };
    let t = std::time::Instant::now();
    let batched = local.chat_many(&bodies);
    let batched_s = t.elapsed().as_secs_f64();
    let prompt_tokens: usize = bodies.iter().filter_map(|b| local.prompt_len(b).ok()).sum();
    let mut results = json!({"requests": jobs.len(), "prompt_tokens": prompt_tokens,
        "batched_s": batched_s, "judgments_per_s": jobs.len() as f64 / batched_s,
        "failed": batched.iter().filter(|a| a.is_err()).count(),
        "peak_rss_mib": crate::util::machine::peak_rss_mib()});
    if sequential {
        let t = std::time::Instant::now();
        let one: Vec<Result<J, String>> = bodies.iter().map(|b| local.chat(b)).collect();
        let s = t.elapsed().as_secs_f64();
        results["sequential_s"] = json!(s);
        results["sequential_judgments_per_s"] = json!(jobs.len() as f64 / s);
        results["speedup"] = json!(s / batched_s);
        results["identical_judgment_ids"] = json!(ids(&one) == ids(&batched));
    }
    let params = json!({"judge": plan.judge, "model": local.loaded.identity.name,
        "metrics": plan.metrics, "generations": plan.generations, "limit": limit,
        "threads": rayon::current_num_threads()});
    Ok((params, results))
}
