//! A fake OpenAI server for the `protocol_*` tests of hosted fine-tuning and the Batch API,
//! written here, that speaks the documented protocol and checks each request's shape: `POST
//! /files` (multipart `file` + `purpose`; a batch file's lines), `POST /fine_tuning/jobs` (the
//! `method` object, no top-level `hyperparameters`), the job list filtered by metadata, a job
//! moving through `validating_files`, `queued`, `running` and `succeeded` (or `failed`,
//! `cancelled`) one step per poll, its events and checkpoints; `POST /batches`, a batch moving
//! through `validating`, `in_progress`, `finalizing` and `completed` (or `expired` with half
//! its answers), its output and error files; and chat completions. Never tried against
//! OpenAI itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value as J};

use crate::util::{emlab, Run, TestStore};

pub const KEY_VAR: &str = "EMLAB_TEST_FT_KEY";
pub const KEY: &str = "sk-hosted-secret-4f1d2c";

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Ending {
    Succeed,
    Fail,
    Cancel,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Stage {
    Upload,
    Create,
    Poll,
}

pub struct FJob {
    pub id: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub metadata: J,
    pub method: J,
    pub suffix: Option<String>,
    pub seed: Option<i64>,
    pub created_at: i64,
    pub history: Vec<String>,
}

impl FJob {
    fn status(&self) -> &str {
        self.history.last().unwrap()
    }
    fn steps(&self, rows: usize) -> i64 {
        let h = &self.method["supervised"]["hyperparameters"];
        let epochs = h["n_epochs"].as_i64().unwrap_or(1);
        let batch = h["batch_size"].as_i64().unwrap_or(1);
        ((rows as i64 + batch - 1) / batch) * epochs
    }
    pub fn ft_model(&self) -> String {
        format!(
            "ft:{}:emlab-test:{}:{}",
            self.model,
            self.suffix.clone().unwrap_or_default(),
            &self.id[6..]
        )
    }
}

#[derive(Default)]
pub struct State {
    /// (id, filename, bytes, purpose)
    pub files: Vec<(String, String, Vec<u8>, String)>,
    pub jobs: Vec<FJob>,
    pub uploads: usize,
    pub creates: usize,
    pub requests: usize,
    pub chats: Vec<J>,
    /// Requests whose shape broke the protocol: each a sentence.
    pub violations: Vec<String>,
    pub auth: Vec<String>,
    pub hang: Option<Stage>,
    pub hung: usize,
    pub clock: i64,
    pub batches: Vec<FBatch>,
    pub batch_creates: usize,
    /// Answer this many of the next job or batch creations with a 500 after making them
    /// (an answer lost on the way: a client that resends makes a second one).
    pub lose_create_answers: usize,
    /// Batches that stay `in_progress` while named here.
    pub slow: std::collections::HashSet<String>,
    /// Every `GET /batches/{id}`, in order, and the file downloads before each.
    pub retrieved: Vec<(String, usize)>,
    pub downloads: usize,
    /// How the next batches to finish end.
    pub batch_ending: BatchEnding,
}

/// How a batch ends once it has run.
#[derive(Clone, Copy, PartialEq, Debug, Default)]
pub enum BatchEnding {
    /// Every request answered.
    #[default]
    Complete,
    /// The completion window ran out with the first half answered (the rest in the error
    /// file with `batch_expired`, as the API writes them).
    ExpireHalf,
}

pub struct FBatch {
    pub id: String,
    pub input_file_id: String,
    pub metadata: J,
    pub created_at: i64,
    pub history: Vec<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: usize,
    pub completed: usize,
    pub failed: usize,
}

impl FBatch {
    pub fn status(&self) -> &str {
        self.history.last().unwrap()
    }
}

fn batch_json(b: &FBatch) -> J {
    json!({
        "id": b.id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": null,
        "input_file_id": b.input_file_id, "completion_window": "24h", "status": b.status(),
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.created_at, "in_progress_at": null, "expires_at": b.created_at + 86400,
        "completed_at": null, "failed_at": null, "expired_at": null,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
    })
}

/// The lines of a batch input file by the API's rules (one JSON object per line with
/// exactly `custom_id`, `method`, `url`, `body`; unique custom ids; one model; at most 50,000
/// lines and 200 MB), or the first rule broken.
pub fn check_batch_file(content: &[u8]) -> Result<Vec<J>, String> {
    if content.len() > 200_000_000 {
        return Err(format!("{} bytes: over 200 MB", content.len()));
    }
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut model: Option<String> = None;
    for (i, l) in content.split(|&b| b == b'\n').enumerate() {
        if l.is_empty() {
            continue;
        }
        let n = i + 1;
        let v: J = serde_json::from_slice(l).map_err(|e| format!("line {n}: not JSON: {e}"))?;
        let keys: std::collections::BTreeSet<&str> = v
            .as_object()
            .ok_or(format!("line {n}: not an object"))?
            .keys()
            .map(String::as_str)
            .collect();
        if keys != ["body", "custom_id", "method", "url"].into() {
            return Err(format!(
                "line {n}: keys {keys:?}, not custom_id, method, url, body"
            ));
        }
        let Some(id) = v["custom_id"].as_str() else {
            return Err(format!("line {n}: custom_id is not a string"));
        };
        if !ids.insert(id.to_string()) {
            return Err(format!("line {n}: custom_id {id} repeats"));
        }
        if v["method"] != "POST" || v["url"] != "/v1/chat/completions" {
            return Err(format!("line {n}: method {} url {}", v["method"], v["url"]));
        }
        let Some(m) = v["body"]["model"].as_str() else {
            return Err(format!("line {n}: body.model is not a string"));
        };
        if model.get_or_insert_with(|| m.to_string()) != m {
            return Err(format!("line {n}: a second model {m} in one batch file"));
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err("an empty batch file".into());
    }
    if out.len() > 50_000 {
        return Err(format!("{} requests: over 50,000", out.len()));
    }
    Ok(out)
}

pub struct Fake {
    pub url: String,
    pub st: Arc<Mutex<State>>,
    pub ending: Arc<Mutex<Ending>>,
}

impl Fake {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }
}

pub struct Req {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub content_type: String,
    pub auth: String,
    pub body: Vec<u8>,
}

pub fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn read_req(stream: &TcpStream) -> Option<Req> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect();
    let (mut len, mut chunked) = (0usize, false);
    let (mut content_type, mut auth) = (String::new(), String::new());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.parse().ok()?,
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "content-type" => content_type = v.to_string(),
            "authorization" => auth = v.to_string(),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(Req {
        method,
        path: path.trim_start_matches("/v1").to_string(),
        query,
        content_type,
        auth,
        body,
    })
}

