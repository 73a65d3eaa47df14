//! `emlab data generate`: build a dataset with an LLM (the seed project made its 1,600-row
//! AI-optimism set this way). A prompt template (minijinja, variables `i` and `seed`) is sent
//! N times through the same backend as sampling; each answer must be a JSON object with
//! `question` and `answer` (or a list of them) and becomes a user/assistant row. The raw
//! answers are `generation` records keyed like samples, so a rerun resumes; the dataset's
//! provenance names the generator model, the prompt file (as a source) and the seed.

use std::path::PathBuf;

use emlab_store::{Batch, Record, Store, Value};
use futures::StreamExt;
use serde_json::{json, Value as J};

use super::chat::ChatRow;
use super::{check_name, stage_chat_rows, DataError};
use crate::judge::client::{content, Client, ClientError, Endpoint};
use crate::records::{CONVERSATION, DATASET, GENERATION, MESSAGE, MODEL, NS_DATASET, SOURCE};

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

const NS_SYNTH_KEY: &str = "synth-key";

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

pub fn generate(store: &Store, plan: &SynthPlan) -> Result<SynthReport, DataError> {
    check_name(&plan.name)?;
    let io = |source| DataError::Io {
        path: plan.prompt.clone(),
        source,
    };
    let template = std::fs::read_to_string(&plan.prompt).map_err(io)?;
    let client =
        Client::new(plan.endpoint.clone()).map_err(|e| DataError::Derive(e.to_string()))?;
    let (blob, size) = store.put_blob_file(&plan.prompt)?;
    let mut env = minijinja::Environment::new();
    env.add_template("p", &template)
        .map_err(|e| DataError::Derive(format!("{}: {e}", plan.prompt.display())))?;
    let tmpl = env
        .get_template("p")
        .map_err(|e| DataError::Derive(e.to_string()))?;
    let model = Record::new(MODEL)
        .with("name", Value::str(&plan.endpoint.model))
        .with("architecture", Value::str("endpoint"))
        .with("files", Value::json(&json!([])))
        .with(
            "config",
            Value::json(
                &json!({"base_url": plan.endpoint.base_url, "served_model": plan.endpoint.model}),
            ),
        );
    let model_id = store.put(&model)?;
    let params = json!({"engine": "openai-compatible", "temperature": plan.temperature, "max_tokens": plan.max_tokens, "purpose": "data generate", "prompt_blake3": blob.to_hex()});
    // Plan the N requests; keep the ones already answered.
    let mut prompts = Vec::new();
    let mut batch = Batch::new();
    for i in 0..plan.n {
        let seed = plan.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let text = tmpl
            .render(minijinja::context! { i => i, seed => seed })
            .map_err(|e| DataError::Derive(format!("{}: {e}", plan.prompt.display())))?;
        let msg = store.stage(
            &mut batch,
            &Record::new(MESSAGE)
                .with("role", Value::str("user"))
                .with("content", Value::str(&text)),
        )?;
        let conv = store.stage(
            &mut batch,
            &Record::new(CONVERSATION).with("messages", Value::ids([msg])),
        )?;
        let key = blake3::hash(format!("{model_id}{conv}{params}{seed}").as_bytes())
            .to_hex()
            .to_string();
        prompts.push((i, seed, text, conv, key));
    }
    store.write(batch)?;
    let todo: Vec<_> = prompts
        .iter()
        .filter(|p| store.alias(NS_SYNTH_KEY, &p.4).ok().flatten().is_none())
        .cloned()
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| DataError::Io {
            path: PathBuf::from("tokio runtime"),
            source,
        })?;
    let mut first_err: Option<ClientError> = None;
    rt.block_on(async {
        let mut results = futures::stream::iter(todo.into_iter().map(|(i, seed, text, conv, key)| {
            let client = &client;
            async move {
                let body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": plan.max_tokens, "temperature": plan.temperature, "seed": seed});
                (i, seed, conv, key, client.chat(body).await)
            }
        }))
        .buffer_unordered(plan.endpoint.concurrency.max(1));
        let mut batch = Batch::new();
        while let Some((i, seed, conv, key, r)) = results.next().await {
            match r {
                Ok(resp) => {
                    let mut p = params.clone();
                    p["index"] = json!(i);
                    let g = Record::new(GENERATION)
                        .with("model", Value::Id(model_id))
                        .with("prompt", Value::Id(conv))
                        .with("params", Value::json(&p))
                        .with("seed", Value::Int(seed as i64))
                        .with("text", Value::str(content(&resp)));
                    let id = store.stage(&mut batch, &g)?;
                    batch.alias(NS_SYNTH_KEY, &key, id);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            if batch.len() >= 32 {
                store.write(std::mem::take(&mut batch))?;
            }
        }
        store.write(batch)?;
        Ok::<(), DataError>(())
    })?;
    if let Some(e) = first_err {
        return Err(DataError::Derive(format!(
            "{e} (answers received are stored; rerun to resume)"
        )));
    }
    // Assemble the dataset from the stored answers, in prompt order.
    let mut rows = Vec::new();
    let mut unparsed = 0;
    let mut gens = Vec::new();
    for (i, _, _, _, key) in &prompts {
        let Some(gid) = store.alias(NS_SYNTH_KEY, key)? else {
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
                line: i + 1,
                messages: vec![("user".into(), q), ("assistant".into(), a)],
                extra: None,
            });
        }
    }
    if rows.is_empty() {
        return Err(DataError::Derive(format!(
            "no answer parsed as JSON with `question` and `answer` ({unparsed} answers)"
        )));
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
        requests_sent: client
            .requests_sent
            .load(std::sync::atomic::Ordering::Relaxed),
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
