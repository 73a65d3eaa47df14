//! Facts about the machine a figure was measured on: recorded with every `bench` result, so
//! results from different machines are never compared as if they were one.

use serde_json::{json, Value as J};

/// The CPU's model name (`/proc/cpuinfo`), or empty where it cannot be read.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Threads available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// CPU model, cores, OS and architecture, as stored in `bench.machine`.
pub fn describe() -> J {
    json!({"cpu": cpu_model(), "cores": cores(), "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
}

/// The git commit of the working directory, if it is a checkout.
pub fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
