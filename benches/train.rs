//! LoRA training-step benchmark on a tiny random-weight model (runs anywhere, no files): one
//! forward + backward over 4 rows of 128 tokens, then an AdamW update. `cargo bench --bench
//! train`. For the real model, `emlab bench train --model ...` stores its results.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use emlab::model::adapter::{LoraSpec, Projection};
use emlab::train::data::Example;
use emlab::train::lora::LoraParams;
use emlab::train::optim::AdamW;
use emlab::train::trainer::Trainer;
use tiny::{random_model, tiny_config};

/// Test support shared with the integration tests.
#[allow(dead_code)]
#[path = "../tests/it/tiny.rs"]
mod tiny;

fn bench(c: &mut Criterion) {
    let model = random_model(tiny_config(512), 1).expect("tiny model");
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        rslora: true,
        dropout: 0.0,
        targets: Projection::ALL
            .iter()
            .map(|p| p.peft_name().to_string())
            .collect(),
        layers: None,
    };
    let params = LoraParams::init(spec, &model, 0).expect("adapter");
    let opt = AdamW::new(Default::default(), &params).expect("optimizer");
    // Clipping off: the step the benchmark always measured (gradients, then AdamW).
    let mut trainer = Trainer::new(&model, params, opt, false, 4, 0.0).expect("trainer");
    let examples: Vec<Example> = (0..4)
        .map(|r| Example {
            row: r,
            tokens: (0..128).map(|i| ((i * 7 + r * 13) % 500) as u32).collect(),
            mask: (0..128).map(|i| i >= 64).collect(),
        })
        .collect();
    let rows = [0, 1, 2, 3];
    let mut g = c.benchmark_group("tiny-model");
    g.sample_size(20);
    g.throughput(Throughput::Elements(4 * 128));
    g.bench_function("LoRA step, 4 x 128 tokens", |b| {
        b.iter(|| trainer.step(&examples, &rows, 0, 1e-4).expect("step"))
    });
    g.finish();
}

/// A frozen projection's product at SmolLM2's MLP shape for a 4 × 256 batch: f32 through
/// Candle (the gemm crate) against bf16 inputs with f32 accumulation (AVX-512 BF16 CPUs).
fn frozen_gemm(c: &mut Criterion) {
    use candle_core::{Device, Tensor};
    use emlab_kernels::bf16;
    let (m, k, n) = (1024usize, 576usize, 1536usize);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 480.0)
        .collect();
    let mut g = c.benchmark_group("frozen 1024x576x1536");
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    let at = Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap();
    let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
    g.bench_function("f32 candle", |b| {
        b.iter(|| at.matmul(&wt.t().unwrap()).unwrap())
    });
    if bf16::available() {
        let packed = bf16::PackedB::from_transposed(&w, n, k);
        let mut out = vec![0f32; m * n];
        g.bench_function("bf16", |b| b.iter(|| bf16::gemm(&a, &packed, &mut out)));
    }
    g.finish();
}

criterion_group!(benches, bench, frozen_gemm);
criterion_main!(benches);
