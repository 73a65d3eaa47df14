//! Loading a model: a GGUF file (quantized weights; tokenizer and chat template from its
//! metadata) or a Hugging Face directory (`config.json`, `*.safetensors` shards,
//! `tokenizer.json`, `tokenizer_config.json` with `chat_template`).
//!
//! [`load`] returns a [`Loaded`]: the [`Model`], its [`ChatTokenizer`], and its
//! [`ModelIdentity`] (the content of the `model` record): the exact weight files (BLAKE3 of
//! each), the tokenizer's hash and the architecture, so every generation can say which weights
//! made it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as J;

use super::blocks;
use super::llama::{Arch, Config, Embedding, Layer, Linear, Model, RopeLayout, Weights};
use super::tokenizer::ChatTokenizer;
use crate::provenance::build::{FileHash, ModelIdentity};
use crate::provenance::EncodeError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: architecture `{arch}` is not supported (supported: llama, qwen2, mistral)")]
    Unsupported { path: PathBuf, arch: String },
    #[error("{path}: weights do not match the config: {msg}")]
    Mismatch { path: PathBuf, msg: String },
    #[error(
        "prompt of {tokens} tokens plus {new} new tokens exceeds the model's context of {limit}"
    )]
    TooLong {
        tokens: usize,
        new: usize,
        limit: usize,
    },
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl crate::util::hint::Hint for ModelError {
    fn hint(&self) -> Option<String> {
        match self {
            ModelError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Some(
                "--model takes a .gguf file or a Hugging Face model folder; `bash scripts/fetch-model.sh` puts SmolLM2-135M-Instruct at .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
                    .into(),
            ),
            ModelError::Format { .. } | ModelError::Mismatch { .. } => Some(
                "emlab reads .gguf files and HF folders (config.json, *.safetensors, tokenizer.json, tokenizer_config.json)"
                    .into(),
            ),
            ModelError::TooLong { .. } => {
                Some("lower --max-tokens, or use a model with a longer context".into())
            }
            _ => None,
        }
    }
}

/// A loaded model with its tokenizer and identity.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: ChatTokenizer,
    /// What the `model` record holds (weights, tokenizer, config; the adapter once applied).
    pub identity: ModelIdentity,
}

impl Loaded {
    /// The `model` record of these weights (not yet stored).
    pub fn record(&self) -> emlab_store::Record {
        self.identity.record()
    }
}

/// Load from a `.gguf` file or an HF model directory.
pub fn load(path: &Path, device: &Device) -> Result<Loaded, ModelError> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        load_hf_dir(path, device)
    } else {
        load_gguf(path, device)
    }
}

fn hash_file(path: &Path) -> Result<(String, u64), ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = blake3::Hasher::new();
    let n = std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok((h.finalize().to_hex().to_string(), n))
}

fn identity(
    name: &str,
    cfg: &Config,
    files: &[&Path],
    tok: &ChatTokenizer,
) -> Result<ModelIdentity, ModelError> {
    let mut hashes = Vec::new();
    for f in files {
        let (blake3, size) = hash_file(f)?;
        hashes.push(FileHash {
            name: f.file_name().map(|n| n.to_string_lossy().into_owned()),
            blake3,
            size,
        });
    }
    let architecture = match cfg.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
    };
    Ok(ModelIdentity {
        name: name.to_string(),
        architecture: architecture.to_string(),
        files: hashes,
        tokenizer_blake3: Some(tok.blake3().map_err(|msg| ModelError::Format {
            path: files.first().map_or_else(PathBuf::new, |p| p.to_path_buf()),
            msg,
        })?),
        config: crate::provenance::to_json("the model config", cfg)?,
    })
}

fn md_u(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<usize, ModelError> {
    let v = ct.metadata.get(key).ok_or_else(|| ModelError::Format {
        path: path.to_path_buf(),
        msg: format!("missing metadata `{key}`"),
    })?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .map(|x| x as usize)
        .map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            msg: format!("`{key}`: {e}"),
        })
}

fn md_f(ct: &gguf_file::Content, key: &str) -> Option<f32> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok())
}

