//! Bad input gets a clear error naming the thing, each cause printed once, and a `hint:`
//! line where the fix is known, whatever layer the error came from.

use std::net::TcpListener;

use crate::util::*;

fn questions(s: &TestStore) {
    let q = s.write("q.txt", b"hello\n");
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
}

#[test]
fn train_on_an_unknown_dataset_hints_data_list() {
    let s = TestStore::new();
    let model = s.path("tiny");
    crate::model_tiny::tiny_model(&model, false);
    let r = s.run(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "nope",
    ]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("no dataset named or with id `nope`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("hint: `emlab data list` names the datasets"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_missing_model_file_is_named_once_with_a_hint() {
    let s = TestStore::new();
    questions(&s);
    let r = s.run(&["generate", "--model", "nope.gguf", "--questions", "qs"]);
    assert!(!r.ok());
    let lines = r
        .stderr
        .lines()
        .filter(|l| l.contains("No such file"))
        .count();
    assert_eq!(
        lines, 1,
        "the cause is printed {lines} times:\n{}",
        r.stderr
    );
    assert!(r.stderr.contains("nope.gguf"), "{}", r.stderr);
    assert!(
        r.stderr.contains("hint:") && r.stderr.contains("fetch-model.sh"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_unknown_checkpoint_hints_checkpoint_list() {
    let s = TestStore::new();
    questions(&s);
    let model = s.path("tiny");
    crate::model_tiny::tiny_model(&model, false);
    let m = model.to_str().unwrap();
    let r = s.run(&[
        "generate",
        "--model",
        m,
        "--checkpoint",
        "beefbeef",
        "--questions",
        "qs",
    ]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("`beefbeef` is not a checkpoint"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("hint: `emlab checkpoint list` names the checkpoints"),
        "{}",
        r.stderr
    );
    // A dataset's id is no checkpoint either.
    let set = json(&s.ok(&["--json", "show", "qs"]))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s.run(&[
        "checkpoint",
        "export",
        &set,
        "-o",
        s.path("x").to_str().unwrap(),
    ]);
    assert!(
        !r.ok() && r.stderr.contains("is not a checkpoint"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_missing_api_key_variable_is_named_with_a_hint() {
    let s = TestStore::new();
    questions(&s);
    let r = s.run(&[
        "generate",
        "--endpoint",
        "http://127.0.0.1:9/v1",
        "--model-name",
        "m",
        "--api-key-env",
        "EMLAB_TEST_NO_SUCH_KEY",
        "--questions",
        "qs",
    ]);
    assert!(!r.ok());
    assert!(r.stderr.contains("EMLAB_TEST_NO_SUCH_KEY"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("hint: export EMLAB_TEST_NO_SUCH_KEY=<key>"),
        "{}",
        r.stderr
    );
}

/// Nothing listens at the endpoint: each request tries three times (a refused connection is
/// retried twice, not `--max-retries` times), and after three such requests in a row the
/// run stops, naming the URL, instead of trying every pending request.
#[test]
fn a_dead_endpoint_stops_after_three_requests_with_a_hint() {
    let s = TestStore::new();
    questions(&s);
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
        "20",
        "--concurrency",
        "1",
    ]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains(&url) && r.stderr.contains("cannot connect"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("after 3 attempts"), "{}", r.stderr);
    assert!(
        r.stderr.contains("hint: is the server running"),
        "{}",
        r.stderr
    );
    // Two retries for each of the three requests sent, not for all twenty.
    let retries = r.stderr.lines().filter(|l| l.contains("retrying")).count();
    assert_eq!(retries, 6, "{}", r.stderr);
}
