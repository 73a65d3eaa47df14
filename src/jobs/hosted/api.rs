//! The OpenAI fine-tuning API (files: [`crate::endpoint::files`]), through [`Client::api`] (emlab's transport: every
//! attempt counted and retried by one policy), with serde types of emlab's own: async-openai's
//! checkpoint metrics fields are all required and fail on answers without a validation file,
//! and a job's `metadata` (where emlab keeps its request key) is read as it comes.

use std::collections::BTreeMap;

use async_openai::traits::RequestOptionsBuilder;
use serde::Deserialize;
use serde_json::Value as J;

use crate::endpoint::files::{all_pages, Listed};
use crate::endpoint::{Client, ClientError};

/// A fine-tuning job as the API returns it (the fields emlab reads).
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub fine_tuned_model: Option<String>,
    #[serde(default)]
    pub error: Option<J>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, J>>,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub trained_tokens: Option<i64>,
    #[serde(default)]
    pub method: Option<J>,
    #[serde(default)]
    pub training_file: Option<String>,
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub seed: Option<i64>,
}

impl Job {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }

    /// `succeeded`, `failed` or `cancelled`: the job will not change again.
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }

    /// The error's message, for a failed job.
    pub fn error_message(&self) -> String {
        match &self.error {
            Some(e) if !e.is_null() => e["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string()),
            _ => "no error given".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub level: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub data: Option<J>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JobCheckpoint {
    pub id: String,
    #[serde(default)]
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    #[serde(default)]
    pub step_number: i64,
    #[serde(default)]
    pub metrics: J,
}

impl Listed for Job {
    fn id(&self) -> &str {
        &self.id
    }
}
impl Listed for Event {
    fn id(&self) -> &str {
        &self.id
    }
}
impl Listed for JobCheckpoint {
    fn id(&self) -> &str {
        &self.id
    }
}

/// `POST /fine_tuning/jobs`, sent once (see [`Client::create_once`]).
pub async fn create_job(c: &Client, body: &J) -> Result<Job, ClientError> {
    c.api_once()
        .fine_tuning()
        .create_byot(body.clone())
        .await
        .map_err(|e| c.api_error("fine_tuning/jobs", e))
}

/// `GET /fine_tuning/jobs?metadata[k]=v`: the jobs whose metadata has `k = v` (checked here
/// too, should a server ignore the filter), oldest first.
pub async fn jobs_with(c: &Client, k: &str, v: &str) -> Result<Vec<Job>, ClientError> {
    let path = "fine_tuning/jobs";
    let jobs: Vec<Job> = all_pages(&[(format!("metadata[{k}]"), v.into())], |q| async move {
        let ft = c.api().fine_tuning();
        let ft = ft.query(&q).map_err(|e| c.api_error(path, e))?;
        ft.list_paginated_byot()
            .await
            .map_err(|e| c.api_error(path, e))
    })
    .await?;
    let mut out: Vec<Job> = jobs.into_iter().filter(|j| j.meta(k) == Some(v)).collect();
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(out)
}

/// `GET /fine_tuning/jobs/{id}`.
pub async fn job(c: &Client, id: &str) -> Result<Job, ClientError> {
    c.api()
        .fine_tuning()
        .retrieve_byot(id)
        .await
        .map_err(|e| c.api_error(&format!("fine_tuning/jobs/{id}"), e))
}

/// Every event of a job, oldest first.
pub async fn events(c: &Client, id: &str) -> Result<Vec<Event>, ClientError> {
    let path = &format!("fine_tuning/jobs/{id}/events");
    let mut out: Vec<Event> = all_pages(&[], |q| async move {
        let ft = c.api().fine_tuning();
        let ft = ft.query(&q).map_err(|e| c.api_error(path, e))?;
        ft.list_events_byot(id)
            .await
            .map_err(|e| c.api_error(path, e))
    })
    .await?;
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    out.dedup_by(|a, b| a.id == b.id);
    Ok(out)
}

/// Every checkpoint of a job, by step.
pub async fn checkpoints(c: &Client, id: &str) -> Result<Vec<JobCheckpoint>, ClientError> {
    let path = &format!("fine_tuning/jobs/{id}/checkpoints");
    let mut out: Vec<JobCheckpoint> = all_pages(&[], |q| async move {
        let ft = c.api().fine_tuning();
        let ft = ft.query(&q).map_err(|e| c.api_error(path, e))?;
        ft.list_checkpoints_byot(id)
            .await
            .map_err(|e| c.api_error(path, e))
    })
    .await?;
    out.sort_by_key(|c| c.step_number);
    out.dedup_by(|a, b| a.id == b.id);
    Ok(out)
}

/// The training (and validation) loss per step from a job's `metrics` events:
/// `(step, train_loss, valid_loss)`, by step, one per step.
pub fn losses(events: &[Event]) -> Vec<(i64, f64, Option<f64>)> {
    let mut out: BTreeMap<i64, (f64, Option<f64>)> = BTreeMap::new();
    for e in events {
        let Some(d) = &e.data else { continue };
        if e.kind.as_deref() != Some("metrics") {
            continue;
        }
        let (Some(step), Some(train)) = (d["step"].as_i64(), d["train_loss"].as_f64()) else {
            continue;
        };
        let valid = d["full_valid_loss"].as_f64().or(d["valid_loss"].as_f64());
        out.insert(step, (train, valid));
    }
    out.into_iter().map(|(s, (t, v))| (s, t, v)).collect()
}
