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
//!   (`emlab-batch-<blake3>.jsonl`) and carrying that BLAKE3 in its batch's metadata
//!   ([`batch::META_KEY`]);
//! - before a file is uploaded, an *attempt* is stored: a `run` record of kind
//!   [`OPEN_KIND`] holding the file's BLAKE3 and its requests' keys, aliased in [`NS_OPEN`].
//!   A rerun first follows the batch of every attempt left open whose requests it still
//!   plans (found by the BLAKE3), and sends only the requests no open batch holds; an open
//!   attempt without a batch (killed before the batch was created) is closed, and its
//!   requests go out again, its file reused if it was uploaded (found by name and size);
//! - a creation (of the file or the batch) whose answer is lost is looked for before it is
//!   sent again ([`crate::endpoint::Client::create_once`]);
//! - a finished batch's output and error files are read, its answers stored, and a `run`
//!   record of kind [`RUN_KIND`] written in the same commit with the aliases [`NS_BATCH`]
//!   (batch id -> that record) and [`NS_CLOSED`] (its attempt -> that record): a batch is
//!   read once;
//! - an expired, cancelled or failed batch keeps what came back, and one whose results can
//!   no longer be read (a file gone, a line that is not a result) is closed the same way;
//!   the requests it did not answer are reported failed, and a rerun (which plans only what
//!   is not stored) sends only them, in a new file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_openai::types::files::FilePurpose;
use emlab_store::{Batch, Id, Store};
use serde_json::{json, Value as J};

use crate::endpoint::batch::{self, BatchObject};
use crate::endpoint::stream::StreamReport;
use crate::endpoint::{files, Client, ClientError, Endpoint};
use crate::provenance::build;

/// Alias namespace: batch id -> the `run` record written when its results were read.
pub const NS_BATCH: &str = "batch";
/// The `run` kind of a batch read.
pub const RUN_KIND: &str = "batch";
/// Alias namespace: attempt (its record's id) -> the `run` record of kind [`OPEN_KIND`]
/// stored before a request file is uploaded and its batch created: what it holds.
pub const NS_OPEN: &str = "batch-open";
/// The `run` kind of an attempt: the request file's BLAKE3, its requests' keys (a blob),
/// the endpoint and model.
pub const OPEN_KIND: &str = "batch-open";
/// Alias namespace: attempt -> the record that closed it (its batch read, or the attempt
/// itself when its batch was never created).
pub const NS_CLOSED: &str = "batch-closed";
/// Answers staged between commits when importing a result file.
const IMPORT_FLUSH: usize = 1024;

/// How the requests go.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The OpenAI Batch API of the endpoint.
    Api(ApiOptions),
    /// Write the request JSONL to this file (nothing is sent and no answer stored; the
    /// plan's own records, such as a sampling run's prompts, are).
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
            let answers = one_each(batch::parse_results(&bytes, &source)?);
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
            missing(&mut streamed, by_key.len(), &source, "not in the file");
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
            streamed.first_error.get_or_insert(ClientError::Unanswered {
                from: source.to_string(),
                msg,
            });
        }
    }
    Ok(())
}

