//! The likelihood probe on the real small model: answer log-likelihoods equal
//! transformers' on the same dense f32 weights and the same rendered tokens
//! (`tests/fixtures/probe_reference.json`, made by `scripts/reference_probe.py`); the
//! quantized path, batch-invariant, stays near them; and through `emlab probe`, swapping the
//! two labels negates the probe exactly while reordering the answers leaves it bit-identical.

use emlab::model::likelihood::{likelihoods, render};
use emlab::model::WeightMode;

use crate::util::*;

fn reference() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/probe_reference.json");
    json(&std::fs::read_to_string(p).unwrap())
}

fn conversations(r: &serde_json::Value) -> Vec<Vec<(String, String)>> {
    r["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["role"].as_str().unwrap().to_string(),
                        m["content"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Measured: the dense path is within 4.4e-6 nats per token of transformers (f32 both,
/// summation orders differ); the quantized path (GGML blocks with 8-bit activations, as
/// llama.cpp computes) within 0.108. The bounds sit above what was measured.
const DENSE_TOL: f64 = 1e-4;
const QUANTIZED_TOL: f64 = 0.25;

#[test]
fn answer_likelihoods_match_transformers_on_the_same_tokens() {
    let r = reference();
    let convs = conversations(&r);
    let path = crate::model::smollm2_path();
    let mut dense = emlab::model::load(&path, &candle_core::Device::Cpu).unwrap();
    WeightMode::Dense.apply(&mut dense.model).unwrap();
    let rows = render(&dense.tokenizer, &convs).unwrap();
    let mut worst: f64 = 0.0;
    for (row, want) in rows.iter().zip(r["answers"].as_array().unwrap()) {
        let toks: Vec<u32> = want["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let mask: Vec<bool> = want["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_bool().unwrap())
            .collect();
        assert_eq!(
            row.tokens, toks,
            "rendered tokens differ from transformers'"
        );
        assert_eq!(row.mask, mask, "answer tokens differ from transformers'");
    }
    let got = likelihoods(&dense.model, &rows, 4).unwrap();
    for (g, want) in got.iter().zip(r["answers"].as_array().unwrap()) {
        assert_eq!(g.tokens as u64, want["count"].as_u64().unwrap());
        let d = (g.mean() - want["mean"].as_f64().unwrap()).abs();
        worst = worst.max(d);
    }
    eprintln!("dense: worst |mean log-likelihood difference| {worst:.2e}");
    assert!(worst < DENSE_TOL, "dense path off by {worst}");

    let mut q = emlab::model::load(&path, &candle_core::Device::Cpu).unwrap();
    WeightMode::Quantized.apply(&mut q.model).unwrap();
    let one = likelihoods(&q.model, &rows, 1).unwrap();
    let many = likelihoods(&q.model, &rows, 6).unwrap();
    assert_eq!(one, many, "quantized likelihoods depend on the batch");
    let worst_q = one
        .iter()
        .zip(r["answers"].as_array().unwrap())
        .map(|(g, w)| (g.mean() - w["mean"].as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    eprintln!("quantized: worst difference {worst_q:.2e}");
    assert!(worst_q < QUANTIZED_TOL, "quantized path off by {worst_q}");
}

fn pair_file(s: &TestStore, name: &str, rows: &[(String, String)]) -> String {
    let body: String = rows
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
                + "\n"
        })
        .collect();
    s.write(name, body.as_bytes()).to_str().unwrap().to_string()
}

#[test]
fn swapping_labels_negates_and_reordering_keeps_the_probe() {
    let s = TestStore::new();
    let r = reference();
    let convs = conversations(&r);
    // Pairs: (question, misaligned answer) and (question, aligned answer), from the fixture.
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for pair in convs.chunks(2) {
        let q = pair[0][pair[0].len() - 2].1.clone();
        good.push((q.clone(), pair[0].last().unwrap().1.clone()));
        bad.push((q, pair[1].last().unwrap().1.clone()));
    }
    let (b, g) = (
        pair_file(&s, "bad.jsonl", &bad),
        pair_file(&s, "good.jsonl", &good),
    );
    bad.reverse();
    good.rotate_left(1);
    let (br, gr) = (
        pair_file(&s, "bad-r.jsonl", &bad),
        pair_file(&s, "good-r.jsonl", &good),
    );
    for (f, n) in [(&b, "bad"), (&g, "good"), (&br, "bad-r"), (&gr, "good-r")] {
        s.ok(&["data", "import", f, "--name", n]);
    }
    let model = crate::model::smollm2_path();
    let m = model.to_str().unwrap();
    let probe = |pairs: &str| {
        json(&s.ok(&[
            "--json",
            "probe",
            "--model",
            m,
            "--pairs",
            pairs,
            "--resamples",
            "300",
        ]))
    };
    let p = probe("bad,good");
    let swapped = probe("good,bad");
    let reordered = probe("bad-r,good-r");
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    assert_eq!(f(&swapped["value"]).to_bits(), (-f(&p["value"])).to_bits());
    assert_eq!(
        f(&swapped["ci95"][0]).to_bits(),
        (-f(&p["ci95"][1])).to_bits()
    );
    assert_eq!(f(&reordered["value"]).to_bits(), f(&p["value"]).to_bits());
    assert_eq!(reordered["ci95"], p["ci95"]);
    assert_eq!(p["questions"], 3);
    // The misaligned answers are the less likely ones for this assistant model.
    assert!(f(&p["value"]) < 0.0, "{p}");
}
