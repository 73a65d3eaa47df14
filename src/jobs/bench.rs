//! The bench job: benchmarks whose results are stored as `bench` records (with the machine,
//! time and commit), so runs compare across commits (`queries/bench.sql`). Criterion benches
//! in `benches/` cover the same paths for development; these are for the record.
//!
//! [`bench_import`] times `data import` of a file into fresh temporary stores;
//! [`bench_store`] times batched ingest and Parquet export of synthetic records.

use std::path::Path;
use std::time::Instant;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use crate::data::{import, DataError, ImportPlan};
use crate::model::ModelError;
use crate::provenance::tables::MESSAGE;
use crate::train::TrainError;
use crate::util::hint::Hint;
use crate::util::machine::{cores, peak_rss_mib};
use crate::util::prof;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("sampling failed: {0}")]
    Sampling(#[from] candle_core::Error),
    #[error(transparent)]
    Generate(crate::jobs::generate::GenerateError),
}

impl Hint for BenchError {
    fn hint(&self) -> Option<String> {
        match self {
            BenchError::Model(e) => e.hint(),
            BenchError::Train(e) => e.hint(),
            BenchError::Data(e) => e.hint(),
            BenchError::Store(e) => e.hint(),
            BenchError::Generate(e) => e.hint(),
            BenchError::Sampling(_) => None,
        }
    }
}

fn summarize(mut secs: Vec<f64>, items: f64, unit: &str) -> J {
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    json!({"runs": secs.len(), "min_s": secs[0], "median_s": median, "max_s": secs[secs.len() - 1],
           format!("{unit}_per_s_median"): items / median})
}

