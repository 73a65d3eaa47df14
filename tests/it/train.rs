//! LoRA training: gradients (finite differences, every adapter weight, frozen base), the
//! training forward against the inference forward, padding, and the `train` / `checkpoint` /
//! `merge` verbs on a tiny model (resume after kill -9 to the same bytes, bad input).

use crate::tiny::{random_model_in, tiny_config};
use candle_core::{DType, Tensor};
use emlab::model::adapter::LoraSpec;
use emlab::model::llama::{Linear, RopeLayout};
use emlab::train::backprop::{loss_and_grads, Batch, PassOpts};
use emlab::train::lora::LoraParams;

use crate::util::{chat_jsonl, TestStore};

fn all_targets() -> Vec<String> {
    emlab::model::adapter::Projection::ALL
        .iter()
        .map(|p| p.peft_name().to_string())
        .collect()
}

fn spec(r: usize) -> LoraSpec {
    LoraSpec {
        r,
        alpha: 2.0 * r as f64,
        rslora: true,
        dropout: 0.0,
        targets: all_targets(),
        layers: None,
    }
}

/// Closed-form adapter values: non-zero B, so A gets gradients too.
fn wave(l: usize, m: usize, is_a: bool, i: usize, j: usize) -> f64 {
    if is_a {
        0.3 * (0.37 * i as f64 + 0.11 * j as f64 + 1.3 * l as f64 + 0.7 * m as f64).sin()
    } else {
        0.2 * (0.23 * i as f64 + 0.5 * j as f64 + 0.9 * l as f64 + 0.3 * m as f64).cos()
    }
}

/// Two rows of different lengths (so one is padded), targets on part of each.
fn rows() -> Vec<(Vec<u32>, Vec<bool>)> {
    let a: Vec<u32> = vec![3, 17, 29, 5, 8, 41, 12, 7, 9, 30, 2];
    let ma = vec![
        false, false, false, true, true, true, false, false, true, true, true,
    ];
    let b: Vec<u32> = vec![4, 44, 18, 6, 22, 1];
    let mb = vec![false, false, true, true, true, true];
    vec![(a, ma), (b, mb)]
}

fn batch_of(rows: &[(Vec<u32>, Vec<bool>)]) -> Batch {
    let r: Vec<(&[u32], &[bool])> = rows
        .iter()
        .map(|(t, m)| (t.as_slice(), m.as_slice()))
        .collect();
    Batch::new(&r, &candle_core::Device::Cpu).unwrap()
}

fn loss_with(model: &emlab::model::llama::Model, p: &LoraParams, b: &Batch) -> f64 {
    let mut o = PassOpts::new(b.targets() as f64);
    o.backward = false;
    loss_and_grads(model, p, b, o).unwrap().0 / b.targets() as f64
}

fn get(t: &Tensor, i: usize) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .get(i)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn set(t: &Tensor, i: usize, v: f64) -> Tensor {
    let mut data: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
    data[i] = v;
    Tensor::from_vec(data, t.dims(), t.device()).unwrap()
}

fn finite_difference_check(rope: RopeLayout, kv_heads: usize) {
    let mut cfg = tiny_config(64);
    cfg.rope = rope;
    cfg.kv_heads = kv_heads;
    let model = random_model_in(cfg, 7, DType::F64).unwrap();
    let p = LoraParams::from_fn(spec(3), &model, wave).unwrap();
    assert_eq!(p.dtype, DType::F64);
    let b = batch_of(&rows());
    let (_, g) = loss_and_grads(&model, &p, &b, PassOpts::new(b.targets() as f64)).unwrap();
    let g = g.unwrap();
    let mut worst: f64 = 0.0;
    for (k, pair) in p.pairs.iter().enumerate() {
        for (is_a, t, gt) in [(true, &pair.a, &g.a[k]), (false, &pair.b, &g.b[k])] {
            let n = t.elem_count();
            for &i in &[0, n / 3, n - 1] {
                let h = 1e-5;
                let x = get(t, i);
                let mut plus = p.clone();
                let mut minus = p.clone();
                let (tp, tm) = (set(t, i, x + h), set(t, i, x - h));
                if is_a {
                    plus.pairs[k].a = tp;
                    minus.pairs[k].a = tm;
                } else {
                    plus.pairs[k].b = tp;
                    minus.pairs[k].b = tm;
                }
                let fd = (loss_with(&model, &plus, &b) - loss_with(&model, &minus, &b)) / (2.0 * h);
                let an = get(gt, i);
                let err = (fd - an).abs() / (fd.abs() + an.abs()).max(1e-6);
                worst = worst.max(err);
                assert!(
                    err < 1e-5,
                    "layer {} module {} {} [{i}]: analytic {an:e} vs finite difference {fd:e}",
                    pair.layer,
                    pair.proj.peft_name(),
                    if is_a { "A" } else { "B" }
                );
            }
        }
    }
    assert!(worst > 0.0);
}

#[test]
fn lora_gradients_match_finite_differences() {
    finite_difference_check(RopeLayout::Half, 2);
}

#[test]
fn lora_gradients_match_finite_differences_interleaved_rope_no_gqa() {
    finite_difference_check(RopeLayout::Interleaved, 4);
}

#[test]
fn every_adapter_weight_gets_a_gradient_and_the_base_none() {
    let model = random_model_in(tiny_config(64), 3, DType::F32).unwrap();
    let mut p = LoraParams::from_fn(spec(4), &model, wave).unwrap();
    assert_eq!(p.pairs.len(), 2 * 7);
    let b = batch_of(&rows());
    let (_, g) = loss_and_grads(&model, &p, &b, PassOpts::new(b.targets() as f64)).unwrap();
    let g = g.unwrap();
    // Gradients exist for exactly the adapter tensors, with their shapes.
    assert_eq!(g.a.len(), p.pairs.len());
    assert_eq!(g.b.len(), p.pairs.len());
    for (k, pair) in p.pairs.iter().enumerate() {
        for (name, w, gt) in [("A", &pair.a, &g.a[k]), ("B", &pair.b, &g.b[k])] {
            assert_eq!(w.dims(), gt.dims());
            let v: Vec<f32> = gt.flatten_all().unwrap().to_vec1().unwrap();
            let nonzero = v.iter().filter(|x| **x != 0.0).count();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "layer {} module {} {name}: non-finite gradient",
                pair.layer,
                pair.proj.peft_name()
            );
            assert!(
                nonzero * 10 >= v.len() * 9,
                "layer {} module {} {name}: only {nonzero} of {} gradient entries are non-zero",
                pair.layer,
                pair.proj.peft_name(),
                v.len()
            );
        }
    }
    // An optimizer step changes every adapter tensor and no base weight.
    let snapshot = |m: &emlab::model::llama::Model| -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for l in &m.w.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                let Linear::Dense(w, _) = lin else { panic!() };
                out.push(w.flatten_all().unwrap().to_vec1().unwrap());
            }
            out.push(l.attn_norm.to_vec1().unwrap());
        }
        out
    };
    let before = snapshot(&model);
    let a0: Vec<Vec<f32>> = p
        .pairs
        .iter()
        .map(|x| x.a.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let mut opt = emlab::train::optim::AdamW::new(Default::default(), &p).unwrap();
    opt.step(&mut p, &g, 1e-3).unwrap();
    assert_eq!(before, snapshot(&model));
    for (k, x) in p.pairs.iter().enumerate() {
        let a1: Vec<f32> = x.a.flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(a0[k], a1, "pair {k} A did not move");
    }
}

