//! Reading datasets back: their rows ([`chat_rows`]), summaries ([`summary`], [`stats`]),
//! exports ([`export_jsonl`], [`export_parquet`]) and lineage ([`lineage`]): the DAG from a
//! dataset back through its parents to the source files and their BLAKE3.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use emlab_store::{Id, Record, Store, Value};
use serde_json::{json, Value as J};

use super::DataError;
use crate::provenance::tables::{DATASET, MODEL, QUESTION_SET, SOURCE};

/// Rows as `(record id, [(role, content)])`.
pub type Rows = Vec<(Id, Vec<(String, String)>)>;

/// A dataset's (or question set's) headline facts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub id: String,
    pub kind: String,
    pub rows: usize,
    pub op: J,
    pub parents: Vec<String>,
    pub sources: Vec<String>,
}

fn json_field(rec: &Record, name: &str) -> J {
    rec.get(name).map_or(J::Null, Value::to_json)
}

pub fn summary(store: &Store, id: Id) -> Result<Summary, DataError> {
    let rec = store.get(id)?;
    let (kind, rows) = match rec.table.as_str() {
        DATASET => (
            rec.get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            rec.get("rows").map_or(0, |v| v.id_list().len()),
        ),
        QUESTION_SET => (
            "questions".to_string(),
            rec.get("questions").map_or(0, |v| v.id_list().len()),
        ),
        other => {
            return Err(DataError::UnknownDataset(format!(
                "{id} (a {other} record)"
            )))
        }
    };
    let ids = |n: &str| {
        rec.get(n)
            .map(Value::id_list)
            .unwrap_or_default()
            .iter()
            .map(Id::to_hex)
            .collect()
    };
    Ok(Summary {
        id: id.to_hex(),
        kind,
        rows,
        op: json_field(&rec, "op"),
        parents: ids("parents"),
        sources: ids("sources"),
    })
}

/// The `model` records named `want`, or whose id starts with it (imported results' models,
/// local models, endpoints).
pub fn models_named(store: &Store, want: &str) -> Result<Vec<Id>, DataError> {
    let mut out = Vec::new();
    for (_, id) in store.ids_in_table(MODEL, 0)? {
        let rec = store.get(id)?;
        if rec.get("name").and_then(Value::as_str) == Some(want) || id.to_hex().starts_with(want) {
            out.push(id);
        }
    }
    Ok(out)
}

/// The question ids (`qid`) of a question set (a name or id).
pub fn question_ids(
    store: &Store,
    set: &str,
) -> Result<std::collections::BTreeSet<String>, DataError> {
    let id = super::resolve_dataset(store, set)?;
    let rec = store.get(id)?;
    if rec.table != QUESTION_SET {
        return Err(DataError::Derive(format!("`{set}` is not a question set")));
    }
    let ids = rec.get("questions").map(Value::id_list).unwrap_or_default();
    Ok(store
        .get_many(&ids)?
        .iter()
        .filter_map(|q| q.get("qid").and_then(Value::as_str).map(str::to_string))
        .collect())
}

/// The messages of one conversation record, as `(role, content)`.
pub fn conversation(store: &Store, id: Id) -> Result<Vec<(String, String)>, DataError> {
    let c = store.get(id)?;
    let ids = c.get("messages").map(Value::id_list).unwrap_or_default();
    Ok(store
        .get_many(&ids)?
        .iter()
        .map(|m| {
            let f = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            (f("role"), f("content"))
        })
        .collect())
}

