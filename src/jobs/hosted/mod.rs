//! Hosted fine-tuning (`emlab train --backend openai`): a chat dataset goes to an
//! OpenAI-compatible fine-tuning API and comes back as a `checkpoint` record naming the
//! fine-tuned model, with the same lineage (base, dataset, parent) as a local run.
//!
//! The dataset is written as fine-tuning chat JSONL and [checked](check) before any request.
//! A job in the sense of [`crate::jobs`]: it writes records as it goes and resumes by key.
//! Every request is idempotent across reruns and kills:
//!
//! - the run's *request key* is the BLAKE3 of what defines it (endpoint, base model, the
//!   files' BLAKE3, hyperparameters, seed, suffix); a finished run is found in the store by
//!   it (alias namespace [`NS_HOSTED`]) and sends no request;
//! - a file is uploaded as `emlab-<blake3>.jsonl`; one already there (a run killed after its
//!   upload) is found by name and size and reused;
//! - the job carries the key in its `metadata` (`emlab_key`); a rerun lists the jobs with it
//!   and follows the live or succeeded one instead of creating another;
//! - a failed or cancelled job is stored as a `run` record (kind `hosted-job`); a rerun says
//!   so and starts a new job only with `--retry-failed`.
//!
//! The API key is read from the environment variable the plan names and never stored.

pub mod api;
pub mod check;

use std::time::Duration;

use async_openai::types::files::FilePurpose;
use emlab_store::{Id, Record, Store, Value};
use serde::Serialize;
use serde_json::{json, Value as J};

use crate::data::{resolve_dataset, view, DataError};
use crate::endpoint::{files, Client, ClientError, Endpoint};
use crate::provenance::build::{self, ModelIdentity};
use crate::provenance::tables::CHECKPOINT;
use crate::train::TrainError;
use crate::util::hint::Hint;

/// Alias namespace: request key -> the checkpoint a hosted run ended in.
pub const NS_HOSTED: &str = "hosted";
/// Alias namespace: request key -> the `run` record of its last failed or cancelled job.
pub const NS_HOSTED_FAILED: &str = "hosted-failed";
/// The `run` kind of a hosted job's outcome other than success.
pub const RUN_KIND: &str = "hosted-job";

pub const DEFAULT_ENDPOINT: &str = "https://api.openai.com/v1";
pub const DEFAULT_KEY_ENV: &str = "OPENAI_API_KEY";

#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("dataset `{name}` fails the fine-tuning data check ({count} problems; nothing was uploaded):\n  {list}")]
    Check {
        name: String,
        count: usize,
        list: String,
    },
    #[error("fine-tuning job {job} ended {status}: {msg}")]
    Ended {
        job: String,
        status: String,
        msg: String,
    },
    #[error("checkpoint {0} was not trained through a hosted API (it has a local adapter)")]
    NotHosted(String),
    #[error("unexpected answer from {url}: {msg}")]
    Protocol { url: String, msg: String },
    #[error("{0}")]
    Plan(String),
}

