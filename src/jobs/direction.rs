//! Misalignment directions: `emlab activations` computes one, `generate`/`probe --steer`,
//! `--ablate` and `--steer-random` use one, `emlab direction compare` compares two.
//!
//! [`activations`] teacher-forces two groups of answers ([`Selection`]: a chat dataset's
//! assistant turns, or stored generations filtered by their judge scores) through a model with
//! its chat template, and at each measured layer's output takes each answer's mean
//! activation over its answer tokens; a group's mean is the mean of its answers' means (each
//! answer counts once, whatever its length). The `direction` record holds the difference
//! (misaligned minus aligned) per layer, both group means, the norms, the answers and how they
//! were selected; its name is an alias in the `direction` namespace, and the request's key
//! (model, answers, layers) another, so a rerun computes nothing.
//!
//! [`EditSpec`] is what the sampling verbs take; [`apply_edits`] resolves it against a loaded
//! model, refusing a direction of another architecture or hidden size, and returns the JSON
//! recorded in the sampling parameters (so steered samples are their own records).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use super::load::{load_model, AdapterSource};
use crate::data::{resolve_dataset, view, DataError};
use crate::model::likelihood::{left_padded, longest_first, render, Rendered};
use crate::model::llama::{Config, Model};
use crate::model::steer::{cosine, Directions, Intervention};
use crate::model::{Loaded, ModelError, WeightMode};
use crate::provenance::key::Key;
use crate::provenance::tables::{DIRECTION, GENERATION, JUDGMENT, NS_DIRECTION};
use crate::train::TrainError;
use crate::util::hint::Hint;
use crate::util::layers::LayerSpec;

/// Namespace of request keys: (model, answers, layers, format) -> direction id.
const NS_DIRECTION_KEY: &str = "direction-key";

#[derive(Debug, thiserror::Error)]
pub enum DirectionError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Load(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("{0}")]
    Selection(String),
    #[error("the {group} selection `{spec}` selects no answers")]
    Empty { group: &'static str, spec: String },
    #[error("--layers: {0}")]
    Layers(String),
    #[error("no direction named or with id `{0}`")]
    Unknown(String),
    #[error("direction `{name}` does not fit this model: {msg}")]
    Mismatch { name: String, msg: String },
    #[error("direction `{name}`: {msg}")]
    Bad { name: String, msg: String },
    #[error("computing activations: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Hint for DirectionError {
    fn hint(&self) -> Option<String> {
        match self {
            DirectionError::Model(e) => e.hint(),
            DirectionError::Load(e) => e.hint(),
            DirectionError::Data(e) => e.hint(),
            DirectionError::Store(e) => e.hint(),
            DirectionError::Unknown(_) => Some(
                "compute one with `emlab activations NAME --model M --misaligned SEL --aligned SEL`"
                    .into(),
            ),
            DirectionError::Mismatch { .. } => Some(
                "compute the direction with this model: `emlab activations NAME --model THIS_MODEL ...`"
                    .into(),
            ),
            DirectionError::Empty { .. } | DirectionError::Selection(_) => Some(
                "a selection is a chat dataset name, or `generations:MODEL[:FILTER]`, e.g. `generations:base:aligned<30,coherent>50`"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// A comparison in a generations filter.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Cmp {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
}

/// `metric OP value`, e.g. `aligned<30`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Term {
    pub metric: String,
    pub cmp: Cmp,
    pub value: f64,
}

impl Term {
    fn holds(&self, score: Option<f64>) -> bool {
        let Some(s) = score else { return false };
        match self.cmp {
            Cmp::Lt => s < self.value,
            Cmp::Le => s <= self.value,
            Cmp::Gt => s > self.value,
            Cmp::Ge => s >= self.value,
        }
    }
}

/// Which answers make a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// A chat dataset (name or id): each row's assistant turns.
    Dataset(String),
    /// The stored generations of a model (name or id prefix) whose judge scores pass every
    /// term (of the judge named, else any judge).
    Generations {
        model: String,
        judge: Option<String>,
        terms: Vec<Term>,
    },
}

impl std::str::FromStr for Selection {
    type Err = String;

    /// `NAME` (a chat dataset) or `generations:MODEL[:FILTER]`, FILTER being comma-separated
    /// `metric<x`, `metric>x` (`<=`, `>=` too) and `judge=NAME`.
    fn from_str(s: &str) -> Result<Selection, String> {
        let Some(rest) = s.strip_prefix("generations:") else {
            if s.is_empty() {
                return Err("an empty selection".into());
            }
            return Ok(Selection::Dataset(s.to_string()));
        };
        let (model, filter) = match rest.split_once(':') {
            Some((m, f)) => (m, f),
            None => (rest, ""),
        };
        if model.is_empty() {
            return Err(format!("`{s}` names no model"));
        }
        let (mut judge, mut terms) = (None, Vec::new());
        for t in filter.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some(j) = t.strip_prefix("judge=") {
                judge = Some(j.to_string());
                continue;
            }
            let (i, cmp, w) = [
                ("<=", Cmp::Le),
                (">=", Cmp::Ge),
                ("<", Cmp::Lt),
                (">", Cmp::Gt),
            ]
            .into_iter()
            .find_map(|(op, c)| t.find(op).map(|i| (i, c, op.len())))
            .ok_or_else(|| {
                format!(
                    "filter term `{t}` in `{s}`: expected metric<x, metric>x, <=, >= or judge=NAME"
                )
            })?;
            let value: f64 = t[i + w..].trim().parse().map_err(|_| {
                format!(
                    "filter term `{t}` in `{s}`: `{}` is not a number",
                    &t[i + w..]
                )
            })?;
            terms.push(Term {
                metric: t[..i].trim().to_string(),
                cmp,
                value,
            });
        }
        Ok(Selection::Generations {
            model: model.to_string(),
            judge,
            terms,
        })
    }
}

