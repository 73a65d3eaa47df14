//! The Batch API (`judge --batch-api`, `generate --endpoint ... --batch-api`) against the fake
//! OpenAI server of [`crate::fake_openai`], which checks each batch file's lines and each
//! `POST /batches`; and `emlab batch export|import`, the same JSONL for `vllm run-batch`
//! (whose output is written here by answering the exported lines as a server would). Never
//! tried against OpenAI's Batch API or vLLM itself.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value as J};

use crate::fake_openai::*;
use crate::util::*;

/// `first{n}` questions and `samples` answers each, sampled directly through the fake.
fn with_generations(s: &TestStore, f: &Fake, n: usize, samples: usize) {
    let q = first_questions(s, n);
    let r = run(
        s,
        &[
            "generate",
            "--endpoint",
            &f.url,
            "--model-name",
            "served",
            "--api-key-env",
            KEY_VAR,
            "--questions",
            &q,
            "--samples",
            &samples.to_string(),
            "--max-tokens",
            "32",
        ],
    );
    assert!(r.ok(), "{}", r.stderr);
}

fn judge_args<'a>(f: &'a Fake, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--json",
        "judge",
        "--endpoint",
        &f.url,
        "--model-name",
        "judge",
        "--api-key-env",
        KEY_VAR,
        "--max-retries",
        "1",
    ];
    v.extend_from_slice(extra);
    v
}

const BATCH: [&str; 3] = ["--batch-api", "--poll-interval", "0.01"];

fn ids_in(store: &Path, table: &str) -> BTreeSet<String> {
    let s = emlab::open_store(store).unwrap();
    s.ids_in_table(table, 0)
        .unwrap()
        .into_iter()
        .map(|(_, id)| id.to_hex())
        .collect()
}

/// The batch input files the fake holds, as their lines.
fn batch_files(f: &Fake) -> Vec<Vec<J>> {
    f.state()
        .files
        .iter()
        .filter(|x| x.3 == "batch")
        .map(|x| check_batch_file(&x.2).unwrap())
        .collect()
}

#[test]
fn protocol_batch_judged_store_holds_the_direct_judgment_ids_and_reruns_send_nothing() {
    let f = fake(Ending::Succeed);
    let (direct, batched) = (TestStore::new(), TestStore::new());
    with_generations(&direct, &f, 3, 2);
    with_generations(&batched, &f, 3, 2);
    assert_eq!(ids_in(&direct.dir(), "generation").len(), 6);
    let r = run(&direct, &judge_args(&f, &[]));
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(json(&r.stdout)["judged"], 12);
    assert_eq!(f.state().batch_creates, 0);

    // Five requests per file: 12 requests go as 5 + 5 + 2 (logging everything).
    let mut args = vec!["-vv"];
    args.extend(judge_args(&f, &BATCH));
    args.extend(["--batch-max-requests", "5"]);
    let r = run(&batched, &args);
    assert!(r.ok(), "{}", r.stderr);
    assert!(
        r.stderr.contains("DEBUG"),
        "-vv logged nothing: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains(KEY) && !r.stdout.contains(KEY),
        "the key is in the logs"
    );
    let rep = json(&r.stdout);
    assert_eq!(rep["judged"], 12, "{rep}");
    assert_eq!(rep["failed"], 0);
    assert_eq!(rep["batch"]["created"], 3, "{rep}");
    assert_eq!(rep["batch"]["uploaded_files"], 3);
    assert_eq!(rep["batch"]["batches"].as_array().unwrap().len(), 3);
    let files = batch_files(&f);
    assert_eq!(files.iter().map(Vec::len).collect::<Vec<_>>(), [5, 5, 2]);
    assert!(files.iter().flatten().all(|l| l["body"]["model"] == "judge"
        && l["body"]["max_tokens"] == 1
        && l["body"]["top_logprobs"] == 20));
    {
        let st = f.state();
        assert_eq!(st.violations, Vec::<String>::new());
        assert_eq!(st.batch_creates, 3);
        assert!(st
            .batches
            .iter()
            .all(|b| b.metadata["emlab_key"].is_string()));
    }
    assert_eq!(
        ids_in(&batched.dir(), "judgment"),
        ids_in(&direct.dir(), "judgment"),
        "the batch path stored other judgments than the direct one"
    );
    // Each batch read once, recorded as a run with the alias batch id -> run.
    let store = emlab::open_store(&batched.dir()).unwrap();
    let read = store.aliases("batch").unwrap();
    assert_eq!(read.len(), 3);
    for (batch, run_id) in &read {
        let rec = store.get(*run_id).unwrap();
        let plan: J = serde_json::from_str(rec.get("plan").unwrap().as_str().unwrap()).unwrap();
        assert_eq!(plan["batch"], batch.as_str());
        assert_eq!(plan["status"], "completed");
        assert_eq!(plan["answered"], plan["requests"]);
    }
    drop(store);

    // A rerun: everything is stored, nothing is sent.
    let before = f.state().requests;
    let r = run(&batched, &judge_args(&f, &BATCH));
    assert!(r.ok(), "{}", r.stderr);
    let rep = json(&r.stdout);
    assert_eq!(
        (rep["judged"].as_u64(), rep["already_judged"].as_u64()),
        (Some(0), Some(12))
    );
    assert_eq!(rep["requests_sent"], 0);
    assert_eq!(f.state().requests, before);

    // The key went in the Authorization header only.
    assert!(f.state().auth.iter().all(|a| a == &format!("Bearer {KEY}")));
    for (_, _, bytes, _) in f.state().files.iter() {
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the key is in a batch file"
        );
    }
    let r = run(&batched, &["export"]);
    assert!(r.ok(), "{}", r.stderr);
    assert!(files_under(&batched.dir())
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "parquet")));
    assert_nowhere_under(&batched.dir(), KEY);
}

