//! [`Store`]: a directory holding the redb database of records, the blob directory and the
//! `EMLAB_STORE` marker. Writes go through [`Batch`]es, one redb transaction each, so a reader
//! (or a process killed mid-import) sees a batch whole or not at all.
//!
//! redb tables:
//! - `records`: id -> stored bytes (format byte + canonical encoding)
//! - `by_table`: (table, seq) -> id, in insertion order; drives listing and incremental export
//! - `counts`: table -> number of records
//! - `aliases`: (namespace, name) -> id; mutable names for immutable records
//! - `children`: (parent id, child id) -> (), from columns marked `link`
//! - `meta`: "next_seq" -> u64

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::record::{hex_val, Id, Record, TableDef, Value};

pub(crate) const RECORDS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("records");
pub(crate) const BY_TABLE: TableDefinition<(&str, u64), &[u8; 32]> =
    TableDefinition::new("by_table");
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
const ALIASES: TableDefinition<(&str, &str), &[u8; 32]> = TableDefinition::new("aliases");
const CHILDREN: TableDefinition<(&[u8; 32], &[u8; 32]), ()> = TableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The store directory format this code reads and writes.
pub const STORE_FORMAT: u32 = 1;
const MARKER: &str = "EMLAB_STORE";
const DB_FILE: &str = "store.redb";

/// Records (already validated and encoded) plus alias updates, committed together.
#[derive(Default)]
pub struct Batch {
    items: Vec<(Id, Vec<u8>, Vec<Id>)>,
    aliases: Vec<(String, String, Id)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.aliases.is_empty()
    }
    /// Point `namespace/name` at `id` when the batch commits.
    pub fn alias(&mut self, namespace: &str, name: &str, id: Id) {
        self.aliases
            .push((namespace.to_string(), name.to_string(), id));
    }
}

/// What a committed batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteReport {
    pub new: usize,
    pub existing: usize,
}

/// An open store.
pub struct Store {
    dir: PathBuf,
    db: Database,
    tables: &'static [TableDef],
}

