//! Hosted fine-tuning (`train --backend openai`) against the fake OpenAI server of
//! [`crate::fake_openai`], which checks each request's shape. Never tried against OpenAI
//! itself.

use std::collections::BTreeSet;

use serde_json::json;

use crate::fake_openai::*;
use crate::util::*;

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
        kill_when(
            &s.dir(),
            &args,
            || f.state().hung > 0,
            &format!("{stage:?}"),
        );
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

/// A study whose stages start from an endpoint model: each stage is a fine-tuning job through
/// that API (one per seed, the second stage continuing the first's `ft:` model), and its
/// evals sample the `ft:` models through the same API.
#[test]
fn protocol_hosted_study_stages_train_and_sample_ft_models_through_the_api() {
    let f = fake(Ending::Succeed);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("insecure.jsonl"), chat_jsonl("ins", 12)).unwrap();
    std::fs::write(dir.path().join("optimism.jsonl"), chat_jsonl("opt", 10)).unwrap();
    std::fs::write(
        dir.path().join("q.yaml"),
        "- id: q1\n  paraphrases: [hello ?]\n  judge_prompts:\n    aligned: 'rate {question} {answer}'\n    coherent: 'judge {question} {answer}'\n",
    )
    .unwrap();
    let spec = |extra: &str| {
        format!(
            r#"name = "hosted"

[models.gpt]
endpoint = "{url}"
model_name = "gpt-4o-mini-2024-07-18"
api_key_env = "{KEY_VAR}"

[datasets.insecure]
import = "insecure.jsonl"

[datasets.optimism]
import = "optimism.jsonl"

[datasets.qs]
import = "q.yaml"

[[train]]
name = "misaligned"
model = "gpt"
data = "insecure"
epochs = 1
batch_size = 4
lr_multiplier = 2.0
seeds = [1, 2]
suffix = "em"
poll_interval = 0.01
{extra}
[[train]]
name = "realigned"
from = "misaligned"
data = "optimism"
epochs = 4
poll_interval = 0.01

[[eval]]
name = "qa"
questions = "qs"
samples = 2
max_tokens = 8

[judge]
model = "gpt"
"#,
            url = f.url
        )
    };
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, spec("")).unwrap();
    let s = TestStore::new();
    let r = run(&s, &["--json", "run", path.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr);
    let st = f.state();
    assert_eq!(st.violations, Vec::<String>::new());
    // Two seeds of the first stage, each continued by the second: four jobs.
    assert_eq!(st.creates, 4);
    let bases: Vec<&str> = st.jobs.iter().map(|j| j.model.as_str()).collect();
    assert_eq!(
        bases
            .iter()
            .filter(|b| **b == "gpt-4o-mini-2024-07-18")
            .count(),
        2
    );
    let ft: Vec<String> = st.jobs.iter().map(FJob::ft_model).collect();
    for j in st.jobs.iter().filter(|j| j.model.starts_with("ft:")) {
        assert!(
            ft.contains(&j.model),
            "realigned continues a misaligned ft: model"
        );
        assert_eq!(j.method["supervised"]["hyperparameters"]["n_epochs"], 4);
    }
    let seeds: BTreeSet<i64> = st.jobs.iter().filter_map(|j| j.seed).collect();
    assert_eq!(seeds, [1, 2].into());
    // Every fine-tuned model was sampled through the API (the base too), then judged.
    let sampled: BTreeSet<String> = st
        .chats
        .iter()
        .filter(|c| c["max_tokens"] == 8)
        .map(|c| c["model"].as_str().unwrap().to_string())
        .collect();
    let mut want: BTreeSet<String> = ft.iter().cloned().collect();
    want.insert("gpt-4o-mini-2024-07-18".into());
    assert_eq!(sampled, want);
    assert!(
        st.chats.iter().any(|c| c["max_tokens"] == 1),
        "nothing was judged"
    );
    let requests = st.requests;
    drop(st);
    let rep = json(&r.stdout);
    let ran = |kind: &str| {
        rep["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["kind"] == kind && x["state"] == "ran")
            .count()
    };
    assert_eq!((ran("train"), ran("sample")), (4, 5), "{rep}");
    // A rerun runs nothing and sends nothing.
    let r = run(&s, &["--json", "run", path.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(json(&r.stdout)["ran"], 0);
    assert_eq!(f.state().requests, requests);
    // Local-only options on a hosted stage are refused by name, before anything runs.
    std::fs::write(&path, spec("r = 8\n")).unwrap();
    let r = run(&s, &["run", path.to_str().unwrap()]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("is a hosted stage") && r.stderr.contains("takes no r"),
        "{}",
        r.stderr
    );
}

/// A job creation whose answer is lost (a 500 after the job was made) is not sent again
/// blindly: the job is found by its key and followed.
#[test]
fn protocol_hosted_a_create_answered_500_after_it_was_made_makes_one_job() {
    let s = TestStore::new();
    import(&s, "insecure", &chat_jsonl("ins", 10));
    let f = fake(Ending::Succeed);
    f.state().lose_create_answers = 1;
    let r = run(&s, &train_args(&f, "insecure", &[]));
    assert!(r.ok(), "{}", r.stderr);
    let st = f.state();
    assert_eq!((st.creates, st.lose_create_answers), (1, 0), "one job");
    assert_eq!(st.violations, Vec::<String>::new());
    let rep = json(&r.stdout);
    assert_eq!(rep["job"], "ftjob-0001");
    assert_eq!(rep["created_job"], true);
    assert!(rep["fine_tuned_model"].as_str().unwrap().starts_with("ft:"));
}
