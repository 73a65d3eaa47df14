//! Checkpoints: the `checkpoint` record and its two blobs (the PEFT adapter, and the
//! training state a run resumes from), read and written here only.
//!
//! The state blob is a safetensors file with `a.{k}`, `b.{k}` (adapter pairs in model row
//! order), `m.{i}`, `v.{i}` (AdamW moments) and the metadata key `emlab`:
//! `{"step", "adam_t", "loss_curve", "eval"}` (`docs/design.md`). Reading it is strict: a
//! state missing any of these is damage and an error, never a run restarted at step 0.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use emlab_store::{Batch, Id, Record, Store, Value};
use serde::Serialize;
use serde_json::{json, Value as J};

use super::config::TrainConfig;
use super::data::Prepared;
use super::lora::LoraParams;
use super::optim::{AdamW, AdamWConfig};
use super::TrainError;
use crate::model::adapter::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::adapter::LoraSpec;
use crate::model::llama::Model;
use crate::provenance::tables::CHECKPOINT;
use crate::provenance::to_json;

/// What a run carries from step to step, and saves with each checkpoint.
pub struct TrainState {
    pub step: usize,
    pub loss_curve: Vec<f64>,
    /// Held-out loss per target token: (step, loss).
    pub eval: Vec<(usize, f64)>,
    pub params: LoraParams,
    pub opt: AdamW,
}

/// A run's state at a step, borrowed for saving.
pub struct Snapshot<'a> {
    pub step: usize,
    pub loss_curve: &'a [f64],
    pub eval: &'a [(usize, f64)],
    pub params: &'a LoraParams,
    pub opt: &'a AdamW,
}

fn state_bytes(s: &Snapshot<'_>) -> Result<Vec<u8>, TrainError> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (i, p) in s.params.pairs.iter().enumerate() {
        named.push((format!("a.{i}"), p.a.to_device(&Device::Cpu)?));
        named.push((format!("b.{i}"), p.b.to_device(&Device::Cpu)?));
    }
    for (k, (m, v)) in s.opt.m.iter().zip(&s.opt.v).enumerate() {
        named.push((format!("m.{k}"), m.to_device(&Device::Cpu)?));
        named.push((format!("v.{k}"), v.to_device(&Device::Cpu)?));
    }
    let meta =
        json!({"step": s.step, "adam_t": s.opt.t, "loss_curve": s.loss_curve, "eval": s.eval});
    let info = HashMap::from([("emlab".to_string(), meta.to_string())]);
    safetensors::serialize(named, Some(info))
        .map_err(|e| TrainError::Config(format!("cannot serialize the training state: {e}")))
}

/// The adapter as PEFT's `adapter_model.safetensors`.
pub fn adapter_bytes(params: &LoraParams, model: &Model) -> Result<Vec<u8>, TrainError> {
    let t = params.to_peft(&model.cfg)?;
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(t, Some(info))
        .map_err(|e| TrainError::Config(format!("cannot serialize the adapter: {e}")))
}

/// Read the training state of checkpoint `ck` (record `rec`) onto `model`'s device.
pub fn load_state(
    store: &Store,
    ck: Id,
    rec: &Record,
    spec: &LoraSpec,
    adamw: AdamWConfig,
    model: &Model,
) -> Result<TrainState, TrainError> {
    let bad = |msg: String| TrainError::BadCheckpoint {
        checkpoint: ck.to_hex(),
        msg,
    };
    let blob = rec
        .get("state")
        .and_then(Value::as_id)
        .ok_or_else(|| bad("it holds no training state".into()))?;
    let bytes = store.read_blob(blob)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("training state: {e}")))?;
    let meta: J = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("emlab"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("training state has no emlab metadata".into()))?;
    let field = |k: &str| {
        meta.get(k)
            .ok_or_else(|| bad(format!("training state metadata lacks `{k}`")))
    };
    let uint = |k: &str| {
        field(k)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("training state `{k}` is not a count")))
    };
    let step = uint("step")?;
    let adam_t = uint("adam_t")?;
    let loss_curve = field("loss_curve")?
        .as_array()
        .and_then(|a| a.iter().map(J::as_f64).collect::<Option<Vec<f64>>>())
        .ok_or_else(|| bad("training state `loss_curve` is not a list of numbers".into()))?;
    if loss_curve.len() != step {
        return Err(bad(format!(
            "training state has {} losses for {step} steps",
            loss_curve.len()
        )));
    }
    let eval = field("eval")?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|p| Some((p.get(0)?.as_u64()? as usize, p.get(1)?.as_f64()?)))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad("training state `eval` is not a list of [step, loss]".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &model.device)?;
    let mut params = LoraParams::init(spec.clone(), model, 0)?;
    let mut opt = AdamW::new(adamw, &params)?;
    let get = |n: String| {
        tensors
            .get(&n)
            .cloned()
            .ok_or_else(|| bad(format!("training state lacks `{n}`")))
    };
    for (i, p) in params.pairs.iter_mut().enumerate() {
        p.a = get(format!("a.{i}"))?;
        p.b = get(format!("b.{i}"))?;
    }
    for k in 0..opt.m.len() {
        opt.m[k] = get(format!("m.{k}"))?;
        opt.v[k] = get(format!("v.{k}"))?;
    }
    opt.t = adam_t;
    Ok(TrainState {
        step,
        loss_curve,
        eval,
        params,
        opt,
    })
}