impl Store {
    /// Open the store in `dir`, creating it when `dir` is missing or empty. A directory with
    /// other files and no marker is refused, never written into.
    pub fn open(dir: &Path, tables: &'static [TableDef]) -> Result<Store> {
        match fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(Error::NotADirectory(dir.to_path_buf())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            Err(e) => return Err(Error::io(dir, e)),
        }
        let marker = dir.join(MARKER);
        match fs::read_to_string(&marker) {
            Ok(text) => {
                let want = format!("emlab-store format {STORE_FORMAT}");
                if text.trim() != want {
                    return Err(Error::FormatMismatch {
                        path: marker,
                        found: text.trim().to_string(),
                        expected: STORE_FORMAT,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
                if entries.next().is_some() {
                    return Err(Error::NotAStore(dir.to_path_buf()));
                }
                write_atomic(
                    &marker,
                    format!("emlab-store format {STORE_FORMAT}\n").as_bytes(),
                )?;
            }
            Err(e) => return Err(Error::io(&marker, e)),
        }
        for sub in ["blobs", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        let path = dir.join(DB_FILE);
        let db = open_db(&path)?;
        let store = Store {
            dir: dir.to_path_buf(),
            db,
            tables,
        };
        store.init_tables()?;
        Ok(store)
    }

    fn init_tables(&self) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(RECORDS)?;
            tx.open_table(BY_TABLE)?;
            tx.open_table(COUNTS)?;
            tx.open_table(ALIASES)?;
            tx.open_table(CHILDREN)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tables(&self) -> &'static [TableDef] {
        self.tables
    }

    pub fn table(&self, name: &str) -> Result<&'static TableDef> {
        self.tables
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::UnknownTable(name.to_string()))
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    pub(crate) fn db_mut(&mut self) -> &mut Database {
        &mut self.db
    }

    /// Validate and encode `rec` into `batch`; returns its id.
    pub fn stage(&self, batch: &mut Batch, rec: &Record) -> Result<Id> {
        let def = self.table(&rec.table)?;
        rec.validate(def)?;
        let bytes = rec.encode()?;
        let id = Record::id_of(&bytes);
        let mut links = Vec::new();
        for col in def.columns.iter().filter(|c| c.link) {
            if let Some(v) = rec.get(col.name) {
                links.extend(v.id_list());
            }
        }
        batch.items.push((id, bytes, links));
        Ok(id)
    }

    /// Commit a batch in one transaction. Records already present are skipped (puts are
    /// idempotent); aliases are set last.
    pub fn write(&self, batch: Batch) -> Result<WriteReport> {
        let mut report = WriteReport::default();
        let tx = self.db.begin_write()?;
        {
            let mut records = tx.open_table(RECORDS)?;
            let mut by_table = tx.open_table(BY_TABLE)?;
            let mut counts = tx.open_table(COUNTS)?;
            let mut children = tx.open_table(CHILDREN)?;
            let mut meta = tx.open_table(META)?;
            let mut seq = meta.get("next_seq")?.map(|g| g.value()).unwrap_or(1);
            let mut added: BTreeMap<String, u64> = BTreeMap::new();
            let mut seen: HashSet<Id> = HashSet::new();
            for (id, bytes, links) in &batch.items {
                if !seen.insert(*id) || records.get(&id.0)?.is_some() {
                    report.existing += 1;
                    continue;
                }
                records.insert(&id.0, bytes.as_slice())?;
                let table = table_of(bytes)?;
                by_table.insert((table, seq), &id.0)?;
                seq += 1;
                *added.entry(table.to_string()).or_default() += 1;
                for parent in links {
                    children.insert((&parent.0, &id.0), ())?;
                }
                report.new += 1;
            }
            for (table, n) in added {
                let before = counts.get(table.as_str())?.map(|g| g.value()).unwrap_or(0);
                counts.insert(table.as_str(), before + n)?;
            }
            meta.insert("next_seq", seq)?;
            let mut aliases = tx.open_table(ALIASES)?;
            for (ns, name, id) in &batch.aliases {
                if !seen.contains(id) && records.get(&id.0)?.is_none() {
                    return Err(Error::NotFound(id.to_hex()));
                }
                aliases.insert((ns.as_str(), name.as_str()), &id.0)?;
            }
        }
        tx.commit()?;
        Ok(report)
    }

    /// Store one record on its own (one transaction).
    pub fn put(&self, rec: &Record) -> Result<Id> {
        let mut b = Batch::new();
        let id = self.stage(&mut b, rec)?;
        self.write(b)?;
        Ok(id)
    }

    pub fn get(&self, id: Id) -> Result<Record> {
        self.try_get(id)?
            .ok_or_else(|| Error::NotFound(id.to_hex()))
    }

    pub fn try_get(&self, id: Id) -> Result<Option<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECORDS)?;
        match t.get(&id.0)? {
            Some(g) => Ok(Some(Record::decode(g.value())?)),
            None => Ok(None),
        }
    }

