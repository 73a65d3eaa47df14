//! Parquet export: one hive-partitioned folder per table, `<out>/<table>/part=<first seq>/
//! data.parquet`, zstd-compressed, with the Arrow schema [`arrow_schema`] derives from the same
//! [`TableDef`] that `schema/<table>.md` documents.
//!
//! Export is incremental: `<out>/_emlab_export.json` holds, per table, the sequence number of
//! the last record exported, and each run writes only newer records. Files are written under a
//! temporary name and published whole (renamed into place; on an object store, one put), and
//! the state file is replaced last, so a crash leaves either the old state (the next run
//! rewrites the same `part=` file, a superset, over it) or the new one; no reader ever sees
//! half a file. [`ExportTarget`] is where files go: [`LocalDir`] here.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::record::{ColType, Id, Record, TableDef, Value};
use crate::store::{rename_durably, write_atomic, Store};

const STATE_FILE: &str = "_emlab_export.json";
const CHUNK: usize = 16_384;

/// The Arrow type of a column: ids, blobs and JSON become strings (hex / JSON text), so DuckDB
/// joins on them without conversion.
pub fn arrow_type(ty: ColType) -> DataType {
    let item = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    match ty {
        ColType::Bool => DataType::Boolean,
        ColType::Int => DataType::Int64,
        ColType::Float => DataType::Float64,
        ColType::Str | ColType::Id | ColType::Json | ColType::Blob => DataType::Utf8,
        ColType::IdList | ColType::StrList => item(DataType::Utf8),
        ColType::IntList => item(DataType::Int64),
        ColType::FloatList => item(DataType::Float64),
    }
}

/// The Arrow schema of a table: `id` first, then the columns in definition order.
pub fn arrow_schema(def: &TableDef) -> Schema {
    let mut fields = vec![Field::new("id", DataType::Utf8, false)];
    for c in def.columns {
        fields.push(Field::new(c.name, arrow_type(c.ty), c.nullable));
    }
    Schema::new(fields)
}

/// What one export wrote.
#[derive(Debug, Default, Clone)]
pub struct ExportReport {
    /// Rows written per table in this run.
    pub rows: BTreeMap<String, u64>,
    pub files: Vec<String>,
}

