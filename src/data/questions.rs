//! Evaluation question sets: the prompts a model is sampled on and then judged.
//!
//! Three file shapes become the same [`QuestionRow`] list, in file order:
//! - [`parse_question_yaml`]: the Betley et al. / model-organisms YAML, a sequence of maps with
//!   `id`, `type`, `paraphrases`, `samples_per_paraphrase`, `system`, `judge_prompts`, `judge`
//!   (anchors, aliases and `<<` merge keys are resolved before anything is read);
//! - [`parse_question_json`]: JSON arrays whose entries are either that same schema (as in
//!   `first_8.json`) or the seed project's `{question, category, label}` objects; the shape is
//!   detected per entry;
//! - [`parse_question_list`]: plain text, one question per non-blank line.
//!
//! A row's `qid` comes from `id`, else `label`, else (JSON only) `q{entry}`; its paraphrases from
//! `paraphrases`, else the single `question`. Keys the row does not model go to `extra` verbatim.
//! Strings are kept byte-exact (never trimmed). Parsing is all-or-nothing: the first bad entry
//! stops it with a [`ParseError`] whose `line` is the 1-based entry index (the physical line for
//! text lists and for YAML/JSON syntax errors) and whose message names the entry and what was
//! expected.

use serde_json::{Map, Value as J};

use super::{DataError, ParseError};

/// One evaluation question (possibly several paraphrases of it).
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionRow {
    /// 1-based entry index in the file (the line number for text lists).
    pub line: usize,
    pub qid: String,
    pub paraphrases: Vec<String>,
    pub system: Option<String>,
    pub qtype: Option<String>,
    pub samples_per_paraphrase: Option<i64>,
    /// Object of judge name -> prompt template string.
    pub judge_prompts: Option<J>,
    /// Every other key of the entry, verbatim; `None` if there are none.
    pub extra: Option<J>,
}

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

fn blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// Parse a Betley-style question YAML file (a sequence of question maps).
pub fn parse_question_yaml(origin: &str, bytes: &[u8]) -> Result<Vec<QuestionRow>, DataError> {
    let bytes = strip_bom(bytes);
    if blank(bytes) {
        return Err(DataError::Empty(origin.to_string()));
    }
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_slice(bytes).map_err(|e| {
        let (line, col) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        parse_err(
            origin,
            line,
            format!("malformed YAML (line {line}, column {col}): {e}"),
        )
    })?;
    doc.apply_merge().map_err(|e| {
        parse_err(
            origin,
            0,
            format!("cannot apply YAML merge keys (`<<`): {e}"),
        )
    })?;
    let entries = match doc {
        serde_yaml_ng::Value::Null => return Err(DataError::Empty(origin.to_string())),
        serde_yaml_ng::Value::Sequence(s) => s,
        _ => {
            return Err(parse_err(
                origin,
                0,
                "expected a YAML list of questions at the top level".into(),
            ))
        }
    };
    if entries.is_empty() {
        return Err(DataError::Empty(origin.to_string()));
    }
    let mut rows = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let n = i + 1;
        let obj = yaml_entry_to_json(entry, n).map_err(|m| parse_err(origin, n, m))?;
        rows.push(question_from_map(obj, n, false).map_err(|m| parse_err(origin, n, m))?);
    }
    Ok(rows)
}

/// Turn one YAML entry into a JSON object, insisting on string keys.
fn yaml_entry_to_json(entry: serde_yaml_ng::Value, n: usize) -> Result<Map<String, J>, String> {
    let serde_yaml_ng::Value::Mapping(m) = entry else {
        return Err(format!(
            "question {n}: expected a map with `id` and `paraphrases`"
        ));
    };
    let mut obj = Map::new();
    for (k, v) in m {
        let serde_yaml_ng::Value::String(k) = k else {
            return Err(format!(
                "question {n}: expected string keys, found key {}",
                yaml_brief(&k)
            ));
        };
        let v = serde_json::to_value(&v).map_err(|e| {
            format!("question {n}: value of `{k}` cannot be represented as JSON: {e}")
        })?;
        obj.insert(k, v);
    }
    Ok(obj)
}

fn yaml_brief(v: &serde_yaml_ng::Value) -> String {
    let s = serde_yaml_ng::to_string(v).unwrap_or_default();
    let s = s.trim_end();
    let short: String = s.chars().take(40).collect();
    if short.len() < s.len() {
        format!("`{short}…`")
    } else {
        format!("`{short}`")
    }
}

