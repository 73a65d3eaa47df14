//! The library's modules form layers, each using only those below it
//! (`docs/architecture.md`): `cli -> jobs -> domain -> {store, kernels, util}`. This reads
//! the source and fails on any import against the picture, so a shortcut is caught the day
//! it is written, not when the next refactor finds the cycle.

use std::path::{Path, PathBuf};

/// What each top-level module of `src/` may use of the crate (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("util", &[]),
    ("provenance", &["util"]),
    ("endpoint", &["util"]),
    ("data", &["provenance", "util"]),
    ("model", &["provenance", "util"]),
    ("judge", &["provenance", "util"]),
    ("train", &["model", "data", "provenance", "util"]),
    (
        "jobs",
        &[
            "data",
            "endpoint",
            "judge",
            "model",
            "train",
            "provenance",
            "util",
            "open_store",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (`//` to the end of a line).
fn code_lines(p: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        let is_binary = top == "cli" || top == "main";
        for (n, line) in code_lines(f) {
            if line.contains("clap") && !is_binary {
                wrong.push(format!(
                    "{}:{n}: clap outside src/cli and main.rs",
                    rel.display()
                ));
            }
            if line.contains("tiny::") || line.contains("mod tiny") {
                wrong.push(format!("{}:{n}: test models in the library", rel.display()));
            }
            let Some(allowed) = ALLOWED.iter().find(|(m, _)| *m == top).map(|(_, a)| *a) else {
                continue;
            };
            let mut rest = line.as_str();
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used != top && !allowed.contains(&used.as_str()) {
                    wrong.push(format!("{}:{n}: {top} uses crate::{used}", rel.display()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

/// Nothing but the bench job and the CLI reaches into the bench job.
#[test]
fn only_the_cli_runs_benchmarks() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if rel.starts_with("cli") || rel == "jobs/bench.rs" {
            continue;
        }
        for (n, line) in code_lines(&f) {
            assert!(!line.contains("bench::"), "{rel}:{n}: uses the bench job");
        }
    }
}
