//! Requests sent as a batch instead of one at a time ([`crate::endpoint::stream`]): through
//! the OpenAI Batch API (`judge --batch-api`, `generate --endpoint ... --batch-api`), or as a
//! JSONL file for `vllm run-batch` on a cluster whose output is read back (`emlab batch
//! export|import`). The same requests, the same answers and the same records as the direct
//! path: `custom_id` is each request's content key, and the caller's sink stores what comes
//! back exactly as it would a direct answer.
//!
//! Resuming, through the Batch API:
//!
//! - requests are split into files under the API's limits ([`batch::MAX_REQUESTS`],
//!   [`batch::MAX_BYTES`]), each named by the BLAKE3 of its bytes
//!   (`emlab-batch-<blake3>.jsonl`); one already uploaded (a run killed after its upload) is
//!   reused;
//! - each batch carries that BLAKE3 in its metadata ([`batch::META_KEY`]); a rerun follows a
//!   batch with its file's key that it has not read yet instead of creating another;
//! - a finished batch's output and error files are read, its answers stored, and a `run`
//!   record of kind [`RUN_KIND`] written in the same commit with the alias [`NS_BATCH`]
//!   (batch id -> that record): a batch is read once;
//! - an expired, cancelled or failed batch keeps what came back; the requests it did not
//!   answer are reported failed, and a rerun (which plans only what is not stored) sends
//!   only them, in a new file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_openai::types::files::FilePurpose;
use emlab_store::{Batch, Store};
use serde_json::{json, Value as J};

use crate::endpoint::batch::{self, BatchObject};
use crate::endpoint::stream::StreamReport;
use crate::endpoint::{files, Client, ClientError, Endpoint};
use crate::provenance::build;

/// Alias namespace: batch id -> the `run` record written when its results were read.
pub const NS_BATCH: &str = "batch";
/// The `run` kind of a batch read.
pub const RUN_KIND: &str = "batch";
/// Answers staged between commits when importing a result file.
const IMPORT_FLUSH: usize = 1024;

/// How the requests go.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The OpenAI Batch API of the endpoint.
    Api(ApiOptions),
    /// Write the request JSONL to this file (nothing is sent or stored).
    Export(PathBuf),
    /// Read the answers from this result JSONL (`vllm run-batch -o`, or a Batch API output).
    Import(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Seconds between polls while a batch changes (backing off to ten times that).
    pub poll_interval: f64,
    pub max_requests: usize,
    pub max_bytes: usize,
}

impl Default for ApiOptions {
    fn default() -> ApiOptions {
        ApiOptions {
            poll_interval: 30.0,
            max_requests: batch::MAX_REQUESTS,
            max_bytes: batch::MAX_BYTES,
        }
    }
}

/// What a batched run did besides answering.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BatchReport {
    /// Batches read (their ids).
    pub batches: Vec<String>,
    /// Batches created by this run.
    pub created: usize,
    /// Batches a killed or earlier run created, followed here.
    pub followed: usize,
    pub uploaded_files: usize,
    pub reused_files: usize,
    /// Request lines written (export).
    pub exported: usize,
    /// Result lines whose request is not planned here (already stored, or another run's).
    pub unmatched: usize,
    /// HTTP requests sent, retries included.
    pub requests_sent: usize,
}