/// Count `n` requests `source` gave no answer at all.
fn missing(streamed: &mut StreamReport, n: usize, source: &str, why: &str) {
    if n > 0 {
        streamed.failed += n;
        streamed.first_error.get_or_insert(ClientError::Unanswered {
            from: source.to_string(),
            msg: format!("{n} requests without an answer: {why}"),
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

/// A batch being followed: its attempt (the write-ahead record's alias name), its file's
/// BLAKE3 and the keys of its requests.
struct Live {
    batch: BatchObject,
    attempt: String,
    file_key: String,
    keys: Vec<String>,
}

/// What an attempt's write-ahead record says.
struct Attempt {
    file_key: String,
    keys: Vec<String>,
    endpoint: String,
    model: String,
}

fn attempt_of(store: &Store, rec: Id) -> Result<Attempt, emlab_store::Error> {
    let plan = store
        .get(rec)?
        .get("plan")
        .map(emlab_store::Value::to_json)
        .unwrap_or_default();
    let s = |k: &str| plan[k].as_str().unwrap_or_default().to_string();
    let keys = match s("keys").parse::<Id>() {
        Ok(blob) => String::from_utf8_lossy(&store.read_blob(blob)?)
            .lines()
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    };
    Ok(Attempt {
        file_key: s("input_blake3"),
        keys,
        endpoint: s("endpoint"),
        model: s("model"),
    })
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
    // Batches whose results are stored, and attempts closed (read or never created).
    let read: HashSet<String> = store
        .aliases(NS_BATCH)?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let closed: HashSet<String> = store
        .aliases(NS_CLOSED)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut live: Vec<Live> = Vec::new();
    // First the attempts an earlier run left open that hold requests planned here: their
    // batches are followed, and their requests are not sent again.
    let mut in_flight: HashSet<String> = HashSet::new();
    // The API lists batches without a metadata filter: listed once, when an attempt needs it.
    let mut listed: Option<Vec<BatchObject>> = None;
    for (name, rec) in store.aliases(NS_OPEN)? {
        if closed.contains(&name) {
            continue;
        }
        let a = attempt_of(store, rec)?;
        let ours = a.endpoint == client.endpoint.base_url
            && a.model == client.endpoint.model
            && a.keys.iter().any(|k| by_key.contains_key(k));
        if !ours {
            continue;
        }
        if listed.is_none() {
            listed = Some(batch::list(client).await?);
        }
        let batches = listed.as_deref().unwrap_or_default();
        match newest_unread(batches, &a.file_key, &read) {
            Some(b) => {
                note(&format!(
                    "batch {}: following it ({}, {} requests, sent by an earlier run)",
                    b.id,
                    b.status,
                    a.keys.len()
                ));
                report.followed += 1;
                in_flight.extend(a.keys.iter().cloned());
                live.push(Live {
                    batch: b,
                    attempt: name,
                    file_key: a.file_key,
                    keys: a.keys,
                });
            }
            None => {
                // Killed before its batch was created: its requests go out below.
                let mut staged = Batch::new();
                staged.alias(NS_CLOSED, &name, rec);
                store.write(staged)?;
            }
        }
    }
    let lines: Vec<(String, String)> = lines
        .into_iter()
        .filter(|(k, _)| !in_flight.contains(k))
        .collect();
    let text: Vec<String> = lines.iter().map(|(_, l)| l.clone()).collect();
    let chunks = batch::split(&text, opts.max_requests, opts.max_bytes).map_err(|msg| {
        ClientError::Protocol {
            url: client.endpoint.url("batches"),
            msg,
        }
    })?;
    let mut at = 0;
    for (bytes, count) in chunks {
        let keys: Vec<String> = lines[at..at + count]
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        at += count;
        let file_key = blake3::hash(&bytes).to_hex().to_string();
        // Write-ahead: the attempt is stored before anything is sent, so a run killed at
        // any point finds it.
        let blob = store.put_blob(keys.join("\n").as_bytes())?;
        let plan = json!({"input_blake3": file_key, "requests": count, "keys": blob.to_hex(),
            "endpoint": client.endpoint.base_url, "model": client.endpoint.model,
            "time": crate::util::time::now_rfc3339()});
        let rec = store.put(&build::run(OPEN_KIND, &plan, []))?;
        let attempt = rec.to_hex();
        store.set_alias(NS_OPEN, &attempt, rec)?;
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
                || async { Ok(newest_unread(&batch::list(client).await?, key, &read)) },
            )
            .await?;
        // Found: no unread batch of this file existed before, so the failed request made it.
        let how = if created {
            "created"
        } else {
            "created (found after its create request failed)"
        };
        note(&format!("batch {}: {how} ({count} requests)", b.id));
        report.created += 1;
        live.push(Live {
            batch: b,
            attempt,
            file_key,
            keys,
        });
    }
    let base = Duration::from_secs_f64(opts.poll_interval.clamp(0.001, 86_400.0));
    let mut wait = base;
    loop {
        let (done, pending): (Vec<Live>, Vec<Live>) =
            live.into_iter().partition(|l| l.batch.finished());
        for l in done {
            read_batch(
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

/// The newest of `batches` for request file `key` that is not in `read` (whose results are
/// stored).
fn newest_unread(
    batches: &[BatchObject],
    key: &str,
    read: &HashSet<String>,
) -> Option<BatchObject> {
    batches
        .iter()
        .rfind(|b| b.meta(batch::META_KEY) == Some(key) && !read.contains(&b.id))
        .cloned()
}

/// One answer per request: the first answer, or a later one when the first is an error (a
/// file holding both an output and an error file's lines).
fn one_each(answers: Vec<batch::Answer>) -> Vec<batch::Answer> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<batch::Answer> = Vec::new();
    for a in answers {
        match at.get(&a.custom_id) {
            Some(&i) => {
                if out[i].result.is_err() && a.result.is_ok() {
                    out[i] = a;
                }
            }
            None => {
                at.insert(a.custom_id.clone(), out.len());
                out.push(a);
            }
        }
    }
    out
}

/// The answers of a finished batch, or why they cannot be read: `Ok(Err(msg))` when they
/// never will be (a file the API no longer has, a line that is not a result), an error when
/// a rerun may succeed (the API unreachable).
async fn answers_of(
    client: &Client,
    b: &BatchObject,
) -> Result<Result<Vec<batch::Answer>, String>, ClientError> {
    let mut answers = Vec::new();
    for f in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
        let source = format!("batch {} (file {f})", b.id);
        let bytes = match files::content(client, f).await {
            Ok(bytes) => bytes,
            Err(e @ ClientError::Refused { .. }) => return Ok(Err(e.to_string())),
            Err(e) => return Err(e),
        };
        match batch::parse_results(&bytes, &source) {
            Ok(a) => answers.extend(a),
            Err(e) => return Ok(Err(e.to_string())),
        }
    }
    Ok(Ok(one_each(answers)))
}

/// Read a finished batch: its answers to the sink, its failures counted, the requests it
/// never answered counted failed, and its `run` record with the aliases that close it, all
/// in one commit. A batch whose results can never be read is closed the same way, its
/// requests failed: a rerun sends them again.
#[allow(clippy::too_many_arguments)]
async fn read_batch<T, S, E>(
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
    let (answers, unreadable) = match answers_of(client, b).await? {
        Ok(a) => (a, None),
        Err(msg) => (Vec::new(), Some(msg)),
    };
    let mine: HashSet<&str> = l.keys.iter().map(String::as_str).collect();
    let mut staged = Batch::new();
    let (mut answered, mut failed) = (0usize, 0usize);
    let mut seen: HashSet<String> = HashSet::new();
    for a in answers {
        if !mine.contains(a.custom_id.as_str()) {
            report.unmatched += 1;
            continue;
        }
        seen.insert(a.custom_id.clone());
        // Not planned here: stored since (e.g. by a direct run).
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
    let unanswered: Vec<&String> = l
        .keys
        .iter()
        .filter(|k| !seen.contains(*k) && by_key.contains_key(*k))
        .collect();
    for k in &unanswered {
        by_key.remove(*k);
    }
    let why = match &unreadable {
        Some(msg) => format!("its results cannot be read: {msg}"),
        None => b.error_message(),
    };
    missing(streamed, unanswered.len(), &source, &why);
    let plan = json!({"batch": b.id, "status": b.status, "endpoint": client.endpoint.base_url,
        "model": client.endpoint.model, "input_file_id": b.input_file_id,
        "input_blake3": l.file_key, "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id, "requests": l.keys.len(), "answered": answered,
        "failed": failed, "unanswered": unanswered.len(), "request_counts": b.request_counts,
        "unreadable": unreadable, "time": crate::util::time::now_rfc3339()});
    let id = store.stage(&mut staged, &build::run(RUN_KIND, &plan, []))?;
    staged.alias(NS_BATCH, &b.id, id);
    staged.alias(NS_CLOSED, &l.attempt, id);
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
