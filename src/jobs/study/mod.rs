//! Studies: one spec ([`spec`]) runs a whole EM experiment as a graph of steps (import,
//! derive, train, sample, judge, metrics, probe), each cached by content, and ends in a
//! comparison ([`compare`]) and a report ([`report`]).
//!
//! A step's id is the key of its kind, its parameters, its input record ids and the step
//! format ([`STEP_FORMAT`]). A finished step is a `study_step` record (kind, id, label,
//! inputs, parameters, outputs) with the alias `study-step/<id>`: a rerun finds it and skips
//! the step, a changed parameter or input gives another id and reruns the step and what
//! depends on it. Steps call the same library functions as the verbs, which resume by their
//! own keys, so a run killed at any moment and rerun ends with the records an uninterrupted
//! run writes. When every step is done, a `study` record holds the spec as written (canonical
//! JSON), its name and its steps, under the alias `study/<name>`.

pub mod compare;
pub mod report;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde::Serialize;
use serde_json::{json, Value as J};

use crate::data::derive::{derive, DerivePlan, Op};
use crate::data::{import, DataError, Format, ImportPlan};
use crate::endpoint::Endpoint;
use crate::jobs::generate::{self, EndpointGeneratePlan, GenerateError, GeneratePlan};
use crate::jobs::judge::{JudgeBackend, JudgeError, JudgePlan};
use crate::jobs::load::AdapterSource;
use crate::jobs::probe::{Labels, ProbeError, ProbePlan, Reference};
use crate::judge::metrics::Definition;
use crate::model::sample::SamplingParams;
use crate::model::WeightMode;
use crate::provenance::build::ModelIdentity;
use crate::provenance::key::Key;
use crate::provenance::tables::{STUDY, STUDY_STEP};
use crate::train::config::{Overrides, Preset, TrainConfig};
use crate::train::data::Overflow;
use crate::train::optim::Schedule;
use crate::train::{checkpoint, TrainError};
use crate::util::choice::Choice;
use crate::util::hint::Hint;
use spec::{SpecError, StageSpec};