/// Send `jobs` by `mode`: `request(job)` gives a job's key (its `custom_id`) and chat body;
/// each answer goes to `sink(batch, job, answer)` as [`crate::endpoint::stream::run`] hands
/// it. `note` hears what happens to batches; `progress` gets requests finished.
#[allow(clippy::too_many_arguments)]
pub fn run<T, R, S, E>(
    store: &Store,
    endpoint: &Endpoint,
    mode: &Mode,
    jobs: Vec<T>,
    request: R,
    mut sink: S,
    note: &mut dyn FnMut(&str),
    progress: &mut dyn FnMut(usize),
) -> Result<(StreamReport, BatchReport), E>
where
    R: Fn(&T) -> (String, J),
    S: FnMut(&mut Batch, T, J) -> Result<(), E>,
    E: From<emlab_store::Error> + From<ClientError>,
{
    // One line per key, in plan order.
    let mut by_key: HashMap<String, T> = HashMap::new();
    let mut lines: Vec<(String, String)> = Vec::new();
    for job in jobs {
        let (key, body) = request(&job);
        if by_key.contains_key(&key) {
            continue;
        }
        lines.push((
            key.clone(),
            batch::request_line(&key, &endpoint.model, body),
        ));
        by_key.insert(key, job);
    }
    let mut report = BatchReport::default();
    match mode {
        Mode::Export(path) => {
            let text: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
            write_atomic(path, text.as_bytes())?;
            report.exported = lines.len();
            Ok((StreamReport::default(), report))
        }
        Mode::Import(path) => {
            let bytes = std::fs::read(path).map_err(|e| ClientError::Io {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let source = path.display().to_string();
            let answers = batch::parse_results(&bytes, &source)?;
            let mut streamed = StreamReport::default();
            let mut staged = Batch::new();
            let mut n = 0;
            for a in answers {
                let Some(job) = by_key.remove(&a.custom_id) else {
                    report.unmatched += 1;
                    continue;
                };
                take(
                    &mut streamed,
                    &mut staged,
                    &mut sink,
                    job,
                    a.result,
                    &source,
                )?;
                n += 1;
                if n % IMPORT_FLUSH == 0 {
                    store.write(std::mem::take(&mut staged))?;
                    progress(streamed.ok + streamed.failed);
                }
            }
            store.write(staged)?;
            missing(
                &mut streamed,
                by_key.len(),
                &format!("no answer in {source}"),
            );
            progress(streamed.ok + streamed.failed);
            Ok((streamed, report))
        }
        Mode::Api(opts) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ClientError::Build(format!("cannot start the async runtime: {e}")))?;
            let client = Client::new(endpoint.clone())?;
            let r = rt.block_on(via_api(
                store,
                &client,
                opts,
                lines,
                by_key,
                &mut sink,
                &mut report,
                note,
                progress,
            ));
            report.requests_sent = client.requests_sent();
            Ok((r?, report))
        }
    }
}

/// Hand one answer to the sink, or count its failure.
fn take<T, S, E>(
    streamed: &mut StreamReport,
    staged: &mut Batch,
    sink: &mut S,
    job: T,
    result: Result<J, String>,
    source: &str,
) -> Result<(), E>
where
    S: FnMut(&mut Batch, T, J) -> Result<(), E>,
{
    match result {
        Ok(answer) => {
            sink(staged, job, answer)?;
            streamed.ok += 1;
        }
        Err(msg) => {
            streamed.failed += 1;
            streamed.first_error.get_or_insert(ClientError::Refused {
                url: source.to_string(),
                msg,
            });
        }
    }
    Ok(())
}

