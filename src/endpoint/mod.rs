//! OpenAI-compatible endpoints: the [`client`] (one retry policy, every request counted, the
//! API key read from the environment and never recorded) and [`stream`], the
//! bounded-concurrency loop that stores answers as they arrive, which sampling, judging and
//! dataset generation share; a [`pool`] spreads one model's requests over several endpoints.

pub mod client;
pub mod pool;
pub mod stream;

pub use client::{Client, ClientError, Endpoint};
pub use pool::{EndpointCount, Pool};
