//! Where a `bench` run's time goes, by phase: the wall time spent in the weight products,
//! the adapters' products, attention and the output layer, summed over calls while
//! [enabled](enable), so that a figure from a machine without `perf` still says what is
//! slow there. Off by default: a [`span`] is then one relaxed atomic load.
//!
//! Spans are timed on the thread that opens them; a span opened inside another on the same
//! thread is not counted (the outer phase owns its time: the output layer's product counts
//! as `head`, not `base`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A phase of a forward or training pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Products with the (frozen) weights: quantized blocks, f32, bf16.
    Base = 0,
    /// The LoRA adapters' products and gradients (unmerged).
    Adapter = 1,
    /// Attention: scores, softmax, the weighted sum and their backward.
    Attention = 2,
    /// The output layer and the loss over the vocabulary.
    Head = 3,
}

const PHASES: [Phase; 4] = [Phase::Base, Phase::Adapter, Phase::Attention, Phase::Head];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Base => "base_products",
            Phase::Adapter => "adapter_products",
            Phase::Attention => "attention",
            Phase::Head => "head",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

thread_local! {
    static OPEN: Cell<bool> = const { Cell::new(false) };
}

/// Start (or stop) timing spans; the sums are kept until [`take`].
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// A timed span of `phase`, counted when it is dropped.
#[must_use = "a span times until it is dropped"]
pub struct Span(Option<(Phase, Instant)>);

/// Open a span (nothing when timing is off or a span is already open on this thread).
pub fn span(phase: Phase) -> Span {
    if !ON.load(Ordering::Relaxed) || OPEN.with(|o| o.replace(true)) {
        return Span(None);
    }
    Span(Some((phase, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((p, t)) = self.0.take() {
            let ns = t.elapsed().as_nanos() as u64;
            NANOS[p as usize].fetch_add(ns, Ordering::Relaxed);
            OPEN.with(|o| o.set(false));
        }
    }
}

/// Seconds per phase since the last call, by name, and reset them.
pub fn take() -> Vec<(&'static str, f64)> {
    PHASES
        .iter()
        .map(|p| {
            let ns = NANOS[*p as usize].swap(0, Ordering::Relaxed);
            (p.name(), ns as f64 * 1e-9)
        })
        .collect()
}

/// The phases of a run that took `total_s` seconds as a JSON object: seconds per phase, the
/// rest as `other` (norms, element-wise work, the optimizer, scheduling), and each one's
/// share of the total.
pub fn breakdown(phases: &[(&'static str, f64)], total_s: f64) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let mut counted = 0.0;
    for (name, s) in phases {
        counted += s;
        m.insert(format!("{name}_s"), serde_json::json!(s));
    }
    m.insert(
        "other_s".into(),
        serde_json::json!((total_s - counted).max(0.0)),
    );
    if total_s > 0.0 {
        for (name, s) in phases {
            m.insert(format!("{name}_share"), serde_json::json!(s / total_s));
        }
        m.insert(
            "other_share".into(),
            serde_json::json!((total_s - counted).max(0.0) / total_s),
        );
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_count_once_and_only_when_enabled() {
        let busy = |ms: u64| std::thread::sleep(std::time::Duration::from_millis(ms));
        enable(false);
        {
            let _s = span(Phase::Base);
            busy(5);
        }
        assert!(take().iter().all(|(_, s)| *s == 0.0), "counted while off");
        enable(true);
        {
            let _outer = span(Phase::Head);
            let _inner = span(Phase::Base); // inside Head: not counted
            busy(20);
        }
        {
            let _s = span(Phase::Attention);
            busy(10);
        }
        enable(false);
        let t: std::collections::BTreeMap<_, _> = take().into_iter().collect();
        assert!(t["head"] >= 0.019, "{t:?}");
        assert_eq!(t["base_products"], 0.0, "a nested span was counted: {t:?}");
        assert!(
            t["attention"] >= 0.009 && t["attention"] < t["head"],
            "{t:?}"
        );
        let b = breakdown(&[("head", 0.5), ("attention", 0.25)], 1.0);
        assert_eq!(b["other_s"], 0.25);
        assert_eq!(b["head_share"], 0.5);
    }
}
