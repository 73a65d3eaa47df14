//! `emlab data generate`: build a dataset with an LLM (the seed project made its 1,600-row
//! AI-optimism set this way). A prompt template (minijinja, variables `i` and `seed`) is sent
//! N times through the same endpoint client and request stream as sampling; each answer must
//! be a JSON object with `question` and `answer` (or a list of them) and becomes a
//! user/assistant row. The raw answers are `generation` records keyed like samples, so a
//! rerun resumes; the dataset's provenance names the generator model, the prompt file (as a
//! source) and the seed.

use std::path::PathBuf;

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::{json, Value as J};

use crate::data::chat::ChatRow;
use crate::data::{check_name, stage_chat_rows, DataError};
use crate::endpoint::client::content;
use crate::endpoint::{stream, Client, ClientError, Endpoint};
use crate::provenance::build::{stage_conversation, Generation, ModelIdentity};
use crate::provenance::key::{generation_key, legacy, NS_SYNTH};
use crate::provenance::tables::{DATASET, NS_DATASET, SOURCE};
use crate::util::hint::Hint;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("{0} (answers received are stored; rerun to resume)")]
    Client(#[from] ClientError),
    #[error("{path}: {msg}")]
    Template { path: PathBuf, msg: String },
    #[error("no answer parsed as JSON with `question` and `answer` ({0} answers)")]
    NothingParsed(usize),
}

