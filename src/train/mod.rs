//! LoRA fine-tuning, the domain part: token rows with the assistant-only loss mask
//! (`crate::model::mask`) and micro-batches ([`data`]), trainable adapter pairs ([`lora`]), the hand-written
//! forward/backward pass ([`backprop`], one module per block), AdamW and schedules
//! ([`optim`]), the run configuration and presets ([`config`]), one optimizer step
//! ([`trainer::Trainer::step`], what both the training job and `bench train` run),
//! checkpoints: their blobs, records and PEFT export ([`checkpoint`]), and merging an adapter
//! into its base ([`merge`]). The resumable job that writes `run`, `step` and `checkpoint`
//! records is `crate::jobs::train`.

pub mod backprop;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod kl;
pub mod lora;

pub mod merge;
pub mod optim;
pub mod trainer;

use crate::model::ModelError;
use crate::util::hint::Hint;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("dataset `{name}`: {source}")]
    Data {
        name: String,
        #[source]
        source: data::PrepError,
    },
    #[error(transparent)]
    Dataset(#[from] crate::data::DataError),
    #[error("`{0}` is not a checkpoint")]
    NotCheckpoint(String),
    #[error("checkpoint {checkpoint} was trained on base model {theirs}, not on {ours} (the model given with --model)")]
    OtherBase {
        checkpoint: String,
        theirs: String,
        ours: String,
    },
    #[error("checkpoint {checkpoint}: {msg}")]
    BadCheckpoint { checkpoint: String, msg: String },
    #[error("non-finite loss ({loss}) at step {step}; stopped without saving it. The last good checkpoint is {last_good}")]
    NonFinite {
        step: usize,
        loss: f64,
        last_good: String,
    },
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("training: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Encode(#[from] crate::provenance::EncodeError),
    #[error(transparent)]
    Store(#[from] emlab_store::Error),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for TrainError {
    fn hint(&self) -> Option<String> {
        match self {
            TrainError::Model(e) => e.hint(),
            TrainError::Dataset(e) => e.hint(),
            TrainError::Store(e) => e.hint(),
            TrainError::NotCheckpoint(_) => {
                Some("`emlab checkpoint list` names the checkpoints".into())
            }
            TrainError::OtherBase { .. } => Some(
                "pass --model the base the checkpoint was trained on (`emlab show CHECKPOINT` names its base_model record)"
                    .into(),
            ),
            TrainError::NonFinite { .. } => Some(
                "lower --lr or --max-grad-norm and rerun; the run resumes from the last good checkpoint"
                    .into(),
            ),
            TrainError::Data {
                source: data::PrepError::TooLong { .. },
                ..
            } => Some("raise --seq-len, or use --overflow truncate or skip".into()),
            _ => None,
        }
    }
}
