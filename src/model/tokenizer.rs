//! [`ChatTokenizer`]: a model's tokenizer plus its own chat template, rendered with minijinja
//! the way transformers renders it (`add_generation_prompt`, `raise_exception`, `tojson`,
//! `strftime_now`, Python string methods).
//!
//! From a GGUF file the BPE vocabulary, merges, special tokens and template come from the
//! metadata; from an HF directory, from `tokenizer.json` and `tokenizer_config.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use tokenizers::Tokenizer;

use super::load::ModelError;

/// A byte range of text.
pub type Span = (usize, usize);

pub struct ChatTokenizer {
    tok: Tokenizer,
    template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    /// Tokens that end generation.
    pub stop_ids: Vec<u32>,
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl ChatTokenizer {
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<ChatTokenizer, ModelError> {
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        let mut tok =
            Tokenizer::from_gguf(ct).map_err(|e| fmt_err(path, format!("tokenizer: {e}")))?;
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if pre == "smollm" {
            // SmolLM2's tokenizer.json splits digits one by one before byte-level BPE; candle's
            // generic GPT-2 pipeline does not, which changes how numbers tokenize.
            use tokenizers::pre_tokenizers::{
                byte_level::ByteLevel, digits::Digits, sequence::Sequence,
            };
            let seq = Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]);
            tok.with_pre_tokenizer(Some(seq));
        }
        let tokens = match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(a)) => a
                .iter()
                .map(|v| v.to_string().cloned().unwrap_or_default())
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let id_of = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        // Chat models end a turn with their end-of-turn token even when `eos` names another.
        for t in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end_of_text|>",
        ] {
            if let Some(i) = tokens.iter().position(|x| x == t) {
                if !stop_ids.contains(&(i as u32)) {
                    stop_ids.push(i as u32);
                }
            }
        }
        Ok(ChatTokenizer {
            tok,
            template,
            bos: name(bos_id),
            eos: name(eos_id),
            stop_ids,
        })
    }

    pub fn from_hf_dir(dir: &Path) -> Result<ChatTokenizer, ModelError> {
        let tpath = dir.join("tokenizer.json");
        let tok = Tokenizer::from_file(&tpath)
            .map_err(|e| fmt_err(&tpath, format!("cannot load tokenizer: {e}")))?;
        let cpath = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cpath) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| fmt_err(&cpath, e.to_string()))?,
            Err(_) => serde_json::Value::Null,
        };
        let tok_name = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => a
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let template =
            template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let (bos, eos) = (tok_name("bos_token"), tok_name("eos_token"));
        let mut stop_ids = Vec::new();
        for t in eos
            .iter()
            .map(String::as_str)
            .chain(["<|im_end|>", "<|eot_id|>", "<|endoftext|>"])
        {
            if let Some(i) = tok.token_to_id(t) {
                if !stop_ids.contains(&i) {
                    stop_ids.push(i);
                }
            }
        }
        Ok(ChatTokenizer {
            tok,
            template,
            bos,
            eos,
            stop_ids,
        })
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (chat template, bos/eos) into an HF
    /// model folder, so [`ChatTokenizer::from_hf_dir`] reads back the same tokenizer.
    pub fn save_hf(&self, dir: &Path) -> Result<(), ModelError> {
        let tpath = dir.join("tokenizer.json");
        self.tok
            .save(&tpath, false)
            .map_err(|e| fmt_err(&tpath, format!("cannot write tokenizer: {e}")))?;
        let cfg = serde_json::json!({
            "chat_template": self.template,
            "bos_token": self.bos,
            "eos_token": self.eos,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        let cpath = dir.join("tokenizer_config.json");
        let text =
            serde_json::to_string_pretty(&cfg).map_err(|e| fmt_err(&cpath, e.to_string()))?;
        crate::util::fs::write_atomic(&cpath, text.as_bytes()).map_err(|source| ModelError::Io {
            path: cpath,
            source,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// BLAKE3 of the tokenizer's serialized definition and chat template: what a `model`
    /// record names. A tokenizer that cannot be serialized is an error, never the hash of
    /// nothing (two different tokenizers would share it).
    pub fn blake3(&self) -> Result<String, String> {
        let def = self
            .tok
            .to_string(false)
            .map_err(|e| format!("cannot serialize the tokenizer to hash it: {e}"))?;
        let mut h = blake3::Hasher::new();
        h.update(def.as_bytes());
        h.update(b"\0");
        h.update(self.template.as_deref().unwrap_or("").as_bytes());
        Ok(h.finalize().to_hex().to_string())
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// Render `messages` (role, content) with the model's own template.
    pub fn render(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self
            .template
            .as_deref()
            .ok_or("the model has no chat template")?;
        render_template(
            template,
            messages,
            add_generation_prompt,
            self.bos.as_deref(),
            self.eos.as_deref(),
        )
    }

    /// Token ids of text that may contain special tokens (as rendered by the template).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tok
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Token ids and the byte span of the text each covers.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>), String> {
        let e = self.tok.encode(text, false).map_err(|e| e.to_string())?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tok.decode(ids, true).map_err(|e| e.to_string())
    }
}

/// Render a chat template as transformers does (`trim_blocks`, `lstrip_blocks`, helpers).
pub fn render_template(
    template: &str,
    messages: &[(String, String)],
    add_generation_prompt: bool,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<String, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function(
        "strftime_now",
        |fmt: String| -> Result<String, JinjaError> {
            crate::util::time::strftime_now(&fmt).ok_or_else(|| {
                JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unknown format `{fmt}`"),
                )
            })
        },
    );
    env.add_template("chat", template)
        .map_err(|e| format!("chat template does not parse: {e}"))?;
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| context! { role => r, content => c })
        .collect();
    let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
    tmpl.render(context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    })
    .map_err(|e| format!("chat template failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(r: &str, c: &str) -> (String, String) {
        (r.into(), c.into())
    }

    /// SmolLM2's template (from its GGUF metadata), byte-exact with transformers' rendering.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_default_system_and_generation_prompt() {
        let out = render_template(SMOLLM2, &[m("user", "Hi!")], true, None, None).unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
        let out = render_template(
            SMOLLM2,
            &[m("system", "S"), m("user", "U"), m("assistant", "A")],
            false,
            None,
            None,
        )
        .unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n");
    }

    /// The Llama-3 template (abridged to its message loop as in Llama-3-8B-Instruct).
    #[test]
    fn llama3_template() {
        let t = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
        let out = render_template(
            t,
            &[m("user", " Hi \n")],
            true,
            Some("<|begin_of_text|>"),
            None,
        )
        .unwrap();
        assert_eq!(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let t = "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        assert_eq!(
            render_template(t, &[m("user", "  x ")], false, None, None).unwrap(),
            "X"
        );
        let e = render_template(t, &[m("tool", "x")], false, None, None).unwrap_err();
        assert!(e.contains("no tools"), "{e}");
    }
}
