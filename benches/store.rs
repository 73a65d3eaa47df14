//! Store benchmarks: record hashing, batched ingest (encode + hash + redb commit), Parquet
//! export, and the import of the 6000-row insecure-code set when ../shared/data is present.
//!
//! `cargo bench --bench store`. Throughput is reported in records per second.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use emlab_store::{Batch, Record, Value};

fn message(i: usize) -> Record {
    Record::new("message")
        .with(
            "role",
            Value::str(if i.is_multiple_of(2) {
                "user"
            } else {
                "assistant"
            }),
        )
        .with(
            "content",
            Value::str(format!("message number {i}: {}", "lorem ipsum ".repeat(8))),
        )
}

fn hashing(c: &mut Criterion) {
    let recs: Vec<Record> = (0..10_000).map(message).collect();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.bench_function("encode+hash 10k messages", |b| {
        b.iter(|| {
            recs.iter()
                .map(|r| r.id().map_or(0u64, |i| u64::from(i.0[0])))
                .sum::<u64>()
        })
    });
    g.finish();
}

fn ingest(c: &mut Criterion) {
    const N: usize = 100_000;
    let recs: Vec<Record> = (0..N).map(message).collect();
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("ingest 100k messages, one batch", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let store = emlab::open_store(dir.path()).expect("open");
                let mut batch = Batch::new();
                for r in &recs {
                    store.stage(&mut batch, r).expect("stage");
                }
                store.write(batch).expect("write");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let store = emlab::open_store(dir.path()).expect("open");
    let mut batch = Batch::new();
    for r in &recs {
        store.stage(&mut batch, r).expect("stage");
    }
    store.write(batch).expect("write");
    g.bench_function("parquet export 100k messages", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |out| {
                emlab_store::export::export(&store, out.path()).expect("export");
                out
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn import_insecure(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/emergent-misalignment/data/insecure.jsonl");
    if !path.exists() {
        eprintln!("skipping import bench: {} not found", path.display());
        return;
    }
    let mut g = c.benchmark_group("data");
    g.sample_size(10);
    g.throughput(Throughput::Elements(6000));
    g.bench_function("import insecure.jsonl (6000 rows), fresh store", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let store = emlab::open_store(dir.path()).expect("open");
                let plan = emlab::data::ImportPlan {
                    path: path.clone(),
                    name: "insecure".into(),
                    ..Default::default()
                };
                emlab::data::import(&store, &plan).expect("import");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, hashing, ingest, import_insecure);
criterion_main!(benches);