/// The rows of a chat dataset as `(conversation id, [(role, content)])`, or of a question set
/// as `(question id, [("question", paraphrase)...])`, optionally only the first `limit`.
pub fn chat_rows(store: &Store, id: Id, limit: Option<usize>) -> Result<Rows, DataError> {
    let rec = store.get(id)?;
    let field = if rec.table == QUESTION_SET {
        "questions"
    } else {
        "rows"
    };
    let mut ids = rec.get(field).map(Value::id_list).unwrap_or_default();
    if let Some(n) = limit {
        ids.truncate(n);
    }
    let recs = store.get_many(&ids)?;
    if rec.table == QUESTION_SET {
        return Ok(ids
            .into_iter()
            .zip(recs)
            .map(|(i, q)| {
                let ps = q.get("paraphrases").and_then(Value::as_list).unwrap_or(&[]);
                let msgs = ps
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|p| ("question".to_string(), p.to_string()))
                    .collect();
                (i, msgs)
            })
            .collect());
    }
    let mut msg_ids = Vec::new();
    for c in &recs {
        msg_ids.extend(c.get("messages").map(Value::id_list).unwrap_or_default());
    }
    let msgs = store.get_many(&msg_ids)?;
    let mut it = msgs.into_iter();
    let mut out = Vec::with_capacity(ids.len());
    for (i, c) in ids.into_iter().zip(recs) {
        let n = c.get("messages").map_or(0, |v| v.id_list().len());
        let m = it
            .by_ref()
            .take(n)
            .map(|m| {
                (
                    m.get("role")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    m.get("content")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect();
        out.push((i, m));
    }
    Ok(out)
}

/// Row statistics: lengths in characters (a tokenizer-based histogram comes with the model
/// runtime), roles, duplicates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub rows: usize,
    pub unique_rows: usize,
    pub duplicate_rows: usize,
    pub roles: BTreeMap<String, usize>,
    pub length_unit: &'static str,
    pub length_min: usize,
    pub length_median: usize,
    pub length_max: usize,
    /// `(upper bound, count)`: rows whose total length is below the bound (powers of two).
    pub histogram: Vec<(usize, usize)>,
}

pub fn stats(store: &Store, id: Id) -> Result<Stats, DataError> {
    let rows = chat_rows(store, id, None)?;
    let mut roles = BTreeMap::new();
    let mut lens = Vec::with_capacity(rows.len());
    let mut seen = std::collections::HashSet::new();
    for (conv, msgs) in &rows {
        seen.insert(*conv);
        let mut len = 0;
        for (r, c) in msgs {
            *roles.entry(r.clone()).or_insert(0) += 1;
            len += c.chars().count();
        }
        lens.push(len);
    }
    lens.sort_unstable();
    let mut histogram: Vec<(usize, usize)> = Vec::new();
    for &l in &lens {
        let bound = (l + 1).next_power_of_two();
        match histogram.last_mut() {
            Some((b, n)) if *b == bound => *n += 1,
            _ => histogram.push((bound, 1)),
        }
    }
    Ok(Stats {
        rows: rows.len(),
        unique_rows: seen.len(),
        duplicate_rows: rows.len() - seen.len(),
        roles,
        length_unit: "characters",
        length_min: lens.first().copied().unwrap_or(0),
        length_median: lens.get(lens.len() / 2).copied().unwrap_or(0),
        length_max: lens.last().copied().unwrap_or(0),
        histogram,
    })
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn require_chat(store: &Store, id: Id) -> Result<(), DataError> {
    let rec = store.get(id)?;
    if rec.table != DATASET || rec.get("kind").and_then(Value::as_str) != Some("chat") {
        return Err(DataError::NotChat(id.to_hex()));
    }
    Ok(())
}

/// One row of chat JSONL: `{"messages": [{"role", "content"}, ...]}`.
pub fn chat_line(msgs: &[(String, String)]) -> J {
    let m: Vec<J> = msgs
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    json!({ "messages": m })
}

/// Write chat JSONL (`{"messages": [{"role", "content"}]}` per line, the format OpenAI
/// fine-tuning and TRL accept). Written to a temp file and renamed, so a failed export leaves
/// no partial file.
pub fn export_jsonl(store: &Store, id: Id, path: &Path) -> Result<usize, DataError> {
    require_chat(store, id)?;
    let rows = chat_rows(store, id, None)?;
    let tmp = path.with_extension("tmp-export");
    {
        let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = std::io::BufWriter::new(f);
        for (_, msgs) in &rows {
            serde_json::to_writer(&mut w, &chat_line(msgs)).map_err(|e| io_err(&tmp)(e.into()))?;
            w.write_all(b"\n").map_err(io_err(&tmp))?;
        }
        w.into_inner()
            .map_err(|e| io_err(&tmp)(e.into_error()))?
            .sync_all()
            .map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(rows.len())
}

/// Write Parquet with a `messages: list<struct<role, content>>` column (TRL's conversational
/// format) plus `row` and `conversation` (id) columns.
pub fn export_parquet(store: &Store, id: Id, path: &Path) -> Result<usize, DataError> {
    use arrow::array::{Array, Int64Builder, ListBuilder, StringBuilder, StructBuilder};
    use arrow::datatypes::{DataType, Field, Fields, Schema};
    require_chat(store, id)?;
    let rows = chat_rows(store, id, None)?;
    let fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ]);
    let mut row_b = Int64Builder::new();
    let mut conv_b = StringBuilder::new();
    let mut msgs_b = ListBuilder::new(StructBuilder::from_fields(fields.clone(), 0));
    for (i, (conv, msgs)) in rows.iter().enumerate() {
        row_b.append_value(i as i64);
        conv_b.append_value(conv.to_hex());
        let sb = msgs_b.values();
        for (r, c) in msgs {
            if let Some(b) = sb.field_builder::<StringBuilder>(0) {
                b.append_value(r);
            }
            if let Some(b) = sb.field_builder::<StringBuilder>(1) {
                b.append_value(c);
            }
            sb.append(true);
        }
        msgs_b.append(true);
    }
    let msgs_arr = msgs_b.finish();
    let schema = Arc::new(Schema::new(vec![
        Field::new("row", DataType::Int64, false),
        Field::new("conversation", DataType::Utf8, false),
        Field::new("messages", msgs_arr.data_type().clone(), true),
    ]));
    let batch = arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(row_b.finish()),
            Arc::new(conv_b.finish()),
            Arc::new(msgs_arr),
        ],
    )
    .map_err(|e| DataError::Derive(format!("building Parquet for {}: {e}", path.display())))?;
    let tmp = path.with_extension("tmp-export");
    let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let perr = |e: parquet::errors::ParquetError| {
        DataError::Derive(format!("writing {}: {e}", tmp.display()))
    };
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, Some(props)).map_err(perr)?;
    w.write(&batch).map_err(perr)?;
    w.close().map_err(perr)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(rows.len())
}

