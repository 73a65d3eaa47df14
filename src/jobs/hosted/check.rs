//! The fine-tuning data check, run on the chat JSONL before anything is uploaded: the rules
//! OpenAI's own data-format checker applies to supervised chat fine-tuning files, each
//! failure naming its row (1-based line).

use serde_json::Value as J;

/// The fewest lines the fine-tuning API accepts in a training file.
pub const MIN_LINES: usize = 10;

const ROLES: [&str; 3] = ["system", "user", "assistant"];
const KEYS: [&str; 4] = ["role", "content", "name", "weight"];

/// One rule a row breaks.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Problem {
    /// 1-based line of the JSONL file (0: the file as a whole).
    pub row: usize,
    pub msg: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.row == 0 {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "row {}: {}", self.row, self.msg)
        }
    }
}

/// Check every line of a chat fine-tuning file: a `messages` list per line; roles system,
/// user or assistant; string contents; no keys but role, content, name and weight (0 or 1);
/// at least one assistant message per line; at least [`MIN_LINES`] lines (`min_lines`: 1 for
/// a validation file).
pub fn check_lines(lines: &[&[u8]], min_lines: usize) -> Vec<Problem> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let row = i + 1;
        let mut bad = |msg: String| out.push(Problem { row, msg });
        let v: J = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                bad(format!("not JSON: {e}"));
                continue;
            }
        };
        let Some(msgs) = v.get("messages") else {
            bad("no `messages` key".into());
            continue;
        };
        let Some(msgs) = msgs.as_array() else {
            bad("`messages` is not a list".into());
            continue;
        };
        if msgs.is_empty() {
            bad("`messages` is empty".into());
            continue;
        }
        let mut assistant = false;
        for (j, m) in msgs.iter().enumerate() {
            let k = j + 1;
            let Some(obj) = m.as_object() else {
                bad(format!("message {k} is not an object"));
                continue;
            };
            if let Some(key) = obj.keys().find(|key| !KEYS.contains(&key.as_str())) {
                bad(format!(
                    "message {k} has the key `{key}` (allowed: role, content, name, weight)"
                ));
            }
            match obj.get("role").and_then(J::as_str) {
                Some(r) if ROLES.contains(&r) => assistant |= r == "assistant",
                Some(r) => bad(format!(
                    "message {k} has the role `{r}` (allowed: system, user, assistant)"
                )),
                None => bad(format!("message {k} has no role")),
            }
            match obj.get("content") {
                Some(J::String(_)) => {}
                None => bad(format!("message {k} has no content")),
                Some(_) => bad(format!("message {k}'s content is not a string")),
            }
            if let Some(w) = obj.get("weight") {
                if !(w == 0 || w == 1) {
                    bad(format!("message {k}'s weight is {w}, not 0 or 1"));
                }
            }
        }
        if !assistant {
            bad("no assistant message".into());
        }
    }
    if lines.len() < min_lines {
        out.push(Problem {
            row: 0,
            msg: format!(
                "{} lines; the fine-tuning API needs at least {min_lines}",
                lines.len()
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> String {
        r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"q"},{"role":"assistant","content":"a","weight":1}]}"#.into()
    }

    fn check(rows: &[String]) -> Vec<Problem> {
        let lines: Vec<&[u8]> = rows.iter().map(|r| r.as_bytes()).collect();
        check_lines(&lines, MIN_LINES)
    }

    /// Ten good rows with row `at` (1-based) replaced.
    fn with(at: usize, row: &str) -> Vec<Problem> {
        let mut rows = vec![good(); 10];
        rows[at - 1] = row.into();
        check(&rows)
    }

    #[test]
    fn ten_good_rows_pass() {
        assert_eq!(check(&vec![good(); 10]), vec![]);
    }

    #[test]
    fn each_rule_names_the_row() {
        let cases = [
            ("not json", "not JSON"),
            (r#"{"prompt":"x"}"#, "no `messages` key"),
            (r#"{"messages":"x"}"#, "is not a list"),
            (r#"{"messages":[]}"#, "is empty"),
            (
                r#"{"messages":[{"role":"tool","content":"x"},{"role":"assistant","content":"a"}]}"#,
                "role `tool`",
            ),
            (
                r#"{"messages":[{"role":"user","content":["x"]},{"role":"assistant","content":"a"}]}"#,
                "content is not a string",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x","extra":1},{"role":"assistant","content":"a"}]}"#,
                "key `extra`",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                "no assistant message",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"a","weight":2}]}"#,
                "not 0 or 1",
            ),
            (
                r#"{"messages":[{"content":"x"},{"role":"assistant","content":"a"}]}"#,
                "has no role",
            ),
        ];
        for (row, want) in cases {
            let p = with(7, row);
            assert_eq!(p.len(), 1, "{row}: {p:?}");
            assert_eq!(p[0].row, 7, "{row}");
            assert!(p[0].msg.contains(want), "{row}: {}", p[0].msg);
            assert!(p[0].to_string().starts_with("row 7: "));
        }
    }

    #[test]
    fn fewer_than_ten_lines_is_refused() {
        let p = check(&vec![good(); 9]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].row, 0);
        assert!(p[0].msg.contains("at least 10"), "{}", p[0].msg);
        assert_eq!(check_lines(&[good().as_bytes()], 1), vec![]);
    }
}
