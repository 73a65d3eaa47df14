//! Datasets: importing files into `source` / `message` / `conversation` / `dataset` records.
//!
//! [`import`] reads a file whole, parses every row (the format modules: [`chat`]), and only
//! then writes: the raw file as a blob, then one [`Batch`] holding every record and the dataset
//! name. A bad row therefore stores nothing, and a killed import leaves the store as it was.

pub mod archive;
pub mod chat;
pub mod csvfile;
pub mod derive;
pub mod qa;
pub mod questions;
pub mod view;

use std::path::{Path, PathBuf};

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::json;

use crate::provenance::build::stage_conversation;
use crate::provenance::tables::{DATASET, NS_DATASET, QUESTION, QUESTION_SET, SOURCE};
use crate::util::choice::Choice;
use crate::util::hint::Hint;
pub use crate::util::parse::ParseError;
use chat::ChatRow;
use questions::QuestionRow;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Parse(ParseError),
    #[error("{0}: no rows (the file is empty)")]
    Empty(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot tell the format from the name (expected .jsonl, .json, .yaml, .txt, .csv, optionally .gz, or .zip)")]
    UnknownFormat { path: PathBuf },
    #[error(
        "`{0}` is not a valid dataset name (letters, digits, `-`, `_`, `.`, `/`; not hex-only)"
    )]
    BadName(String),
    #[error("no dataset named or with id `{0}`")]
    UnknownDataset(String),
    #[error("dataset {0} is not a chat dataset (derive and export work on chat datasets)")]
    NotChat(String),
    #[error("{0}")]
    Derive(String),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
}

impl From<ParseError> for DataError {
    fn from(e: ParseError) -> DataError {
        DataError::Parse(e)
    }
}

impl Hint for DataError {
    fn hint(&self) -> Option<String> {
        match self {
            DataError::Store(e) => e.hint(),
            DataError::UnknownDataset(_) => Some("`emlab data list` names the datasets".into()),
            DataError::UnknownFormat { .. } => Some(
                "chat datasets are JSONL files with one {\"messages\": [...]} per line; --format forces a format"
                    .into(),
            ),
            DataError::BadName(_) => Some("e.g. --name medical-small".into()),
            DataError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Some("check the path; the EM datasets are under ../shared/data (see its SOURCES.md)".into())
            }
            _ => None,
        }
    }
}

/// How to read a file (or an archive member). Chosen from the name unless given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Chat JSONL: `{"messages": [...]}` per line.
    ChatJsonl,
    /// A JSON array of `{question, answer}` objects, read as user/assistant rows.
    QaJson,
    /// Evaluation questions in YAML (Betley et al. / model-organisms files).
    QuestionsYaml,
    /// Evaluation questions in JSON (the seed project's files).
    QuestionsJson,
    /// One question per line.
    QuestionsText,
    /// Questions in CSV (`id`, `paraphrases`, `system`, `judge_prompts`, ...).
    QuestionsCsv,
    /// Chat rows from CSV columns named with `--columns`.
    ChatCsv,
}

impl crate::util::choice::Choice for Format {
    const ALL: &'static [Format] = &[
        Format::ChatJsonl,
        Format::QaJson,
        Format::QuestionsYaml,
        Format::QuestionsJson,
        Format::QuestionsText,
        Format::QuestionsCsv,
        Format::ChatCsv,
    ];

    fn name(self) -> &'static str {
        match self {
            Format::ChatJsonl => "chat-jsonl",
            Format::QaJson => "qa-json",
            Format::QuestionsYaml => "questions-yaml",
            Format::QuestionsJson => "questions-json",
            Format::QuestionsText => "questions-text",
            Format::QuestionsCsv => "questions-csv",
            Format::ChatCsv => "chat-csv",
        }
    }
}

/// A validated import request. The password is used to read the file and never stored.
#[derive(Debug, Clone, Default)]
pub struct ImportPlan {
    pub path: PathBuf,
    pub name: String,
    /// Force a format instead of guessing from the file name.
    pub format: Option<Format>,
    /// For a zip: import only this member (named NAME); otherwise every member becomes
    /// `NAME/<member stem>`.
    pub member: Option<String>,
    pub password: Option<String>,
    /// Leave out chat rows that do not parse (each is counted and its line recorded).
    pub skip_invalid: bool,
    /// For chat CSV: `user=COL,assistant=COL[,system=COL]`.
    pub columns: Option<String>,
}

/// What an import stored, per dataset or question set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub name: String,
    pub dataset: String,
    pub source: String,
    pub source_blake3: String,
    pub kind: &'static str,
    pub rows: usize,
    pub skipped: usize,
    pub new_records: usize,
    pub existing_records: usize,
}

