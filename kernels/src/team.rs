//! A spinning team of threads for the small parallel loops of decoding.
//!
//! Decoding one token runs about 120 products of a few hundred microseconds or less, each
//! split across the cores. On Rayon's pool, the worker that is not running the model goes to
//! sleep between them and each product wakes it again through the kernel (perf: about 12%
//! of batch-1 decoding's samples in the scheduler, and the second thread added only a
//! quarter to one thread's speed). Here the helpers spin on an atomic counter between loops
//! for a short while (`SPIN`) and only then park, the way llama.cpp's thread pool waits;
//! the caller takes items too.
//!
//! Which thread runs an item never changes what the item computes, so results are the same
//! bits as on Rayon or on one thread. One loop runs on the team at a time; a caller that
//! finds it busy (another thread's loop) runs its items on Rayon instead.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

use rayon::prelude::*;

/// Spin iterations (`spin_loop` hints) a helper waits for the next loop before parking:
/// roughly 100 µs, longer than the gaps between a token's products, far shorter than the
/// gaps between tokens of separate commands.
const SPIN: u32 = 1 << 14;

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Team {
    /// `epoch << 32 | next item << 16 | items`: one word, so a helper claims an item of the
    /// current loop only (a compare-and-swap that fails once the loop has moved on).
    state: AtomicU64,
    /// The current loop's task: a pointer to a `&Task` on the caller's stack, valid while
    /// any claimed item of the current epoch is unfinished.
    job: AtomicPtr<()>,
    done: AtomicUsize,
    panicked: AtomicBool,
    parked: Vec<AtomicBool>,
    threads: OnceLock<Vec<Thread>>,
    busy: Mutex<()>,
}

fn team() -> Option<&'static Team> {
    static T: OnceLock<Option<&'static Team>> = OnceLock::new();
    *T.get_or_init(|| {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        let t: &'static Team = Box::leak(Box::new(Team {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            threads: OnceLock::new(),
            busy: Mutex::new(()),
        }));
        let mut threads = Vec::new();
        for h in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("emlab-team-{h}"))
                .spawn(move || helper(t, h));
            match spawned {
                Ok(j) => threads.push(j.thread().clone()),
                Err(_) => return None,
            }
        }
        let _ = t.threads.set(threads);
        Some(t)
    })
}

const ITEMS: u64 = 0xFFFF;

fn helper(t: &'static Team, h: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0;
        loop {
            if t.state.load(Acquire) >> 32 != seen {
                break;
            }
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            t.parked[h].store(true, SeqCst);
            if t.state.load(SeqCst) >> 32 == seen {
                std::thread::park();
            }
            t.parked[h].store(false, SeqCst);
            spins = 0;
        }
        seen = t.state.load(Acquire) >> 32;
        work(t, seen);
    }
}

/// Claim and run items of loop `epoch` until none is left.
fn work(t: &Team, epoch: u64) {
    loop {
        let s = t.state.load(Acquire);
        let (next, n) = ((s >> 16) & ITEMS, s & ITEMS);
        if s >> 32 != epoch || next >= n {
            return;
        }
        if t.state
            .compare_exchange_weak(s, s + (1 << 16), AcqRel, Acquire)
            .is_err()
        {
            continue;
        }
        // SAFETY: the claim succeeded in `epoch`, so the caller of that loop is still
        // waiting for this item and its `&Task` is alive (see `job`).
        let f: &Task = unsafe { *(t.job.load(Acquire) as *const &Task) };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(next as usize))).is_err() {
            t.panicked.store(true, SeqCst);
        }
        t.done.fetch_add(1, Release);
    }
}

/// `f(0)`, ..., `f(n - 1)` across this thread and the team (on Rayon where there is no team
/// or it is busy). Returns when every call has.
pub fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let Some(t) = team().filter(|_| n > 1 && (n as u64) <= ITEMS) else {
        return (0..n).into_par_iter().for_each(f);
    };
    let Ok(_guard) = t.busy.try_lock() else {
        return (0..n).into_par_iter().for_each(f);
    };
    let fref: &Task = f;
    t.job.store(&fref as *const &Task as *mut (), Release);
    t.done.store(0, Relaxed);
    t.panicked.store(false, Relaxed);
    let epoch = (t.state.load(Relaxed) >> 32) + 1;
    t.state.store(epoch << 32 | n as u64, SeqCst);
    if let Some(threads) = t.threads.get() {
        for (p, th) in t.parked.iter().zip(threads) {
            if p.load(SeqCst) {
                th.unpark();
            }
        }
    }
    work(t, epoch);
    while t.done.load(Acquire) < n {
        std::hint::spin_loop();
    }
    if t.panicked.load(SeqCst) {
        panic!("a kernel task panicked on a team thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_also_from_several_callers() {
        let sums: Vec<u64> = (0..4u64)
            .into_par_iter()
            .map(|k| {
                let mut total = 0u64;
                for round in 0..200u64 {
                    let n = 1 + ((round * 7 + k) % 40) as usize;
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    run(n, &|i| {
                        hits[i].fetch_add(1, Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
                    total += n as u64;
                }
                total
            })
            .collect();
        assert!(sums.iter().all(|s| *s > 0));
    }
}
