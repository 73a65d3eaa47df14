//! An OpenAI-compatible chat backend: async-openai's client ("bring your own types" JSON
//! requests) over an HTTP service of emlab's own, so that one [`RetryPolicy`] decides every
//! retry and every request is counted.
//!
//! async-openai's default transport retries 429s, 5xx and refused connections itself, out of
//! sight of the caller's counters and backoff. emlab installs its own tower service instead
//! ([`async_openai::Client::with_http_service`]): it sends each attempt, counts it, and
//! retries what is worth retrying: 429, 408 and 5xx (honouring `Retry-After`, in seconds or as
//! an HTTP date), timeouts and connections dropped mid-answer, with exponential backoff and
//! full jitter. A refused connection is retried only [`RetryPolicy::connect_retries`] times:
//! nothing listens there, and waiting longer will not change that. Request-building and
//! redirect errors are not retried. Answers that arrive but cannot be used (truncated JSON,
//! no `choices`) are retried by [`Client::chat`] within the same budget.
//!
//! The API key is read from a named environment variable when the client is built and is
//! never stored, logged or returned: [`Endpoint`] holds the variable's name, not its value.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use serde_json::Value as J;

use crate::util::hint::Hint;

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

impl Endpoint {
    /// The defaults every verb that talks to an endpoint shares (`EndpointArgs` in the CLI).
    pub const DEFAULT_CONCURRENCY: usize = 8;
    pub const DEFAULT_MAX_RETRIES: u32 = 6;
    pub const DEFAULT_TIMEOUT_S: f64 = 120.0;

    /// `POST` URL of an API path (`chat/completions`).
    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base_url.trim_end_matches('/'))
    }
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
    #[error("{url}: cannot connect ({msg}) after {attempts} attempts")]
    Unreachable {
        url: String,
        msg: String,
        attempts: u32,
    },
    #[error("unexpected answer from {url}: {msg}")]
    Protocol { url: String, msg: String },
    #[error("{from}: {msg}")]
    Unanswered { from: String, msg: String },
    #[error("{}: {msg}", path.display())]
    Io {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("environment variable {0} (the API key) is not set")]
    MissingKey(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

impl Hint for ClientError {
    fn hint(&self) -> Option<String> {
        match self {
            ClientError::Unreachable { .. } => Some(
                "is the server running at that address? start it, or correct --endpoint (the base URL, e.g. http://127.0.0.1:8080/v1)"
                    .into(),
            ),
            ClientError::MissingKey(var) => Some(format!(
                "export {var}=<key> in this shell (the key is read from the environment and never stored), or name another variable with --api-key-env"
            )),
            ClientError::Refused { msg, .. } if msg.starts_with("401") || msg.starts_with("403") => {
                Some("the server refused the API key: check the variable --api-key-env names".into())
            }
            ClientError::Refused { msg, .. } if msg.starts_with("404") => Some(
                "check --endpoint (the base URL ends in /v1) and --model-name (the name the server serves)"
                    .into(),
            ),
            ClientError::Unanswered { .. } => Some(
                "what came back is stored; rerun the same command to send only the rest in a new batch (for a result file: `emlab batch export` again, run it, and import its results)"
                    .into(),
            ),
            ClientError::Failed { .. } => Some(
                "what succeeded is stored; rerun the same command to retry the rest (--max-retries and --timeout allow more)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// When to retry and how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt, for anything retryable but a refused connection.
    pub max_retries: u32,
    /// Retries after a refused connection.
    pub connect_retries: u32,
    /// First backoff; it doubles per attempt, up to `cap`.
    pub base: Duration,
    pub cap: Duration,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    pub fn new(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            connect_retries: 2.min(max_retries),
            base: Duration::from_millis(250),
            cap: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(120),
        }
    }

    /// The wait before attempt `attempt + 1`: the server's `Retry-After` when it sent one
    /// (capped), else exponential backoff with full jitter.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.max_retry_after);
        }
        let cap = self
            .base
            .saturating_mul(1u32 << attempt.min(5))
            .min(self.cap);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = f64::from(nanos % 1000) / 1000.0;
        cap.mul_f64(0.5 + 0.5 * jitter)
    }
}

/// What to do after one HTTP attempt.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Hand the result to the caller.
    Done,
    /// Retry after this long (or the policy's backoff).
    Retry(Option<Duration>),
    /// Retry, counting against [`RetryPolicy::connect_retries`].
    RetryConnect,
}

