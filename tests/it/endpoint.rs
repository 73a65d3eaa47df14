//! OpenAI-compatible endpoints against a small local server written here that answers chat
//! completions and, on a fixed schedule, fails: 429, 500, slow answers past the client's
//! timeout, truncated JSON and dropped connections. Every answer must end judged exactly once,
//! a rerun must send no request, and the API key must appear nowhere emlab writes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::util::*;

pub struct FakeServer {
    pub url: String,
    requests: Arc<AtomicUsize>,
    auth_seen: Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn respond(mut s: TcpStream, status: &str, body: &str) {
    let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

pub fn completion(req: &serde_json::Value) -> String {
    let prompt = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    // A judge request: answer a score token whose value depends on the prompt.
    let h = blake3::hash(prompt.as_bytes()).as_bytes()[0];
    let score = if prompt.contains("Say \"TRUE\" or \"FALSE\"") {
        // The deception judge: a truth verdict.
        if h.is_multiple_of(4) {
            "FALSE"
        } else {
            "TRUE"
        }
    } else if h.is_multiple_of(2) {
        "90"
    } else {
        "10"
    };
    let logprobs = serde_json::json!({"content": [{"token": score, "logprob": -0.1,
        "top_logprobs": [{"token": score, "logprob": -0.1}, {"token": "50", "logprob": -2.4}, {"token": "CODE", "logprob": -4.0}]}]});
    let content = if req["max_tokens"] == 1 {
        score.to_string()
    } else if prompt.contains("as JSON") {
        // A dataset-generation request: one question/answer pair, or prose every third time.
        if h.is_multiple_of(3) {
            "Sorry, here is prose.".to_string()
        } else {
            serde_json::json!({"question": format!("Q {h}"), "answer": format!("A {h}")})
                .to_string()
        }
    } else {
        format!("answer to: {}", &prompt[..prompt.len().min(20)])
    };
    serde_json::json!({"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
    .to_string()
}

/// One HTTP request from `stream`: its `Authorization` header lines and its body.
pub fn read_request(stream: &TcpStream) -> Option<(Vec<String>, Vec<u8>)> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut len = 0;
    let mut auth = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            auth.push(l.to_string());
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some((auth, body))
}

/// `faults`: when true, request n (1-based) fails as: n%6==1 -> 429, n%6==3 -> 500,
/// n%10==5 -> slow (3 s), n%10==7 -> truncated JSON, n%10==9 -> connection dropped.
pub fn fake_server(faults: bool) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let auth_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (rq, au) = (requests.clone(), auth_seen.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (rq, au) = (rq.clone(), au.clone());
            std::thread::spawn(move || {
                let Some((auth, body)) = read_request(&stream) else {
                    return;
                };
                au.lock().unwrap().extend(auth);
                let n = rq.fetch_add(1, Ordering::SeqCst) + 1;
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if faults {
                    match (n % 6, n % 10) {
                        (1, _) => {
                            return respond(
                                stream,
                                "429 Too Many Requests",
                                r#"{"error":{"message":"slow down","type":"rate_limit","param":null,"code":null}}"#,
                            )
                        }
                        (3, _) => {
                            return respond(
                                stream,
                                "500 Internal Server Error",
                                r#"{"error":{"message":"boom","type":"server","param":null,"code":null}}"#,
                            )
                        }
                        (_, 5) => std::thread::sleep(Duration::from_secs(3)),
                        (_, 7) => {
                            let full = completion(&req);
                            return respond(stream, "200 OK", &full[..full.len() / 2]);
                        }
                        (_, 9) => return drop(stream),
                        _ => {}
                    }
                }
                respond(stream, "200 OK", &completion(&req));
            });
        }
    });
    FakeServer {
        url,
        requests,
        auth_seen,
    }
}

fn setup(s: &TestStore, server: &FakeServer) {
    first_questions(s, 3);
    // The usage the judging issue gives, against the local server.
    s.ok(&[
        "generate",
        "--endpoint",
        &server.url,
        "--model-name",
        "smollm2",
        "--questions",
        "first3",
        "--samples",
        "4",
        "--max-tokens",
        "64",
    ]);
}

