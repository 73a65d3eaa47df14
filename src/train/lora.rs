//! Trainable LoRA parameters: [`LoraParams`] holds one `A [r, in]` / `B [out, r]` pair per
//! projection a [`LoraSpec`] targets, kept in f32 whatever the model's dtype, with PEFT's
//! initialisation and PEFT's file format (names and specs from `crate::model::adapter`).
//!
//! GGUF Llama files store q/k rows permuted for llama.cpp's interleaved RoPE. Training on such
//! a model learns `B` rows of q/k in that permuted order; [`LoraParams::to_peft`] and
//! [`LoraParams::from_peft`] convert to and from the HF order PEFT and transformers use, so a
//! saved adapter means the same thing on every loader.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use crate::model::adapter::peft::{lora_name, Half};
use crate::model::adapter::{hf_to_model_rows, model_to_hf_rows, LoraSpec, Projection};
use crate::model::llama::{Config, Model};
use crate::util::rng::Rng;

pub type Result<T> = candle_core::Result<T>;

/// One adapter pair.
#[derive(Clone)]
pub struct Pair {
    pub layer: usize,
    pub proj: Projection,
    pub a: Tensor,
    pub b: Tensor,
}

/// All adapter pairs of a model, in (layer, module) order, plus a per-layer lookup.
#[derive(Clone)]
pub struct LoraParams {
    pub spec: LoraSpec,
    pub pairs: Vec<Pair>,
    /// `index[layer][projection index]` = position in `pairs`.
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

impl LoraParams {
    fn build(
        spec: LoraSpec,
        model: &Model,
        mut make: impl FnMut(usize, Projection, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<LoraParams> {
        let mut pairs = Vec::new();
        let mut index = vec![[None; 7]; model.cfg.layers];
        if let Some(bad) = spec
            .layers
            .iter()
            .flatten()
            .find(|&&l| l >= model.cfg.layers)
        {
            candle_core::bail!(
                "LoRA layer {bad} is outside the model, which has {} layers (0-{})",
                model.cfg.layers,
                model.cfg.layers - 1
            );
        }
        for (li, layer) in model.w.layers.iter().enumerate() {
            for p in Projection::ALL {
                if !spec.targets(p) || !spec.at_layer(li) {
                    continue;
                }
                let (out, inp) = p.of(layer).dims()?;
                let (a, b) = make(li, p, out, inp)?;
                index[li][p.index()] = Some(pairs.len());
                pairs.push(Pair {
                    layer: li,
                    proj: p,
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

    /// Frobenius norms of every adapter's A and B, and the totals (the norm of all A's, of
    /// all B's, and of everything), for phase-transition analysis: `{"a", "b", "total",
    /// "pairs": {"LAYER.module": [a, b]}}`.
    pub fn norms(&self) -> Result<serde_json::Value> {
        let mut pairs = serde_json::Map::new();
        let (mut sa, mut sb) = (0f64, 0f64);
        for p in &self.pairs {
            let sq = |t: &Tensor| -> Result<f64> {
                t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
            };
            let (a, b) = (sq(&p.a)?, sq(&p.b)?);
            sa += a;
            sb += b;
            pairs.insert(
                format!("{}.{}", p.layer, p.proj.peft_name()),
                serde_json::json!([a.sqrt(), b.sqrt()]),
            );
        }
        Ok(
            serde_json::json!({"a": sa.sqrt(), "b": sb.sqrt(), "total": (sa + sb).sqrt(), "pairs": pairs}),
        )
    }

    /// PEFT's default initialisation: `A` from kaiming-uniform with `a = sqrt(5)` (uniform in
    /// `±1/sqrt(in)`), `B` zero, so training starts exactly at the base model. Seeded.
    pub fn init(spec: LoraSpec, model: &Model, seed: u64) -> Result<LoraParams> {
        let dt = master_dtype(model);
        let dev = model.device.clone();
        let r = spec.r;
        Self::build(spec, model, |li, p, out, inp| {
            let mut rng = Rng::new(seed ^ 0x4C6F_5241, li * 7 + p.index());
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
        Self::build(spec, model, |li, p, out, inp| {
            let m = p.index();
            let a: Vec<f64> = (0..r * inp)
                .map(|k| f(li, m, true, k / inp, k % inp))
                .collect();
            let b: Vec<f64> = (0..out * r)
                .map(|k| f(li, m, false, k / r, k % r))
                .collect();
            let a = Tensor::from_vec(a, (r, inp), &Device::Cpu)?.to_dtype(dt)?;
            let b = Tensor::from_vec(b, (out, r), &Device::Cpu)?.to_dtype(dt)?;
            // `f` speaks HF row order, like a PEFT file.
            let b = hf_to_model_rows(&cfg, p, &b)?;
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
                p.proj,
                &p.b.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            )?;
            out.insert(
                lora_name(p.layer, p.proj, Half::A),
                p.a.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            );
            out.insert(lora_name(p.layer, p.proj, Half::B), b);
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
        let built = Self::build(spec, model, |li, p, out, inp| {
            let (an, bn) = (lora_name(li, p, Half::A), lora_name(li, p, Half::B));
            let (Some(a), Some(b)) = (tensors.get(&an), tensors.get(&bn)) else {
                missing = Some(format!("`{an}` or `{bn}` is missing"));
                return Tensor::zeros((1, 1), dt, &dev).map(|z| (z.clone(), z));
            };
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                missing = Some(format!(
                    "`{}`: A {:?} / B {:?} do not fit r {r} and a [{out}, {inp}] weight",
                    p.hf_path(li),
                    a.dims(),
                    b.dims()
                ));
                return Tensor::zeros((1, 1), dt, &dev).map(|z| (z.clone(), z));
            }
            let b = hf_to_model_rows(&cfg, p, &b.to_device(&Device::Cpu)?.to_dtype(dt)?)?;
            Ok((a.to_dtype(dt)?.to_device(&dev)?, b.to_device(&dev)?))
        })
        .map_err(|e| e.to_string())?;
        match missing {
            Some(m) => Err(m),
            None => Ok(built),
        }
    }
}
