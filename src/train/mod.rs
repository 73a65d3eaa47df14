//! Fine-tuning (in progress): the assistant-only loss mask ([`mask`]). LoRA training itself
//! is the subject of an open issue.

pub mod mask;