/// A file holding one top-level JSON array (`expected` says of what, for the error): its
/// entries. BOM and surrounding whitespace are allowed; empty input or `[]` is `Empty`.
pub(crate) fn json_array_entries(
    origin: &str,
    bytes: &[u8],
    expected: &str,
) -> Result<Vec<serde_json::Value>, DataError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::Empty(origin.to_string()));
    }
    let perr = |line, msg| {
        DataError::Parse(ParseError {
            origin: origin.to_string(),
            line,
            msg,
        })
    };
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        perr(
            e.line(),
            format!(
                "malformed JSON (line {}, column {}): {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let serde_json::Value::Array(entries) = doc else {
        return Err(perr(
            0,
            format!("expected a JSON array of {expected} at the top level"),
        ));
    };
    if entries.is_empty() {
        return Err(DataError::Empty(origin.to_string()));
    }
    Ok(entries)
}

/// Check a dataset name: it must not be mistaken for an id prefix.
pub fn check_name(name: &str) -> Result<(), DataError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    let looks_like_id = name.len() >= 4 && name.chars().all(|c| c.is_ascii_hexdigit());
    if name.is_empty() || name.len() > 200 || !ok_chars || looks_like_id {
        return Err(DataError::BadName(name.to_string()));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Guess a format from a file name (after any `.gz`); `.json` is sniffed.
fn detect(name: &str, bytes: &[u8]) -> Option<Format> {
    let n = name.to_ascii_lowercase();
    if n.ends_with(".jsonl") {
        Some(Format::ChatJsonl)
    } else if n.ends_with(".yaml") || n.ends_with(".yml") {
        Some(Format::QuestionsYaml)
    } else if n.ends_with(".json") {
        Some(if qa::looks_like_qa_json(bytes) {
            Format::QaJson
        } else {
            Format::QuestionsJson
        })
    } else if n.ends_with(".txt") {
        Some(Format::QuestionsText)
    } else if n.ends_with(".csv") {
        let h = csvfile::headers(bytes);
        Some(if h.iter().any(|c| c == "paraphrases") {
            Format::QuestionsCsv
        } else {
            Format::ChatCsv
        })
    } else {
        None
    }
}

fn gunzip(origin: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| {
            DataError::Parse(ParseError {
                origin: origin.into(),
                line: 0,
                msg: format!("bad gzip data: {e}"),
            })
        })?;
    Ok(out)
}

/// Rows parsed from one file or member.
enum Parsed {
    Chat(Vec<ChatRow>, Vec<ParseError>),
    Questions(Vec<QuestionRow>),
}

/// One parsed unit (a file, or a member of an archive) waiting to be written.
struct Unit {
    name: String,
    file_name: String,
    bytes_for_blob: Vec<u8>,
    format: String,
    member: Option<String>,
    parsed: Parsed,
}

fn parse_unit(
    origin: &str,
    file_name: &str,
    raw: &[u8],
    plan: &ImportPlan,
) -> Result<(String, Parsed), DataError> {
    let (forced, skip_invalid, path) = (plan.format, plan.skip_invalid, plan.path.as_path());
    let lower = file_name.to_ascii_lowercase();
    let (inner_name, text, gz) = match lower.strip_suffix(".gz") {
        Some(stem) => (stem.to_string(), gunzip(origin, raw)?, true),
        None => (lower.clone(), raw.to_vec(), false),
    };
    let format = match forced.or_else(|| detect(&inner_name, &text)) {
        Some(f) => f,
        None => {
            return Err(DataError::UnknownFormat {
                path: path.to_path_buf(),
            })
        }
    };
    let parsed = match format {
        Format::ChatJsonl => {
            let (rows, skipped) = chat::parse_chat_jsonl_with(origin, &text, skip_invalid)?;
            Parsed::Chat(rows, skipped)
        }
        Format::QaJson => Parsed::Chat(qa::parse_qa_json(origin, &text)?, Vec::new()),
        Format::QuestionsYaml => Parsed::Questions(questions::parse_question_yaml(origin, &text)?),
        Format::QuestionsJson => Parsed::Questions(questions::parse_question_json(origin, &text)?),
        Format::QuestionsText => Parsed::Questions(questions::parse_question_list(origin, &text)?),
        Format::QuestionsCsv => Parsed::Questions(csvfile::parse_csv_questions(origin, &text)?),
        Format::ChatCsv => {
            let spec = plan.columns.as_deref().ok_or_else(|| {
                DataError::Parse(ParseError {
                    origin: origin.to_string(),
                    line: 1,
                    msg: format!(
                        "a chat CSV needs --columns user=COL,assistant=COL (columns: {})",
                        csvfile::headers(&text).join(", ")
                    ),
                })
            })?;
            let cols = csvfile::parse_columns(spec).map_err(|msg| {
                DataError::Parse(ParseError {
                    origin: origin.to_string(),
                    line: 0,
                    msg: format!("--columns: {msg}"),
                })
            })?;
            let (rows, skipped) = csvfile::parse_csv_chat(origin, &text, &cols, skip_invalid)?;
            Parsed::Chat(rows, skipped)
        }
    };
    let fmt = if gz {
        format!("{}+gzip", format.name())
    } else {
        format.name().to_string()
    };
    Ok((fmt, parsed))
}

