//! OpenAI-compatible endpoints: the [`client`] (one retry policy, every request counted, the
//! API key read from the environment and never recorded) and [`stream`], the
//! bounded-concurrency loop that stores answers as they arrive, which sampling, judging and
//! dataset generation share.

pub mod client;
pub mod stream;

pub use client::{Client, ClientError, Endpoint};
