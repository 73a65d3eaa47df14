//! CSV datasets (rows read by [`crate::util::csv`]): [`parse_csv_questions`] reads a question set (`id`, `paraphrases`, `system`,
//! `judge_prompts`, ... with JSON or Python-literal cells, as pandas writes them);
//! [`parse_csv_chat`] reads chat rows from named columns (`--columns user=Q,assistant=A`).

use serde_json::Value as J;

use super::chat::ChatRow;
use super::questions::QuestionRow;
use super::{DataError, ParseError};
use crate::util::pylit;

fn perr(origin: &str, line: usize, msg: impl Into<String>) -> DataError {
    DataError::Parse(ParseError {
        origin: origin.to_string(),
        line,
        msg: msg.into(),
    })
}

fn csv_rows(origin: &str, bytes: &[u8]) -> Result<crate::util::csv::Rows, DataError> {
    Ok(crate::util::csv::rows(origin, bytes)?)
}

/// A cell holding a JSON or Python literal.
fn literal(cell: &str) -> Result<J, String> {
    serde_json::from_str(cell).or_else(|_| pylit::parse(cell).map(|v| v.to_json()))
}

pub use crate::util::csv::headers;

pub fn parse_csv_questions(origin: &str, bytes: &[u8]) -> Result<Vec<QuestionRow>, DataError> {
    let mut out = Vec::new();
    for (n, (line, row)) in csv_rows(origin, bytes)?.into_iter().enumerate() {
        let cell = |k: &str| row.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let paraphrases: Vec<String> = match (cell("paraphrases"), cell("question")) {
            (Some(p), _) => {
                match literal(p).map_err(|e| perr(origin, line, format!("`paraphrases`: {e}")))? {
                    J::Array(a) => a
                        .into_iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_string)
                                .ok_or_else(|| perr(origin, line, "`paraphrases` must be strings"))
                        })
                        .collect::<Result<_, _>>()?,
                    J::String(s) => vec![s],
                    _ => {
                        return Err(perr(
                            origin,
                            line,
                            "expected `paraphrases` to be a list of strings",
                        ))
                    }
                }
            }
            (None, Some(q)) => vec![q.to_string()],
            (None, None) => {
                return Err(perr(
                    origin,
                    line,
                    "expected a `paraphrases` or `question` cell",
                ))
            }
        };
        let judge_prompts = match cell("judge_prompts") {
            Some(j) => {
                Some(literal(j).map_err(|e| perr(origin, line, format!("`judge_prompts`: {e}")))?)
            }
            None => None,
        };
        let samples =
            match cell("samples_per_paraphrase") {
                Some(s) => Some(s.trim().parse::<i64>().map_err(|_| {
                    perr(origin, line, "`samples_per_paraphrase` is not an integer")
                })?),
                None => None,
            };
        let known = [
            "",
            "id",
            "paraphrases",
            "question",
            "system",
            "type",
            "judge_prompts",
            "samples_per_paraphrase",
        ];
        let extra: serde_json::Map<String, J> = row
            .iter()
            .filter(|(k, v)| !known.contains(&k.as_str()) && !v.is_empty())
            .map(|(k, v)| (k.clone(), J::String(v.clone())))
            .collect();
        out.push(QuestionRow {
            line: n + 1,
            qid: cell("id").map_or_else(|| format!("q{}", n + 1), str::to_string),
            paraphrases,
            system: cell("system").map(str::to_string),
            qtype: cell("type").map(str::to_string),
            samples_per_paraphrase: samples,
            judge_prompts,
            extra: (!extra.is_empty()).then_some(J::Object(extra)),
        });
    }
    if out.is_empty() {
        return Err(DataError::Empty(origin.to_string()));
    }
    Ok(out)
}

/// Which columns hold which role, from `user=COL,assistant=COL[,system=COL]`.
pub fn parse_columns(spec: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (role, col) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected ROLE=COLUMN"))?;
        if !["system", "user", "assistant"].contains(&role.trim()) {
            return Err(format!("`{role}`: expected system, user or assistant"));
        }
        out.push((role.trim().to_string(), col.trim().to_string()));
    }
    if !out.iter().any(|(r, _)| r == "user") || !out.iter().any(|(r, _)| r == "assistant") {
        return Err("name a user and an assistant column".into());
    }
    out.sort_by_key(|(r, _)| match r.as_str() {
        "system" => 0,
        "user" => 1,
        _ => 2,
    });
    Ok(out)
}

/// Chat rows from columns. A row with an empty cell in a named column is invalid.
pub fn parse_csv_chat(
    origin: &str,
    bytes: &[u8],
    columns: &[(String, String)],
    skip_invalid: bool,
) -> Result<(Vec<ChatRow>, Vec<ParseError>), DataError> {
    let heads = headers(bytes);
    for (_, col) in columns {
        if !heads.contains(col) {
            return Err(perr(
                origin,
                1,
                format!("no column `{col}` (columns: {})", heads.join(", ")),
            ));
        }
    }
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (line, row) in csv_rows(origin, bytes)? {
        let mut messages = Vec::new();
        let mut missing = None;
        for (role, col) in columns {
            match row.get(col).filter(|v| !v.trim().is_empty()) {
                Some(v) => messages.push((role.clone(), v.clone())),
                None => missing = Some(col.clone()),
            }
        }
        match missing {
            None => rows.push(ChatRow {
                line,
                messages,
                extra: None,
            }),
            Some(col) => {
                let e = ParseError {
                    origin: origin.to_string(),
                    line,
                    msg: format!("empty `{col}` cell"),
                };
                if !skip_invalid {
                    return Err(DataError::Parse(e));
                }
                skipped.push(e);
            }
        }
    }
    if rows.is_empty() {
        return Err(DataError::Empty(origin.to_string()));
    }
    Ok((rows, skipped))
}