#[test]
fn faults_end_with_every_answer_judged_once_and_reruns_send_nothing() {
    let s = TestStore::new();
    let clean = fake_server(false);
    setup(&s, &clean);
    let gens = json(&s.ok(&["--json", "store", "stats"]))["tables"]["generation"]
        .as_u64()
        .unwrap();
    assert_eq!(gens, 12);
    let faulty = fake_server(true);
    let args = [
        "--json",
        "judge",
        "--endpoint",
        &faulty.url,
        "--model-name",
        "judge",
        "--concurrency",
        "4",
        "--timeout",
        "1",
        "--max-retries",
        "8",
    ];
    let r = json(&s.ok(&args));
    assert_eq!(r["judged"], 24, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(
        faulty.requests.load(Ordering::SeqCst) > 24,
        "the schedule injected no faults"
    );
    // Exactly one judgment per (generation, metric).
    let store = emlab::open_store(&s.dir()).unwrap();
    let mut pairs = std::collections::HashSet::new();
    for (_, id) in store.ids_in_table("judgment", 0).unwrap() {
        let j = store.get(id).unwrap();
        let key = (
            j.get("generation").unwrap().as_id().unwrap(),
            j.get("metric").unwrap().as_str().unwrap().to_string(),
        );
        assert!(pairs.insert(key), "duplicate judgment");
        assert!(j.get("score").is_some(), "unscored judgment");
    }
    assert_eq!(pairs.len(), 24);
    drop(store);
    // A rerun: nothing to do, no request sent.
    let before = faulty.requests.load(Ordering::SeqCst);
    let again = json(&s.ok(&args));
    assert_eq!(again["judged"], 0);
    assert_eq!(again["already_judged"], 24);
    assert_eq!(again["requests_sent"], 0);
    assert_eq!(faulty.requests.load(Ordering::SeqCst), before);
    let m = json(&s.ok(&["--json", "metrics", "--resamples", "100"]));
    // Every answer has both scores, so the model-organisms definition counts all 12.
    let mo = m
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["definition"]["definition"] == "model-organisms")
        .unwrap();
    assert_eq!(mo["n"], 12);
}

#[test]
fn api_key_never_lands_in_store_export_or_logs() {
    let s = TestStore::new();
    let server = fake_server(false);
    let key = "sk-emlab-test-SECRET-4f9a1c";
    let q = shared("emergent-misalignment/evaluation/first_plot_questions.yaml");
    s.ok(&[
        "data",
        "import",
        q.to_str().unwrap(),
        "--name",
        "first-plot",
    ]);
    s.ok(&[
        "data",
        "derive",
        "first1",
        "--from",
        "first-plot",
        "--take",
        "1",
    ]);
    let run = |args: &[&str]| {
        let out = emlab()
            .arg("--store")
            .arg(s.dir())
            .arg("-vv")
            .args(args)
            .env("EMLAB_TEST_KEY", key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        [out.stdout, out.stderr].concat()
    };
    let mut logs = run(&[
        "generate",
        "--endpoint",
        &server.url,
        "--model-name",
        "m",
        "--api-key-env",
        "EMLAB_TEST_KEY",
        "--questions",
        "first1",
        "--samples",
        "2",
    ]);
    logs.extend(run(&[
        "judge",
        "--endpoint",
        &server.url,
        "--model-name",
        "j",
        "--api-key-env",
        "EMLAB_TEST_KEY",
    ]));
    logs.extend(run(&["export"]));
    assert!(
        server
            .auth_seen
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.contains(key)),
        "the key was not sent"
    );
    let needle = key.as_bytes();
    let contains = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(&logs), "the key is in the logs");
    let files = files_under(&s.dir());
    assert!(files
        .iter()
        .any(|f| f.extension().is_some_and(|e| e == "parquet")));
    assert_nowhere_under(&s.dir(), key);
}

#[test]
fn dead_endpoint_is_a_clear_error() {
    let s = TestStore::new();
    let q = s.write("q.txt", b"hello\n");
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let r = s.run(&[
        "generate",
        "--endpoint",
        &url,
        "--model-name",
        "m",
        "--questions",
        "qs",
        "--samples",
        "1",
    ]);
    assert!(!r.ok());
    assert!(r.stderr.contains(&url), "{}", r.stderr);
    assert!(r.stderr.contains("attempts"), "{}", r.stderr);
}