/// Why a checkpoint record has no adapter blob: hosted, or damaged.
fn no_adapter(rec: &Record) -> String {
    match rec.get("config").map(Value::to_json) {
        Some(c) if c["backend"].is_string() => format!(
            "it was fine-tuned through a hosted API (model {}) and has no local adapter: sample it with `emlab generate --checkpoint ID` and no --model",
            c["fine_tuned_model"].as_str().unwrap_or("?")
        ),
        _ => "no adapter blob".into(),
    }
}

/// Where a checkpoint comes from: what its record names besides its own state.
pub struct Lineage<'a> {
    pub base: Id,
    /// The base model's display name (written into `adapter_config.json`).
    pub base_name: &'a str,
    pub dataset: Id,
    pub parent: Option<Id>,
}

/// Store the adapter and state blobs and stage the `checkpoint` record; returns its id.
pub fn stage(
    store: &Store,
    batch: &mut Batch,
    state: &Snapshot<'_>,
    model: &Model,
    from: &Lineage<'_>,
    cfg: &TrainConfig,
    prep: &Prepared,
) -> Result<Id, TrainError> {
    let adapter = store.put_blob(&adapter_bytes(state.params, model)?)?;
    let st = store.put_blob(&state_bytes(state)?)?;
    let peft = cfg.lora.peft_config(from.base_name);
    let eval: Vec<J> = state.eval.iter().map(|(s, l)| json!([s, l])).collect();
    let mut rec = Record::new(CHECKPOINT)
        .with("base_model", Value::Id(from.base))
        .with("dataset", Value::Id(from.dataset))
        .with("config", Value::json(&to_json("the training config", cfg)?))
        .with("step", Value::Int(state.step as i64))
        .with(
            "loss_curve",
            Value::List(state.loss_curve.iter().map(|&l| Value::Float(l)).collect()),
        )
        .with("adapter", Value::Blob(adapter))
        .with("adapter_config", Value::json(&peft))
        .with("state", Value::Blob(st))
        .with("eval_loss", Value::json(&J::Array(eval)))
        .with(
            "data_stats",
            Value::json(&to_json("the data counts", prep)?),
        );
    if let Some(p) = from.parent {
        rec = rec.with("parent", Value::Id(p));
    }
    Ok(store.stage(batch, &rec)?)
}

/// The checkpoint record `ck`, refusing other records.
pub fn get(store: &Store, ck: Id) -> Result<Record, TrainError> {
    let rec = store.get(ck)?;
    if rec.table != CHECKPOINT {
        return Err(TrainError::NotCheckpoint(ck.to_hex()));
    }
    Ok(rec)
}

/// A checkpoint by id or unambiguous id prefix.
pub fn resolve(store: &Store, id_or_prefix: &str) -> Result<Id, TrainError> {
    let ck = store.resolve_prefix(id_or_prefix).map_err(|e| match e {
        emlab_store::Error::NotFound(_) | emlab_store::Error::BadId(_) => {
            TrainError::NotCheckpoint(id_or_prefix.to_string())
        }
        e => e.into(),
    })?;
    get(store, ck)?;
    Ok(ck)
}

/// A checkpoint record and its LoRA spec, checked to be a checkpoint trained on `base_id`.
pub fn of_base(store: &Store, ck: Id, base_id: Id) -> Result<(Record, LoraSpec), TrainError> {
    let rec = get(store, ck)?;
    let theirs = rec.get("base_model").and_then(Value::as_id);
    if theirs != Some(base_id) {
        return Err(TrainError::OtherBase {
            checkpoint: ck.to_hex(),
            theirs: theirs.map_or_else(|| "?".into(), |i| i.to_hex()),
            ours: base_id.to_hex(),
        });
    }
    let spec = spec_of(&rec).ok_or_else(|| TrainError::BadCheckpoint {
        checkpoint: ck.to_hex(),
        msg: "its config has no LoRA spec".into(),
    })?;
    Ok((rec, spec))
}

/// The LoRA spec a checkpoint was trained with.
pub fn spec_of(rec: &Record) -> Option<LoraSpec> {
    let cfg: J = serde_json::from_str(rec.get("config")?.as_str()?).ok()?;
    serde_json::from_value(cfg.get("lora")?.clone()).ok()
}

