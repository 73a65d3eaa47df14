//! Loading a model for a job: the weights (GGUF blocks or dense), and an adapter from a PEFT
//! folder or a stored checkpoint, merged or alongside. Sampling and the probe load models
//! the same way, so the `model` record of base + adapter is the same for both.

use std::path::{Path, PathBuf};

use emlab_store::Store;

use crate::model::adapter::peft::load_peft;
use crate::model::{Loaded, WeightMode};
use crate::train::{checkpoint, TrainError};

/// Which adapter to apply, if any.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterSource {
    /// A PEFT folder, merged into the weights or applied alongside them.
    Folder { dir: PathBuf, merge: bool },
    /// A checkpoint from `emlab train` (id or prefix), read from the store, merged into the
    /// weights or applied alongside them; it must have been trained on this base.
    Checkpoint { id: String, merge: bool },
}

/// Load `path` with `weights`, then apply `adapter`. Returns the model and whether it still
/// has quantized weights.
pub fn load_model(
    store: &Store,
    path: &Path,
    weights: WeightMode,
    adapter: Option<&AdapterSource>,
) -> Result<(Loaded, bool), TrainError> {
    let device = crate::model::device();
    let mut loaded = crate::model::load(path, &device)?;
    let quantized = weights.apply(&mut loaded.model)?;
    match adapter {
        None => {}
        Some(AdapterSource::Folder { dir, merge }) => {
            let ad = load_peft(dir, &device)?;
            loaded.with_adapter(&ad, *merge)?;
        }
        Some(AdapterSource::Checkpoint { id: ck, merge }) => {
            let ck = checkpoint::resolve(store, ck)?;
            checkpoint::of_base(store, ck, loaded.record().id()?)?;
            let ad = checkpoint::adapter(store, ck, &device)?;
            loaded.with_adapter(&ad, *merge)?;
        }
    }
    Ok((loaded, quantized))
}