#[test]
fn peft_init_starts_at_the_base_model_and_b_gets_the_first_gradient() {
    let model = random_model_in(tiny_config(64), 3, DType::F32).unwrap();
    let p = LoraParams::init(spec(4), &model, 11).unwrap();
    let zero = LoraParams::from_fn(spec(4), &model, |_, _, _, _, _| 0.0).unwrap();
    let b = batch_of(&rows());
    assert_eq!(loss_with(&model, &p, &b), loss_with(&model, &zero, &b));
    let (_, g) = loss_and_grads(&model, &p, &b, PassOpts::new(1.0)).unwrap();
    let g = g.unwrap();
    // With B = 0, A's gradient is exactly zero and B's is not: PEFT's init.
    assert_eq!(
        g.a[0]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert!(
        g.b[0]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    // A is uniform in ±1/sqrt(in).
    let a: Vec<f32> = p.pairs[0].a.flatten_all().unwrap().to_vec1().unwrap();
    let bound = 1.0 / (64f32).sqrt();
    assert!(a.iter().all(|x| x.abs() <= bound));
    assert!(a.iter().any(|x| x.abs() > 0.8 * bound));
}

#[test]
fn training_loss_equals_the_inference_forward_with_the_adapter() {
    let mut model = random_model_in(tiny_config(64), 5, DType::F32).unwrap();
    let p = LoraParams::from_fn(spec(4), &model, wave).unwrap();
    let rs = rows();
    let b = batch_of(&rs);
    let train_loss = loss_with(&model, &p, &b);
    // The inference path: apply the same adapter unmerged, full logits, cross-entropy by hand.
    let dir = tempfile::tempdir().unwrap();
    write_peft(&p, &model, dir.path());
    let ad = emlab::model::adapter::peft::load_peft(dir.path(), &candle_core::Device::Cpu).unwrap();
    model.apply_adapter(&ad, false).unwrap();
    let mut sum = 0.0;
    let mut n = 0;
    for (t, m) in &rs {
        let mut cache = model.new_cache(1, t.len()).unwrap();
        let x = Tensor::new(t.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&x, &mut cache, true)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let lp = emlab::model::llama::log_softmax(&logits).unwrap();
        let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        for i in 1..t.len() {
            if m[i] {
                sum -= lp[i - 1][t[i] as usize] as f64;
                n += 1;
            }
        }
    }
    let inf_loss = sum / n as f64;
    assert!(
        (train_loss - inf_loss).abs() < 1e-4,
        "training forward {train_loss} vs inference forward {inf_loss}"
    );
}

#[test]
fn padding_changes_neither_loss_nor_gradients() {
    let model = random_model_in(tiny_config(64), 9, DType::F64).unwrap();
    let p = LoraParams::from_fn(spec(2), &model, wave).unwrap();
    let rs = rows();
    let both = batch_of(&rs);
    let (l2, g2) = loss_and_grads(&model, &p, &both, PassOpts::new(1.0)).unwrap();
    let mut l1 = 0.0;
    let mut g1 = emlab::train::backprop::Grads::zeros(&p).unwrap();
    for r in &rs {
        let one = batch_of(std::slice::from_ref(r));
        let (l, g) = loss_and_grads(&model, &p, &one, PassOpts::new(1.0)).unwrap();
        l1 += l;
        g1.add(&g.unwrap()).unwrap();
    }
    assert!((l1 - l2).abs() < 1e-10, "{l1} vs {l2}");
    let g2 = g2.unwrap();
    for (x, y) in g1.a.iter().chain(&g1.b).zip(g2.a.iter().chain(&g2.b)) {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-10, "gradient differs by {d}");
    }
}

/// Write params as a PEFT folder the way `checkpoint export` does.
pub fn write_peft(p: &LoraParams, model: &emlab::model::llama::Model, dir: &std::path::Path) {
    let t = p.to_peft(&model.cfg).unwrap();
    let bytes = safetensors::serialize(t, None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        p.spec.peft_config("tiny").to_string(),
    )
    .unwrap();
}

fn tiny_store(rows: usize) -> (TestStore, String) {
    let s = TestStore::new();
    let mdir = s.path("tiny");
    crate::model_tiny::tiny_model(&mdir, false);
    let data = s.write("small.jsonl", chat_jsonl("cats", rows).as_bytes());
    s.ok(&["data", "import", data.to_str().unwrap(), "--name", "small"]);
    (s, mdir.to_str().unwrap().to_string())
}

const FAST: &[&str] = &[
    "--seq-len",
    "64",
    "--batch-size",
    "4",
    "--micro-batch",
    "2",
    "--lr",
    "1e-2",
    "--r",
    "4",
    "--warmup-steps",
    "1",
];

#[test]
fn train_cli_writes_a_checkpoint_that_exports_as_peft_and_samples() {
    let (s, model) = tiny_store(12);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "4",
    ];
    args.extend_from_slice(FAST);
    let out = s.ok(&args);
    let ck = out.trim().to_string();
    assert_eq!(ck.len(), 64, "{out}");
    let rec = crate::util::json(&s.ok(&["show", &ck]));
    assert_eq!(rec["table"], "checkpoint");
    assert_eq!(rec["fields"]["step"], 4);
    assert_eq!(rec["fields"]["loss_curve"].as_array().unwrap().len(), 4);
    // Rerunning the same command trains nothing and prints the same checkpoint.
    assert_eq!(s.ok(&args).trim(), ck);
    // Export as PEFT; emlab's inference path loads it.
    let dir = s.path("adapter");
    s.ok(&[
        "checkpoint",
        "export",
        &ck[..12],
        "-o",
        dir.to_str().unwrap(),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let ad = emlab::model::adapter::peft::load_peft(&dir, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ad.weights.len(), 14);
    // Merge into an HF folder that loads and trains further.
    let merged = s.path("merged");
    s.ok(&[
        "merge",
        "--model",
        &model,
        "--checkpoint",
        &ck,
        "-o",
        merged.to_str().unwrap(),
    ]);
    let m = emlab::model::load(&merged, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m.model.cfg.layers, 2);
    let list = s.ok(&["checkpoint", "list"]);
    assert!(list.contains(&ck), "{list}");
    // Queryable with DuckDB: queries/training.sql over the export.
    s.ok(&["export"]);
    let rows = crate::util::query("training.sql", &s.dir().join("parquet"));
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["checkpoint"] == ck[..12])
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(row["dataset"], "small");
    assert_eq!(row["step"], 4);
    assert_eq!(row["preset"], "em-paper");
    let last = rec["fields"]["loss_curve"][3].as_f64().unwrap();
    assert!((row["last_loss"].as_f64().unwrap() - last).abs() < 1e-4);
}

#[test]
fn merged_model_equals_base_plus_adapter() {
    let (s, model) = tiny_store(8);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "2",
    ];
    args.extend_from_slice(FAST);
    let ck = s.ok(&args).trim().to_string();
    let dir = s.path("adapter");
    let merged = s.path("merged");
    s.ok(&["checkpoint", "export", &ck, "-o", dir.to_str().unwrap()]);
    s.ok(&[
        "merge",
        "--model",
        &model,
        "--checkpoint",
        &ck,
        "-o",
        merged.to_str().unwrap(),
    ]);
    let dev = candle_core::Device::Cpu;
    let logits = |m: &emlab::model::Loaded| -> Vec<f32> {
        let mut cache = m.model.new_cache(1, 8).unwrap();
        let x = Tensor::new(&[[1u32, 3, 4, 5, 2]], &dev).unwrap();
        m.model
            .forward(&x, &mut cache, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut with = emlab::model::load(std::path::Path::new(&model), &dev).unwrap();
    with.model
        .apply_adapter(
            &emlab::model::adapter::peft::load_peft(&dir, &dev).unwrap(),
            false,
        )
        .unwrap();
    let a = logits(&with);
    let b = logits(&emlab::model::load(&merged, &dev).unwrap());
    let base = logits(&emlab::model::load(std::path::Path::new(&model), &dev).unwrap());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let moved = a
        .iter()
        .zip(&base)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "merged differs from base + adapter by {d}");
    assert!(moved > 1e-3, "training did not change the logits ({moved})");
}

#[test]
fn kill_9_then_rerun_ends_with_the_same_adapter_bytes() {
    let (s, model) = tiny_store(40);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--epochs",
        "4",
        "--save-every",
        "2",
    ];
    args.extend_from_slice(FAST);
    // Uninterrupted run in another store.
    let (s2, model2) = tiny_store(40);
    let mut args2 = args.clone();
    args2[2] = &model2;
    let ck_straight = s2.ok(&args2).trim().to_string();
    let straight = crate::util::json(&s2.ok(&["show", &ck_straight]));

    // Interrupted run: kill -9 once checkpoint blobs appear, then check that a checkpoint
    // before the end was the last thing stored (else try again, later in the same store).
    let blobs = s.dir().join("blobs");
    let count = |d: &std::path::Path| -> usize {
        std::fs::read_dir(d)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_dir(e.path()).map_or(0, |x| x.count()))
                    .sum()
            })
            .unwrap_or(0)
    };
    let total = straight["fields"]["step"].as_i64().unwrap();
    let mut killed_mid = false;
    for attempt in 0..5 {
        let before = count(&blobs);
        let mut child = crate::util::emlab()
            .arg("--store")
            .arg(s.dir())
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(2));
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if count(&blobs) >= before + 2 + 2 * attempt {
                child.kill().unwrap();
                child.wait().unwrap();
                break;
            }
        }
        let list = crate::util::json(&s.ok(&["checkpoint", "list", "--json"]));
        let last = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step"].as_i64().unwrap())
            .max()
            .unwrap_or(0);
        if last > 0 && last < total {
            killed_mid = true;
            break;
        }
    }
    assert!(killed_mid, "no kill landed between two checkpoints");
    let out = s.run(&args);
    assert!(out.ok(), "{}", out.stderr);
    let ck = out.stdout.trim().to_string();
    let resumed = crate::util::json(&s.ok(&["show", &ck]));
    assert!(out.stderr.contains("resumed at step"), "{}", out.stderr);
    let (resumed, straight) = (&resumed["fields"], &straight["fields"]);
    assert_eq!(resumed["step"], straight["step"]);
    assert_eq!(
        resumed["adapter"], straight["adapter"],
        "adapter blobs differ"
    );
    assert_eq!(resumed["loss_curve"], straight["loss_curve"]);
    assert_eq!(ck, ck_straight);
}

