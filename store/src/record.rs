//! Records, their typed values, the table definitions they are checked against, and the
//! canonical byte encoding whose BLAKE3 is a record's [`Id`].
//!
//! A [`Record`] is a table name plus named [`Value`]s. A [`TableDef`] (static data supplied by
//! the application) lists the [`Column`]s a table may hold; [`Record::encode`] checks the record
//! against it and produces the canonical bytes described in `docs/design.md` (format 1):
//!
//! ```text
//! stored  := FORMAT(u8 = 1) record
//! record  := str(table) u32(n) field*n        fields sorted by name, null fields omitted
//! field   := str(name) value
//! value   := 0x01 u8(0|1)            bool
//!          | 0x02 i64                int
//!          | 0x03 u64(f64 bits)      float (NaN rejected, -0.0 written as 0.0)
//!          | 0x04 str                str
//!          | 0x05 [u8;32]            id (a record id)
//!          | 0x06 str                json (canonical: sorted keys, no whitespace)
//!          | 0x07 [u8;32]            blob (BLAKE3 of a blob's bytes)
//!          | 0x08 u32(n) value*n     list
//! str     := u32(len) utf8-bytes      all integers little-endian
//! id      := BLAKE3 derive_key("emlab-store record v1", stored)
//! ```
//!
//! Leaving null fields out is what lets a table grow a nullable column without changing the id
//! of any record stored before the column existed.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Version byte at the start of every stored record; part of the hashed bytes.
pub const FORMAT: u8 = 1;
/// BLAKE3 key-derivation context: domain separation from any other use of BLAKE3.
pub const ID_CONTEXT: &str = "emlab-store record v1";

/// A 32-byte content address: the id of a record, or the BLAKE3 of a blob.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// The first 12 hex digits, for display.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    /// BLAKE3 of raw bytes (how blobs are addressed; equals `b3sum`).
    pub fn of_bytes(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl FromStr for Id {
    type Err = Error;
    fn from_str(s: &str) -> Result<Id> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::BadId(s.to_string()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| Error::BadId(s.to_string()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| Error::BadId(s.to_string()))?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Id(out))
    }
}

pub(crate) fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The type of a column. Lists hold one element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColType {
    Bool,
    Int,
    Float,
    Str,
    /// The id of another record.
    Id,
    /// JSON text, kept canonical (sorted keys, compact).
    Json,
    /// The BLAKE3 of a blob in the store's blob directory.
    Blob,
    IdList,
    StrList,
    IntList,
    FloatList,
}

impl ColType {
    /// The name used in `schema/*.md`.
    pub fn name(self) -> &'static str {
        match self {
            ColType::Bool => "bool",
            ColType::Int => "int",
            ColType::Float => "float",
            ColType::Str => "str",
            ColType::Id => "id",
            ColType::Json => "json",
            ColType::Blob => "blob",
            ColType::IdList => "list<id>",
            ColType::StrList => "list<str>",
            ColType::IntList => "list<int>",
            ColType::FloatList => "list<float>",
        }
    }

    fn element(self) -> Option<ColType> {
        match self {
            ColType::IdList => Some(ColType::Id),
            ColType::StrList => Some(ColType::Str),
            ColType::IntList => Some(ColType::Int),
            ColType::FloatList => Some(ColType::Float),
            _ => None,
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (ColType::Bool, Value::Bool(_))
            | (ColType::Int, Value::Int(_))
            | (ColType::Float, Value::Float(_))
            | (ColType::Str, Value::Str(_))
            | (ColType::Id, Value::Id(_))
            | (ColType::Json, Value::Json(_))
            | (ColType::Blob, Value::Blob(_)) => true,
            (list, Value::List(items)) => match list.element() {
                Some(el) => items.iter().all(|i| el.accepts(i)),
                None => false,
            },
            _ => false,
        }
    }
}

/// One column of a table.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColType,
    pub nullable: bool,
    /// An `id`/`list<id>` column whose targets are this record's parents in lineage (indexed so
    /// children can be found). Containment (a conversation's messages) is not a link.
    pub link: bool,
    pub doc: &'static str,
}

impl Column {
    pub const fn new(name: &'static str, ty: ColType, doc: &'static str) -> Column {
        Column {
            name,
            ty,
            nullable: false,
            link: false,
            doc,
        }
    }
    pub const fn nullable(mut self) -> Column {
        self.nullable = true;
        self
    }
    pub const fn link(mut self) -> Column {
        self.link = true;
        self
    }
}

