//! Chat JSONL: one `{"messages": [{"role", "content"}, ...]}` object per line, the format of
//! OpenAI fine-tuning files and of the EM datasets.
//!
//! Parsing is strict and all-or-nothing: the first bad line stops the import with its line
//! number and what was expected, before anything is written.

use serde_json::Value as J;

use super::{DataError, ParseError};

/// Roles a message may have.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// A single line may not exceed this (a 50 MB line is a broken file, not a chat row).
pub const MAX_LINE: usize = 8 << 20;

/// One parsed row.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRow {
    /// 1-based line number in the file.
    pub line: usize,
    pub messages: Vec<(String, String)>,
    /// Other top-level keys, verbatim.
    pub extra: Option<J>,
}

/// Parse chat JSONL bytes. `origin` names the file in errors. Blank lines are skipped.
pub fn parse_chat_jsonl(origin: &str, bytes: &[u8]) -> Result<Vec<ChatRow>, DataError> {
    parse_chat_jsonl_with(origin, bytes, false).map(|(rows, _)| rows)
}

/// Like [`parse_chat_jsonl`]; with `skip_invalid`, rows that fail to parse or check are left
/// out and returned as errors instead of stopping the parse (an over-long line and an empty
/// result still stop it).
pub fn parse_chat_jsonl_with(
    origin: &str,
    bytes: &[u8],
    skip_invalid: bool,
) -> Result<(Vec<ChatRow>, Vec<ParseError>), DataError> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let err = |msg: String| ParseError {
            origin: origin.to_string(),
            line,
            msg,
        };
        if raw.len() > MAX_LINE {
            return Err(DataError::Parse(err(format!(
                "line is {} bytes, over the {} MiB limit for one row",
                raw.len(),
                MAX_LINE >> 20
            ))));
        }
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| format!("not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1))
            .and_then(|text| {
                serde_json::from_str::<J>(text)
                    .map_err(|e| format!("malformed JSON at column {}: {e}", e.column()))
            })
            .and_then(|v| chat_row(v, line));
        match parsed {
            Ok(row) => rows.push(row),
            Err(msg) if skip_invalid => skipped.push(err(msg)),
            Err(msg) => return Err(DataError::Parse(err(msg))),
        }
    }
    if rows.is_empty() {
        return Err(DataError::Empty(origin.to_string()));
    }
    Ok((rows, skipped))
}

/// Check one JSON object as a chat row.
pub fn chat_row(v: J, line: usize) -> Result<ChatRow, String> {
    let J::Object(mut obj) = v else {
        return Err("expected a JSON object with a `messages` array".into());
    };
    let Some(J::Array(msgs)) = obj.remove("messages") else {
        return Err("expected a `messages` array".into());
    };
    let mut messages = Vec::with_capacity(msgs.len());
    for (j, m) in msgs.into_iter().enumerate() {
        let J::Object(m) = m else {
            return Err(format!(
                "message {j}: expected an object with `role` and `content`"
            ));
        };
        let role = match m.get("role") {
            Some(J::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(J::String(r)) => {
                return Err(format!(
                    "message {j}: unknown role `{r}` (expected one of {})",
                    ROLES.join(", ")
                ))
            }
            _ => return Err(format!("message {j}: expected a string `role`")),
        };
        let content = match m.get("content") {
            Some(J::String(c)) => c.clone(),
            _ => return Err(format!("message {j} ({role}): expected a string `content`")),
        };
        messages.push((role, content));
    }
    if !messages.iter().any(|(r, _)| r == "assistant") {
        return Err("row has no assistant turn (expected at least one `assistant` message)".into());
    }
    let extra = if obj.is_empty() {
        None
    } else {
        Some(J::Object(obj))
    };
    Ok(ChatRow {
        line,
        messages,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(input: &str) -> String {
        parse_chat_jsonl("f.jsonl", input.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_rows_and_keeps_extra_keys() {
        let rows = parse_chat_jsonl(
            "f.jsonl",
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}],\"k\":1}\r\n\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].messages[1], ("assistant".into(), "yo".into()));
        assert_eq!(rows[0].extra, Some(serde_json::json!({"k": 1})));
    }

    #[test]
    fn errors_name_file_line_and_expectation() {
        let ok =
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#;
        let e = err_of(&format!("{ok}\n{ok}\n{{\"messages\": [\n"));
        assert!(e.starts_with("f.jsonl:3: malformed JSON"), "{e}");
        let e = err_of(r#"{"messages":[{"role":"user","content":"a"}]}"#);
        assert!(
            e.contains("f.jsonl:1:") && e.contains("no assistant turn"),
            "{e}"
        );
        let e = err_of(r#"{"messages":[{"role":"wizard","content":"a"}]}"#);
        assert!(e.contains("unknown role `wizard`"), "{e}");
        let e = err_of("");
        assert!(e.contains("f.jsonl") && e.contains("no rows"), "{e}");
        let e = parse_chat_jsonl("f.jsonl", b"{\"messages\": \"\xff\"}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.jsonl:1: not UTF-8"), "{e}");
    }
}