impl Hint for SynthError {
    fn hint(&self) -> Option<String> {
        match self {
            SynthError::Data(e) => e.hint(),
            SynthError::Store(e) => e.hint(),
            SynthError::Client(e) => e.hint(),
            SynthError::NothingParsed(_) => Some(
                "ask for JSON in the prompt, e.g. `answer as JSON: {\"question\": ..., \"answer\": ...}`".into(),
            ),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthPlan {
    pub name: String,
    pub endpoint: Endpoint,
    pub prompt: PathBuf,
    pub n: usize,
    pub seed: u64,
    pub temperature: f64,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthReport {
    pub dataset: String,
    pub rows: usize,
    pub requests_sent: usize,
    pub unparsed: usize,
}

/// Pairs from one answer: a JSON object or list (optionally inside a ```json fence).
fn pairs(text: &str) -> Vec<(String, String)> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .unwrap_or(t);
    let t = t.strip_suffix("```").unwrap_or(t).trim();
    let v: J = match serde_json::from_str(t) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let items = match v {
        J::Array(a) => a,
        o => vec![o],
    };
    items
        .iter()
        .filter_map(|o| {
            Some((
                o["question"].as_str()?.to_string(),
                o["answer"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// One request: its index, seed, prompt conversation and key.
#[derive(Clone)]
struct Prompt {
    i: usize,
    seed: u64,
    text: String,
    conv: Id,
    key: String,
}

pub fn generate(store: &Store, plan: &SynthPlan) -> Result<SynthReport, SynthError> {
    check_name(&plan.name)?;
    let template = std::fs::read_to_string(&plan.prompt).map_err(|source| DataError::Io {
        path: plan.prompt.clone(),
        source,
    })?;
    let bad_template = |e: minijinja::Error| SynthError::Template {
        path: plan.prompt.clone(),
        msg: e.to_string(),
    };
    let client = Client::new(plan.endpoint.clone())?;
    let (blob, size) = store.put_blob_file(&plan.prompt)?;
    let mut env = minijinja::Environment::new();
    env.add_template("p", &template).map_err(bad_template)?;
    let tmpl = env.get_template("p").map_err(bad_template)?;
    let model = ModelIdentity::endpoint(&plan.endpoint.base_url, &plan.endpoint.model);
    let model_id = store.put(&model.record())?;
    let params = json!({"engine": "openai-compatible", "temperature": plan.temperature, "max_tokens": plan.max_tokens, "purpose": "data generate", "prompt_blake3": blob.to_hex()});
    // Plan the N requests; keep the ones already answered (also under the v1 key).
    let mut prompts = Vec::new();
    let mut batch = Batch::new();
    for i in 0..plan.n {
        let seed = plan.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let text = tmpl
            .render(minijinja::context! { i => i, seed => seed })
            .map_err(bad_template)?;
        let conv = stage_conversation(
            store,
            &mut batch,
            &[("user".to_string(), text.clone())],
            None,
        )?;
        let key = generation_key(model_id, conv, &params, seed);
        prompts.push(Prompt {
            i,
            seed,
            text,
            conv,
            key,
        });
    }
    store.write(batch)?;
    let stored = |p: &Prompt| -> Result<Option<Id>, SynthError> {
        Ok(match store.alias(NS_SYNTH, &p.key)? {
            Some(g) => Some(g),
            None => store.alias(
                NS_SYNTH,
                &legacy::synth_v1(model_id, p.conv, &params, p.seed),
            )?,
        })
    };
    let mut todo = Vec::new();
    for p in &prompts {
        if stored(p)?.is_none() {
            todo.push(p.clone());
        }
    }
    let streamed = stream::run(
        store,
        todo,
        plan.endpoint.concurrency,
        |p: &Prompt| {
            let body = json!({"messages": [{"role": "user", "content": p.text}], "max_tokens": plan.max_tokens, "temperature": plan.temperature, "seed": p.seed});
            client.chat(body)
        },
        |batch: &mut Batch, p: Prompt, resp: J| -> Result<(), SynthError> {
            let mut gp = params.clone();
            gp["index"] = json!(p.i);
            let text = content(&resp);
            let g = Generation {
                model: model_id,
                prompt: p.conv,
                question: None,
                params: &gp,
                seed: p.seed as i64,
                text: &text,
                prompt_tokens: None,
                completion_tokens: None,
                finish_reason: None,
            };
            let id = store.stage(batch, &g.record())?;
            batch.alias(NS_SYNTH, &p.key, id);
            Ok(())
        },
        &mut |_| {},
    )?;
    if let Some(e) = streamed.first_error {
        return Err(SynthError::Client(e));
    }
    // Assemble the dataset from the stored answers, in prompt order.
    let mut rows = Vec::new();
    let mut unparsed = 0;
    let mut gens = Vec::new();
    for p in &prompts {
        let Some(gid) = stored(p)? else {
            continue;
        };
        gens.push(gid);
        let text = store
            .get(gid)?
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ps = pairs(&text);
        if ps.is_empty() {
            unparsed += 1;
        }
        for (q, a) in ps {
            rows.push(ChatRow {
                line: p.i + 1,
                messages: vec![("user".into(), q), ("assistant".into(), a)],
                extra: None,
            });
        }
    }
    if rows.is_empty() {
        return Err(SynthError::NothingParsed(unparsed));
    }
    let mut batch = Batch::new();
    let src = Record::new(SOURCE)
        .with(
            "name",
            Value::str(
                plan.prompt
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            ),
        )
        .with("blake3", Value::Blob(blob))
        .with("size", Value::Int(size as i64))
        .with("format", Value::str("prompt-template"));
    let src_id = store.stage(&mut batch, &src)?;
    let conv_ids = stage_chat_rows(store, &mut batch, &rows)?;
    let op = json!({"op": "generate", "generator_model": model_id.to_hex(), "prompt_blake3": blob.to_hex(), "n": plan.n, "seed": plan.seed,
                    "temperature": plan.temperature, "max_tokens": plan.max_tokens, "answers": gens.iter().map(|g| g.to_hex()).collect::<Vec<_>>(), "unparsed": unparsed});
    let ds = Record::new(DATASET)
        .with("kind", Value::str("chat"))
        .with("rows", Value::ids(conv_ids))
        .with("op", Value::json(&op))
        .with("sources", Value::ids([src_id]))
        .with("parents", Value::ids([]));
    let id = store.stage(&mut batch, &ds)?;
    batch.alias(NS_DATASET, &plan.name, id);
    store.write(batch)?;
    Ok(SynthReport {
        dataset: id.to_hex(),
        rows: rows.len(),
        requests_sent: client.requests_sent(),
        unparsed,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn pairs_from_json_answers() {
        assert_eq!(
            super::pairs(r#"{"question": "q", "answer": "a"}"#),
            vec![("q".into(), "a".into())]
        );
        assert_eq!(
            super::pairs("```json\n[{\"question\": \"q\", \"answer\": \"a\"}, {\"x\": 1}]\n```")
                .len(),
            1
        );
        assert!(super::pairs("Sure! Here is a question").is_empty());
    }
}