    /// Fetch many records in one read transaction, in the order given.
    pub fn get_many(&self, ids: &[Id]) -> Result<Vec<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECORDS)?;
        ids.iter()
            .map(|id| match t.get(&id.0)? {
                Some(g) => Record::decode(g.value()),
                None => Err(Error::NotFound(id.to_hex())),
            })
            .collect()
    }

    pub fn contains(&self, id: Id) -> Result<bool> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECORDS)?;
        Ok(t.get(&id.0)?.is_some())
    }

    /// Resolve a full id or an unambiguous hex prefix (at least 4 digits), like git.
    pub fn resolve_prefix(&self, prefix: &str) -> Result<Id> {
        let p = prefix.trim().to_ascii_lowercase();
        if p.len() < 4 || p.len() > 64 || !p.bytes().all(|c| hex_val(c).is_some()) {
            return Err(Error::BadId(prefix.to_string()));
        }
        let mut lo = [0u8; 32];
        let mut hi = [0xffu8; 32];
        for (i, c) in p.bytes().enumerate() {
            let v = hex_val(c).unwrap_or(0);
            let byte = i / 2;
            if i % 2 == 0 {
                lo[byte] = v << 4;
                hi[byte] = (v << 4) | 0x0f;
            } else {
                lo[byte] |= v;
                hi[byte] = (hi[byte] & 0xf0) | v;
            }
        }
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECORDS)?;
        let mut found = Vec::new();
        for row in t.range::<&[u8; 32]>(&lo..=&hi)? {
            let (k, _) = row?;
            found.push(Id(*k.value()));
            if found.len() > 1 {
                break;
            }
        }
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::NotFound(prefix.to_string())),
            _ => Err(Error::Ambiguous {
                prefix: prefix.to_string(),
                count: t.range::<&[u8; 32]>(&lo..=&hi)?.count(),
            }),
        }
    }

    /// The id a name points to, if any.
    pub fn alias(&self, namespace: &str, name: &str) -> Result<Option<Id>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(ALIASES)?;
        Ok(t.get((namespace, name))?.map(|g| Id(*g.value())))
    }

    /// Every name in a namespace with its target, sorted by name.
    pub fn aliases(&self, namespace: &str) -> Result<Vec<(String, Id)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(ALIASES)?;
        let mut out = Vec::new();
        for row in t.range((namespace, "")..)? {
            let (k, v) = row?;
            let (ns, name) = k.value();
            if ns != namespace {
                break;
            }
            out.push((name.to_string(), Id(*v.value())));
        }
        Ok(out)
    }

    /// Every alias: (namespace, name, id), sorted.
    pub fn all_aliases(&self) -> Result<Vec<(String, String, Id)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(ALIASES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (ns, name) = k.value();
            out.push((ns.to_string(), name.to_string(), Id(*v.value())));
        }
        Ok(out)
    }

    /// Set one alias on its own.
    pub fn set_alias(&self, namespace: &str, name: &str, id: Id) -> Result<()> {
        let mut b = Batch::new();
        b.alias(namespace, name, id);
        self.write(b)?;
        Ok(())
    }

    /// Records per table (every defined table, zero included).
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(COUNTS)?;
        let mut out: BTreeMap<String, u64> = self
            .tables
            .iter()
            .map(|d| (d.name.to_string(), 0))
            .collect();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(k.value().to_string(), v.value());
        }
        Ok(out)
    }

    /// Ids of a table in insertion order, with their sequence numbers, from `after_seq` on.
    pub fn ids_in_table(&self, table: &str, after_seq: u64) -> Result<Vec<(u64, Id)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(BY_TABLE)?;
        let mut out = Vec::new();
        for row in t.range((table, after_seq.saturating_add(1))..=(table, u64::MAX))? {
            let (k, v) = row?;
            out.push((k.value().1, Id(*v.value())));
        }
        Ok(out)
    }

    /// Records whose `link` columns name `parent`.
    pub fn children(&self, parent: Id) -> Result<Vec<Id>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CHILDREN)?;
        let mut out = Vec::new();
        for row in t.range((&parent.0, &[0u8; 32])..=(&parent.0, &[0xffu8; 32]))? {
            let (k, _) = row?;
            out.push(Id(*k.value().1));
        }
        Ok(out)
    }

    /// The lineage parents of a record (its `link` columns), in column order.
    pub fn parents(&self, rec: &Record) -> Result<Vec<(String, Id)>> {
        let def = self.table(&rec.table)?;
        let mut out = Vec::new();
        for col in def.columns.iter().filter(|c| c.link) {
            if let Some(v) = rec.get(col.name) {
                out.extend(v.id_list().into_iter().map(|i| (col.name.to_string(), i)));
            }
        }
        Ok(out)
    }

    // ---- blobs -------------------------------------------------------------------------

    /// Path of a blob: `blobs/<2 hex>/<64 hex>`.
    pub fn blob_path(&self, id: Id) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join("blobs").join(&hex[..2]).join(hex)
    }

    /// Store bytes as a blob (idempotent); returns their BLAKE3.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Id> {
        let id = Id::of_bytes(bytes);
        let path = self.blob_path(id);
        if path.exists() {
            return Ok(id);
        }
        self.write_blob_file(&path, |f| f.write_all(bytes))?;
        Ok(id)
    }

    /// Copy a file into the blob directory, hashing it as it streams; returns (BLAKE3, size).
    pub fn put_blob_file(&self, src: &Path) -> Result<(Id, u64)> {
        let mut input = fs::File::open(src).map_err(|e| Error::io(src, e))?;
        let tmp = self.tmp_path("blob");
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        {
            let mut out = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = std::io::Read::read(&mut input, &mut buf).map_err(|e| Error::io(src, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| Error::io(&tmp, e))?;
                size += n as u64;
            }
            out.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        let id = Id(*hasher.finalize().as_bytes());
        let path = self.blob_path(id);
        if path.exists() {
            let _ = fs::remove_file(&tmp);
        } else {
            self.place(&tmp, &path)?;
        }
        Ok((id, size))
    }

    pub fn read_blob(&self, id: Id) -> Result<Vec<u8>> {
        let path = self.blob_path(id);
        fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingBlob(id.to_hex()),
            _ => Error::io(&path, e),
        })
    }

    fn write_blob_file(
        &self,
        path: &Path,
        fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> Result<()> {
        let tmp = self.tmp_path("blob");
        {
            let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            fill(&mut f).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        self.place(&tmp, path)
    }

    /// Rename a finished temp file into place (a blob is never visible half-written), and
    /// sync the directory so the rename survives a power loss.
    fn place(&self, tmp: &Path, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        rename_durably(tmp, path)
    }

    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{what}-{}-{n}.tmp", std::process::id()))
    }
}

