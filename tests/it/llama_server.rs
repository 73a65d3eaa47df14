//! End to end against a real OpenAI-compatible peer: llama-cpp-python's server serving the
//! SmolLM2 GGUF on 127.0.0.1 (installed by scripts/test.sh). The commands are the judging
//! issue's, as written: generate through the endpoint, judge with logprobs, metrics; then
//! reruns that send no request.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = crate::model::smollm2_path();
    let child = Command::new("python3")
        .args(["-m", "llama_cpp.server", "--model", model.to_str().unwrap(), "--n_threads", "2", "--host", "127.0.0.1", "--port", &port.to_string(), "--model_alias", "smollm2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m llama_cpp.server (pip install 'llama-cpp-python[server]'; scripts/test.sh does)");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}/v1"),
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "llama.cpp server did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    server
}

#[test]
fn generate_judge_metrics_against_llama_cpp_server() {
    let server = start_server();
    let s = TestStore::new();
    first_questions(&s, 8);
    let url = server.url.as_str();
    let g = json(&s.ok(&[
        "--json",
        "generate",
        "--endpoint",
        url,
        "--model-name",
        "smollm2",
        "--questions",
        "first8",
        "--samples",
        "4",
        "--max-tokens",
        "64",
    ]));
    assert_eq!(g["generated"], 32, "{g}");
    let j = json(&s.ok(&[
        "--json",
        "judge",
        "--endpoint",
        url,
        "--model-name",
        "smollm2",
    ]));
    assert_eq!(j["judged"], 64, "{j}");
    assert_eq!(j["failed"], 0, "{j}");
    let m = json(&s.ok(&["--json", "metrics"]));
    let defs: Vec<&str> = m
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["definition"]["definition"].as_str().unwrap())
        .collect();
    for d in ["betley", "model-organisms", "label"] {
        assert!(defs.contains(&d), "{m}");
    }
    // Raw judge output is kept: the 20 top logprobs of the one answer token.
    let store = emlab::open_store(&s.dir()).unwrap();
    let (_, jid) = store.ids_in_table("judgment", 0).unwrap()[0];
    let raw: serde_json::Value = serde_json::from_str(
        store
            .get(jid)
            .unwrap()
            .get("raw")
            .unwrap()
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        raw["top_logprobs"].as_array().map(Vec::len),
        Some(20),
        "{raw}"
    );
    drop(store);
    // Reruns: nothing left to do, zero requests.
    let g2 = json(&s.ok(&[
        "--json",
        "generate",
        "--endpoint",
        url,
        "--model-name",
        "smollm2",
        "--questions",
        "first8",
        "--samples",
        "4",
        "--max-tokens",
        "64",
    ]));
    assert_eq!(g2["generated"], 0);
    let j2 = json(&s.ok(&[
        "--json",
        "judge",
        "--endpoint",
        url,
        "--model-name",
        "smollm2",
    ]));
    assert_eq!(j2["requests_sent"], 0, "{j2}");
}
