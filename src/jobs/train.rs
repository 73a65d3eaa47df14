//! The training job: a [`TrainPlan`] in, `checkpoint` records out.
//!
//! A run is named by its key ([`crate::provenance::key::train_run_key`]): the base model id,
//! dataset id, parent checkpoint, full [`TrainConfig`] and held-out set. Every `save_every`
//! steps (and at the end) it stores the adapter and the training state as blobs, a
//! `checkpoint` record naming both, a `step` record per step, and the alias `train/<key>`
//! pointing at the checkpoint, in one transaction. Rerunning the same command after a crash
//! finds the alias and continues from that step. Nothing else is needed to resume: the data
//! order is a function of (seed, epoch) and the dropout masks of (seed, step), so the resumed
//! run computes the same bytes as one that never stopped.

use std::path::PathBuf;
use std::time::Instant;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde::Serialize;
use serde_json::json;

use crate::data::{resolve_dataset, view};
use crate::provenance::build;
use crate::provenance::key::{legacy, train_run_key, NS_TRAIN};
use crate::provenance::tables::STEP;
use crate::provenance::to_json;
use crate::train::checkpoint::{self, Lineage, Snapshot, TrainState};
use crate::train::config::TrainConfig;
use crate::train::data::{epoch_order, prepare, Example, Overflow, Prepared};
use crate::train::lora::LoraParams;
use crate::train::optim::{lr_factor, AdamW};
use crate::train::trainer::{load_base, Trainer};
use crate::train::TrainError;

#[derive(Debug, Clone)]
pub struct TrainPlan {
    pub model: PathBuf,
    pub data: String,
    /// A held-out dataset whose loss is measured before, during and after training.
    pub eval: Option<String>,
    pub eval_every: usize,
    /// Continue from this checkpoint's adapter (id or prefix).
    pub from: Option<String>,
    pub config: TrainConfig,
    /// KL-regularise towards the base model or the parent on this dataset's assistant tokens.
    pub kl: Option<KlPlan>,
}

