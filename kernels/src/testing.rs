//! Support for the tests of emlab's crates: [`skip`], for a test that cannot run on this
//! machine (a CPU without the instructions it checks). Such a test must not pass silently:
//! it says so on stderr and appends a line to the file `EMLAB_SKIP_LOG` names, which
//! `scripts/test.sh` counts into its summary (`N skipped`). With `EMLAB_NO_SKIP=1` a skip
//! is a failure instead, for machines that are meant to run every path.

use std::io::Write;

/// Report test `name` skipped for `reason` (or fail it under `EMLAB_NO_SKIP=1`).
pub fn skip(name: &str, reason: &str) {
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