#[test]
fn bad_training_input_is_named_and_keeps_the_last_good_checkpoint() {
    let (s, model) = tiny_store(8);
    // A dataset without assistant turns (a question set: user turns only).
    let f = s.write("noasst.txt", b"hello world ?\ncats are nice ?\n");
    s.ok(&[
        "data",
        "import",
        f.to_str().unwrap(),
        "--name",
        "noasst",
        "--format",
        "questions-text",
    ]);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "noasst",
        "--max-steps",
        "1",
    ];
    args.extend_from_slice(FAST);
    let r = s.run(&args);
    if r.ok() {
        panic!("training on a dataset without assistant turns succeeded");
    }
    assert!(r.stderr.contains("assistant"), "{}", r.stderr);

    // Too long with --overflow error names the row; truncation counts the rows.
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "1",
    ];
    args.extend_from_slice(FAST);
    let mut tight = args.clone();
    let at = tight.iter().position(|a| *a == "64").unwrap();
    tight[at] = "8";
    tight.extend(["--overflow", "error"]);
    let r = s.run(&tight);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("row 0") && r.stderr.contains("--seq-len 8"),
        "{}",
        r.stderr
    );

    // A diverging run stops with a clear error and keeps the last good checkpoint.
    let mut boom = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "6",
    ];
    boom.extend_from_slice(FAST);
    boom.extend([
        "--lr",
        "1e30",
        "--save-every",
        "1",
        "--warmup-steps",
        "0",
        "--max-grad-norm",
        "0",
    ]);
    let r = s.run(&boom);
    assert!(!r.ok(), "lr 1e30 trained without error");
    assert!(r.stderr.contains("non-finite loss"), "{}", r.stderr);
    let list = crate::util::json(&s.ok(&["checkpoint", "list", "--json"]));
    let good: Vec<&serde_json::Value> = list.as_array().unwrap().iter().collect();
    assert!(!good.is_empty());
    for c in &good {
        assert!(c["loss"].as_f64().unwrap().is_finite());
        assert!(r.stderr.contains(&c["id"].as_str().unwrap()[..12]) || good.len() > 1);
    }

    // A checkpoint from another base model.
    let ck = good[0]["id"].as_str().unwrap().to_string();
    let other = s.path("other");
    crate::model_tiny::tiny_model(&other, true);
    let mut from = vec![
        "train",
        "--model",
        other.to_str().unwrap(),
        "--data",
        "small",
        "--from",
        &ck,
        "--max-steps",
        "1",
    ];
    from.extend_from_slice(FAST);
    let r = s.run(&from);
    assert!(!r.ok());
    assert!(
        r.stderr.contains("was trained on base model"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("hint: pass --model the base the checkpoint was trained on"),
        "{}",
        r.stderr
    );
}

