//! PEFT's LoRA format: `adapter_config.json` plus `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight` with A
//! `[r, in]` and B `[out, r]`, rows in Hugging Face order.
//!
//! [`lora_name`] and [`parse_lora_name`] are the only places these names are built and read.
//! A [`PeftAdapter`] is read from a folder ([`load_peft`]) or from the two files' bytes (a
//! stored checkpoint), and applied at inference unmerged (`y = W x + s B (A x)`) or merged
//! into dense weights (`W + s B A`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value as J};

use super::{hf_to_model_rows, LoraSpec, Projection};
use crate::model::llama::{Linear, Model};
use crate::model::load::ModelError;
use crate::provenance::build::FileHash;

/// The two halves of a LoRA pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// `A [r, in]`: the down-projection.
    A,
    /// `B [out, r]`: the up-projection.
    B,
}

const PREFIX: &str = "base_model.model.";

/// PEFT's tensor name for one half of layer `layer`'s adapter on `p`.
pub fn lora_name(layer: usize, p: Projection, half: Half) -> String {
    let h = match half {
        Half::A => "A",
        Half::B => "B",
    };
    format!("{PREFIX}{}.lora_{h}.weight", p.hf_path(layer))
}

/// The (layer, projection, half) a PEFT tensor name stands for; `None` for other tensors.
pub fn parse_lora_name(name: &str) -> Option<(usize, Projection, Half)> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix("model.layers.")?;
    let (rest, half) = match (
        rest.strip_suffix(".lora_A.weight"),
        rest.strip_suffix(".lora_B.weight"),
    ) {
        (Some(r), _) => (r, Half::A),
        (_, Some(r)) => (r, Half::B),
        _ => return None,
    };
    let mut parts = rest.split('.');
    let layer = parts.next()?.parse().ok()?;
    let group = parts.next()?;
    let p = Projection::from_peft_name(parts.next()?)?;
    (parts.next().is_none() && group == p.group()).then_some((layer, p, half))
}

/// Adapter pairs by (layer, projection): (A, B) as f32, B rows in HF order.
pub type Pairs = BTreeMap<(usize, Projection), (Tensor, Tensor)>;

/// Pair PEFT-named `lora_A` / `lora_B` tensors. `source` names where they came from in
/// errors; a tensor that looks like an adapter but names no known projection is an error.
pub fn pair_tensors(tensors: &HashMap<String, Tensor>, source: &Path) -> Result<Pairs, ModelError> {
    let mut pairs = BTreeMap::new();
    for (name, a) in tensors {
        if !name.ends_with(".lora_A.weight") {
            continue;
        }
        let Some((layer, p, _)) = parse_lora_name(name) else {
            return Err(ModelError::Format {
                path: source.to_path_buf(),
                msg: format!("bad tensor name `{name}`"),
            });
        };
        let bname = lora_name(layer, p, Half::B);
        let b = tensors.get(&bname).ok_or_else(|| ModelError::Mismatch {
            path: source.to_path_buf(),
            msg: format!("`{bname}` is missing"),
        })?;
        pairs.insert(
            (layer, p),
            (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
        );
    }
    Ok(pairs)
}

/// A PEFT adapter read into memory.
pub struct PeftAdapter {
    /// How it is named beside the base model's name (the folder's name, or
    /// `checkpoint-<12 hex>` for a stored checkpoint).
    pub label: String,
    /// Where it came from, for errors.
    pub source: PathBuf,
    /// r, alpha and rsLoRA from the config; targets as listed there.
    pub spec: LoraSpec,
    pub weights: Pairs,
    /// `adapter_config.json` and `adapter_model.safetensors`: name, BLAKE3, size.
    pub files: Vec<FileHash>,
}

/// File names inside a PEFT folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

impl PeftAdapter {
    /// Read an adapter from the bytes of its two files.
    pub fn from_bytes(
        label: &str,
        source: &Path,
        config: &[u8],
        weights: &[u8],
        device: &candle_core::Device,
    ) -> Result<PeftAdapter, ModelError> {
        let cpath = source.join(CONFIG_FILE);
        let fmt = |path: &Path, msg: String| ModelError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let c: J = serde_json::from_slice(config).map_err(|e| fmt(&cpath, e.to_string()))?;
        let r = c["r"]
            .as_u64()
            .ok_or_else(|| fmt(&cpath, "missing `r`".into()))? as usize;
        let targets: Vec<String> = match &c["target_modules"] {
            J::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            J::String(s) => vec![s.clone()],
            _ => Vec::new(),
        };
        let spec = LoraSpec {
            r,
            alpha: c["lora_alpha"].as_f64().unwrap_or(r as f64),
            rslora: c["use_rslora"].as_bool().unwrap_or(false),
            dropout: c["lora_dropout"].as_f64().unwrap_or(0.0),
            targets,
            layers: match &c["layers_to_transform"] {
                J::Number(n) => n.as_u64().map(|n| vec![n as usize]),
                J::Array(a) => Some(a.iter().filter_map(J::as_u64).map(|n| n as usize).collect()),
                _ => None,
            },
        };
        let wpath = source.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load_buffer(weights, device)
            .map_err(|e| fmt(&wpath, format!("cannot read safetensors: {e}")))?;
        let pairs = pair_tensors(&tensors, &wpath)?;
        if pairs.is_empty() {
            return Err(fmt(
                &wpath,
                "no lora_A/lora_B tensors in PEFT naming".into(),
            ));
        }
        let hash = |name: &str, bytes: &[u8]| FileHash {
            name: Some(name.to_string()),
            blake3: blake3::hash(bytes).to_hex().to_string(),
            size: bytes.len() as u64,
        };
        Ok(PeftAdapter {
            label: label.to_string(),
            source: source.to_path_buf(),
            spec,
            weights: pairs,
            files: vec![hash(CONFIG_FILE, config), hash(WEIGHTS_FILE, weights)],
        })
    }

    /// The adapter's identity in the `model` record: its config and file hashes.
    pub fn describe(&self, merged: bool) -> J {
        let files: Vec<J> = self
            .files
            .iter()
            .map(|f| json!({"name": f.name, "blake3": f.blake3, "size": f.size}))
            .collect();
        let mut j = json!({"r": self.spec.r, "alpha": self.spec.alpha, "rslora": self.spec.rslora,
               "targets": self.spec.targets, "merged": merged, "files": files});
        if let Some(l) = &self.spec.layers {
            j["layers"] = json!(l);
        }
        j
    }
}

/// Read a PEFT adapter folder.
pub fn load_peft(dir: &Path, device: &candle_core::Device) -> Result<PeftAdapter, ModelError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|source| ModelError::Io { path: p, source })
    };
    let label = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    PeftAdapter::from_bytes(
        &label,
        dir,
        &read(CONFIG_FILE)?,
        &read(WEIGHTS_FILE)?,
        device,
    )
}