#[test]
fn protocol_batch_expired_batch_keeps_half_and_the_rerun_sends_only_the_rest() {
    let f = fake(Ending::Succeed);
    let s = TestStore::new();
    with_generations(&s, &f, 3, 2);
    f.state().batch_ending = BatchEnding::ExpireHalf;
    let r = run(&s, &judge_args(&f, &BATCH));
    assert!(
        !r.ok(),
        "an expired batch with requests unanswered must fail the run"
    );
    assert!(r.stderr.contains("6 judgments failed"), "{}", r.stderr);
    assert!(r.stderr.contains("batch_expired"), "{}", r.stderr);
    assert!(r.stderr.contains("rerun"), "{}", r.stderr);
    assert_eq!(
        ids_in(&s.dir(), "judgment").len(),
        6,
        "what came back is kept"
    );

    f.state().batch_ending = BatchEnding::Complete;
    let r = run(&s, &judge_args(&f, &BATCH));
    assert!(r.ok(), "{}", r.stderr);
    let rep = json(&r.stdout);
    assert_eq!(
        (rep["judged"].as_u64(), rep["already_judged"].as_u64()),
        (Some(6), Some(6)),
        "{rep}"
    );
    let files = batch_files(&f);
    assert_eq!(files.len(), 2);
    assert_eq!((files[0].len(), files[1].len()), (12, 6));
    // The second file holds exactly the requests the expired batch left unanswered.
    let id = |l: &J| l["custom_id"].as_str().unwrap().to_string();
    let first: Vec<String> = files[0].iter().map(id).collect();
    let second: BTreeSet<String> = files[1].iter().map(id).collect();
    assert_eq!(second, first[6..].iter().cloned().collect());
    assert_eq!(ids_in(&s.dir(), "judgment").len(), 12);
    let st = f.state();
    assert_eq!(st.violations, Vec::<String>::new());
    assert_eq!(
        st.batches
            .iter()
            .map(|b| b.status().to_string())
            .collect::<Vec<_>>(),
        ["expired", "completed"]
    );
}

#[test]
fn protocol_batch_kill_at_each_stage_then_rerun_ends_with_one_batch() {
    for stage in [Stage::Upload, Stage::Create, Stage::Poll] {
        let f = fake(Ending::Succeed);
        let s = TestStore::new();
        with_generations(&s, &f, 1, 2);
        f.state().hang = Some(stage);
        let args = judge_args(&f, &BATCH);
        kill_when(
            &s.dir(),
            &args,
            || f.state().hung > 0,
            &format!("{stage:?}"),
        );
        f.state().hang = None;
        let r = run(&s, &args);
        assert!(r.ok(), "{stage:?}: {}", r.stderr);
        let rep = json(&r.stdout);
        assert_eq!(rep["judged"], 4, "{stage:?}: {rep}");
        let st = f.state();
        assert_eq!(st.violations, Vec::<String>::new());
        assert_eq!(st.batch_creates, 1, "{stage:?}: one batch");
        let uploads = st.files.iter().filter(|x| x.3 == "batch").count();
        assert_eq!(uploads, 1, "{stage:?}: one upload");
        let followed = if stage == Stage::Upload { 0 } else { 1 };
        assert_eq!(rep["batch"]["followed"], followed, "{stage:?}: {rep}");
        assert_eq!(
            rep["batch"]["reused_files"],
            1 - followed,
            "{stage:?}: {rep}"
        );
    }
}

