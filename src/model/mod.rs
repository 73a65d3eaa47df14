//! Language models in Candle: emlab's own transformer ([`llama`]), loading from GGUF or HF
//! directories ([`mod@load`]), tokenizers and chat templates ([`tokenizer`]), and batched
//! sampling with a KV cache ([`sample`]).

pub mod llama;
pub mod load;
pub mod lora;
pub mod sample;
pub mod tiny;
pub mod tokenizer;

pub use load::{load, Loaded, ModelError};

/// The device models run on: CUDA when built with the `cuda` feature and a GPU is present,
/// else the CPU.
pub fn device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = candle_core::Device::new_cuda(0) {
        return d;
    }
    candle_core::Device::Cpu
}
