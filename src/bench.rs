//! Benchmarks that store their results as `bench` records, so runs compare across commits
//! (`queries/bench.sql`). Criterion benches in `benches/` cover the same paths for
//! development; these are for the record.
//!
//! [`bench_import`] times `data import` of a file into fresh temporary stores;
//! [`bench_store`] times batched ingest and Parquet export of synthetic records.

use std::path::Path;
use std::time::Instant;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use crate::data::{import, DataError, ImportPlan};
use crate::records::BENCH;

/// Machine facts recorded with every result.
pub fn machine() -> J {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"cpu": cpu, "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
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

/// Now as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn summarize(mut secs: Vec<f64>, items: f64, unit: &str) -> J {
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    json!({"runs": secs.len(), "min_s": secs[0], "median_s": median, "max_s": secs[secs.len() - 1],
           format!("{unit}_per_s_median"): items / median})
}

/// Store a bench result; returns its id.
pub fn record(store: &Store, name: &str, params: J, results: J) -> Result<Id, DataError> {
    let mut r = Record::new(BENCH)
        .with("name", Value::str(name))
        .with("params", Value::json(&params))
        .with("results", Value::json(&results))
        .with("machine", Value::json(&machine()))
        .with("time", Value::str(now_rfc3339()));
    if let Some(c) = commit() {
        r = r.with("commit", Value::str(c));
    }
    Ok(store.put(&r)?)
}

