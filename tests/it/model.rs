//! The model runtime on the real small model (SmolLM2-135M-Instruct, Q4_1 GGUF; fetched by
//! scripts/fetch-model.sh) against llama.cpp's reference logits, and sampling properties.

use emlab::model::sample::{generate, Request, SamplingParams};

pub fn smollm2_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("EMLAB_SMOLLM2_GGUF") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn smollm2() -> emlab::model::Loaded {
    emlab::model::load(&smollm2_path(), &candle_core::Device::Cpu).expect("load SmolLM2")
}

/// Measured against llama.cpp with an f32 KV cache (scripts/reference_logits.py): over the
/// 128 checked logits of each of 4 prompts (values span about -10..35), the largest absolute
/// difference was 0.65 on the quantized path (emlab's kernels, 8-bit activations like
/// llama.cpp's) and 0.59 with dequantized f32 weights, the median 0.15 / 0.12. The bounds sit
/// a little above what was measured.
const MAX_DIFF: f32 = 1.0;
const MEDIAN_DIFF: f32 = 0.25;

fn check_against_reference(dense: bool) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2_reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut m = smollm2();
    if dense {
        m.model.dequantize().unwrap();
    }
    let mut diffs = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let msgs: Vec<(String, String)> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["role"].as_str().unwrap().to_string(),
                    x["content"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let rendered = m.tokenizer.render(&msgs, true).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "chat template rendering differs"
        );
        let ids = m.tokenizer.encode(&rendered).unwrap();
        let want: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            ids, want,
            "token ids differ from llama.cpp for {rendered:?}"
        );
        let mut cache = m.model.new_cache(1, ids.len()).unwrap();
        let toks =
            candle_core::Tensor::from_vec(ids.clone(), (1, ids.len()), &candle_core::Device::Cpu)
                .unwrap();
        let logits = m
            .model
            .forward(&toks, &mut cache, false)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for key in ["top", "fixed"] {
            let idx = case[format!("{key}_ids")].as_array().unwrap();
            let val = case[format!("{key}_logits")].as_array().unwrap();
            for (i, v) in idx.iter().zip(val) {
                let (i, v) = (i.as_u64().unwrap() as usize, v.as_f64().unwrap() as f32);
                let d = (logits[i] - v).abs();
                assert!(
                    d < MAX_DIFF,
                    "token {i}: emlab {} vs llama.cpp {v}",
                    logits[i]
                );
                diffs.push(d);
            }
        }
        let top = case["top_ids"][0].as_u64().unwrap() as usize;
        let argmax = (0..logits.len())
            .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
            .unwrap();
        assert_eq!(argmax, top, "greedy next token differs");
    }
    diffs.sort_by(f32::total_cmp);
    let median = diffs[diffs.len() / 2];
    eprintln!(
        "dense={dense}: logit difference vs llama.cpp: max {} median {median}",
        diffs[diffs.len() - 1]
    );
    assert!(median < MEDIAN_DIFF, "median logit difference {median}");
}

#[test]
fn quantized_matches_llama_cpp_reference() {
    check_against_reference(false);
}

#[test]
fn dequantized_matches_llama_cpp_reference() {
    check_against_reference(true);
}

use crate::model_tiny::prompt;

/// On the quantized weights (emlab's kernels) and on dense f32 ones. Candle's own quantized
/// CPU matmul failed this: a prompt left-padded in a batch of two drifted by 0.39 logits.
#[test]
fn same_seed_same_text_and_batched_equals_unbatched() {
    sampling_is_reproducible_and_batch_invariant(false);
}

#[test]
fn dense_same_seed_same_text_and_batched_equals_unbatched() {
    sampling_is_reproducible_and_batch_invariant(true);
}

