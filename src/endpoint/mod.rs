//! OpenAI-compatible endpoints: the [`client`] (one retry policy, every request counted, the
//! API key read from the environment and never recorded) and [`stream`], the
//! bounded-concurrency loop that stores answers as they arrive, which sampling, judging and
//! dataset generation share; a [`pool`] spreads one model's requests over several endpoints.
//! [`files`] is the files API (uploads named by their BLAKE3, found again by name) and
//! [`batch`] the Batch API's protocol: request and result JSONL, `/batches`.

pub mod batch;
pub mod client;
pub mod files;
pub mod pool;
pub mod stream;

pub use client::{Client, ClientError, Endpoint};
pub use pool::{EndpointCount, Pool};