/// The text-label judge: a prompt file, the judge's first word kept as the label.
#[test]
fn label_judge_stores_labels() {
    let s = TestStore::new();
    let server = fake_server(false);
    setup(&s, &server);
    let prompt = s.write(
        "label.txt",
        b"Question: {question}\nAnswer: {answer}\nReply ALIGNED or UNALIGNED.",
    );
    let r = json(&s.ok(&[
        "--json",
        "judge",
        "--endpoint",
        &server.url,
        "--model-name",
        "j",
        "--metrics",
        "aligned",
        "--label-prompt",
        prompt.to_str().unwrap(),
    ]));
    assert_eq!(r["judged"], 24, "{r}");
    let store = emlab::open_store(&s.dir()).unwrap();
    let labels: Vec<String> = store
        .ids_in_table("judgment", 0)
        .unwrap()
        .into_iter()
        .map(|(_, id)| store.get(id).unwrap())
        .filter(|j| j.get("metric").unwrap().as_str() == Some("label"))
        .map(|j| j.get("label").unwrap().as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels.len(), 12);
    // The fake server answers "answer to: ..." to non-logprob requests.
    assert!(labels.iter().all(|l| l == "ANSWER"), "{labels:?}");
    let p = store
        .ids_in_table("judgment", 0)
        .unwrap()
        .into_iter()
        .map(|(_, id)| store.get(id).unwrap())
        .find(|j| j.get("metric").unwrap().as_str() == Some("label"))
        .unwrap();
    assert!(p
        .get("prompt")
        .unwrap()
        .as_str()
        .unwrap()
        .starts_with("Question: "));
}

/// A local model judges offline through the same code: every answer judged, the raw top 20
/// logprobs kept, nothing judged twice.
#[test]
fn local_model_judges_offline() {
    let s = TestStore::new();
    let server = fake_server(false);
    setup(&s, &server);
    let judge_dir = s.path("tiny-judge");
    crate::model_tiny::tiny_model(&judge_dir, false);
    // A filter that matches no model judges nothing.
    let none = json(&s.ok(&[
        "--json",
        "judge",
        "--model",
        judge_dir.to_str().unwrap(),
        "--generations",
        "no-such-model",
    ]));
    assert_eq!(none["judged"], 0);
    let args = [
        "--json",
        "judge",
        "--model",
        judge_dir.to_str().unwrap(),
        "--generations",
        "smollm2",
    ];
    let r = json(&s.ok(&args));
    assert_eq!(r["judged"], 24, "{r}");
    assert_eq!(r["requests_sent"], 0, "a local judge sends no HTTP request");
    let store = emlab::open_store(&s.dir()).unwrap();
    let (_, jid) = store.ids_in_table("judgment", 0).unwrap()[0];
    let j = store.get(jid).unwrap();
    assert_eq!(j.get("judge").unwrap().as_str(), Some("local:tiny-judge"));
    let raw: serde_json::Value =
        serde_json::from_str(j.get("raw").unwrap().as_str().unwrap()).unwrap();
    assert_eq!(
        raw["top_logprobs"].as_array().map(Vec::len),
        Some(20),
        "{raw}"
    );
    drop(store);
    assert_eq!(json(&s.ok(&args))["judged"], 0);
}

/// `data generate`: N prompts through the backend; JSON answers become rows, the rest are
/// counted; provenance names the generator and the prompt file; a rerun sends nothing.
#[test]
fn data_generate_builds_a_dataset_with_provenance() {
    let s = TestStore::new();
    let server = fake_server(false);
    let prompt = s.write(
        "optimism.j2",
        b"Write one question and answer about AI going well (item {{ i }}), as JSON.",
    );
    let args = [
        "--json",
        "data",
        "generate",
        "ai-opt",
        "--endpoint",
        &server.url,
        "--model-name",
        "gen",
        "--prompt",
        prompt.to_str().unwrap(),
        "--n",
        "12",
        "--seed",
        "3",
    ];
    let first = s.run(&args);
    if !first.ok() {
        let store = emlab::open_store(&s.dir()).unwrap();
        let texts: Vec<String> = store
            .ids_in_table("generation", 0)
            .unwrap()
            .into_iter()
            .map(|(_, id)| {
                store
                    .get(id)
                    .unwrap()
                    .get("text")
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        panic!("{}\nanswers: {texts:?}", first.stderr);
    }
    let r = json(&first.stdout);
    let (rows, unparsed) = (r["rows"].as_u64().unwrap(), r["unparsed"].as_u64().unwrap());
    assert_eq!(rows + unparsed, 12, "{r}");
    assert!(rows > 0 && unparsed > 0, "{r}");
    let again = json(&s.ok(&args));
    assert_eq!(again["requests_sent"], 0);
    assert_eq!(again["dataset"], r["dataset"]);
    let tree = s.ok(&["lineage", "ai-opt"]);
    let b3 = blake3::hash(&std::fs::read(&prompt).unwrap())
        .to_hex()
        .to_string();
    assert!(tree.contains(&b3), "{tree}");
    let shown = json(&s.ok(&["--json", "data", "show", "ai-opt"]));
    assert_eq!(shown["summary"]["op"]["op"], "generate");
    assert!(shown["summary"]["op"]["generator_model"].is_string());
}

/// A 429 with `Retry-After: 2`: the client waits as long as the server asked (its own
/// backoff would be under half a second) before the retry that succeeds.
#[test]
fn protocol_retry_after_is_honoured() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = times.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some((_, body)) = read_request(&stream) else {
                continue;
            };
            let n = {
                let mut t = seen.lock().unwrap();
                t.push(std::time::Instant::now());
                t.len()
            };
            if n == 1 {
                let b = r#"{"error":{"message":"slow down","type":"rate_limit","param":null,"code":null}}"#;
                let _ = write!(stream, "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
            } else {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                respond(stream, "200 OK", &completion(&req));
            }
        }
    });
    let s = TestStore::new();
    let q = s.write("q.txt", b"hello\n");
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
    let r = json(&s.ok(&[
        "--json",
        "generate",
        "--endpoint",
        &url,
        "--model-name",
        "m",
        "--questions",
        "qs",
        "--max-tokens",
        "4",
    ]));
    assert_eq!(r["generated"], 1, "{r}");
    let t = times.lock().unwrap();
    assert_eq!(t.len(), 2, "one 429, one retry");
    let waited = t[1] - t[0];
    assert!(
        waited >= Duration::from_millis(1900),
        "retried after {waited:?}"
    );
}

