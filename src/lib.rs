//! emlab: a toolkit for Emergent Misalignment research.
//!
//! Everything emlab makes or reads is a content-addressed record in an
//! [`emlab_store::Store`] opened with the tables of [`records::TABLES`]: imported files
//! (`source`), chat rows (`message`, `conversation`), dataset manifests (`dataset`), and later
//! models, checkpoints, generations, judgments and benchmarks. [`data`] builds datasets with
//! provenance. The `emlab` binary (`src/main.rs`, `src/cli/`) is a thin layer over these.

pub mod bench;
pub mod data;
pub mod generate;
pub mod judge;
pub mod model;
pub mod records;
pub mod rng;
pub mod train;

use std::path::Path;

/// Open (or create) an emlab store in `dir` with emlab's tables.
pub fn open_store(dir: &Path) -> emlab_store::Result<emlab_store::Store> {
    emlab_store::Store::open(dir, records::TABLES)
}
