//! Trainable LoRA parameters: [`LoraSpec`] (rank, alpha, rsLoRA, dropout, target projections)
//! and [`LoraParams`] (one `A [r, in]` / `B [out, r]` pair per targeted projection, kept in
//! f32 whatever the model's dtype), with PEFT's initialisation and PEFT's file format.
//!
//! GGUF Llama files store q/k rows permuted for llama.cpp's interleaved RoPE. Training on such
//! a model learns `B` rows of q/k in that permuted order; [`LoraParams::to_peft`] and
//! [`LoraParams::from_peft`] convert to and from the HF order PEFT and transformers use, so a
//! saved adapter means the same thing on every loader.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as J};

use crate::model::llama::{Config, Layer, Linear, Model, RopeLayout};
use crate::model::lora::MODULES;
use crate::rng::Rng;

pub type Result<T> = candle_core::Result<T>;

/// Which projections get adapters and how they are scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// Scale by `alpha / sqrt(r)` (rsLoRA) instead of `alpha / r`.
    pub rslora: bool,
    pub dropout: f64,
    /// PEFT module names, in [`MODULES`] order.
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Check the targets name known projections; put them in canonical order.
    pub fn normalized(mut self) -> std::result::Result<LoraSpec, String> {
        for t in &self.targets {
            if !MODULES.iter().any(|(m, _)| m == t) {
                return Err(format!(
                    "unknown LoRA target `{t}` (known: {})",
                    MODULES.map(|m| m.0).join(", ")
                ));
            }
        }
        if self.r == 0 {
            return Err("LoRA rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout {} is not in [0, 1)", self.dropout));
        }
        self.targets = MODULES
            .iter()
            .filter(|(m, _)| self.targets.iter().any(|t| t == m))
            .map(|(m, _)| m.to_string())
            .collect();
        Ok(self)
    }

    /// `adapter_config.json` as PEFT writes it (the keys PEFT needs to load the adapter).
    pub fn peft_config(&self, base_model: &str) -> J {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
        })
    }
}

/// Index of a PEFT module name in [`MODULES`].
pub fn module_index(name: &str) -> Option<usize> {
    MODULES.iter().position(|(m, _)| *m == name)
}

/// The projection `m` (index into [`MODULES`]) of a layer.
pub fn projection(layer: &Layer, m: usize) -> &Linear {
    match m {
        0 => &layer.q,
        1 => &layer.k,
        2 => &layer.v,
        3 => &layer.o,
        4 => &layer.gate,
        5 => &layer.up,
        _ => &layer.down,
    }
}

/// One adapter pair.
#[derive(Clone)]
pub struct Pair {
    pub layer: usize,
    /// Index into [`MODULES`].
    pub module: usize,
    pub a: Tensor,
    pub b: Tensor,
}

impl Pair {
    pub fn peft_prefix(&self) -> String {
        let (name, group) = MODULES[self.module];
        format!(
            "base_model.model.model.layers.{}.{group}.{name}",
            self.layer
        )
    }
}

/// All adapter pairs of a model, in (layer, module) order, plus a per-layer lookup.
#[derive(Clone)]
pub struct LoraParams {
    pub spec: LoraSpec,
    pub pairs: Vec<Pair>,
    /// `index[layer][module]` = position in `pairs`.
    pub index: Vec<[Option<usize>; 7]>,
    pub dtype: DType,
}

/// The master dtype of adapter weights and optimizer state: f32, or f64 when the model runs
/// in f64 (gradient checks).
pub fn master_dtype(model: &Model) -> DType {
    if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Row order of a q or k projection in a GGUF Llama file, relative to HF's: GGUF row
/// `h*hd + 2i + j` holds HF row `h*hd + j*hd/2 + i`.
fn gguf_rows(heads: usize, hd: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(heads * hd);
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                v.push((h * hd + j * hd / 2 + i) as u32);
            }
        }
    }
    v
}

fn inverse(p: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; p.len()];
    for (i, &x) in p.iter().enumerate() {
        inv[x as usize] = i as u32;
    }
    inv
}

/// For a permuted (GGUF Llama) model, the row permutation taking HF-order rows of projection
/// `m` to the model's order, if any.
fn row_perm(cfg: &Config, m: usize) -> Option<Vec<u32>> {
    if cfg.rope != RopeLayout::Interleaved {
        return None;
    }
    match m {
        0 => Some(gguf_rows(cfg.heads, cfg.head_dim)),
        1 => Some(gguf_rows(cfg.kv_heads, cfg.head_dim)),
        _ => None,
    }
}

/// Put the rows of a LoRA `B` (or any output-major matrix) of projection `m`, given in HF
/// order, into the model's own order.
pub fn hf_to_model_rows(cfg: &Config, m: usize, t: &Tensor) -> Result<Tensor> {
    match row_perm(cfg, m) {
        Some(p) => permute_rows(t, &p),
        None => Ok(t.clone()),
    }
}

/// Put the rows of projection `m`'s weight (or LoRA `B`), in the model's order, into HF order.
pub fn model_to_hf_rows(cfg: &Config, m: usize, t: &Tensor) -> Result<Tensor> {
    match row_perm(cfg, m) {
        Some(p) => permute_rows(t, &inverse(&p)),
        None => Ok(t.clone()),
    }
}

fn permute_rows(t: &Tensor, perm: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_slice(perm, perm.len(), t.device())?;
    t.index_select(&idx, 0)
}

