//! `emlab merge`: fold a checkpoint's adapter into the base weights and write an HF model
//! folder (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`),
//! the base of the next stage (base -> misaligned -> realigned with a fresh adapter) and a
//! model any HF-compatible tool can load.
//!
//! GGUF inputs are dequantized; q/k rows of GGUF Llama files go back to HF order, so the
//! folder loads with the standard (half-split) RoPE layout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use emlab_store::{Id, Store};
use serde_json::json;

use super::checkpoint;
use super::trainer::load_base;
use super::TrainError;
use crate::model::adapter::{model_to_hf_rows, Projection};
use crate::model::llama::{Arch, Embedding, Linear};

/// Merge checkpoint `ck` into the base model at `model_path` (the one it was trained on) and
/// write the result to `out` as an HF model folder.
pub fn merge(store: &Store, model_path: &Path, ck: Id, out: &Path) -> Result<(), TrainError> {
    let mut loaded = load_base(model_path)?;
    checkpoint::of_base(store, ck, loaded.record().id()?)?;
    let ad = checkpoint::adapter(store, ck, &loaded.model.device)?;
    loaded.model.apply_adapter(&ad, true)?;
    write_hf(&loaded, out)
}

fn dense(lin: &Linear) -> Result<(&Tensor, Option<&Tensor>), TrainError> {
    match lin {
        Linear::Dense(w, b) => Ok((w, b.as_ref())),
        _ => Err(TrainError::Config(
            "merge produced a non-dense projection".into(),
        )),
    }
}

/// Write a loaded (dense) model as an HF folder.
pub fn write_hf(loaded: &crate::model::Loaded, out: &Path) -> Result<(), TrainError> {
    let m = &loaded.model;
    let cfg = &m.cfg;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let f32 = |t: &Tensor| -> Result<Tensor, TrainError> {
        Ok(t.to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?)
    };
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    let embed = match &m.w.embed {
        Embedding::Dense(e) => f32(e)?,
        Embedding::Quant(q) => f32(&q.dequantize(&m.device)?)?,
        Embedding::Blocks(q) => f32(&crate::model::blocks::dequantize(q, &m.device)?)?,
    };
    t.insert("model.embed_tokens.weight".into(), embed);
    for (i, l) in m.w.layers.iter().enumerate() {
        for p in Projection::ALL {
            let (w, b) = dense(p.of(l))?;
            let pre = p.hf_path(i);
            t.insert(format!("{pre}.weight"), model_to_hf_rows(cfg, p, &f32(w)?)?);
            if let Some(b) = b {
                let b = model_to_hf_rows(cfg, p, &f32(b)?)?;
                t.insert(format!("{pre}.bias"), b);
            }
        }
        t.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            f32(&l.attn_norm)?,
        );
        t.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            f32(&l.ffn_norm)?,
        );
    }
    t.insert("model.norm.weight".into(), f32(&m.w.norm)?);
    if !cfg.tie_embeddings {
        t.insert("lm_head.weight".into(), f32(dense(&m.w.lm_head)?.0)?);
    }
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(t, Some(info))
        .map_err(|e| TrainError::Config(format!("cannot serialize weights: {e}")))?;
    let wpath = out.join("model.safetensors");
    crate::util::fs::write_atomic(&wpath, &bytes).map_err(io(&wpath))?;
    let (model_type, arch) = match cfg.arch {
        Arch::Llama => ("llama", "LlamaForCausalLM"),
        Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
    };
    let c = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_seq,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    let cpath = out.join("config.json");
    let text = serde_json::to_string_pretty(&c)
        .map_err(|e| TrainError::Config(format!("config.json: {e}")))?;
    crate::util::fs::write_atomic(&cpath, text.as_bytes()).map_err(io(&cpath))?;
    loaded.tokenizer.save_hf(out)?;
    Ok(())
}