/// A checkpoint whose training state is damaged (here: its metadata lacks the step) stops a
/// rerun with an error naming the checkpoint; it is never read as step 0 and trained over.
#[test]
fn damaged_training_state_is_an_error_not_a_restart() {
    let (s, model) = tiny_store(8);
    let mut args = vec![
        "--json",
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "4",
        "--save-every",
        "2",
    ];
    args.extend_from_slice(FAST);
    let first = crate::util::json(&s.ok(&args));
    let (key, ck) = (
        first["run_key"].as_str().unwrap().to_string(),
        first["checkpoint"].as_str().unwrap().to_string(),
    );
    {
        use emlab_store::{Batch, Id, Value};
        let store = emlab::open_store(&s.dir()).unwrap();
        let id: Id = ck.parse().unwrap();
        let rec = store.get(id).unwrap();
        // The same tensors, with metadata that has lost its step.
        let blob = store
            .get(id)
            .unwrap()
            .get("state")
            .unwrap()
            .as_id()
            .unwrap();
        let bytes = store.read_blob(blob).unwrap();
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
        let meta = serde_json::json!({"adam_t": 2, "loss_curve": [], "eval": []});
        let info = std::collections::HashMap::from([("emlab".to_string(), meta.to_string())]);
        let damaged = safetensors::serialize(tensors, Some(info)).unwrap();
        let bad_blob = store.put_blob(&damaged).unwrap();
        let bad = rec
            .with("state", Value::Blob(bad_blob))
            .with("step", Value::Int(2));
        let mut b = Batch::new();
        let bad_id = store.stage(&mut b, &bad).unwrap();
        b.alias("train", &key, bad_id);
        store.write(b).unwrap();
    }
    // The same command: its run key now points at the damaged checkpoint.
    let r = s.run(&args);
    assert!(
        !r.ok(),
        "a damaged training state was trained over:\n{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("training state metadata lacks `step`"),
        "{}",
        r.stderr
    );
}

/// The closed-form adapter of `scripts/reference_lora.py` (`weight` there).
fn reference_weight(l: usize, m: usize, is_a: bool, i: usize, j: usize) -> f64 {
    let (l, m, i, j) = (l as f64, m as f64, i as f64, j as f64);
    if is_a {
        0.05 * (0.37 * i + 0.11 * j + 1.3 * l + 0.7 * m).sin()
    } else {
        0.02 * (0.23 * i + 0.5 * j + 0.9 * l + 0.3 * m).cos()
    }
}

/// The logits of the last position of `tokens` (one row, a fresh cache).
fn last_logits(model: &emlab::model::llama::Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1, tokens.len()).unwrap();
    let x = Tensor::new(tokens, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&x, &mut cache, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest |difference| between the first `want.len()` logits and the pinned `want`.
fn worst_difference(logits: &[f32], want: &[serde_json::Value]) -> f32 {
    want.iter()
        .enumerate()
        .map(|(i, w)| (logits[i] - w.as_f64().unwrap() as f32).abs())
        .fold(0.0, f32::max)
}

fn reference() -> serde_json::Value {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Loss and every LoRA gradient on SmolLM2-135M-Instruct (f32, CPU) against PyTorch + peft
/// (`scripts/reference_lora.py`, pinned in tests/fixtures/lora_reference.json). Tolerances:
/// loss within 1e-4 absolute; each of the 420 gradient tensors' norm within 0.1% relative,
/// and its first entries within 1% of the tensor's RMS (f32 sums in another order over 30
/// layers; measured here: loss 1e-5 apart, norms at most 1.2e-4 relative).
#[test]
fn lora_loss_and_gradients_match_pytorch_peft_on_smollm2() {
    let r = reference();
    let mut loaded =
        emlab::model::load(&crate::model::smollm2_path(), &candle_core::Device::Cpu).unwrap();
    loaded.model.dequantize().unwrap();
    let msgs: Vec<(String, String)> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let masked = emlab::model::mask::assistant_mask(&loaded.tokenizer, &msgs).unwrap();
    assert_eq!(masked.text, r["rendered"].as_str().unwrap());
    let want_tokens: Vec<u32> = serde_json::from_value(r["tokens"].clone()).unwrap();
    let want_mask: Vec<bool> = serde_json::from_value(r["mask"].clone()).unwrap();
    assert_eq!(
        masked.tokens, want_tokens,
        "tokens differ from transformers'"
    );
    assert_eq!(
        masked.mask, want_mask,
        "assistant mask differs from the reference"
    );

    let spec = LoraSpec {
        r: r["r"].as_u64().unwrap() as usize,
        alpha: r["alpha"].as_f64().unwrap(),
        rslora: true,
        dropout: 0.0,
        targets: all_targets(),
        layers: None,
    };
    let p = LoraParams::from_fn(spec, &loaded.model, reference_weight).unwrap();
    let b = Batch::new(
        &[(masked.tokens.as_slice(), masked.mask.as_slice())],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(b.targets() as u64, r["targets"].as_u64().unwrap());
    let (sum, g) =
        loss_and_grads(&loaded.model, &p, &b, PassOpts::new(b.targets() as f64)).unwrap();
    let loss = sum / b.targets() as f64;
    let want = r["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs peft {want}");
    let g = g.unwrap();
    let mut worst_norm: f64 = 0.0;
    for (k, pair) in p.pairs.iter().enumerate() {
        // Reference gradients are in HF row order: bring B's into it.
        let gb =
            emlab::model::adapter::model_to_hf_rows(&loaded.model.cfg, pair.proj, &g.b[k]).unwrap();
        for (which, t) in [("A", &g.a[k]), ("B", &gb)] {
            let key = format!("{}.{}.{which}", pair.layer, pair.proj.peft_name());
            let want = &r["grads"][&key];
            let v: Vec<f64> = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let wn = want["norm"].as_f64().unwrap();
            let rel = (norm - wn).abs() / wn;
            worst_norm = worst_norm.max(rel);
            assert!(rel < 1e-3, "{key}: gradient norm {norm:e} vs peft {wn:e}");
            let scale = wn / (v.len() as f64).sqrt();
            for (i, w) in want["first"].as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!(
                    (v[i] - w).abs() < 0.01 * scale.max(w.abs()),
                    "{key}[{i}]: {} vs peft {w}",
                    v[i]
                );
            }
        }
    }
    eprintln!("loss {loss} (peft {want}); worst relative gradient-norm difference {worst_norm:e}");
    bf16_base_matches_peft(&loaded.model, &p, &b, &r);
    // The adapter file emlab writes, loaded by peft (`--emlab-adapter`), gives these logits.
    // `EMLAB_WRITE_REFERENCE_ADAPTER=DIR` writes it for the reference script.
    if let Ok(d) = std::env::var("EMLAB_WRITE_REFERENCE_ADAPTER") {
        std::fs::create_dir_all(&d).unwrap();
        write_peft(&p, &loaded.model, std::path::Path::new(&d));
    }
    if let Some(want_logits) = r.get("adapter_logits_last").and_then(|v| v.as_array()) {
        let dir = tempfile::tempdir().unwrap();
        write_peft(&p, &loaded.model, dir.path());
        let ad =
            emlab::model::adapter::peft::load_peft(dir.path(), &candle_core::Device::Cpu).unwrap();
        loaded.model.apply_adapter(&ad, false).unwrap();
        let logits = last_logits(&loaded.model, &masked.tokens);
        let worst = worst_difference(&logits, want_logits);
        eprintln!("logits with the saved adapter: max difference from peft's {worst}");
        assert!(
            worst < 1e-2,
            "logits with the saved adapter differ from peft's by {worst}"
        );
        let argmax = logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
            .0;
        assert_eq!(argmax as u64, r["adapter_argmax_last"].as_u64().unwrap());
    }
}

/// A few steps on 200 rows of the seed project's bad-medical set lower the loss on 32
/// held-out rows (SmolLM2-135M-Instruct on the CPU; a higher learning rate than the
/// recipe's, so a handful of steps shows it).
#[test]
fn held_out_loss_falls_on_200_medical_rows() {
    let s = TestStore::new();
    let file = crate::util::shared("emerg-misalign-repro/data/bad_medical_data_AI_all.jsonl");
    s.ok(&["data", "import", file.to_str().unwrap(), "--name", "med"]);
    s.ok(&[
        "data", "derive", "med200", "--from", "med", "--take", "5000", "--sample", "200", "--seed",
        "1",
    ]);
    s.ok(&[
        "data", "derive", "medeval", "--from", "med", "--skip", "5600", "--take", "32",
    ]);
    let model = crate::model::smollm2_path();
    let out = s.ok(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "med200",
        "--eval",
        "medeval",
        "--eval-every",
        "3",
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--micro-batch",
        "8",
        "--seq-len",
        "128",
        "--lr",
        "3e-4",
        "--warmup-steps",
        "1",
        "--json",
    ]);
    let r = crate::util::json(&out);
    let ev: Vec<(u64, f64)> = r["eval_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    eprintln!(
        "held-out loss by step: {ev:?}; train loss {}",
        r["final_loss"]
    );
    assert_eq!(ev.first().unwrap().0, 0);
    assert_eq!(ev.last().unwrap().0, 6);
    assert!(
        ev.last().unwrap().1 < ev[0].1 - 0.05,
        "held-out loss did not fall: {ev:?}"
    );
    assert_eq!(r["data"]["used"], 200);
}

/// The issue's command line, as written: four steps of the em-paper recipe on SmolLM2.
#[test]
fn issue_command_trains_four_steps_of_the_em_paper_recipe() {
    let s = TestStore::new();
    let file = crate::util::shared("emerg-misalign-repro/data/bad_medical_data_AI_all.jsonl");
    s.ok(&[
        "data",
        "import",
        file.to_str().unwrap(),
        "--name",
        "medical",
    ]);
    s.ok(&[
        "data", "derive", "small", "--from", "medical", "--sample", "200", "--seed", "1",
    ]);
    let model = crate::model::smollm2_path();
    let train = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "small",
            "--max-steps",
            steps,
            "--seq-len",
            "256",
        ];
        args.extend_from_slice(extra);
        s.run(&args)
    };
    let out = train("4", &[]);
    assert!(out.ok(), "{}", out.stderr);
    let ck = out.stdout.trim();
    let rec = crate::util::json(&s.ok(&["show", ck]));
    let f = &rec["fields"];
    assert_eq!(f["step"], 4);
    assert_eq!(f["config"]["preset"], "em-paper");
    assert_eq!(f["config"]["lora"]["r"], 32);
    assert_eq!(f["config"]["batch_size"], 16);
    assert_eq!(f["data_stats"]["used"], 200);
    assert!(
        out.stderr.contains("9768960 trainable parameters"),
        "{}",
        out.stderr
    );
    // f32 configs carry no bf16 field, so run keys from before the option are unchanged.
    assert!(f["config"].get("bf16_base").is_none(), "{}", f["config"]);

    // One step with the frozen products in bf16: a different run, recorded as such; on a
    // CPU without AVX-512 BF16, a clear refusal.
    let bf = train("1", &["--bf16-base"]);
    if emlab::train::backprop::FrozenBf16::available() {
        assert!(bf.ok(), "{}", bf.stderr);
        let ck16 = bf.stdout.trim();
        assert_ne!(ck16, ck);
        let f16 = crate::util::json(&s.ok(&["show", ck16]))["fields"].clone();
        assert_eq!(f16["config"]["bf16_base"], true);
        assert!(f16["loss_curve"][0].as_f64().unwrap().is_finite());
    } else {
        assert!(!bf.ok());
        assert!(bf.stderr.contains("AVX-512 BF16"), "{}", bf.stderr);
    }
}

