//! LoRA adapters, one module for inference and training: the seven [`Projection`]s an
//! adapter may target, the [`LoraSpec`] (rank, alpha, rsLoRA, dropout, targets) and its one
//! [`LoraSpec::scale`], PEFT's tensor names and files ([`peft`]), and the q/k row order of
//! GGUF Llama files ([`hf_to_model_rows`], [`model_to_hf_rows`]).
//!
//! Inference applies a [`peft::PeftAdapter`] to a model, merged or unmerged
//! ([`crate::model::llama::Model::apply_adapter`]); training (`crate::train::lora`) keeps
//! trainable pairs under the same names and writes the same files.

pub mod peft;
mod rows;
mod spec;

pub use rows::{hf_to_model_rows, model_to_hf_rows};
pub use spec::LoraSpec;

use super::llama::{Layer, Linear};

/// A projection of a decoder layer that LoRA may adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// All seven, in the order adapters, gradients and training state list them.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// PEFT's (and Hugging Face's) module name, e.g. `q_proj`.
    pub fn peft_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The sub-module holding it in a Hugging Face layer: `self_attn` or `mlp`.
    pub fn group(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    pub fn from_peft_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.peft_name() == name)
    }

    /// This projection of a layer.
    pub fn of(self, layer: &Layer) -> &Linear {
        match self {
            Projection::Q => &layer.q,
            Projection::K => &layer.k,
            Projection::V => &layer.v,
            Projection::O => &layer.o,
            Projection::Gate => &layer.gate,
            Projection::Up => &layer.up,
            Projection::Down => &layer.down,
        }
    }

    pub fn of_mut(self, layer: &mut Layer) -> &mut Linear {
        match self {
            Projection::Q => &mut layer.q,
            Projection::K => &mut layer.k,
            Projection::V => &mut layer.v,
            Projection::O => &mut layer.o,
            Projection::Gate => &mut layer.gate,
            Projection::Up => &mut layer.up,
            Projection::Down => &mut layer.down,
        }
    }

    /// The Hugging Face path of this projection in layer `layer`:
    /// `model.layers.{layer}.{group}.{name}` (its weight is `<path>.weight`).
    pub fn hf_path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.group(), self.peft_name())
    }
}
