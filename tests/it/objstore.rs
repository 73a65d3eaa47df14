//! `emlab export --to URL`: the local export's layout and state file on object storage.
//! `file://` runs everywhere; S3 runs against moto's server on 127.0.0.1 (a local S3 that
//! speaks the protocol; `scripts/test.sh` installs it, with DuckDB 1.4.4 and its httpfs
//! extension from PyPI, in `.cache/s3-venv`), named `protocol_*`. No real S3, GCS or Azure
//! account was used.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

fn store_with_rows(n: usize, tag: &str) -> TestStore {
    let s = TestStore::new();
    add_rows(&s, n, tag);
    s
}

fn add_rows(s: &TestStore, n: usize, tag: &str) {
    let f = s.write(&format!("{tag}.jsonl"), chat_jsonl(tag, n).as_bytes());
    s.ok(&[
        "data",
        "import",
        f.to_str().unwrap(),
        "--name",
        &format!("chat-{tag}"),
    ]);
}

/// `store stats` as table -> records, for the tables an export writes.
fn stats(s: &TestStore) -> serde_json::Map<String, serde_json::Value> {
    json(&s.ok(&["--json", "store", "stats"]))["tables"]
        .as_object()
        .unwrap()
        .clone()
}

fn counts(rows: &serde_json::Value) -> Vec<(String, u64)> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["table"].as_str().unwrap().to_string(),
                r["records"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn stats_counts(s: &TestStore) -> Vec<(String, u64)> {
    let st = stats(s);
    let mut v: Vec<(String, u64)> = st
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    v.sort();
    v
}

/// Files under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = files_under(dir)
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn a_file_url_export_is_the_local_export_and_grows_incrementally() {
    let s = store_with_rows(5, "a");
    let local = s.path("local");
    let remote = s.path("remote");
    s.ok(&["export", "--out", local.to_str().unwrap()]);
    let url = format!("file://{}", remote.display());
    let first = json(&s.ok(&["--json", "export", "--to", &url]));
    assert_eq!(tree(&local), tree(&remote));
    assert_eq!(counts(&query("tables.sql", &remote)), stats_counts(&s));
    add_rows(&s, 3, "b");
    let before = tree(&remote);
    let second = json(&s.ok(&["--json", "export", "--to", &url]));
    let after = tree(&remote);
    let new: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
    assert!(
        !new.is_empty() && new.iter().all(|f| f.contains("/part=")),
        "{new:?}"
    );
    // Only tables with new records got a part.
    let rows = second["rows"].as_object().unwrap();
    assert!(rows.values().all(|n| n.as_u64().unwrap() > 0), "{second}");
    assert!(
        rows.len() < first["rows"].as_object().unwrap().len(),
        "{second}"
    );
    assert_eq!(counts(&query("tables.sql", &remote)), stats_counts(&s));
    let bad = s.run(&["export", "--to", "ftp://x/y"]);
    assert!(!bad.ok() && bad.stderr.contains("ftp"), "{}", bad.stderr);
}

fn venv() -> Option<PathBuf> {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/s3-venv");
    v.join("bin/moto_server").exists().then_some(v)
}

struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto(venv: &Path) -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    // Dropping `Moto` kills and waits for it, whichever way this returns.
    let m = Moto { child, port };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto_server did not listen on {port}");
}

const SECRET: &str = "emlab-test-secret-Zq8vW3";

fn aws_env(c: &mut Command, port: u16) {
    c.env("AWS_ACCESS_KEY_ID", "emlabtestkey")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true");
}

