//! [`LocalChat`]: any model emlab can load, answering chat-completion requests with its own
//! next-token log-probabilities, so judging runs offline through the same code as an
//! endpoint. [`LocalChat::chat`] takes and returns the same JSON an OpenAI-compatible server
//! would.

use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value as J};

use super::sample::{generate, Request, SamplingParams};
use super::{Loaded, ModelError};

pub struct LocalChat {
    pub loaded: Loaded,
}

impl LocalChat {
    pub fn load(path: &Path) -> Result<LocalChat, ModelError> {
        let mut loaded = super::load(path, &super::device())?;
        super::WeightMode::Auto.apply(&mut loaded.model)?;
        Ok(LocalChat { loaded })
    }

    /// Answer a chat-completion request body: greedy text up to `max_tokens`, and with
    /// `logprobs` the `top_logprobs` most likely first tokens.
    pub fn chat(&self, body: &J) -> Result<J, String> {
        let messages: Vec<(String, String)> = body["messages"]
            .as_array()
            .ok_or("request has no messages")?
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap_or("user").to_string(),
                    m["content"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let tok = &self.loaded.tokenizer;
        let text = tok.render(&messages, true)?;
        let ids = tok.encode(&text)?;
        let max_tokens = body["max_tokens"].as_u64().unwrap_or(16) as usize;
        let m = &self.loaded.model;
        if ids.len() + max_tokens > m.cfg.max_seq {
            return Err(format!("prompt of {} tokens plus {max_tokens} new tokens exceeds the model's context of {}", ids.len(), m.cfg.max_seq));
        }
        let mut logprobs = J::Null;
        let mut first: Option<u32> = None;
        if body["logprobs"].as_bool() == Some(true) {
            let k = body["top_logprobs"].as_u64().unwrap_or(20) as usize;
            let mut cache = m.new_cache(1, ids.len()).map_err(|e| e.to_string())?;
            let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &m.device)
                .map_err(|e| e.to_string())?;
            let logits = m
                .forward(&t, &mut cache, false)
                .map_err(|e| e.to_string())?;
            let lp = super::llama::log_softmax(&logits)
                .and_then(|x| x.squeeze(0)?.to_vec1::<f32>())
                .map_err(|e| e.to_string())?;
            let mut order: Vec<usize> = (0..lp.len()).collect();
            order.sort_unstable_by(|a, b| lp[*b].total_cmp(&lp[*a]));
            let top: Vec<J> = order[..k.min(order.len())]
                .iter()
                .map(|&i| json!({"token": tok.decode(&[i as u32]).unwrap_or_default(), "logprob": lp[i]}))
                .collect();
            logprobs = json!({"content": [{"token": top.first().map_or(J::Null, |t| t["token"].clone()), "top_logprobs": top}]});
            first = order.first().map(|&i| i as u32);
        }
        // A one-token answer is the most likely token: no second prefill.
        if let (Some(t), true) = (first, max_tokens <= 1) {
            let content = if tok.stop_ids.contains(&t) {
                String::new()
            } else {
                tok.decode(&[t])?
            };
            return Ok(
                json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": "length"}]}),
            );
        }
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: max_tokens.max(1),
        };
        let (out, _) = generate(
            m,
            &tok.stop_ids,
            &[Request {
                prompt: ids,
                seed: 0,
            }],
            &p,
        )
        .map_err(|e| e.to_string())?;
        let content = tok.decode(&out[0].tokens)?;
        Ok(
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": out[0].finish.as_str()}]}),
        )
    }
}