impl Hint for HostedError {
    fn hint(&self) -> Option<String> {
        match self {
            HostedError::Data(e) => e.hint(),
            HostedError::Client(e) => e.hint(),
            HostedError::Store(e) => e.hint(),
            HostedError::Train(e) => e.hint(),
            HostedError::Check { .. } => Some(
                "fix those rows in the dataset (the rules are OpenAI's fine-tuning data check) and rerun"
                    .into(),
            ),
            HostedError::Ended { .. } => Some(
                "rerun with --retry-failed to start a new job (the failed one stays recorded)"
                    .into(),
            ),
            HostedError::NotHosted(_) => Some(
                "continue a local checkpoint with `emlab train --model BASE --from CHECKPOINT`"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// What `emlab train --backend openai` was asked to do.
#[derive(Debug, Clone)]
pub struct HostedPlan {
    pub endpoint: String,
    pub api_key_env: String,
    /// The model to fine-tune (`gpt-4o-2024-08-06`); with `from`, the parent's `ft:` model.
    pub base: Option<String>,
    pub data: String,
    pub validation: Option<String>,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr_multiplier: Option<f64>,
    pub seed: Option<u64>,
    pub suffix: Option<String>,
    /// A hosted checkpoint to continue (its `ft:` model is the base).
    pub from: Option<String>,
    pub retry_failed: bool,
    pub poll_interval: f64,
    pub max_retries: u32,
    pub timeout_s: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct HostedReport {
    pub checkpoint: String,
    pub job: String,
    pub fine_tuned_model: String,
    pub request_key: String,
    /// True when the store already held the result: no request was sent.
    pub already_stored: bool,
    /// True when this run created the job (false: it followed one found by its key).
    pub created_job: bool,
    pub uploaded_files: usize,
    pub reused_files: usize,
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub requests: usize,
}

/// A file to upload: its name (by content) and bytes.
struct Upload {
    role: &'static str,
    dataset: Id,
    rows: usize,
    blake3: String,
    bytes: Vec<u8>,
}

impl Upload {
    fn filename(&self) -> String {
        format!("emlab-{}.jsonl", self.blake3)
    }
}

/// A chat dataset as fine-tuning JSONL, checked.
fn jsonl(store: &Store, name: &str, role: &'static str) -> Result<Upload, HostedError> {
    let id = resolve_dataset(store, name)?;
    let rows = view::chat_rows(store, id, None)?;
    let lines: Vec<Vec<u8>> = rows
        .iter()
        .map(|(_, msgs)| view::chat_line(msgs).to_string().into_bytes())
        .collect();
    let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
    let min = if role == "training" {
        check::MIN_LINES
    } else {
        1
    };
    let problems = check::check_lines(&refs, min);
    if !problems.is_empty() {
        let mut list: Vec<String> = problems.iter().take(20).map(|p| p.to_string()).collect();
        if problems.len() > 20 {
            list.push(format!("... and {} more", problems.len() - 20));
        }
        return Err(HostedError::Check {
            name: name.to_string(),
            count: problems.len(),
            list: list.join("\n  "),
        });
    }
    let mut bytes = Vec::new();
    for l in &lines {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    Ok(Upload {
        role,
        dataset: id,
        rows: lines.len(),
        blake3: blake3::hash(&bytes).to_hex().to_string(),
        bytes,
    })
}

/// The `method.supervised.hyperparameters` object: only what was given (the API picks the
/// rest, `auto`).
fn hyperparameters(plan: &HostedPlan) -> J {
    let mut h = serde_json::Map::new();
    if let Some(e) = plan.epochs {
        h.insert("n_epochs".into(), json!(e));
    }
    if let Some(b) = plan.batch_size {
        h.insert("batch_size".into(), json!(b));
    }
    if let Some(x) = plan.lr_multiplier {
        h.insert("learning_rate_multiplier".into(), json!(x));
    }
    J::Object(h)
}

/// A hosted checkpoint's `config`, if `rec` is one.
pub fn hosted_config(rec: &Record) -> Option<J> {
    let c = rec.get("config")?.to_json();
    (c["backend"].as_str() == Some("openai")).then_some(c)
}

/// The endpoint a hosted checkpoint is sampled through: its API's base URL, its `ft:` model,
/// its key variable.
pub fn checkpoint_endpoint(store: &Store, ck: Id) -> Result<Option<Endpoint>, HostedError> {
    let rec = store.get(ck)?;
    let Some(c) = hosted_config(&rec) else {
        return Ok(None);
    };
    let s = |k: &str| c[k].as_str().map(str::to_string);
    Ok(Some(Endpoint {
        base_url: s("endpoint").unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
        model: s("fine_tuned_model").unwrap_or_default(),
        api_key_env: s("api_key_env"),
        concurrency: Endpoint::DEFAULT_CONCURRENCY,
        max_retries: Endpoint::DEFAULT_MAX_RETRIES,
        timeout_s: Endpoint::DEFAULT_TIMEOUT_S,
    }))
}

/// The error of the last failed or cancelled job stored for request key `key`, if any.
fn recorded_failure(store: &Store, key: &str) -> Result<Option<HostedError>, HostedError> {
    let Some(run) = store.alias(NS_HOSTED_FAILED, key)? else {
        return Ok(None);
    };
    let p = store
        .get(run)?
        .get("plan")
        .map(Value::to_json)
        .unwrap_or_default();
    Ok(Some(HostedError::Ended {
        job: p["job_id"].as_str().unwrap_or_default().into(),
        status: p["status"].as_str().unwrap_or_default().into(),
        msg: format!(
            "{} (recorded as run {})",
            p["error"].as_str().unwrap_or("no error given"),
            run.to_hex()
        ),
    }))
}

/// Run (or find, or follow) the hosted fine-tuning job `plan` describes; `note` hears status
/// changes.
pub fn run(
    store: &Store,
    plan: &HostedPlan,
    note: &mut dyn FnMut(&str),
) -> Result<HostedReport, HostedError> {
    if !(plan.poll_interval > 0.0 && plan.poll_interval <= 86_400.0) {
        return Err(HostedError::Plan(
            "--poll-interval must be above 0 and at most 86400 seconds (a day)".into(),
        ));
    }
    // Base and lineage.
    let (base, base_id, parent) = match &plan.from {
        Some(from) => {
            let ck = crate::train::checkpoint::resolve(store, from)?;
            let rec = store.get(ck)?;
            let c = hosted_config(&rec).ok_or_else(|| HostedError::NotHosted(ck.to_hex()))?;
            let ft = c["fine_tuned_model"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(b) = &plan.base {
                if b != &ft {
                    return Err(HostedError::Plan(format!(
                        "--model-name {b} differs from the --from checkpoint's model {ft}: leave --model-name out to continue it"
                    )));
                }
            }
            let base_id = rec
                .get("base_model")
                .and_then(Value::as_id)
                .ok_or_else(|| {
                    HostedError::Plan(format!("checkpoint {} names no base model", ck.to_hex()))
                })?;
            (ft, base_id, Some(ck))
        }
        None => {
            let b = plan.base.clone().ok_or_else(|| {
                HostedError::Plan("--model-name (the model to fine-tune) is required".into())
            })?;
            let id = store.put(&ModelIdentity::endpoint(&plan.endpoint, &b).record())?;
            (b, id, None)
        }
    };
    // The files, checked before any request.
    let train = jsonl(store, &plan.data, "training")?;
    let valid = match &plan.validation {
        Some(v) => Some(jsonl(store, v, "validation")?),
        None => None,
    };
    let hyper = hyperparameters(plan);
    let key_src = json!({
        "v": 1,
        "endpoint": plan.endpoint.trim_end_matches('/'),
        "base": base,
        "training_file": train.blake3,
        "validation_file": valid.as_ref().map(|v| &v.blake3),
        "hyperparameters": hyper,
        "seed": plan.seed,
        "suffix": plan.suffix,
    });
    let key = blake3::hash(key_src.to_string().as_bytes())
        .to_hex()
        .to_string();
    let mut report = HostedReport {
        request_key: key.clone(),
        ..Default::default()
    };
    // Finished before: the store knows.
    if let Some(ck) = store.alias(NS_HOSTED, &key)? {
        let rec = store.get(ck)?;
        let c = hosted_config(&rec).unwrap_or_default();
        report.checkpoint = ck.to_hex();
        report.job = c["job_id"].as_str().unwrap_or_default().into();
        report.fine_tuned_model = c["fine_tuned_model"].as_str().unwrap_or_default().into();
        report.already_stored = true;
        report.steps = rec.get("step").and_then(Value::as_int).unwrap_or(0) as usize;
        return Ok(report);
    }
    if !plan.retry_failed {
        if let Some(e) = recorded_failure(store, &key)? {
            return Err(e);
        }
    }
    let client = Client::new(Endpoint {
        base_url: plan.endpoint.clone(),
        model: base.clone(),
        api_key_env: Some(plan.api_key_env.clone()),
        concurrency: 1,
        max_retries: plan.max_retries,
        timeout_s: plan.timeout_s,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HostedError::Plan(format!("cannot start the async runtime: {e}")))?;
    let ctx = Ctx {
        store,
        plan,
        client: &client,
        base: &base,
        base_id,
        parent,
        key: &key,
        hyper: &hyper,
    };
    let r = rt.block_on(ctx.drive(&train, valid.as_ref(), &mut report, note));
    report.requests = client.requests_sent();
    r.map(|()| report)
}

struct Ctx<'a> {
    store: &'a Store,
    plan: &'a HostedPlan,
    client: &'a Client,
    base: &'a str,
    base_id: Id,
    parent: Option<Id>,
    key: &'a str,
    hyper: &'a J,
}

impl Ctx<'_> {
    async fn drive(
        &self,
        train: &Upload,
        valid: Option<&Upload>,
        report: &mut HostedReport,
        note: &mut dyn FnMut(&str),
    ) -> Result<(), HostedError> {
        let c = self.client;
        let jobs = api::jobs_with(c, "emlab_key", self.key).await?;
        let mut failed = 0usize;
        let mut follow: Option<api::Job> = None;
        for j in jobs {
            match j.status.as_str() {
                "failed" | "cancelled" => {
                    failed += 1;
                    self.record_failure(&j, train)?;
                }
                _ => follow = Some(j),
            }
        }
        if follow.is_none() && failed > 0 && !self.plan.retry_failed {
            // Recorded above; say so.
            if let Some(e) = recorded_failure(self.store, self.key)? {
                return Err(e);
            }
        }
        let job = match follow {
            Some(j) => {
                note(&format!("following job {} ({})", j.id, j.status));
                j
            }
            None => {
                let tf = self.file(train, report).await?;
                let vf = match valid {
                    Some(v) => Some(self.file(v, report).await?),
                    None => None,
                };
                let mut body = json!({
                    "model": self.base,
                    "training_file": tf,
                    "method": {"type": "supervised", "supervised": {"hyperparameters": self.hyper}},
                    "metadata": {"emlab_key": self.key, "emlab_attempt": (failed + 1).to_string()},
                });
                if let Some(v) = vf {
                    body["validation_file"] = J::String(v);
                }
                if let Some(s) = self.plan.seed {
                    body["seed"] = json!(s);
                }
                if let Some(s) = &self.plan.suffix {
                    body["suffix"] = json!(s);
                }
                let key = self.key;
                let attempt = (failed + 1).to_string();
                let attempt = attempt.as_str();
                let (j, created) = c
                    .create_once(
                        || api::create_job(c, &body),
                        // This attempt's job, whatever its state (it may have failed at once).
                        || async move {
                            let jobs = api::jobs_with(c, "emlab_key", key).await?;
                            Ok(jobs
                                .into_iter()
                                .rfind(|j| j.meta("emlab_attempt") == Some(attempt)))
                        },
                    )
                    .await?;
                // Found: no live job had the key before, so the failed request made it.
                report.created_job = true;
                let how = if created {
                    "created"
                } else {
                    "created (found after its create request failed)"
                };
                note(&format!("{how} job {} ({})", j.id, j.status));
                j
            }
        };
        report.job = job.id.clone();
        let job = self.poll(job, note).await?;
        if job.status != "succeeded" {
            let run = self.record_failure(&job, train)?;
            return Err(HostedError::Ended {
                job: job.id.clone(),
                status: job.status.clone(),
                msg: format!("{} (recorded as run {})", job.error_message(), run.to_hex()),
            });
        }
        self.finish(job, train, valid, report).await
    }

    /// The uploaded file of `u`: one found by its name and size, or a new upload.
    async fn file(&self, u: &Upload, report: &mut HostedReport) -> Result<String, HostedError> {
        let (id, found) = files::ensure(
            self.client,
            &u.filename(),
            &u.bytes,
            FilePurpose::FineTune,
            "fine-tune",
        )
        .await?;
        if found {
            report.reused_files += 1;
        } else {
            report.uploaded_files += 1;
        }
        Ok(id)
    }

    /// Poll until the job finishes: every --poll-interval while it changes, backing off to
    /// ten times that while it does not.
    async fn poll(
        &self,
        mut job: api::Job,
        note: &mut dyn FnMut(&str),
    ) -> Result<api::Job, HostedError> {
        let base = Duration::from_secs_f64(self.plan.poll_interval);
        let mut wait = base;
        let mut last = job.status.clone();
        while !job.finished() {
            tokio::time::sleep(wait).await;
            job = api::job(self.client, &job.id).await?;
            if job.status != last {
                note(&format!("job {}: {}", job.id, job.status));
                last = job.status.clone();
                wait = base;
            } else {
                wait = (wait.mul_f64(1.5)).min(base * 10);
            }
        }
        Ok(job)
    }

    /// Store a failed or cancelled job as a `run` record and point the key's failure alias
    /// at it; returns the record's id.
    fn record_failure(&self, job: &api::Job, train: &Upload) -> Result<Id, HostedError> {
        let plan = json!({
            "backend": "openai",
            "endpoint": self.plan.endpoint,
            "request_key": self.key,
            "job_id": job.id,
            "status": job.status,
            "error": job.error_message(),
            "attempt": job.meta("emlab_attempt"),
            "base": self.base,
        });
        let id = self
            .store
            .put(&build::run(RUN_KIND, &plan, [self.base_id, train.dataset]))?;
        self.store.set_alias(NS_HOSTED_FAILED, self.key, id)?;
        Ok(id)
    }

    async fn finish(
        &self,
        job: api::Job,
        train: &Upload,
        valid: Option<&Upload>,
        report: &mut HostedReport,
    ) -> Result<(), HostedError> {
        let url = self
            .client
            .endpoint
            .url(&format!("fine_tuning/jobs/{}", job.id));
        let ft = job
            .fine_tuned_model
            .clone()
            .ok_or_else(|| HostedError::Protocol {
                url: url.clone(),
                msg: "the job succeeded without a fine_tuned_model".into(),
            })?;
        let events = api::events(self.client, &job.id).await?;
        let cks = api::checkpoints(self.client, &job.id).await?;
        let losses = api::losses(&events);
        let files: Vec<J> = [Some(train), valid]
            .into_iter()
            .flatten()
            .map(|u| {
                let id = if u.role == "training" {
                    job.training_file.clone()
                } else {
                    job.validation_file.clone()
                };
                json!({"role": u.role, "file_id": id, "filename": u.filename(), "blake3": u.blake3, "bytes": u.bytes.len(), "rows": u.rows, "dataset": u.dataset.to_hex()})
            })
            .collect();
        let checkpoints: Vec<J> = cks
            .iter()
            .map(|c| json!({"id": c.id, "step": c.step_number, "model": c.fine_tuned_model_checkpoint, "metrics": c.metrics}))
            .collect();
        let config = json!({
            "backend": "openai",
            "endpoint": self.plan.endpoint.trim_end_matches('/'),
            "api_key_env": self.plan.api_key_env,
            "base": self.base,
            "request_key": self.key,
            "job_id": job.id,
            "attempt": job.meta("emlab_attempt"),
            "status": job.status,
            "hyperparameters": self.hyper,
            "method": job.method,
            "seed": self.plan.seed,
            "job_seed": job.seed,
            "suffix": self.plan.suffix,
            "files": files,
            "fine_tuned_model": ft,
            "checkpoints": checkpoints,
            "trained_tokens": job.trained_tokens,
        });
        let eval: Vec<J> = losses
            .iter()
            .filter_map(|(s, _, v)| v.map(|v| json!([s, v])))
            .collect();
        let steps = losses
            .last()
            .map_or(0, |l| l.0)
            .max(cks.last().map_or(0, |c| c.step_number));
        let mut rec = Record::new(CHECKPOINT)
            .with("base_model", Value::Id(self.base_id))
            .with("dataset", Value::Id(train.dataset))
            .with("config", Value::json(&config))
            .with("step", Value::Int(steps))
            .with(
                "loss_curve",
                Value::List(losses.iter().map(|l| Value::Float(l.1)).collect()),
            )
            .with("eval_loss", Value::json(&J::Array(eval)))
            .with(
                "data_stats",
                Value::json(&json!({"rows": train.rows, "validation_rows": valid.map(|v| v.rows), "events": events.len()})),
            );
        if let Some(p) = self.parent {
            rec = rec.with("parent", Value::Id(p));
        }
        let ck = self.store.put(&rec)?;
        self.store.set_alias(NS_HOSTED, self.key, ck)?;
        report.checkpoint = ck.to_hex();
        report.fine_tuned_model = ft;
        report.steps = steps as usize;
        report.final_loss = losses.last().map(|l| l.1);
        Ok(())
    }
}
