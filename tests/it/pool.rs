//! Endpoint pools (`--endpoint` repeated, `--endpoints FILE`) against local servers written
//! here that answer one request at a time after a fixed latency, and can be killed mid-run
//! (the listener closes: later connections are refused, the request being served is dropped).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::endpoint::{completion, read_request, respond};
use crate::util::*;

struct SlowServer {
    url: String,
    served: Arc<AtomicUsize>,
    kill: Arc<AtomicBool>,
}

/// One request at a time, each answered `latency` after it arrived; killed once `kill` is
/// set or after `die_after` answers.
fn slow_server(latency: Duration, die_after: Option<usize>) -> SlowServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let kill = Arc::new(AtomicBool::new(false));
    let (sv, k) = (served.clone(), kill.clone());
    std::thread::spawn(move || loop {
        if k.load(SeqCst) {
            return drop(listener);
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        stream.set_nonblocking(false).unwrap();
        let Some((_, body)) = read_request(&stream) else {
            continue;
        };
        std::thread::sleep(latency);
        if die_after.is_some_and(|n| sv.load(SeqCst) >= n) {
            k.store(true, SeqCst);
            // Killed mid-request: the answer never comes, the port closes.
            drop(stream);
            return drop(listener);
        }
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        sv.fetch_add(1, SeqCst);
        respond(stream, "200 OK", &completion(&req));
    });
    SlowServer { url, served, kill }
}

fn questions(s: &TestStore) {
    first_questions(s, 8);
}

fn generate(s: &TestStore, endpoints: &[&str], samples: &str) -> (serde_json::Value, f64) {
    let mut args = vec!["--json", "generate"];
    for e in endpoints {
        args.extend(["--endpoint", e]);
    }
    args.extend([
        "--model-name",
        "served",
        "--concurrency",
        "1",
        "--max-retries",
        "2",
        "--questions",
        "first8",
        "--samples",
        samples,
        "--max-tokens",
        "16",
    ]);
    let t = Instant::now();
    let out = json(&s.ok(&args));
    (out, t.elapsed().as_secs_f64())
}

/// Three servers of one request at a time each: the pool spreads the requests evenly and
/// keeps all three busy at once; the figures are printed (a test asserts no timing).
#[test]
fn a_pool_spreads_requests_over_its_servers() {
    let latency = Duration::from_millis(100);
    let one = slow_server(latency, None);
    let s1 = TestStore::new();
    questions(&s1);
    let (r1, t1) = generate(&s1, &[&one.url], "3");
    assert_eq!(r1["generated"], 24, "{r1}");
    assert!(
        r1.get("endpoints").is_none(),
        "one endpoint has no pool counts: {r1}"
    );

    let pool: Vec<SlowServer> = (0..3).map(|_| slow_server(latency, None)).collect();
    let urls: Vec<&str> = pool.iter().map(|p| p.url.as_str()).collect();
    let s3 = TestStore::new();
    questions(&s3);
    let (r3, t3) = generate(&s3, &urls, "3");
    assert_eq!(r3["generated"], 24, "{r3}");
    for (p, c) in pool.iter().zip(r3["endpoints"].as_array().unwrap()) {
        let served = p.served.load(SeqCst);
        assert!((6..=10).contains(&served), "uneven: {r3}");
        assert_eq!(c["answered"], served as u64, "{c}");
        assert_eq!(c["errors"], 0);
    }
    eprintln!(
        "pool of 3 (concurrency 1 each, {} ms per request): 24 requests in {t3:.2} s; one server {t1:.2} s: {:.2}x",
        latency.as_millis(),
        t1 / t3
    );
    // A pool is named by the model it serves, not its servers: two of the three find every
    // answer stored.
    let again = generate(&s3, &urls[..2], "3").0;
    assert_eq!(again["generated"], 0, "{again}");
}