/// Python in the venv with the AWS variables set; prints what the script prints.
fn py(venv: &Path, port: u16, script: &str) -> String {
    let mut c = Command::new(venv.join("bin/python"));
    c.args(["-c", script]);
    aws_env(&mut c, port);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keys(venv: &Path, port: u16) -> Vec<String> {
    let out = py(
        venv,
        port,
        "import boto3,os\ns3=boto3.client('s3',endpoint_url=os.environ['AWS_ENDPOINT'])\n\
         p=s3.get_paginator('list_objects_v2')\n\
         for page in p.paginate(Bucket='emlab-test',Prefix='runs/x/'):\n\
         \x20   for o in page.get('Contents',[]): print(o['Key'])",
    );
    let mut k: Vec<String> = out.lines().map(str::to_string).collect();
    k.sort();
    k
}

fn export_s3(s: &TestStore, port: u16, verbose: bool) -> (serde_json::Value, String) {
    let mut c = emlab();
    c.arg("--store").arg(s.dir());
    if verbose {
        c.arg("-vv");
    }
    c.args(["--json", "export", "--to", "s3://emlab-test/runs/x"]);
    aws_env(&mut c, port);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (json(&String::from_utf8_lossy(&out.stdout)), stderr)
}

#[test]
fn protocol_s3_export_reads_back_grows_incrementally_and_duckdb_counts_match() {
    let Some(venv) = venv() else {
        return emlab_kernels::testing::skip(
            "objstore::protocol_s3_export_reads_back_grows_incrementally_and_duckdb_counts_match",
            "no .cache/s3-venv (scripts/test.sh installs moto[server], duckdb 1.4.4 and duckdb-ext-httpfs there)",
        );
    };
    let m = moto(&venv);
    py(&venv, m.port, "import boto3,os\nboto3.client('s3',endpoint_url=os.environ['AWS_ENDPOINT']).create_bucket(Bucket='emlab-test')");
    let s = store_with_rows(6, "a");
    let (first, log) = export_s3(&s, m.port, true);
    let k1 = keys(&venv, m.port);
    assert!(
        k1.contains(&"runs/x/_emlab_export.json".to_string()),
        "{k1:?}"
    );
    assert_eq!(
        k1.len(),
        first["files"].as_array().unwrap().len() + 1,
        "{k1:?} {first}"
    );
    // Read back: the uploaded files are the local export's, byte for byte.
    let local = s.path("local");
    s.ok(&["export", "--out", local.to_str().unwrap()]);
    let msg_parts: Vec<String> = tree(&local)
        .into_iter()
        .filter(|f| f.starts_with("message/"))
        .collect();
    let got = py(
        &venv,
        m.port,
        &format!(
            "import boto3,os,hashlib\ns3=boto3.client('s3',endpoint_url=os.environ['AWS_ENDPOINT'])\n\
             b=s3.get_object(Bucket='emlab-test',Key='runs/x/{}')['Body'].read()\n\
             print(hashlib.sha256(b).hexdigest())",
            msg_parts[0]
        ),
    );
    let want = Command::new("sha256sum")
        .arg(local.join(&msg_parts[0]))
        .output()
        .unwrap();
    assert_eq!(
        got.trim(),
        String::from_utf8_lossy(&want.stdout)
            .split_whitespace()
            .next()
            .unwrap(),
        "{msg_parts:?}"
    );
    // Incremental: only new parts (and the alias snapshot and state, replaced).
    add_rows(&s, 4, "b");
    let (second, _) = export_s3(&s, m.port, false);
    let k2 = keys(&venv, m.port);
    let new: Vec<&String> = k2.iter().filter(|k| !k1.contains(k)).collect();
    assert_eq!(
        new.len(),
        second["rows"].as_object().unwrap().len(),
        "one new part per table with new records: {new:?} {second}"
    );
    // DuckDB over s3:// counts what `store stats` counts.
    let sql =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/tables.sql"))
            .unwrap();
    let script = format!(
        "import duckdb,os,json,glob\n\
         c=duckdb.connect()\n\
         ext=glob.glob(os.path.join(os.path.dirname(duckdb.__file__),'..','duckdb_ext','extensions'))[0]\n\
         c.execute(\"SET extension_directory='%s'\" % ext)\n\
         c.execute('LOAD httpfs')\n\
         c.execute(\"CREATE SECRET (TYPE s3, KEY_ID 'emlabtestkey', SECRET '%s', REGION 'us-east-1', ENDPOINT '127.0.0.1:{port}', URL_STYLE 'path', USE_SSL false)\" % os.environ['AWS_SECRET_ACCESS_KEY'])\n\
         c.execute(\"SET VARIABLE parquet = 's3://emlab-test/runs/x'\")\n\
         rows=c.execute({sql:?}).fetchall()\n\
         print(json.dumps([{{'table':t,'records':n}} for t,n in rows]))",
        port = m.port,
        sql = sql.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n").trim_end_matches(';'),
    );
    let counted = json(&py(&venv, m.port, &script));
    assert_eq!(counts(&counted), stats_counts(&s));
    // The secret is nowhere emlab writes: not in the -vv log, the store or the export.
    assert!(
        log.contains("DEBUG") || log.contains("debug"),
        "no -vv log to check"
    );
    assert!(!log.contains(SECRET), "secret in the -vv log");
    assert_nowhere_under(&s.dir(), SECRET);
}