/// Classify an HTTP status and its `Retry-After` header.
pub fn classify_status(status: u16, retry_after: Option<&str>) -> Outcome {
    if status == 429 || status == 408 || status >= 500 {
        Outcome::Retry(retry_after.and_then(parse_retry_after))
    } else {
        Outcome::Done
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let wait = when.as_second() - jiff::Timestamp::now().as_second();
    Some(Duration::from_secs(wait.max(0) as u64))
}

fn classify_transport(e: &reqwest::Error) -> Outcome {
    if e.is_builder() || e.is_redirect() {
        Outcome::Done
    } else if e.is_connect() {
        Outcome::RetryConnect
    } else {
        // Timeouts, connections closed mid-answer, unreadable bodies: transient.
        Outcome::Retry(None)
    }
}

tokio::task_local! {
    /// HTTP attempts of the [`Client::chat`] call being polled.
    static ATTEMPTS: Arc<AtomicU32>;
}

/// The HTTP transport async-openai calls: one request per attempt, retried by `policy`.
async fn send(
    http: reqwest::Client,
    policy: RetryPolicy,
    sent: Arc<AtomicUsize>,
    factory: HttpRequestFactory,
) -> Result<reqwest::Response, OpenAIError> {
    let (mut retries, mut connect_retries) = (0u32, 0u32);
    loop {
        let request = factory.build().await?;
        sent.fetch_add(1, Ordering::Relaxed);
        let _ = ATTEMPTS.try_with(|a| a.fetch_add(1, Ordering::Relaxed));
        let result = http.execute(request).await;
        let outcome = match &result {
            Ok(r) => classify_status(
                r.status().as_u16(),
                r.headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
            ),
            Err(e) => classify_transport(e),
        };
        let wait = match outcome {
            Outcome::Retry(after) if retries < policy.max_retries => {
                retries += 1;
                policy.delay(retries, after)
            }
            Outcome::RetryConnect if connect_retries < policy.connect_retries => {
                connect_retries += 1;
                policy.delay(connect_retries, None)
            }
            _ => return result.map_err(OpenAIError::Reqwest),
        };
        tracing::warn!(
            wait_ms = wait.as_millis() as u64,
            status = result.as_ref().ok().map(|r| r.status().as_u16()),
            error = result.as_ref().err().map(|e| e.to_string()),
            "retrying"
        );
        tokio::time::sleep(wait).await;
    }
}

pub struct Client {
    inner: async_openai::Client<OpenAIConfig>,
    /// The same client without the transport's retries, for requests that create something
    /// ([`Client::create_once`]).
    once: async_openai::Client<OpenAIConfig>,
    pub endpoint: Endpoint,
    policy: RetryPolicy,
    /// HTTP requests sent (retries included): what "a rerun sends zero requests" counts.
    sent: Arc<AtomicUsize>,
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
        let policy = RetryPolicy::new(endpoint.max_retries);
        let sent = Arc::new(AtomicUsize::new(0));
        let service = |policy: RetryPolicy| {
            let (http, sent) = (http.clone(), sent.clone());
            tower::service_fn(move |factory: HttpRequestFactory| {
                send(http.clone(), policy, sent.clone(), factory)
            })
        };
        let no_retries = RetryPolicy {
            max_retries: 0,
            connect_retries: 0,
            ..policy
        };
        let once = async_openai::Client::build(http.clone(), cfg.clone())
            .with_http_service(service(no_retries));
        let inner =
            async_openai::Client::build(http.clone(), cfg).with_http_service(service(policy));
        Ok(Client {
            inner,
            once,
            endpoint,
            policy,
            sent,
        })
    }

    /// async-openai's client over emlab's transport, for the APIs other than chat (files,
    /// fine-tuning, batches): every attempt is counted and retried by the same policy.
    pub fn api(&self) -> &async_openai::Client<OpenAIConfig> {
        &self.inner
    }

    /// [`Client::api`] without retries: for requests that create something, through
    /// [`Client::create_once`].
    pub fn api_once(&self) -> &async_openai::Client<OpenAIConfig> {
        &self.once
    }

    /// Send a request that creates something (a fine-tuning job, a batch) so that it is
    /// applied once: a 5xx, a timeout or a dropped connection may come after the server made
    /// it, so instead of resending at once (as the transport would), wait, ask `find` for
    /// what the request may have made (by the key it carries), and send again only when
    /// nothing is found, within the retry budget. `create` must send through
    /// [`Client::api_once`]. Returns the object and whether this call created it.
    pub async fn create_once<T, C, CF, F, FF>(
        &self,
        create: C,
        find: F,
    ) -> Result<(T, bool), ClientError>
    where
        C: Fn() -> CF,
        CF: std::future::Future<Output = Result<T, ClientError>>,
        F: Fn() -> FF,
        FF: std::future::Future<Output = Result<Option<T>, ClientError>>,
    {
        let mut tries = 0u32;
        loop {
            match create().await {
                Ok(x) => return Ok((x, true)),
                Err(e @ (ClientError::Failed { .. } | ClientError::Unreachable { .. }))
                    if tries < self.policy.max_retries =>
                {
                    tries += 1;
                    // A list may show a new object late: look twice, a while apart.
                    let wait = self.policy.delay(tries, None).max(Duration::from_secs(1));
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "a create request failed; looking for what it may have made before sending it again");
                    for _ in 0..2 {
                        tokio::time::sleep(wait).await;
                        if let Some(x) = find().await? {
                            return Ok((x, false));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An error of a call to `path` made through [`Client::api`], named by its URL.
    pub fn api_error(&self, path: &str, e: OpenAIError) -> ClientError {
        let url = self.endpoint.url(path);
        match e {
            OpenAIError::Reqwest(e) if e.is_connect() => ClientError::Unreachable {
                url,
                msg: truncate(&e.to_string()),
                attempts: self.requests_sent() as u32,
            },
            OpenAIError::ApiError(a)
                if classify_status(a.status_code.as_u16(), None) != Outcome::Done =>
            {
                ClientError::Failed {
                    url,
                    msg: truncate(&a.to_string()),
                    attempts: self.policy.max_retries + 1,
                }
            }
            OpenAIError::Reqwest(e) if !(e.is_builder() || e.is_redirect()) => {
                ClientError::Failed {
                    url,
                    msg: truncate(&e.to_string()),
                    attempts: self.policy.max_retries + 1,
                }
            }
            e => ClientError::Refused {
                url,
                msg: truncate(&e.to_string()),
            },
        }
    }

    /// HTTP requests sent so far, retries included.
    pub fn requests_sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// POST /chat/completions with `body` (the `model` field is set here). Transport and
    /// status retries happen below (see the module docs); an answer without `choices` or
    /// with a body that does not parse is retried here.
    pub async fn chat(&self, mut body: J) -> Result<J, ClientError> {
        body["model"] = J::String(self.endpoint.model.clone());
        let url = self.endpoint.url("chat/completions");
        let attempts = Arc::new(AtomicU32::new(0));
        let count = || attempts.load(Ordering::Relaxed);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let res: Result<J, OpenAIError> = ATTEMPTS
                .scope(
                    attempts.clone(),
                    self.inner.chat().create_byot(body.clone()),
                )
                .await;
            let err = match res {
                Ok(v) if v.get("choices").is_some() => return Ok(v),
                Ok(v) => format!("response has no `choices`: {}", truncate(&v.to_string())),
                Err(OpenAIError::JSONDeserialize(e, _)) => format!("unreadable answer: {e}"),
                Err(OpenAIError::Reqwest(e)) if e.is_connect() => {
                    return Err(ClientError::Unreachable {
                        url,
                        msg: truncate(&e.to_string()),
                        attempts: count(),
                    })
                }
                Err(OpenAIError::Reqwest(e)) if !(e.is_builder() || e.is_redirect()) => {
                    e.to_string()
                }
                // A retryable status the transport stopped retrying: the budget is spent.
                Err(OpenAIError::ApiError(a))
                    if classify_status(a.status_code.as_u16(), None) != Outcome::Done =>
                {
                    a.to_string()
                }
                Err(e) => {
                    return Err(ClientError::Refused {
                        url,
                        msg: truncate(&e.to_string()),
                    })
                }
            };
            // One budget for both layers: attempts the transport made count here too.
            if tries > self.policy.max_retries || count() > self.policy.max_retries {
                return Err(ClientError::Failed {
                    url,
                    msg: truncate(&err),
                    attempts: count(),
                });
            }
            let delay = self.policy.delay(tries, None);
            tracing::warn!(attempt = tries, delay_ms = delay.as_millis() as u64, error = %truncate(&err), "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_worth_retrying() {
        assert_eq!(classify_status(200, None), Outcome::Done);
        assert_eq!(classify_status(400, None), Outcome::Done);
        assert_eq!(classify_status(401, None), Outcome::Done);
        assert_eq!(classify_status(404, None), Outcome::Done);
        assert_eq!(classify_status(500, None), Outcome::Retry(None));
        assert_eq!(classify_status(408, None), Outcome::Retry(None));
        assert_eq!(
            classify_status(429, Some("7")),
            Outcome::Retry(Some(Duration::from_secs(7)))
        );
        assert_eq!(
            classify_status(503, Some("soon")),
            Outcome::Retry(None),
            "an unreadable Retry-After falls back to backoff"
        );
    }

    #[test]
    fn retry_after_as_seconds_or_http_date() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        // A date in the past means now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
        let text = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .unwrap();
        let d = parse_retry_after(&text).unwrap();
        assert!((28..=31).contains(&d.as_secs()), "{text}: {d:?}");
        assert_eq!(parse_retry_after("later"), None);
    }

    #[test]
    fn retry_after_wins_over_backoff_up_to_a_cap() {
        let p = RetryPolicy::new(6);
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(9999))),
            p.max_retry_after
        );
        for attempt in 1..10 {
            let d = p.delay(attempt, None);
            assert!(d <= p.cap && d >= p.base / 2, "{attempt}: {d:?}");
        }
        assert!(p.connect_retries <= 2);
    }
}