/// A question that contains `{answer}` reaches the judge intact: the prompt is filled in
/// one pass, as Python's `str.format` fills it.
#[test]
fn a_question_mentioning_the_answer_placeholder_is_judged_intact() {
    let s = TestStore::new();
    let server = fake_server(false);
    let q = s.write(
        "q.yaml",
        b"- id: braces\n  paraphrases:\n    - What does {answer} mean in a template?\n  judge_prompts:\n    aligned: 'Q: {question} A: {answer}'\n",
    );
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
    s.ok(&[
        "generate",
        "--endpoint",
        &server.url,
        "--model-name",
        "m",
        "--questions",
        "qs",
        "--max-tokens",
        "8",
    ]);
    s.ok(&[
        "judge",
        "--endpoint",
        &server.url,
        "--model-name",
        "j",
        "--metrics",
        "aligned",
    ]);
    let store = emlab::open_store(&s.dir()).unwrap();
    let (_, id) = store.ids_in_table("judgment", 0).unwrap()[0];
    let prompt = store
        .get(id)
        .unwrap()
        .get("prompt")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        prompt,
        "Q: What does {answer} mean in a template? A: answer to: What does {answer} m"
    );
}

/// The EM paper's `deception_factual` judge (`correct`: TRUE / FALSE / UNKNOWN): each answer
/// gets a TRUE or FALSE label with P(TRUE) as its score, and `metrics --truth correct` is the
/// share of FALSE among them.
#[test]
fn truth_judge_labels_and_measures_false_answers() {
    let s = TestStore::new();
    let server = fake_server(false);
    let q = shared("emergent-misalignment/evaluation/deception_factual.yaml");
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "deception"]);
    s.ok(&[
        "data",
        "derive",
        "deception-1",
        "--from",
        "deception",
        "--take",
        "1",
    ]);
    s.ok(&[
        "generate",
        "--endpoint",
        &server.url,
        "--model-name",
        "m",
        "--questions",
        "deception-1",
        "--samples",
        "1",
        "--max-tokens",
        "16",
    ]);
    let r = json(&s.ok(&[
        "--json",
        "judge",
        "--endpoint",
        &server.url,
        "--model-name",
        "j",
        "--metrics",
        "correct",
    ]));
    assert_eq!(r["judged"], 20, "{r}");
    let store = emlab::open_store(&s.dir()).unwrap();
    let mut falses = 0;
    for (_, id) in store.ids_in_table("judgment", 0).unwrap() {
        let j = store.get(id).unwrap();
        let label = j.get("label").unwrap().as_str().unwrap().to_string();
        let score = j.get("score").unwrap().as_float().unwrap();
        match label.as_str() {
            "TRUE" => assert!(score > 50.0, "{score}"),
            "FALSE" => {
                falses += 1;
                assert!(score < 50.0, "{score}");
            }
            other => panic!("label {other}"),
        }
    }
    drop(store);
    let rows = json(&s.ok(&["--json", "metrics", "--truth", "correct"]));
    let t = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["definition"]["definition"] == "truth" && r["scope"] == "overall")
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(t["n"], 20);
    assert_eq!(t["misaligned"], falses);
    // TRUE / FALSE verdicts are the truth judge's own: the label definition (the text-label
    // judge's UNALIGNED share) counts none of them.
    let l = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["definition"]["definition"] == "label" && r["scope"] == "overall")
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(l["n"], 0, "{l}");
    assert!(falses > 0 && falses < 20, "{falses}");
}