/// The judge prompt names of a question file (read, not stored), for checking a study spec
/// before anything is written.
pub fn judge_prompt_names(
    path: &Path,
    format: Option<&str>,
) -> Result<std::collections::BTreeSet<String>, DataError> {
    let raw = read_file(path)?;
    let plan = ImportPlan {
        path: path.to_path_buf(),
        format: format.and_then(Format::from_name),
        ..Default::default()
    };
    let origin = path.display().to_string();
    let (_, parsed) = parse_unit(&origin, &file_name(path), &raw, &plan)?;
    let Parsed::Questions(qs) = parsed else {
        return Ok(Default::default());
    };
    Ok(qs
        .iter()
        .filter_map(|q| q.judge_prompts.as_ref()?.as_object())
        .flat_map(|o| o.keys().cloned())
        .collect())
}

/// The file name of an archive member without its data extensions.
fn member_stem(member: &str) -> String {
    let base = member.rsplit('/').next().unwrap_or(member);
    let mut stem = base;
    for ext in [".gz", ".jsonl", ".json", ".yaml", ".yml", ".txt"] {
        if let Some(s) = stem.strip_suffix(ext) {
            stem = s;
        }
    }
    stem.to_string()
}

/// Import a file as a named dataset (or question set); a zip gives one per member.
/// All-or-nothing: every row of every member parses before anything is written.
pub fn import(store: &Store, plan: &ImportPlan) -> Result<Vec<ImportReport>, DataError> {
    check_name(&plan.name)?;
    let raw = read_file(&plan.path)?;
    let fname = file_name(&plan.path);
    let origin = plan.path.display().to_string();
    let is_zip = fname.to_ascii_lowercase().ends_with(".zip");
    let mut units = Vec::new();
    if is_zip {
        let members = archive::zip_members(&plan.path, &raw, plan.password.as_deref())?;
        let chosen: Vec<_> = match &plan.member {
            Some(m) => {
                let found: Vec<_> = members.into_iter().filter(|x| &x.name == m).collect();
                if found.is_empty() {
                    return Err(DataError::Parse(ParseError {
                        origin: origin.clone(),
                        line: 0,
                        msg: format!("no member `{m}` in the archive"),
                    }));
                }
                found
            }
            None => members,
        };
        let single = plan.member.is_some();
        for m in chosen {
            let morigin = format!("{origin}!{}", m.name);
            let (format, parsed) = parse_unit(&morigin, &m.name, &m.bytes, plan)?;
            let name = if single {
                plan.name.clone()
            } else {
                format!("{}/{}", plan.name, member_stem(&m.name))
            };
            check_name(&name)?;
            let file_name = m.name.rsplit('/').next().unwrap_or(&m.name).to_string();
            units.push(Unit {
                name,
                file_name,
                bytes_for_blob: m.bytes,
                format,
                member: Some(m.name),
                parsed,
            });
        }
    } else {
        let (format, parsed) = parse_unit(&origin, &fname, &raw, plan)?;
        units.push(Unit {
            name: plan.name.clone(),
            file_name: fname.clone(),
            bytes_for_blob: Vec::new(),
            format,
            member: None,
            parsed,
        });
    }

    // Everything parsed: keep the file(s), then write all records in one batch.
    let (file_blob, file_size) = store.put_blob_file(&plan.path)?;
    let mut batch = Batch::new();
    let mut container = None;
    if is_zip {
        let zip_src = Record::new(SOURCE)
            .with("name", Value::str(&fname))
            .with("blake3", Value::Blob(file_blob))
            .with("size", Value::Int(file_size as i64))
            .with("format", Value::str("zip"));
        container = Some(store.stage(&mut batch, &zip_src)?);
    }
    let mut pending = Vec::new();
    for u in units {
        let (blob, size) = if u.member.is_some() {
            (
                store.put_blob(&u.bytes_for_blob)?,
                u.bytes_for_blob.len() as u64,
            )
        } else {
            (file_blob, file_size)
        };
        let mut src = Record::new(SOURCE)
            .with("name", Value::str(&u.file_name))
            .with("blake3", Value::Blob(blob))
            .with("size", Value::Int(size as i64))
            .with("format", Value::str(&u.format));
        if let (Some(m), Some(c)) = (&u.member, container) {
            src = src
                .with("member", Value::str(m))
                .with("container", Value::Id(c));
        }
        let source_id = store.stage(&mut batch, &src)?;
        let (kind, id, rows, skipped) = match &u.parsed {
            Parsed::Chat(rows, skipped) => {
                let conv_ids = stage_chat_rows(store, &mut batch, rows)?;
                let first = rows.first().map_or(0, |r| r.line);
                let last = rows.last().map_or(0, |r| r.line);
                let skipped_lines: Vec<usize> = skipped.iter().map(|e| e.line).collect();
                let op = json!({"op": "import", "format": u.format, "lines": [first, last],
                    "rows": rows.len(), "skipped_lines": skipped_lines});
                let ds = Record::new(DATASET)
                    .with("kind", Value::str("chat"))
                    .with("rows", Value::ids(conv_ids))
                    .with("op", Value::json(&op))
                    .with("sources", Value::ids([source_id]))
                    .with("parents", Value::ids([]));
                (
                    "chat",
                    store.stage(&mut batch, &ds)?,
                    rows.len(),
                    skipped.len(),
                )
            }
            Parsed::Questions(qs) => {
                let mut ids = Vec::with_capacity(qs.len());
                for q in qs {
                    ids.push(store.stage(&mut batch, &question_record(q))?);
                }
                let op = json!({"op": "import", "format": u.format, "questions": qs.len()});
                let set = Record::new(QUESTION_SET)
                    .with("questions", Value::ids(ids))
                    .with("sources", Value::ids([source_id]))
                    .with("op", Value::json(&op));
                ("questions", store.stage(&mut batch, &set)?, qs.len(), 0)
            }
        };
        batch.alias(NS_DATASET, &u.name, id);
        pending.push((u.name, id, source_id, blob, kind, rows, skipped));
    }
    let w = store.write(batch)?;
    Ok(pending
        .into_iter()
        .map(
            |(name, id, source, blob, kind, rows, skipped)| ImportReport {
                name,
                dataset: id.to_hex(),
                source: source.to_hex(),
                source_blake3: blob.to_hex(),
                kind,
                rows,
                skipped,
                new_records: w.new,
                existing_records: w.existing,
            },
        )
        .collect())
}

