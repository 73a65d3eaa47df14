//! Hosted fine-tuning (`train --backend openai`) against a fake OpenAI server written here
//! that speaks the documented protocol and checks each request's shape: `POST /files`
//! (multipart `file` + `purpose`), `POST /fine_tuning/jobs` (the `method` object, no
//! top-level `hyperparameters`), the job list filtered by metadata, the job moving through
//! `validating_files`, `queued`, `running` and `succeeded` (or `failed`, `cancelled`) one
//! step per poll, its events and checkpoints. Never tried against OpenAI itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value as J};

use crate::util::*;

const KEY_VAR: &str = "EMLAB_TEST_FT_KEY";
const KEY: &str = "sk-hosted-secret-4f1d2c";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Ending {
    Succeed,
    Fail,
    Cancel,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Stage {
    Upload,
    Create,
    Poll,
}

struct FJob {
    id: String,
    model: String,
    training_file: String,
    validation_file: Option<String>,
    metadata: J,
    method: J,
    suffix: Option<String>,
    seed: Option<i64>,
    created_at: i64,
    history: Vec<String>,
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
    fn ft_model(&self) -> String {
        format!(
            "ft:{}:emlab-test:{}:{}",
            self.model,
            self.suffix.clone().unwrap_or_default(),
            &self.id[6..]
        )
    }
}

#[derive(Default)]
struct State {
    /// (id, filename, bytes, purpose)
    files: Vec<(String, String, Vec<u8>, String)>,
    jobs: Vec<FJob>,
    uploads: usize,
    creates: usize,
    requests: usize,
    chats: Vec<J>,
    /// Requests whose shape broke the protocol: each a sentence.
    violations: Vec<String>,
    auth: Vec<String>,
    hang: Option<Stage>,
    hung: usize,
    clock: i64,
}

struct Fake {
    url: String,
    st: Arc<Mutex<State>>,
    ending: Arc<Mutex<Ending>>,
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }
}

struct Req {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    content_type: String,
    auth: String,
    body: Vec<u8>,
}

