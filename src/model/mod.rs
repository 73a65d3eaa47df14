//! Language models in Candle: emlab's own transformer ([`llama`]) with GGML-block products on
//! emlab's kernels ([`blocks`]), loading from GGUF or HF directories ([`mod@load`]),
//! tokenizers and chat templates ([`tokenizer`]), the assistant's tokens of a conversation
//! ([`mask`]), batched sampling with a KV cache ([`sample`]), teacher-forced answer
//! likelihoods ([`likelihood`]), LoRA adapters in PEFT's format ([`adapter`]), and [`chat`], a loaded model
//! answering chat-completion requests the way an OpenAI-compatible server does (the offline
//! judge).

pub mod adapter;
pub mod blocks;
pub mod chat;
pub mod likelihood;
pub mod llama;
pub mod load;
pub mod mask;
pub mod sample;
pub mod steer;
pub mod tokenizer;

pub use load::{load, Loaded, ModelError};

use crate::util::choice::Choice;

/// Which weights a GGUF model samples with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum WeightMode {
    /// Quantized on the CPU, dense on CUDA.
    #[default]
    Auto,
    /// The GGUF blocks as stored. On the CPU emlab's kernels multiply them: a row's logits
    /// do not depend on the batch, and batch-1 decoding moves 6× fewer bytes than f32.
    Quantized,
    /// Dequantized to the activation dtype (f32 on the CPU, bf16 on CUDA). Candle's CUDA
    /// quantized kernels round differently for different batch shapes, so CUDA samples
    /// dense by default.
    Dense,
}

impl Choice for WeightMode {
    const ALL: &'static [WeightMode] =
        &[WeightMode::Auto, WeightMode::Quantized, WeightMode::Dense];
    fn name(self) -> &'static str {
        match self {
            WeightMode::Auto => "auto",
            WeightMode::Quantized => "quantized",
            WeightMode::Dense => "dense",
        }
    }
    fn help(self) -> &'static str {
        match self {
            WeightMode::Auto => "Quantized on the CPU, dense on CUDA",
            WeightMode::Quantized => {
                "The GGUF blocks as stored, on emlab's batch-invariant CPU kernels"
            }
            WeightMode::Dense => {
                "Dequantized to the activation dtype (f32 on the CPU, bf16 on CUDA)"
            }
        }
    }
}

impl WeightMode {
    /// Apply to a loaded model: dequantize when this mode asks for dense weights on its
    /// device. Returns whether the model still has quantized weights.
    pub fn apply(self, model: &mut llama::Model) -> Result<bool, ModelError> {
        let dense = match self {
            WeightMode::Auto => model.device.is_cuda(),
            WeightMode::Quantized => false,
            WeightMode::Dense => true,
        };
        if dense {
            model.dequantize()?;
        }
        Ok(model.is_quantized())
    }
}

/// The device models run on: CUDA when built with the `cuda` feature and a GPU is present,
/// else the CPU.
pub fn device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = candle_core::Device::new_cuda(0) {
        return d;
    }
    candle_core::Device::Cpu
}
