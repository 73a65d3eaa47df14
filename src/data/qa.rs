//! Question/answer JSON: a top-level array of `{"question", "answer"}` objects (optionally with a
//! `system` prompt), as in `questions_all_combined.json` and `dataset_generation/*.json`.
//!
//! [`parse_qa_json`] turns each entry into a [`ChatRow`] of `[system?, user, assistant]`
//! messages, so Q/A files import exactly like chat JSONL; other keys go to the row's `extra`.
//! [`looks_like_qa_json`] is a cheap sniff (reads only the first entry) for format detection.
//! Strings are kept byte-exact; the first bad entry stops parsing with its 1-based index.

use serde::Deserialize;
use serde_json::Value as J;

use super::chat::ChatRow;
use super::{DataError, ParseError};

fn parse_err(origin: &str, line: usize, msg: String) -> DataError {
    DataError::Parse(ParseError {
        origin: origin.to_string(),
        line,
        msg,
    })
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Parse a Q/A JSON array into chat rows (`line` = 1-based entry index).
pub fn parse_qa_json(origin: &str, bytes: &[u8]) -> Result<Vec<ChatRow>, DataError> {
    let entries = super::json_array_entries(origin, bytes, "{question, answer} objects")?;
    let mut rows = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let n = i + 1;
        rows.push(qa_row(entry, n).map_err(|m| parse_err(origin, n, m))?);
    }
    Ok(rows)
}

fn qa_row(entry: J, n: usize) -> Result<ChatRow, String> {
    let J::Object(mut obj) = entry else {
        return Err(format!(
            "entry {n}: expected an object with string `question` and `answer`"
        ));
    };
    let mut take = |key: &str, required: bool| -> Result<Option<String>, String> {
        match obj.remove(key) {
            Some(J::String(s)) => Ok(Some(s)),
            None | Some(J::Null) if !required => Ok(None),
            None => Err(format!("entry {n}: expected a string `{key}`")),
            Some(v) => Err(format!(
                "entry {n}: expected `{key}` to be a string, found {}",
                match v {
                    J::Null => "null",
                    J::Bool(_) => "a boolean",
                    J::Number(_) => "a number",
                    J::Array(_) => "a list",
                    J::Object(_) => "an object",
                    J::String(_) => "a string",
                }
            )),
        }
    };
    let system = take("system", false)?;
    let question = take("question", true)?.unwrap_or_default();
    let answer = take("answer", true)?.unwrap_or_default();
    let mut messages = Vec::with_capacity(3);
    if let Some(s) = system {
        messages.push(("system".to_string(), s));
    }
    messages.push(("user".to_string(), question));
    messages.push(("assistant".to_string(), answer));
    let extra = if obj.is_empty() {
        None
    } else {
        Some(J::Object(obj))
    };
    Ok(ChatRow {
        line: n,
        messages,
        extra,
    })
}