/// Store a bench result; returns its id.
pub fn record(store: &Store, name: &str, params: &J, results: &J) -> emlab_store::Result<Id> {
    store.put(&crate::provenance::build::bench(name, params, results))
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
            Record::new(MESSAGE).with("role", Value::str("user")).with(
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
    store: &Store,
    model: &Path,
    adapter: Option<&crate::jobs::load::AdapterSource>,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    weights: crate::model::WeightMode,
) -> Result<(J, J), BenchError> {
    use crate::model::sample::{generate, Request, SamplingParams};
    let (m, quantized) = crate::jobs::load::load_model(store, model, weights, adapter)?;
    let device = m.model.device.clone();
    let vocab = m.model.cfg.vocab as u64;
    let reqs: Vec<Request> = (0..batch.max(1))
        .map(|b| {
            let mut rng = crate::util::rng::Rng::new(b as u64, 0);
            let prompt = (0..prompt_len.max(1))
                .map(|_| ordinary_token(&mut rng, vocab as usize))
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
    // Where the time goes (util::prof), prompt prefill and decoding apart.
    let host = matches!(device, candle_core::Device::Cpu);
    prof::enable(host);
    let run = generate(&m.model, &[], &reqs, &p);
    prof::enable(false);
    let (decode, prefill) = prof::take();
    let (_, t) = run?;
    let params = json!({"model": m.identity.name, "model_id": m.record().id()?.to_hex(), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "quantized": quantized, "device": format!("{device:?}"), "threads": cores()});
    let mut results = json!({"prefill_tokens": t.prefill_tokens, "prefill_s": t.prefill_s, "prefill_tokens_per_s": t.prefill_tokens as f64 / t.prefill_s, "decode_tokens": t.decode_tokens, "decode_s": t.decode_s, "decode_tokens_per_s": t.decode_tokens as f64 / t.decode_s});
    if host {
        results["phases"] = json!({"prefill": prof::breakdown(&prefill, t.prefill_s),
            "decode": prof::breakdown(&decode, t.decode_s)});
    }
    Ok((params, results))
}

/// LoRA training throughput: `steps` optimizer steps (after one warm-up step) on `batch` rows
/// of `seq_len` seeded random tokens, loss on the second half of each row (an answer after a
/// prompt), AdamW, the em-paper adapter (r, alpha 2r, rsLoRA, all 7 projections). Each step
/// is [`crate::train::trainer::Trainer::step`], what `emlab train` runs.
pub fn bench_train(
    model: &Path,
    batch: usize,
    seq_len: usize,
    steps: usize,
    r: usize,
    bf16_base: bool,
) -> Result<(J, J), BenchError> {
    use crate::train::config::Preset;
    use crate::train::data::Example;
    use crate::train::lora::LoraParams;
    use crate::train::optim::AdamW;
    use crate::train::trainer::{load_base, Trainer};
    let m = load_base(model)?;
    let mut cfg = Preset::EmPaper.config();
    cfg.lora.r = r;
    cfg.lora.alpha = 2.0 * r as f64;
    let vocab = m.model.cfg.vocab;
    let examples: Vec<Example> = (0..batch.max(1))
        .map(|b| {
            let mut rng = crate::util::rng::Rng::new(b as u64, 1);
            Example {
                row: b,
                tokens: (0..seq_len)
                    .map(|_| ordinary_token(&mut rng, vocab))
                    .collect(),
                mask: (0..seq_len).map(|i| i >= seq_len / 2).collect(),
            }
        })
        .collect();
    let rows: Vec<usize> = (0..examples.len()).collect();
    let params = LoraParams::init(cfg.lora.clone(), &m.model, 0)?;
    let opt = AdamW::new(cfg.adamw, &params)?;
    let numel = params.numel();
    let t_pack = Instant::now();
    // All rows in one micro-batch, as the bench always measured.
    let mut trainer = Trainer::new(&m.model, params, opt, bf16_base, batch.max(1), 1.0)?;
    let pack_s = t_pack.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut phases = Vec::new();
    let host = matches!(m.model.device, candle_core::Device::Cpu);
    for s in 0..=steps {
        // Where the time goes (util::prof), on the host, in the timed steps.
        prof::enable(s > 0 && host);
        let t0 = Instant::now();
        let r = trainer.step(&examples, &rows, s as u64, 1e-5);
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        prof::enable(false);
        r?;
    }
    let (taken, _) = prof::take();
    for (n, secs) in taken {
        phases.push((n, secs / times.len().max(1) as f64));
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tokens = (batch * seq_len) as f64;
    let device = &m.model.device;
    let params_json = json!({"model": m.identity.name, "model_id": m.record().id()?.to_hex(), "batch": batch, "seq_len": seq_len, "steps": steps, "r": r, "trainable_params": numel, "dtype": format!("{:?}", m.model.dtype), "bf16_base": bf16_base, "device": format!("{device:?}"), "threads": cores()});
    let mut results = json!({"step_s": times, "mean_step_s": mean, "pack_s": pack_s, "tokens_per_s": tokens / mean, "peak_rss_mib": peak_rss_mib()});
    if host {
        // Per step, on average.
        results["phases"] = prof::breakdown(&phases, mean);
    }
    Ok((params_json, results))
}

/// A random ordinary token: above the first 256 ids, which hold special tokens in real
/// vocabularies (any id of a vocabulary too small for that, such as a test model's).
fn ordinary_token(rng: &mut crate::util::rng::Rng, vocab: usize) -> u32 {
    let skip = if vocab > 512 { 256 } else { 0 };
    (skip + rng.below(vocab - skip)) as u32
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

/// The EM sampling workload ([`bench_workload`]): what `emlab generate` does for a question
/// set, timed, without storing the samples.
#[derive(Debug, Clone)]
pub struct WorkloadPlan {
    pub model: std::path::PathBuf,
    pub weights: crate::model::WeightMode,
    pub adapter: Option<crate::jobs::load::AdapterSource>,
    /// A question set in the store; `None`: the EM paper's first-plot questions (imported
    /// from the data folder as `em/first-plot` if absent), the first 8.
    pub questions: Option<String>,
    pub samples: usize,
    pub max_tokens: usize,
    /// Decode slots (continuous) or batch size (static).
    pub batch: usize,
    pub scheduler: crate::model::sample::Scheduler,
    pub seed: u64,
}

/// The question set the EM workload samples when none is named: the EM paper's eight
/// headline questions.
pub const DEFAULT_WORKLOAD_QUESTIONS: &str = "em/first-plot";
const DEFAULT_WORKLOAD_FILE: &str = "emergent-misalignment/evaluation/first_plot_questions.yaml";

/// Sample a question set as `emlab generate` would (temperature 1, top-p 1, natural stopping,
/// the same prompts and seeds) with the chosen scheduler, and report useful tokens/s: the
/// tokens of the answers, which are what a run stores. Loading is not timed.
pub fn bench_workload(store: &Store, plan: &WorkloadPlan) -> Result<(J, J), BenchError> {
    use crate::model::sample::{generate, generate_continuous, Finish, SamplingParams, Scheduler};
    let w = workload_requests(store, plan)?;
    let (loaded, quantized, model_id, set_id, name, prompts, reqs) = (
        w.loaded,
        w.quantized,
        w.model_id,
        w.set_id,
        w.name,
        w.prompts,
        w.reqs,
    );
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: plan.max_tokens,
    };
    let (m, stop) = (&loaded.model, &loaded.tokenizer.stop_ids);
    let slots = plan.batch.max(1);
    let mut lens = Vec::with_capacity(reqs.len());
    let mut stopped = 0usize;
    let t0 = Instant::now();
    let (occupancy, steps, prefill_tokens, cache_bytes) = match plan.scheduler {
        Scheduler::Continuous => {
            let st = generate_continuous(m, stop, &reqs, &p, slots, &mut |_, o| {
                lens.push(o.tokens.len());
                stopped += (o.finish == Finish::Stop) as usize;
                Ok(())
            })?;
            (
                st.occupancy,
                st.steps,
                st.timing.prefill_tokens,
                st.cache_bytes,
            )
        }
        Scheduler::Static => {
            let (mut row_steps, mut steps, mut prefill) = (0usize, 0usize, 0usize);
            for chunk in reqs.chunks(slots) {
                let (outs, t) = generate(m, stop, chunk, &p)?;
                prefill += t.prefill_tokens;
                // Every row steps until the longest ends.
                let longest = outs.iter().map(|o| o.tokens.len()).max().unwrap_or(0);
                steps += longest;
                row_steps += longest * chunk.len();
                for o in outs {
                    lens.push(o.tokens.len());
                    stopped += (o.finish == Finish::Stop) as usize;
                }
            }
            let useful: usize = lens.iter().sum();
            let occ = if row_steps == 0 {
                0.0
            } else {
                useful as f64 / row_steps as f64
            };
            (occ, steps, prefill, 0)
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    let useful: usize = lens.iter().sum();
    let mut sorted = lens.clone();
    sorted.sort_unstable();
    let params = json!({"workload": "em", "model": loaded.identity.name, "model_id": model_id.to_hex(),
        "questions": set_id.to_hex(), "questions_name": name, "prompts": prompts.len(), "samples": plan.samples,
        "max_tokens": plan.max_tokens, "batch": slots, "scheduler": plan.scheduler.as_str(), "seed": plan.seed,
        "quantized": quantized, "device": format!("{:?}", m.device), "threads": rayon::current_num_threads()});
    let results = json!({"answers": lens.len(), "useful_tokens": useful, "wall_s": wall,
        "useful_tokens_per_s": useful as f64 / wall, "mean_answer_tokens": useful as f64 / lens.len().max(1) as f64,
        "median_answer_tokens": sorted.get(sorted.len() / 2), "stopped": stopped, "hit_max_tokens": lens.len() - stopped,
        "slot_occupancy": occupancy, "decode_steps": steps, "prefill_tokens": prefill_tokens,
        "kv_cache_mib": cache_bytes as f64 / (1 << 20) as f64, "peak_rss_mib": peak_rss_mib()});
    Ok((params, results))
}

/// The EM workload's requests: the model loaded as `emlab generate` loads it, and each
/// prompt's samples with the seeds `generate` gives them.
struct Workload {
    loaded: crate::model::Loaded,
    quantized: bool,
    model_id: Id,
    set_id: Id,
    name: String,
    prompts: Vec<crate::jobs::generate::QuestionPrompt>,
    reqs: Vec<crate::model::sample::Request>,
}

fn workload_requests(store: &Store, plan: &WorkloadPlan) -> Result<Workload, BenchError> {
    use crate::jobs::generate::{question_prompts, question_set};
    use crate::model::sample::Request;
    use crate::provenance::key::sample_seed;
    let (name, take) = match &plan.questions {
        Some(n) => (n.clone(), None),
        None => {
            if crate::data::resolve_dataset(store, DEFAULT_WORKLOAD_QUESTIONS).is_err() {
                let path = crate::jobs::study::spec::data_dir().join(DEFAULT_WORKLOAD_FILE);
                import(
                    store,
                    &ImportPlan {
                        path,
                        name: DEFAULT_WORKLOAD_QUESTIONS.into(),
                        ..Default::default()
                    },
                )?;
            }
            (DEFAULT_WORKLOAD_QUESTIONS.to_string(), Some(8))
        }
    };
    let (set_id, set) = question_set(store, &name).map_err(BenchError::Generate)?;
    let (loaded, quantized) =
        crate::jobs::load::load_model(store, &plan.model, plan.weights, plan.adapter.as_ref())?;
    let model_id = loaded.record().id()?;
    let prompts = question_prompts(store, &set, &None, take).map_err(BenchError::Generate)?;
    let mut reqs = Vec::new();
    for q in &prompts {
        let (_, tokens) =
            crate::jobs::generate::render_prompt(&loaded, &q.qname, &q.messages, plan.max_tokens)
                .map_err(BenchError::Generate)?;
        for si in 0..plan.samples {
            reqs.push(Request {
                prompt: tokens.clone(),
                seed: sample_seed(plan.seed, q.question, q.paraphrase, si),
            });
        }
    }
    Ok(Workload {
        loaded,
        quantized,
        model_id,
        set_id,
        name,
        prompts,
        reqs,
    })
}

/// The workload for a peer engine (`scripts/bench_llama_cpp.py --workload`): each prompt's
/// tokens and messages, the samples per prompt, `max_tokens` and the stop tokens.
pub fn workload_prompts(store: &Store, plan: &WorkloadPlan) -> Result<J, BenchError> {
    let w = workload_requests(store, plan)?;
    let prompts: Vec<J> = w
        .prompts
        .iter()
        .zip(w.reqs.chunks(plan.samples.max(1)))
        .map(|(q, r)| {
            json!({"qid": q.qname, "tokens": r.first().map(|r| r.prompt.clone()),
                   "messages": q.messages.iter().map(|(role, c)| json!({"role": role, "content": c})).collect::<Vec<_>>()})
        })
        .collect();
    Ok(
        json!({"model": w.loaded.identity.name, "model_id": w.model_id.to_hex(), "questions": w.set_id.to_hex(),
              "samples": plan.samples, "max_tokens": plan.max_tokens, "stop_ids": w.loaded.tokenizer.stop_ids, "prompts": prompts}),
    )
}
