//! [`Pool`]: several OpenAI-compatible endpoints serving one model (a fleet of vLLM or
//! SGLang servers, or one server): each request goes to the endpoint with the fewest requests
//! in flight that has room; an endpoint whose request fails (after its own retries) cools
//! down, and the request moves to another. What a request asks does not depend on which
//! endpoint answers it, so its record (keyed by the request) is stored once whoever answered.
//! Per-endpoint counts ([`Pool::counts`]) go on the run.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value as J;

use super::client::{Client, ClientError, Endpoint};

/// The first cool-down after a failure; it doubles per failure in a row, up to [`COOL_MAX`].
const COOL_BASE: Duration = Duration::from_secs(1);
const COOL_MAX: Duration = Duration::from_secs(60);

struct Member {
    client: Client,
    in_flight: AtomicUsize,
    cool_until: Mutex<Option<Instant>>,
    failures_in_row: AtomicU32,
    requests: AtomicUsize,
    answered: AtomicUsize,
    errors: AtomicUsize,
}

/// What one endpoint of a pool did in a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointCount {
    pub url: String,
    pub model: String,
    /// Requests sent to it (each may have been retried there; see `http_requests`).
    pub requests: usize,
    pub answered: usize,
    /// Requests that failed there after its retries (and moved to another endpoint).
    pub errors: usize,
    /// HTTP requests, retries included.
    pub http_requests: usize,
}

pub struct Pool {
    members: Vec<Member>,
    freed: tokio::sync::Notify,
}

impl Pool {
    pub fn new(endpoints: &[Endpoint]) -> Result<Pool, ClientError> {
        assert!(!endpoints.is_empty(), "a pool needs an endpoint");
        let members = endpoints
            .iter()
            .map(|e| {
                Ok(Member {
                    client: Client::new(e.clone())?,
                    in_flight: AtomicUsize::new(0),
                    cool_until: Mutex::new(None),
                    failures_in_row: AtomicU32::new(0),
                    requests: AtomicUsize::new(0),
                    answered: AtomicUsize::new(0),
                    errors: AtomicUsize::new(0),
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Pool {
            members,
            freed: tokio::sync::Notify::new(),
        })
    }

    /// Requests in flight at once, over every endpoint.
    pub fn concurrency(&self) -> usize {
        self.members
            .iter()
            .map(|m| m.client.endpoint.concurrency.max(1))
            .sum()
    }

    /// HTTP requests sent so far, retries included, over every endpoint.
    pub fn requests_sent(&self) -> usize {
        self.members.iter().map(|m| m.client.requests_sent()).sum()
    }

    pub fn counts(&self) -> Vec<EndpointCount> {
        self.members
            .iter()
            .map(|m| EndpointCount {
                url: m.client.endpoint.base_url.clone(),
                model: m.client.endpoint.model.clone(),
                requests: m.requests.load(Relaxed),
                answered: m.answered.load(Relaxed),
                errors: m.errors.load(Relaxed),
                http_requests: m.client.requests_sent(),
            })
            .collect()
    }

    /// The member to send to now: not cooling down, with room, fewest in flight (the first
    /// such on ties). `Err(wait)`: none has room; `wait` is when the first cool-down ends
    /// (`None`: every member is busy, wait for a request to finish).
    fn pick(&self, now: Instant) -> Result<usize, Option<Instant>> {
        let mut best: Option<(usize, usize)> = None;
        let mut first_cool: Option<Instant> = None;
        for (i, m) in self.members.iter().enumerate() {
            if let Some(until) = *m.cool_until.lock().unwrap() {
                if until > now {
                    first_cool = Some(first_cool.map_or(until, |f| f.min(until)));
                    continue;
                }
            }
            let f = m.in_flight.load(Relaxed);
            if f >= m.client.endpoint.concurrency.max(1) {
                continue;
            }
            if best.is_none_or(|(_, bf)| f < bf) {
                best = Some((i, f));
            }
        }
        match best {
            Some((i, _)) => {
                self.members[i].in_flight.fetch_add(1, Relaxed);
                Ok(i)
            }
            None => Err(first_cool),
        }
    }

    /// POST /chat/completions on the pool (`model` set per endpoint). A request that fails
    /// on an endpoint after that endpoint's retries moves to another, up to twice the pool's
    /// size; one the server refuses (400, 401, 404: the request or the key is wrong) does
    /// not. A pool of one endpoint is that endpoint's client, unchanged.
    pub async fn chat(&self, body: J) -> Result<J, ClientError> {
        let mut tries = 0;
        loop {
            let i = loop {
                let freed = self.freed.notified();
                match self.pick(Instant::now()) {
                    Ok(i) => break i,
                    Err(Some(until)) if self.all_cooling(Instant::now()) => {
                        tokio::time::sleep_until(until.into()).await
                    }
                    // Some member is busy: wait for a request to finish (or a cool-down to end).
                    Err(until) => {
                        let cap = until.unwrap_or_else(|| Instant::now() + COOL_MAX);
                        let _ = tokio::time::timeout_at(cap.into(), freed).await;
                    }
                }
            };
            let m = &self.members[i];
            m.requests.fetch_add(1, Relaxed);
            let r = m.client.chat(body.clone()).await;
            m.in_flight.fetch_sub(1, Relaxed);
            self.freed.notify_waiters();
            match r {
                Ok(v) => {
                    m.answered.fetch_add(1, Relaxed);
                    m.failures_in_row.store(0, Relaxed);
                    return Ok(v);
                }
                Err(e @ (ClientError::Refused { .. } | ClientError::MissingKey(_))) => {
                    m.errors.fetch_add(1, Relaxed);
                    return Err(e);
                }
                // One endpoint: nowhere to move to; the client's retries were the retries.
                Err(e) if self.members.len() == 1 => {
                    m.errors.fetch_add(1, Relaxed);
                    return Err(e);
                }
                Err(e) => {
                    m.errors.fetch_add(1, Relaxed);
                    let k = m.failures_in_row.fetch_add(1, Relaxed).min(6);
                    let cool = (COOL_BASE * (1u32 << k)).min(COOL_MAX);
                    *m.cool_until.lock().unwrap() = Some(Instant::now() + cool);
                    tracing::warn!(endpoint = %m.client.endpoint.base_url, cool_s = cool.as_secs(), error = %e, "endpoint cools down; the request moves");
                    tries += 1;
                    if tries >= 2 * self.members.len() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn all_cooling(&self, now: Instant) -> bool {
        self.members
            .iter()
            .all(|m| m.cool_until.lock().unwrap().is_some_and(|u| u > now))
    }
}
