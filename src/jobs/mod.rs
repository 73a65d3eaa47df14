//! Jobs: the long-running work a verb starts, each taking a validated plan and writing
//! records as it goes, resumable by key. [`generate`] samples answers (a local model or an
//! endpoint), [`judge`] judges them, [`batch`](mod@batch) sends either's requests as a batch (the Batch API, or a file for `vllm run-batch`), [`probe`] measures the judge-free likelihood probe, [`direction`] computes and applies
//! misalignment directions,
//! [`train`] fine-tunes a LoRA adapter, [`hosted`] fine-tunes through a hosted API, [`synth`] builds a dataset with an LLM, and
//! [`bench`](mod@bench) measures and stores `bench` records. [`load`] loads a model with its
//! adapter for them.
//!
//! Jobs sit between the CLI and the domain modules: they call into data, model, train,
//! judge, endpoint and provenance, and nothing below them calls a job.

pub mod batch;
pub mod bench;
pub mod direction;
pub mod generate;
pub mod hosted;
pub mod judge;
pub mod load;
pub mod probe;
pub mod study;
pub mod synth;
pub mod train;
