//! `emlab generate`: sample answers to a question set and store them as `generation` records.
//!
//! A [`GeneratePlan`] names the model file, the question set and the sampling parameters.
//! Every sample has a key (model id, prompt conversation id, parameters, seed) kept as an alias
//! in the `generation-key` namespace, written in the same transaction as the generation: a
//! rerun skips what is stored, and a killed run loses at most the batch in flight. Default
//! seeds derive from the request (not from time or order), so two fresh stores sample the
//! same texts.

use std::path::PathBuf;
use std::time::Instant;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use crate::data::{resolve_dataset, DataError};
use crate::endpoint::{stream, ClientError, Endpoint, EndpointCount, Pool};
use crate::model::sample::{
    generate, generate_continuous, Output, Request, SamplingParams, Scheduler,
};
use crate::model::{Loaded, ModelError};
use crate::provenance::build::{self, stage_conversation, Generation, ModelIdentity};
use crate::provenance::key::{generation_key, legacy, sample_seed, NS_GENERATION};
use crate::provenance::tables::QUESTION_SET;
use crate::train::TrainError;
use crate::util::hint::Hint;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error(transparent)]
    Checkpoint(#[from] TrainError),
    #[error("`{0}` is not a question set (import a question file, e.g. a .yaml of the EM paper)")]
    NotQuestions(String),
    #[error("question `{qid}`: {msg}")]
    Prompt { qid: String, msg: String },
    #[error("sampling failed: {0}")]
    Sampling(candle_core::Error),
    #[error(transparent)]
    Direction(#[from] super::direction::DirectionError),
    #[error("{0} (answers received before it are stored; rerun to retry the rest)")]
    Client(#[from] ClientError),
}

impl Hint for GenerateError {
    fn hint(&self) -> Option<String> {
        match self {
            GenerateError::Model(e) => e.hint(),
            GenerateError::Data(e) => e.hint(),
            GenerateError::Store(e) => e.hint(),
            GenerateError::Checkpoint(e) => e.hint(),
            GenerateError::Client(e) => e.hint(),
            GenerateError::Direction(e) => e.hint(),
            GenerateError::NotQuestions(_) => Some(
                "`emlab data list` shows each dataset's kind; sample from a `questions` one".into(),
            ),
            _ => None,
        }
    }
}

pub use super::load::AdapterSource;

/// A validated generation request: what gets hashed into each sample's key.
#[derive(Debug, Clone)]
pub struct GeneratePlan {
    pub model: PathBuf,
    pub questions: String,
    pub samples: usize,
    pub params: SamplingParams,
    /// Overrides each question's own system prompt.
    pub system: Option<String>,
    /// Rows decoded together: the decode slots (continuous) or the batch size (static).
    pub batch: usize,
    /// How samples share the decode rows; the samples are the same either way.
    pub scheduler: Scheduler,
    /// Mixed into every sample's default seed.
    pub seed: u64,
    /// Quantized or dense weights (GGUF models).
    pub weights: crate::model::WeightMode,
    pub adapter: Option<AdapterSource>,
    /// Steering or ablation with a stored direction: recorded in the sampling parameters, so
    /// edited samples are their own records.
    pub edits: super::direction::EditSpec,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerateReport {
    pub model: String,
    pub run: String,
    pub planned: usize,
    pub already_stored: usize,
    pub generated: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
    pub completion_tokens_per_s: f64,
    /// `continuous` or `static` (local models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<&'static str>,
    /// Mean share of the decode slots holding a row (continuous scheduler).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_occupancy: Option<f64>,
    /// The generation records of every planned sample that is stored, in plan order (those
    /// found stored and those drawn now).
    #[serde(skip)]
    pub generations: Vec<Id>,
    /// What each endpoint of a pool did (endpoint pools only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointCount>,
    /// What a batched run did (`--batch-api`, `emlab batch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::jobs::batch::BatchReport>,
}

/// One sample to draw.
struct Job {
    /// Its place in the plan.
    slot: usize,
    question: Id,
    conv: Id,
    messages: Vec<(String, String)>,
    /// The prompt text the model saw (None: an endpoint rendered it).
    rendered: Option<String>,
    tokens: Vec<u32>,
    paraphrase: usize,
    sample: usize,
    seed: u64,
    key: String,
}

impl Job {
    /// The parameters recorded with this sample's answer: the request's parameters plus
    /// which paraphrase and sample it is, the messages sent and the rendered prompt.
    fn params(&self, params: &J, base_seed: u64) -> J {
        let mut params = params.clone();
        params["rendered_prompt"] = json!(self.rendered);
        params["paraphrase"] = json!(self.paraphrase);
        params["sample"] = json!(self.sample);
        params["base_seed"] = json!(base_seed);
        params["messages"] = json!(self
            .messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect::<Vec<_>>());
        params
    }
}

/// Plan every sample of a question set: stage the prompt conversations (written here), and
/// return the samples not stored yet, and for every planned sample its stored generation
/// (`None` for those to draw). `render` turns a question's
/// messages into the prompt text and tokens a local model sees (or nothing for an endpoint).
#[allow(clippy::too_many_arguments)]
fn plan_samples(
    store: &Store,
    set: &Record,
    system: &Option<String>,
    samples: usize,
    base_seed: u64,
    model_id: Id,
    // Models whose samples count as this one's (a checkpoint sampled merged, as before).
    same_as: &[Id],
    params_json: &J,
    mut render: impl FnMut(
        &str,
        &[(String, String)],
    ) -> Result<(Option<String>, Vec<u32>), GenerateError>,
) -> Result<(Vec<Job>, Vec<Option<Id>>), GenerateError> {
    let mut jobs = Vec::new();
    let mut batch = Batch::new();
    let mut planned = 0;
    let mut found = Vec::new();
    for QuestionPrompt {
        question: qid,
        qname,
        paraphrase: pi,
        messages,
    } in question_prompts(store, set, system, None)?
    {
        let conv = stage_conversation(store, &mut batch, &messages, None)?;
        let (rendered, tokens) = render(&qname, &messages)?;
        for si in 0..samples {
            let slot = planned;
            planned += 1;
            let seed = sample_seed(base_seed, qid, pi, si);
            let key = generation_key(model_id, conv, params_json, seed);
            // A sample an older emlab stored under its earlier key counts as stored, and so
            // does one of a model that counts as this one.
            let mut stored = None;
            for m in std::iter::once(model_id).chain(same_as.iter().copied()) {
                for k in [
                    generation_key(m, conv, params_json, seed),
                    legacy::generation_v1(m, conv, params_json, seed),
                ] {
                    if stored.is_none() {
                        stored = store.alias(NS_GENERATION, &k)?;
                    }
                }
            }
            found.push(stored);
            if stored.is_some() {
                continue;
            }
            jobs.push(Job {
                slot,
                question: qid,
                conv,
                messages: messages.clone(),
                rendered: rendered.clone(),
                tokens: tokens.clone(),
                paraphrase: pi,
                sample: si,
                seed,
                key,
            });
        }
    }
    store.write(batch)?;
    Ok((jobs, found))
}

/// One prompt of a question set: a paraphrase of a question, with its system prompt.
pub struct QuestionPrompt {
    pub question: Id,
    /// The question's own id in its file (`qid`).
    pub qname: String,
    pub paraphrase: usize,
    /// (role, content) turns: the system prompt, if any, then the paraphrase.
    pub messages: Vec<(String, String)>,
}

/// Every prompt of a question set (of its first `take` questions), in the set's order:
/// `system` overrides each question's own system prompt.
pub fn question_prompts(
    store: &Store,
    set: &Record,
    system: &Option<String>,
    take: Option<usize>,
) -> Result<Vec<QuestionPrompt>, GenerateError> {
    let mut qids = set.get("questions").map(Value::id_list).unwrap_or_default();
    if let Some(n) = take {
        qids.truncate(n);
    }
    let questions = store.get_many(&qids)?;
    let mut out = Vec::new();
    for (qid, q) in qids.iter().zip(&questions) {
        let qname = q
            .get("qid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let system = system
            .clone()
            .or_else(|| q.get("system").and_then(Value::as_str).map(str::to_string));
        let paraphrases = q
            .get("paraphrases")
            .and_then(Value::as_list)
            .unwrap_or(&[])
            .iter()
            .filter_map(Value::as_str);
        for (pi, text) in paraphrases.enumerate() {
            let mut messages = Vec::new();
            if let Some(s) = &system {
                messages.push(("system".to_string(), s.clone()));
            }
            messages.push(("user".to_string(), text.to_string()));
            out.push(QuestionPrompt {
                question: *qid,
                qname: qname.clone(),
                paraphrase: pi,
                messages,
            });
        }
    }
    Ok(out)
}

/// The prompt text a local model sees for `messages` (its chat template), and its tokens;
/// refused when they and `max_new` new tokens do not fit the model's context.
pub fn render_prompt(
    loaded: &Loaded,
    qname: &str,
    messages: &[(String, String)],
    max_new: usize,
) -> Result<(String, Vec<u32>), GenerateError> {
    let prompt_err = |msg| GenerateError::Prompt {
        qid: qname.to_string(),
        msg,
    };
    let rendered = loaded
        .tokenizer
        .render(messages, true)
        .map_err(prompt_err)?;
    let tokens = loaded.tokenizer.encode(&rendered).map_err(prompt_err)?;
    let limit = loaded.model.cfg.max_seq;
    if tokens.len() + max_new > limit {
        return Err(ModelError::TooLong {
            tokens: tokens.len(),
            new: max_new,
            limit,
        }
        .into());
    }
    Ok((rendered, tokens))
}

/// The question set a name or id points at (its id and record).
pub fn question_set(store: &Store, name: &str) -> Result<(Id, Record), GenerateError> {
    let id = resolve_dataset(store, name)?;
    let set = store.get(id)?;
    if set.table != QUESTION_SET {
        return Err(GenerateError::NotQuestions(name.to_string()));
    }
    Ok((id, set))
}

/// Stages finished samples and writes them in batches: at least every `slots` samples or
/// every two seconds, so a killed run loses little.
struct Sink<'a> {
    store: &'a Store,
    loaded: &'a Loaded,
    model_id: Id,
    params_json: &'a J,
    base_seed: u64,
    batch: Batch,
    staged: usize,
    last_write: Instant,
}

impl Sink<'_> {
    fn stage(&mut self, j: &Job, o: &Output) -> Result<Id, GenerateError> {
        let text =
            self.loaded
                .tokenizer
                .decode(&o.tokens)
                .map_err(|msg| GenerateError::Prompt {
                    qid: j.key.clone(),
                    msg,
                })?;
        let params = j.params(self.params_json, self.base_seed);
        let rec = Generation {
            model: self.model_id,
            prompt: j.conv,
            question: Some(j.question),
            params: &params,
            seed: j.seed as i64,
            text: &text,
            prompt_tokens: Some(j.tokens.len() as i64),
            completion_tokens: Some(o.tokens.len() as i64),
            finish_reason: Some(o.finish.as_str()),
        }
        .record();
        let id = self.store.stage(&mut self.batch, &rec)?;
        self.batch.alias(NS_GENERATION, &j.key, id);
        self.staged += 1;
        Ok(id)
    }

    /// Stage a finished sample and count it in the report.
    fn store_one(
        &mut self,
        j: &Job,
        o: &Output,
        report: &mut GenerateReport,
        found: &mut [Option<Id>],
    ) -> Result<(), GenerateError> {
        let id = self.stage(j, o)?;
        found[j.slot] = Some(id);
        report.prompt_tokens += j.tokens.len();
        report.completion_tokens += o.tokens.len();
        report.generated += 1;
        Ok(())
    }

    fn flush_if_due(&mut self, every: usize) -> Result<(), GenerateError> {
        if self.staged >= every || self.last_write.elapsed().as_secs_f64() >= 2.0 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), GenerateError> {
        if self.staged > 0 {
            self.store.write(std::mem::take(&mut self.batch))?;
            tracing::info!(samples = self.staged, "samples stored");
            self.staged = 0;
        }
        self.last_write = Instant::now();
        Ok(())
    }
}

/// Progress callback: (samples done, samples planned).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

pub fn run(
    store: &Store,
    plan: &GeneratePlan,
    progress: Progress<'_>,
) -> Result<GenerateReport, GenerateError> {
    let (set_id, set) = question_set(store, &plan.questions)?;
    let (mut loaded, quantized): (Loaded, bool) =
        super::load::load_model(store, &plan.model, plan.weights, plan.adapter.as_ref())?;
    let edits = super::direction::apply_edits(store, &plan.edits, &mut loaded)?;
    let model_id = loaded.record().id()?;
    // A checkpoint sampled unmerged: its samples drawn merged (what emlab did before it
    // sampled checkpoints unmerged) are the same checkpoint's answers and count as stored.
    let same_as: Vec<Id> = match &plan.adapter {
        Some(AdapterSource::Checkpoint { merge: false, .. }) => {
            let mut merged = loaded.identity.clone();
            match merged.config.get_mut("adapter") {
                Some(a) => {
                    a["merged"] = json!(true);
                    vec![merged.record().id()?]
                }
                None => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    let mut params_json = json!({
        "engine": "emlab-candle",
        "temperature": plan.params.temperature,
        "top_p": plan.params.top_p,
        "max_tokens": plan.params.max_tokens,
        "quantized": quantized,
    });
    if let Some(e) = edits {
        // Only when there is an edit: unedited samples keep their ids.
        params_json["intervention"] = e;
    }
    let mut run_plan = json!({"questions": set_id.to_hex(), "samples": plan.samples, "params": params_json, "system": plan.system, "seed": plan.seed, "batch": plan.batch});
    if plan.scheduler != Scheduler::Continuous {
        // Named only when not the default, so earlier runs keep their ids.
        run_plan["scheduler"] = json!(plan.scheduler.as_str());
    }

    // Plan every sample; skip those already stored. The template may add a default system
    // prompt (SmolLM2 does): the rendered text is what the model saw, so it is recorded.
    let max_new = plan.params.max_tokens;
    let (jobs, mut found) = plan_samples(
        store,
        &set,
        &plan.system,
        plan.samples,
        plan.seed,
        model_id,
        &same_as,
        &params_json,
        |qname, messages| {
            let (rendered, tokens) = render_prompt(&loaded, qname, messages, max_new)?;
            Ok((Some(rendered), tokens))
        },
    )?;
    let planned = found.len();
    // Everything was drawn by a model that counts as this one, which itself drew nothing:
    // the run is that model's (a rerun over an older store adds no record).
    let run_model = match same_as.first() {
        Some(&alt)
            if jobs.is_empty()
                && planned > 0
                && store.try_get(model_id)?.is_none()
                && store.try_get(alt)?.is_some() =>
        {
            alt
        }
        _ => store.put(&loaded.record())?,
    };
    let run_id = store.put(&build::run("generate", &run_plan, [run_model, set_id]))?;
    let mut report = GenerateReport {
        model: run_model.to_hex(),
        run: run_id.to_hex(),
        planned,
        already_stored: planned - jobs.len(),
        ..Default::default()
    };
    let start = Instant::now();
    progress(report.already_stored, planned);
    report.scheduler = Some(plan.scheduler.as_str());
    let mut sink = Sink {
        store,
        loaded: &loaded,
        model_id,
        params_json: &params_json,
        base_seed: plan.seed,
        batch: Batch::new(),
        staged: 0,
        last_write: Instant::now(),
    };
    // Jobs are grouped by prompt (consecutive): the continuous scheduler prefills each prompt
    // once while its samples are being started, and most static batches share one prefill.
    let reqs: Vec<Request> = jobs
        .iter()
        .map(|j| Request {
            prompt: j.tokens.clone(),
            seed: j.seed,
        })
        .collect();
    let slots = plan.batch.max(1);
    match plan.scheduler {
        Scheduler::Continuous => {
            let mut failed: Option<GenerateError> = None;
            let stats = generate_continuous(
                &loaded.model,
                &loaded.tokenizer.stop_ids,
                &reqs,
                &plan.params,
                slots,
                &mut |i, o| {
                    let r = sink
                        .store_one(&jobs[i], &o, &mut report, &mut found)
                        .and_then(|()| sink.flush_if_due(slots));
                    if let Err(e) = r {
                        failed = Some(e);
                        candle_core::bail!("storing a sample failed");
                    }
                    progress(report.already_stored + report.generated, planned);
                    Ok(())
                },
            );
            if let Some(e) = failed {
                return Err(e);
            }
            let stats = match stats {
                Ok(s) => s,
                Err(e) => {
                    // Keep what finished before a sampling error.
                    sink.flush()?;
                    return Err(GenerateError::Sampling(e));
                }
            };
            report.slot_occupancy = Some(stats.occupancy);
            sink.flush()?;
        }
        Scheduler::Static => {
            for (chunk, reqs) in jobs.chunks(slots).zip(reqs.chunks(slots)) {
                let t = Instant::now();
                let (outs, _timing) = generate(
                    &loaded.model,
                    &loaded.tokenizer.stop_ids,
                    reqs,
                    &plan.params,
                )
                .map_err(GenerateError::Sampling)?;
                for (j, o) in chunk.iter().zip(&outs) {
                    sink.store_one(j, o, &mut report, &mut found)?;
                }
                sink.flush()?;
                tracing::info!(
                    samples = chunk.len(),
                    ms = t.elapsed().as_millis() as i64,
                    "batch stored"
                );
                progress(report.already_stored + report.generated, planned);
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    if report.seconds > 0.0 {
        report.completion_tokens_per_s = report.completion_tokens as f64 / report.seconds;
    }
    report.generations = found.into_iter().flatten().collect();
    Ok(report)
}

/// Sampling through an OpenAI-compatible endpoint (a served model, a hosted fine-tune).
#[derive(Debug, Clone)]
pub struct EndpointGeneratePlan {
    /// One endpoint, or a pool serving the same model (the first names it).
    pub endpoints: Vec<Endpoint>,
    pub questions: String,
    pub samples: usize,
    pub params: SamplingParams,
    pub system: Option<String>,
    pub seed: u64,
    /// A hosted checkpoint the endpoint serves: the generations' model (instead of a model
    /// record naming the endpoint).
    pub checkpoint: Option<Id>,
    /// Send the requests as a batch (the first endpoint's Batch API, or a file for `vllm
    /// run-batch`) instead of one at a time.
    pub batch: Option<crate::jobs::batch::Mode>,
}

/// Like [`run`], through an endpoint: the server renders the chat template, so the record
/// keeps the messages sent; the model record names the endpoint and the served model.
pub fn run_endpoint(
    store: &Store,
    plan: &EndpointGeneratePlan,
    progress: Progress<'_>,
    note: &mut dyn FnMut(&str),
) -> Result<GenerateReport, GenerateError> {
    let (set_id, set) = question_set(store, &plan.questions)?;
    let pool = Pool::new(&plan.endpoints)?;
    let model_id = match plan.checkpoint {
        Some(ck) => ck,
        None => store.put(&endpoints_identity(&plan.endpoints).record())?,
    };
    let params_json = json!({"engine": "openai-compatible", "temperature": plan.params.temperature, "top_p": plan.params.top_p, "max_tokens": plan.params.max_tokens});
    let mut run_plan = json!({"questions": set_id.to_hex(), "samples": plan.samples, "params": params_json, "system": plan.system, "seed": plan.seed, "endpoint": plan.endpoints[0].base_url});
    if let Some(ck) = plan.checkpoint {
        run_plan["checkpoint"] = J::String(ck.to_hex());
    }
    if plan.endpoints.len() > 1 {
        run_plan["endpoints"] = plan
            .endpoints
            .iter()
            .map(|e| J::from(e.base_url.as_str()))
            .collect();
    }
    let run_id = store.put(&build::run("generate", &run_plan, [model_id, set_id]))?;
    // The server renders the template: nothing to render or count here.
    let (jobs, mut found) = plan_samples(
        store,
        &set,
        &plan.system,
        plan.samples,
        plan.seed,
        model_id,
        &[],
        &params_json,
        |_, _| Ok((None, Vec::new())),
    )?;
    let planned = found.len();
    let mut report = GenerateReport {
        model: model_id.to_hex(),
        run: run_id.to_hex(),
        planned,
        already_stored: planned - jobs.len(),
        ..Default::default()
    };
    progress(report.already_stored, planned);
    let start = Instant::now();
    let (mut prompt_tokens, mut completion_tokens) = (0usize, 0usize);
    let already = report.already_stored;
    let request = |j: &Job| -> J {
        let msgs: Vec<J> = j
            .messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect();
        // `max_tokens`, not `max_completion_tokens`: what OpenAI-compatible servers such as
        // llama.cpp and vLLM accept.
        json!({"messages": msgs, "max_tokens": plan.params.max_tokens, "temperature": plan.params.temperature, "top_p": plan.params.top_p, "seed": j.seed})
    };
    let sink = |batch: &mut Batch, j: Job, resp: J| -> Result<(), GenerateError> {
        let usage = &resp["usage"];
        let (pt, ct) = (
            usage["prompt_tokens"].as_i64(),
            usage["completion_tokens"].as_i64(),
        );
        prompt_tokens += pt.unwrap_or(0) as usize;
        completion_tokens += ct.unwrap_or(0) as usize;
        let params = j.params(&params_json, plan.seed);
        let text = crate::endpoint::client::content(&resp);
        let rec = Generation {
            model: model_id,
            prompt: j.conv,
            question: Some(j.question),
            params: &params,
            seed: j.seed as i64,
            text: &text,
            prompt_tokens: pt,
            completion_tokens: ct,
            finish_reason: resp["choices"][0]["finish_reason"].as_str(),
        }
        .record();
        let id = store.stage(batch, &rec)?;
        batch.alias(NS_GENERATION, &j.key, id);
        found[j.slot] = Some(id);
        Ok(())
    };
    let streamed = match &plan.batch {
        None => stream::run(
            store,
            jobs,
            pool.concurrency(),
            |j: &Job| pool.chat(request(j)),
            sink,
            &mut |done| progress(already + done, planned),
        )?,
        Some(mode) => {
            let (r, b) = crate::jobs::batch::run(
                store,
                &plan.endpoints[0],
                mode,
                jobs,
                |j: &Job| (j.key.clone(), request(j)),
                sink,
                note,
                &mut |done| progress(already + done, planned),
            )?;
            report.batch = Some(b);
            r
        }
    };
    report.generated = streamed.ok;
    report.generations = found.into_iter().flatten().collect();
    report.endpoints = record_endpoint_counts(store, run_id, &pool)?;
    report.prompt_tokens = prompt_tokens;
    report.completion_tokens = completion_tokens;
    report.seconds = start.elapsed().as_secs_f64();
    if report.seconds > 0.0 {
        report.completion_tokens_per_s = report.completion_tokens as f64 / report.seconds;
    }
    if let Some(e) = streamed.first_error {
        // What succeeded is stored; a rerun retries only the rest.
        return Err(GenerateError::Client(e));
    }
    Ok(report)
}

/// The model a list of endpoints serves: one endpoint is named by its URL and served model
/// (as always); a pool by its served model names alone, so that servers can join or leave
/// between runs without changing what was asked (and a rerun finds what is stored).
pub fn endpoints_identity(endpoints: &[Endpoint]) -> ModelIdentity {
    if let [one] = endpoints {
        return ModelIdentity::endpoint(&one.base_url, &one.model);
    }
    let mut names: Vec<&str> = endpoints.iter().map(|e| e.model.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    ModelIdentity::endpoint("pool", &names.join(","))
}

/// Store what each endpoint of a pool did in run `run` as a `run` record of kind
/// `endpoints` (its input: the run), and return the counts. Nothing for a single endpoint
/// (its counts are the run's) or when nothing was sent (a rerun that found all stored).
pub fn record_endpoint_counts(
    store: &Store,
    run: Id,
    pool: &Pool,
) -> Result<Vec<EndpointCount>, emlab_store::Error> {
    let counts = pool.counts();
    if counts.len() < 2 || counts.iter().all(|c| c.requests == 0) {
        return Ok(Vec::new());
    }
    let plan = json!({"endpoints": counts, "time": crate::util::time::now_rfc3339()});
    store.put(&build::run("endpoints", &plan, [run]))?;
    Ok(counts)
}