#[test]
fn protocol_batch_generate_stores_the_direct_generations() {
    let f = fake(Ending::Succeed);
    let (direct, batched) = (TestStore::new(), TestStore::new());
    with_generations(&direct, &f, 2, 3);
    first_questions(&batched, 2);
    let r = run(
        &batched,
        &[
            "--json",
            "generate",
            "--endpoint",
            &f.url,
            "--model-name",
            "served",
            "--api-key-env",
            KEY_VAR,
            "--questions",
            "first2",
            "--samples",
            "3",
            "--max-tokens",
            "32",
            "--batch-api",
            "--poll-interval",
            "0.01",
        ],
    );
    assert!(r.ok(), "{}", r.stderr);
    let rep = json(&r.stdout);
    assert_eq!(rep["generated"], 6, "{rep}");
    assert_eq!(rep["batch"]["created"], 1);
    let lines = &batch_files(&f)[0];
    assert!(lines
        .iter()
        .all(|l| l["body"]["max_tokens"] == 32 && l["body"]["seed"].is_u64()));
    assert_eq!(
        ids_in(&batched.dir(), "generation"),
        ids_in(&direct.dir(), "generation")
    );
    assert_eq!(f.state().violations, Vec::<String>::new());
    // --batch-api needs one endpoint.
    let r = run(
        &batched,
        &[
            "generate",
            "--endpoint",
            &f.url,
            "--endpoint",
            &f.url,
            "--model-name",
            "served",
            "--questions",
            "first2",
            "--batch-api",
        ],
    );
    assert!(
        !r.ok() && r.stderr.contains("not a pool of 2"),
        "{}",
        r.stderr
    );
}

/// What `vllm run-batch` writes for a request file: one result line per request, in any
/// order; `fail` names custom ids answered with an error instead.
fn answer_like_vllm(requests: &str, fail: &[&str]) -> String {
    let mut out: Vec<String> = requests
        .lines()
        .map(|l| {
            let v: J = serde_json::from_str(l).unwrap();
            let id = v["custom_id"].as_str().unwrap();
            if fail.contains(&id) {
                json!({"id": "vllm-x", "custom_id": id, "response": {"status_code": 400, "request_id": "r", "body": {"object": "error", "message": "bad", "type": "BadRequestError"}}, "error": null})
            } else {
                let body: J = serde_json::from_str(&crate::endpoint::completion(&v["body"])).unwrap();
                json!({"id": "vllm-x", "custom_id": id, "response": {"status_code": 200, "request_id": "r", "body": body}, "error": null})
            }
            .to_string()
        })
        .collect();
    out.reverse();
    out.join("\n") + "\n"
}

#[test]
fn batch_export_and_import_for_vllm_run_batch_store_the_direct_records() {
    let f = fake(Ending::Succeed);
    let (direct, batched) = (TestStore::new(), TestStore::new());
    with_generations(&direct, &f, 2, 2);
    let r = run(&direct, &judge_args(&f, &[]));
    assert!(r.ok(), "{}", r.stderr);

    // Generate: export the requests, answer them as vLLM would, import the answers.
    first_questions(&batched, 2);
    let gen = |verb: &str, file: &Path, flag: &str| {
        run(
            &batched,
            &[
                "--json",
                "batch",
                verb,
                "generate",
                "--model-name",
                "served",
                "--served-by",
                &f.url,
                "--questions",
                "first2",
                "--samples",
                "2",
                "--max-tokens",
                "32",
                flag,
                file.to_str().unwrap(),
            ],
        )
    };
    let req = batched.path("gen-requests.jsonl");
    let r = gen("export", &req, "--out");
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(json(&r.stdout)["batch"]["exported"], 4);
    let text = std::fs::read_to_string(&req).unwrap();
    assert_eq!(check_batch_file(text.as_bytes()).unwrap().len(), 4);
    assert!(
        ids_in(&batched.dir(), "generation").is_empty(),
        "export stores no answer"
    );
    let res = batched.write("gen-results.jsonl", answer_like_vllm(&text, &[]).as_bytes());
    let r = gen("import", &res, "--results");
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(json(&r.stdout)["generated"], 4);
    assert_eq!(
        ids_in(&batched.dir(), "generation"),
        ids_in(&direct.dir(), "generation")
    );

    // Judge: one answer comes back as an error; the import keeps the rest and says so.
    let jreq = batched.path("judge-requests.jsonl");
    let export_judge = || {
        let out = jreq.to_str().unwrap();
        let r = run(
            &batched,
            &[
                "batch",
                "export",
                "judge",
                "--model-name",
                "judge",
                "--out",
                out,
            ],
        );
        assert!(r.ok(), "{}", r.stderr);
    };
    export_judge();
    let text = std::fs::read_to_string(&jreq).unwrap();
    let lines = check_batch_file(text.as_bytes()).unwrap();
    assert_eq!(lines.len(), 8);
    let bad = lines[2]["custom_id"].as_str().unwrap().to_string();
    let res = batched.write(
        "judge-results.jsonl",
        answer_like_vllm(&text, &[&bad]).as_bytes(),
    );
    let import = |file: &Path| {
        run(
            &batched,
            &[
                "--json",
                "batch",
                "import",
                "judge",
                "--model-name",
                "judge",
                "--results",
                file.to_str().unwrap(),
            ],
        )
    };
    let r = import(&res);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("1 judgments failed") && r.stderr.contains("status 400: bad"),
        "{}",
        r.stderr
    );
    assert_eq!(ids_in(&batched.dir(), "judgment").len(), 7);
    // The same file again: the stored seven are not planned, the failed one fails again.
    let r = import(&res);
    assert!(!r.ok());
    // An export now holds only the missing request; its answer completes the store.
    export_judge();
    let text = std::fs::read_to_string(&jreq).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.contains(&bad));
    let r = import(&batched.write("last.jsonl", answer_like_vllm(&text, &[]).as_bytes()));
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(
        ids_in(&batched.dir(), "judgment"),
        ids_in(&direct.dir(), "judgment")
    );

    // A result file that is not one names the line.
    let good = std::fs::read_to_string(batched.path("last.jsonl")).unwrap();
    let junk = batched.write("junk.jsonl", format!("{good}not json\n").as_bytes());
    let r = import(&junk);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("junk.jsonl: line 2: not JSON"),
        "{}",
        r.stderr
    );
}