/// A table: its name, what it is for, and its columns (besides the implicit `id`).
#[derive(Clone, Copy, Debug)]
pub struct TableDef {
    pub name: &'static str,
    pub doc: &'static str,
    pub columns: &'static [Column],
}

impl TableDef {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A typed value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Id(Id),
    /// Canonical JSON text; build with [`Value::json`].
    Json(String),
    Blob(Id),
    List(Vec<Value>),
}

impl Value {
    /// Canonical JSON: `serde_json` keeps object keys sorted (no `preserve_order`) and prints
    /// compactly, so equal JSON values give equal text.
    pub fn json(v: &serde_json::Value) -> Value {
        Value::Json(v.to_string())
    }

    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    pub fn ids(ids: impl IntoIterator<Item = Id>) -> Value {
        Value::List(ids.into_iter().map(Value::Id).collect())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Json(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_id(&self) -> Option<Id> {
        match self {
            Value::Id(i) | Value::Blob(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
    /// The ids of an `id` or `list<id>` value.
    pub fn id_list(&self) -> Vec<Id> {
        match self {
            Value::Id(i) => vec![*i],
            Value::List(l) => l.iter().filter_map(Value::as_id).collect(),
            _ => Vec::new(),
        }
    }

    /// JSON view for display (`emlab show`): ids and blobs as hex, json inlined.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => J::from(*f),
            Value::Str(s) => J::String(s.clone()),
            Value::Id(i) | Value::Blob(i) => J::String(i.to_hex()),
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| J::String(s.clone())),
            Value::List(l) => J::Array(l.iter().map(Value::to_json).collect()),
        }
    }
}

/// A record: a table name and its fields. Field order does not matter; null fields are the same
/// as absent ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub table: String,
    pub fields: BTreeMap<String, Value>,
}

impl Record {
    pub fn new(table: &str) -> Record {
        Record {
            table: table.to_string(),
            fields: BTreeMap::new(),
        }
    }

    /// Builder-style field setter.
    pub fn with(mut self, name: &str, v: Value) -> Record {
        self.fields.insert(name.to_string(), v);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        match self.fields.get(name) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    /// Check the record against its table definition.
    pub fn validate(&self, def: &TableDef) -> Result<()> {
        if def.name != self.table {
            return Err(Error::Invalid(format!(
                "record of table `{}` checked against table `{}`",
                self.table, def.name
            )));
        }
        for (name, v) in &self.fields {
            let col = def.column(name).ok_or_else(|| {
                Error::Invalid(format!("table `{}` has no column `{name}`", def.name))
            })?;
            if matches!(v, Value::Null) {
                continue;
            }
            if !col.ty.accepts(v) {
                return Err(Error::Invalid(format!(
                    "column `{}.{name}` is {}, got {v:?}",
                    def.name,
                    col.ty.name()
                )));
            }
            check_floats(v)
                .map_err(|_| Error::Invalid(format!("column `{}.{name}` holds NaN", def.name)))?;
        }
        for col in def.columns {
            if !col.nullable && self.get(col.name).is_none() {
                return Err(Error::Invalid(format!(
                    "column `{}.{}` is required",
                    def.name, col.name
                )));
            }
        }
        Ok(())
    }

    /// Canonical stored bytes (format byte included). The caller validates first.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64);
        out.push(FORMAT);
        put_str(&mut out, &self.table)?;
        let present: Vec<(&String, &Value)> = self
            .fields
            .iter()
            .filter(|(_, v)| !matches!(v, Value::Null))
            .collect();
        put_len(&mut out, present.len())?;
        // BTreeMap<String, _> iterates in byte order of the names: the canonical order.
        for (name, v) in present {
            put_str(&mut out, name)?;
            put_value(&mut out, v)?;
        }
        Ok(out)
    }

    /// The id of stored bytes.
    pub fn id_of(stored: &[u8]) -> Id {
        let mut h = blake3::Hasher::new_derive_key(ID_CONTEXT);
        h.update(stored);
        Id(*h.finalize().as_bytes())
    }

    /// Encode and hash in one go.
    pub fn id(&self) -> Result<Id> {
        Ok(Record::id_of(&self.encode()?))
    }

