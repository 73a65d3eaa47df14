//! Integration tests: one binary, modules per area. `util` holds the temp-store helper and the
//! runner for the `emlab` binary.

mod util;

mod batch;
mod cli_output;
mod compat;
mod cpu;
mod crash;
mod datasets;
mod direction;
mod endpoint;
mod errors;
mod fake_openai;
mod hosted;
mod judge;
mod layers;
mod llama_server;
mod local_judge;
mod mask;
mod model;
pub mod model_tiny;
mod objstore;
mod pool;
mod probe;
mod sampling;
mod schema;
mod store_cli;
pub mod study;
pub mod tiny;
mod train;