/// A validated `emlab activations` request.
#[derive(Debug, Clone)]
pub struct ActivationsPlan {
    pub name: String,
    pub model: PathBuf,
    pub adapter: Option<AdapterSource>,
    pub weights: WeightMode,
    pub misaligned: Selection,
    pub aligned: Selection,
    pub layers: LayerSpec,
    /// Answers per forward.
    pub batch: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerNorm {
    pub layer: usize,
    pub norm: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ActivationsReport {
    pub direction: String,
    pub name: String,
    pub model: String,
    pub n_misaligned: usize,
    pub n_aligned: usize,
    pub tokens: usize,
    pub norms: Vec<LayerNorm>,
    /// Found stored under the same request: nothing computed.
    pub cached: bool,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// One answer of a group: its record and the conversation to teacher-force.
struct Answer {
    id: Id,
    messages: Vec<(String, String)>,
}

/// The answers a selection names, the records it read, and what it was (for the record).
fn select(
    store: &Store,
    group: &'static str,
    sel: &Selection,
) -> Result<(Vec<Answer>, Vec<Id>, J), DirectionError> {
    let (answers, inputs, desc) = match sel {
        Selection::Dataset(name) => {
            let id = resolve_dataset(store, name)?;
            let mut out = Vec::new();
            for (conv, messages) in view::chat_rows(store, id, None)? {
                if !messages.iter().any(|(r, _)| r == "assistant") {
                    return Err(DirectionError::Selection(format!(
                        "the {group} dataset `{name}`: row {} has no assistant turn",
                        conv.short()
                    )));
                }
                out.push(Answer { id: conv, messages });
            }
            let desc = json!({"kind": "dataset", "dataset": id.to_hex()});
            (out, vec![id], desc)
        }
        Selection::Generations {
            model,
            judge,
            terms,
        } => {
            let models = view::models_named(store, model)?;
            if models.is_empty() {
                return Err(DirectionError::Selection(format!(
                    "the {group} selection: no model named or with an id starting `{model}`"
                )));
            }
            // generation -> metric -> score
            let mut scores: HashMap<Id, HashMap<String, f64>> = HashMap::new();
            if !terms.is_empty() {
                for (_, jid) in store.ids_in_table(JUDGMENT, 0)? {
                    let j = store.get(jid)?;
                    if judge
                        .as_deref()
                        .is_some_and(|w| j.get("judge").and_then(Value::as_str) != Some(w))
                    {
                        continue;
                    }
                    let (Some(g), Some(m), Some(s)) = (
                        j.get("generation").and_then(Value::as_id),
                        j.get("metric").and_then(Value::as_str),
                        j.get("score").and_then(Value::as_float),
                    ) else {
                        continue;
                    };
                    scores.entry(g).or_default().insert(m.to_string(), s);
                }
            }
            let mut out = Vec::new();
            for (_, gid) in store.ids_in_table(GENERATION, 0)? {
                let g = store.get(gid)?;
                if !g
                    .get("model")
                    .and_then(Value::as_id)
                    .is_some_and(|m| models.contains(&m))
                {
                    continue;
                }
                // Steered or ablated samples are not the model's own answers.
                if g.get("params")
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.contains("\"intervention\":"))
                {
                    continue;
                }
                let s = scores.get(&gid);
                if !terms
                    .iter()
                    .all(|t| t.holds(s.and_then(|s| s.get(&t.metric)).copied()))
                {
                    continue;
                }
                let prompt = g.get("prompt").and_then(Value::as_id).ok_or_else(|| {
                    DirectionError::Selection(format!("generation {} names no prompt", gid.short()))
                })?;
                let mut messages = view::conversation(store, prompt)?;
                let text = g.get("text").and_then(Value::as_str).unwrap_or("");
                messages.push(("assistant".into(), text.to_string()));
                out.push(Answer { id: gid, messages });
            }
            let desc = json!({"kind": "generations", "models": models.iter().map(|m| m.to_hex()).collect::<Vec<_>>(), "judge": judge, "filter": terms});
            (out, models, desc)
        }
    };
    if answers.is_empty() {
        return Err(DirectionError::Empty {
            group,
            spec: match sel {
                Selection::Dataset(n) => n.clone(),
                Selection::Generations { model, .. } => format!("generations:{model}:..."),
            },
        });
    }
    Ok((answers, inputs, desc))
}

/// Per-answer mean activations at `layers`, summed per group: `sums[g][k]` is the sum over
/// group `g`'s answers of each answer's mean at `layers[k]`. Rows run in left-padded batches,
/// longest first (ties by content, so the result does not depend on the input order).
pub fn group_sums(
    model: &Model,
    rows: &[Rendered],
    group_of: &[usize],
    groups: usize,
    layers: &[usize],
    batch: usize,
) -> Result<Vec<Vec<Vec<f64>>>, ModelError> {
    let h = model.cfg.hidden;
    let mut sums = vec![vec![vec![0f64; h]; layers.len()]; groups];
    let mut slot = vec![None; model.cfg.layers];
    for (k, &l) in layers.iter().enumerate() {
        slot[l] = Some(k);
    }
    let last = layers.iter().max().copied();
    for group in longest_first(rows).chunks(batch.max(1)) {
        let (toks, mut cache) = left_padded(model, rows, group)?;
        // Per batch row: the padded positions of its answer tokens.
        let positions: Vec<Vec<usize>> = group
            .iter()
            .enumerate()
            .map(|(b, &i)| {
                let r = &rows[i];
                (0..r.tokens.len())
                    .filter(|&j| r.mask[j])
                    .map(|j| cache.pad[b] + j)
                    .collect()
            })
            .collect();
        let index: Vec<Option<Tensor>> = positions
            .iter()
            .map(|p| {
                (!p.is_empty())
                    .then(|| {
                        let p: Vec<u32> = p.iter().map(|&x| x as u32).collect();
                        let n = p.len();
                        Tensor::from_vec(p, n, &model.device)
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        let mut capture = |li: usize, x: &Tensor| -> candle_core::Result<()> {
            let Some(k) = slot[li] else { return Ok(()) };
            // Each row's mean over its answer tokens, in one gather and one reduction per
            // row (Candle's kernels; a row's sum does not depend on the other rows).
            let x = x.to_dtype(candle_core::DType::F32)?;
            for (b, &i) in group.iter().enumerate() {
                let Some(idx) = &index[b] else { continue };
                let mean = x.get(b)?.index_select(idx, 0)?.sum(0)?.to_vec1::<f32>()?;
                let n = positions[b].len() as f64;
                for (s, &m) in sums[group_of[i]][k].iter_mut().zip(&mean) {
                    *s += f64::from(m) / n;
                }
            }
            // Layers past the last measured one are not needed: stop the forward there.
            if Some(li) == last {
                return Err(candle_core::Error::Msg(STOP.into()));
            }
            Ok(())
        };
        // No layer to measure: a plain prefill (what `bench activations` compares with).
        let capture: Option<crate::model::llama::Capture<'_>> = match last {
            Some(_) => Some(&mut capture),
            None => None,
        };
        match model.forward_hidden_capture(&toks, &mut cache, capture) {
            Ok(_) => {}
            Err(candle_core::Error::Msg(m)) if m == STOP => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sums)
}

/// The message that ends a capture early (no layer after the last measured one is run).
const STOP: &str = "emlab: activations captured";

/// Compute (or find stored) the direction a plan asks for.
pub fn activations(
    store: &Store,
    plan: &ActivationsPlan,
) -> Result<ActivationsReport, DirectionError> {
    let t0 = Instant::now();
    crate::data::check_name(&plan.name)?;
    let (mis, mis_inputs, mis_desc) = select(store, "misaligned", &plan.misaligned)?;
    let (al, al_inputs, al_desc) = select(store, "aligned", &plan.aligned)?;
    let (loaded, quantized) = load_model(store, &plan.model, plan.weights, plan.adapter.as_ref())?;
    let cfg = &loaded.model.cfg;
    let layers = plan
        .layers
        .resolve(cfg.layers)
        .map_err(DirectionError::Layers)?;
    let model_rec = loaded.record();
    let model_id = model_rec.id()?;
    let mis_ids: Vec<Id> = mis.iter().map(|a| a.id).collect();
    let al_ids: Vec<Id> = al.iter().map(|a| a.id).collect();
    let key = Key::new("emlab direction key v1")
        .json(&json!({
            "model": model_id.to_hex(),
            "misaligned": mis_ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
            "aligned": al_ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
            "layers": layers,
            "quantized": quantized,
        }))
        .hex();
    if let Some(id) = store.alias(NS_DIRECTION_KEY, &key)? {
        if let Some(rec) = store.try_get(id)? {
            if rec.get("name").and_then(Value::as_str) == Some(plan.name.as_str()) {
                store.set_alias(NS_DIRECTION, &plan.name, id)?;
                return Ok(report_of(id, &rec, true, t0));
            }
        }
    }
    let (rendered, group_of) = render_groups(&loaded, &mis, &al)?;
    let tokens: usize = rendered.iter().map(|r| r.tokens.len()).sum();
    let answer_tokens = |g: usize| -> usize {
        rendered
            .iter()
            .zip(&group_of)
            .filter(|(_, &x)| x == g)
            .map(|(r, _)| r.mask.iter().filter(|&&m| m).count())
            .sum()
    };
    let sums = group_sums(&loaded.model, &rendered, &group_of, 2, &layers, plan.batch)?;
    let (nm, na) = (mis.len() as f64, al.len() as f64);
    let mut tensors: Vec<(String, Vec<f32>)> = Vec::new();
    let mut norms = Vec::new();
    for (k, &l) in layers.iter().enumerate() {
        let m: Vec<f32> = sums[0][k].iter().map(|s| (s / nm) as f32).collect();
        let a: Vec<f32> = sums[1][k].iter().map(|s| (s / na) as f32).collect();
        let d: Vec<f32> = sums[0][k]
            .iter()
            .zip(&sums[1][k])
            .map(|(x, y)| (x / nm - y / na) as f32)
            .collect();
        norms.push(crate::model::steer::norm(&d));
        tensors.push((format!("direction.{l}"), d));
        tensors.push((format!("misaligned.{l}"), m));
        tensors.push((format!("aligned.{l}"), a));
    }
    let blob = store.put_blob(&serialize(&tensors, cfg.hidden)?)?;
    let mut inputs = mis_inputs;
    inputs.extend(al_inputs);
    let selection = json!({
        "misaligned": mis_desc,
        "aligned": al_desc,
        "misaligned_tokens": answer_tokens(0),
        "aligned_tokens": answer_tokens(1),
        "inputs": inputs.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
        "position": "answer tokens (assistant turns and their end-of-turn marker)",
        "mean": "per answer over its answer tokens, then over the group's answers",
        "weights": if quantized { "quantized" } else { "dense" },
        "config": model_shape(cfg),
    });
    let rec = Record::new(DIRECTION)
        .with("name", Value::str(&plan.name))
        .with("model", Value::Id(model_id))
        .with(
            "layers",
            Value::List(layers.iter().map(|&l| Value::Int(l as i64)).collect()),
        )
        .with("hidden", Value::Int(cfg.hidden as i64))
        .with("vectors", Value::Blob(blob))
        .with(
            "norms",
            Value::List(norms.iter().map(|&n| Value::Float(n)).collect()),
        )
        .with("n_misaligned", Value::Int(mis.len() as i64))
        .with("n_aligned", Value::Int(al.len() as i64))
        .with("misaligned", Value::ids(mis_ids))
        .with("aligned", Value::ids(al_ids))
        .with("selection", Value::json(&selection));
    let mut batch = Batch::new();
    store.stage(&mut batch, &model_rec)?;
    let id = store.stage(&mut batch, &rec)?;
    batch.alias(NS_DIRECTION, &plan.name, id);
    batch.alias(NS_DIRECTION_KEY, &key, id);
    store.write(batch)?;
    let mut r = report_of(id, &rec, false, t0);
    r.tokens = tokens;
    r.tokens_per_s = tokens as f64 / r.seconds.max(1e-9);
    Ok(r)
}

/// Both groups rendered with the model's chat template, misaligned first, and each row's
/// group (0 misaligned, 1 aligned).
fn render_groups(
    loaded: &Loaded,
    mis: &[Answer],
    al: &[Answer],
) -> Result<(Vec<Rendered>, Vec<usize>), DirectionError> {
    let all: Vec<Vec<(String, String)>> =
        mis.iter().chain(al).map(|a| a.messages.clone()).collect();
    let rendered = render(&loaded.tokenizer, &all).map_err(DirectionError::Selection)?;
    let group_of = (0..all.len())
        .map(|i| usize::from(i >= mis.len()))
        .collect();
    Ok((rendered, group_of))
}

/// The architecture facts a direction must match to be applied to a model.
fn model_shape(cfg: &Config) -> J {
    json!({"architecture": cfg.arch, "hidden": cfg.hidden, "layers": cfg.layers})
}

fn serialize(tensors: &[(String, Vec<f32>)], hidden: usize) -> Result<Vec<u8>, DirectionError> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, v)| {
            let bytes: &[u8] = bytemuck_f32(v);
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![hidden], bytes)
                .map(|t| (n.clone(), t))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| DirectionError::Bad {
            name: "(new)".into(),
            msg: format!("cannot serialize: {e}"),
        })?;
    safetensors::serialize(views, None).map_err(|e| DirectionError::Bad {
        name: "(new)".into(),
        msg: format!("cannot serialize: {e}"),
    })
}

/// The bytes of an f32 slice, little-endian (as safetensors stores them).
fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY-free alternative would copy; f32 has no padding and u8 has alignment 1, and
    // safetensors wants little-endian, which every target emlab builds for is.
    #[cfg(target_endian = "big")]
    compile_error!("direction blobs assume a little-endian target");
    // Reading the f32 buffer as bytes: sound (no padding, u8 alignment 1, length exact).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn report_of(id: Id, rec: &Record, cached: bool, t0: Instant) -> ActivationsReport {
    let layers = ints(rec, "layers");
    let norms: Vec<f64> = rec
        .get("norms")
        .and_then(Value::as_list)
        .unwrap_or(&[])
        .iter()
        .filter_map(Value::as_float)
        .collect();
    ActivationsReport {
        direction: id.to_hex(),
        name: rec
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        model: rec
            .get("model")
            .and_then(Value::as_id)
            .map(|m| m.to_hex())
            .unwrap_or_default(),
        n_misaligned: rec.get("n_misaligned").and_then(Value::as_int).unwrap_or(0) as usize,
        n_aligned: rec.get("n_aligned").and_then(Value::as_int).unwrap_or(0) as usize,
        tokens: 0,
        norms: layers
            .iter()
            .zip(norms)
            .map(|(&l, norm)| LayerNorm {
                layer: l as usize,
                norm,
            })
            .collect(),
        cached,
        seconds: t0.elapsed().as_secs_f64(),
        tokens_per_s: 0.0,
    }
}

/// `bench activations`: the same answers through the same batches, alternating a plain
/// prefill (every layer, nothing captured) with the capture of every layer's output and the
/// direction's arithmetic, `rounds` times each. Nothing is stored but the bench record.
pub fn bench(
    store: &Store,
    plan: &ActivationsPlan,
    rounds: usize,
) -> Result<(J, J), DirectionError> {
    let (mis, _, _) = select(store, "misaligned", &plan.misaligned)?;
    let (al, _, _) = select(store, "aligned", &plan.aligned)?;
    let (loaded, quantized) = load_model(store, &plan.model, plan.weights, plan.adapter.as_ref())?;
    let layers = plan
        .layers
        .resolve(loaded.model.cfg.layers)
        .map_err(DirectionError::Layers)?;
    let (rendered, group_of) = render_groups(&loaded, &mis, &al)?;
    let tokens: usize = rendered.iter().map(|r| r.tokens.len()).sum();
    let (mut plain, mut capture) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        for (which, out) in [(&[][..], &mut plain), (&layers[..], &mut capture)] {
            let t = Instant::now();
            group_sums(&loaded.model, &rendered, &group_of, 2, which, plan.batch)?;
            out.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let ratios: Vec<f64> = capture.iter().zip(&plain).map(|(c, p)| c / p).collect();
    let params = json!({"model": loaded.identity.name, "answers": rendered.len(), "tokens": tokens,
        "layers": layers.len(), "batch": plan.batch, "rounds": rounds, "quantized": quantized,
        "order": "alternating: plain prefill, then capture, each round",
        "threads": rayon::current_num_threads()});
    let results = json!({"plain_prefill_tokens_per_s": plain, "capture_tokens_per_s": capture,
        "capture_over_plain": ratios});
    Ok((params, results))
}

/// The integers of a `list<int>` column.
fn ints(rec: &Record, col: &str) -> Vec<i64> {
    rec.get(col)
        .and_then(Value::as_list)
        .unwrap_or(&[])
        .iter()
        .filter_map(Value::as_int)
        .collect()
}

/// A stored direction: its id, record and vectors (`layers[l]` for each measured layer).
pub struct Stored {
    pub id: Id,
    pub name: String,
    pub record: Record,
    pub directions: Directions,
    /// The model shape it was computed on.
    pub shape: J,
}

/// Resolve a direction by name, id or id prefix and read its vectors.
pub fn load(store: &Store, name_or_id: &str) -> Result<Stored, DirectionError> {
    let id = match store.alias(NS_DIRECTION, name_or_id)? {
        Some(id) => id,
        None => match store.resolve_prefix(name_or_id) {
            Ok(id) => id,
            Err(_) => return Err(DirectionError::Unknown(name_or_id.to_string())),
        },
    };
    let rec = store.get(id)?;
    if rec.table != DIRECTION {
        return Err(DirectionError::Unknown(name_or_id.to_string()));
    }
    let bad = |msg: String| DirectionError::Bad {
        name: name_or_id.to_string(),
        msg,
    };
    let hidden = rec.get("hidden").and_then(Value::as_int).unwrap_or(0) as usize;
    let layers = ints(&rec, "layers");
    let selection: J = rec
        .get("selection")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let shape = selection["config"].clone();
    let n_layers = shape["layers"].as_u64().unwrap_or(0) as usize;
    let blob = rec
        .get("vectors")
        .and_then(Value::as_id)
        .ok_or_else(|| bad("no vectors blob".into()))?;
    let bytes = store.read_blob(blob)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("vectors blob: {e}")))?;
    let mut out =
        vec![None; n_layers.max(layers.iter().map(|&l| l as usize + 1).max().unwrap_or(0))];
    for &l in &layers {
        let t = st
            .tensor(&format!("direction.{l}"))
            .map_err(|e| bad(format!("layer {l}: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != [hidden] {
            return Err(bad(format!("layer {l}: not f32 [{hidden}]")));
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out[l as usize] = Some(v);
    }
    Ok(Stored {
        id,
        name: rec
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(name_or_id)
            .to_string(),
        record: rec,
        directions: Directions {
            hidden,
            layers: out,
        },
        shape,
    })
}

/// Steering and ablation as the sampling verbs take them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EditSpec {
    /// `(direction, layer, scale)`: add `scale * unit(v_layer)` at that layer's output.
    pub steer: Vec<(String, usize, f64)>,
    /// Project this direction out of the residual stream.
    pub ablate: Option<String>,
    /// Ablate layer L's direction at every layer (default: each layer its own direction, at
    /// the layers the direction measured).
    pub ablate_layer: Option<usize>,
    /// Use Gaussian vectors of the directions' norms instead (the random control).
    pub random: Option<u64>,
}

impl EditSpec {
    pub fn is_empty(&self) -> bool {
        self.steer.is_empty() && self.ablate.is_none()
    }

    /// `NAME:LAYER:SCALE`.
    pub fn parse_steer(s: &str) -> Result<(String, usize, f64), String> {
        let mut parts = s.rsplitn(3, ':');
        let (scale, layer, name) = (parts.next(), parts.next(), parts.next());
        let (Some(scale), Some(layer), Some(name)) = (scale, layer, name) else {
            return Err(format!("`{s}`: expected NAME:LAYER:SCALE, e.g. medir:12:8"));
        };
        let layer = layer
            .parse()
            .map_err(|_| format!("`{s}`: layer `{layer}` is not a number"))?;
        let scale: f64 = scale
            .parse()
            .map_err(|_| format!("`{s}`: scale `{scale}` is not a number"))?;
        if !scale.is_finite() {
            return Err(format!("`{s}`: scale must be finite"));
        }
        Ok((name.to_string(), layer, scale))
    }
}

/// Set `spec`'s edits on a loaded model. Returns what the sampling parameters record
/// (`None` when there is nothing to do, so unedited records keep their ids).
pub fn apply_edits(
    store: &Store,
    spec: &EditSpec,
    loaded: &mut Loaded,
) -> Result<Option<J>, DirectionError> {
    if spec.is_empty() {
        if spec.random.is_some() || spec.ablate_layer.is_some() {
            return Err(DirectionError::Selection(
                "--steer-random and --ablate-layer need --steer or --ablate".into(),
            ));
        }
        return Ok(None);
    }
    let model = &mut loaded.model;
    let (dtype, dev) = (model.dtype, model.device.clone());
    let mut iv = Intervention::none(model.cfg.layers);
    let mut recorded = json!({});
    let fetch = |name: &str| -> Result<Stored, DirectionError> {
        let mut d = load(store, name)?;
        check_fits(&d, &model.cfg)?;
        if let Some(seed) = spec.random {
            // Each direction its own draw (two directions never get collinear controls).
            let mix = u64::from_le_bytes(d.id.0[..8].try_into().expect("an id has 32 bytes"));
            d.directions = d.directions.random_like(seed ^ mix);
        }
        Ok(d)
    };
    let mut steer = Vec::new();
    for (name, layer, scale) in &spec.steer {
        let d = fetch(name)?;
        let v = measured(&d, *layer)?;
        iv.steer(*layer, v, *scale, dtype, &dev)?;
        steer.push(json!({"direction": d.id.to_hex(), "layer": layer, "scale": scale}));
    }
    if !steer.is_empty() {
        recorded["steer"] = json!(steer);
    }
    if let Some(name) = &spec.ablate {
        let d = fetch(name)?;
        match spec.ablate_layer {
            Some(l) => {
                let v = measured(&d, l)?.to_vec();
                for li in 0..model.cfg.layers {
                    iv.ablate(li, &v, dtype, &dev)?;
                }
            }
            None => {
                for (li, v) in d.directions.layers.iter().enumerate() {
                    if let Some(v) = v {
                        iv.ablate(li, v, dtype, &dev)?;
                    }
                }
            }
        }
        recorded["ablate"] = json!({"direction": d.id.to_hex(), "layers": match spec.ablate_layer {
            Some(l) => json!({"direction_of": l, "at": "every layer"}),
            None => json!("each measured layer, its own direction"),
        }});
    }
    if let Some(seed) = spec.random {
        recorded["random"] = json!({"seed": seed, "norms": "the direction's, per layer"});
    }
    model.intervention = Some(iv);
    Ok(Some(recorded))
}

fn measured(d: &Stored, layer: usize) -> Result<&[f32], DirectionError> {
    d.directions
        .layers
        .get(layer)
        .and_then(Option::as_deref)
        .ok_or_else(|| {
            let have: Vec<usize> = d
                .directions
                .layers
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.as_ref().map(|_| i))
                .collect();
            DirectionError::Mismatch {
                name: d.name.clone(),
                msg: format!("layer {layer} was not measured (it has layers {have:?})"),
            }
        })
}

/// Refuse a direction computed on another architecture, hidden size or depth.
fn check_fits(d: &Stored, cfg: &Config) -> Result<(), DirectionError> {
    let want = model_shape(cfg);
    if d.directions.hidden != cfg.hidden || d.shape != want {
        return Err(DirectionError::Mismatch {
            name: d.name.clone(),
            msg: format!(
                "it was computed on {} (hidden size {}), this model is {}",
                d.shape, d.directions.hidden, want
            ),
        });
    }
    Ok(())
}

/// One layer of a comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerCosine {
    pub layer: usize,
    pub cosine: f64,
    pub norm_a: f64,
    pub norm_b: f64,
}

/// Cosine similarity per layer measured in both.
pub fn compare(store: &Store, a: &str, b: &str) -> Result<Vec<LayerCosine>, DirectionError> {
    let (da, db) = (load(store, a)?, load(store, b)?);
    if da.directions.hidden != db.directions.hidden {
        return Err(DirectionError::Mismatch {
            name: b.to_string(),
            msg: format!(
                "hidden size {} against {}'s {}",
                db.directions.hidden, a, da.directions.hidden
            ),
        });
    }
    let mut out = Vec::new();
    for (l, (x, y)) in da
        .directions
        .layers
        .iter()
        .zip(&db.directions.layers)
        .enumerate()
    {
        if let (Some(x), Some(y)) = (x, y) {
            out.push(LayerCosine {
                layer: l,
                cosine: cosine(x, y),
                norm_a: crate::model::steer::norm(x),
                norm_b: crate::model::steer::norm(y),
            });
        }
    }
    if out.is_empty() {
        return Err(DirectionError::Mismatch {
            name: b.to_string(),
            msg: format!("no layer measured in both `{a}` and `{b}`"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse() {
        assert_eq!(
            "bad".parse::<Selection>().unwrap(),
            Selection::Dataset("bad".into())
        );
        let s: Selection = "generations:base:aligned<30, coherent>50,judge=gpt"
            .parse()
            .unwrap();
        let Selection::Generations {
            model,
            judge,
            terms,
        } = s
        else {
            panic!()
        };
        assert_eq!(model, "base");
        assert_eq!(judge.as_deref(), Some("gpt"));
        assert_eq!(terms.len(), 2);
        assert_eq!(terms[0].cmp, Cmp::Lt);
        assert!(terms[1].holds(Some(50.5)) && !terms[1].holds(Some(50.0)) && !terms[1].holds(None));
        let e = "generations:base:aligned=3"
            .parse::<Selection>()
            .unwrap_err();
        assert!(e.contains("aligned=3"), "{e}");
        assert!("generations:base:aligned<x".parse::<Selection>().is_err());
        assert!("generations:".parse::<Selection>().is_err());
    }

    #[test]
    fn steer_parses() {
        assert_eq!(
            EditSpec::parse_steer("m:d:12:-4.5").unwrap(),
            ("m:d".into(), 12, -4.5)
        );
        assert!(EditSpec::parse_steer("m:12").is_err());
        assert!(EditSpec::parse_steer("m:x:1")
            .unwrap_err()
            .contains("layer `x`"));
    }
}
