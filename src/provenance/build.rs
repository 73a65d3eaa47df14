//! Record builders for the tables several jobs write. Each function assembles one table's
//! fields in one place, so a `model` or `generation` record means the same thing whichever
//! verb wrote it, and its id depends on its content alone.

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use super::tables::{BENCH, CONVERSATION, GENERATION, JUDGMENT, MESSAGE, MODEL, RUN};

/// One weight (or config) file of a model: its name, BLAKE3 and size.
#[derive(Debug, Clone, PartialEq)]
pub struct FileHash {
    pub name: Option<String>,
    pub blake3: String,
    pub size: u64,
}

/// What identifies a set of weights: the `model` record's content.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIdentity {
    /// A display name (the GGUF's `general.name`, the folder's name, `base + adapter`).
    pub name: String,
    /// `llama`, `qwen2`, `endpoint`, `external`.
    pub architecture: String,
    pub files: Vec<FileHash>,
    pub tokenizer_blake3: Option<String>,
    /// Architecture hyper-parameters, plus `adapter` when one is applied.
    pub config: J,
}

impl ModelIdentity {
    /// The `model` record.
    pub fn record(&self) -> Record {
        let files: Vec<J> = self
            .files
            .iter()
            .map(|f| json!({"name": f.name, "blake3": f.blake3, "size": f.size}))
            .collect();
        let mut r = Record::new(MODEL)
            .with("name", Value::str(&self.name))
            .with("architecture", Value::str(&self.architecture))
            .with("files", Value::json(&J::Array(files)));
        if let Some(t) = &self.tokenizer_blake3 {
            r = r.with("tokenizer_blake3", Value::str(t));
        }
        r.with("config", Value::json(&self.config))
    }

    /// A model served by an OpenAI-compatible endpoint: named by the endpoint and the served
    /// model's name (the weights behind it are the server's business).
    pub fn endpoint(base_url: &str, served_model: &str) -> ModelIdentity {
        ModelIdentity {
            name: served_model.to_string(),
            architecture: "endpoint".into(),
            files: Vec::new(),
            tokenizer_blake3: None,
            config: json!({"base_url": base_url, "served_model": served_model}),
        }
    }

    /// A model known only by answers judged elsewhere (published results): named as the
    /// researcher names it, with the results file it came from in `config`.
    pub fn external(name: &str, config: J) -> ModelIdentity {
        ModelIdentity {
            name: name.to_string(),
            architecture: "external".into(),
            files: Vec::new(),
            tokenizer_blake3: None,
            config,
        }
    }
}

/// Stage the `message` records of a conversation and the `conversation` record naming them
/// in order (with the source row's other keys as `extra`); returns the conversation's id.
pub fn stage_conversation(
    store: &Store,
    batch: &mut Batch,
    messages: &[(String, String)],
    extra: Option<&J>,
) -> emlab_store::Result<Id> {
    let mut ids = Vec::with_capacity(messages.len());
    for (role, content) in messages {
        let m = Record::new(MESSAGE)
            .with("role", Value::str(role))
            .with("content", Value::str(content));
        ids.push(store.stage(batch, &m)?);
    }
    let mut c = Record::new(CONVERSATION).with("messages", Value::ids(ids));
    if let Some(e) = extra {
        c = c.with("extra", Value::json(e));
    }
    store.stage(batch, &c)
}

/// The content of a `generation` record.
#[derive(Debug, Clone)]
pub struct Generation<'a> {
    /// The model (or base + adapter) record that produced it.
    pub model: Id,
    /// The conversation sent.
    pub prompt: Id,
    /// The question it answers, when it answers one.
    pub question: Option<Id>,
    /// Every sampling parameter, the rendered prompt and where the sample sits.
    pub params: &'a J,
    pub seed: i64,
    pub text: &'a str,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub finish_reason: Option<&'a str>,
}

impl Generation<'_> {
    pub fn record(&self) -> Record {
        let mut r = Record::new(GENERATION)
            .with("model", Value::Id(self.model))
            .with("prompt", Value::Id(self.prompt));
        if let Some(q) = self.question {
            r = r.with("question", Value::Id(q));
        }
        r = r
            .with("params", Value::json(self.params))
            .with("seed", Value::Int(self.seed))
            .with("text", Value::str(self.text));
        if let Some(n) = self.prompt_tokens {
            r = r.with("prompt_tokens", Value::Int(n));
        }
        if let Some(n) = self.completion_tokens {
            r = r.with("completion_tokens", Value::Int(n));
        }
        if let Some(f) = self.finish_reason {
            r = r.with("finish_reason", Value::str(f));
        }
        r
    }
}

/// The content of a `judgment` record.
#[derive(Debug, Clone)]
pub struct Judgment<'a> {
    pub generation: Id,
    pub judge: &'a str,
    pub metric: &'a str,
    /// The filled judge prompt (empty for verdicts imported from elsewhere).
    pub prompt: &'a str,
    pub score: Option<f64>,
    pub label: Option<&'a str>,
    pub raw: J,
}

impl Judgment<'_> {
    pub fn record(&self) -> Record {
        let mut r = Record::new(JUDGMENT)
            .with("generation", Value::Id(self.generation))
            .with("judge", Value::str(self.judge))
            .with("metric", Value::str(self.metric))
            .with("prompt", Value::str(self.prompt))
            .with("raw", Value::json(&self.raw));
        if let Some(s) = self.score {
            r = r.with("score", Value::Float(s));
        }
        if let Some(l) = self.label {
            r = r.with("label", Value::str(l));
        }
        r
    }
}

/// A `run` record: one invocation of a job (`generate`, `train`, ...), the plan it ran and
/// the records it read.
pub fn run(kind: &str, plan: &J, inputs: impl IntoIterator<Item = Id>) -> Record {
    Record::new(RUN)
        .with("kind", Value::str(kind))
        .with("plan", Value::json(plan))
        .with("inputs", Value::ids(inputs))
}

/// A `bench` record: what was measured, its parameters and figures, and the machine, time
/// and commit they were measured at.
pub fn bench(name: &str, params: &J, results: &J) -> Record {
    use crate::util::{machine, time};
    let mut r = Record::new(BENCH)
        .with("name", Value::str(name))
        .with("params", Value::json(params))
        .with("results", Value::json(results))
        .with("machine", Value::json(&machine::describe()))
        .with("time", Value::str(time::now_rfc3339()));
    if let Some(c) = machine::commit() {
        r = r.with("commit", Value::str(c));
    }
    r
}