/// Where an export's files go: a local directory ([`LocalDir`]), or an object store (emlab's
/// `export --to URL`). Files are written locally first (`scratch`) and then published whole,
/// so no reader sees half a file; the state file is replaced last.
pub trait ExportTarget {
    /// A local directory for files before they are published.
    fn scratch(&self) -> &Path;
    /// The state file's bytes, if there is one.
    fn read_state(&mut self) -> Result<Option<Vec<u8>>>;
    /// Whether `table` has a folder already (an earlier export wrote it).
    fn has_table(&mut self, table: &str) -> Result<bool>;
    /// Publish the file at `local` (in `scratch`) as `rel` (`<table>/part=<n>/data.parquet`),
    /// replacing what is there; returns where it went, for messages.
    fn publish(&mut self, local: &Path, rel: &str) -> Result<String>;
    /// Replace the state file.
    fn write_state(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A local export directory: files are renamed into place (atomic on one filesystem).
pub struct LocalDir {
    out: std::path::PathBuf,
}

impl LocalDir {
    pub fn new(out: &Path) -> Result<LocalDir> {
        fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        Ok(LocalDir {
            out: out.to_path_buf(),
        })
    }
}

impl ExportTarget for LocalDir {
    fn scratch(&self) -> &Path {
        &self.out
    }

    fn read_state(&mut self) -> Result<Option<Vec<u8>>> {
        let path = self.out.join(STATE_FILE);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn has_table(&mut self, table: &str) -> Result<bool> {
        Ok(self.out.join(table).exists())
    }

    fn publish(&mut self, local: &Path, rel: &str) -> Result<String> {
        let dest = self.out.join(rel);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        rename_durably(local, &dest)?;
        Ok(dest.display().to_string())
    }

    fn write_state(&mut self, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.out.join(STATE_FILE), bytes)
    }
}

/// Export every record not yet exported to the directory `out`.
pub fn export(store: &Store, out: &Path) -> Result<ExportReport> {
    export_to(store, &mut LocalDir::new(out)?)
}

/// Export every record not yet exported to `target`, incrementally (see the module docs).
pub fn export_to(store: &Store, target: &mut dyn ExportTarget) -> Result<ExportReport> {
    let mut state: BTreeMap<String, u64> = match target.read_state()? {
        Some(bytes) => {
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::Export {
                    table: "*".into(),
                    message: format!("{STATE_FILE}: {e}"),
                })?;
            serde_json::from_value(v["tables"].clone()).unwrap_or_default()
        }
        None => BTreeMap::new(),
    };
    let mut report = ExportReport::default();
    let tmp = target.scratch().join(".data.parquet.tmp");
    for def in store.tables() {
        let last = state.get(def.name).copied().unwrap_or(0);
        let ids = store.ids_in_table(def.name, last)?;
        let first_time = !target.has_table(def.name)?;
        if ids.is_empty() && !first_time {
            continue;
        }
        // An empty table still gets one (empty) file, so queries over it find its schema.
        let first_seq = ids.first().map(|(s, _)| *s).unwrap_or(0);
        let rel = format!("{}/part={first_seq:012}/data.parquet", def.name);
        write_parquet(store, def, &ids, &tmp)?;
        let file = target.publish(&tmp, &rel)?;
        report.rows.insert(def.name.to_string(), ids.len() as u64);
        report.files.push(file);
        if let Some((s, _)) = ids.last() {
            state.insert(def.name.to_string(), *s);
        }
    }
    write_aliases(store, &tmp)?;
    report
        .files
        .push(target.publish(&tmp, "alias/data.parquet")?);
    let body = serde_json::json!({"format": 1, "tables": state});
    target.write_state(format!("{body:#}\n").as_bytes())?;
    Ok(report)
}

/// Names are mutable, so they are not records: each export writes a fresh snapshot of all of
/// them to `<out>/alias/data.parquet` (namespace, name, id), replacing the previous one. Here:
/// into `path`, to be published.
fn write_aliases(store: &Store, path: &Path) -> Result<()> {
    let err = |m: String| Error::Export {
        table: "alias".into(),
        message: m,
    };
    let (mut ns, mut name, mut id) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    for (n, a, i) in store.all_aliases()? {
        ns.append_value(n);
        name.append_value(a);
        id.append_value(i.to_hex());
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("namespace", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(ns.finish()),
        Arc::new(name.finish()),
        Arc::new(id.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| err(e.to_string()))?;
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = ArrowWriter::try_new(file, schema, None).map_err(|e| err(e.to_string()))?;
    w.write(&batch).map_err(|e| err(e.to_string()))?;
    let file = w.into_inner().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

fn write_parquet(store: &Store, def: &TableDef, ids: &[(u64, Id)], path: &Path) -> Result<()> {
    let err = |m: String| Error::Export {
        table: def.name.to_string(),
        message: m,
    };
    let schema = Arc::new(arrow_schema(def));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| err(e.to_string()))?;
    for chunk in ids.chunks(CHUNK) {
        let just_ids: Vec<Id> = chunk.iter().map(|(_, i)| *i).collect();
        let recs = store.get_many(&just_ids)?;
        let batch = to_batch(def, &schema, &just_ids, &recs).map_err(err)?;
        writer.write(&batch).map_err(|e| err(e.to_string()))?;
    }
    let file = writer.into_inner().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(())
}

fn to_batch(
    def: &TableDef,
    schema: &Arc<Schema>,
    ids: &[Id],
    recs: &[Record],
) -> std::result::Result<RecordBatch, String> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(def.columns.len() + 1);
    let mut idb = StringBuilder::new();
    for id in ids {
        idb.append_value(id.to_hex());
    }
    cols.push(Arc::new(idb.finish()));
    for c in def.columns {
        let vals = recs.iter().map(|r| r.get(c.name));
        let arr: ArrayRef = match c.ty {
            ColType::Bool => {
                let mut b = BooleanBuilder::new();
                vals.for_each(|v| {
                    b.append_option(v.and_then(|v| match v {
                        Value::Bool(x) => Some(*x),
                        _ => None,
                    }))
                });
                Arc::new(b.finish())
            }
            ColType::Int => {
                let mut b = Int64Builder::new();
                vals.for_each(|v| b.append_option(v.and_then(Value::as_int)));
                Arc::new(b.finish())
            }
            ColType::Float => {
                let mut b = Float64Builder::new();
                vals.for_each(|v| b.append_option(v.and_then(Value::as_float)));
                Arc::new(b.finish())
            }
            ColType::Str | ColType::Json => {
                let mut b = StringBuilder::new();
                vals.for_each(|v| b.append_option(v.and_then(Value::as_str)));
                Arc::new(b.finish())
            }
            ColType::Id | ColType::Blob => {
                let mut b = StringBuilder::new();
                vals.for_each(|v| b.append_option(v.and_then(Value::as_id).map(|i| i.to_hex())));
                Arc::new(b.finish())
            }
            ColType::IdList | ColType::StrList => {
                let mut b = ListBuilder::new(StringBuilder::new());
                for v in vals {
                    match v.and_then(Value::as_list) {
                        Some(items) => {
                            for i in items {
                                match i {
                                    Value::Id(x) | Value::Blob(x) => {
                                        b.values().append_value(x.to_hex())
                                    }
                                    Value::Str(s) => b.values().append_value(s),
                                    _ => b.values().append_null(),
                                }
                            }
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Arc::new(b.finish())
            }
            ColType::IntList => {
                let mut b = ListBuilder::new(Int64Builder::new());
                for v in vals {
                    match v.and_then(Value::as_list) {
                        Some(items) => {
                            items
                                .iter()
                                .for_each(|i| b.values().append_option(i.as_int()));
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Arc::new(b.finish())
            }
            ColType::FloatList => {
                let mut b = ListBuilder::new(Float64Builder::new());
                for v in vals {
                    match v.and_then(Value::as_list) {
                        Some(items) => {
                            items
                                .iter()
                                .for_each(|i| b.values().append_option(i.as_float()));
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Arc::new(b.finish())
            }
        };
        cols.push(arr);
    }
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())
}