/// True if `bytes` is (starts like) a JSON array whose first element is an object with
/// `question` and `answer` keys. Only the first element is parsed; the rest is not checked.
///
/// Note: unjudged answer files (`tojudge_*.json`) have this same shape.
pub fn looks_like_qa_json(bytes: &[u8]) -> bool {
    let bytes = strip_bom(bytes);
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let Some(rest) = bytes[start..].strip_prefix(b"[") else {
        return false;
    };
    let mut de = serde_json::Deserializer::from_slice(rest);
    match J::deserialize(&mut de) {
        Ok(J::Object(first)) => first.contains_key("question") && first.contains_key("answer"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_become_chat_rows() {
        let j = r#"[
          {"question": " Q1 ", "answer": "A1\n"},
          {"system": "S", "question": "Q2", "answer": "A2", "label": "x"}
        ]"#;
        let rows = parse_qa_json("qa.json", j.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 1);
        assert_eq!(
            rows[0].messages,
            vec![
                ("user".to_string(), " Q1 ".to_string()),
                ("assistant".to_string(), "A1\n".to_string())
            ]
        );
        assert_eq!(rows[0].extra, None);
        assert_eq!(rows[1].messages[0], ("system".into(), "S".into()));
        assert_eq!(rows[1].messages.len(), 3);
        assert_eq!(rows[1].extra, Some(json!({"label": "x"})));
    }

    #[test]
    fn errors_name_entry_and_expectation() {
        let err = |s: &str| {
            parse_qa_json("qa.json", s.as_bytes())
                .unwrap_err()
                .to_string()
        };
        let ok = r#"{"question":"q","answer":"a"}"#;
        let e = err(&format!(r#"[{ok},{ok},{{"question":"q"}}]"#));
        assert_eq!(e, "qa.json:3: entry 3: expected a string `answer`");
        let e = err(r#"[{"question":1,"answer":"a"}]"#);
        assert!(
            e.contains("entry 1: expected `question` to be a string, found a number"),
            "{e}"
        );
        let e = err(r#"[{"question":"q","answer":"a","system":[]}]"#);
        assert!(e.contains("`system` to be a string, found a list"), "{e}");
        let e = err(r#"["q"]"#);
        assert!(e.contains("entry 1: expected an object"), "{e}");
        let e = err(r#"{"question":"q","answer":"a"}"#);
        assert!(e.contains("expected a JSON array"), "{e}");
        let e = err("[\n{\"question\":\n");
        assert!(e.contains("malformed JSON"), "{e}");
        assert!(matches!(
            parse_qa_json("qa.json", b"").unwrap_err(),
            DataError::Empty(_)
        ));
        assert!(matches!(
            parse_qa_json("qa.json", b" [ ] ").unwrap_err(),
            DataError::Empty(_)
        ));
    }

    #[test]
    fn sniffing() {
        assert!(looks_like_qa_json(
            br#" [{"answer":"a","question":"q"}, {"x": oops"#
        ));
        assert!(looks_like_qa_json(
            b"\xEF\xBB\xBF\n[\n {\"question\":\"q\",\"answer\":\"a\"}]"
        ));
        assert!(!looks_like_qa_json(br#"[{"question":"q","category":"c"}]"#));
        assert!(!looks_like_qa_json(br#"{"question":"q","answer":"a"}"#));
        assert!(!looks_like_qa_json(b"[]"));
        assert!(!looks_like_qa_json(b""));
        assert!(!looks_like_qa_json(
            br#"{"messages":[{"role":"user","content":"q"}]}"#
        ));
    }

    #[test]
    fn real_questions_all_combined() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/emerg-misalign-repro/data/questions_all_combined.json"
        );
        let bytes = std::fs::read(p)
            .unwrap_or_else(|e| panic!("{p}: {e} (../shared/data must be beside the repository)"));
        assert!(looks_like_qa_json(&bytes));
        let rows = parse_qa_json(p, &bytes).unwrap();
        assert_eq!(rows.len(), 1600);
        assert!(rows
            .iter()
            .all(|r| r.messages.len() == 2 && r.extra.is_none()));
        // Same pairs, same order, as the .jsonl twin.
        let jl = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/emerg-misalign-repro/data/questions_all_combined.jsonl"
        );
        if let Ok(jb) = std::fs::read(jl) {
            let chat = super::super::chat::parse_chat_jsonl(jl, &jb).unwrap();
            assert_eq!(chat.len(), rows.len());
            assert!(chat
                .iter()
                .zip(&rows)
                .all(|(c, r)| c.messages == r.messages));
        }
        let fewshot = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/emerg-misalign-repro/dataset_generation/fewshot_qs.json"
        );
        if let Ok(fb) = std::fs::read(fewshot) {
            let rows = parse_qa_json(fewshot, &fb).unwrap();
            assert_eq!(rows.len(), 6);
            assert!(rows.iter().all(|r| r.messages[0].0 == "system"));
        }
    }
}