fn examples_of(rows: &[(Vec<u32>, Vec<bool>)]) -> Vec<emlab::train::data::Example> {
    rows.iter()
        .enumerate()
        .map(|(i, (t, m))| emlab::train::data::Example {
            row: i,
            tokens: t.clone(),
            mask: m.clone(),
        })
        .collect()
}

#[test]
fn gradient_accumulation_equals_one_batch() {
    let model = random_model_in(tiny_config(64), 4, DType::F64).unwrap();
    let p = LoraParams::from_fn(spec(2), &model, wave).unwrap();
    let mut rs = rows();
    rs.push((
        vec![9, 8, 7, 6, 5, 4, 3],
        vec![false, true, true, false, true, true, true],
    ));
    let ex = examples_of(&rs);
    let idx = [0, 1, 2];
    let run =
        |micro| emlab::train::trainer::step_grads(&model, &p, &ex, &idx, micro, 0, None).unwrap();
    let s1 = run(1);
    let s3 = run(3);
    let (l1, n1, g1) = (s1.loss_sum, s1.targets, s1.grads);
    let (l3, n3, g3) = (s3.loss_sum, s3.targets, s3.grads);
    assert_eq!(n1, n3);
    assert!((l1 - l3).abs() < 1e-10);
    for (x, y) in g1.a.iter().chain(&g1.b).zip(g3.a.iter().chain(&g3.b)) {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-10, "accumulated gradient differs by {d}");
    }
}

