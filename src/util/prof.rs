//! Where a `bench` run's time goes, by phase: the wall time spent in the weight products,
//! the adapters' products, attention and the output layer, summed over calls while
//! [enabled](enable), so that a figure from a machine without `perf` still says what is
//! slow there. Off by default: a [`span`] is then one relaxed atomic load.
//!
//! Spans are timed on the thread that opens them; a span opened inside another on the same
//! thread is not counted (the outer phase owns its time: the output layer's product counts
//! as `head`, not `base`). Spans opened while a [`prefill`] guard lives are summed apart, so
//! that sampling's prompt prefill and its decoding are told apart.

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
/// Nanoseconds per phase: `[0]` outside prompt prefill, `[1]` within it.
static NANOS: [[AtomicU64; 4]; 2] = [const { [const { AtomicU64::new(0) }; 4] }; 2];

thread_local! {
    static OPEN: Cell<bool> = const { Cell::new(false) };
    static PREFILL: Cell<bool> = const { Cell::new(false) };
}

/// While the guard lives, this thread's spans count as prompt prefill (see [`take`]).
#[must_use = "the prefill lasts until the guard is dropped"]
pub struct Prefill(bool);

/// Mark this thread's work as prompt prefill until the guard is dropped.
pub fn prefill() -> Prefill {
    Prefill(PREFILL.with(|p| p.replace(true)))
}

impl Drop for Prefill {
    fn drop(&mut self) {
        PREFILL.with(|p| p.set(self.0));
    }
}

/// Start (or stop) timing spans; the sums are kept until [`take`].
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// A timed span of `phase`, counted when it is dropped.
#[must_use = "a span times until it is dropped"]
pub struct Span(Option<(Phase, usize, Instant)>);

/// Open a span (nothing when timing is off or a span is already open on this thread).
pub fn span(phase: Phase) -> Span {
    if !ON.load(Ordering::Relaxed) || OPEN.with(|o| o.replace(true)) {
        return Span(None);
    }
    let bucket = PREFILL.with(Cell::get) as usize;
    Span(Some((phase, bucket, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((p, bucket, t)) = self.0.take() {
            let ns = t.elapsed().as_nanos() as u64;
            NANOS[bucket][p as usize].fetch_add(ns, Ordering::Relaxed);
            OPEN.with(|o| o.set(false));
        }
    }
}

/// Seconds per phase by name: outside prompt prefill, and within it.
pub type Taken = (Vec<(&'static str, f64)>, Vec<(&'static str, f64)>);

/// The seconds per phase since the last call (see [`Taken`]); resets them.
pub fn take() -> Taken {
    let bucket = |b: usize| -> Vec<(&'static str, f64)> {
        PHASES
            .iter()
            .map(|p| {
                let ns = NANOS[b][*p as usize].swap(0, Ordering::Relaxed);
                (p.name(), ns as f64 * 1e-9)
            })
            .collect()
    };
    (bucket(0), bucket(1))
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
    let other = (total_s - counted).max(0.0);
    m.insert("other_s".into(), serde_json::json!(other));
    if total_s > 0.0 {
        for (name, s) in phases {
            m.insert(format!("{name}_share"), serde_json::json!(s / total_s));
        }
        m.insert("other_share".into(), serde_json::json!(other / total_s));
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
        assert!(take().0.iter().all(|(_, s)| *s == 0.0), "counted while off");
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
        {
            let _p = prefill();
            let _s = span(Phase::Base);
            busy(5);
        }
        {
            let _s = span(Phase::Adapter); // after the prefill guard: not prefill
            busy(1);
        }
        enable(false);
        let (rest, pre) = take();
        let t: std::collections::BTreeMap<_, _> = rest.into_iter().collect();
        let p: std::collections::BTreeMap<_, _> = pre.into_iter().collect();
        assert!(t["head"] >= 0.019, "{t:?}");
        assert_eq!(t["base_products"], 0.0, "a nested span was counted: {t:?}");
        assert!(t["adapter_products"] >= 0.001, "{t:?}");
        assert!(p["base_products"] >= 0.005, "{p:?}");
        assert_eq!(
            p["head"] + p["attention"] + p["adapter_products"],
            0.0,
            "{p:?}"
        );
        assert!(
            t["attention"] >= 0.009 && t["attention"] < t["head"],
            "{t:?}"
        );
        let b = breakdown(&[("head", 0.5), ("attention", 0.25)], 1.0);
        assert_eq!(b["other_s"], 0.25);
        assert_eq!(b["head_share"], 0.5);
    }
}