/// Load a GGUF file: weights stay quantized (matmuls run on the quantized blocks).
pub fn load_gguf(path: &Path, device: &Device) -> Result<Loaded, ModelError> {
    let fmt = |msg: String| ModelError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| fmt(format!("not a readable GGUF file: {e}")))?;
    let arch_name = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let (arch, rope) = match arch_name.as_str() {
        // llama.cpp stores llama (and mistral) q/k rows permuted for interleaved rotary pairs.
        "llama" | "mistral" => (Arch::Llama, RopeLayout::Interleaved),
        "qwen2" => (Arch::Qwen2, RopeLayout::Half),
        other => {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                arch: other.to_string(),
            })
        }
    };
    let p = arch_name.as_str();
    let hidden = md_u(&ct, &format!("{p}.embedding_length"), path)?;
    let heads = md_u(&ct, &format!("{p}.attention.head_count"), path)?;
    let tokenizer = ChatTokenizer::from_gguf(&ct, path)?;
    let cfg = Config {
        arch,
        vocab: md_u(&ct, &format!("{p}.vocab_size"), path).unwrap_or(tokenizer.vocab_size()),
        hidden,
        intermediate: md_u(&ct, &format!("{p}.feed_forward_length"), path)?,
        layers: md_u(&ct, &format!("{p}.block_count"), path)?,
        heads,
        kv_heads: md_u(&ct, &format!("{p}.attention.head_count_kv"), path).unwrap_or(heads),
        head_dim: hidden / heads,
        rope_theta: md_f(&ct, &format!("{p}.rope.freq_base")).unwrap_or(10_000.0),
        rms_eps: f64::from(
            md_f(&ct, &format!("{p}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        ),
        max_seq: md_u(&ct, &format!("{p}.context_length"), path)?,
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        rope,
    };
    let mut qt = |name: &str| -> Result<QTensor, ModelError> {
        if !ct.tensor_infos.contains_key(name) {
            return Err(ModelError::Mismatch {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}` is missing"),
            });
        }
        ct.tensor(&mut file, name, device)
            .map_err(|e| fmt(format!("tensor `{name}`: {e}")))
    };
    // Activations (and the small dense tensors: norms, biases) are f32 on the CPU and bf16 on
    // CUDA; sampling dequantizes the matrices to the same dtype.
    let act = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let dense =
        |q: QTensor| -> Result<Tensor, ModelError> { Ok(q.dequantize(device)?.to_dtype(act)?) };
    // Block types emlab has CPU kernels for run on them (batch-invariant, fast at batch 1);
    // others, and CUDA, go through Candle.
    let matrix = |q: QTensor, bias: Option<Tensor>| -> Result<Linear, ModelError> {
        Ok(match blocks::from_qtensor(&q)? {
            Some(m) => Linear::Blocks(Arc::new(m), bias),
            None => Linear::Quant(QMatMul::from_arc(Arc::new(q))?, bias),
        })
    };
    let embed_q = Arc::new(qt("token_embd.weight")?);
    if embed_q.shape().dims() != [cfg.vocab, cfg.hidden] {
        return Err(ModelError::Mismatch {
            path: path.to_path_buf(),
            msg: format!(
                "token_embd.weight is {:?}, config says [{}, {}]",
                embed_q.shape().dims(),
                cfg.vocab,
                cfg.hidden
            ),
        });
    }
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let mut lin = |n: &str, bias: bool| -> Result<Linear, ModelError> {
            let b = if bias {
                Some(dense(qt(&format!("blk.{i}.{n}.bias"))?)?)
            } else {
                None
            };
            matrix(qt(&format!("blk.{i}.{n}.weight"))?, b)
        };
        let qb = arch == Arch::Qwen2;
        let layer = Layer {
            q: lin("attn_q", qb)?,
            k: lin("attn_k", qb)?,
            v: lin("attn_v", qb)?,
            o: lin("attn_output", false)?,
            gate: lin("ffn_gate", false)?,
            up: lin("ffn_up", false)?,
            down: lin("ffn_down", false)?,
            attn_norm: dense(qt(&format!("blk.{i}.attn_norm.weight"))?)?,
            ffn_norm: dense(qt(&format!("blk.{i}.ffn_norm.weight"))?)?,
        };
        layers.push(layer);
    }
    let norm = dense(qt("output_norm.weight")?)?;
    let (embed, lm_head) = match blocks::from_qtensor(&embed_q)? {
        Some(m) => {
            let m = Arc::new(m);
            let head = (!cfg.tie_embeddings)
                .then(|| qt("output.weight"))
                .transpose()?;
            let head = match head {
                Some(h) => matrix(h, None)?,
                None => Linear::Blocks(m.clone(), None),
            };
            (Embedding::Blocks(m), head)
        }
        None => {
            let head = if cfg.tie_embeddings {
                Linear::Quant(QMatMul::from_arc(embed_q.clone())?, None)
            } else {
                matrix(qt("output.weight")?, None)?
            };
            (Embedding::Quant(embed_q), head)
        }
    };
    let w = Weights {
        embed,
        layers,
        norm,
        lm_head,
    };
    let name = ct
        .metadata
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| path.display().to_string());
    let identity = identity(&name, &cfg, &[path], &tokenizer)?;
    let model = Model::new(cfg, w, device.clone(), act)?;
    Ok(Loaded {
        model,
        tokenizer,
        identity,
    })
}

/// Load an HF directory. Weights are converted to the activation dtype (f32 on the CPU,
/// bf16 on CUDA).
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<Loaded, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let c: J = serde_json::from_str(&text).map_err(|e| ModelError::Format {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    let get = |k: &str| {
        c.get(k)
            .and_then(J::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| ModelError::Format {
                path: cfg_path.clone(),
                msg: format!("missing `{k}`"),
            })
    };
    let model_type = c.get("model_type").and_then(J::as_str).unwrap_or("");
    let arch = match model_type {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(ModelError::Unsupported {
                path: cfg_path,
                arch: other.to_string(),
            })
        }
    };
    let hidden = get("hidden_size")?;
    let heads = get("num_attention_heads")?;
    let cfg = Config {
        arch,
        vocab: get("vocab_size")?,
        hidden,
        intermediate: get("intermediate_size")?,
        layers: get("num_hidden_layers")?,
        heads,
        kv_heads: get("num_key_value_heads").unwrap_or(heads),
        head_dim: c
            .get("head_dim")
            .and_then(J::as_u64)
            .map_or(hidden / heads, |x| x as usize),
        rope_theta: c.get("rope_theta").and_then(J::as_f64).unwrap_or(10_000.0) as f32,
        rms_eps: c.get("rms_norm_eps").and_then(J::as_f64).unwrap_or(1e-6),
        max_seq: get("max_position_embeddings").unwrap_or(4096),
        tie_embeddings: c
            .get("tie_word_embeddings")
            .and_then(J::as_bool)
            .unwrap_or(false),
        rope: RopeLayout::Half,
    };
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(ModelError::Format {
            path: dir.to_path_buf(),
            msg: "no *.safetensors files".into(),
        });
    }
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let mut tensors = std::collections::HashMap::new();
    for s in &shards {
        let loaded = candle_core::safetensors::load(s, device).map_err(|e| ModelError::Format {
            path: s.clone(),
            msg: format!("cannot read safetensors: {e}"),
        })?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str, shape: &[usize]| -> Result<Tensor, ModelError> {
        let t = tensors.remove(name).ok_or_else(|| ModelError::Mismatch {
            path: dir.to_path_buf(),
            msg: format!("tensor `{name}` is missing"),
        })?;
        if t.dims() != shape {
            return Err(ModelError::Mismatch {
                path: dir.to_path_buf(),
                msg: format!("`{name}` is {:?}, config.json implies {shape:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(dtype)?)
    };
    let (h, hd, nh, nkv, ff) = (
        cfg.hidden,
        cfg.head_dim,
        cfg.heads,
        cfg.kv_heads,
        cfg.intermediate,
    );
    let embed = take("model.embed_tokens.weight", &[cfg.vocab, h])?;
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let p = format!("model.layers.{i}");
        let qb = arch == Arch::Qwen2;
        let mut lin = |n: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, ModelError> {
            let w = take(&format!("{p}.{n}.weight"), &[out, inp])?;
            let b = if bias {
                Some(take(&format!("{p}.{n}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::Dense(w, b))
        };
        let q = lin("self_attn.q_proj", nh * hd, h, qb)?;
        let k = lin("self_attn.k_proj", nkv * hd, h, qb)?;
        let v = lin("self_attn.v_proj", nkv * hd, h, qb)?;
        let o = lin("self_attn.o_proj", h, nh * hd, false)?;
        let gate = lin("mlp.gate_proj", ff, h, false)?;
        let up = lin("mlp.up_proj", ff, h, false)?;
        let down = lin("mlp.down_proj", h, ff, false)?;
        layers.push(Layer {
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            attn_norm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
        });
    }
    let norm = take("model.norm.weight", &[h])?;
    let lm_head = if cfg.tie_embeddings {
        Linear::Dense(embed.clone(), None)
    } else {
        Linear::Dense(take("lm_head.weight", &[cfg.vocab, h])?, None)
    };
    let tokenizer = ChatTokenizer::from_hf_dir(dir)?;
    let mut files: Vec<&Path> = shards.iter().map(PathBuf::as_path).collect();
    files.push(&cfg_path);
    let name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let identity = identity(&name, &cfg, &files, &tokenizer)?;
    let w = Weights {
        embed: Embedding::Dense(embed),
        layers,
        norm,
        lm_head,
    };
    let model = Model::new(cfg, w, device.clone(), dtype)?;
    Ok(Loaded {
        model,
        tokenizer,
        identity,
    })
}