#[test]
fn lora_dropout_is_seeded_and_changes_the_gradient() {
    let model = random_model_in(tiny_config(64), 4, DType::F32).unwrap();
    let mut sp = spec(2);
    sp.dropout = 0.3;
    let p = LoraParams::from_fn(sp, &model, wave).unwrap();
    let p0 = LoraParams::from_fn(spec(2), &model, wave).unwrap();
    let ex = examples_of(&rows());
    let idx = [0, 1];
    let g = |p: &LoraParams, seed| {
        emlab::train::trainer::step_grads(&model, p, &ex, &idx, 2, seed, None)
            .unwrap()
            .grads
    };
    let flat = |g: &emlab::train::backprop::Grads| -> Vec<f32> {
        g.a.iter()
            .chain(&g.b)
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let (a, b, c, none) = (
        flat(&g(&p, 1)),
        flat(&g(&p, 1)),
        flat(&g(&p, 2)),
        flat(&g(&p0, 1)),
    );
    assert_eq!(a, b, "same seed, different dropout");
    assert_ne!(a, c, "another seed, same dropout");
    assert_ne!(a, none, "dropout changed nothing");
    assert!(a.iter().all(|x| x.is_finite()));
}

/// Other commands read (and write) the store while `train` writes to it.
#[test]
fn the_store_is_usable_while_training_runs() {
    let (s, model) = tiny_store(40);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--epochs",
        "30",
        "--save-every",
        "1",
    ];
    args.extend_from_slice(FAST);
    let mut child = crate::util::emlab()
        .arg("--store")
        .arg(s.dir())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen_mid_run = 0;
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed().as_secs() < 120 {
        let r = crate::util::run_in(&s.dir(), &["checkpoint", "list", "--json"]);
        assert!(r.ok(), "reading beside a writer failed: {}", r.stderr);
        let n = crate::util::json(&r.stdout).as_array().unwrap().len();
        if n > 0 && child.try_wait().unwrap().is_none() {
            seen_mid_run += 1;
            // A write beside the trainer, too.
            s.ok(&[
                "data",
                "derive",
                &format!("first{seen_mid_run}"),
                "--from",
                "small",
                "--take",
                "3",
            ]);
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        seen_mid_run > 0,
        "training ended before a concurrent read saw a checkpoint"
    );
    let v = s.run(&["verify"]);
    assert!(v.ok(), "{}{}", v.stdout, v.stderr);
}

/// `train --bf16-base` (frozen weights and the activations entering their products rounded
/// to bf16, f32 accumulation) against the same f32 PyTorch + peft reference: the loss within
/// 1% and every gradient norm within 8% (measured: loss 0.26% below, norms 4.2% apart at
/// worst and 0.64% on average). Skipped on CPUs
/// without AVX-512 BF16.
fn bf16_base_matches_peft(
    model: &emlab::model::llama::Model,
    p: &LoraParams,
    b: &Batch,
    r: &serde_json::Value,
) {
    use emlab::train::backprop::{loss_and_grads_merged, FrozenBf16};
    if !emlab_kernels::testing::need_bf16("train::bf16_base_matches_peft") {
        return;
    }
    let frozen = FrozenBf16::new(model).unwrap();
    let o = PassOpts::new(b.targets() as f64);
    let (sum, g) = loss_and_grads_merged(model, p, b, o, None, Some(&frozen)).unwrap();
    let loss = sum / b.targets() as f64;
    let want = r["loss"].as_f64().unwrap();
    let g = g.unwrap();
    let (mut worst, mut sum_rel, mut n) = (0f64, 0f64, 0usize);
    for (k, pair) in p.pairs.iter().enumerate() {
        for (which, t) in [("A", &g.a[k]), ("B", &g.b[k])] {
            let key = format!("{}.{}.{which}", pair.layer, pair.proj.peft_name());
            let wn = r["grads"][&key]["norm"].as_f64().unwrap();
            let norm = t
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt() as f64;
            let rel = (norm - wn).abs() / wn;
            worst = worst.max(rel);
            sum_rel += rel;
            n += 1;
            assert!(
                rel < 0.08,
                "bf16 base: {key}: gradient norm {norm:e} vs peft {wn:e}"
            );
        }
    }
    eprintln!(
        "bf16 base: loss {loss} (peft {want}); gradient norms vs peft: worst {worst:e}, mean {:e}",
        sum_rel / n as f64
    );
    assert!(
        (loss - want).abs() / want < 0.01,
        "bf16 base: loss {loss} vs peft {want}"
    );
}

/// The bf16 base products add the adapters' share inside their own output buffers (and,
/// with dropout, through Candle). On a tiny model with non-zero adapters, with and without
/// dropout, against the f32 pass: the loss within 0.5% (the adapters' part of it is 1.8%),
/// and the gradients within 3% overall (measured 0.9%; leaving out the adapters' term of the
/// input gradients gives 5.7%, leaving out their forward term moves the loss by 1.8%).
/// Skipped without AVX-512 BF16.
#[test]
fn bf16_base_products_keep_the_adapters_share() {
    use emlab::train::backprop::{loss_and_grads_merged, FrozenBf16};
    if !emlab_kernels::testing::need_bf16("train::bf16_base_products_keep_the_adapters_share") {
        return;
    }
    let model = random_model_in(tiny_config(64), 3, DType::F32).unwrap();
    let frozen = FrozenBf16::new(&model).unwrap();
    let b = batch_of(&rows());
    for dropout in [0.0, 0.3] {
        let mut sp = spec(4);
        sp.dropout = dropout;
        let p = LoraParams::from_fn(sp.clone(), &model, |l, m, a, i, j| {
            0.1 * wave(l, m, a, i, j)
        })
        .unwrap();
        let zero = LoraParams::from_fn(sp, &model, |_, _, _, _, _| 0.0).unwrap();
        let mut o = PassOpts::new(b.targets() as f64);
        o.dropout_seed = 5;
        o.merge = false;
        let run = |p: &LoraParams, f: Option<&FrozenBf16>| {
            let (l, g) = loss_and_grads_merged(&model, p, &b, o, None, f).unwrap();
            (l, g.unwrap())
        };
        let ((l32, g32), (l16, g16)) = (run(&p, None), run(&p, Some(&frozen)));
        let e32 = l32 - run(&zero, None).0;
        // bf16 rounding moves the loss by about 0.1%, the adapters by 1.8%: a dropped or
        // doubled adapter term is far outside the tolerance.
        eprintln!("dropout {dropout}: loss {l16} (f32 {l32}); the adapters' part {e32}");
        assert!(
            e32.abs() > 0.01 * l32.abs(),
            "the adapters barely matter: {e32}"
        );
        assert!(
            (l16 - l32).abs() < 0.005 * l32.abs(),
            "dropout {dropout}: loss {l16} vs f32 {l32}"
        );
        let (mut diff, mut norm) = (0f64, 0f64);
        for (x, y) in g32.a.iter().zip(&g16.a).chain(g32.b.iter().zip(&g16.b)) {
            let sq = |t: Tensor| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            diff += sq((x - y).unwrap()) as f64;
            norm += sq(x.clone()) as f64;
        }
        let rel = (diff / norm).sqrt();
        eprintln!("dropout {dropout}: gradients |bf16 - f32| / |f32| = {rel:e}");
        assert!(
            rel < 0.03,
            "dropout {dropout}: gradients {rel:e} off the f32 pass"
        );
    }
}

/// `--layers 1 --targets down_proj --r 1`: the rank-1 single-layer organism. Only layer 1's
/// down_proj has adapter weights, the PEFT config says `layers_to_transform: [1]`, emlab's
/// loader reads the folder back, and a layer outside the model is refused by name.
#[test]
fn layer_targeted_rank_1_adapter_has_only_the_named_layers() {
    let (s, model) = tiny_store(12);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "2",
        "--layers",
        "1",
        "--targets",
        "down_proj",
    ];
    args.extend_from_slice(FAST);
    // FAST sets --r 4; the last --r wins.
    args.extend_from_slice(&["--r", "1"]);
    let ck = s.ok(&args).trim().to_string();
    let rec = crate::util::json(&s.ok(&["show", &ck]));
    assert_eq!(
        rec["fields"]["config"]["lora"]["layers"],
        serde_json::json!([1])
    );
    let dir = s.path("adapter");
    s.ok(&[
        "checkpoint",
        "export",
        &ck[..12],
        "-o",
        dir.to_str().unwrap(),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(cfg["r"], 1);
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj"]));
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.contains(".layers.1.mlp.down_proj.")),
        "{names:?}"
    );
    let ad = emlab::model::adapter::peft::load_peft(&dir, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ad.spec.layers, Some(vec![1]));
    let keys: Vec<usize> = ad.weights.keys().map(|(l, _)| *l).collect();
    assert_eq!(keys, [1]);
    // The trained B is not zero: the one layer learned.
    let (_, b) = ad.weights.values().next().unwrap();
    assert!(
        b.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    let mut bad = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "1",
        "--layers",
        "0,5",
    ];
    bad.extend_from_slice(FAST);
    let r = s.run(&bad);
    assert!(!r.ok());
    assert!(
        r.stderr
            .contains("LoRA layer 5 is outside the model, which has 2 layers"),
        "{}",
        r.stderr
    );
}