/// A batch creation whose answer is lost (a 500 after the batch was made) is not sent again
/// blindly: the batch is found by its file's key and followed.
#[test]
fn protocol_batch_a_create_answered_500_after_it_was_made_makes_one_batch() {
    let f = fake(Ending::Succeed);
    let s = TestStore::new();
    with_generations(&s, &f, 1, 2);
    f.state().lose_create_answers = 1;
    let r = run(&s, &judge_args(&f, &BATCH));
    assert!(r.ok(), "{}", r.stderr);
    let rep = json(&r.stdout);
    assert_eq!(rep["judged"], 4, "{rep}");
    assert_eq!(rep["batch"]["created"], 1);
    let st = f.state();
    assert_eq!(
        (st.batch_creates, st.lose_create_answers),
        (1, 0),
        "one batch"
    );
    assert_eq!(st.violations, Vec::<String>::new());
}

/// Killed after reading one batch (expired, half answered) while another is still running:
/// the rerun follows the running batch and sends only the first one's unanswered requests,
/// although what is left to ask no longer splits into the same files.
#[test]
fn protocol_batch_kill_between_batches_then_rerun_follows_the_open_one_and_resends_nothing_twice() {
    let f = fake(Ending::Succeed);
    let s = TestStore::new();
    with_generations(&s, &f, 1, 5);
    {
        let mut st = f.state();
        st.batch_ending = BatchEnding::ExpireHalf;
        st.slow.insert("batch_0002".into());
    }
    let mut args = judge_args(&f, &BATCH);
    args.extend(["--batch-max-requests", "5"]);
    // Batch 1's two files downloaded, then batch 2 polled again: batch 1 is read and stored.
    let read_first = || {
        f.state()
            .retrieved
            .iter()
            .any(|(b, d)| b == "batch_0002" && *d >= 2)
    };
    kill_when(&s.dir(), &args, read_first, "batch 1 read");
    assert_eq!(
        ids_in(&s.dir(), "judgment").len(),
        2,
        "batch 1 answered two of five"
    );
    {
        let mut st = f.state();
        st.batch_ending = BatchEnding::Complete;
        st.slow.clear();
    }
    let r = run(&s, &args);
    assert!(r.ok(), "{}", r.stderr);
    let rep = json(&r.stdout);
    assert_eq!(rep["judged"], 8, "{rep}");
    assert_eq!(rep["batch"]["followed"], 1, "{rep}");
    assert_eq!(rep["batch"]["created"], 1, "{rep}");
    let files = batch_files(&f);
    let id = |l: &J| l["custom_id"].as_str().unwrap().to_string();
    let sets: Vec<BTreeSet<String>> = files.iter().map(|f| f.iter().map(id).collect()).collect();
    assert_eq!(
        sets.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        [5, 5, 3]
    );
    assert!(
        sets[2].is_disjoint(&sets[1]),
        "the running batch's requests were sent again"
    );
    let first: Vec<String> = files[0].iter().map(id).collect();
    assert_eq!(
        sets[2],
        first[2..].iter().cloned().collect(),
        "only batch 1's unanswered go again"
    );
    assert_eq!(ids_in(&s.dir(), "judgment").len(), 10);
    assert_eq!(f.state().violations, Vec::<String>::new());
}
