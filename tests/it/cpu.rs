//! `emlab cpu` and the machine every `bench` record names: the CPU model, its extensions and
//! the kernel path each family took, which `EMLAB_KERNELS` caps.

use crate::util::{emlab, json, TestStore};

fn cpu_json(level: Option<&str>) -> serde_json::Value {
    let mut c = emlab();
    c.args(["cpu", "--json"]);
    if let Some(l) = level {
        c.env("EMLAB_KERNELS", l);
    } else {
        c.env_remove("EMLAB_KERNELS");
    }
    let out = c.output().expect("spawn emlab");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn cpu_names_the_model_flags_and_paths_and_a_cap_lowers_them() {
    let auto = cpu_json(None);
    assert_eq!(auto["cpu"], emlab_kernels::cpu::model_name().as_str());
    assert_eq!(auto["requested"], "auto");
    assert_eq!(auto["kernels"]["level"], auto["best"]);
    let flags: Vec<&str> = auto["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    #[cfg(target_arch = "x86_64")]
    assert_eq!(flags.contains(&"avx2"), is_x86_feature_detected!("avx2"));
    let scalar = cpu_json(Some("scalar"));
    assert_eq!(scalar["kernels"]["quant"], "scalar");
    assert_eq!(scalar["kernels"]["f32"], "scalar");
    assert_eq!(scalar["kernels"]["bf16"], "none");
    assert_eq!(
        scalar["flags"], auto["flags"],
        "a cap changes the paths, not the flags"
    );
}

#[test]
fn a_bad_or_unrunnable_kernel_level_is_refused_by_name() {
    let s = TestStore::new();
    let bad = emlab()
        .env("EMLAB_KERNELS", "sse9")
        .arg("--store")
        .arg(s.dir())
        .args(["store", "stats"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("EMLAB_KERNELS=\"sse9\"") && err.contains("hint:"),
        "{err}"
    );
    let best = cpu_json(None)["best"].as_str().unwrap().to_string();
    let above = ["avx2", "avx512", "amx"]
        .into_iter()
        .find(|l| emlab_kernels::cpu::Level::parse(l) > emlab_kernels::cpu::Level::parse(&best));
    let Some(above) = above else {
        return emlab_kernels::testing::skip(
            "cpu::a_bad_or_unrunnable_kernel_level_is_refused_by_name (a level above the CPU's)",
            "this CPU runs every level",
        );
    };
    let out = emlab()
        .env("EMLAB_KERNELS", above)
        .arg("--store")
        .arg(s.dir())
        .args(["store", "stats"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("EMLAB_KERNELS={above}")) && err.contains(&best),
        "{err}"
    );
}

/// A bench record names the CPU and the paths that ran, as `emlab cpu` does, per cap.
#[test]
fn bench_records_name_the_cpu_and_the_kernel_paths() {
    let model = crate::model::smollm2_path();
    let model = model.to_str().unwrap();
    let s = TestStore::new();
    for level in [None, Some("avx2")] {
        let mut c = emlab();
        c.arg("--store").arg(s.dir()).args([
            "bench",
            "generate",
            "--model",
            model,
            "--prompt-len",
            "4",
            "--new-tokens",
            "2",
            "--json",
        ]);
        match level {
            Some(l)
                if emlab_kernels::cpu::features()
                    .has(emlab_kernels::cpu::Level::parse(l).unwrap()) =>
            {
                c.env("EMLAB_KERNELS", l);
            }
            Some(l) => {
                emlab_kernels::testing::skip_path(
                    "cpu::bench_records_name_the_cpu_and_the_kernel_paths",
                    l,
                    "not on this CPU",
                );
                continue;
            }
            None => {
                c.env_remove("EMLAB_KERNELS");
            }
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = json(&String::from_utf8_lossy(&out.stdout))["id"]
            .as_str()
            .unwrap()
            .to_string();
        let rec = json(&s.ok(&["show", &id]));
        let machine = &rec["fields"]["machine"];
        let want = cpu_json(level);
        assert_eq!(machine["cpu"], want["cpu"], "{rec}");
        assert_eq!(machine["kernels"], want["kernels"], "{rec}");
        assert_eq!(machine["flags"], want["flags"]);
        for part in ["prefill", "decode"] {
            assert_phases(&rec["fields"]["results"]["phases"][part], &rec);
        }
    }
}

/// A `phases` object of a bench record: every phase timed, the shares adding up.
fn assert_phases(p: &serde_json::Value, rec: &serde_json::Value) {
    let share = |k: &str| p[format!("{k}_share")].as_f64().unwrap_or(-1.0);
    for k in ["base_products", "attention", "head"] {
        assert!(
            p[format!("{k}_s")].as_f64().unwrap_or(0.0) > 0.0,
            "{k} untimed: {rec}"
        );
        assert!((0.0..=1.0).contains(&share(k)), "{k}: {rec}");
    }
    let sum: f64 = [
        "base_products",
        "adapter_products",
        "attention",
        "head",
        "other",
    ]
    .iter()
    .map(|k| share(k))
    .sum();
    assert!((0.99..1.3).contains(&sum), "shares add up to {sum}: {rec}");
}

/// `bench train` says where a step's time goes: weight and adapter products, attention, the
/// output layer, the rest.
#[test]
fn bench_train_records_time_by_phase() {
    let model = crate::model::smollm2_path();
    let s = TestStore::new();
    let out = s.ok(&[
        "--json",
        "bench",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--r",
        "4",
    ]);
    let rec = json(&s.ok(&["show", json(&out)["id"].as_str().unwrap()]));
    let p = &rec["fields"]["results"]["phases"];
    assert_phases(p, &rec);
    assert!(p["adapter_products_s"].as_f64().unwrap() > 0.0, "{rec}");
}