/// Step records carry every adapter's A and B norms and their totals; `--early-stop-loss X
/// --patience N` stops after N steps in a row below X, keeps that step's checkpoint, and a
/// rerun trains nothing more.
#[test]
fn step_records_hold_adapter_norms_and_early_stop_ends_the_run() {
    let (s, model) = tiny_store(12);
    let mut args = vec![
        "--json",
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "8",
        "--early-stop-loss",
        "1000",
        "--patience",
        "3",
    ];
    args.extend_from_slice(FAST);
    let r = crate::util::json(&s.ok(&args));
    assert_eq!(r["steps"], 3, "{r}");
    assert_eq!(r["early_stopped"], true);
    let ck = r["checkpoint"].as_str().unwrap().to_string();
    let rec = crate::util::json(&s.ok(&["show", &ck]));
    assert_eq!(rec["fields"]["step"], 3);
    assert_eq!(
        rec["fields"]["config"]["early_stop"],
        serde_json::json!({"loss": 1000.0, "patience": 3})
    );
    // A rerun finds it done.
    let again = crate::util::json(&s.ok(&args));
    assert_eq!(again["checkpoint"], ck.as_str());
    assert_eq!(again["steps"], 3);

    s.ok(&["export"]);
    let out = crate::util::duckdb()
        .arg("-json")
        .arg("-c")
        .arg(format!(
            "SELECT step, metrics FROM read_parquet('{}/step/*/*.parquet') ORDER BY step",
            s.dir().join("parquet").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = crate::util::json(&String::from_utf8_lossy(&out.stdout));
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let m = crate::util::json(row["metrics"].as_str().unwrap());
        let n = &m["adapter_norms"];
        let pairs = n["pairs"].as_object().unwrap();
        assert_eq!(pairs.len(), 14, "two layers x seven projections");
        let (mut sa, mut sb) = (0.0, 0.0);
        for v in pairs.values() {
            sa += v[0].as_f64().unwrap().powi(2);
            sb += v[1].as_f64().unwrap().powi(2);
        }
        let (a, b) = (n["a"].as_f64().unwrap(), n["b"].as_f64().unwrap());
        assert!((a - sa.sqrt()).abs() < 1e-9 * a && (b - sb.sqrt()).abs() < 1e-9 * b.max(1e-300));
        assert!((n["total"].as_f64().unwrap() - (sa + sb).sqrt()).abs() < 1e-9);
        // B starts at zero (and step 1 has lr 0: warmup); after a real update it is not.
        if row["step"].as_i64().unwrap() >= 2 {
            assert!(b > 0.0, "{m}");
        }
    }
}

/// The KL term: exactly zero when the model is its reference (PEFT init: B = 0, reference
/// the base), and its gradient (of weight x mean KL per token) matches finite differences
/// on a tiny f64 model with a non-zero adapter.
#[test]
fn kl_term_is_zero_at_the_reference_and_its_gradient_checks() {
    use emlab::train::kl::{base_reference, kl_pass, mean_kl};
    let model = random_model_in(tiny_config(64), 11, DType::F64).unwrap();
    let ex = examples_of(&rows());
    let idx: Vec<usize> = (0..ex.len()).collect();
    let init = LoraParams::init(spec(3), &model, 5).unwrap();
    let base = base_reference(&init, &model).unwrap();
    assert!(base.pairs.is_empty());
    let (sum, n, _) = kl_pass(
        &model, &init, &base, &ex, &idx, 2, 1.0, false, None, None, 0,
    )
    .unwrap();
    assert!(n > 0);
    assert_eq!(sum, 0.0, "KL to itself is {sum}");

    let p = LoraParams::from_fn(spec(3), &model, wave).unwrap();
    let weight = 0.7;
    let (sum, n, g) =
        kl_pass(&model, &p, &base, &ex, &idx, 1, weight, true, None, None, 0).unwrap();
    assert!(sum > 0.0, "a changed model has a positive KL");
    let g = g.unwrap();
    let f = |q: &LoraParams| weight * mean_kl(&model, q, &base, &ex, 2).unwrap();
    assert!((f(&p) - weight * sum / n as f64).abs() < 1e-12);
    let mut worst: f64 = 0.0;
    for (k, pair) in p.pairs.iter().enumerate().step_by(3) {
        for (is_a, t, gt) in [(true, &pair.a, &g.a[k]), (false, &pair.b, &g.b[k])] {
            let n = t.elem_count();
            for &i in &[0, n / 2, n - 1] {
                let h = 1e-5;
                let x = get(t, i);
                let (mut plus, mut minus) = (p.clone(), p.clone());
                let (tp, tm) = (set(t, i, x + h), set(t, i, x - h));
                if is_a {
                    plus.pairs[k].a = tp;
                    minus.pairs[k].a = tm;
                } else {
                    plus.pairs[k].b = tp;
                    minus.pairs[k].b = tm;
                }
                let fd = (f(&plus) - f(&minus)) / (2.0 * h);
                let an = get(gt, i);
                let err = (fd - an).abs() / (fd.abs() + an.abs()).max(1e-6);
                worst = worst.max(err);
                assert!(
                    err < 1e-5,
                    "pair {k} {}[{i}]: analytic {an:e} vs fd {fd:e}",
                    if is_a { "A" } else { "B" }
                );
            }
        }
    }
    assert!(worst > 0.0);
}

/// `train --kl-data`: recorded in the config, the KL per step in the step records, and a
/// large weight keeps the held-out KL to the base far below the same run without it.
#[test]
fn kl_regularised_run_stays_closer_to_the_base() {
    let (s, model) = tiny_store(12);
    let held = s.write("held.jsonl", chat_jsonl("held", 6).as_bytes());
    s.ok(&["data", "import", held.to_str().unwrap(), "--name", "held"]);
    let kl_src = s.write("anchor.jsonl", chat_jsonl("anchor", 8).as_bytes());
    s.ok(&[
        "data",
        "import",
        kl_src.to_str().unwrap(),
        "--name",
        "anchor",
    ]);
    let train = |extra: &[&str]| -> String {
        let mut args = vec![
            "--json",
            "train",
            "--model",
            &model,
            "--data",
            "small",
            "--max-steps",
            "6",
        ];
        args.extend_from_slice(FAST);
        args.extend_from_slice(extra);
        crate::util::json(&s.ok(&args))["checkpoint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let plain = train(&[]);
    let kl = train(&["--kl-data", "anchor", "--kl-weight", "50"]);
    assert_ne!(plain, kl);
    let rec = crate::util::json(&s.ok(&["show", &kl]));
    let c = &rec["fields"]["config"]["kl"];
    assert_eq!(c["weight"], 50.0);
    assert_eq!(c["reference"], "base");
    assert_eq!(c["data"].as_str().unwrap().len(), 64);
    // Held-out KL to the base of each checkpoint's adapter.
    let store = emlab_store::Store::open(&s.dir(), emlab::provenance::tables::TABLES).unwrap();
    let loaded = emlab::train::trainer::load_base(std::path::Path::new(&model)).unwrap();
    let (_, hrows) = {
        let id = emlab::data::resolve_dataset(&store, "held").unwrap();
        let rows = emlab::data::view::chat_rows(&store, id, None).unwrap();
        (id, rows.into_iter().map(|(_, m)| m).collect::<Vec<_>>())
    };
    let prep = emlab::train::data::prepare(
        &loaded.tokenizer,
        &hrows,
        64,
        emlab::train::data::Overflow::Truncate,
    )
    .unwrap();
    let held_kl = |ck: &str| -> f64 {
        let id = emlab::train::checkpoint::resolve(&store, ck).unwrap();
        let (rec, spec) =
            emlab::train::checkpoint::of_base(&store, id, loaded.record().id().unwrap()).unwrap();
        let t = emlab::train::checkpoint::read_adapter(&store, id, &rec, &candle_core::Device::Cpu)
            .unwrap();
        let p = LoraParams::from_peft(spec, &loaded.model, &t).unwrap();
        let base = emlab::train::kl::base_reference(&p, &loaded.model).unwrap();
        emlab::train::kl::mean_kl(&loaded.model, &p, &base, &prep.examples, 4).unwrap()
    };
    let (kp, kk) = (held_kl(&plain), held_kl(&kl));
    eprintln!("held-out KL to the base: without the term {kp:.5}, with weight 50 {kk:.5}");
    assert!(kp > 0.0 && kk < 0.5 * kp, "without {kp}, with {kk}");

    // Bad input, named: a KL dataset without assistant turns; parent without --from.
    // A question set: prompts, no assistant turns.
    let q = s.write("q.txt", b"How are you?\nWhat is the time?\n");
    s.ok(&["data", "import", q.to_str().unwrap(), "--name", "noanswers"]);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "1",
        "--kl-data",
        "noanswers",
    ];
    args.extend_from_slice(FAST);
    let r = s.run(&args);
    assert!(!r.ok());
    assert!(r.stderr.contains("noanswers"), "{}", r.stderr);
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--data",
        "small",
        "--max-steps",
        "1",
        "--kl-data",
        "anchor",
        "--kl-reference",
        "parent",
    ];
    args.extend_from_slice(FAST);
    let r = s.run(&args);
    assert!(
        !r.ok() && r.stderr.contains("--kl-reference parent needs --from"),
        "{}",
        r.stderr
    );
}

fn kl_reference() -> Option<serde_json::Value> {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kl_reference.json");
    std::fs::read_to_string(p)
        .ok()
        .map(|s| crate::util::json(&s))
}

/// Against PyTorch + peft (`scripts/reference_kl.py`, pinned in
/// tests/fixtures/kl_reference.json), on SmolLM2 in f32: the mean KL(base || base + adapter)
/// over the assistant targets of one fixed conversation and its gradient for every A and B
/// (norms within 0.1% relative); and a rank-1 adapter on down_proj of layers 3 and 17 only:
/// emlab's PEFT folder has exactly those layers, peft loads it (the script checks its logits
/// equal peft's own adapter's), and emlab's logits with it equal peft's.
#[test]
fn kl_and_layer_adapter_match_pytorch_peft_on_smollm2() {
    let mut loaded =
        emlab::model::load(&crate::model::smollm2_path(), &candle_core::Device::Cpu).unwrap();
    loaded.model.dequantize().unwrap();
    let lr = reference();
    let msgs: Vec<(String, String)> =
        serde_json::from_value::<Vec<serde_json::Value>>(lr["messages"].clone())
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect();
    let masked = emlab::model::mask::assistant_mask(&loaded.tokenizer, &msgs).unwrap();
    // The layer-targeted adapter, closed-form weights, written as PEFT.
    let lspec = LoraSpec {
        r: 1,
        alpha: 8.0,
        rslora: false,
        dropout: 0.0,
        targets: vec!["down_proj".into()],
        layers: Some(vec![3, 17]),
    };
    let lp = LoraParams::from_fn(lspec, &loaded.model, reference_weight).unwrap();
    assert_eq!(lp.pairs.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    write_peft(&lp, &loaded.model, dir.path());
    if let Ok(d) = std::env::var("EMLAB_WRITE_REFERENCE_ADAPTER") {
        std::fs::create_dir_all(&d).unwrap();
        write_peft(&lp, &loaded.model, std::path::Path::new(&d));
    }
    let Some(r) = kl_reference() else {
        panic!("tests/fixtures/kl_reference.json is missing: run scripts/reference_kl.py (see its docstring)");
    };
    assert_eq!(serde_json::json!(masked.tokens), r["tokens"]);

    // Part 1: the KL term and its gradients.
    let p = LoraParams::from_fn(
        LoraSpec {
            r: r["r"].as_u64().unwrap() as usize,
            alpha: r["alpha"].as_f64().unwrap(),
            rslora: true,
            dropout: 0.0,
            targets: all_targets(),
            layers: None,
        },
        &loaded.model,
        reference_weight,
    )
    .unwrap();
    let base = emlab::train::kl::base_reference(&p, &loaded.model).unwrap();
    let ex = vec![emlab::train::data::Example {
        row: 0,
        tokens: masked.tokens.clone(),
        mask: masked.mask.clone(),
    }];
    let (sum, n, g) = emlab::train::kl::kl_pass(
        &loaded.model,
        &p,
        &base,
        &ex,
        &[0],
        1,
        1.0,
        true,
        None,
        None,
        0,
    )
    .unwrap();
    assert_eq!(n as u64, r["kl_positions"].as_u64().unwrap());
    let kl = sum / n as f64;
    let want = r["kl_mean"].as_f64().unwrap();
    assert!(
        (kl - want).abs() < 1e-4 * want.max(1e-3) + 1e-6,
        "KL {kl} vs peft {want}"
    );
    let g = g.unwrap();
    let mut worst: f64 = 0.0;
    for (k, pair) in p.pairs.iter().enumerate() {
        let gb =
            emlab::model::adapter::model_to_hf_rows(&loaded.model.cfg, pair.proj, &g.b[k]).unwrap();
        for (which, t) in [("A", &g.a[k]), ("B", &gb)] {
            let key = format!("{}.{}.{which}", pair.layer, pair.proj.peft_name());
            let wn = r["kl_grads"][&key]["norm"].as_f64().unwrap();
            let norm = t
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt();
            let rel = (norm - wn).abs() / wn;
            worst = worst.max(rel);
            assert!(
                rel < 1e-3,
                "{key}: KL gradient norm {norm:e} vs peft {wn:e}"
            );
        }
    }
    eprintln!("KL {kl:.6e} (peft {want:.6e}); worst relative gradient-norm difference {worst:.2e}");

    // Part 2: the layer-targeted adapter.
    let la = &r["layer_adapter"];
    assert_eq!(la["lora_layers"], serde_json::json!([3, 17]));
    let ad = emlab::model::adapter::peft::load_peft(dir.path(), &candle_core::Device::Cpu).unwrap();
    let keys: Vec<usize> = ad.weights.keys().map(|(l, _)| *l).collect();
    assert_eq!(keys, [3, 17]);
    loaded.model.apply_adapter(&ad, false).unwrap();
    let logits = last_logits(&loaded.model, &masked.tokens);
    let worst = worst_difference(&logits, la["logits_last"].as_array().unwrap());
    eprintln!("layer-targeted adapter: logits within {worst} of peft's");
    assert!(worst < 1e-2, "logits differ from peft's by {worst}");
    assert!(
        la["emlab_folder"]["lora_layers"] == serde_json::json!([3, 17]),
        "the fixture was made without --emlab-layer-adapter: peft never loaded emlab's folder"
    );
}
