//! Which tokens of a rendered conversation are the assistant's, derived from the model's own
//! chat template: the loss mask of training, and the answer tokens whose likelihood the
//! probe measures.
//!
//! [`assistant_mask`] renders a conversation with the template and finds, for each assistant
//! message, the span of rendered text it produced: from the end of the prompt rendered up to
//! that message (with the generation prompt), through the message's content and the
//! template's end-of-turn marker (so the model learns to stop). Tokens whose text lies inside
//! such a span are trained on; system, user and template scaffolding are not. This needs no
//! per-template rules, so it holds for ChatML, Llama-3 and any template that renders a
//! conversation as a growing prefix.

use super::tokenizer::ChatTokenizer;

/// Tokens of a rendered conversation and, per token, whether the loss covers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Masked {
    pub text: String,
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

/// Byte spans of the rendered text that assistant turns produced.
pub fn assistant_spans(
    tok: &ChatTokenizer,
    messages: &[(String, String)],
) -> Result<(String, Vec<(usize, usize)>), String> {
    let full = tok.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, (role, _)) in messages.iter().enumerate() {
        if role != "assistant" {
            continue;
        }
        let before = tok.render(&messages[..i], true)?;
        let through = tok.render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "the chat template does not render message {i} as a prefix of the conversation"
            ));
        }
        // The span: the content and the end-of-turn marker, not the whitespace the template
        // puts between turns.
        let tail = &through[before.len()..];
        spans.push((before.len(), before.len() + tail.trim_end().len()));
    }
    Ok((full, spans))
}

/// Tokenize a conversation and mark the tokens the loss covers.
pub fn assistant_mask(
    tok: &ChatTokenizer,
    messages: &[(String, String)],
) -> Result<Masked, String> {
    let (text, spans) = assistant_spans(tok, messages)?;
    let (tokens, offsets) = tok.encode_with_offsets(&text)?;
    let mask = offsets
        .iter()
        .map(|&(s, e)| e > s && spans.iter().any(|&(a, b)| s >= a && e <= b))
        .collect();
    Ok(Masked { text, tokens, mask })
}
