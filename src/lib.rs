//! emlab: a toolkit for Emergent Misalignment research.
//!
//! Everything emlab makes or reads is a content-addressed record in an
//! [`emlab_store::Store`] opened with the tables of [`provenance::tables::TABLES`]: imported
//! files, chat rows, datasets, models, checkpoints, generations, judgments, metrics and
//! benchmarks. The modules form layers; each uses only those below it (`docs/architecture.md`):
//!
//! - [`jobs`]: long-running work started by a verb (sampling, judging, training, dataset
//!   generation, benchmarks).
//! - domain: [`data`] (datasets with provenance), [`model`] (Candle models, tokenizers,
//!   sampling, adapters), [`train`] (LoRA training core), [`judge`] (judge prompts, scores,
//!   EM metrics), [`endpoint`] (OpenAI-compatible client and request streaming), and
//!   [`provenance`] (record tables, builders and key derivation).
//! - base: [`util`], and the `emlab-store` and `emlab-kernels` crates.
//!
//! The `emlab` binary (`src/main.rs`, `src/cli/`) parses arguments and calls one job or domain
//! function per verb.

pub mod data;
pub mod endpoint;
pub mod jobs;
pub mod judge;
pub mod model;
pub mod provenance;
pub mod train;
pub mod util;

use std::path::Path;

/// Open (or create) an emlab store in `dir` with emlab's tables.
pub fn open_store(dir: &Path) -> emlab_store::Result<emlab_store::Store> {
    emlab_store::Store::open(dir, provenance::tables::TABLES)
}
