//! The store through the CLI: import idempotence, ids across stores, show/prefix, export +
//! DuckDB, verify catching corruption, and bad input.

use crate::util::*;

fn stats(s: &TestStore) -> serde_json::Value {
    json(&s.ok(&["--json", "store", "stats"]))
}

#[test]
fn import_is_idempotent_and_ids_agree_across_stores() {
    let a = TestStore::new();
    let file = a.write("chat.jsonl", chat_jsonl("t", 50).as_bytes());
    let f = file.to_str().unwrap();
    let id1 = a.ok(&["data", "import", f, "--name", "chat"]);
    let before = stats(&a);
    let id2 = a.ok(&["data", "import", f, "--name", "chat"]);
    assert_eq!(id1, id2);
    assert_eq!(
        stats(&a)["tables"],
        before["tables"],
        "second import added records"
    );
    assert_eq!(before["tables"]["conversation"], 50);
    assert_eq!(before["tables"]["message"], 100);
    assert_eq!(before["tables"]["dataset"], 1);
    assert_eq!(before["tables"]["source"], 1);

    let b = TestStore::new();
    let file_b = b.write("chat.jsonl", chat_jsonl("t", 50).as_bytes());
    let id3 = b.ok(&[
        "data",
        "import",
        file_b.to_str().unwrap(),
        "--name",
        "other-name",
    ]);
    assert_eq!(
        id1, id3,
        "same file gives the same dataset id in a fresh store"
    );
}

#[test]
fn show_by_id_prefix_and_name() {
    let s = TestStore::new();
    let file = s.write("c.jsonl", chat_jsonl("p", 3).as_bytes());
    let id = s
        .ok(&["data", "import", file.to_str().unwrap(), "--name", "c"])
        .trim()
        .to_string();
    let full = json(&s.ok(&["show", &id]));
    assert_eq!(full["id"], id.as_str());
    assert_eq!(full["table"], "dataset");
    assert_eq!(full["fields"]["rows"].as_array().map(Vec::len), Some(3));
    let by_prefix = json(&s.ok(&["show", &id[..10]]));
    assert_eq!(by_prefix, full);
    assert_eq!(json(&s.ok(&["show", "c"])), full);
    let conv = full["fields"]["rows"][0].as_str().unwrap().to_string();
    let c = json(&s.ok(&["show", &conv]));
    assert_eq!(c["table"], "conversation");

    let r = s.run(&["show", "deadbeefdeadbeef"]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("no record with id deadbeefdeadbeef"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("hint:"), "{}", r.stderr);
}

#[test]
fn export_is_read_by_duckdb_with_matching_counts_and_is_incremental() {
    let s = TestStore::new();
    let f1 = s.write("a.jsonl", chat_jsonl("a", 20).as_bytes());
    s.ok(&["data", "import", f1.to_str().unwrap(), "--name", "a"]);
    let out = s.path("pq");
    let out_s = out.to_str().unwrap();
    let first = json(&s.ok(&["--json", "export", "--out", out_s]));
    assert_eq!(first["rows"]["message"], 40);
    let f2 = s.write("b.jsonl", chat_jsonl("b", 7).as_bytes());
    s.ok(&["data", "import", f2.to_str().unwrap(), "--name", "b"]);
    let second = json(&s.ok(&["--json", "export", "--out", out_s]));
    assert_eq!(
        second["rows"]["message"], 14,
        "only new records are exported"
    );
    assert!(
        second["rows"].get("bench").is_none(),
        "unchanged tables are not rewritten"
    );
    let third = json(&s.ok(&["--json", "export", "--out", out_s]));
    assert_eq!(third["rows"], serde_json::json!({}));

    let rows = query("tables.sql", &out);
    let st = stats(&s);
    let tables = st["tables"].as_object().unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), tables.len());
    for r in rows {
        let t = r["table"].as_str().unwrap();
        assert_eq!(r["records"], tables[t], "table {t}: duckdb vs store stats");
    }
    // No temp file is left visible beside the data.
    let listing = walk(&out);
    assert!(listing.iter().all(|p| !p.ends_with(".tmp")), "{listing:?}");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn verify_catches_a_flipped_blob_byte() {
    let s = TestStore::new();
    let file = s.write("v.jsonl", chat_jsonl("v", 10).as_bytes());
    let imp = json(&s.ok(&[
        "--json",
        "data",
        "import",
        file.to_str().unwrap(),
        "--name",
        "v",
    ]));
    let ok = s.run(&["verify"]);
    assert!(ok.ok(), "{}", ok.stderr);
    let blob = imp[0]["source_blake3"].as_str().unwrap().to_string();
    let path = s.dir().join("blobs").join(&blob[..2]).join(&blob);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let bad = s.run(&["verify"]);
    assert!(!bad.ok(), "verify must fail on a flipped byte");
    assert!(
        bad.stdout.contains(&format!("MISMATCH {blob}")),
        "{}",
        bad.stdout
    );
}

#[test]
fn store_that_is_a_file_or_foreign_dir_is_refused_untouched() {
    let s = TestStore::new();
    let file = s.write("plain-file", b"hello");
    let r = run_in(&file, &["store", "stats"]);
    assert!(!r.ok());
    assert!(r.stderr.contains("is not a directory"), "{}", r.stderr);
    assert!(r.stderr.contains("hint:"), "{}", r.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");

    let foreign = s.path("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let r = run_in(&foreign, &["store", "stats"]);
    assert!(!r.ok());
    assert!(r.stderr.contains("is not an emlab store"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_dir(&foreign).unwrap().count(),
        1,
        "nothing written"
    );
}

#[test]
fn corrupted_database_is_an_error_and_left_as_is() {
    let s = TestStore::new();
    let file = s.write("c.jsonl", chat_jsonl("c", 5).as_bytes());
    s.ok(&["data", "import", file.to_str().unwrap(), "--name", "c"]);
    let db = s.dir().join("store.redb");
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &garbage).unwrap();
    let r = s.run(&["store", "stats"]);
    assert!(!r.ok());
    assert!(r.stderr.contains("store.redb"), "{}", r.stderr);
    assert!(r.stderr.contains("hint:"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(&db).unwrap(),
        garbage,
        "corrupted file was modified"
    );
}

#[test]
fn unwritable_store_location_is_a_clear_error() {
    let s = TestStore::new();
    let ro = s.path("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o555);
    std::fs::set_permissions(&ro, perm).unwrap();
    // Root ignores mode bits; sysfs refuses new directories even to root.
    let can_write = std::fs::write(ro.join("probe"), b"x").is_ok();
    let target = if can_write {
        std::path::PathBuf::from("/sys/emlab-test-store")
    } else {
        ro.join("store")
    };
    let r = run_in(&target, &["store", "stats"]);
    assert!(!r.ok(), "opening a store in an unwritable place must fail");
    assert!(r.stderr.contains(target.to_str().unwrap()), "{}", r.stderr);
}

#[test]
fn bad_jsonl_stores_nothing_and_names_the_line() {
    let s = TestStore::new();
    let mut body = chat_jsonl("x", 4710);
    body.push_str("{\"messages\": [{\"role\": \"user\"\n");
    body.push_str(&chat_jsonl("y", 5));
    let file = s.write("bad.jsonl", body.as_bytes());
    let r = s.run(&["data", "import", file.to_str().unwrap(), "--name", "bad"]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("bad.jsonl:4711: malformed JSON"),
        "{}",
        r.stderr
    );
    let st = stats(&s);
    assert_eq!(st["records"], 0, "a failed import stored records: {st}");
    assert_eq!(st["blobs"], 0, "a failed import stored the file");
}