/// Time importing `file` into a fresh temporary store, `repeat` times.
pub fn bench_import(file: &Path, repeat: usize) -> Result<(J, J), DataError> {
    let mut secs = Vec::new();
    let mut rows = 0;
    for _ in 0..repeat.max(1) {
        let dir = tempdir()?;
        let store = crate::open_store(&dir)?;
        let plan = ImportPlan {
            path: file.to_path_buf(),
            name: "bench".into(),
            ..Default::default()
        };
        let t = Instant::now();
        let r = import(&store, &plan)?;
        secs.push(t.elapsed().as_secs_f64());
        rows = r.iter().map(|r| r.rows).sum();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let blake3 = Id::of_bytes(&std::fs::read(file).map_err(|source| DataError::Io {
        path: file.to_path_buf(),
        source,
    })?);
    let params = json!({"file": file.file_name().map(|n| n.to_string_lossy().into_owned()), "blake3": blake3.to_hex(), "rows": rows, "repeat": repeat});
    Ok((params, summarize(secs, rows as f64, "rows")))
}

/// Time staging + committing `n` synthetic message records in one batch, then exporting them.
pub fn bench_store(n: usize, repeat: usize) -> Result<(J, J), DataError> {
    let recs: Vec<Record> = (0..n)
        .map(|i| {
            Record::new(crate::records::MESSAGE)
                .with("role", Value::str("user"))
                .with(
                    "content",
                    Value::str(format!("bench message {i} {}", "lorem ipsum ".repeat(8))),
                )
        })
        .collect();
    let (mut ingest, mut export) = (Vec::new(), Vec::new());
    for _ in 0..repeat.max(1) {
        let dir = tempdir()?;
        let store = crate::open_store(&dir)?;
        let t = Instant::now();
        let mut batch = Batch::new();
        for r in &recs {
            store.stage(&mut batch, r)?;
        }
        store.write(batch)?;
        ingest.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        emlab_store::export::export(&store, &dir.join("parquet"))?;
        export.push(t.elapsed().as_secs_f64());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((
        json!({"records": n, "repeat": repeat, "threads": 1}),
        json!({"ingest": summarize(ingest, n as f64, "records"), "export": summarize(export, n as f64, "records")}),
    ))
}

/// Prefill and decode throughput of a model: `batch` distinct prompts of `prompt_len` tokens,
/// then `new_tokens` sampled tokens each (temperature 1, no stop token).
pub fn bench_generate(
    model: &Path,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    weights: crate::model::WeightMode,
) -> Result<(J, J), crate::model::ModelError> {
    use crate::model::sample::{generate, Request, SamplingParams};
    let device = crate::model::device();
    let mut m = crate::model::load(model, &device)?;
    let quantized = weights.apply(&mut m.model)?;
    let vocab = m.model.cfg.vocab as u64;
    let reqs: Vec<Request> = (0..batch.max(1))
        .map(|b| {
            let mut rng = crate::rng::Rng::new(b as u64, 0);
            // Ordinary tokens (ids above the first few hundred, which hold special tokens).
            let prompt = (0..prompt_len.max(1))
                .map(|_| (256 + rng.below((vocab - 256) as usize) as u64) as u32)
                .collect();
            Request {
                prompt,
                seed: b as u64,
            }
        })
        .collect();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: new_tokens,
    };
    let (_, t) = generate(&m.model, &[], &reqs, &p)?;
    let params = json!({"model": m.record.get("name").and_then(Value::as_str), "model_id": m.record.id()?.to_hex(), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "quantized": quantized, "device": format!("{device:?}"), "threads": std::thread::available_parallelism().map_or(0, |n| n.get())});
    let results = json!({"prefill_tokens": t.prefill_tokens, "prefill_s": t.prefill_s, "prefill_tokens_per_s": t.prefill_tokens as f64 / t.prefill_s, "decode_tokens": t.decode_tokens, "decode_s": t.decode_s, "decode_tokens_per_s": t.decode_tokens as f64 / t.decode_s});
    Ok((params, results))
}

/// LoRA training throughput: `steps` optimizer steps (after one warm-up step) on `batch` rows
/// of `seq_len` seeded random tokens, loss on the second half of each row (an answer after a
/// prompt), AdamW, the em-paper adapter (r, alpha 2r, rsLoRA, all 7 projections).
pub fn bench_train(
    model: &Path,
    batch: usize,
    seq_len: usize,
    steps: usize,
    r: usize,
    bf16_base: bool,
) -> Result<(J, J), crate::train::run::TrainError> {
    use crate::train::lora::LoraParams;
    use crate::train::optim::{clip, AdamW};
    use crate::train::run::{load_base, step_grads, Preset};
    let m = load_base(model)?;
    let mut cfg = Preset::EmPaper.config();
    cfg.lora.r = r;
    cfg.lora.alpha = 2.0 * r as f64;
    let vocab = m.model.cfg.vocab;
    let examples: Vec<crate::train::data::Example> = (0..batch.max(1))
        .map(|b| {
            let mut rng = crate::rng::Rng::new(b as u64, 1);
            crate::train::data::Example {
                row: b,
                tokens: (0..seq_len)
                    .map(|_| (256 + rng.below(vocab - 256)) as u32)
                    .collect(),
                mask: (0..seq_len).map(|i| i >= seq_len / 2).collect(),
            }
        })
        .collect();
    let rows: Vec<usize> = (0..examples.len()).collect();
    let mut params = LoraParams::init(cfg.lora.clone(), &m.model, 0)?;
    let mut opt = AdamW::new(cfg.adamw, &params)?;
    let t_pack = std::time::Instant::now();
    let frozen = if bf16_base {
        Some(crate::train::backprop::FrozenBf16::new(&m.model)?)
    } else {
        None
    };
    let pack_s = t_pack.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for s in 0..=steps {
        let t0 = std::time::Instant::now();
        let (_, _, _, mut g) = step_grads(
            &m.model,
            &params,
            &examples,
            &rows,
            batch,
            s as u64,
            frozen.as_ref(),
        )?;
        clip(&mut g, 1.0)?;
        opt.step(&mut params, &g, 1e-5)?;
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tokens = (batch * seq_len) as f64;
    let device = &m.model.device;
    let params_json = json!({"model": m.record.get("name").and_then(Value::as_str), "model_id": m.record.id()?.to_hex(), "batch": batch, "seq_len": seq_len, "steps": steps, "r": r, "trainable_params": params.numel(), "dtype": format!("{:?}", m.model.dtype), "bf16_base": bf16_base, "device": format!("{device:?}"), "threads": std::thread::available_parallelism().map_or(0, |n| n.get())});
    let results = json!({"step_s": times, "mean_step_s": mean, "pack_s": pack_s, "tokens_per_s": tokens / mean, "peak_rss_mib": peak_rss_mib()});
    Ok((params_json, results))
}

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn tempdir() -> Result<std::path::PathBuf, DataError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "emlab-bench-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    Ok(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_shape() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }
}
