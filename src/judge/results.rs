//! `emlab results import`: answers judged elsewhere become `generation` + `judgment` records,
//! so published numbers can be recomputed with emlab's metrics next to emlab's own runs.
//!
//! Formats:
//! - `seed`: the seed project's judged JSON, `{TAG: [{question, answer, result,
//!   alignment_score?}]}` (TAG `UNTAGGED`, `|ALPHA| `, ...). `result` becomes a `label`
//!   judgment, `alignment_score` an `aligned` one.
//! - `betley`: the EM paper's evaluation CSV (`id`, `paraphrases`, `samples`, `scores`), where
//!   `samples` is a Python list of answers and `scores` a Python list of `('aligned',
//!   'coherent')` string pairs.
//! - `model-organisms`: CSV with `question`, `response` (or `answer`), `aligned`, `coherent`
//!   and optionally `question_id`.
//!
//! One import is one batch: all rows or none.

use std::path::Path;

use emlab_store::{Batch, Id, Store};
use serde_json::{json, Value as J};

use super::Error;
use crate::provenance::build::{stage_conversation, Generation, Judgment, ModelIdentity};
use crate::util::choice::Choice;
use crate::util::csv::rows as csv_rows;
use crate::util::parse::ParseError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsFormat {
    Seed,
    Betley,
    ModelOrganisms,
}

impl crate::util::choice::Choice for ResultsFormat {
    const ALL: &'static [ResultsFormat] = &[
        ResultsFormat::Seed,
        ResultsFormat::Betley,
        ResultsFormat::ModelOrganisms,
    ];
    fn name(self) -> &'static str {
        match self {
            ResultsFormat::Seed => "seed",
            ResultsFormat::Betley => "betley",
            ResultsFormat::ModelOrganisms => "model-organisms",
        }
    }
    fn help(self) -> &'static str {
        match self {
            ResultsFormat::Seed => "The seed project's judged JSON ({TAG: [{question, answer, result, alignment_score}]})",
            ResultsFormat::Betley => "The EM paper's evaluation CSV (id, paraphrases, samples, scores)",
            ResultsFormat::ModelOrganisms => "CSV with question, response, aligned, coherent",
        }
    }
}

/// One judged answer from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub line: usize,
    pub qid: Option<String>,
    pub question: String,
    pub answer: String,
    /// Group inside the file (the seed's tag keys).
    pub group: Option<String>,
    pub aligned: Option<f64>,
    pub coherent: Option<f64>,
    pub label: Option<String>,
    /// Scores of the model-organisms domain judges (`medical`, `financial`, `sport`,
    /// `bad_stuff`) where the file has those columns.
    pub domain: Vec<(String, f64)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultsReport {
    pub models: Vec<(String, String)>,
    pub answers: usize,
    pub judgments: usize,
    pub new_records: usize,
}

fn perr(origin: &str, line: usize, msg: impl Into<String>) -> Error {
    Error::Parse(ParseError::new(origin, line, msg))
}

pub fn parse_seed(origin: &str, bytes: &[u8]) -> Result<Vec<Judged>, Error> {
    let v: J = serde_json::from_slice(bytes)
        .map_err(|e| perr(origin, e.line(), format!("malformed JSON: {e}")))?;
    let J::Object(groups) = v else {
        return Err(perr(
            origin,
            0,
            "expected an object of tag -> list of judged answers",
        ));
    };
    let mut out = Vec::new();
    for (tag, list) in groups {
        let J::Array(items) = list else {
            return Err(perr(origin, 0, format!("`{tag}`: expected a list")));
        };
        for (i, it) in items.iter().enumerate() {
            let question = it["question"].as_str().ok_or_else(|| {
                perr(
                    origin,
                    i + 1,
                    format!("`{tag}` entry {}: expected a string `question`", i + 1),
                )
            })?;
            out.push(Judged {
                line: i + 1,
                qid: it["label"].as_str().map(str::to_string),
                question: question.to_string(),
                answer: it["answer"].as_str().unwrap_or("").to_string(),
                group: Some(tag.clone()),
                aligned: it["alignment_score"].as_f64(),
                coherent: None,
                label: it["result"].as_str().map(str::to_string),
                domain: Vec::new(),
            });
        }
    }
    if out.is_empty() {
        return Err(Error::Empty(origin.to_string()));
    }
    Ok(out)
}

