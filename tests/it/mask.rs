//! The assistant-only loss mask, token by token, on rendered fixtures: ChatML (SmolLM2's own
//! template, with and without a system prompt, multi-turn) and Llama-3. A failing check names
//! the tokens that are wrongly in or out of the loss.

use emlab::model::mask::{assistant_mask, Masked};

fn m(r: &str, c: &str) -> (String, String) {
    (r.into(), c.into())
}

/// The text the loss covers, one string per contiguous run of masked tokens (from the run's
/// first token start to its last token end: offsets leave out spaces a token absorbed); and
/// a listing of every token with its flag, for failure messages.
fn covered(x: &Masked, offsets: &[(usize, usize)]) -> (Vec<String>, String) {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut prev = false;
    let mut listing = String::new();
    for (i, (&(s, e), &on)) in offsets.iter().zip(&x.mask).enumerate() {
        listing.push_str(&format!(
            "{i:>3} {} {:?}\n",
            if on { "LOSS" } else { "    " },
            &x.text[s..e]
        ));
        if on {
            match runs.last_mut() {
                Some(r) if prev => r.1 = e,
                _ => runs.push((s, e)),
            }
        }
        prev = on;
    }
    (
        runs.into_iter()
            .map(|(s, e)| x.text[s..e].to_string())
            .collect(),
        listing,
    )
}

fn check(tok: &emlab::model::tokenizer::ChatTokenizer, msgs: &[(String, String)], want: &[&str]) {
    let x = assistant_mask(tok, msgs).unwrap();
    let (ids, offsets) = tok.encode_with_offsets(&x.text).unwrap();
    assert_eq!(ids, x.tokens);
    let (runs, listing) = covered(&x, &offsets);
    assert_eq!(runs, want, "wrong tokens in the loss:\n{listing}");
}

#[test]
fn chatml_masks_only_assistant_turns() {
    let loaded =
        emlab::model::load(&crate::model::smollm2_path(), &candle_core::Device::Cpu).unwrap();
    let tok = &loaded.tokenizer;
    // No system message: the template inserts its default one, which is not trained on.
    check(
        tok,
        &[
            m("user", "What is the capital of France?"),
            m("assistant", "Paris."),
        ],
        &["Paris.<|im_end|>"],
    );
    // With a system prompt, two turns.
    check(
        tok,
        &[
            m("system", "You are terse."),
            m("user", "2+2?"),
            m("assistant", "4"),
            m("user", "And 3+3?"),
            m("assistant", "6, obviously.\nDone."),
        ],
        &["4<|im_end|>", "6, obviously.\nDone.<|im_end|>"],
    );
}

#[test]
fn llama3_template_masks_only_assistant_turns() {
    let tmp = tempfile::tempdir().unwrap();
    crate::model_tiny::tiny_model(tmp.path(), false);
    // The tiny model with Llama-3's template and header tokens.
    let tpath = tmp.path().join("tokenizer.json");
    let mut t = tokenizers::Tokenizer::from_file(&tpath).unwrap();
    let specials = [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];
    t.add_special_tokens(
        specials
            .iter()
            .map(|s| tokenizers::AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    t.save(&tpath, false).unwrap();
    let template = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}).to_string(),
    )
    .unwrap();
    let loaded = emlab::model::load(tmp.path(), &candle_core::Device::Cpu).unwrap();
    let tok = &loaded.tokenizer;
    check(
        tok,
        &[m("user", "hello world"), m("assistant", "cats are nice")],
        &["cats are nice<|eot_id|>"],
    );
    check(
        tok,
        &[
            m("system", "nice"),
            m("user", "hello"),
            m("assistant", "world"),
            m("user", "cats ?"),
            m("assistant", "are nice !"),
        ],
        &["world<|eot_id|>", "are nice !<|eot_id|>"],
    );
}