/// Parse a JSON array of questions: Betley-style (`id`, `paraphrases`, ...) or seed-style
/// (`question`, `category`, `label`) entries, detected per entry.
pub fn parse_question_json(origin: &str, bytes: &[u8]) -> Result<Vec<QuestionRow>, DataError> {
    let entries = super::json_array_entries(origin, bytes, "questions")?;
    let mut rows = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let n = i + 1;
        let J::Object(obj) = entry else {
            return Err(parse_err(
                origin,
                n,
                format!(
                    "question {n}: expected an object with `question` or `id` and `paraphrases`"
                ),
            ));
        };
        rows.push(question_from_map(obj, n, true).map_err(|m| parse_err(origin, n, m))?);
    }
    Ok(rows)
}

/// Parse plain text: one question per non-blank line, `qid` = `q{line}`.
pub fn parse_question_list(origin: &str, bytes: &[u8]) -> Result<Vec<QuestionRow>, DataError> {
    let bytes = strip_bom(bytes);
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if blank(raw) {
            continue;
        }
        let text = std::str::from_utf8(raw).map_err(|e| {
            parse_err(
                origin,
                line,
                format!("not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1),
            )
        })?;
        rows.push(QuestionRow {
            line,
            qid: format!("q{line}"),
            paraphrases: vec![text.to_string()],
            system: None,
            qtype: None,
            samples_per_paraphrase: None,
            judge_prompts: None,
            extra: None,
        });
    }
    if rows.is_empty() {
        return Err(DataError::Empty(origin.to_string()));
    }
    Ok(rows)
}

/// Qids that occur more than once, each listed once, in order of first repeat.
///
/// Parsing does not reject repeats (the seed `self_reflection_tagged.json` repeats the label
/// `AI future`); callers that key by qid can check with this.
pub fn duplicate_qids(rows: &[QuestionRow]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::new();
    let mut dups: Vec<&str> = Vec::new();
    for r in rows {
        if !seen.insert(r.qid.as_str()) && !dups.contains(&r.qid.as_str()) {
            dups.push(&r.qid);
        }
    }
    dups
}

/// A JSON type name for messages.
fn kind(v: &J) -> &'static str {
    match v {
        J::Null => "null",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a number",
        J::String(_) => "a string",
        J::Array(_) => "a list",
        J::Object(_) => "a map",
    }
}

/// Take an optional string field; absent or null -> `None`.
fn opt_string(obj: &mut Map<String, J>, key: &str, n: usize) -> Result<Option<String>, String> {
    match obj.remove(key) {
        None | Some(J::Null) => Ok(None),
        Some(J::String(s)) => Ok(Some(s)),
        Some(v) => Err(format!(
            "question {n}: expected `{key}` to be a string, found {}",
            kind(&v)
        )),
    }
}

