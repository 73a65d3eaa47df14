//! Generation benchmarks on a tiny random-weight model (runs anywhere, no files): prefill,
//! and batched decode with the KV cache. `cargo bench --bench generate`. For the real model,
//! use `emlab bench generate --model ...`, which stores its results.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use emlab::model::sample::{generate, Request, SamplingParams};
use emlab::model::tiny::{random_model, tiny_config};

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

criterion_group!(benches, bench);
criterion_main!(benches);