/// One of three servers dies mid-run: its requests move to the others, every request is
/// stored once, and the run records what each endpoint did.
#[test]
fn a_killed_server_loses_no_request_and_stores_none_twice() {
    let latency = Duration::from_millis(20);
    let pool = [
        slow_server(latency, None),
        slow_server(latency, Some(3)),
        slow_server(latency, None),
    ];
    let urls: Vec<&str> = pool.iter().map(|p| p.url.as_str()).collect();
    let s = TestStore::new();
    questions(&s);
    let (r, _) = generate(&s, &urls, "4");
    assert_eq!(r["generated"], 32, "{r}");
    assert!(pool[1].kill.load(SeqCst), "the server was not killed");
    let counts = r["endpoints"].as_array().unwrap();
    let answered: u64 = counts.iter().map(|c| c["answered"].as_u64().unwrap()).sum();
    assert_eq!(answered, 32, "{r}");
    assert_eq!(counts[1]["answered"], 3);
    assert!(counts[1]["errors"].as_u64().unwrap() >= 1, "{r}");
    let stats = json(&s.ok(&["--json", "store", "stats"]));
    assert_eq!(stats["tables"]["generation"], 32, "one record per request");
    // The counts are on the run, as a `run` record of kind `endpoints`.
    let store = emlab::open_store(&s.dir()).unwrap();
    let kinds: Vec<String> = store
        .ids_in_table("run", 0)
        .unwrap()
        .into_iter()
        .map(|(_, id)| {
            store
                .get(id)
                .unwrap()
                .get("kind")
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(kinds.iter().any(|k| k == "endpoints"), "{kinds:?}");
}

#[test]
fn a_pool_file_is_read_and_a_bad_one_is_named() {
    let a = slow_server(Duration::ZERO, None);
    let b = slow_server(Duration::ZERO, None);
    let s = TestStore::new();
    questions(&s);
    let file = s.write(
        "pool.toml",
        format!(
            "[[endpoint]]\nurl = \"{}\"\nmodel = \"served\"\nconcurrency = 2\n\n[[endpoint]]\nurl = \"{}\"\nmodel = \"served\"\n",
            a.url, b.url
        )
        .as_bytes(),
    );
    let r = json(&s.ok(&[
        "--json",
        "generate",
        "--endpoints",
        file.to_str().unwrap(),
        "--questions",
        "first8",
        "--samples",
        "2",
        "--max-tokens",
        "8",
    ]));
    assert_eq!(r["generated"], 16, "{r}");
    assert_eq!(a.served.load(SeqCst) + b.served.load(SeqCst), 16);
    let bad = s.write("bad.toml", b"[[endpoint]]\nadress = \"x\"\n");
    let out = s.run(&[
        "generate",
        "--endpoints",
        bad.to_str().unwrap(),
        "--questions",
        "first8",
    ]);
    assert!(!out.ok());
    assert!(
        out.stderr.contains("bad.toml") && out.stderr.contains("hint:"),
        "{}",
        out.stderr
    );
}

/// Judging through a pool: every answer judged once, the same judgments as one server gives.
#[test]
fn a_judge_pool_gives_the_judgments_one_server_gives() {
    let servers: Vec<SlowServer> = (0..3).map(|_| slow_server(Duration::ZERO, None)).collect();
    let mut ids = Vec::new();
    for endpoints in [&servers[..1], &servers[1..]] {
        let s = TestStore::new();
        questions(&s);
        generate(&s, &[&servers[0].url], "1");
        let mut args = vec![
            "--json",
            "judge",
            "--model-name",
            "judge",
            "--concurrency",
            "2",
        ];
        for e in endpoints {
            args.extend(["--endpoint", e.url.as_str()]);
        }
        let r = json(&s.ok(&args));
        assert_eq!(r["judged"], 16, "{r}");
        assert_eq!(r.get("endpoints").is_some(), endpoints.len() > 1, "{r}");
        let store = emlab::open_store(&s.dir()).unwrap();
        let mut j: Vec<_> = store
            .ids_in_table("judgment", 0)
            .unwrap()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        j.sort();
        ids.push(j);
    }
    assert!(servers[1].served.load(SeqCst) > 0 && servers[2].served.load(SeqCst) > 0);
    assert_eq!(ids[0], ids[1], "a pool changed the judgments");
}