impl LoraParams {
    fn build(
        spec: LoraSpec,
        model: &Model,
        mut make: impl FnMut(usize, usize, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<LoraParams> {
        let mut pairs = Vec::new();
        let mut index = vec![[None; 7]; model.cfg.layers];
        for (li, layer) in model.w.layers.iter().enumerate() {
            for (m, (name, _)) in MODULES.iter().enumerate() {
                if !spec.targets.iter().any(|t| t == name) {
                    continue;
                }
                let (out, inp) = projection(layer, m).dims()?;
                let (a, b) = make(li, m, out, inp)?;
                index[li][m] = Some(pairs.len());
                pairs.push(Pair {
                    layer: li,
                    module: m,
                    a,
                    b,
                });
            }
        }
        Ok(LoraParams {
            spec,
            pairs,
            index,
            dtype: master_dtype(model),
        })
    }

    /// PEFT's default initialisation: `A` from kaiming-uniform with `a = sqrt(5)` (uniform in
    /// `±1/sqrt(in)`), `B` zero, so training starts exactly at the base model. Seeded.
    pub fn init(spec: LoraSpec, model: &Model, seed: u64) -> Result<LoraParams> {
        let dt = master_dtype(model);
        let dev = model.device.clone();
        let r = spec.r;
        Self::build(spec, model, |li, m, out, inp| {
            let mut rng = Rng::new(seed ^ 0x4C6F_5241, li * 7 + m);
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f64> = (0..r * inp)
                .map(|_| (rng.unit() * 2.0 - 1.0) * bound)
                .collect();
            let a = Tensor::from_vec(a, (r, inp), &Device::Cpu)?
                .to_dtype(dt)?
                .to_device(&dev)?;
            let b = Tensor::zeros((out, r), dt, &dev)?;
            Ok((a, b))
        })
    }

    /// Adapter weights given by a function of (layer, module, row, col): for tests and the
    /// reference script, which computes the same values in Python.
    pub fn from_fn(
        spec: LoraSpec,
        model: &Model,
        f: impl Fn(usize, usize, bool, usize, usize) -> f64,
    ) -> Result<LoraParams> {
        let dt = master_dtype(model);
        let dev = model.device.clone();
        let r = spec.r;
        let cfg = model.cfg.clone();
        Self::build(spec, model, |li, m, out, inp| {
            let a: Vec<f64> = (0..r * inp)
                .map(|k| f(li, m, true, k / inp, k % inp))
                .collect();
            let b: Vec<f64> = (0..out * r)
                .map(|k| f(li, m, false, k / r, k % r))
                .collect();
            let a = Tensor::from_vec(a, (r, inp), &Device::Cpu)?.to_dtype(dt)?;
            let b = Tensor::from_vec(b, (out, r), &Device::Cpu)?.to_dtype(dt)?;
            // `f` speaks HF row order, like a PEFT file.
            let b = hf_to_model_rows(&cfg, m, &b)?;
            Ok((a.to_device(&dev)?, b.to_device(&dev)?))
        })
    }

    /// Number of trainable scalars.
    pub fn numel(&self) -> usize {
        self.pairs
            .iter()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// The adapter tensors under PEFT's names, rows in HF order, f32.
    pub fn to_peft(&self, cfg: &Config) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for p in &self.pairs {
            // Model row k holds HF row perm[k], so HF row j is model row inverse[j].
            let b = model_to_hf_rows(
                cfg,
                p.module,
                &p.b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            )?;
            let pre = p.peft_prefix();
            out.insert(
                format!("{pre}.lora_A.weight"),
                p.a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            );
            out.insert(format!("{pre}.lora_B.weight"), b);
        }
        Ok(out)
    }

    /// Adapter pairs from PEFT-named tensors (HF row order). Every pair the spec implies must
    /// be present with the right shape.
    pub fn from_peft(
        spec: LoraSpec,
        model: &Model,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<LoraParams, String> {
        let dt = master_dtype(model);
        let dev = model.device.clone();
        let cfg = model.cfg.clone();
        let r = spec.r;
        let mut missing = None;
        let built = Self::build(spec, model, |li, m, out, inp| {
            let (name, group) = MODULES[m];
            let pre = format!("base_model.model.model.layers.{li}.{group}.{name}");
            let (Some(a), Some(b)) = (
                tensors.get(&format!("{pre}.lora_A.weight")),
                tensors.get(&format!("{pre}.lora_B.weight")),
            ) else {
                missing = Some(format!("`{pre}.lora_A/B.weight` is missing"));
                return Tensor::zeros((1, 1), dt, &dev).map(|z| (z.clone(), z));
            };
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                missing = Some(format!(
                    "`{pre}`: A {:?} / B {:?} do not fit r {r} and a [{out}, {inp}] weight",
                    a.dims(),
                    b.dims()
                ));
                return Tensor::zeros((1, 1), dt, &dev).map(|z| (z.clone(), z));
            }
            let b = hf_to_model_rows(&cfg, m, &b.to_device(&Device::Cpu)?.to_dtype(dt)?)?;
            Ok((a.to_dtype(dt)?.to_device(&dev)?, b.to_device(&dev)?))
        })
        .map_err(|e| e.to_string())?;
        match missing {
            Some(m) => Err(m),
            None => Ok(built),
        }
    }
}