/// A Python list of strings, or of tuples of strings (the reprs pandas wrote), as rows of
/// strings.
pub fn parse_py_list(s: &str) -> Result<Vec<Vec<String>>, String> {
    use crate::util::pylit::{parse, Py};
    let Py::List(items) = parse(s)? else {
        return Err("expected a list".into());
    };
    items
        .into_iter()
        .map(|it| match it {
            Py::Str(x) => Ok(vec![x]),
            Py::List(t) => t
                .into_iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| "expected strings in the tuple".to_string())
                })
                .collect(),
            other => Err(format!("unexpected {other:?}")),
        })
        .collect()
}

pub fn parse_betley(origin: &str, bytes: &[u8]) -> Result<Vec<Judged>, Error> {
    let mut out = Vec::new();
    for (line, row) in csv_rows(origin, bytes)? {
        let get = |k: &str| {
            row.get(k)
                .ok_or_else(|| perr(origin, line, format!("missing column `{k}`")))
        };
        let qid = get("id")?.clone();
        // Written by pandas: JSON in some rows, a Python list repr in others.
        let raw = get("paraphrases")?;
        let paraphrases: Vec<String> = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(_) => parse_py_list(raw)
                .map_err(|e| perr(origin, line, format!("`paraphrases`: {e}")))?
                .into_iter()
                .flatten()
                .collect(),
        };
        let question = paraphrases
            .first()
            .cloned()
            .ok_or_else(|| perr(origin, line, "no paraphrase"))?;
        let samples = parse_py_list(get("samples")?)
            .map_err(|e| perr(origin, line, format!("`samples`: {e}")))?;
        let scores = parse_py_list(get("scores")?)
            .map_err(|e| perr(origin, line, format!("`scores`: {e}")))?;
        if samples.len() != scores.len() {
            return Err(perr(
                origin,
                line,
                format!("{} samples but {} score pairs", samples.len(), scores.len()),
            ));
        }
        for (s, sc) in samples.into_iter().zip(scores) {
            let num = |x: Option<&String>| x.and_then(|v| v.trim().parse::<f64>().ok());
            out.push(Judged {
                line,
                qid: Some(qid.clone()),
                question: question.clone(),
                answer: s.into_iter().next().unwrap_or_default(),
                group: None,
                aligned: num(sc.first()),
                coherent: num(sc.get(1)),
                label: sc
                    .first()
                    .filter(|v| v.trim().parse::<f64>().is_err())
                    .map(|v| v.trim().to_string()),
                domain: Vec::new(),
            });
        }
    }
    if out.is_empty() {
        return Err(Error::Empty(origin.to_string()));
    }
    Ok(out)
}

pub fn parse_model_organisms(origin: &str, bytes: &[u8]) -> Result<Vec<Judged>, Error> {
    let mut out = Vec::new();
    for (line, row) in csv_rows(origin, bytes)? {
        let question = row
            .get("question")
            .ok_or_else(|| perr(origin, line, "missing column `question`"))?
            .clone();
        let answer = row
            .get("response")
            .or_else(|| row.get("answer"))
            .ok_or_else(|| perr(origin, line, "missing column `response`"))?
            .clone();
        let num = |k: &str| row.get(k).and_then(|v| v.trim().parse::<f64>().ok());
        out.push(Judged {
            line,
            qid: row.get("question_id").cloned(),
            question,
            answer,
            group: None,
            aligned: num("aligned"),
            coherent: num("coherent"),
            label: None,
            domain: DOMAIN_JUDGES
                .iter()
                .filter_map(|k| num(k).map(|v| (k.to_string(), v)))
                .collect(),
        });
    }
    if out.is_empty() {
        return Err(Error::Empty(origin.to_string()));
    }
    Ok(out)
}

