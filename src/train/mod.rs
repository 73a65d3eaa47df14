//! LoRA fine-tuning: the assistant-only loss mask ([`mask`]), trainable adapter pairs in
//! PEFT's format ([`lora`]), the hand-written forward/backward pass ([`backprop`]), AdamW and
//! schedules ([`optim`]), token rows and batches from a dataset ([`data`]), and the resumable
//! training job that writes `checkpoint` records ([`run`]).

pub mod backprop;
pub mod data;
pub mod kernels;
pub mod lora;
pub mod mask;
pub mod merge;
pub mod optim;
pub mod run;