    /// Parse stored bytes back into a record.
    pub fn decode(bytes: &[u8]) -> Result<Record> {
        let mut r = Reader { b: bytes, pos: 0 };
        let format = r.u8()?;
        if format != FORMAT {
            return Err(Error::Decode(format!("unknown record format {format}")));
        }
        let table = r.str()?;
        let n = r.u32()? as usize;
        let mut fields = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n {
            let name = r.str()?;
            if last.as_deref().is_some_and(|l| l >= name.as_str()) {
                return Err(Error::Decode(format!(
                    "field `{name}` out of canonical order"
                )));
            }
            let v = r.value(0)?;
            last = Some(name.clone());
            fields.insert(name, v);
        }
        if r.pos != bytes.len() {
            return Err(Error::Decode(format!(
                "{} trailing bytes",
                bytes.len() - r.pos
            )));
        }
        Ok(Record { table, fields })
    }

    /// JSON view for display: `{"id", "table", "fields": {...}}`.
    pub fn to_json(&self, id: Id) -> serde_json::Value {
        let fields: serde_json::Map<String, serde_json::Value> = self
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        serde_json::json!({"id": id.to_hex(), "table": self.table, "fields": fields})
    }
}

fn check_floats(v: &Value) -> std::result::Result<(), ()> {
    match v {
        Value::Float(f) if f.is_nan() => Err(()),
        Value::List(l) => l.iter().try_for_each(check_floats),
        _ => Ok(()),
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) -> Result<()> {
    let n = u32::try_from(n).map_err(|_| Error::Invalid(format!("length {n} over 4 GiB")))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    put_len(out, s.len())?;
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::Null => return Err(Error::Invalid("null inside a list".into())),
        Value::Bool(b) => {
            out.push(1);
            out.push(u8::from(*b));
        }
        Value::Int(i) => {
            out.push(2);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            if f.is_nan() {
                return Err(Error::Invalid("NaN is not a storable float".into()));
            }
            // -0.0 == 0.0 must not give two ids.
            let f = if *f == 0.0 { 0.0f64 } else { *f };
            out.push(3);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            out.push(4);
            put_str(out, s)?;
        }
        Value::Id(i) => {
            out.push(5);
            out.extend_from_slice(&i.0);
        }
        Value::Json(s) => {
            out.push(6);
            put_str(out, s)?;
        }
        Value::Blob(i) => {
            out.push(7);
            out.extend_from_slice(&i.0);
        }
        Value::List(items) => {
            out.push(8);
            put_len(out, items.len())?;
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| Error::Decode("record truncated".into()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn id(&mut self) -> Result<Id> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(Id(a))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| Error::Decode("string is not UTF-8".into()))
    }
    fn value(&mut self, depth: usize) -> Result<Value> {
        if depth > 8 {
            return Err(Error::Decode("lists nested too deep".into()));
        }
        Ok(match self.u8()? {
            1 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Error::Decode(format!("bool byte {b}"))),
            },
            2 => Value::Int(self.u64()? as i64),
            3 => Value::Float(f64::from_bits(self.u64()?)),
            4 => Value::Str(self.str()?),
            5 => Value::Id(self.id()?),
            6 => Value::Json(self.str()?),
            7 => Value::Blob(self.id()?),
            8 => {
                let n = self.u32()? as usize;
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::List(items)
            }
            t => return Err(Error::Decode(format!("unknown value tag {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const COLS: &[Column] = &[
        Column::new("role", ColType::Str, "who"),
        Column::new("content", ColType::Str, "what"),
        Column::new("n", ColType::Int, "count").nullable(),
    ];
    const T: TableDef = TableDef {
        name: "message",
        doc: "",
        columns: COLS,
    };

    fn msg() -> Record {
        Record::new("message")
            .with("role", Value::str("user"))
            .with("content", Value::str("Hello, world"))
    }

    /// The pinned id of a fixed record: changing the encoding or hashing rules fails this test
    /// (and must bump FORMAT and docs/design.md instead). The id was cross-checked with the
    /// Python `blake3` package: `blake3(bytes, derive_key_context="emlab-store record v1")`.
    #[test]
    fn golden_id() {
        let r = msg();
        r.validate(&T).unwrap();
        assert_eq!(
            r.encode().unwrap(),
            b"\x01\x07\0\0\0message\x02\0\0\0\x07\0\0\0content\x04\x0c\0\0\0Hello, world\x04\0\0\0role\x04\x04\0\0\0user"
        );
        assert_eq!(
            r.id().unwrap().to_hex(),
            "28cb1441b83ee31b66fdc3d905766e69d2ebf6dea317743d36c88449e3da8017"
        );
    }

    #[test]
    fn null_fields_do_not_change_the_id() {
        let a = msg();
        let b = msg().with("n", Value::Null);
        assert_eq!(a.id().unwrap(), b.id().unwrap());
        assert_ne!(
            a.id().unwrap(),
            msg().with("n", Value::Int(0)).id().unwrap()
        );
    }

    #[test]
    fn validation_names_the_column() {
        let e = msg()
            .with("role", Value::Int(3))
            .validate(&T)
            .unwrap_err()
            .to_string();
        assert!(e.contains("message.role"), "{e}");
        let e = Record::new("message")
            .with("role", Value::str("x"))
            .validate(&T)
            .unwrap_err();
        assert!(e.to_string().contains("message.content"), "{e}");
        let e = msg().with("nope", Value::Int(1)).validate(&T).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn negative_zero_is_zero() {
        let a = Record::new("t").with("f", Value::Float(0.0));
        let b = Record::new("t").with("f", Value::Float(-0.0));
        assert_eq!(a.id().unwrap(), b.id().unwrap());
        assert!(Record::new("t")
            .with("f", Value::Float(f64::NAN))
            .encode()
            .is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        let mut bytes = msg().encode().unwrap();
        bytes.push(0);
        assert!(Record::decode(&bytes).is_err());
        assert!(Record::decode(&bytes[..10]).is_err());
        assert!(Record::decode(&[2]).is_err());
    }

    #[test]
    fn id_hex_round_trip() {
        let id = msg().id().unwrap();
        assert_eq!(id.to_hex().parse::<Id>().unwrap(), id);
        assert!("zz".parse::<Id>().is_err());
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("no NaN", |f| !f.is_nan())
                .prop_map(|f| Value::Float(if f == 0.0 { 0.0 } else { f })),
            ".{0,40}".prop_map(Value::Str),
            any::<[u8; 32]>().prop_map(|b| Value::Id(Id(b))),
            any::<[u8; 32]>().prop_map(|b| Value::Blob(Id(b))),
            "[a-z]{0,10}".prop_map(|s| Value::json(&serde_json::json!({"k": s}))),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(2, 16, 6, |inner| {
            prop::collection::vec(inner, 0..6).prop_map(Value::List)
        })
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            "[a-z_]{1,12}",
            prop::collection::btree_map("[a-z_]{1,10}", value(), 0..8),
        )
            .prop_map(|(table, fields)| Record { table, fields })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(r in record()) {
            let bytes = r.encode().unwrap();
            let back = Record::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &r);
            prop_assert_eq!(back.encode().unwrap(), bytes);
        }

        /// The id depends on content, not on how the record was put together: fields added
        /// in any order, and JSON objects whose keys were inserted in any order, give one id.
        /// (This fails if fields kept insertion order, or if a dependency turned on
        /// serde_json's `preserve_order`.) Any change of content gives another id.
        #[test]
        fn id_depends_on_content_not_on_construction_order(
            r in record(),
            perm in any::<u64>(),
            keys in prop::collection::btree_map("[a-z]{1,6}", any::<i32>(), 1..6),
        ) {
            let id = r.id().unwrap();
            // The fields, set one by one in a shuffled order.
            let mut order: Vec<(&String, &Value)> = r.fields.iter().collect();
            let n = order.len().max(1) as u64;
            order.rotate_left((perm % n) as usize);
            if perm % 2 == 1 {
                order.reverse();
            }
            let mut again = Record::new(&r.table);
            for (k, v) in order {
                again = again.with(k, v.clone());
            }
            prop_assert_eq!(again.id().unwrap(), id);

            // A JSON value built from its keys in two different insertion orders.
            let build = |rev: bool| {
                let mut m = serde_json::Map::new();
                let kv: Vec<_> = if rev { keys.iter().rev().collect() } else { keys.iter().collect() };
                for (k, v) in kv {
                    m.insert(k.clone(), serde_json::json!(v));
                }
                Record::new("t").with("j", Value::json(&serde_json::Value::Object(m)))
            };
            prop_assert_eq!(build(false).id().unwrap(), build(true).id().unwrap());

            // A different table name or a changed field is another record.
            let other = Record { table: format!("{}x", r.table), fields: r.fields.clone() };
            prop_assert_ne!(other.id().unwrap(), id);
            let changed = r.clone().with("Z", Value::Int(1)); // not a generated name
            prop_assert_ne!(changed.id().unwrap(), id);
        }
    }
}