/// One node of a lineage tree.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Node {
    pub id: String,
    pub table: String,
    /// For datasets: names pointing at this id. For sources: the file name.
    pub label: String,
    /// Sources: the file's BLAKE3 (hex). Datasets: the op that made it.
    pub detail: J,
    pub parents: Vec<Node>,
}

/// The lineage DAG (as a tree; shared ancestors appear under each child) of a record.
pub fn lineage(store: &Store, id: Id) -> Result<Node, DataError> {
    let names = store.aliases(crate::provenance::tables::NS_DATASET)?;
    node(store, id, &names, 0)
}

fn node(store: &Store, id: Id, names: &[(String, Id)], depth: usize) -> Result<Node, DataError> {
    let rec = store.get(id)?;
    let (label, detail) = if rec.table == SOURCE {
        let mut d = json!({"blake3": json_field(&rec, "blake3"), "size": json_field(&rec, "size"), "format": json_field(&rec, "format")});
        if let Some(m) = rec.get("member").and_then(Value::as_str) {
            d["member"] = json!(m);
        }
        (
            rec.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            d,
        )
    } else {
        let label: Vec<&str> = names
            .iter()
            .filter(|(_, i)| *i == id)
            .map(|(n, _)| n.as_str())
            .collect();
        (label.join(", "), json_field(&rec, "op"))
    };
    let mut parents = Vec::new();
    if depth < 64 {
        for (_, p) in store.parents(&rec)? {
            parents.push(node(store, p, names, depth + 1)?);
        }
    }
    Ok(Node {
        id: id.to_hex(),
        table: rec.table.clone(),
        label,
        detail,
        parents,
    })
}

/// Render a lineage tree as indented text.
pub fn render_tree(n: &Node) -> String {
    let mut s = String::new();
    render(n, "", true, true, &mut s);
    s
}

fn describe(n: &Node) -> String {
    if n.table == SOURCE {
        let mut d = format!(
            "source {} {} blake3:{}",
            &n.id[..12],
            n.label,
            n.detail["blake3"].as_str().unwrap_or("")
        );
        if let Some(m) = n.detail["member"].as_str() {
            d.push_str(&format!(" (member {m})"));
        }
        d
    } else {
        let name = if n.label.is_empty() {
            String::new()
        } else {
            format!(" `{}`", n.label)
        };
        let op = match n.detail["op"].as_str() {
            Some("derive") => {
                let steps: Vec<String> = n.detail["steps"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| s["op"].as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                format!("derive [{}]", steps.join(", "))
            }
            Some(o) => format!("{o} {}", n.detail["format"].as_str().unwrap_or("")),
            None => String::new(),
        };
        format!("{} {}{name} {op}", n.table, &n.id[..12])
    }
}

fn render(n: &Node, prefix: &str, last: bool, root: bool, out: &mut String) {
    if root {
        out.push_str(&describe(n));
    } else {
        out.push_str(prefix);
        out.push_str(if last { "└── " } else { "├── " });
        out.push_str(&describe(n));
    }
    out.push('\n');
    let child_prefix = if root {
        String::new()
    } else {
        format!("{prefix}{}", if last { "    " } else { "│   " })
    };
    for (i, p) in n.parents.iter().enumerate() {
        render(p, &child_prefix, i + 1 == n.parents.len(), false, out);
    }
}