/// The table name inside stored bytes (format byte, then the length-prefixed name).
pub(crate) fn table_of(stored: &[u8]) -> Result<&str> {
    let bad = || Error::Decode("record header truncated".into());
    let len = stored.get(1..5).ok_or_else(bad)?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let name = stored.get(5..5 + len).ok_or_else(bad)?;
    std::str::from_utf8(name).map_err(|_| Error::Decode("table name is not UTF-8".into()))
}

fn open_db(path: &Path) -> Result<Database> {
    // A damaged file can make redb panic instead of returning an error; turn that into an
    // error naming the file, and never re-create over it.
    // MultiWriter: other emlab processes may open the store while one writes (`show`,
    // `export` or `checkpoint list` beside a running `train`, or two jobs at once); redb
    // serialises write transactions across processes and readers follow the commits.
    let opened = std::panic::catch_unwind(|| {
        Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(path)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        // Environment problems stay I/O errors; anything else about the file is damage.
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            Err(Error::io(path, e))
        }
        Ok(Err(e)) => Err(Error::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(_) => Err(Error::Corrupt {
            path: path.to_path_buf(),
            message: "redb could not read the file".into(),
        }),
    }
}

/// Write a small file atomically: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    rename_durably(&tmp, path)
}

#[cfg(test)]
thread_local! {
    /// Directory syncs on this thread (tests check renames are followed by one).
    pub(crate) static DIR_SYNCS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Rename a synced temp file into place and fsync the directory holding it: without the
/// second sync the rename itself may be lost in a crash, leaving a record that names a blob
/// whose file never appeared.
pub(crate) fn rename_durably(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(test)]
    DIR_SYNCS.with(|n| n.set(n.get() + 1));
    Ok(())
}

/// Convenience for callers building records: the `Value` of a list of ids.
pub fn id_values(ids: &[Id]) -> Value {
    Value::ids(ids.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ColType, Column};

    static TABLES: &[TableDef] = &[TableDef {
        name: "note",
        doc: "a test table",
        columns: &[Column::new("text", ColType::Str, "text")],
    }];

    /// Each rename that makes a blob, an exported file or the export state visible is
    /// followed by an fsync of its directory (the rename is not durable without it).
    #[test]
    fn renames_into_place_sync_their_directory() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("s"), TABLES).unwrap();
        let syncs = || DIR_SYNCS.with(|n| n.get());
        let before = syncs();
        store.put_blob(b"a blob").unwrap();
        assert_eq!(syncs(), before + 1, "blob rename not synced");
        let src = d.path().join("f");
        std::fs::write(&src, b"a file").unwrap();
        store.put_blob_file(&src).unwrap();
        assert_eq!(syncs(), before + 2, "blob file rename not synced");
        store
            .put(&Record::new("note").with("text", Value::str("x")))
            .unwrap();
        let before = syncs();
        crate::export::export(&store, &d.path().join("pq")).unwrap();
        // The table's part file, the alias snapshot and the state file.
        assert_eq!(syncs(), before + 3, "export renames not synced");
    }
}