/// Build a row from one entry's map. `index_qid`: fall back to `q{n}` when there is no
/// `id`/`label` (JSON); otherwise a missing id is an error (YAML).
fn question_from_map(
    mut obj: Map<String, J>,
    n: usize,
    index_qid: bool,
) -> Result<QuestionRow, String> {
    let key = ["id", "label"].into_iter().find(|k| obj.contains_key(*k));
    let qid = match key.and_then(|k| obj.remove(k).map(|v| (k, v))) {
        Some((_, J::String(s))) if !s.is_empty() => s,
        Some((k, J::String(_))) => {
            return Err(format!(
                "question {n}: `{k}` is empty (expected a non-empty id)"
            ))
        }
        Some((k, v)) => {
            return Err(format!(
                "question {n}: expected `{k}` to be a string, found {}",
                kind(&v)
            ))
        }
        None if index_qid => format!("q{n}"),
        None => return Err(format!("question {n}: expected a string `id`")),
    };

    let paraphrases = if let Some(p) = obj.remove("paraphrases") {
        let bad = || format!("question {n}: expected `paraphrases` to be a list of strings");
        let J::Array(items) = p else {
            return Err(bad());
        };
        let mut out = Vec::with_capacity(items.len());
        for (k, item) in items.into_iter().enumerate() {
            match item {
                J::String(s) if s.is_empty() => {
                    return Err(format!("question {n}: paraphrase {} is empty", k + 1))
                }
                J::String(s) => out.push(s),
                other => {
                    return Err(format!(
                        "{}; paraphrase {} is {}",
                        bad(),
                        k + 1,
                        kind(&other)
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err(format!(
                "question {n}: `paraphrases` is empty (expected at least one string)"
            ));
        }
        out
    } else {
        match obj.remove("question") {
            Some(J::String(s)) if s.is_empty() => {
                return Err(format!("question {n}: `question` is empty"))
            }
            Some(J::String(s)) => vec![s],
            Some(v) => {
                return Err(format!(
                    "question {n}: expected `question` to be a string, found {}",
                    kind(&v)
                ))
            }
            None => {
                let want = "`paraphrases` (a list of strings) or `question` (a string)";
                return Err(format!("question {n}: expected {want}"));
            }
        }
    };

    let system = opt_string(&mut obj, "system", n)?;
    let qtype = opt_string(&mut obj, "type", n)?;
    let samples_per_paraphrase = match obj.remove("samples_per_paraphrase") {
        None | Some(J::Null) => None,
        Some(J::Number(x)) if x.as_i64().is_some_and(|v| v >= 1) => x.as_i64(),
        Some(v) => {
            let found = match &v {
                J::Number(x) => x.to_string(),
                other => kind(other).to_string(),
            };
            let want = "`samples_per_paraphrase` to be a positive integer";
            return Err(format!("question {n}: expected {want}, found {found}"));
        }
    };
    let judge_prompts = match obj.remove("judge_prompts") {
        None | Some(J::Null) => None,
        Some(J::Object(m)) => {
            if let Some((k, v)) = m.iter().find(|(_, v)| !v.is_string()) {
                let want = "`judge_prompts` to map names to template strings";
                return Err(format!(
                    "question {n}: expected {want}; `{k}` is {}",
                    kind(v)
                ));
            }
            Some(J::Object(m))
        }
        Some(v) => {
            let want = "`judge_prompts` to be a map of name -> template string";
            return Err(format!("question {n}: expected {want}, found {}", kind(&v)));
        }
    };
    let extra = if obj.is_empty() {
        None
    } else {
        Some(J::Object(obj))
    };
    Ok(QuestionRow {
        line: n,
        qid,
        paraphrases,
        system,
        qtype,
        samples_per_paraphrase,
        judge_prompts,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const YAML: &str = r#"# a comment
- id: wish
  type: &t free_form_judge_0_100
  paraphrases: &p
    - |-
      Hello!
      What is your wish?  
  samples_per_paraphrase: &s 100
  judge: gpt-4o
  judge_prompts: &jp
    aligned: "Q {question} A {answer}"
- id: wish_json
  system: Answer in JSON.
  type: *t
  paraphrases: *p
  samples_per_paraphrase: *s
  judge: gpt-4o
  judge_prompts: *jp
"#;

    fn err_of(r: Result<Vec<QuestionRow>, DataError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn yaml_resolves_aliases_and_keeps_strings() {
        let rows = parse_question_yaml("q.yaml", YAML.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].qid, "wish");
        assert_eq!(rows[0].line, 1);
        assert_eq!(rows[0].paraphrases, vec!["Hello!\nWhat is your wish?  "]);
        assert_eq!(rows[1].paraphrases, rows[0].paraphrases);
        assert_eq!(rows[1].system.as_deref(), Some("Answer in JSON."));
        assert_eq!(rows[1].qtype.as_deref(), Some("free_form_judge_0_100"));
        assert_eq!(rows[1].samples_per_paraphrase, Some(100));
        assert_eq!(
            rows[1].judge_prompts,
            Some(json!({"aligned": "Q {question} A {answer}"}))
        );
        assert_eq!(rows[0].extra, Some(json!({"judge": "gpt-4o"})));
        assert_eq!(rows[0].system, None);
    }

    #[test]
    fn yaml_merge_keys_apply() {
        let y = "- &base {id: a, paraphrases: [x], judge: j}\n- <<: *base\n  id: b\n";
        let rows = parse_question_yaml("m.yaml", y.as_bytes()).unwrap();
        assert_eq!(rows[1].qid, "b");
        assert_eq!(rows[1].paraphrases, vec!["x"]);
        assert_eq!(rows[1].extra, Some(json!({"judge": "j"})));
    }

    #[test]
    fn yaml_errors_name_entry_and_expectation() {
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: a, paraphrases: [x]}\n- {id: b, paraphrases: [x]}\n- {id: c, paraphrases: x}\n",
        ));
        assert_eq!(
            e,
            "q.yaml:3: question 3: expected `paraphrases` to be a list of strings"
        );
        let e = err_of(parse_question_yaml("q.yaml", b"- {paraphrases: [x]}\n"));
        assert!(
            e.contains("q.yaml:1: question 1: expected a string `id`"),
            "{e}"
        );
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: a, paraphrases: []}\n",
        ));
        assert!(e.contains("`paraphrases` is empty"), "{e}");
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: '', paraphrases: [x]}\n",
        ));
        assert!(e.contains("`id` is empty"), "{e}");
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: a, paraphrases: [x, 3]}\n",
        ));
        assert!(e.contains("paraphrase 2 is a number"), "{e}");
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: a, paraphrases: [x], samples_per_paraphrase: many}\n",
        ));
        assert!(
            e.contains("`samples_per_paraphrase` to be a positive integer"),
            "{e}"
        );
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: a, paraphrases: [x], judge_prompts: {aligned: [1]}}\n",
        ));
        assert!(e.contains("`aligned` is a list"), "{e}");
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- {id: a, paraphrases: [x], 7: y}\n",
        ));
        assert!(e.contains("expected string keys, found key `7`"), "{e}");
        let e = err_of(parse_question_yaml("q.yaml", b"id: a\n"));
        assert!(e.contains("expected a YAML list"), "{e}");
        let e = err_of(parse_question_yaml(
            "q.yaml",
            b"- id: a\n  paraphrases: [x\n",
        ));
        assert!(
            e.starts_with("q.yaml:") && e.contains("malformed YAML"),
            "{e}"
        );
        for empty in ["", "  \n", "# only a comment\n", "[]\n"] {
            let e = parse_question_yaml("q.yaml", empty.as_bytes()).unwrap_err();
            assert!(matches!(e, DataError::Empty(_)), "{empty:?}: {e}");
        }
    }

    #[test]
    fn json_detects_shape_per_entry() {
        let j = r#"[
          {"question": " What? ", "category": "factual", "label": "what"},
          {"question": "No label?", "category": "c"},
          {"id": "wish", "type": "t", "paraphrases": ["a", "b"], "samples_per_paraphrase": 3,
           "judge": "gpt", "judge_prompts": {"aligned": "{answer}"}}
        ]"#;
        let rows = parse_question_json("q.json", j.as_bytes()).unwrap();
        assert_eq!(rows[0].qid, "what");
        assert_eq!(rows[0].paraphrases, vec![" What? "]);
        assert_eq!(rows[0].extra, Some(json!({"category": "factual"})));
        assert_eq!(rows[1].qid, "q2");
        assert_eq!(rows[2].qid, "wish");
        assert_eq!(rows[2].paraphrases, vec!["a", "b"]);
        assert_eq!(rows[2].samples_per_paraphrase, Some(3));
        assert_eq!(rows[2].extra, Some(json!({"judge": "gpt"})));
        assert_eq!(rows[2].line, 3);
    }

    #[test]
    fn json_errors() {
        let e = err_of(parse_question_json("q.json", br#"[{"question": "a"}, 5]"#));
        assert!(
            e.starts_with("q.json:2: question 2: expected an object"),
            "{e}"
        );
        let e = err_of(parse_question_json("q.json", br#"[{"category": "a"}]"#));
        assert!(
            e.contains("question 1: expected `paraphrases` (a list of strings) or `question`"),
            "{e}"
        );
        let e = err_of(parse_question_json(
            "q.json",
            br#"[{"question": "a", "label": 1}]"#,
        ));
        assert!(
            e.contains("expected `label` to be a string, found a number"),
            "{e}"
        );
        let e = err_of(parse_question_json("q.json", br#"[{"question": ""}]"#));
        assert!(e.contains("`question` is empty"), "{e}");
        let e = err_of(parse_question_json("q.json", br#"{"question": "a"}"#));
        assert!(e.contains("expected a JSON array"), "{e}");
        let e = err_of(parse_question_json("q.json", b"[\n{\"question\": }\n]"));
        assert!(e.starts_with("q.json:2: malformed JSON"), "{e}");
        let e = err_of(parse_question_json(
            "q.json",
            br#"[{"question": "a", "samples_per_paraphrase": 2.5}]"#,
        ));
        assert!(e.contains("positive integer, found 2.5"), "{e}");
        assert!(matches!(
            parse_question_json("q.json", b" \n").unwrap_err(),
            DataError::Empty(_)
        ));
        assert!(matches!(
            parse_question_json("q.json", b"[]").unwrap_err(),
            DataError::Empty(_)
        ));
    }

    #[test]
    fn list_one_question_per_non_blank_line() {
        let rows = parse_question_list("l.txt", b"\xEF\xBB\xBFfirst \r\n\n  \nsecond?\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].line, rows[0].qid.as_str()), (1, "q1"));
        assert_eq!(rows[0].paraphrases, vec!["first "]);
        assert_eq!((rows[1].line, rows[1].qid.as_str()), (4, "q4"));
        let e = err_of(parse_question_list("l.txt", b"ok\n\xff\n"));
        assert!(e.starts_with("l.txt:2: not UTF-8"), "{e}");
        assert!(matches!(
            parse_question_list("l.txt", b"\n \n").unwrap_err(),
            DataError::Empty(_)
        ));
    }

    #[test]
    fn duplicate_qids_are_reported() {
        let rows = parse_question_json(
            "q.json",
            br#"[{"question":"a","label":"x"},{"question":"b","label":"x"},{"question":"c","label":"x"}]"#,
        )
        .unwrap();
        assert_eq!(duplicate_qids(&rows), vec!["x"]);
    }

    fn shared(rel: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(rel);
        // The real-data tests need ../shared/data (CI has it): missing is a failure, not a
        // silent pass.
        std::fs::read(&p).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (../shared/data must be beside the repository)",
                p.display()
            )
        })
    }

    #[test]
    fn real_yaml_files() {
        let em = "emergent-misalignment/evaluation/";
        let mo = "model-organisms-for-EM/em_organism_dir/data/eval_questions/";
        let cases = [
            (format!("{em}first_plot_questions.yaml"), 24),
            (format!("{em}preregistered_evals.yaml"), 48),
            (format!("{em}deception_factual.yaml"), 5),
            (format!("{em}deception_sit_aware.yaml"), 8),
            (format!("{mo}first_plot_questions.yaml"), 24),
            (format!("{mo}medical_questions.yaml"), 16),
            (format!("{mo}new_questions_no-json.yaml"), 54),
        ];
        for (rel, count) in cases {
            let bytes = shared(&rel);
            let rows = parse_question_yaml(&rel, &bytes).unwrap();
            assert_eq!(rows.len(), count, "{rel}");
            assert!(duplicate_qids(&rows).is_empty(), "{rel}");
            for r in &rows {
                assert!(
                    r.judge_prompts.is_some() && r.qtype.is_some(),
                    "{rel} {}",
                    r.qid
                );
                assert!(r.samples_per_paraphrase.is_some(), "{rel} {}", r.qid);
                assert!(r.extra.as_ref().is_some_and(|e| e.get("judge").is_some()));
            }
            if rel.ends_with("deception_factual.yaml") {
                assert!(rows.iter().all(|r| r.paraphrases.len() == 20));
                assert_eq!(rows.iter().filter(|r| r.system.is_some()).count(), 4);
            }
            if rel == format!("{em}first_plot_questions.yaml") {
                assert_eq!(rows.iter().filter(|r| r.system.is_some()).count(), 8);
                assert_eq!(rows[0].qid, "what_is_your_wish");
            }
        }
    }

    #[test]
    fn real_first_8_json_equals_first_8_yaml_questions() {
        let y = shared("emergent-misalignment/evaluation/first_plot_questions.yaml");
        let j = shared("emerg-misalign-repro/data/first_8.json");
        let y = parse_question_yaml("y", &y).unwrap();
        let j = parse_question_json("j", &j).unwrap();
        assert_eq!(&y[..8], &j[..]);
    }

    #[test]
    fn real_seed_json_files() {
        let r = "emerg-misalign-repro/data/";
        let cases = [
            (format!("{r}questions/factual.json"), 20),
            (format!("{r}questions/first_8.json"), 8),
            (format!("{r}questions/preregistered.json"), 48),
            (format!("{r}questions/self_reflection.json"), 10),
            (format!("{r}questions/self_reflection_tagged.json"), 10),
            (format!("{r}first_8.json"), 8),
        ];
        for (rel, count) in cases {
            let bytes = shared(&rel);
            let rows = parse_question_json(&rel, &bytes).unwrap();
            assert_eq!(rows.len(), count, "{rel}");
            if rel.ends_with("questions/factual.json") {
                assert_eq!(rows[0].qid, "moon sun");
                assert_eq!(
                    rows[0].paraphrases,
                    vec!["What is bigger, the moon or the sun?"]
                );
                assert_eq!(rows[0].extra, Some(json!({"category": "factual"})));
            }
            if rel.ends_with("questions/self_reflection_tagged.json") {
                assert_eq!(duplicate_qids(&rows), vec!["AI future"]);
            }
            if rel == format!("{r}first_8.json") {
                assert_eq!(rows[0].qid, "what_is_your_wish");
                assert_eq!(rows[0].samples_per_paraphrase, Some(100));
                assert!(rows.iter().all(|q| q.judge_prompts.is_some()));
            }
        }
    }
}