pub fn send(mut s: TcpStream, status: &str, body: &J) {
    let b = body.to_string();
    let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
}

/// A 404 saying `msg`.
fn not_found(stream: TcpStream, msg: &str) {
    send(
        stream,
        "404 Not Found",
        &json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}}),
    )
}

/// A 500 for a request that was applied.
fn lost(stream: TcpStream) {
    send(
        stream,
        "500 Internal Server Error",
        &json!({"error": {"message": "the server had an error while processing your request", "type": "server_error", "param": null, "code": null}}),
    )
}

fn send_raw(mut s: TcpStream, status: &str, body: &[u8]) {
    let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(body);
}

/// Answer batch `k`'s requests (the first half only when it expires) into its output and
/// error files.
fn finish_batch(s: &mut State, k: usize, expire: bool) {
    let input = s
        .files
        .iter()
        .find(|f| f.0 == s.batches[k].input_file_id)
        .map(|f| f.2.clone())
        .unwrap_or_default();
    let lines = check_batch_file(&input).unwrap_or_default();
    let answered = if expire { lines.len() / 2 } else { lines.len() };
    let (mut out, mut err) = (String::new(), String::new());
    for (i, l) in lines.iter().enumerate() {
        let id = &l["custom_id"];
        if i < answered {
            s.chats.push(l["body"].clone());
            let body: J = serde_json::from_str(&crate::endpoint::completion(&l["body"])).unwrap();
            out += &format!(
                "{}\n",
                json!({"id": format!("batch_req_{i}"), "custom_id": id,
                "response": {"status_code": 200, "request_id": format!("req_{i}"), "body": body}, "error": null})
            );
        } else {
            err += &format!(
                "{}\n",
                json!({"id": format!("batch_req_{i}"), "custom_id": id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
            );
        }
    }
    let file = |s: &mut State, text: String| -> Option<String> {
        if text.is_empty() {
            return None;
        }
        let id = format!("file-out-{:04}", s.files.len() + 1);
        s.files.push((
            id.clone(),
            format!("{}_output.jsonl", s.batches[k].id),
            text.into_bytes(),
            "batch_output".into(),
        ));
        Some(id)
    };
    let o = file(s, out);
    let e = file(s, err);
    let b = &mut s.batches[k];
    b.output_file_id = o;
    b.error_file_id = e;
    b.completed = answered;
    b.failed = lines.len() - answered;
}

/// One part of a multipart/form-data body: (name, filename, content).
pub type Part = (String, Option<String>, Vec<u8>);

/// The parts of a multipart/form-data body.
pub fn multipart(content_type: &str, body: &[u8]) -> Option<Vec<Part>> {
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delim = format!("--{boundary}").into_bytes();
    let mut out = Vec::new();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + delim.len() <= body.len() {
        if body[i..i + delim.len()] == delim[..] {
            pieces.push(&body[start..i]);
            i += delim.len();
            start = i;
        } else {
            i += 1;
        }
    }
    for p in pieces.into_iter().skip(1) {
        let p = p.strip_prefix(b"\r\n")?;
        let split = p.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&p[..split]).to_string();
        let mut content = p[split + 4..].to_vec();
        if content.ends_with(b"\r\n") {
            content.truncate(content.len() - 2);
        }
        let field = |k: &str| {
            let at = head.find(&format!("{k}=\""))? + k.len() + 2;
            Some(head[at..].split('"').next()?.to_string())
        };
        out.push((field("name")?, field("filename"), content));
    }
    Some(out)
}

pub fn job_json(j: &FJob, rows: usize) -> J {
    let status = j.status();
    let done = status == "succeeded";
    json!({
        "object": "fine_tuning.job", "id": j.id, "model": j.model, "created_at": j.created_at,
        "status": status, "training_file": j.training_file, "validation_file": j.validation_file,
        "fine_tuned_model": if done { J::String(j.ft_model()) } else { J::Null },
        "error": if status == "failed" { json!({"code": "invalid_training_file", "message": "the training file was refused by the fake server", "param": "training_file"}) } else { J::Null },
        "metadata": j.metadata, "method": j.method, "seed": j.seed.unwrap_or(42),
        "trained_tokens": if done { json!(rows * 20) } else { J::Null },
        "hyperparameters": j.method["supervised"]["hyperparameters"],
        "organization_id": "org-test", "result_files": [], "finished_at": J::Null,
    })
}

pub fn rows_of(st: &State, file: &str) -> usize {
    st.files.iter().find(|f| f.0 == file).map_or(0, |f| {
        f.2.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count()
    })
}

/// A page of `items` (newest first, as the API lists) after the id `after`, `limit` long.
pub fn page(items: Vec<J>, q: &[(String, String)]) -> J {
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let limit: usize = get("limit").and_then(|l| l.parse().ok()).unwrap_or(20);
    let start = match get("after") {
        Some(a) => items
            .iter()
            .position(|i| i["id"] == a.as_str())
            .map_or(items.len(), |p| p + 1),
        None => 0,
    };
    let data: Vec<J> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + data.len() < items.len();
    json!({"object": "list", "data": data, "has_more": has_more})
}

pub fn handle(stream: TcpStream, st: &Arc<Mutex<State>>, ending: &Arc<Mutex<Ending>>) {
    let Some(req) = read_req(&stream) else { return };
    let mut s = st.lock().unwrap();
    s.requests += 1;
    s.clock += 1;
    s.auth.push(req.auth.clone());
    if req.auth != format!("Bearer {KEY}") {
        return send(
            stream,
            "401 Unauthorized",
            &json!({"error": {"message": "bad key", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
        );
    }
    let bad = |s: &mut State, stream: TcpStream, msg: String| {
        s.violations.push(msg.clone());
        send(
            stream,
            "400 Bad Request",
            &json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}}),
        );
    };
    let hang =
        |mut s: std::sync::MutexGuard<'_, State>, stream: TcpStream, st: &Arc<Mutex<State>>| {
            s.hung += 1;
            drop(s);
            // Answer nothing until released (the client is killed meanwhile).
            while st.lock().unwrap().hang.is_some() {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(stream);
        };
    // The answer to a creation that was made: lost, hung, or `out`.
    let created = |mut s: std::sync::MutexGuard<'_, State>, stream: TcpStream, out: J| {
        if s.lose_create_answers > 0 {
            s.lose_create_answers -= 1;
            return lost(stream);
        }
        if s.hang == Some(Stage::Create) {
            return hang(s, stream, st);
        }
        send(stream, "200 OK", &out)
    };
    let path: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), path.as_slice()) {
        ("POST", ["chat", "completions"]) => {
            let b: J = serde_json::from_slice(&req.body).unwrap_or_default();
            s.chats.push(b.clone());
            let c: J = serde_json::from_str(&crate::endpoint::completion(&b)).unwrap();
            send(stream, "200 OK", &c)
        }
        ("POST", ["files"]) => {
            if !req.content_type.starts_with("multipart/form-data") {
                return bad(
                    &mut s,
                    stream,
                    format!(
                        "POST /files must be multipart/form-data, not `{}`",
                        req.content_type
                    ),
                );
            }
            let Some(parts) = multipart(&req.content_type, &req.body) else {
                return bad(&mut s, stream, "unreadable multipart body".into());
            };
            let purpose = parts
                .iter()
                .find(|p| p.0 == "purpose")
                .map(|p| String::from_utf8_lossy(&p.2).to_string());
            let file = parts.iter().find(|p| p.0 == "file");
            let (Some(purpose), Some((_, Some(filename), content))) = (purpose, file) else {
                return bad(
                    &mut s,
                    stream,
                    "POST /files needs the fields `file` (with a filename) and `purpose`".into(),
                );
            };
            if purpose != "fine-tune" && purpose != "batch" {
                return bad(
                    &mut s,
                    stream,
                    format!("purpose `{purpose}` is neither fine-tune nor batch"),
                );
            }
            if !filename.ends_with(".jsonl") {
                return bad(
                    &mut s,
                    stream,
                    format!("{filename}: fine-tuning files are .jsonl"),
                );
            }
            if purpose == "batch" {
                if let Err(e) = check_batch_file(content) {
                    return bad(&mut s, stream, format!("{filename}: {e}"));
                }
            }
            for (i, l) in content.split(|&b| b == b'\n').enumerate() {
                if l.is_empty() || purpose == "batch" {
                    continue;
                }
                let v: J = serde_json::from_slice(l).unwrap_or_default();
                if !v["messages"].is_array() {
                    return bad(&mut s, stream, format!("line {}: no messages", i + 1));
                }
            }
            s.uploads += 1;
            let id = format!("file-{:04}", s.uploads);
            let obj = json!({"object": "file", "id": id, "bytes": content.len(), "created_at": s.clock, "filename": filename, "purpose": purpose, "status": "processed"});
            s.files
                .push((id, filename.clone(), content.clone(), purpose));
            if s.hang == Some(Stage::Upload) {
                return hang(s, stream, st);
            }
            send(stream, "200 OK", &obj)
        }
        ("GET", ["files"]) => {
            let purpose = req
                .query
                .iter()
                .find(|q| q.0 == "purpose")
                .map(|q| q.1.clone());
            let items: Vec<J> = s.files.iter().rev()
                .filter(|f| purpose.as_ref().is_none_or(|p| &f.3 == p))
                .map(|f| json!({"object": "file", "id": f.0, "bytes": f.2.len(), "created_at": 0, "filename": f.1, "purpose": f.3}))
                .collect();
            send(stream, "200 OK", &page(items, &req.query))
        }
        ("POST", ["fine_tuning", "jobs"]) => {
            let b: J = match serde_json::from_slice(&req.body) {
                Ok(b) => b,
                Err(e) => return bad(&mut s, stream, format!("job body is not JSON: {e}")),
            };
            let known = |s: &State, f: &J| {
                f.as_str()
                    .is_some_and(|f| s.files.iter().any(|x| x.0 == f && x.3 == "fine-tune"))
            };
            let mut why = Vec::new();
            if !b["model"].is_string() {
                why.push("`model` must be a string".to_string());
            }
            if !known(&s, &b["training_file"]) {
                why.push(format!(
                    "training_file {} is not an uploaded fine-tune file",
                    b["training_file"]
                ));
            }
            if !b["validation_file"].is_null() && !known(&s, &b["validation_file"]) {
                why.push("unknown validation_file".into());
            }
            if b.get("hyperparameters").is_some() {
                why.push("top-level `hyperparameters` is deprecated: use method.supervised.hyperparameters".into());
            }
            if b["method"]["type"] != "supervised"
                || !b["method"]["supervised"]["hyperparameters"].is_object()
            {
                why.push(format!("`method` must be {{type: supervised, supervised: {{hyperparameters: {{...}}}}}}, got {}", b["method"]));
            }
            if let Some(m) = b["metadata"].as_object() {
                if m.values().any(|v| !v.is_string()) {
                    why.push("metadata values must be strings".into());
                }
            }
            if !why.is_empty() {
                return bad(&mut s, stream, why.join("; "));
            }
            s.creates += 1;
            let j = FJob {
                id: format!("ftjob-{:04}", s.creates),
                model: b["model"].as_str().unwrap().into(),
                training_file: b["training_file"].as_str().unwrap().into(),
                validation_file: b["validation_file"].as_str().map(str::to_string),
                metadata: b["metadata"].clone(),
                method: b["method"].clone(),
                suffix: b["suffix"].as_str().map(str::to_string),
                seed: b["seed"].as_i64(),
                created_at: s.clock,
                history: vec!["validating_files".into()],
            };
            let rows = rows_of(&s, &j.training_file);
            let out = job_json(&j, rows);
            s.jobs.push(j);
            created(s, stream, out)
        }
        ("GET", ["fine_tuning", "jobs"]) => {
            let filters: Vec<(String, String)> = req
                .query
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.strip_prefix("metadata[")?.strip_suffix(']')?.to_string(),
                        v.clone(),
                    ))
                })
                .collect();
            let items: Vec<J> = s
                .jobs
                .iter()
                .rev()
                .filter(|j| filters.iter().all(|(k, v)| j.metadata[k] == v.as_str()))
                .map(|j| job_json(j, rows_of(&s, &j.training_file)))
                .collect();
            send(stream, "200 OK", &page(items, &req.query))
        }
        ("GET", ["fine_tuning", "jobs", id]) => {
            let end = *ending.lock().unwrap();
            let Some(k) = s.jobs.iter().position(|j| j.id == *id) else {
                return not_found(stream, "no such job");
            };
            if s.hang == Some(Stage::Poll) {
                return hang(s, stream, st);
            }
            let j = &mut s.jobs[k];
            let next = match j.status() {
                "validating_files" => Some("queued"),
                "queued" => Some("running"),
                "running" => Some(match end {
                    Ending::Succeed => "succeeded",
                    Ending::Fail => "failed",
                    Ending::Cancel => "cancelled",
                }),
                _ => None,
            };
            if let Some(n) = next {
                j.history.push(n.into());
            }
            let j = &s.jobs[k];
            let out = job_json(j, rows_of(&s, &j.training_file));
            send(stream, "200 OK", &out)
        }
        ("GET", ["fine_tuning", "jobs", id, what]) => {
            let Some(j) = s.jobs.iter().find(|j| j.id == *id) else {
                return not_found(stream, "no such job");
            };
            let rows = rows_of(&s, &j.training_file);
            let steps = if j.status() == "succeeded" {
                j.steps(rows)
            } else {
                0
            };
            let valid = j.validation_file.is_some();
            let mut items: Vec<J> = Vec::new();
            if *what == "events" {
                items.push(json!({"object": "fine_tuning.job.event", "id": format!("ftevent-{}-0", j.id), "created_at": j.created_at, "level": "info", "message": "Created fine-tuning job", "data": {}, "type": "message"}));
                for step in 1..=steps {
                    let mut d = json!({"step": step, "train_loss": 2.0 / step as f64, "total_steps": steps, "train_mean_token_accuracy": 0.5});
                    if valid {
                        d["valid_loss"] = json!(2.5 / step as f64);
                    }
                    items.push(json!({"object": "fine_tuning.job.event", "id": format!("ftevent-{}-{step}", j.id), "created_at": j.created_at + step, "level": "info", "message": format!("Step {step}/{steps}: training loss={:.2}", 2.0 / step as f64), "data": d, "type": "metrics"}));
                }
            } else if *what == "checkpoints" {
                for step in (1..=steps).filter(|s| s % 2 == 0 || *s == steps) {
                    // Without a validation file the metrics carry no valid_* fields: the
                    // case async-openai's types could not read.
                    let mut m = json!({"step": step, "train_loss": 2.0 / step as f64, "train_mean_token_accuracy": 0.5});
                    if valid {
                        m["valid_loss"] = json!(2.5 / step as f64);
                    }
                    items.push(json!({"object": "fine_tuning.job.checkpoint", "id": format!("ftckpt-{}-{step}", j.id), "created_at": j.created_at + step, "fine_tuned_model_checkpoint": format!("{}:ckpt-step-{step}", j.ft_model()), "step_number": step, "metrics": m, "fine_tuning_job_id": j.id}));
                }
            }
            items.reverse();
            send(stream, "200 OK", &page(items, &req.query))
        }
        ("GET", ["files", id, "content"]) => match s.files.iter().find(|f| f.0 == *id) {
            Some(f) => {
                let body = f.2.clone();
                s.downloads += 1;
                send_raw(stream, "200 OK", &body)
            }
            None => not_found(stream, "no such file"),
        },
        ("POST", ["batches"]) => {
            let b: J = match serde_json::from_slice(&req.body) {
                Ok(b) => b,
                Err(e) => return bad(&mut s, stream, format!("batch body is not JSON: {e}")),
            };
            let mut why = Vec::new();
            let file = b["input_file_id"].as_str().unwrap_or("");
            if !s.files.iter().any(|f| f.0 == file && f.3 == "batch") {
                why.push(format!(
                    "input_file_id {} is not an uploaded batch file",
                    b["input_file_id"]
                ));
            }
            if b["endpoint"] != "/v1/chat/completions" {
                why.push(format!(
                    "endpoint {} is not /v1/chat/completions",
                    b["endpoint"]
                ));
            }
            if b["completion_window"] != "24h" {
                why.push(format!(
                    "completion_window {} is not 24h",
                    b["completion_window"]
                ));
            }
            if let Some(m) = b.get("metadata").filter(|m| !m.is_null()) {
                let ok = m.as_object().is_some_and(|m| {
                    m.len() <= 16
                        && m.iter().all(|(k, v)| {
                            k.len() <= 64 && v.as_str().is_some_and(|v| v.len() <= 512)
                        })
                });
                if !ok {
                    why.push(
                        "metadata: at most 16 string pairs (keys 64, values 512 characters)".into(),
                    );
                }
            }
            if !why.is_empty() {
                return bad(&mut s, stream, why.join("; "));
            }
            s.batch_creates += 1;
            let total = rows_of(&s, file);
            let fb = FBatch {
                id: format!("batch_{:04}", s.batch_creates),
                input_file_id: file.to_string(),
                metadata: b["metadata"].clone(),
                created_at: s.clock,
                history: vec!["validating".into()],
                output_file_id: None,
                error_file_id: None,
                total,
                completed: 0,
                failed: 0,
            };
            let out = batch_json(&fb);
            s.batches.push(fb);
            created(s, stream, out)
        }
        ("GET", ["batches"]) => {
            if req.query.iter().any(|(k, _)| k.starts_with("metadata")) {
                let m = "GET /batches takes no metadata filter".to_string();
                return bad(&mut s, stream, m);
            }
            let items: Vec<J> = s.batches.iter().rev().map(batch_json).collect();
            send(stream, "200 OK", &page(items, &req.query))
        }
        ("GET", ["batches", id]) => {
            let Some(k) = s.batches.iter().position(|b| b.id == *id) else {
                return not_found(stream, "no such batch");
            };
            if s.hang == Some(Stage::Poll) {
                return hang(s, stream, st);
            }
            let seen = (id.to_string(), s.downloads);
            s.retrieved.push(seen);
            let slow = s.slow.contains(*id) && s.batches[k].status() == "in_progress";
            let next = match s.batches[k].status() {
                _ if slow => None,
                "validating" => Some("in_progress"),
                "in_progress" => Some("finalizing"),
                "finalizing" => Some(match s.batch_ending {
                    BatchEnding::Complete => "completed",
                    BatchEnding::ExpireHalf => "expired",
                }),
                _ => None,
            };
            if let Some(n) = next {
                if n == "completed" || n == "expired" {
                    finish_batch(&mut s, k, n == "expired");
                }
                s.batches[k].history.push(n.into());
            }
            let out = batch_json(&s.batches[k]);
            send(stream, "200 OK", &out)
        }
        _ => {
            let m = format!("{} {} is not part of the protocol", req.method, req.path);
            s.violations.push(m.clone());
            not_found(stream, &m)
        }
    }
}

pub fn fake(ending: Ending) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let st = Arc::new(Mutex::new(State::default()));
    let ending = Arc::new(Mutex::new(ending));
    let (s2, e2) = (st.clone(), ending.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (s3, e3) = (s2.clone(), e2.clone());
            std::thread::spawn(move || handle(stream, &s3, &e3));
        }
    });
    Fake { url, st, ending }
}

/// `emlab --store STORE ARGS` with the fake's API key in [`KEY_VAR`].
pub fn cmd(store: &Path, args: &[&str]) -> Command {
    let mut c = emlab();
    c.env(KEY_VAR, KEY).arg("--store").arg(store).args(args);
    c
}

/// [`cmd`], run to its end.
pub fn run(s: &TestStore, args: &[&str]) -> Run {
    let out = cmd(&s.dir(), args).output().unwrap();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

/// Run `emlab ARGS` on `store` with the fake's key, and SIGKILL it once `reached()` holds
/// (failing after a minute).
pub fn kill_when(store: &Path, args: &[&str], reached: impl Fn() -> bool, what: &str) {
    let mut child = cmd(store, args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !reached() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: never reached"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}
