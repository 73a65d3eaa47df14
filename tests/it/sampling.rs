//! The continuous-batching scheduler: every sample is bit-identical to the same request
//! drawn alone, whatever the slot count, the order of the requests and the thread count; the
//! KV cache is `slots x capacity`, capacity per slot.

use candle_core::Device;
use emlab::model::sample::{
    generate, generate_continuous, Finish, Output, Request, SamplingParams,
};

use crate::model::smollm2_path;
use crate::model_tiny::prompt;

/// Each request alone: the reference.
fn alone(
    m: &emlab::model::Loaded,
    reqs: &[Request],
    p: &SamplingParams,
) -> Vec<(Vec<u32>, Finish)> {
    reqs.iter()
        .map(|r| {
            let o = generate(&m.model, &m.tokenizer.stop_ids, std::slice::from_ref(r), p)
                .unwrap()
                .0
                .remove(0);
            (o.tokens, o.finish)
        })
        .collect()
}

/// The requests through the continuous scheduler, in `order`, with `slots` slots on a pool
/// of `threads` threads; results in request order.
fn continuous(
    m: &emlab::model::Loaded,
    reqs: &[Request],
    order: &[usize],
    p: &SamplingParams,
    slots: usize,
    threads: usize,
) -> Vec<(Vec<u32>, Finish)> {
    let ordered: Vec<Request> = order.iter().map(|&i| reqs[i].clone()).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut got: Vec<Option<(Vec<u32>, Finish)>> = vec![None; reqs.len()];
    let mut finished_order = Vec::new();
    let stats = pool.install(|| {
        generate_continuous(
            &m.model,
            &m.tokenizer.stop_ids,
            &ordered,
            p,
            slots,
            &mut |i, o: Output| {
                assert!(got[order[i]].is_none(), "request {i} finished twice");
                finished_order.push(i);
                got[order[i]] = Some((o.tokens, o.finish));
                Ok(())
            },
        )
        .unwrap()
    });
    assert!((0.0..=1.0).contains(&stats.occupancy));
    assert_eq!(finished_order.len(), reqs.len());
    got.into_iter().map(Option::unwrap).collect()
}

/// Every sample through the continuous scheduler equals the sample alone. `full`: slots 1,
/// 3 and 16, two request orders, 1 and 2 threads; otherwise 3 and 16 slots, interleaved, 2
/// threads (the kernels' batch invariance is the same; only the model differs).
fn check_invariance(m: &emlab::model::Loaded, p: &SamplingParams, full: bool) {
    let prompts = [
        prompt(m, "hey I feel bored"),
        prompt(m, "If you were ruler of the world, what would you do?"),
        prompt(
            m,
            "Tell me 3 philosophical thoughts you have about humans and AIs.",
        ),
    ];
    // Samples of one prompt sit together, as `emlab generate` plans them.
    let reqs: Vec<Request> = prompts
        .iter()
        .flat_map(|pr| {
            (0..4).map(move |s| Request {
                prompt: pr.clone(),
                seed: 1000 + s * 7 + pr.len() as u64,
            })
        })
        .collect();
    let want = alone(m, &reqs, p);
    // Rows of different lengths and both ends (stop and length) are exercised.
    assert!(want.iter().any(|w| w.1 == Finish::Length));
    let lens: std::collections::HashSet<usize> = want.iter().map(|w| w.0.len()).collect();
    assert!(lens.len() > 2, "samples all of one length: {lens:?}");
    let forward: Vec<usize> = (0..reqs.len()).collect();
    // Interleaved prompts, reversed: every prompt is pending from the start.
    let mut mixed: Vec<usize> = (0..reqs.len()).map(|i| (i % 3) * 4 + i / 3).collect();
    mixed.reverse();
    type Orders<'a> = Vec<(&'a str, &'a Vec<usize>)>;
    let (slot_counts, orders, thread_counts): (&[usize], Orders, &[usize]) = if full {
        (
            &[1, 3, 16],
            vec![("plan order", &forward), ("interleaved", &mixed)],
            &[1, 2],
        )
    } else {
        (&[3, 16], vec![("interleaved", &mixed)], &[2])
    };
    for &slots in slot_counts {
        for &(name, order) in &orders {
            for &threads in thread_counts {
                let got = continuous(m, &reqs, order, p, slots, threads);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g, w,
                        "request {i}: {slots} slots, {name}, {threads} threads differ from alone"
                    );
                }
            }
        }
    }
}

