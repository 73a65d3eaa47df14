//! Generation benchmarks on a tiny random-weight model (runs anywhere, no files): prefill,
//! and batched decode with the KV cache. `cargo bench --bench generate`. For the real model,
//! use `emlab bench generate --model ...`, which stores its results.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use emlab::model::sample::{generate, Request, SamplingParams};
use tiny::{random_model, tiny_config};

/// Test support shared with the integration tests.
#[allow(dead_code)]
#[path = "../tests/it/tiny.rs"]
mod tiny;

fn bench(c: &mut Criterion) {
    let model = random_model(tiny_config(512), 1).expect("tiny model");
    let prompt: Vec<u32> = (0..64).map(|i| (i * 7 % 500) as u32).collect();
    let mut g = c.benchmark_group("tiny-model");
    g.sample_size(20);
    for batch in [1usize, 8] {
        let reqs: Vec<Request> = (0..batch)
            .map(|b| Request {
                prompt: prompt.clone(),
                seed: b as u64,
            })
            .collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 32,
        };
        g.throughput(Throughput::Elements((batch * 32) as u64));
        g.bench_function(format!("prefill 64 + decode 32, batch {batch}"), |b| {
            b.iter(|| generate(&model, &[], &reqs, &p).expect("generate"))
        });
    }
    g.finish();
}

/// The quantized product at SmolLM2-135M's MLP shape (576 → 1536, Q4_1 blocks with random
/// nibbles): batch 1 is decoding one sequence, batch 16 a batch of samples.
fn qmatmul(c: &mut Criterion) {
    use emlab_kernels::{QMatrix, QType};
    let (rows, cols) = (1536usize, 576usize);
    let mut bytes = Vec::with_capacity(rows * cols / 32 * 20);
    let mut s = 1u32;
    for _ in 0..rows * cols / 32 {
        bytes.extend_from_slice(&0x2000u16.to_le_bytes()); // d = 2^-7
        bytes.extend_from_slice(&0xA800u16.to_le_bytes()); // m = -2^-5
        for _ in 0..16 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            bytes.push((s >> 24) as u8);
        }
    }
    let w = QMatrix::new(QType::Q4_1, rows, cols, bytes).expect("matrix");
    let mut g = c.benchmark_group("q4_1 576x1536");
    for n in [1usize, 16] {
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut out = vec![0f32; n * rows];
        g.throughput(Throughput::Elements((n * rows * cols) as u64));
        g.bench_function(format!("batch {n}"), |b| b.iter(|| w.matmul(&x, &mut out)));
    }
    g.finish();
}

criterion_group!(benches, bench, qmatmul);
criterion_main!(benches);
