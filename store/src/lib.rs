//! `emlab-store`: content-addressed records in redb, blobs on disk, Parquet export for DuckDB.
//!
//! It knows nothing of language models. An application describes its tables as static
//! [`TableDef`]s; a [`Record`] (table + typed [`Value`]s) is checked against its table, encoded
//! canonically and addressed by the BLAKE3 of that encoding, its [`Id`]. A [`Store`] keeps
//! records in redb (idempotent puts, written in [`Batch`]es, one transaction each), large
//! binaries as files named by their BLAKE3, mutable names (aliases) that point at immutable
//! ids, and an index of lineage links. [`export::export`] writes new records as Parquet;
//! [`Store::verify`] re-hashes everything. The format is specified in `docs/design.md`.

mod error;
pub mod export;
mod record;
mod store;
mod verify;

pub use error::{Error, Result};
pub use record::{ColType, Column, Id, Record, TableDef, Value, FORMAT, ID_CONTEXT};
pub use store::{id_values, Batch, Store, WriteReport, STORE_FORMAT};
pub use verify::{Problem, VerifyReport};