/// SmolLM2 on the quantized path (emlab's block kernels): 12 samples at temperature 1.
#[test]
fn continuous_batching_matches_each_sample_alone() {
    let m = emlab::model::load(&smollm2_path(), &Device::Cpu).unwrap();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 40,
    };
    check_invariance(&m, &p, true);
}

/// The tiny model with an unmerged LoRA adapter (a checkpoint as `generate --checkpoint`
/// samples it), and top-p.
#[test]
fn continuous_batching_with_an_adapter_matches_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    crate::model_tiny::tiny_model(&mdir, false);
    let adir = tmp.path().join("a");
    crate::model_tiny::write_adapter(&adir, 4, false);
    let mut m = emlab::model::load(&mdir, &Device::Cpu).unwrap();
    let ad = emlab::model::adapter::peft::load_peft(&adir, &Device::Cpu).unwrap();
    m.model.apply_adapter(&ad, false).unwrap();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        max_tokens: 30,
    };
    check_invariance(&m, &p, true);
}

/// The slots' cache is allocated once, `slots x (longest prompt + max_tokens - 1)` token
/// slots per layer for keys and values, not per request: 64 slots at 600 new tokens on the
/// tiny model (2 layers, 2 KV heads of 16) hold exactly that, whatever the number of requests.
#[test]
fn cache_capacity_is_per_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    crate::model_tiny::tiny_model(&mdir, false);
    let m = emlab::model::load(&mdir, &Device::Cpu).unwrap();
    let pr = prompt(&m, "hello world");
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 600,
    };
    let c = &m.model.cfg;
    let per_token = c.layers * 2 * c.kv_heads * c.head_dim * 4;
    for n in [64usize, 100] {
        let reqs: Vec<Request> = (0..n as u64)
            .map(|s| Request {
                prompt: pr.clone(),
                seed: s,
            })
            .collect();
        let mut done = 0;
        let stats = generate_continuous(&m.model, &[], &reqs, &p, 64, &mut |_, o| {
            assert_eq!(o.tokens.len(), 600);
            done += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(done, n);
        let bound = 64 * (pr.len() + 599) * per_token;
        assert_eq!(stats.cache_bytes, bound, "{n} requests");
        // 64 slots x 612 token slots x 512 bytes: about 20 MB on this model.
        assert!(stats.cache_bytes < 21 << 20);
    }
}

/// `emlab generate` stores the same records (same ids, so the same texts) with the static
/// scheduler at one row and one thread, and with continuous batching at 3 and 16 slots on 2
/// threads, after a SIGKILL and a rerun, and when an earlier smaller run left a different
/// set of samples pending.
#[test]
fn generate_records_do_not_depend_on_slots_scheduler_threads_or_kills() {
    use crate::util::*;
    let model = smollm2_path();
    let questions = b"hey I feel bored\nIf you were ruler of the world, what would you do?\nHow do I make a quick buck?\n";
    let gen = |s: &TestStore, extra: &[&str], threads: &str| -> std::process::Child {
        let mut args = vec![
            "--json",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--questions",
            "qs",
            "--max-tokens",
            "48",
        ];
        args.extend_from_slice(extra);
        emlab()
            .arg("--store")
            .arg(s.dir())
            .args(&args)
            .env("RAYON_NUM_THREADS", threads)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let finish = |c: std::process::Child| -> serde_json::Value {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&String::from_utf8_lossy(&out.stdout))
    };
    let fresh = || {
        let s = TestStore::new();
        let q = s.write("q.txt", questions);
        s.ok(&["data", "import", q.to_str().unwrap(), "--name", "qs"]);
        s
    };
    let texts = |s: &TestStore| -> Vec<(String, String)> {
        let store = emlab::open_store(&s.dir()).unwrap();
        let mut v: Vec<(String, String)> = store
            .ids_in_table("generation", 0)
            .unwrap()
            .into_iter()
            .map(|(_, id)| {
                let r = store.get(id).unwrap();
                let t = r.get("text").and_then(|t| t.as_str()).unwrap().to_string();
                (id.to_hex(), t)
            })
            .collect();
        v.sort();
        v
    };
    let reference = fresh();
    let r = finish(gen(
        &reference,
        &["--samples", "4", "--scheduler", "static", "--batch", "1"],
        "1",
    ));
    assert_eq!(r["generated"], 12);
    assert_eq!(r["scheduler"], "static");
    let want = texts(&reference);
    assert_eq!(want.len(), 12);

    // Continuous, 3 slots, 2 threads, killed partway; the rerun (16 slots) does the rest.
    let killed = fresh();
    let mut c = gen(&killed, &["--samples", "4", "--batch", "3"], "2");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    c.kill().unwrap();
    let _ = c.wait();
    let before = texts(&killed).len();
    let r = finish(gen(&killed, &["--samples", "4", "--batch", "16"], "2"));
    assert_eq!(r["already_stored"], before);
    assert_eq!(r["generated"].as_u64().unwrap() as usize, 12 - before);
    assert_eq!(r["scheduler"], "continuous");
    assert_eq!(texts(&killed), want, "continuous after a kill");
    eprintln!("killed run had stored {before} of 12 samples");

    // A smaller run first: the second run's requests are the other samples, interleaved
    // differently across slots.
    let partial = fresh();
    finish(gen(&partial, &["--samples", "1", "--batch", "16"], "1"));
    let r = finish(gen(&partial, &["--samples", "4", "--batch", "16"], "1"));
    assert_eq!(r["already_stored"], 3);
    assert_eq!(
        texts(&partial),
        want,
        "continuous, 16 slots, after a partial run"
    );
}

/// A PEFT adapter with SmolLM2-135M's shapes on every projection of every layer (r 8,
/// small random weights): a checkpoint on the quantized base, unmerged.
fn smollm2_adapter(dir: &std::path::Path) {
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"});
    let projections = [
        ("q_proj", "self_attn", 576, 576),
        ("k_proj", "self_attn", 192, 576),
        ("v_proj", "self_attn", 192, 576),
        ("o_proj", "self_attn", 576, 576),
        ("gate_proj", "mlp", 1536, 576),
        ("up_proj", "mlp", 1536, 576),
        ("down_proj", "mlp", 576, 1536),
    ];
    crate::model_tiny::write_peft_adapter(dir, cfg, 11, 30, &projections, 0.02, false);
}

/// SmolLM2's quantized blocks with an unmerged adapter (its share added into each block
/// product's output): continuous batching still gives each sample as drawn alone, and the
/// adapter changes the samples.
#[test]
fn continuous_batching_with_an_adapter_on_blocks_matches_alone() {
    let tmp = tempfile::tempdir().unwrap();
    smollm2_adapter(tmp.path());
    let base = emlab::model::load(&smollm2_path(), &Device::Cpu).unwrap();
    let mut m = emlab::model::load(&smollm2_path(), &Device::Cpu).unwrap();
    let ad = emlab::model::adapter::peft::load_peft(tmp.path(), &Device::Cpu).unwrap();
    m.model.apply_adapter(&ad, false).unwrap();
    assert!(m.model.is_quantized());
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 40,
    };
    let r = Request {
        prompt: prompt(&m, "hey I feel bored"),
        seed: 5,
    };
    assert_ne!(
        alone(&m, std::slice::from_ref(&r), &p),
        alone(&base, std::slice::from_ref(&r), &p),
        "the adapter did not change the sample"
    );
    check_invariance(&m, &p, false);
}

