//! Durability: an import killed with SIGKILL at arbitrary points leaves a store that opens,
//! verifies, and holds each import's batch whole or not at all.

use crate::util::*;
use std::time::{Duration, Instant};

const ROWS: usize = 3000;
/// Records one import adds: per row a user message, an assistant message and a conversation;
/// plus the source and dataset records.
const PER_IMPORT: u64 = 3 * ROWS as u64 + 2;

#[test]
fn sigkill_mid_import_leaves_whole_batches() {
    let s = TestStore::new();
    // Initialise the store, and time one whole import to spread the kill points over it.
    let cal = s.write("cal.jsonl", chat_jsonl("cal", ROWS).as_bytes());
    let t0 = Instant::now();
    s.ok(&["data", "import", cal.to_str().unwrap(), "--name", "cal"]);
    let full_ms = (t0.elapsed().as_millis() as u64).max(20);
    // Deterministic spread of kill points (xorshift), from before the open to after commit.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let runs = 24;
    let mut killed_midway = 0;
    for run in 0..runs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(x % (full_ms + full_ms / 5));
        let file = s.write(
            &format!("run{run}.jsonl"),
            chat_jsonl(&format!("run{run}"), ROWS).as_bytes(),
        );
        let mut child = emlab()
            .arg("--store")
            .arg(s.dir())
            .args([
                "data",
                "import",
                file.to_str().unwrap(),
                "--name",
                &format!("run{run}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            killed_midway += 1;
            // SIGKILL: no destructors, no flush.
            child.kill().unwrap();
        }
        child.wait().unwrap();

        let mut store = emlab::open_store(&s.dir()).expect("store opens after SIGKILL");
        let report = store.verify().unwrap();
        assert!(
            report.ok(),
            "run {run}: verify after kill: {:?}",
            report.problems
        );
        let names = store.aliases("dataset").unwrap();
        let total: u64 = store.counts().unwrap().values().sum();
        assert_eq!(
            total,
            names.len() as u64 * PER_IMPORT,
            "run {run}: a batch was stored in part ({} complete imports)",
            names.len()
        );
        for (name, id) in &names {
            let rec = store.get(*id).unwrap();
            let rows = rec.get("rows").unwrap().id_list();
            assert_eq!(rows.len(), ROWS, "{name}");
            store.get_many(&rows).unwrap();
        }
    }
    assert!(
        killed_midway >= 10,
        "only {killed_midway} runs were killed before finishing"
    );
}
