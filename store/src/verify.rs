//! `verify`: re-hash every record and every blob and report each mismatch by id.
//!
//! Checks, in order: redb's own page checksums ([`redb::Database::check_integrity`]); for each
//! stored record, that BLAKE3 of its bytes equals its key, that it decodes and validates
//! against its table, that its blob references exist; for each file under `blobs/`, that its
//! BLAKE3 equals its name. Stray temp files are reported but are not errors.

use std::fs;
use std::io::Read;

use redb::{ReadableDatabase, ReadableTable};

use crate::error::{Error, Result};
use crate::record::{ColType, Id, Record};
use crate::store::{Store, RECORDS};

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The record or blob id (hex), or a path for files that are not blobs.
    pub id: String,
    pub what: String,
}

#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub records: u64,
    pub blobs: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Run every check; mismatches are collected, not returned as errors.
    pub fn verify(&mut self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        match self.db_mut().check_integrity() {
            Ok(true) => {}
            Ok(false) => report.problems.push(Problem {
                id: "store.redb".into(),
                what: "redb integrity check repaired the file".into(),
            }),
            Err(e) => report.problems.push(Problem {
                id: "store.redb".into(),
                what: format!("redb integrity check failed: {e}"),
            }),
        }
        let mut blob_refs: Vec<(Id, Id)> = Vec::new();
        {
            let tx = self.db().begin_read()?;
            let t = tx.open_table(RECORDS)?;
            for row in t.iter()? {
                let (k, v) = row?;
                let key = Id(*k.value());
                let bytes = v.value();
                report.records += 1;
                let actual = Record::id_of(bytes);
                if actual != key {
                    report.problems.push(Problem {
                        id: key.to_hex(),
                        what: format!("content hashes to {actual}"),
                    });
                    continue;
                }
                let rec = match Record::decode(bytes) {
                    Ok(r) => r,
                    Err(e) => {
                        report.problems.push(Problem {
                            id: key.to_hex(),
                            what: e.to_string(),
                        });
                        continue;
                    }
                };
                let def = match self.table(&rec.table) {
                    Ok(d) => d,
                    Err(e) => {
                        report.problems.push(Problem {
                            id: key.to_hex(),
                            what: e.to_string(),
                        });
                        continue;
                    }
                };
                if let Err(e) = rec.validate(def) {
                    report.problems.push(Problem {
                        id: key.to_hex(),
                        what: e.to_string(),
                    });
                }
                for c in def.columns.iter().filter(|c| c.ty == ColType::Blob) {
                    if let Some(b) = rec.get(c.name).and_then(|v| v.as_id()) {
                        blob_refs.push((key, b));
                    }
                }
            }
        }
        let blobs = self.dir().join("blobs");
        for shard in read_dir_sorted(&blobs)? {
            for path in read_dir_sorted(&shard)? {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .to_string();
                let Ok(id) = name.parse::<Id>() else {
                    report.problems.push(Problem {
                        id: path.display().to_string(),
                        what: "file in blobs/ that is not named by a BLAKE3".into(),
                    });
                    continue;
                };
                report.blobs += 1;
                let actual = hash_file(&path)?;
                if actual != id {
                    report.problems.push(Problem {
                        id: id.to_hex(),
                        what: format!("blob content hashes to {actual}"),
                    });
                }
            }
        }
        for (rec, blob) in blob_refs {
            if !self.blob_path(blob).exists() {
                report.problems.push(Problem {
                    id: rec.to_hex(),
                    what: format!("refers to missing blob {blob}"),
                });
            }
        }
        Ok(report)
    }
}

fn read_dir_sorted(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in rd {
        out.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

fn hash_file(path: &std::path::Path) -> Result<Id> {
    let mut f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Id(*h.finalize().as_bytes()))
}