/// Part of every step id: a change in what a step kind means changes this.
pub const STEP_FORMAT: &str = "emlab study step v1";
/// Alias namespaces: finished steps by id, a study's last step per label, studies by name.
pub const NS_STEP: &str = "study-step";
pub const NS_LAST: &str = "study-last";
pub const NS_STUDY: &str = "study";

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Results(#[from] crate::judge::Error),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Judge(#[from] JudgeError),
    #[error(transparent)]
    Hosted(#[from] crate::jobs::hosted::HostedError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Direction(#[from] crate::jobs::direction::DirectionError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Encode(#[from] crate::provenance::EncodeError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("{what}: environment variable {var} is not set")]
    Env { what: String, var: String },
    #[error("step `{label}`: {msg}")]
    Step { label: String, msg: String },
    #[error("no study named or with id `{0}`")]
    UnknownStudy(String),
}

impl Hint for StudyError {
    fn hint(&self) -> Option<String> {
        match self {
            StudyError::Spec(_) => {
                Some("docs/studies.md describes every key of a study spec".into())
            }
            StudyError::Data(e) => e.hint(),
            StudyError::Results(e) => e.hint(),
            StudyError::Train(e) => e.hint(),
            StudyError::Generate(e) => e.hint(),
            StudyError::Judge(e) => e.hint(),
            StudyError::Hosted(e) => e.hint(),
            StudyError::Probe(e) => e.hint(),
            StudyError::Direction(e) => e.hint(),
            StudyError::Model(e) => e.hint(),
            StudyError::Store(e) => e.hint(),
            StudyError::Env { var, .. } => Some(format!(
                "export {var}=... and rerun; finished steps are kept"
            )),
            StudyError::Step { .. } => {
                Some("fix the cause and rerun: finished steps are skipped".into())
            }
            StudyError::UnknownStudy(_) => Some(
                "a study is named by its spec's `name` once `emlab run` has finished it".into(),
            ),
            _ => None,
        }
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Finished before: found by its id, skipped.
    Done,
    /// Being run now.
    Running,
    /// Run now.
    Ran,
    /// Not run (a dry run), its inputs known.
    Pending,
    /// Its inputs are not made yet.
    Waiting,
}

/// One step of a plan, as printed and reported.
#[derive(Debug, Clone, Serialize)]
pub struct StepLine {
    pub label: String,
    pub kind: String,
    pub state: StepState,
    /// The step id, when its inputs are known.
    pub step: Option<String>,
    /// Why it (re)runs, or what it waits for.
    pub why: Option<String>,
    pub outputs: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StudyReport {
    pub name: String,
    /// The study record, once every step is done.
    pub study: Option<String>,
    pub steps: Vec<StepLine>,
    pub ran: usize,
    pub done: usize,
    pub pending: usize,
}

/// A `[models]` entry, resolved.
#[derive(Clone)]
enum ModelRef {
    Local {
        path: PathBuf,
        weights: WeightMode,
        /// The model record's id; `None` when the file is missing (a dry run says so).
        id: Option<Id>,
    },
    Endpoint {
        endpoint: Endpoint,
        id: Id,
    },
}

impl ModelRef {
    fn id(&self) -> Option<Id> {
        match self {
            ModelRef::Local { id, .. } => *id,
            ModelRef::Endpoint { id, .. } => Some(*id),
        }
    }
}

/// A training stage run for one seed path (the seeds of the seeded stages along its chain).
type Variant = (String, Vec<u64>);

struct Exec<'a> {
    store: &'a Store,
    l: &'a spec::Loaded,
    dry: bool,
    study: String,
    models: BTreeMap<String, ModelRef>,
    /// Spec dataset name -> dataset id (absent: not made yet).
    datasets: BTreeMap<String, Id>,
    /// Results dataset -> the external model ids it made.
    results: BTreeMap<String, Vec<Id>>,
    /// `[[direction]]` name -> its direction record (absent: not made yet).
    directions: BTreeMap<String, Id>,
    /// Stage variants -> their checkpoints `(step, id)`, the final one last.
    variants: BTreeMap<Variant, Option<Vec<(i64, Id)>>>,
    /// Steps handled in this run: step id -> outputs (a step shared by two evals runs once).
    seen: BTreeMap<String, Option<Vec<Id>>>,
    step_records: Vec<Id>,
    lines: Vec<StepLine>,
    progress: &'a mut dyn FnMut(&StepLine),
}

/// The id of a step: its kind, parameters and inputs under the step format.
pub fn step_id(kind: &str, params: &J, inputs: &[Id]) -> String {
    let mut k = Key::new(STEP_FORMAT)
        .str(kind)
        .json(params)
        .u64(inputs.len() as u64);
    for i in inputs {
        k = k.id(*i);
    }
    k.hex()
}

/// A train stage's step, whichever backend runs it: its label, the inputs that key it (none
/// while `waits` names what is missing), and the datasets and parent checkpoint it trains on.
struct TrainStep {
    label: String,
    inputs: Option<Vec<Id>>,
    waits: String,
    data: Option<Id>,
    eval: Option<Id>,
    parent: Option<Id>,
}

impl Exec<'_> {
    /// Run (or find, or plan) one step. `inputs` is `None` when an input is not made yet.
    fn step(
        &mut self,
        kind: &str,
        label: String,
        params: J,
        inputs: Option<Vec<Id>>,
        waits_for: &str,
        work: impl FnOnce(&mut Self) -> Result<Vec<Id>, StudyError>,
    ) -> Result<Option<Vec<Id>>, StudyError> {
        let mut line = StepLine {
            label: label.clone(),
            kind: kind.to_string(),
            state: StepState::Waiting,
            step: None,
            why: None,
            outputs: 0,
            seconds: 0.0,
        };
        let Some(inputs) = inputs else {
            // A step two evals share is listed once.
            if !self
                .lines
                .iter()
                .any(|l| l.label == label && l.state == StepState::Waiting)
            {
                line.why = Some(format!("waits for {waits_for}"));
                (self.progress)(&line);
                self.lines.push(line);
            }
            return Ok(None);
        };
        let id = step_id(kind, &params, &inputs);
        if let Some(out) = self.seen.get(&id) {
            return Ok(out.clone());
        }
        line.step = Some(id.clone());
        let last_key = format!("{}/{label}", self.study);
        if let Some(rec_id) = self.store.alias(NS_STEP, &id)? {
            let rec = self.store.get(rec_id)?;
            let outputs = rec.get("outputs").map(Value::id_list).unwrap_or_default();
            line.state = StepState::Done;
            line.outputs = outputs.len();
            self.step_records.push(rec_id);
            if !self.dry && self.store.alias(NS_LAST, &last_key)? != Some(rec_id) {
                let mut b = Batch::new();
                b.alias(NS_LAST, &last_key, rec_id);
                self.store.write(b)?;
            }
            (self.progress)(&line);
            self.lines.push(line);
            self.seen.insert(id, Some(outputs.clone()));
            return Ok(Some(outputs));
        }
        line.why = self.why_rerun(&last_key, &params, &inputs)?;
        if self.dry {
            line.state = StepState::Pending;
            (self.progress)(&line);
            self.lines.push(line);
            self.seen.insert(id, None);
            return Ok(None);
        }
        line.state = StepState::Running;
        (self.progress)(&line);
        let t0 = Instant::now();
        let outputs = work(self)?;
        let rec = Record::new(STUDY_STEP)
            .with("kind", Value::str(kind))
            .with("step", Value::str(&id))
            .with("label", Value::str(&label))
            .with("inputs", Value::ids(inputs.iter().copied()))
            .with("params", Value::json(&params))
            .with("outputs", Value::ids(outputs.iter().copied()));
        let mut b = Batch::new();
        let rec_id = self.store.stage(&mut b, &rec)?;
        b.alias(NS_STEP, &id, rec_id);
        b.alias(NS_LAST, &last_key, rec_id);
        self.store.write(b)?;
        self.step_records.push(rec_id);
        line.state = StepState::Ran;
        line.outputs = outputs.len();
        line.seconds = t0.elapsed().as_secs_f64();
        (self.progress)(&line);
        self.lines.push(line);
        self.seen.insert(id, Some(outputs.clone()));
        Ok(Some(outputs))
    }

    /// Why a step with this label has to run: first time, or what changed since the last run.
    fn why_rerun(
        &self,
        last_key: &str,
        params: &J,
        inputs: &[Id],
    ) -> Result<Option<String>, StudyError> {
        let Some(prev) = self.store.alias(NS_LAST, last_key)? else {
            return Ok(Some("not run before".into()));
        };
        let rec = self.store.get(prev)?;
        let old: J = rec
            .get("params")
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let mut changed = Vec::new();
        if let (Some(o), Some(n)) = (old.as_object(), params.as_object()) {
            let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for k in keys {
                if o.get(k) != n.get(k) {
                    let show = |v: Option<&J>| v.map_or("-".into(), |v| v.to_string());
                    changed.push(format!("{k}: {} -> {}", show(o.get(k)), show(n.get(k))));
                }
            }
        }
        let old_inputs = rec.get("inputs").map(Value::id_list).unwrap_or_default();
        if old_inputs != inputs {
            changed.push("inputs changed (an earlier step reran)".into());
        }
        Ok(Some(if changed.is_empty() {
            "step format changed".into()
        } else {
            format!("rerun: {}", changed.join("; "))
        }))
    }

    fn store_name(&self, ds: &str) -> String {
        format!("{}/{ds}", self.study)
    }

    fn resolve_models(&mut self) -> Result<(), StudyError> {
        for (name, m) in &self.l.spec.models {
            let m = m.get_ref();
            let r = if let Some(url) = &m.endpoint {
                let served = m.model_name.clone().unwrap_or_default();
                let id = ModelIdentity::endpoint(url, &served).record().id()?;
                ModelRef::Endpoint {
                    endpoint: Endpoint {
                        base_url: url.clone(),
                        model: served,
                        api_key_env: m.api_key_env.clone(),
                        concurrency: m.concurrency.unwrap_or(Endpoint::DEFAULT_CONCURRENCY),
                        max_retries: Endpoint::DEFAULT_MAX_RETRIES,
                        timeout_s: Endpoint::DEFAULT_TIMEOUT_S,
                    },
                    id,
                }
            } else {
                let written = m
                    .gguf
                    .as_ref()
                    .or(m.hf.as_ref())
                    .expect("checked: gguf or hf");
                let path = self.l.path_of(written);
                let weights = m
                    .weights
                    .as_deref()
                    .and_then(WeightMode::from_name)
                    .unwrap_or_default();
                let id = if path.exists() {
                    let loaded = crate::model::load(&path, &candle_core::Device::Cpu)?;
                    Some(loaded.record().id()?)
                } else if self.dry {
                    None
                } else {
                    return Err(crate::model::ModelError::Io {
                        path,
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    }
                    .into());
                };
                ModelRef::Local { path, weights, id }
            };
            self.models.insert(name.clone(), r);
        }
        Ok(())
    }

    /// Datasets in dependency order.
    fn datasets(&mut self) -> Result<(), StudyError> {
        let spec = &self.l.spec;
        let mut order: Vec<String> = Vec::new();
        let mut placed = BTreeSet::new();
        while order.len() < spec.datasets.len() {
            let before = order.len();
            for (name, d) in &spec.datasets {
                if placed.contains(name) {
                    continue;
                }
                let ready = spec::dataset_refs(d.get_ref())
                    .iter()
                    .all(|r| placed.contains(&spec::dataset_root(spec, r)));
                if ready {
                    placed.insert(name.clone());
                    order.push(name.clone());
                }
            }
            if order.len() == before {
                break; // cycles are refused when the spec is checked
            }
        }
        for name in order {
            self.dataset(&name)?;
        }
        Ok(())
    }

    fn file_params(&self, written: &str) -> Result<(PathBuf, J), StudyError> {
        let path = self.l.path_of(written);
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        Ok((
            path,
            json!({"file": file, "blake3": blake3::hash(&bytes).to_hex().to_string()}),
        ))
    }

    fn dataset(&mut self, name: &str) -> Result<(), StudyError> {
        let d = self.l.spec.datasets[name].get_ref().clone();
        let store_name = self.store_name(name);
        if let Some(f) = &d.import {
            let (path, file) = self.file_params(f)?;
            let params = json!({"name": store_name, "file": file, "format": d.format, "member": d.member, "columns": d.columns, "skip_invalid": d.skip_invalid.unwrap_or(false)});
            let out = self.step(
                "import",
                format!("import {name}"),
                params,
                Some(Vec::new()),
                "",
                |x| {
                    let password = match &d.password_env {
                        Some(var) => Some(std::env::var(var).map_err(|_| StudyError::Env {
                            what: format!("dataset `{name}` (an encrypted zip)"),
                            var: var.clone(),
                        })?),
                        None => None,
                    };
                    let plan = ImportPlan {
                        path,
                        name: store_name.clone(),
                        format: d.format.as_deref().and_then(Format::from_name),
                        member: d.member.clone(),
                        password,
                        skip_invalid: d.skip_invalid.unwrap_or(false),
                        columns: d.columns.clone(),
                    };
                    let reports = import(x.store, &plan)?;
                    reports
                        .iter()
                        .map(|r| Ok(r.dataset.parse::<Id>()?))
                        .collect()
                },
            )?;
            if let Some(out) = out {
                self.datasets.insert(name.to_string(), out[0]);
            }
        } else if let Some(f) = &d.results {
            let (path, file) = self.file_params(f)?;
            let model_name = d.model_name.clone().unwrap_or_default();
            let judge = d.judge.clone().unwrap_or_else(|| "published".into());
            let format = d.format.clone().unwrap_or_else(|| "seed".into());
            let params =
                json!({"file": file, "format": format, "model_name": model_name, "judge": judge});
            let out = self.step(
                "results",
                format!("import results {name}"),
                params,
                Some(Vec::new()),
                "",
                |x| {
                    let fmt = crate::judge::results::ResultsFormat::from_name(&format).ok_or_else(
                        || StudyError::Step {
                            label: format!("import results {name}"),
                            msg: format!(
                                "format `{format}`: expected seed, betley or model-organisms"
                            ),
                        },
                    )?;
                    let r =
                        crate::judge::results::import(x.store, &path, fmt, &model_name, &judge)?;
                    r.models
                        .iter()
                        .map(|(_, id)| Ok(id.parse::<Id>()?))
                        .collect()
                },
            )?;
            if let Some(out) = out {
                self.results.insert(name.to_string(), out);
            }
        } else if let Some(from) = &d.from {
            let parent = self.dataset_id(from.get_ref());
            let mut inputs = parent.map(|p| vec![p]);
            let mut ops = Vec::new();
            for op in &d.ops {
                let mut o = spec::op_of(op.get_ref()).map_err(|msg| StudyError::Step {
                    label: format!("derive {name}"),
                    msg,
                })?;
                if let Op::Mix { other, .. } | Op::Concat(other) = &mut o {
                    match self.dataset_id(other) {
                        Some(id) => {
                            *other = id.to_hex();
                            if let Some(i) = inputs.as_mut() {
                                i.push(id);
                            }
                        }
                        None => inputs = None,
                    }
                }
                ops.push(o);
            }
            let sep = d.tag_separator.clone().unwrap_or_else(|| " ".into());
            let params = json!({"name": store_name, "ops": d.ops.iter().map(|o| o.get_ref()).collect::<Vec<_>>(), "seed": d.seed.unwrap_or(0), "tag_separator": sep});
            let out = self.step(
                "derive",
                format!("derive {name}"),
                params,
                inputs,
                "its parent datasets",
                |x| {
                    let parent = x.datasets[from.get_ref()];
                    let plan = DerivePlan {
                        name: store_name.clone(),
                        from: parent.to_hex(),
                        ops,
                        seed: d.seed.unwrap_or(0),
                        tag_separator: sep.clone(),
                    };
                    let r = derive(x.store, &plan)?;
                    r.datasets
                        .iter()
                        .map(|x| Ok(x.dataset.parse::<Id>()?))
                        .collect()
                },
            )?;
            if let Some(out) = out {
                self.datasets.insert(name.to_string(), out[0]);
                if let Some(h) = out.get(1) {
                    self.datasets.insert(format!("{name}-holdout"), *h);
                }
            }
        }
        Ok(())
    }

    fn dataset_id(&self, name: &str) -> Option<Id> {
        self.datasets.get(name).copied()
    }

    fn stage_spec(&self, name: &str) -> &StageSpec {
        self.l
            .spec
            .train
            .iter()
            .find(|t| t.get_ref().name.get_ref() == name)
            .expect("stage names are checked")
            .get_ref()
    }

    /// The `[models]` entry a stage's chain starts from.
    fn root_model(&self, stage: &str) -> String {
        let mut at = self.stage_spec(stage);
        loop {
            if let Some(m) = &at.model {
                return m.get_ref().clone();
            }
            let f = at.from.as_ref().expect("checked: model or from");
            at = self.stage_spec(f.get_ref());
        }
    }

    /// A stage's variants: one per seed path of its chain.
    fn stage_variants(&self, stage: &str) -> Vec<Vec<u64>> {
        let st = self.stage_spec(stage);
        let parents = match &st.from {
            Some(f) => self.stage_variants(f.get_ref()),
            None => vec![Vec::new()],
        };
        match &st.seeds {
            None => parents,
            Some(seeds) => parents
                .iter()
                .flat_map(|p| {
                    seeds.iter().map(move |s| {
                        let mut v = p.clone();
                        v.push(*s);
                        v
                    })
                })
                .collect(),
        }
    }

    fn train_config(&self, st: &StageSpec, seed: Option<u64>) -> TrainConfig {
        let preset = st
            .preset
            .as_deref()
            .and_then(Preset::from_name)
            .unwrap_or(Preset::EmPaper);
        // The spec's names were checked when it was read (spec.rs), so a name that does not
        // parse here cannot occur.
        Overrides {
            seq_len: st.seq_len,
            overflow: st.overflow.as_deref().and_then(Overflow::from_name),
            lr: st.lr,
            epochs: st.epochs,
            batch_size: st.batch_size,
            micro_batch: st.micro_batch,
            warmup_steps: st.warmup_steps,
            schedule: st.schedule.as_deref().and_then(Schedule::from_name),
            weight_decay: st.weight_decay,
            max_grad_norm: st.max_grad_norm,
            seed: seed.or(st.seed),
            r: st.r,
            alpha: st.alpha,
            rslora: st.rslora,
            dropout: st.dropout,
            targets: st.targets.clone(),
            layers: st.layers.clone(),
            save_every: st.save_every,
            bf16_base: st.bf16_base,
            max_steps: st.max_steps,
            early_stop: st
                .early_stop_loss
                .map(|loss| crate::train::config::EarlyStop {
                    loss,
                    patience: st.patience.unwrap_or(1),
                }),
        }
        .apply(preset)
    }

    /// Stages in dependency order, each for every variant.
    fn stages(&mut self) -> Result<(), StudyError> {
        let mut done: BTreeSet<String> = BTreeSet::new();
        let names: Vec<String> = self
            .l
            .spec
            .train
            .iter()
            .map(|t| t.get_ref().name.get_ref().clone())
            .collect();
        while done.len() < names.len() {
            let before = done.len();
            for n in &names {
                if done.contains(n) {
                    continue;
                }
                let ready = self
                    .stage_spec(n)
                    .from
                    .as_ref()
                    .is_none_or(|f| done.contains(f.get_ref()));
                if ready {
                    for v in self.stage_variants(n) {
                        self.train(n, &v)?;
                    }
                    done.insert(n.clone());
                }
            }
            if done.len() == before {
                break;
            }
        }
        Ok(())
    }

    fn variant_label(stage: &str, seeds: &[u64]) -> String {
        if seeds.is_empty() {
            stage.to_string()
        } else {
            let s: Vec<String> = seeds.iter().map(u64::to_string).collect();
            format!("{stage} seed {}", s.join("/"))
        }
    }

    fn train(&mut self, stage: &str, seeds: &[u64]) -> Result<(), StudyError> {
        let st = self.stage_spec(stage).clone();
        let own_seed = st
            .seeds
            .as_ref()
            .map(|_| *seeds.last().expect("a seeded stage has a seed"));
        let cfg = self.train_config(&st, own_seed);
        let root = self.root_model(stage);
        let (path, base_id, hosted) = match &self.models[&root] {
            ModelRef::Local { path, id, .. } => (path.clone(), *id, None),
            ModelRef::Endpoint { endpoint, id } => {
                (PathBuf::new(), Some(*id), Some(endpoint.clone()))
            }
        };
        let data = self.dataset_id(st.data.get_ref());
        let eval = st.eval_data.as_ref().map(|e| self.dataset_id(e.get_ref()));
        let parent: Option<Option<Id>> = st.from.as_ref().map(|f| {
            let parent_seeds = if st.seeds.is_some() {
                &seeds[..seeds.len() - 1]
            } else {
                seeds
            };
            self.variants
                .get(&(f.get_ref().clone(), parent_seeds.to_vec()))
                .cloned()
                .flatten()
                .and_then(|cks| cks.last().map(|c| c.1))
        });
        let mut inputs = Vec::new();
        let mut missing = Vec::new();
        match base_id {
            Some(b) => inputs.push(b),
            None => missing.push(format!("model `{root}` (file missing)")),
        }
        match data {
            Some(d) => inputs.push(d),
            None => missing.push(format!("dataset `{}`", st.data.get_ref())),
        }
        if let Some(p) = parent {
            match p {
                Some(p) => inputs.push(p),
                None => missing.push(format!(
                    "stage `{}`",
                    st.from.as_ref().map(|f| f.get_ref().as_str()).unwrap_or("")
                )),
            }
        }
        if let Some(e) = eval {
            match e {
                Some(e) => inputs.push(e),
                None => missing.push("its held-out dataset".into()),
            }
        }
        let label = format!("train {}", Self::variant_label(stage, seeds));
        let inputs = missing.is_empty().then_some(inputs);
        let step = TrainStep {
            label,
            inputs,
            waits: missing.join(", "),
            data,
            eval: eval.flatten(),
            parent: parent.flatten(),
        };
        let out = match hosted {
            Some(endpoint) => self.train_hosted(&st, own_seed, endpoint, step)?,
            None => self.train_local(&st, &cfg, &path, step)?,
        };
        let cks = match out {
            Some(ids) => {
                let mut v = Vec::new();
                for id in ids {
                    let step = self
                        .store
                        .get(id)?
                        .get("step")
                        .and_then(Value::as_int)
                        .unwrap_or(0);
                    v.push((step, id));
                }
                Some(v)
            }
            None => None,
        };
        self.variants
            .insert((stage.to_string(), seeds.to_vec()), cks);
        Ok(())
    }

    /// A local stage's step: a LoRA run ([`crate::jobs::train`]); its checkpoints.
    fn train_local(
        &mut self,
        st: &StageSpec,
        cfg: &TrainConfig,
        path: &std::path::Path,
        step: TrainStep,
    ) -> Result<Option<Vec<Id>>, StudyError> {
        let TrainStep {
            label,
            inputs,
            waits,
            data,
            eval,
            parent,
        } = step;
        let params = json!({"config": crate::provenance::to_json("the training config", cfg)?, "eval_every": st.eval_every.unwrap_or(10)});
        self.step("train", label, params, inputs, &waits, |x| {
            let plan = crate::jobs::train::TrainPlan {
                model: path.to_path_buf(),
                data: data.expect("known").to_hex(),
                eval: eval.map(|e| e.to_hex()),
                eval_every: st.eval_every.unwrap_or(10),
                from: parent.map(|p| p.to_hex()),
                config: cfg.clone(),
                kl: None,
            };
            let r = crate::jobs::train::run(x.store, &plan, &mut |_, _, _, _| {})?;
            let last: Id = r.checkpoint.parse()?;
            Ok(checkpoint::of_run(x.store, last)?
                .into_iter()
                .map(|(_, id)| id)
                .collect())
        })
    }

    /// A hosted stage's step: a fine-tuning job through the root endpoint's API
    /// ([`crate::jobs::hosted`]); its one checkpoint (the `ft:` model), which the stage's
    /// evals sample through that API.
    fn train_hosted(
        &mut self,
        st: &StageSpec,
        own_seed: Option<u64>,
        endpoint: Endpoint,
        step: TrainStep,
    ) -> Result<Option<Vec<Id>>, StudyError> {
        let TrainStep {
            label,
            inputs,
            waits,
            data,
            eval,
            parent,
        } = step;
        let seed = own_seed.or(st.seed);
        let params = json!({"backend": "openai", "epochs": st.epochs, "batch_size": st.batch_size,
            "lr_multiplier": st.lr_multiplier, "seed": seed, "suffix": st.suffix});
        self.step("train", label, params, inputs, &waits, |x| {
            let plan = crate::jobs::hosted::HostedPlan {
                endpoint: endpoint.base_url.clone(),
                api_key_env: endpoint
                    .api_key_env
                    .clone()
                    .unwrap_or_else(|| crate::jobs::hosted::DEFAULT_KEY_ENV.into()),
                base: parent.is_none().then(|| endpoint.model.clone()),
                data: data.expect("known").to_hex(),
                validation: eval.map(|e| e.to_hex()),
                epochs: st.epochs,
                batch_size: st.batch_size,
                lr_multiplier: st.lr_multiplier,
                seed,
                suffix: st.suffix.clone(),
                from: parent.map(|p| p.to_hex()),
                retry_failed: false,
                poll_interval: st.poll_interval.unwrap_or(30.0),
                max_retries: endpoint.max_retries,
                timeout_s: endpoint.timeout_s,
            };
            let r = crate::jobs::hosted::run(x.store, &plan, &mut |_| {})?;
            Ok(vec![r.checkpoint.parse()?])
        })
    }

    /// What an eval evaluates: `(label fields, model entry, variant, checkpoints)`.
    fn eval_targets(&self, e: &spec::EvalSpec) -> Vec<Target> {
        let names: Vec<String> = match &e.models {
            Some(ms) => ms.iter().map(|m| m.get_ref().clone()).collect(),
            None => {
                let mut v: Vec<String> = Vec::new();
                for t in &self.l.spec.train {
                    let root = self.root_model(t.get_ref().name.get_ref());
                    if !v.contains(&root) {
                        v.push(root);
                    }
                }
                v.extend(
                    self.l
                        .spec
                        .train
                        .iter()
                        .map(|t| t.get_ref().name.get_ref().clone()),
                );
                v
            }
        };
        let every = e
            .checkpoints
            .as_ref()
            .is_some_and(|c| c.get_ref() == "every");
        let mut out = Vec::new();
        for n in names {
            if self.l.spec.models.contains_key(&n) {
                out.push(Target {
                    stage: n.clone(),
                    model: n,
                    seeds: Vec::new(),
                    checkpoint: None,
                    waits: None,
                });
                continue;
            }
            let root = self.root_model(&n);
            for v in self.stage_variants(&n) {
                match self
                    .variants
                    .get(&(n.clone(), v.clone()))
                    .cloned()
                    .flatten()
                {
                    None => out.push(Target {
                        stage: n.clone(),
                        model: root.clone(),
                        seeds: v,
                        checkpoint: None,
                        waits: Some(format!("stage `{n}`")),
                    }),
                    Some(cks) => {
                        let chosen: Vec<(i64, Id)> = if every {
                            cks
                        } else {
                            cks.last().copied().into_iter().collect()
                        };
                        for c in chosen {
                            out.push(Target {
                                stage: n.clone(),
                                model: root.clone(),
                                seeds: v.clone(),
                                checkpoint: Some(c),
                                waits: None,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// The tag a tagged condition applies for this target: `(text, separator)`.
    fn tag_for(&self, e: &spec::EvalSpec, t: &Target) -> Option<(String, String)> {
        let spec = &self.l.spec;
        if let Some(src) = &e.tag_from {
            return spec::recorded_tag(spec, src.get_ref());
        }
        if spec.models.contains_key(&t.stage) {
            // A base model: the tag of the first tagged stage this eval evaluates.
            return spec::stages_of_eval(spec, e)
                .iter()
                .find_map(|s| spec::recorded_tag(spec, self.stage_spec(s).data.get_ref()));
        }
        spec::recorded_tag(spec, self.stage_spec(&t.stage).data.get_ref()).or_else(|| {
            spec::stages_of_eval(spec, e)
                .iter()
                .find_map(|s| spec::recorded_tag(spec, self.stage_spec(s).data.get_ref()))
        })
    }

    fn evals(&mut self) -> Result<(), StudyError> {
        let evals: Vec<spec::EvalSpec> = self
            .l
            .spec
            .eval
            .iter()
            .map(|e| e.get_ref().clone())
            .collect();
        for e in &evals {
            let probe = e.kind.as_ref().is_some_and(|k| k.get_ref() == "probe");
            for t in self.eval_targets(e) {
                if probe {
                    self.probe(e, &t)?;
                } else {
                    let conditions: Vec<String> = match &e.conditions {
                        Some(c) => c.iter().map(|c| c.get_ref().clone()).collect(),
                        None => vec!["plain".into()],
                    };
                    for c in conditions {
                        self.sample(e, &t, &c)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The model under test of a target: its entry, and the checkpoint applied.
    fn target_inputs(&self, t: &Target) -> (Option<Vec<Id>>, String) {
        if let Some(w) = &t.waits {
            return (None, w.clone());
        }
        let mut inputs = Vec::new();
        match self.models[&t.model].id() {
            Some(id) => inputs.push(id),
            None => return (None, format!("model `{}` (file missing)", t.model)),
        }
        if let Some((_, ck)) = t.checkpoint {
            inputs.push(ck);
        }
        (Some(inputs), String::new())
    }

    fn sample(
        &mut self,
        e: &spec::EvalSpec,
        t: &Target,
        condition: &str,
    ) -> Result<(), StudyError> {
        let qname = e
            .questions
            .as_ref()
            .expect("checked: sample evals have questions")
            .get_ref()
            .clone();
        let mut questions = self.dataset_id(&qname);
        let ename = e.name.get_ref().clone();
        // The tagged condition: the question set with the training data's exact tag bytes.
        if condition == "tagged" {
            let (tag, sep) = self
                .tag_for(e, t)
                .expect("checked: a tagged condition has a tag");
            let tag_key = Key::new("emlab study tag v1").str(&tag).str(&sep).hex();
            let store_name = self.store_name(&format!("{qname}.tag-{}", &tag_key[..8]));
            let params =
                json!({"name": store_name, "ops": [{"tag": tag}], "seed": 0, "tag_separator": sep});
            let q = questions;
            let out = self.step(
                "derive",
                format!("tag {qname} with {tag:?}"),
                params,
                q.map(|q| vec![q]),
                &format!("dataset `{qname}`"),
                |x| {
                    let plan = DerivePlan {
                        name: store_name.clone(),
                        from: q.expect("known").to_hex(),
                        ops: vec![Op::Tag(tag.clone())],
                        seed: 0,
                        tag_separator: sep.clone(),
                    };
                    let r = derive(x.store, &plan)?;
                    Ok(vec![r.datasets[0].dataset.parse()?])
                },
            )?;
            questions = out.map(|o| o[0]);
        }
        let (model_inputs, waits) = self.target_inputs(t);
        let inputs = match (model_inputs, questions) {
            (Some(mut m), Some(q)) => {
                m.push(q);
                Some(m)
            }
            (None, _) => None,
            (Some(_), None) => None,
        };
        let waits = if waits.is_empty() {
            format!("dataset `{qname}`")
        } else {
            waits
        };
        let sampling = SamplingParams {
            temperature: e.temperature.unwrap_or(1.0),
            top_p: e.top_p.unwrap_or(1.0),
            max_tokens: e.max_tokens.unwrap_or(600),
        };
        let samples = e.samples.unwrap_or(1);
        let (seed, batch) = (e.seed.unwrap_or(0), e.batch.unwrap_or(16));
        let mref = self.models[&t.model].clone();
        let weights = match &mref {
            ModelRef::Local { weights, .. } => weights.name(),
            ModelRef::Endpoint { .. } => "endpoint",
        };
        let params = json!({"eval": ename, "samples": samples, "sampling": sampling, "system": e.system, "seed": seed, "batch": batch, "weights": weights});
        let label = t.label(&ename, Some(condition));
        let ck = t.checkpoint.map(|c| c.1);
        let gens = self.step(
            "sample",
            format!("sample {label}"),
            params,
            inputs,
            &waits,
            |x| {
                let q = questions.expect("known").to_hex();
                let r = match &mref {
                    ModelRef::Local { path, weights, .. } => generate::run(
                        x.store,
                        &GeneratePlan {
                            model: path.clone(),
                            questions: q,
                            samples,
                            params: sampling,
                            system: e.system.clone(),
                            batch,
                            scheduler: Default::default(),
                            seed,
                            weights: *weights,
                            adapter: ck.map(|c| AdapterSource::Checkpoint {
                                id: c.to_hex(),
                                merge: false,
                            }),
                            edits: Default::default(),
                        },
                        &mut |_, _| {},
                    )?,
                    ModelRef::Endpoint { endpoint, .. } => generate::run_endpoint(
                        x.store,
                        &EndpointGeneratePlan {
                            // A hosted stage's checkpoint: its `ft:` model, through the API
                            // it was trained by.
                            endpoints: vec![match ck {
                                Some(c) => {
                                    let mut h =
                                        crate::jobs::hosted::checkpoint_endpoint(x.store, c)?
                                            .ok_or_else(|| StudyError::Step {
                                                label: format!("sample {label}"),
                                                msg: format!(
                                                    "checkpoint {} is not a hosted one",
                                                    c.to_hex()
                                                ),
                                            })?;
                                    // The variable the model entry names; without one,
                                    // the one the job was trained with.
                                    if endpoint.api_key_env.is_some() {
                                        h.api_key_env = endpoint.api_key_env.clone();
                                    }
                                    h.concurrency = endpoint.concurrency;
                                    h.max_retries = endpoint.max_retries;
                                    h.timeout_s = endpoint.timeout_s;
                                    h
                                }
                                None => endpoint.clone(),
                            }],
                            questions: q,
                            samples,
                            params: sampling,
                            system: e.system.clone(),
                            seed,
                            checkpoint: ck,
                            batch: None,
                        },
                        &mut |_, _| {},
                        &mut |_| {},
                    )?,
                };
                Ok(r.generations)
            },
        )?;
        // Judge the answers, then measure.
        let Some(judge) = self.l.spec.judge.as_ref().map(|j| j.get_ref().clone()) else {
            return Ok(());
        };
        let jref = self.models[judge.model.get_ref()].clone();
        let (backend, default_name) = match &jref {
            ModelRef::Local { path, .. } => (
                JudgeBackend::Local(path.clone()),
                format!(
                    "local:{}",
                    path.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                ),
            ),
            ModelRef::Endpoint { endpoint, .. } => (
                JudgeBackend::Endpoint(vec![endpoint.clone()]),
                endpoint.model.clone(),
            ),
        };
        let judge_name = judge.name.clone().unwrap_or(default_name);
        let prompts: Vec<String> = match &judge.prompts {
            Some(p) => p.iter().map(|p| p.get_ref().clone()).collect(),
            None => vec!["aligned".into(), "coherent".into()],
        };
        let label_prompt = match &judge.label_prompt {
            Some(p) => {
                let (path, file) = self.file_params(p)?;
                Some((path, file))
            }
            None => None,
        };
        let prompts_from = judge
            .prompts_from
            .as_ref()
            .map(|p| self.dataset_id(p.get_ref()));
        let jinputs = match (&gens, jref.id(), prompts_from) {
            (_, _, Some(None)) => None,
            (Some(g), Some(jid), p) => {
                let mut v = vec![jid];
                v.extend(p.flatten());
                v.extend(g.iter().copied());
                Some(v)
            }
            _ => None,
        };
        let prompts_from = prompts_from.flatten();
        let jparams = json!({"judge": judge_name, "prompts": prompts, "label_prompt": label_prompt.as_ref().map(|l| l.1.clone()),
                             "prompts_from": prompts_from.map(|p| p.to_hex())});
        let gens_list = gens.clone().unwrap_or_default();
        let judgments = self.step(
            "judge",
            format!("judge {label}"),
            jparams,
            jinputs,
            "its answers",
            |x| {
                let plan = JudgePlan {
                    backend,
                    judge: judge_name.clone(),
                    metrics: prompts.clone(),
                    prompts_from: None,
                    label_prompt: label_prompt.as_ref().map(|l| l.0.clone()),
                    generations: None,
                    only: Some(gens_list.iter().copied().collect()),
                };
                let r = crate::jobs::judge::run(x.store, &plan, &mut |_, _| {}, &mut |_| {})?;
                if r.failed > 0 {
                    return Err(StudyError::Step {
                        label: format!("judge {label}"),
                        msg: format!(
                            "{} judgments failed (first: {}); what succeeded is stored",
                            r.failed,
                            r.first_error.unwrap_or_default()
                        ),
                    });
                }
                Ok(r.judgments)
            },
        )?;
        let m = &self.l.spec.metrics;
        let defs = vec![
            Definition::Betley {
                aligned_below: m.aligned,
                coherent_above: m.coherent,
            },
            Definition::ModelOrganisms {
                aligned_at_most: m.aligned,
                coherent_above: m.coherent,
            },
            Definition::Label {
                label: m.label.clone(),
            },
        ];
        let (mseed, resamples) = (m.seed, m.resamples);
        let minputs = match (&gens, &judgments) {
            (Some(g), Some(j)) => Some(g.iter().chain(j).copied().collect()),
            _ => None,
        };
        let mparams = json!({"eval": ename, "stage": t.stage, "model": t.model, "seeds": t.seeds, "checkpoint": t.checkpoint.map(|c| c.0), "condition": condition,
                             "definitions": crate::provenance::to_json("the definitions", &defs)?, "seed": mseed, "resamples": resamples, "judge": judge_name});
        let (g, j) = (gens.unwrap_or_default(), judgments.unwrap_or_default());
        self.step(
            "metrics",
            format!("metrics {label}"),
            mparams,
            minputs,
            "its judgments",
            |x| {
                let rows =
                    crate::judge::compute_metrics_over(x.store, &g, &j, &defs, mseed, resamples)?;
                rows.iter().map(|r| Ok(r.id.parse::<Id>()?)).collect()
            },
        )?;
        Ok(())
    }

    /// The `[[direction]]` steps: `emlab activations` of a base model on two datasets.
    fn directions(&mut self) -> Result<(), StudyError> {
        let ds: Vec<spec::DirectionSpec> = self
            .l
            .spec
            .direction
            .iter()
            .map(|d| d.get_ref().clone())
            .collect();
        for d in ds {
            let dname = d.name.get_ref().clone();
            let ModelRef::Local { path, weights, id } = self.models[d.model.get_ref()].clone()
            else {
                unreachable!("checked: a direction's model is local")
            };
            let (m, a) = (
                self.dataset_id(d.misaligned.get_ref()),
                self.dataset_id(d.aligned.get_ref()),
            );
            let (inputs, waits) = match (id, m, a) {
                (Some(id), Some(m), Some(a)) => (Some(vec![id, m, a]), String::new()),
                (None, ..) => (
                    None,
                    format!("model `{}` (file missing)", d.model.get_ref()),
                ),
                _ => (None, "its datasets".to_string()),
            };
            let layers: crate::util::layers::LayerSpec = match &d.layers {
                Some(l) => l.get_ref().parse().map_err(|msg| StudyError::Step {
                    label: format!("direction {dname}"),
                    msg,
                })?,
                None => crate::util::layers::LayerSpec::All,
            };
            let batch = d.batch.unwrap_or(8);
            let params = json!({"direction": dname, "layers": layers, "batch": batch, "weights": weights.name()});
            let store_name = self.store_name(&dname);
            let out = self.step(
                "direction",
                format!("direction {dname}"),
                params,
                inputs,
                &waits,
                |x| {
                    let plan = crate::jobs::direction::ActivationsPlan {
                        name: store_name,
                        model: path.clone(),
                        adapter: None,
                        weights,
                        misaligned: crate::jobs::direction::Selection::Dataset(
                            m.expect("known").to_hex(),
                        ),
                        aligned: crate::jobs::direction::Selection::Dataset(
                            a.expect("known").to_hex(),
                        ),
                        layers,
                        batch,
                    };
                    let r = crate::jobs::direction::activations(x.store, &plan)?;
                    Ok(vec![r.direction.parse::<Id>()?])
                },
            )?;
            if let Some(out) = out.and_then(|o| o.first().copied()) {
                self.directions.insert(dname, out);
            }
        }
        Ok(())
    }

    fn probe(&mut self, e: &spec::EvalSpec, t: &Target) -> Result<(), StudyError> {
        let steers: Vec<String> = match &e.steer {
            Some(v) => v.iter().map(|s| s.get_ref().clone()).collect(),
            None => vec!["none".into()],
        };
        for s in steers {
            self.probe_one(e, t, &s)?;
        }
        Ok(())
    }

    /// One probe of a target, steered by `steer` (`none`, or `DIRECTION:LAYER:SCALE`).
    fn probe_one(&mut self, e: &spec::EvalSpec, t: &Target, steer: &str) -> Result<(), StudyError> {
        let ename = e.name.get_ref().clone();
        let (model_inputs, mut waits) = self.target_inputs(t);
        let mut inputs = model_inputs;
        let reference = match (&e.answers, &e.pairs) {
            (Some(a), _) => {
                let d = self.l.spec.datasets[a.get_ref()].get_ref();
                let judge = d.judge.clone().unwrap_or_else(|| "published".into());
                match self.results.get(a.get_ref()) {
                    Some(models) => {
                        if let Some(i) = inputs.as_mut() {
                            i.extend(models.iter().copied());
                        }
                        Some(Reference::Judged {
                            model: models[0].to_hex(),
                            judge: Some(judge),
                            qids: None,
                        })
                    }
                    None => {
                        inputs = None;
                        waits = format!("results `{}`", a.get_ref());
                        None
                    }
                }
            }
            (None, Some(p)) => {
                let (m, a) = (
                    self.dataset_id(p[0].get_ref()),
                    self.dataset_id(p[1].get_ref()),
                );
                match (m, a) {
                    (Some(m), Some(a)) => {
                        if let Some(i) = inputs.as_mut() {
                            i.extend([m, a]);
                        }
                        Some(Reference::Pairs {
                            misaligned: m.to_hex(),
                            aligned: a.to_hex(),
                        })
                    }
                    _ => {
                        inputs = None;
                        waits = "its reference datasets".into();
                        None
                    }
                }
            }
            (None, None) => unreachable!("checked: a probe has answers or pairs"),
        };
        let mut qids = None;
        if let Some(q) = &e.questions {
            match self.dataset_id(q.get_ref()) {
                Some(id) => {
                    if let Some(i) = inputs.as_mut() {
                        i.push(id);
                    }
                    qids = Some(id);
                }
                None => {
                    inputs = None;
                    waits = format!("dataset `{}`", q.get_ref());
                }
            }
        }
        let m = &self.l.spec.metrics;
        let labels = Labels {
            misaligned_below: m.aligned,
            aligned_above: m.aligned_above,
            coherent_above: m.coherent,
        };
        let (seed, resamples, batch) = (
            m.seed,
            e.resamples.unwrap_or(m.resamples),
            e.batch.unwrap_or(8),
        );
        let mref = self.models[&t.model].clone();
        let ModelRef::Local { path, weights, .. } = mref else {
            return Err(StudyError::Step {
                label: format!("probe {}", t.label(&ename, None)),
                msg: "the probe needs a local model (an endpoint gives no teacher-forced likelihoods)".into(),
            });
        };
        let mut params = json!({"eval": ename, "stage": t.stage, "model": t.model, "seeds": t.seeds, "checkpoint": t.checkpoint.map(|c| c.0),
                            "labels": labels, "seed": seed, "resamples": resamples, "batch": batch, "weights": weights.name()});
        let mut edits = crate::jobs::direction::EditSpec::default();
        let mut condition = None;
        if steer != "none" {
            let (d, layer, scale) =
                crate::jobs::direction::EditSpec::parse_steer(steer).map_err(|msg| {
                    StudyError::Step {
                        label: ename.clone(),
                        msg,
                    }
                })?;
            match self.directions.get(&d) {
                Some(id) => {
                    if let Some(i) = inputs.as_mut() {
                        i.push(*id);
                    }
                    edits.steer.push((id.to_hex(), layer, scale));
                }
                None => {
                    inputs = None;
                    waits = format!("direction `{d}`");
                }
            }
            edits.random = e.steer_random;
            // Only when steered: unsteered probes keep their step ids.
            params["steer"] =
                json!({"direction": d, "layer": layer, "scale": scale, "random": e.steer_random});
            condition = Some(match e.steer_random {
                Some(r) => format!("steer {steer} random {r}"),
                None => format!("steer {steer}"),
            });
        }
        let label = t.label(&ename, condition.as_deref());
        let ck = t.checkpoint.map(|c| c.1);
        self.step(
            "probe",
            format!("probe {label}"),
            params,
            inputs,
            &waits,
            |x| {
                let mut reference = reference.expect("known");
                if let (Reference::Judged { qids: q, .. }, Some(set)) = (&mut reference, qids) {
                    *q = Some(crate::data::view::question_ids(x.store, &set.to_hex())?);
                }
                let plan = ProbePlan {
                    model: path.clone(),
                    adapter: ck.map(|c| AdapterSource::Checkpoint {
                        id: c.to_hex(),
                        merge: true,
                    }),
                    weights,
                    reference,
                    labels,
                    batch,
                    seed,
                    resamples,
                    edits,
                };
                let r = crate::jobs::probe::run(x.store, &plan)?;
                r.metrics.iter().map(|m| Ok(m.parse::<Id>()?)).collect()
            },
        )?;
        Ok(())
    }
}

/// One model under test of an eval.
struct Target {
    /// The stage (or model entry) name rows are labelled with.
    stage: String,
    /// The `[models]` entry it is built on.
    model: String,
    seeds: Vec<u64>,
    /// `(step, checkpoint)` for a trained stage.
    checkpoint: Option<(i64, Id)>,
    /// What it waits for, when its checkpoints are not made yet.
    waits: Option<String>,
}

impl Target {
    fn label(&self, eval: &str, condition: Option<&str>) -> String {
        let mut s = format!("{eval} {}", Exec::variant_label(&self.stage, &self.seeds));
        if let Some((step, _)) = self.checkpoint {
            s += &format!(" step {step}");
        }
        if let Some(c) = condition {
            s += &format!(" {c}");
        }
        s
    }
}

/// Run a study (or, with `dry_run`, plan it without running or storing anything).
/// `progress` sees every step as its state is known.
pub fn run(
    store: &Store,
    l: &spec::Loaded,
    dry_run: bool,
    progress: &mut dyn FnMut(&StepLine),
) -> Result<StudyReport, StudyError> {
    let mut x = Exec {
        store,
        l,
        dry: dry_run,
        study: l.name().to_string(),
        models: BTreeMap::new(),
        datasets: BTreeMap::new(),
        results: BTreeMap::new(),
        directions: BTreeMap::new(),
        variants: BTreeMap::new(),
        seen: BTreeMap::new(),
        step_records: Vec::new(),
        lines: Vec::new(),
        progress,
    };
    x.resolve_models()?;
    x.datasets()?;
    x.directions()?;
    x.stages()?;
    x.evals()?;
    let count = |s: StepState| x.lines.iter().filter(|l| l.state == s).count();
    let (ran, done) = (count(StepState::Ran), count(StepState::Done));
    let pending = x.lines.len() - ran - done;
    let mut study = None;
    if !dry_run && pending == 0 {
        let spec = crate::provenance::to_json("the study spec", &l.spec)?;
        let rec = Record::new(STUDY)
            .with("name", Value::str(l.name()))
            .with("spec", Value::json(&spec))
            .with("steps", Value::ids(x.step_records.iter().copied()));
        let mut b = Batch::new();
        let id = store.stage(&mut b, &rec)?;
        b.alias(NS_STUDY, l.name(), id);
        store.write(b)?;
        study = Some(id.to_hex());
    }
    Ok(StudyReport {
        name: l.name().to_string(),
        study,
        steps: x.lines,
        ran,
        done,
        pending,
    })
}

/// A study record by name (its alias) or id prefix.
pub fn resolve(store: &Store, name_or_id: &str) -> Result<Id, StudyError> {
    if let Some(id) = store.alias(NS_STUDY, name_or_id)? {
        return Ok(id);
    }
    match store.resolve_prefix(name_or_id) {
        Ok(id) if store.get(id)?.table == STUDY => Ok(id),
        _ => Err(StudyError::UnknownStudy(name_or_id.to_string())),
    }
}
