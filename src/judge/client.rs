//! An OpenAI-compatible chat backend (async-openai, "bring your own types" JSON requests):
//! bounded concurrency, retries with exponential backoff and jitter on 429 / 5xx / timeouts /
//! dropped connections / truncated JSON, and a per-request timeout.
//!
//! The API key is read from a named environment variable when a request is built and is
//! never stored, logged or returned: [`Endpoint`] holds the variable's name, not its value.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use serde_json::Value as J;

/// Where and how to send requests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoint {
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable holding the API key (its value is never recorded).
    pub api_key_env: Option<String>,
    pub concurrency: usize,
    pub max_retries: u32,
    pub timeout_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {msg} (after {attempts} attempts)")]
    Failed {
        url: String,
        msg: String,
        attempts: u32,
    },
    #[error("{url}: request refused: {msg}")]
    Refused { url: String, msg: String },
    #[error("environment variable {0} (the API key) is not set")]
    MissingKey(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

pub struct Client {
    inner: async_openai::Client<OpenAIConfig>,
    pub endpoint: Endpoint,
    /// HTTP requests sent (retries included): what "a rerun sends zero requests" counts.
    pub requests_sent: AtomicUsize,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Result<Client, ClientError> {
        let key = match &endpoint.api_key_env {
            Some(var) => std::env::var(var).map_err(|_| ClientError::MissingKey(var.clone()))?,
            // Local servers ignore the key; async-openai always sends one.
            None => "none".to_string(),
        };
        let cfg = OpenAIConfig::new()
            .with_api_base(endpoint.base_url.trim_end_matches('/'))
            .with_api_key(key);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(endpoint.timeout_s))
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Client {
            inner: async_openai::Client::build(http, cfg),
            endpoint,
            requests_sent: AtomicUsize::new(0),
        })
    }

    /// POST /chat/completions with `body` (the `model` field is set here), retrying what is
    /// worth retrying.
    pub async fn chat(&self, mut body: J) -> Result<J, ClientError> {
        body["model"] = J::String(self.endpoint.model.clone());
        let url = format!(
            "{}/chat/completions",
            self.endpoint.base_url.trim_end_matches('/')
        );
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.requests_sent.fetch_add(1, Ordering::Relaxed);
            let res: Result<J, OpenAIError> = self.inner.chat().create_byot(body.clone()).await;
            let err = match res {
                Ok(v) if v.get("choices").is_some() => return Ok(v),
                Ok(v) => format!("response has no `choices`: {}", truncate(&v.to_string())),
                Err(e) => {
                    if !retryable(&e) {
                        return Err(ClientError::Refused {
                            url,
                            msg: e.to_string(),
                        });
                    }
                    e.to_string()
                }
            };
            if attempt > self.endpoint.max_retries {
                return Err(ClientError::Failed {
                    url,
                    msg: truncate(&err),
                    attempts: attempt,
                });
            }
            let delay = backoff(attempt);
            tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %truncate(&err), "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

/// 429, 5xx, 408, timeouts, connection failures and unparseable bodies are retried; other
/// client errors (400, 401, 404, ...) are not.
fn retryable(e: &OpenAIError) -> bool {
    match e {
        OpenAIError::ApiError(a) => {
            let s = a.status_code.as_u16();
            s == 429 || s == 408 || s >= 500
        }
        OpenAIError::Reqwest(_) | OpenAIError::JSONDeserialize(..) => true,
        _ => false,
    }
}

/// Exponential backoff (0.25 s doubling, capped at 8 s) with full jitter.
fn backoff(attempt: u32) -> Duration {
    let cap = 0.25f64 * f64::from(1u32 << attempt.min(5));
    let cap = cap.min(8.0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = f64::from(nanos % 1000) / 1000.0;
    Duration::from_secs_f64(cap * (0.5 + 0.5 * jitter))
}

/// The top logprobs of the first output token of a chat completion: `(token, logprob)`.
pub fn first_token_top_logprobs(resp: &J) -> Vec<(String, f64)> {
    resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| Some((x["token"].as_str()?.to_string(), x["logprob"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The message text of a chat completion.
pub fn content(resp: &J) -> String {
    resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string()
}