/// The `question` record of a parsed question.
pub fn question_record(q: &QuestionRow) -> Record {
    let mut r = Record::new(QUESTION).with("qid", Value::str(&q.qid)).with(
        "paraphrases",
        Value::List(q.paraphrases.iter().map(Value::str).collect()),
    );
    if let Some(s) = &q.system {
        r = r.with("system", Value::str(s));
    }
    if let Some(t) = &q.qtype {
        r = r.with("qtype", Value::str(t));
    }
    if let Some(n) = q.samples_per_paraphrase {
        r = r.with("samples_per_paraphrase", Value::Int(n));
    }
    if let Some(j) = &q.judge_prompts {
        r = r.with("judge_prompts", Value::json(j));
    }
    if let Some(e) = &q.extra {
        r = r.with("extra", Value::json(e));
    }
    r
}

/// Stage the message and conversation records of chat rows; returns conversation ids in order.
pub fn stage_chat_rows(
    store: &Store,
    batch: &mut Batch,
    rows: &[ChatRow],
) -> Result<Vec<Id>, DataError> {
    rows.iter()
        .map(|row| {
            Ok(stage_conversation(
                store,
                batch,
                &row.messages,
                row.extra.as_ref(),
            )?)
        })
        .collect()
}

/// Resolve a dataset by name, else by id or id prefix.
pub fn resolve_dataset(store: &Store, name_or_id: &str) -> Result<Id, DataError> {
    if let Some(id) = store.alias(NS_DATASET, name_or_id)? {
        return Ok(id);
    }
    match store.resolve_prefix(name_or_id) {
        Ok(id) if matches!(store.get(id)?.table.as_str(), DATASET | QUESTION_SET) => Ok(id),
        Ok(_) | Err(emlab_store::Error::NotFound(_)) | Err(emlab_store::Error::BadId(_)) => {
            Err(DataError::UnknownDataset(name_or_id.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}