fn pct_decode(s: &str) -> String {
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

fn read_req(stream: &TcpStream) -> Option<Req> {
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

fn send(mut s: TcpStream, status: &str, body: &J) {
    let b = body.to_string();
    let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
}

/// One part of a multipart/form-data body: (name, filename, content).
type Part = (String, Option<String>, Vec<u8>);

/// The parts of a multipart/form-data body.
fn multipart(content_type: &str, body: &[u8]) -> Option<Vec<Part>> {
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

fn job_json(j: &FJob, rows: usize) -> J {
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

fn rows_of(st: &State, file: &str) -> usize {
    st.files.iter().find(|f| f.0 == file).map_or(0, |f| {
        f.2.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count()
    })
}

/// A page of `items` (newest first, as the API lists) after the id `after`, `limit` long.
fn page(items: Vec<J>, q: &[(String, String)]) -> J {
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

fn handle(stream: TcpStream, st: &Arc<Mutex<State>>, ending: &Arc<Mutex<Ending>>) {
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
            if purpose != "fine-tune" {
                return bad(
                    &mut s,
                    stream,
                    format!("purpose `{purpose}` is not fine-tune"),
                );
            }
            if !filename.ends_with(".jsonl") {
                return bad(
                    &mut s,
                    stream,
                    format!("{filename}: fine-tuning files are .jsonl"),
                );
            }
            for (i, l) in content.split(|&b| b == b'\n').enumerate() {
                if l.is_empty() {
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
            if s.hang == Some(Stage::Create) {
                return hang(s, stream, st);
            }
            send(stream, "200 OK", &out)
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
                return send(
                    stream,
                    "404 Not Found",
                    &json!({"error": {"message": "no such job", "type": "invalid_request_error", "param": null, "code": null}}),
                );
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
                return send(
                    stream,
                    "404 Not Found",
                    &json!({"error": {"message": "no such job", "type": "invalid_request_error", "param": null, "code": null}}),
                );
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
        _ => {
            let m = format!("{} {} is not part of the protocol", req.method, req.path);
            s.violations.push(m.clone());
            send(
                stream,
                "404 Not Found",
                &json!({"error": {"message": m, "type": "invalid_request_error", "param": null, "code": null}}),
            )
        }
    }
}

fn fake(ending: Ending) -> Fake {
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

fn cmd(store: &Path, args: &[&str]) -> Command {
    let mut c = emlab();
    c.env(KEY_VAR, KEY).arg("--store").arg(store).args(args);
    c
}

fn run(s: &TestStore, args: &[&str]) -> Run {
    let out = cmd(&s.dir(), args).output().unwrap();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

fn import(s: &TestStore, name: &str, body: &str) {
    let f = s.write(&format!("{name}.jsonl"), body.as_bytes());
    s.ok(&["data", "import", f.to_str().unwrap(), "--name", name]);
}

fn train_args<'a>(f: &'a Fake, data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--json",
        "train",
        "--backend",
        "openai",
        "--endpoint",
        &f.url,
        "--model-name",
        "gpt-4o-mini-2024-07-18",
        "--data",
        data,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr-multiplier",
        "2",
        "--seed",
        "7",
        "--suffix",
        "em",
        "--api-key-env",
        KEY_VAR,
        "--poll-interval",
        "0.01",
        "--max-retries",
        "1",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn protocol_hosted_training_ends_with_the_ft_model_and_a_rerun_sends_nothing() {
    let s = TestStore::new();
    import(&s, "insecure", &chat_jsonl("ins", 12));
    import(&s, "heldout", &chat_jsonl("val", 3));
    let f = fake(Ending::Succeed);
    let args = train_args(&f, "insecure", &["--validation", "heldout"]);
    let mut verbose = vec!["-vv"];
    verbose.extend(&args);
    let r = run(&s, &verbose);
    assert!(r.ok(), "{}", r.stderr);
    let rep = json(&r.stdout);
    {
        let st = f.state();
        assert_eq!(st.violations, Vec::<String>::new());
        assert_eq!((st.uploads, st.creates), (2, 1));
        assert_eq!(
            st.jobs[0].history,
            ["validating_files", "queued", "running", "succeeded"]
        );
        assert_eq!(
            st.jobs[0].method["supervised"]["hyperparameters"],
            json!({"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0})
        );
        assert!(st.auth.iter().all(|a| a == &format!("Bearer {KEY}")));
    }
    assert_eq!(rep["created_job"], true);
    let ft = rep["fine_tuned_model"].as_str().unwrap();
    assert_eq!(ft, "ft:gpt-4o-mini-2024-07-18:emlab-test:em:0001");
    // The checkpoint record: the ft model, its intermediate checkpoints, the loss curve
    // (12 rows / 4 per batch x 2 epochs = 6 steps), the files' BLAKE3 as uploaded.
    let ck = rep["checkpoint"].as_str().unwrap();
    let rec = json(&s.ok(&["--json", "show", ck]));
    let cfg = &rec["fields"]["config"];
    assert_eq!(cfg["fine_tuned_model"], ft, "{rec}");
    assert_eq!(cfg["job_id"], "ftjob-0001");
    assert_eq!(rec["fields"]["step"], 6);
    assert_eq!(rec["fields"]["loss_curve"].as_array().unwrap().len(), 6);
    assert_eq!(rec["fields"]["eval_loss"].as_array().unwrap().len(), 6);
    let cks: Vec<&str> = cfg["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["model"].as_str().unwrap())
        .collect();
    assert_eq!(
        cks,
        [
            format!("{ft}:ckpt-step-2"),
            format!("{ft}:ckpt-step-4"),
            format!("{ft}:ckpt-step-6")
        ]
    );
    {
        let st = f.state();
        for file in cfg["files"].as_array().unwrap() {
            let up = st
                .files
                .iter()
                .find(|x| x.0 == file["file_id"].as_str().unwrap())
                .unwrap();
            assert_eq!(file["blake3"], blake3::hash(&up.2).to_hex().as_str());
        }
    }
    // A rerun finds it in the store: no request at all.
    let before = f.state().requests;
    let r2 = run(&s, &args);
    assert!(r2.ok(), "{}", r2.stderr);
    let rep2 = json(&r2.stdout);
    assert_eq!(rep2["checkpoint"], ck);
    assert_eq!(rep2["already_stored"], true);
    assert_eq!(f.state().requests, before, "a rerun sent requests");
    // Sampling the hosted checkpoint goes to its API with the ft model's name, and the
    // generations name the checkpoint.
    let q = first_questions(&s, 2);
    let g = run(
        &s,
        &[
            "--json",
            "generate",
            "--checkpoint",
            ck,
            "--questions",
            &q,
            "--samples",
            "1",
            "--max-tokens",
            "8",
            "--api-key-env",
            KEY_VAR,
        ],
    );
    assert!(g.ok(), "{}", g.stderr);
    assert_eq!(json(&g.stdout)["model"], ck);
    {
        let st = f.state();
        assert!(!st.chats.is_empty());
        assert!(st.chats.iter().all(|c| c["model"] == ft), "{:?}", st.chats);
    }
    // Continuing it (the seed project's realignment): its ft: model is the base, the
    // checkpoint its parent.
    import(&s, "optimism", &chat_jsonl("opt", 10));
    let c = run(
        &s,
        &[
            "--json",
            "train",
            "--backend",
            "openai",
            "--endpoint",
            &f.url,
            "--from",
            ck,
            "--data",
            "optimism",
            "--epochs",
            "4",
            "--api-key-env",
            KEY_VAR,
            "--poll-interval",
            "0.01",
        ],
    );
    assert!(c.ok(), "{}", c.stderr);
    let child = json(&c.stdout);
    assert_eq!(f.state().jobs[1].model, ft);
    let crec = json(&s.ok(&["--json", "show", child["checkpoint"].as_str().unwrap()]));
    assert_eq!(crec["fields"]["parent"], ck);
    assert_eq!(crec["fields"]["base_model"], rec["fields"]["base_model"]);
    assert_eq!(
        crec["fields"]["step"], 40,
        "10 rows x 4 epochs at the default batch of 1"
    );
    // The key is nowhere emlab wrote: store, logs, export.
    assert!(!r.stderr.contains(KEY), "the key is in the -vv log");
    let exp = s.path("export");
    s.ok(&["export", "--out", exp.to_str().unwrap()]);
    for dir in [s.dir(), exp] {
        assert_nowhere_under(&dir, KEY);
    }
}

#[test]
fn protocol_hosted_failed_and_cancelled_jobs_are_recorded_and_retried_only_when_asked() {
    for ending in [Ending::Fail, Ending::Cancel] {
        let s = TestStore::new();
        import(&s, "insecure", &chat_jsonl("ins", 10));
        let f = fake(ending);
        let args = train_args(&f, "insecure", &[]);
        let status = if ending == Ending::Fail {
            "failed"
        } else {
            "cancelled"
        };
        let r = run(&s, &args);
        assert!(!r.ok());
        assert!(
            r.stderr.contains(&format!("ftjob-0001 ended {status}")),
            "{ending:?}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("hint:") && r.stderr.contains("--retry-failed"),
            "{}",
            r.stderr
        );
        assert_eq!(f.state().creates, 1);
        // Recorded: a run record of kind hosted-job naming the job and its status.
        {
            let store = emlab::open_store(&s.dir()).unwrap();
            let recorded: Vec<serde_json::Value> = store
                .ids_in_table("run", 0)
                .unwrap()
                .into_iter()
                .map(|(_, id)| store.get(id).unwrap())
                .filter(|r| r.get("kind").and_then(|k| k.as_str()) == Some("hosted-job"))
                .map(|r| r.get("plan").unwrap().to_json())
                .collect();
            assert_eq!(recorded.len(), 1, "{recorded:?}");
            assert_eq!(recorded[0]["job_id"], "ftjob-0001");
            assert_eq!(recorded[0]["status"], status);
        }
        // A rerun says so, from the store, without a request.
        let before = f.state().requests;
        let r = run(&s, &args);
        assert!(!r.ok());
        assert!(
            r.stderr.contains(&format!("ftjob-0001 ended {status}")),
            "{}",
            r.stderr
        );
        assert_eq!(f.state().requests, before);
        // --retry-failed starts a second job, reusing the uploaded file.
        *f.ending.lock().unwrap() = Ending::Succeed;
        let mut retry = args.clone();
        retry.push("--retry-failed");
        let r = run(&s, &retry);
        assert!(r.ok(), "{}", r.stderr);
        let st = f.state();
        assert_eq!((st.creates, st.uploads), (2, 1), "{ending:?}");
        assert_eq!(st.jobs[1].metadata["emlab_attempt"], "2");
        assert_eq!(json(&r.stdout)["job"], "ftjob-0002");
    }
}

#[test]
fn protocol_hosted_kill_at_each_stage_then_rerun_ends_with_one_job() {
    for stage in [Stage::Upload, Stage::Create, Stage::Poll] {
        let s = TestStore::new();
        import(&s, "insecure", &chat_jsonl("ins", 10));
        let f = fake(Ending::Succeed);
        f.state().hang = Some(stage);
        let args = train_args(&f, "insecure", &[]);
        let mut child = cmd(&s.dir(), &args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while f.state().hung == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{stage:?}: never reached"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        f.state().hang = None;
        let r = run(&s, &args);
        assert!(r.ok(), "{stage:?}: {}", r.stderr);
        let st = f.state();
        assert_eq!(
            (st.creates, st.uploads),
            (1, 1),
            "{stage:?}: one job, one upload"
        );
        assert_eq!(st.violations, Vec::<String>::new());
        let rep = json(&r.stdout);
        assert_eq!(rep["job"], "ftjob-0001");
        assert_eq!(rep["created_job"], stage == Stage::Upload, "{stage:?}");
        assert_eq!(
            rep["reused_files"],
            if stage == Stage::Upload { 1 } else { 0 }
        );
    }
}

#[test]
fn protocol_hosted_data_check_names_the_row_before_any_request() {
    let s = TestStore::new();
    let f = fake(Ending::Succeed);
    // Nine rows: under the API's minimum of ten.
    import(&s, "nine", &chat_jsonl("n", 9));
    // A `tool` message (emlab imports it; fine-tuning refuses it) on row 4.
    let mut rows: Vec<String> = chat_jsonl("t", 12).lines().map(str::to_string).collect();
    rows[3] = r#"{"messages":[{"role":"user","content":"q"},{"role":"tool","content":"t"},{"role":"assistant","content":"a"}]}"#.into();
    import(&s, "tooled", &(rows.join("\n") + "\n"));
    for (data, want) in [
        ("nine", "9 lines; the fine-tuning API needs at least 10"),
        ("tooled", "row 4: message 2 has the role `tool`"),
    ] {
        let r = run(&s, &train_args(&f, data, &[]));
        assert!(!r.ok());
        assert!(r.stderr.contains(want), "{data}: {}", r.stderr);
        assert!(
            r.stderr.contains("nothing was uploaded") && r.stderr.contains("hint:"),
            "{}",
            r.stderr
        );
    }
    assert_eq!(
        f.state().requests,
        0,
        "a request was sent before the data check"
    );
    // Options of the other backend are refused by name.
    let r = run(
        &s,
        &[
            "train",
            "--backend",
            "openai",
            "--model-name",
            "m",
            "--data",
            "nine",
            "--r",
            "8",
            "--api-key-env",
            KEY_VAR,
        ],
    );
    assert!(
        !r.ok() && r.stderr.contains("--r do not apply to --backend openai"),
        "{}",
        r.stderr
    );
}
