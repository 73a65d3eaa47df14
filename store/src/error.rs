//! The store's error type: each variant names the thing that failed (a path, an id, a table).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not an emlab store (it has files but no EMLAB_STORE marker)")]
    NotAStore(PathBuf),
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} was written by store format {found}; this emlab reads format {expected}")]
    FormatMismatch {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("{path}: the database is open in another emlab process")]
    Locked { path: PathBuf },
    #[error("{path}: database cannot be opened: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("database error: {0}")]
    Db(String),
    #[error("no record with id {0}")]
    NotFound(String),
    #[error("id prefix {prefix} is ambiguous: {count} records match")]
    Ambiguous { prefix: String, count: usize },
    #[error("`{0}` is not a record id (64 hex digits, or an unambiguous prefix of at least 4)")]
    BadId(String),
    #[error("no {namespace} named `{name}`")]
    NoAlias { namespace: String, name: String },
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    #[error("invalid record: {0}")]
    Invalid(String),
    #[error("stored record cannot be decoded: {0}")]
    Decode(String),
    #[error("blob {0} is not in the store")]
    MissingBlob(String),
    #[error("parquet export of table `{table}`: {message}")]
    Export { table: String, message: String },
}

impl Error {
    /// An I/O error on `path` (for export targets outside this crate).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