impl Model {
    /// Apply an adapter: merged into dense weights, or as extra low-rank projections.
    pub fn apply_adapter(&mut self, ad: &PeftAdapter, merge: bool) -> Result<(), ModelError> {
        let scale = ad.spec.scale();
        let r = ad.spec.r;
        let dt = self.dtype;
        let nlayers = self.w.layers.len();
        for ((li, p), (a, b)) in &ad.weights {
            let mismatch = |msg: String| ModelError::Mismatch {
                path: ad.source.join(WEIGHTS_FILE),
                msg,
            };
            if *li >= nlayers {
                return Err(mismatch(format!(
                    "adapter has layer {li}, the model {nlayers} layers"
                )));
            }
            let lin = p.of_mut(&mut self.w.layers[*li]);
            let (out_dim, in_dim) = lin.dims()?;
            let name = p.peft_name();
            if a.dims() != [r, in_dim] || b.dims() != [out_dim, r] {
                return Err(mismatch(format!("layer {li} {name}: A {:?} / B {:?} do not fit a [{out_dim}, {in_dim}] weight with r {r}", a.dims(), b.dims())));
            }
            // PEFT files are in HF row order; GGUF Llama q/k rows are permuted.
            let b = hf_to_model_rows(&self.cfg, *p, b)?;
            let (a, b) = (
                a.to_device(&self.device)?.to_dtype(dt)?,
                b.to_device(&self.device)?.to_dtype(dt)?,
            );
            let lin = p.of_mut(&mut self.w.layers[*li]);
            *lin = if merge {
                let dense = lin.to_dense(dt)?;
                let Linear::Dense(w, bias) = dense else {
                    return Err(ModelError::Candle(candle_core::Error::Msg(
                        "merge needs a dense weight".into(),
                    )));
                };
                let delta = (b.matmul(&a)? * scale)?;
                Linear::Dense((w + delta)?, bias)
            } else {
                let base = std::mem::replace(
                    lin,
                    Linear::Dense(Tensor::zeros(1, dt, &self.device)?, None),
                );
                // CPU f32: the adapter's share goes into the base product's buffer.
                let host = if self.device.is_cpu() && dt == candle_core::DType::F32 {
                    Some(std::sync::Arc::new(crate::model::blocks::LowRank::new(
                        &a, &b, scale,
                    )?))
                } else {
                    None
                };
                Linear::Lora {
                    base: Box::new(base),
                    a,
                    b,
                    scale,
                    host,
                }
            };
        }
        Ok(())
    }
}

impl crate::model::Loaded {
    /// Apply an adapter and make the model's identity name it (config and file hashes), so
    /// generations from base + adapter never share a model id with the base alone.
    pub fn with_adapter(&mut self, ad: &PeftAdapter, merge: bool) -> Result<(), ModelError> {
        self.model.apply_adapter(ad, merge)?;
        self.identity.config["adapter"] = ad.describe(merge);
        self.identity.name = format!("{} + {}", self.identity.name, ad.label);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_not_adapters() {
        for p in Projection::ALL {
            for half in [Half::A, Half::B] {
                let n = lora_name(17, p, half);
                assert_eq!(parse_lora_name(&n), Some((17, p, half)), "{n}");
            }
        }
        assert_eq!(
            lora_name(3, Projection::Down, Half::B),
            "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
        );
        // A projection under the wrong group, or an extra component, is not a PEFT name.
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.3.self_attn.down_proj.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.3.mlp.x.down_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_lora_name("model.layers.3.mlp.down_proj.weight"), None);
    }
}