/// Count `n` requests that got no answer at all.
fn missing(streamed: &mut StreamReport, n: usize, why: &str) {
    if n > 0 {
        streamed.failed += n;
        streamed.first_error.get_or_insert(ClientError::Refused {
            url: "batch".into(),
            msg: format!("{n} requests: {why}"),
        });
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let io = |e: std::io::Error| ClientError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let tmp = path.with_extension("jsonl.partial");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A batch being followed, with the keys of its requests.
struct Live {
    batch: BatchObject,
    keys: Vec<String>,
    file_key: String,
}

#[allow(clippy::too_many_arguments)]
async fn via_api<T, S, E>(
    store: &Store,
    client: &Client,
    opts: &ApiOptions,
    lines: Vec<(String, String)>,
    mut by_key: HashMap<String, T>,
    sink: &mut S,
    report: &mut BatchReport,
    note: &mut dyn FnMut(&str),
    progress: &mut dyn FnMut(usize),
) -> Result<StreamReport, E>
where
    S: FnMut(&mut Batch, T, J) -> Result<(), E>,
    E: From<emlab_store::Error> + From<ClientError>,
{
    let mut streamed = StreamReport::default();
    let text: Vec<String> = lines.iter().map(|(_, l)| l.clone()).collect();
    let chunks = batch::split(&text, opts.max_requests, opts.max_bytes).map_err(|msg| {
        ClientError::Protocol {
            url: client.endpoint.url("batches"),
            msg,
        }
    })?;
    // Batches whose results are stored (read by an earlier run).
    let stored: HashSet<String> = store
        .aliases(NS_BATCH)?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut live: Vec<Live> = Vec::new();
    let mut at = 0;
    for (bytes, count) in chunks {
        let keys: Vec<String> = lines[at..at + count]
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        at += count;
        let file_key = blake3::hash(&bytes).to_hex().to_string();
        let follow = unread(client, &file_key, &stored).await?;
        let b = match follow {
            Some(b) => {
                note(&format!(
                    "batch {}: following it ({}, {count} requests)",
                    b.id, b.status
                ));
                report.followed += 1;
                b
            }
            None => {
                let name = format!("emlab-batch-{file_key}.jsonl");
                let (file, found) =
                    files::ensure(client, &name, &bytes, FilePurpose::Batch, "batch").await?;
                if found {
                    report.reused_files += 1;
                } else {
                    report.uploaded_files += 1;
                }
                let key = &file_key;
                let (b, created) = client
                    .create_once(
                        || batch::create(client, &file, key),
                        || unread(client, key, &stored),
                    )
                    .await?;
                // Found: no unread batch of this file existed before, so the failed
                // request made it.
                let how = if created {
                    "created"
                } else {
                    "created (found after its create request failed)"
                };
                note(&format!("batch {}: {how} ({count} requests)", b.id));
                report.created += 1;
                b
            }
        };
        live.push(Live {
            batch: b,
            keys,
            file_key,
        });
    }
    let base = Duration::from_secs_f64(opts.poll_interval.max(0.0));
    let mut wait = base;
    loop {
        let (done, pending): (Vec<Live>, Vec<Live>) =
            live.into_iter().partition(|l| l.batch.finished());
        for l in done {
            read(
                store,
                client,
                l,
                &mut by_key,
                sink,
                &mut streamed,
                report,
                note,
            )
            .await?;
            progress(streamed.ok + streamed.failed);
        }
        live = pending;
        if live.is_empty() {
            break;
        }
        tokio::time::sleep(wait).await;
        let mut changed = false;
        for l in &mut live {
            let b = batch::retrieve(client, &l.batch.id).await?;
            if b.status != l.batch.status {
                note(&format!("batch {}: {}", b.id, b.status));
                changed = true;
            }
            l.batch = b;
        }
        wait = if changed {
            base
        } else {
            wait.mul_f64(1.5).min(base * 10)
        };
    }
    Ok(streamed)
}

/// The newest batch of request file `key` not in `read` (whose results are stored).
async fn unread(
    client: &Client,
    key: &str,
    read: &HashSet<String>,
) -> Result<Option<BatchObject>, ClientError> {
    Ok(batch::with_key(client, key)
        .await?
        .into_iter()
        .rfind(|b| !read.contains(&b.id)))
}

/// Read a finished batch: its answers to the sink, its failures counted, the requests it
/// never answered counted failed, and its `run` record and alias, all in one commit.
#[allow(clippy::too_many_arguments)]
async fn read<T, S, E>(
    store: &Store,
    client: &Client,
    l: Live,
    by_key: &mut HashMap<String, T>,
    sink: &mut S,
    streamed: &mut StreamReport,
    report: &mut BatchReport,
    note: &mut dyn FnMut(&str),
) -> Result<(), E>
where
    S: FnMut(&mut Batch, T, J) -> Result<(), E>,
    E: From<emlab_store::Error> + From<ClientError>,
{
    let b = &l.batch;
    let source = format!("batch {}", b.id);
    let mut answers = Vec::new();
    for f in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
        let bytes = files::content(client, f).await?;
        answers.extend(batch::parse_results(
            &bytes,
            &format!("{source} (file {f})"),
        )?);
    }
    let mine: HashSet<&str> = l.keys.iter().map(String::as_str).collect();
    let mut staged = Batch::new();
    let (mut answered, mut failed) = (0usize, 0usize);
    let mut seen: HashSet<String> = HashSet::new();
    for a in answers {
        if !mine.contains(a.custom_id.as_str()) || !seen.insert(a.custom_id.clone()) {
            report.unmatched += 1;
            continue;
        }
        let Some(job) = by_key.remove(&a.custom_id) else {
            continue;
        };
        if a.result.is_ok() {
            answered += 1;
        } else {
            failed += 1;
        }
        take(streamed, &mut staged, sink, job, a.result, &source)?;
    }
    let unanswered: Vec<&String> = l.keys.iter().filter(|k| !seen.contains(*k)).collect();
    for k in &unanswered {
        by_key.remove(*k);
    }
    missing(streamed, unanswered.len(), &b.error_message());
    let plan = json!({"batch": b.id, "status": b.status, "endpoint": client.endpoint.base_url,
        "model": client.endpoint.model, "input_file_id": b.input_file_id,
        "input_blake3": l.file_key, "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id, "requests": l.keys.len(), "answered": answered,
        "failed": failed, "unanswered": unanswered.len(), "request_counts": b.request_counts,
        "time": crate::util::time::now_rfc3339()});
    let id = store.stage(&mut staged, &build::run(RUN_KIND, &plan, []))?;
    staged.alias(NS_BATCH, &b.id, id);
    store.write(staged)?;
    note(&format!(
        "batch {}: {}; {answered} answered, {failed} failed, {} never answered",
        b.id,
        b.status,
        unanswered.len()
    ));
    report.batches.push(b.id.clone());
    Ok(())
}