/// `--kl-data NAME --kl-weight W --kl-reference base|parent`.
#[derive(Debug, Clone, PartialEq)]
pub struct KlPlan {
    pub data: String,
    pub weight: f64,
    /// The `--from` checkpoint instead of the base model.
    pub parent: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainReport {
    pub checkpoint: String,
    pub run_key: String,
    pub base_model: String,
    pub dataset: String,
    pub resumed_from_step: Option<usize>,
    pub steps: usize,
    pub total_steps: usize,
    pub final_loss: Option<f64>,
    pub eval_loss: Vec<(usize, f64)>,
    pub trainable_params: usize,
    pub data: Prepared,
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// Stopped before its last step by --early-stop-loss.
    pub early_stopped: bool,
}

/// Progress: (steps done, total, last loss, tokens/s).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f64, f64);

/// Rows of a chat dataset: each a list of (role, content).
type ChatRows = Vec<Vec<(String, String)>>;

/// A chat dataset's rows, with its id.
fn dataset_rows(store: &Store, name: &str) -> Result<(Id, ChatRows), TrainError> {
    let id = resolve_dataset(store, name)?;
    let rows = view::chat_rows(store, id, None)?;
    Ok((id, rows.into_iter().map(|(_, m)| m).collect()))
}

pub fn run(
    store: &Store,
    plan: &TrainPlan,
    progress: Progress<'_>,
) -> Result<TrainReport, TrainError> {
    let mut cfg = plan.config.clone();
    cfg.lora = cfg.lora.clone().normalized().map_err(TrainError::Config)?;
    cfg.check().map_err(TrainError::Config)?;
    let (data_id, rows) = dataset_rows(store, &plan.data)?;
    let loaded = load_base(&plan.model)?;
    let model = &loaded.model;
    if cfg.seq_len > model.cfg.max_seq {
        return Err(TrainError::Config(format!(
            "--seq-len {} exceeds the model's context of {}",
            cfg.seq_len, model.cfg.max_seq
        )));
    }
    let base_id = store.put(&loaded.record())?;

    // Continuing from a checkpoint: same base, its adapter as the starting point.
    let mut parent = None;
    let mut start_params = None;
    if let Some(from) = &plan.from {
        let ck = checkpoint::resolve(store, from)?;
        let (rec, spec) = checkpoint::of_base(store, ck, base_id)?;
        // The adapter shape is the parent's: a continued run trains the same adapter.
        cfg.lora = spec;
        let tensors = checkpoint::read_adapter(store, ck, &rec, &model.device)?;
        let p = LoraParams::from_peft(cfg.lora.clone(), model, &tensors).map_err(|msg| {
            TrainError::BadCheckpoint {
                checkpoint: ck.to_hex(),
                msg,
            }
        })?;
        start_params = Some(p);
        parent = Some(ck);
    }

    // The parent's adapter, kept as the KL reference before training moves it.
    let parent_reference = match &plan.kl {
        Some(k) if k.parent => start_params.clone(),
        _ => None,
    };
    let prep = prepare(&loaded.tokenizer, &rows, cfg.seq_len, cfg.overflow).map_err(|source| {
        TrainError::Data {
            name: plan.data.clone(),
            source,
        }
    })?;
    let eval: Option<Vec<Example>> = match &plan.eval {
        Some(name) => {
            let (_, erows) = dataset_rows(store, name)?;
            let p = prepare(&loaded.tokenizer, &erows, cfg.seq_len, Overflow::Truncate).map_err(
                |source| TrainError::Data {
                    name: name.clone(),
                    source,
                },
            )?;
            Some(p.examples)
        }
        None => None,
    };
    let kl_examples = match &plan.kl {
        Some(k) => {
            if !(k.weight.is_finite() && k.weight >= 0.0) {
                return Err(TrainError::Config(
                    "--kl-weight must be a finite non-negative number".into(),
                ));
            }
            if k.parent && parent.is_none() {
                return Err(TrainError::Config(
                    "--kl-reference parent needs --from CHECKPOINT (the parent)".into(),
                ));
            }
            let (kid, krows) = dataset_rows(store, &k.data)?;
            let p = prepare(&loaded.tokenizer, &krows, cfg.seq_len, Overflow::Truncate).map_err(
                |source| TrainError::Data {
                    name: k.data.clone(),
                    source,
                },
            )?;
            if p.examples.iter().all(|e| e.targets() == 0) {
                return Err(TrainError::Config(format!(
                    "KL dataset `{}` has no assistant turns to measure the KL on",
                    k.data
                )));
            }
            cfg.kl = Some(crate::train::kl::KlConfig {
                data: kid.to_hex(),
                weight: k.weight,
                reference: if k.parent { "parent" } else { "base" }.into(),
            });
            Some(p.examples)
        }
        None => None,
    };
    let examples = &prep.examples;
    let n = examples.len();
    let per_epoch = n.div_ceil(cfg.batch_size);
    // As in transformers' Trainer, --max-steps overrides --epochs (the data repeats if needed).
    let total = cfg.max_steps.unwrap_or(per_epoch * cfg.epochs);

    let key_json = json!({"base_model": base_id.to_hex(), "dataset": data_id.to_hex(), "parent": parent.map(|p| p.to_hex()), "config": to_json("the training config", &cfg)?, "eval": plan.eval});
    let run_key = train_run_key(&key_json);
    let run_rec = build::run(
        "train",
        &key_json,
        [base_id, data_id].into_iter().chain(parent),
    );
    let run_id = store.put(&run_rec)?;

    let mut report = TrainReport {
        run_key: run_key.clone(),
        base_model: base_id.to_hex(),
        dataset: data_id.to_hex(),
        total_steps: total,
        data: prep.clone(),
        ..Default::default()
    };

    // Resume (a run an older emlab started is found by its earlier key), or start.
    let mut last_good = parent.map_or_else(|| "none".to_string(), |p| p.to_hex());
    let found = match store.alias(NS_TRAIN, &run_key)? {
        Some(ck) => Some(ck),
        None => store.alias(NS_TRAIN, &legacy::train_run_v1(&key_json))?,
    };
    let state = match found {
        Some(ck) => {
            let rec = checkpoint::get(store, ck)?;
            let s = checkpoint::load_state(store, ck, &rec, &cfg.lora, cfg.adamw, model)?;
            report.resumed_from_step = Some(s.step);
            last_good = ck.to_hex();
            let stopped = cfg.early_stop.is_some_and(|e| e.reached(&s.loss_curve));
            if s.step >= total || stopped {
                report.early_stopped = stopped && s.step < total;
                report.checkpoint = ck.to_hex();
                report.steps = s.step;
                report.final_loss = s.loss_curve.last().copied();
                report.eval_loss = s.eval.clone();
                report.trainable_params = s.params.numel();
                return Ok(report);
            }
            s
        }
        None => {
            let params = match start_params {
                Some(p) => p,
                None => LoraParams::init(cfg.lora.clone(), model, cfg.seed)?,
            };
            let opt = AdamW::new(cfg.adamw, &params)?;
            TrainState {
                step: 0,
                loss_curve: Vec::new(),
                eval: Vec::new(),
                params,
                opt,
            }
        }
    };
    report.trainable_params = state.params.numel();
    let TrainState {
        mut step,
        mut loss_curve,
        eval: mut eval_curve,
        params,
        opt,
    } = state;
    let kl_term = match (kl_examples, &plan.kl) {
        (Some(examples), Some(k)) => Some(crate::train::kl::KlTerm {
            examples,
            weight: k.weight,
            reference: match parent_reference {
                Some(p) => p,
                None => crate::train::kl::base_reference(&params, model)?,
            },
            rows_per_step: cfg.batch_size,
        }),
        _ => None,
    };
    let mut trainer = Trainer::new(
        model,
        params,
        opt,
        cfg.bf16_base,
        cfg.micro_batch,
        cfg.max_grad_norm,
    )?;
    trainer.kl = kl_term;
    if let Some(ev) = &eval {
        if step == 0 && eval_curve.is_empty() {
            eval_curve.push((0, trainer.eval_loss(ev)?));
        }
    }
    let base_name = loaded.identity.name.clone();
    let lineage = Lineage {
        base: base_id,
        base_name: &base_name,
        dataset: data_id,
        parent,
    };

    let t0 = Instant::now();
    let mut tokens_done = 0usize;
    let mut last_ck = None;
    while step < total {
        let epoch = step / per_epoch;
        let order = epoch_order(n, cfg.seed, epoch);
        let within = step % per_epoch;
        let rows = &order[within * cfg.batch_size..((within + 1) * cfg.batch_size).min(n)];
        let ts = Instant::now();
        let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup_steps, total);
        let dropout_seed = cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let s = trainer.step_at(examples, rows, Some(step), dropout_seed, lr)?;
        if !s.applied {
            return Err(TrainError::NonFinite {
                step: step + 1,
                loss: s.loss,
                last_good,
            });
        }
        step += 1;
        loss_curve.push(s.loss);
        tokens_done += s.tokens;
        let secs = ts.elapsed().as_secs_f64();
        let mut metrics = json!({"loss": s.loss, "lr": lr, "grad_norm": s.grad_norm, "tokens": s.tokens, "target_tokens": s.targets, "seconds": secs, "tokens_per_s": s.tokens as f64 / secs.max(1e-9), "epoch": epoch});
        metrics["adapter_norms"] = trainer.params.norms()?;
        if let Some(kl) = s.kl {
            metrics["kl"] = json!(kl);
        }
        let stop = cfg.early_stop.is_some_and(|e| e.reached(&loss_curve));
        if let Some(ev) = &eval {
            if step % plan.eval_every.max(1) == 0 || step == total || stop {
                let l = trainer.eval_loss(ev)?;
                eval_curve.push((step, l));
                metrics["eval_loss"] = json!(l);
            }
        }
        let mut sb = Batch::new();
        store.stage(
            &mut sb,
            &Record::new(STEP)
                .with("run", Value::Id(run_id))
                .with("step", Value::Int(step as i64))
                .with("metrics", Value::json(&metrics)),
        )?;
        if step % cfg.save_every == 0 || step == total || stop {
            let snap = Snapshot {
                step,
                loss_curve: &loss_curve,
                eval: &eval_curve,
                params: &trainer.params,
                opt: &trainer.opt,
            };
            let ck = checkpoint::stage(store, &mut sb, &snap, model, &lineage, &cfg, &prep)?;
            sb.alias(NS_TRAIN, &run_key, ck);
            last_good = ck.to_hex();
            last_ck = Some(ck);
        }
        store.write(sb)?;
        progress(
            step,
            total,
            s.loss,
            tokens_done as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        );
        if stop {
            report.early_stopped = step < total;
            break;
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report.tokens_per_s = tokens_done as f64 / report.seconds.max(1e-9);
    report.checkpoint = last_ck.map_or(last_good, |c| c.to_hex());
    report.steps = step;
    report.final_loss = loss_curve.last().copied();
    report.eval_loss = eval_curve;
    Ok(report)
}
