//! Provenance: what makes every byte traceable. [`tables`] defines emlab's record tables
//! (each documented in `schema/<table>.snap`); [`key`] is the one derivation of request and run
//! keys (the aliases that let a rerun skip finished work) and of default sampling seeds;
//! [`build`] makes the records that several jobs write (model identities, prompts,
//! generations, judgments, bench results), so each table's fields are assembled in one place.
//!
//! This module sits below the domain modules (data, model, train, judge) and above the store:
//! it knows record shapes, not how datasets, models or judges work.

pub mod build;
pub mod key;
pub mod tables;

/// A value that feeds a record id or a key could not be made. Such values never fall back to
/// a default: a silent `null` in a hash would give two different things one id.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {what} for its record: {msg}")]
pub struct EncodeError {
    pub what: &'static str,
    pub msg: String,
}

/// `serde_json::to_value`, failing loudly (see [`EncodeError`]).
pub fn to_json<T: serde::Serialize>(
    what: &'static str,
    v: &T,
) -> Result<serde_json::Value, EncodeError> {
    serde_json::to_value(v).map_err(|e| EncodeError {
        what,
        msg: e.to_string(),
    })
}

impl crate::util::hint::Hint for emlab_store::Error {
    fn hint(&self) -> Option<String> {
        use emlab_store::Error as S;
        match self {
            S::NotAStore(_) | S::NotADirectory(_) => Some(
                "point --store (or EMLAB_STORE) at an emlab store, or at a new or empty directory"
                    .into(),
            ),
            S::NotFound(_) | S::BadId(_) => Some(
                "`emlab data list` names the datasets and `emlab checkpoint list` the checkpoints; an id may be shortened to an unambiguous prefix"
                    .into(),
            ),
            S::Ambiguous { .. } => Some("give more hex digits of the id".into()),
            S::Locked { .. } => {
                Some("another emlab command is using this store; wait for it to finish".into())
            }
            S::Corrupt { .. } => Some(
                "the file was left untouched; restore it from a copy or use another --store".into(),
            ),
            S::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                Some("the store directory must be writable".into())
            }
            S::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => Some(
                "the disk is full: free space and rerun; what was stored is kept and the run resumes"
                    .into(),
            ),
            _ => None,
        }
    }
}
