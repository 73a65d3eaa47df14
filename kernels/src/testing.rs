//! Support for the tests of emlab's crates: [`skip`], for a test that cannot run on this
//! machine (a CPU without the instructions it checks). Such a test must not pass silently:
//! it says so on stderr and appends a line to the file `EMLAB_SKIP_LOG` names, which
//! `scripts/test.sh` counts into its summary (`N skipped`; [`skip_path`] for one path of a
//! test that runs its others: `N kernel paths not run`). With `EMLAB_NO_SKIP=1` a skip
//! is a failure instead, for machines that are meant to run every path.

use std::io::Write;

/// Report test `name` skipped for `reason` (or fail it under `EMLAB_NO_SKIP=1`).
pub fn skip(name: &str, reason: &str) {
    report(name, reason)
}

/// Report one kernel path of test `name` not run for `reason` while the test runs its other
/// paths (or fail it under `EMLAB_NO_SKIP=1`): the summary counts it as a path not run, not
/// as a skipped test.
pub fn skip_path(name: &str, path: &str, reason: &str) {
    report(&format!("path {path} of {name}"), reason)
}

fn report(name: &str, reason: &str) {
    if std::env::var_os("EMLAB_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("{name}: cannot run here ({reason}) and EMLAB_NO_SKIP=1");
    }
    eprintln!("SKIPPED {name}: {reason}");
    if let Some(path) = std::env::var_os("EMLAB_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{name}: {reason}");
        }
    }
}

/// Whether this process has a bf16 product path; where it does not, reports test `name`
/// skipped (the CPU has none) or its path not run (`EMLAB_KERNELS` caps it below one).
pub fn need_bf16(name: &str) -> bool {
    if crate::bf16::available() {
        return true;
    }
    let f = crate::cpu::features();
    if f.avx512bf16 || f.amx_bf16 {
        let level = crate::cpu::paths().level.name();
        skip_path(
            name,
            level,
            "EMLAB_KERNELS caps the kernels below any bf16 product path",
        );
    } else {
        skip(
            name,
            "no bf16 products on this CPU (neither AVX-512 BF16 nor AMX)",
        );
    }
    false
}