/// The two files of a checkpoint's PEFT folder, as bytes: `adapter_config.json` (pretty
/// JSON and a newline) and `adapter_model.safetensors` (the adapter blob).
pub fn peft_files(store: &Store, ck: Id) -> Result<(Vec<u8>, Vec<u8>), TrainError> {
    let rec = get(store, ck)?;
    let bad = |msg: &str| TrainError::BadCheckpoint {
        checkpoint: ck.to_hex(),
        msg: msg.to_string(),
    };
    let blob = rec
        .get("adapter")
        .and_then(Value::as_id)
        .ok_or_else(|| bad(&no_adapter(&rec)))?;
    let config: J = rec
        .get("adapter_config")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("no adapter_config"))?;
    let pretty =
        serde_json::to_string_pretty(&config).map_err(|e| bad(&format!("adapter_config: {e}")))?;
    Ok(((pretty + "\n").into_bytes(), store.read_blob(blob)?))
}

/// A checkpoint's adapter, read from the store (no folder written), named
/// `checkpoint-<12 hex>` beside its base model.
pub fn adapter(store: &Store, ck: Id, device: &Device) -> Result<PeftAdapter, TrainError> {
    let (config, weights) = peft_files(store, ck)?;
    let label = format!("checkpoint-{}", ck.short());
    let source = Path::new("checkpoint").join(ck.to_hex());
    Ok(PeftAdapter::from_bytes(
        &label, &source, &config, &weights, device,
    )?)
}

/// The adapter tensors of a checkpoint (PEFT names, HF row order), f32.
pub fn read_adapter(
    store: &Store,
    ck: Id,
    rec: &Record,
    dev: &Device,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let blob =
        rec.get("adapter")
            .and_then(Value::as_id)
            .ok_or_else(|| TrainError::BadCheckpoint {
                checkpoint: ck.to_hex(),
                msg: no_adapter(rec),
            })?;
    let bytes = store.read_blob(blob)?;
    let t = candle_core::safetensors::load_buffer(&bytes, dev)?;
    t.into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// Write a checkpoint's adapter as a PEFT folder (`adapter_config.json` +
/// `adapter_model.safetensors`), each file atomically.
pub fn export(store: &Store, ck: Id, dir: &Path) -> Result<(), TrainError> {
    let (config, weights) = peft_files(store, ck)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, bytes) in [(CONFIG_FILE, &config), (WEIGHTS_FILE, &weights)] {
        let p = dir.join(name);
        crate::util::fs::write_atomic(&p, bytes).map_err(io(&p))?;
    }
    Ok(())
}

/// One line of `emlab checkpoint list`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRow {
    pub id: String,
    pub step: i64,
    pub loss: Option<f64>,
    pub base_model: String,
    pub dataset: String,
    pub parent: Option<String>,
}

/// Every checkpoint the run that wrote `last` saved, as `(step, id)` in step order: the
/// checkpoints with its base, dataset, parent and configuration.
pub fn of_run(store: &Store, last: Id) -> Result<Vec<(i64, Id)>, TrainError> {
    let rec = get(store, last)?;
    let same = |r: &Record| {
        ["base_model", "dataset", "parent", "config"]
            .iter()
            .all(|k| r.get(k) == rec.get(k))
    };
    let mut out = Vec::new();
    for (_, id) in store.ids_in_table(CHECKPOINT, 0)? {
        let r = store.get(id)?;
        if same(&r) {
            out.push((r.get("step").and_then(Value::as_int).unwrap_or(0), id));
        }
    }
    out.sort();
    Ok(out)
}

pub fn list(store: &Store) -> Result<Vec<CheckpointRow>, TrainError> {
    let ids: Vec<Id> = store
        .ids_in_table(CHECKPOINT, 0)?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let recs = store.get_many(&ids)?;
    Ok(ids
        .into_iter()
        .zip(recs)
        .map(|(id, r)| {
            let hex = |k: &str| r.get(k).and_then(Value::as_id).map(|i| i.to_hex());
            CheckpointRow {
                id: id.to_hex(),
                step: r.get("step").and_then(Value::as_int).unwrap_or(0),
                loss: r
                    .get("loss_curve")
                    .and_then(Value::as_list)
                    .and_then(|l| l.last())
                    .and_then(Value::as_float),
                base_model: hex("base_model").unwrap_or_default(),
                dataset: hex("dataset").unwrap_or_default(),
                parent: hex("parent"),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    /// A resumed run writes back the loss curve it read from the last checkpoint's state, so
    /// its checkpoint id equals an uninterrupted run's only if every f64 survives JSON text
    /// bit for bit. serde_json's default parser does not promise that (3.3446194529533386
    /// came back one ulp off, and the kill -9 test failed when a loss hit such a value); the
    /// `float_roundtrip` feature does.
    #[test]
    fn loss_values_survive_json_bit_for_bit() {
        for x in [
            3.3446194529533386f64,
            0.1 + 0.2,
            1e-300,
            2.7592403207506453,
            4.946238160133362,
        ] {
            let s = serde_json::json!({ "loss_curve": [x] }).to_string();
            let back: serde_json::Value = serde_json::from_str(&s).unwrap();
            let y = back["loss_curve"][0].as_f64().unwrap();
            assert_eq!(y.to_bits(), x.to_bits(), "{s} parsed as {y}");
        }
    }
}