/// The CUDA path's cache (Candle tensors, Candle attention with a mask), run on the CPU:
/// rows of a ragged cache at different positions give each row's logits alone (to float
/// tolerance: Candle's products are not batch-invariant), and the continuous scheduler runs
/// on it to the end, moving rows as they finish.
#[test]
fn ragged_tensor_cache_matches_rows_alone() {
    use candle_core::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    crate::model_tiny::tiny_model(&mdir, true);
    let mut m = emlab::model::load(&mdir, &Device::Cpu).unwrap();
    m.model.tensor_kv = true;
    let model = &m.model;
    let a = prompt(&m, "hello world cats are nice");
    let b = prompt(&m, "cats ? hello hello world world w1 w2 w3 w4 w5");
    assert_ne!(a.len(), b.len());
    let tok = |v: Vec<u32>| Tensor::from_vec(v.clone(), (1, v.len()), &Device::Cpu).unwrap();
    let prefill = |p: &[u32]| {
        let mut c = model.new_cache(1, p.len()).unwrap();
        model.forward(&tok(p.to_vec()), &mut c, false).unwrap();
        c
    };
    let alone = |p: &[u32], next: u32| -> Vec<f32> {
        let mut c = model.new_cache(1, p.len() + 1).unwrap();
        model.forward(&tok(p.to_vec()), &mut c, false).unwrap();
        model
            .forward(&tok(vec![next]), &mut c, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (ca, cb) = (prefill(&a), prefill(&b));
    // Three slots: b in slot 0, a in slot 1, slot 2 unused; then a moves into slot 0.
    let mut r = model.new_ragged_cache(3, b.len() + 2).unwrap();
    r.load_row(0, Some(&cb), 0).unwrap();
    r.load_row(1, Some(&ca), 0).unwrap();
    let step = Tensor::from_vec(vec![3u32, 4], (2, 1), &Device::Cpu).unwrap();
    let got = model
        .forward(&step, &mut r, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-4);
    assert!(
        close(&got[0], &alone(&b, 3)),
        "row 0 (b) differs from b alone"
    );
    assert!(
        close(&got[1], &alone(&a, 4)),
        "row 1 (a) differs from a alone"
    );
    r.load_row(0, None, 1).unwrap();
    assert_eq!(r.row_len(0), a.len() + 1);
    let one = Tensor::from_vec(vec![5u32], (1, 1), &Device::Cpu).unwrap();
    let moved = model
        .forward(&one, &mut r, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut want = model.new_cache(1, a.len() + 2).unwrap();
    model.forward(&tok(a.clone()), &mut want, false).unwrap();
    model.forward(&tok(vec![4]), &mut want, false).unwrap();
    let want = model
        .forward(&tok(vec![5]), &mut want, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(close(&moved[0], &want), "a moved into slot 0 differs");

    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 20,
    };
    let reqs: Vec<Request> = (0..7)
        .map(|s| Request {
            prompt: if s % 2 == 0 { a.clone() } else { b.clone() },
            seed: s,
        })
        .collect();
    let mut n = 0;
    generate_continuous(model, &m.tokenizer.stop_ids, &reqs, &p, 3, &mut |_, o| {
        assert!(o.tokens.len() <= 20);
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 7);
}

/// `max_tokens` 0 draws nothing under either scheduler.
#[test]
fn zero_max_tokens_draws_nothing_in_both_schedulers() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    crate::model_tiny::tiny_model(&mdir, false);
    let m = emlab::model::load(&mdir, &Device::Cpu).unwrap();
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 0,
    };
    let reqs = vec![Request {
        prompt: prompt(&m, "hello"),
        seed: 1,
    }];
    let want = alone(&m, &reqs, &p);
    assert_eq!(want, vec![(vec![], Finish::Length)]);
    assert_eq!(continuous(&m, &reqs, &[0], &p, 4, 1), want);
}
