//! [`LoraSpec`]: which projections get adapters and how they are scaled.

use serde::{Deserialize, Serialize};

use super::Projection;

/// Rank, alpha, rsLoRA, dropout and target projections. Serialized as it is recorded in
/// training configs (and so in run keys and checkpoint records): targets by PEFT name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// Scale by `alpha / sqrt(r)` (rsLoRA) instead of `alpha / r`.
    pub rslora: bool,
    pub dropout: f64,
    /// PEFT module names; in [`Projection::ALL`] order once [`LoraSpec::normalized`].
    pub targets: Vec<String>,
    /// Only these layers (0-based, sorted) get adapters: PEFT's `layers_to_transform`.
    /// `None`: every layer (and absent from the serialized config, so configs recorded
    /// before the option keep their keys and ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
}

impl LoraSpec {
    /// The factor on `B A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether projection `p` has an adapter.
    pub fn targets(&self, p: Projection) -> bool {
        self.targets.iter().any(|t| t == p.peft_name())
    }

    /// Whether layer `layer` has adapters.
    pub fn at_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    /// Check the targets name known projections and the numbers make sense; put the targets
    /// in canonical order.
    pub fn normalized(mut self) -> Result<LoraSpec, String> {
        for t in &self.targets {
            if Projection::from_peft_name(t).is_none() {
                let known: Vec<&str> = Projection::ALL.iter().map(|p| p.peft_name()).collect();
                return Err(format!(
                    "unknown LoRA target `{t}` (known: {})",
                    known.join(", ")
                ));
            }
        }
        if self.r == 0 {
            return Err("LoRA rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout {} is not in [0, 1)", self.dropout));
        }
        if let Some(l) = &mut self.layers {
            l.sort_unstable();
            l.dedup();
            if l.is_empty() {
                return Err("--layers names no layer".into());
            }
        }
        self.targets = Projection::ALL
            .into_iter()
            .filter(|p| self.targets(*p))
            .map(|p| p.peft_name().to_string())
            .collect();
        Ok(self)
    }

    /// `adapter_config.json` as PEFT writes it (the keys PEFT needs to load the adapter).
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        let mut c = serde_json::json!({
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
        });
        if let Some(l) = &self.layers {
            c["layers_to_transform"] = serde_json::json!(l);
        }
        c
    }
}
