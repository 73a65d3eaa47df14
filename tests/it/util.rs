//! Test helpers: a temporary store directory and a runner for the real `emlab` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct TestStore {
    pub tmp: tempfile::TempDir,
}

impl TestStore {
    pub fn new() -> TestStore {
        TestStore {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("store")
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// Run `emlab --store <dir> ARGS`.
    pub fn run(&self, args: &[&str]) -> Run {
        run_in(&self.dir(), args)
    }
    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.ok(), "emlab {args:?} failed:\n{}", r.stderr);
        r.stdout
    }
    pub fn write(&self, name: &str, body: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, body).expect("write fixture");
        p
    }
}

pub struct Run {
    pub out: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.out.status.success()
    }
}

pub fn emlab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_emlab"));
    c.env_remove("EMLAB_STORE")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    c
}

pub fn run_in(store: &Path, args: &[&str]) -> Run {
    let out = emlab()
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("spawn emlab");
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

/// `../shared/data/<rel>` beside the repository.
pub fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

/// A chat JSONL body of `n` distinct rows tagged with `tag`.
pub fn chat_jsonl(tag: &str, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{tag} question {i}\"}},{{\"role\":\"assistant\",\"content\":\"{tag} answer {i}\"}}]}}\n"
        ));
    }
    s
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Is the `duckdb` CLI available? CI installs it (`pip install duckdb-cli`); tests that need it
/// fail, not skip, when it is missing so a broken CI setup cannot pass silently.
pub fn duckdb() -> Command {
    let ok = Command::new("duckdb")
        .arg("--version")
        .output()
        .map(|o| o.status.success());
    assert!(
        matches!(ok, Ok(true)),
        "the duckdb CLI is required for this test: pip install duckdb-cli"
    );
    Command::new("duckdb")
}

/// Run `queries/<file>` with DuckDB over the export in `parquet` and return its rows as JSON.
pub fn query(file: &str, parquet: &Path) -> serde_json::Value {
    let sql = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("queries")
            .join(file),
    )
    .unwrap();
    let o = duckdb()
        .args([
            "-json",
            "-c",
            &format!("SET VARIABLE parquet = '{}'", parquet.display()),
            "-c",
            &sql,
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "duckdb {file}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    json(&String::from_utf8_lossy(&o.stdout))
}

/// Import the EM paper's first-plot questions as `first-plot` and derive `first{n}`, its
/// first `n`; returns that name.
pub fn first_questions(s: &TestStore, n: usize) -> String {
    let q = shared("emergent-misalignment/evaluation/first_plot_questions.yaml");
    s.ok(&[
        "data",
        "import",
        q.to_str().unwrap(),
        "--name",
        "first-plot",
    ]);
    let name = format!("first{n}");
    s.ok(&[
        "data",
        "derive",
        &name,
        "--from",
        "first-plot",
        "--take",
        &n.to_string(),
    ]);
    name
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Fail if `secret` appears in any file under `dir`.
pub fn assert_nowhere_under(dir: &Path, secret: &str) {
    for f in files_under(dir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is in {}",
            f.display()
        );
    }
}