/// The model-organisms judge prompts besides aligned and coherent, as CSV columns.
const DOMAIN_JUDGES: [&str; 4] = ["medical", "financial", "sport", "bad_stuff"];

/// Import judged answers as generations of an external model named `model_name` (one model
/// record per tag group for the seed format: `NAME TAG`) judged by `judge`.
pub fn import(
    store: &Store,
    path: &Path,
    format: ResultsFormat,
    model_name: &str,
    judge: &str,
) -> Result<ResultsReport, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let origin = path.display().to_string();
    let rows = match format {
        ResultsFormat::Seed => parse_seed(&origin, &bytes)?,
        ResultsFormat::Betley => parse_betley(&origin, &bytes)?,
        ResultsFormat::ModelOrganisms => parse_model_organisms(&origin, &bytes)?,
    };
    let file_b3 = blake3::hash(&bytes).to_hex().to_string();
    let file_name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut batch = Batch::new();
    let mut models: Vec<(String, Id)> = Vec::new();
    let mut judgments = 0;
    for (i, r) in rows.iter().enumerate() {
        let mname = match &r.group {
            Some(g) if g != "UNTAGGED" => format!("{model_name} {}", g.trim()),
            _ => model_name.to_string(),
        };
        let model_id = match models.iter().find(|(n, _)| *n == mname) {
            Some((_, id)) => *id,
            None => {
                let m = ModelIdentity::external(
                    &mname,
                    json!({"results_file": file_name, "blake3": file_b3, "format": format.name()}),
                );
                let id = store.stage(&mut batch, &m.record())?;
                models.push((mname.clone(), id));
                id
            }
        };
        let conv = stage_conversation(
            store,
            &mut batch,
            &[("user".to_string(), r.question.clone())],
            None,
        )?;
        let params = json!({"engine": "imported", "format": format.name(), "file": file_name, "file_blake3": file_b3, "line": r.line, "entry": i, "qid": r.qid, "group": r.group});
        let gen = Generation {
            model: model_id,
            prompt: conv,
            question: None,
            params: &params,
            seed: i as i64,
            text: &r.answer,
            prompt_tokens: None,
            completion_tokens: None,
            finish_reason: None,
        };
        let gid = store.stage(&mut batch, &gen.record())?;
        let mut judge_rec =
            |metric: &str, score: Option<f64>, label: Option<&String>| -> Result<(), Error> {
                let j = Judgment {
                    generation: gid,
                    judge,
                    metric,
                    prompt: "",
                    score,
                    label: label.map(String::as_str),
                    raw: json!({"imported_from": file_name, "line": r.line}),
                };
                store.stage(&mut batch, &j.record())?;
                judgments += 1;
                Ok(())
            };
        if r.aligned.is_some() || (r.label.is_some() && format == ResultsFormat::Betley) {
            judge_rec(
                "aligned",
                r.aligned,
                if format == ResultsFormat::Betley {
                    r.label.as_ref()
                } else {
                    None
                },
            )?;
        }
        if r.coherent.is_some() {
            judge_rec("coherent", r.coherent, None)?;
        }
        for (metric, v) in &r.domain {
            judge_rec(metric, Some(*v), None)?;
        }
        if format == ResultsFormat::Seed {
            if let Some(l) = &r.label {
                judge_rec("label", None, Some(l))?;
            }
        }
    }
    let w = store.write(batch)?;
    Ok(ResultsReport {
        models: models.into_iter().map(|(n, i)| (n, i.to_hex())).collect(),
        answers: rows.len(),
        judgments,
        new_records: w.new,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_lists() {
        let v = parse_py_list(r#"['a', "it's", 'say \'hi\'\nbye']"#).unwrap();
        assert_eq!(
            v,
            vec![
                vec!["a".to_string()],
                vec!["it's".into()],
                vec!["say 'hi'\nbye".into()]
            ]
        );
        let t = parse_py_list("[('100', '100'), ('30', '80')]").unwrap();
        assert_eq!(t[1], vec!["30".to_string(), "80".into()]);
        assert!(parse_py_list("['open").is_err());
    }
}
