//! [`run`]: send many requests with bounded concurrency and store each answer as it arrives.
//! Answers are staged into a store [`Batch`] by the caller's sink and committed every
//! [`FLUSH_EVERY`] answers and at the end, so a killed run loses at most the answers of one
//! uncommitted batch and a rerun (which skips what is stored, by key) sends only the rest.
//!
//! A request that fails after its retries is counted and the stream goes on (the caller
//! reports it); but [`MAX_CONSECUTIVE_UNREACHABLE`] refused connections in a row mean nothing
//! is listening, and the stream stops at once with that error instead of trying every
//! remaining request.

use std::future::Future;

use emlab_store::{Batch, Store};
use futures::StreamExt;
use serde_json::Value as J;

use super::client::ClientError;

/// Answers staged between commits.
pub const FLUSH_EVERY: usize = 32;
/// Refused connections in a row after which the stream gives up.
pub const MAX_CONSECUTIVE_UNREACHABLE: usize = 3;

/// What a stream did.
#[derive(Debug, Default)]
pub struct StreamReport {
    /// Answers handed to the sink.
    pub ok: usize,
    /// Requests that failed after their retries.
    pub failed: usize,
    pub first_error: Option<ClientError>,
}

/// Send `send(&job)` for every job, at most `concurrency` at a time; hand each answer to
/// `sink(batch, job, answer)`, which stages records. `progress` gets the number of requests
/// finished (answered or failed).
pub fn run<T, F, Fut, S, E>(
    store: &Store,
    jobs: Vec<T>,
    concurrency: usize,
    send: F,
    mut sink: S,
    progress: &mut dyn FnMut(usize),
) -> Result<StreamReport, E>
where
    F: Fn(&T) -> Fut,
    Fut: Future<Output = Result<J, ClientError>>,
    S: FnMut(&mut Batch, T, J) -> Result<(), E>,
    E: From<emlab_store::Error> + From<ClientError>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Build(format!("cannot start the async runtime: {e}")))?;
    let send = &send;
    rt.block_on(async {
        let mut answers = futures::stream::iter(jobs.into_iter().map(|job| async move {
            let r = send(&job).await;
            (job, r)
        }))
        .buffer_unordered(concurrency.max(1));
        let mut report = StreamReport::default();
        let mut batch = Batch::new();
        let mut staged = 0;
        let mut unreachable = 0;
        while let Some((job, r)) = answers.next().await {
            match r {
                Ok(answer) => {
                    unreachable = 0;
                    sink(&mut batch, job, answer)?;
                    staged += 1;
                    report.ok += 1;
                }
                Err(e @ ClientError::Unreachable { .. }) => {
                    unreachable += 1;
                    report.failed += 1;
                    if unreachable >= MAX_CONSECUTIVE_UNREACHABLE {
                        store.write(batch)?;
                        return Err(e.into());
                    }
                    report.first_error.get_or_insert(e);
                }
                Err(e) => {
                    unreachable = 0;
                    report.failed += 1;
                    report.first_error.get_or_insert(e);
                }
            }
            if staged >= FLUSH_EVERY {
                store.write(std::mem::take(&mut batch))?;
                staged = 0;
            }
            progress(report.ok + report.failed);
        }
        store.write(batch)?;
        Ok(report)
    })
}
