//! Facts about the machine a figure was measured on: recorded with every `bench` result, so
//! results from different machines are never compared as if they were one.

use serde_json::{json, Value as J};

/// The CPU's model name (`/proc/cpuinfo`), or empty where it cannot be read.
pub fn cpu_model() -> String {
    emlab_kernels::cpu::model_name()
}

/// Threads available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The kernel path each family takes in this process (`emlab_kernels::cpu`): `level`
/// (the `EMLAB_KERNELS` cap in effect), `quant` (after AMX INT8's start-up check), `f32` and
/// `bf16` (the path `--bf16-base` products take, after AMX's start-up check; `none` where
/// there is none).
pub fn kernels() -> J {
    use emlab_kernels::cpu::{self, Bf16Path};
    let p = cpu::paths();
    let mut m = serde_json::Map::new();
    for (family, path) in p.names() {
        m.insert(family.into(), json!(path));
    }
    let bf16 = match emlab_kernels::bf16::path() {
        None => "none",
        Some(Bf16Path::Avx512) => "avx512_bf16",
        Some(Bf16Path::Amx) => "amx_bf16",
    };
    m.insert("bf16".into(), json!(bf16));
    m.insert("quant".into(), json!(emlab_kernels::quant_path().name()));
    J::Object(m)
}

/// CPU model, its kernel-relevant extensions, the kernel paths that run, cores, OS and
/// architecture, as stored in `bench.machine`.
pub fn describe() -> J {
    json!({
        "cpu": cpu_model(),
        "flags": emlab_kernels::cpu::features().names(),
        "kernels": kernels(),
        "cores": cores(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// `EMLAB_KERNELS` names a level this CPU runs (or is unset): an error naming the variable
/// and what the CPU has otherwise.
pub fn check_kernel_request() -> anyhow::Result<()> {
    use emlab_kernels::cpu;
    let best = cpu::features().best();
    match cpu::requested() {
        Err(e) => Err(anyhow::anyhow!(
            "{e}\nhint: unset it, or set it to one this CPU runs (up to {})",
            best.name()
        )),
        Ok(Some(l)) if l > best => Err(anyhow::anyhow!(
            "EMLAB_KERNELS={}: this CPU ({}) runs kernels up to {}\nhint: `emlab cpu` lists \
             what it has; unset EMLAB_KERNELS to use the best",
            l.name(),
            cpu_model(),
            best.name()
        )),
        Ok(_) => Ok(()),
    }
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
