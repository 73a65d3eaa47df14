//! Datasets: importing files into `source` / `message` / `conversation` / `dataset` records.
//!
//! [`import`] reads a file whole, parses every row (the format modules: [`chat`]), and only
//! then writes: the raw file as a blob, then one [`Batch`] holding every record and the dataset
//! name. A bad row therefore stores nothing, and a killed import leaves the store as it was.

pub mod archive;
pub mod chat;
pub mod qa;
pub mod questions;

use std::path::{Path, PathBuf};

use emlab_store::{Batch, Id, Record, Store, Value};
use serde_json::json;

use crate::records::{CONVERSATION, DATASET, MESSAGE, NS_DATASET, SOURCE};
use chat::ChatRow;

/// A row-level parse failure: file, 1-based line, what was wrong or expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub origin: String,
    pub line: usize,
    pub msg: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.origin, self.line, self.msg)
    }
}

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
    #[error("{path}: cannot tell the format from the name (expected .jsonl or .jsonl.gz)")]
    UnknownFormat { path: PathBuf },
    #[error(
        "`{0}` is not a valid dataset name (letters, digits, `-`, `_`, `.`, `/`; not hex-only)"
    )]
    BadName(String),
    #[error("no dataset named or with id `{0}`")]
    UnknownDataset(String),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
}

/// How to read a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Chat JSONL (optionally gzip-compressed).
    ChatJsonl,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::ChatJsonl => "chat-jsonl",
        }
    }
}

/// A validated import request.
#[derive(Debug, Clone)]
pub struct ImportPlan {
    pub path: PathBuf,
    pub name: String,
}

/// What an import stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub name: String,
    pub dataset: String,
    pub source: String,
    pub source_blake3: String,
    pub kind: &'static str,
    pub rows: usize,
    pub new_records: usize,
    pub existing_records: usize,
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

fn detect(path: &Path) -> Result<(Format, bool), DataError> {
    let name = file_name(path).to_ascii_lowercase();
    if name.ends_with(".jsonl") {
        Ok((Format::ChatJsonl, false))
    } else if name.ends_with(".jsonl.gz") {
        Ok((Format::ChatJsonl, true))
    } else {
        Err(DataError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

fn gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(out)
}

/// Import a file as a named dataset. All-or-nothing.
pub fn import(store: &Store, plan: &ImportPlan) -> Result<ImportReport, DataError> {
    check_name(&plan.name)?;
    let (format, gz) = detect(&plan.path)?;
    let raw = read_file(&plan.path)?;
    let origin = plan.path.display().to_string();
    let text = if gz { gunzip(&plan.path, &raw)? } else { raw };
    let rows = match format {
        Format::ChatJsonl => chat::parse_chat_jsonl(&origin, &text)?,
    };
    // Parsing succeeded: now keep the file and write every record in one batch.
    let (blob, size) = store.put_blob_file(&plan.path)?;
    let fmt = if gz {
        format!("{}+gzip", format.name())
    } else {
        format.name().to_string()
    };
    let source = Record::new(SOURCE)
        .with("name", Value::str(file_name(&plan.path)))
        .with("blake3", Value::Blob(blob))
        .with("size", Value::Int(size as i64))
        .with("format", Value::str(&fmt));
    let mut batch = Batch::new();
    let source_id = store.stage(&mut batch, &source)?;
    let conv_ids = stage_chat_rows(store, &mut batch, &rows)?;
    let first = rows.first().map(|r| r.line).unwrap_or(0);
    let last = rows.last().map(|r| r.line).unwrap_or(0);
    let op = json!({"op": "import", "format": fmt, "lines": [first, last], "rows": rows.len()});
    let dataset = Record::new(DATASET)
        .with("kind", Value::str("chat"))
        .with("rows", Value::ids(conv_ids.iter().copied()))
        .with("op", Value::json(&op))
        .with("sources", Value::ids([source_id]))
        .with("parents", Value::ids([]));
    let dataset_id = store.stage(&mut batch, &dataset)?;
    batch.alias(NS_DATASET, &plan.name, dataset_id);
    let w = store.write(batch)?;
    Ok(ImportReport {
        name: plan.name.clone(),
        dataset: dataset_id.to_hex(),
        source: source_id.to_hex(),
        source_blake3: blob.to_hex(),
        kind: "chat",
        rows: rows.len(),
        new_records: w.new,
        existing_records: w.existing,
    })
}

/// Stage the message and conversation records of chat rows; returns conversation ids in order.
pub fn stage_chat_rows(
    store: &Store,
    batch: &mut Batch,
    rows: &[ChatRow],
) -> Result<Vec<Id>, DataError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut msg_ids = Vec::with_capacity(row.messages.len());
        for (role, content) in &row.messages {
            let m = Record::new(MESSAGE)
                .with("role", Value::str(role))
                .with("content", Value::str(content));
            msg_ids.push(store.stage(batch, &m)?);
        }
        let mut c = Record::new(CONVERSATION).with("messages", Value::ids(msg_ids));
        if let Some(extra) = &row.extra {
            c = c.with("extra", Value::json(extra));
        }
        out.push(store.stage(batch, &c)?);
    }
    Ok(out)
}

/// Resolve a dataset by name, else by id or id prefix.
pub fn resolve_dataset(store: &Store, name_or_id: &str) -> Result<Id, DataError> {
    if let Some(id) = store.alias(NS_DATASET, name_or_id)? {
        return Ok(id);
    }
    match store.resolve_prefix(name_or_id) {
        Ok(id) if store.get(id)?.table == DATASET => Ok(id),
        Ok(_) | Err(emlab_store::Error::NotFound(_)) | Err(emlab_store::Error::BadId(_)) => {
            Err(DataError::UnknownDataset(name_or_id.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}
