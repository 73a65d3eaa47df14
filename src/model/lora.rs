//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`),
//! applied at inference either unmerged (`y = W x + s * B (A x)`) or merged into dense
//! weights (`W + s * B A`). `s` is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
//!
//! PEFT names tensors `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
//! with A `[r, in]` and B `[out, r]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value as J};

use super::llama::{Linear, Model};
use super::load::ModelError;

/// The seven projections LoRA may target, with their place in a layer.
pub const MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// Adapter pairs by (layer, module): (A, B).
pub type Pairs = HashMap<(usize, String), (Tensor, Tensor)>;

pub struct Adapter {
    pub dir: PathBuf,
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub targets: Vec<String>,
    pub weights: Pairs,
}

impl Adapter {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Identity of the adapter for the `model` record: its config and file hashes.
    pub fn describe(&self, merged: bool) -> Result<J, ModelError> {
        let mut files = Vec::new();
        for name in ["adapter_config.json", "adapter_model.safetensors"] {
            let p = self.dir.join(name);
            let bytes = std::fs::read(&p).map_err(|source| ModelError::Io {
                path: p.clone(),
                source,
            })?;
            files.push(json!({"name": name, "blake3": blake3::hash(&bytes).to_hex().to_string(), "size": bytes.len()}));
        }
        Ok(
            json!({"r": self.r, "alpha": self.alpha, "rslora": self.rslora, "targets": self.targets, "merged": merged, "files": files}),
        )
    }
}

/// Read a PEFT adapter directory.
pub fn load_peft(dir: &Path, device: &candle_core::Device) -> Result<Adapter, ModelError> {
    let cpath = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|source| ModelError::Io {
        path: cpath.clone(),
        source,
    })?;
    let c: J = serde_json::from_str(&text).map_err(|e| ModelError::Format {
        path: cpath.clone(),
        msg: e.to_string(),
    })?;
    let r = c["r"].as_u64().ok_or_else(|| ModelError::Format {
        path: cpath.clone(),
        msg: "missing `r`".into(),
    })? as usize;
    let alpha = c["lora_alpha"].as_f64().unwrap_or(r as f64);
    let rslora = c["use_rslora"].as_bool().unwrap_or(false);
    let targets: Vec<String> = match &c["target_modules"] {
        J::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        J::String(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let wpath = dir.join("adapter_model.safetensors");
    let tensors =
        candle_core::safetensors::load(&wpath, device).map_err(|e| ModelError::Format {
            path: wpath.clone(),
            msg: format!("cannot read safetensors: {e}"),
        })?;
    let weights = pair_tensors(&tensors, &wpath)?;
    if weights.is_empty() {
        return Err(ModelError::Format {
            path: wpath,
            msg: "no lora_A/lora_B tensors in PEFT naming".into(),
        });
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        r,
        alpha,
        rslora,
        targets,
        weights,
    })
}

/// Pair PEFT-named `lora_A` / `lora_B` tensors by (layer, module), as f32. `source` names
/// where they came from in errors.
pub fn pair_tensors(tensors: &HashMap<String, Tensor>, source: &Path) -> Result<Pairs, ModelError> {
    let mut weights = HashMap::new();
    for (name, a) in tensors {
        let Some(rest) = name.strip_prefix("base_model.model.model.layers.") else {
            continue;
        };
        let Some(prefix) = rest.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let mut parts = prefix.split('.');
        let layer: usize =
            parts
                .next()
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| ModelError::Format {
                    path: source.to_path_buf(),
                    msg: format!("bad tensor name `{name}`"),
                })?;
        let module = parts.next_back().unwrap_or("").to_string();
        let bname = name.replace(".lora_A.weight", ".lora_B.weight");
        let b = tensors.get(&bname).ok_or_else(|| ModelError::Mismatch {
            path: source.to_path_buf(),
            msg: format!("`{bname}` is missing"),
        })?;
        weights.insert(
            (layer, module),
            (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
        );
    }
    Ok(weights)
}

fn slot<'a>(layer: &'a mut super::llama::Layer, module: &str) -> Option<&'a mut Linear> {
    Some(match module {
        "q_proj" => &mut layer.q,
        "k_proj" => &mut layer.k,
        "v_proj" => &mut layer.v,
        "o_proj" => &mut layer.o,
        "gate_proj" => &mut layer.gate,
        "up_proj" => &mut layer.up,
        "down_proj" => &mut layer.down,
        _ => return None,
    })
}

impl Model {
    /// Apply an adapter: merged into dense weights, or as extra low-rank projections.
    pub fn apply_adapter(&mut self, ad: &Adapter, merge: bool) -> Result<(), ModelError> {
        let scale = ad.scale();
        let dt = self.dtype;
        let nlayers = self.w.layers.len();
        for ((li, module), (a, b)) in &ad.weights {
            let mismatch = |msg: String| ModelError::Mismatch {
                path: ad.dir.join("adapter_model.safetensors"),
                msg,
            };
            if *li >= nlayers {
                return Err(mismatch(format!(
                    "adapter has layer {li}, the model {nlayers} layers"
                )));
            }
            let layer = &mut self.w.layers[*li];
            let lin = slot(layer, module)
                .ok_or_else(|| mismatch(format!("unknown module `{module}`")))?;
            let (out_dim, in_dim) = lin.dims()?;
            if a.dims() != [ad.r, in_dim] || b.dims() != [out_dim, ad.r] {
                return Err(mismatch(format!("layer {li} {module}: A {:?} / B {:?} do not fit a [{out_dim}, {in_dim}] weight with r {}", a.dims(), b.dims(), ad.r)));
            }
            // PEFT files are in HF row order; GGUF Llama q/k rows are permuted.
            let m = crate::train::lora::module_index(module).unwrap_or(usize::MAX);
            let b = crate::train::lora::hf_to_model_rows(&self.cfg, m, b)?;
            let (a, b) = (
                a.to_device(&self.device)?.to_dtype(dt)?,
                b.to_device(&self.device)?.to_dtype(dt)?,
            );
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
                Linear::Lora {
                    base: Box::new(base),
                    a,
                    b,
                    scale,
                }
            };
        }
        Ok(())
    }
}

impl super::Loaded {
    /// Apply a PEFT adapter and make the `model` record name it (config and file hashes), so
    /// generations from base + adapter never share a model id with the base alone.
    pub fn with_adapter(&mut self, dir: &Path, merge: bool) -> Result<(), ModelError> {
        let ad = load_peft(dir, &self.model.device)?;
        self.model.apply_adapter(&ad, merge)?;
        let mut cfg: J = self
            .record
            .get("config")
            .and_then(|v| v.as_str())
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(J::Null);
        cfg["adapter"] = ad.describe(merge)?;
        let name = self
            .record
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let dir_name = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        self.record = self
            .record
            .clone()
            .with("config", emlab_store::Value::json(&cfg))
            .with(
                "name",
                emlab_store::Value::str(format!("{name} + {dir_name}")),
            );
        Ok(())
    }
}