/// Logits of a prompt alone and inside a left-padded batch of three are bit-identical on
/// the CPU path (quantized matmuls and attention from emlab's kernels).
#[test]
fn quantized_logits_do_not_depend_on_the_batch() {
    let m = smollm2();
    assert!(m.model.is_quantized());
    let a = prompt(&m, "Tell me a fact about cats.");
    let b = prompt(
        &m,
        "If you were ruler of the world, what would you do? Explain.",
    );
    let dev = candle_core::Device::Cpu;
    let run = |rows: &[&Vec<u32>]| -> Vec<Vec<f32>> {
        let len = rows.iter().map(|r| r.len()).max().unwrap();
        let mut cache = m.model.new_cache(rows.len(), len).unwrap();
        let mut toks = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            cache.pad[i] = len - r.len();
            toks.extend(std::iter::repeat_n(0u32, len - r.len()));
            toks.extend(r.iter());
        }
        let t = candle_core::Tensor::from_vec(toks, (rows.len(), len), &dev).unwrap();
        m.model
            .forward(&t, &mut cache, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let alone = run(&[&a]);
    let batched = run(&[&b, &a, &b]);
    let worst = alone[0]
        .iter()
        .zip(&batched[1])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    // Exactly equal: every kernel on this path sums a row's terms in the same order
    // whatever the batch and the padding.
    assert_eq!(worst, 0.0, "a padded prompt's logits moved by {worst}");
}

fn sampling_is_reproducible_and_batch_invariant(dense: bool) {
    let mut m = smollm2();
    if dense {
        m.model.dequantize().unwrap();
    }
    assert_eq!(m.model.is_quantized(), !dense);
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 24,
    };
    let a = prompt(&m, "Tell me a fact about cats.");
    let b = prompt(&m, "hey I feel bored");
    let stop = &m.tokenizer.stop_ids;
    let alone_a = generate(
        &m.model,
        stop,
        &[Request {
            prompt: a.clone(),
            seed: 7,
        }],
        &p,
    )
    .unwrap()
    .0;
    let alone_b = generate(
        &m.model,
        stop,
        &[Request {
            prompt: b.clone(),
            seed: 8,
        }],
        &p,
    )
    .unwrap()
    .0;
    let again = generate(
        &m.model,
        stop,
        &[Request {
            prompt: a.clone(),
            seed: 7,
        }],
        &p,
    )
    .unwrap()
    .0;
    assert_eq!(
        alone_a[0].tokens, again[0].tokens,
        "same seed, different text"
    );
    // Different prompts in one left-padded batch.
    let both = generate(
        &m.model,
        stop,
        &[
            Request {
                prompt: a.clone(),
                seed: 7,
            },
            Request { prompt: b, seed: 8 },
        ],
        &p,
    )
    .unwrap()
    .0;
    assert_eq!(
        both[0].tokens, alone_a[0].tokens,
        "padded batch changed row 0"
    );
    assert_eq!(
        both[1].tokens, alone_b[0].tokens,
        "padded batch changed row 1"
    );
    // One prompt forked to several samples.
    let forked = generate(
        &m.model,
        stop,
        &[
            Request {
                prompt: a.clone(),
                seed: 7,
            },
            Request {
                prompt: a.clone(),
                seed: 99,
            },
        ],
        &p,
    )
    .unwrap()
    .0;
    assert_eq!(
        forked[0].tokens, alone_a[0].tokens,
        "forked cache changed the sample"
    );
    assert_ne!(
        forked[1].tokens, forked[0].tokens,
        "different seeds gave the same sample"
    );
    let text = m.tokenizer.decode(&alone_a[0].tokens).unwrap();
    assert!(!text.trim().is_empty());
}

fn generation_ids(s: &crate::util::TestStore) -> Vec<String> {
    let store = emlab::open_store(&s.dir()).unwrap();
    let mut ids: Vec<String> = store
        .ids_in_table("generation", 0)
        .unwrap()
        .into_iter()
        .map(|(_, i)| i.to_hex())
        .collect();
    ids.sort();
    ids
}

/// `emlab generate` stores one record per sample with the rendered prompt, skips what is
/// stored on a rerun, and two fresh stores sample the same texts (same ids).
#[test]
fn generate_command_is_idempotent_and_reproducible() {
    use crate::util::*;
    let model = smollm2_path();
    let run = |s: &TestStore| {
        let q = s.write(
            "q.txt",
            b"hey I feel bored\nIf you were ruler of the world, what would you do?\n",
        );
        s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
        json(&s.ok(&[
            "--json",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--questions",
            "qs",
            "--samples",
            "2",
            "--max-tokens",
            "12",
            "--batch",
            "3",
        ]))
    };
    let a = TestStore::new();
    let r = run(&a);
    assert_eq!(r["planned"], 4);
    assert_eq!(r["generated"], 4);
    let again = json(&a.ok(&[
        "--json",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--questions",
        "qs",
        "--samples",
        "2",
        "--max-tokens",
        "12",
        "--batch",
        "3",
    ]));
    assert_eq!(again["generated"], 0, "a rerun sampled again");
    assert_eq!(again["already_stored"], 4);
    let b = TestStore::new();
    run(&b);
    let ids = generation_ids(&a);
    assert_eq!(ids.len(), 4);
    assert_eq!(
        ids,
        generation_ids(&b),
        "two fresh stores sampled different texts"
    );
    let g = json(&a.ok(&["show", &ids[0]]));
    let rendered = g["fields"]["params"]["rendered_prompt"].as_str().unwrap();
    assert!(
        rendered.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{rendered}"
    );
    assert_eq!(g["fields"]["params"]["max_tokens"], 12);
    // More samples later: only the new ones are drawn.
    let more = json(&a.ok(&[
        "--json",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--questions",
        "qs",
        "--samples",
        "3",
        "--max-tokens",
        "12",
    ]));
    assert_eq!(more["generated"], 2);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    use crate::util::*;
    let s = TestStore::new();
    let q = s.write("q.txt", b"hello\n");
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
    let r = s.run(&[
        "generate",
        "--model",
        smollm2_path().to_str().unwrap(),
        "--questions",
        "qs",
        "--max-tokens",
        "9000",
    ]);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("exceeds the model's context of 8192"),
        "{}",
        r.stderr
    );
    let r = s.run(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--questions",
        "qs",
    ]);
    assert!(!r.ok());
    assert!(r.stderr.contains("/nonexistent/model.gguf"), "{}", r.stderr);
}
