//! The `emlab` command line: parses arguments (see `cli`), runs one library call, prints.

mod cli;

use std::io::Write;
use std::process::ExitCode;

/// Model passes allocate and free tensors of tens of megabytes many times a second. glibc
/// serves those with fresh `mmap`s and returns them at once, so every tensor costs page
/// faults and page clearing. Keeping freed memory in the heap for reuse removes that.
///
/// One arena: the CLI runs on a Rayon worker (see `main`), and glibc gives non-main threads
/// their own arenas made of 64 MiB heaps that it unmaps as soon as they empty, whatever the
/// trim threshold. A training step's tape (about a gigabyte) was faulted in afresh every
/// step: a million page faults in a 4-step `bench train --bf16-base`, 20% of the samples in
/// the kernel clearing pages. With one arena: 0.73 million (the model load's share), 10–15%
/// more tokens/s and 300 MiB less peak memory (measured, 2 cores). The threads beside the CLI
/// thread rarely allocate, so the shared lock costs nothing measurable.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // 32 MiB is the largest mmap threshold glibc accepts (larger values are refused).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Candle 0.11 asks for its thread count on every matmul, and without `RAYON_NUM_THREADS`
/// that means reading and parsing /proc/cpuinfo each time (6% of batch-1 decoding, measured
/// with perf). Work the count out once, the way Candle does, and pin it.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // Edition 2021: set_var is safe; called before any other thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() -> ExitCode {
    tune_allocator();
    pin_thread_count();
    // Run the command on a worker of Rayon's pool rather than beside it: the kernels'
    // parallel loops then split work between this thread and the other workers, instead of
    // waking the whole pool while this thread sleeps (one more thread than cores: per-token
    // context switches at batch 1).
    match rayon::scope(|_| cli::run()) {
        Ok(code) => code,
        Err(err) => {
            // Writing to a closed pipe (`emlab ... | head`) is not a failure.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {err}");
            // Many errors print their cause inside their own message (`path: cause`) and
            // also return it as their source: print each cause once.
            let mut shown = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if shown.contains(&text) {
                    continue;
                }
                let _ = writeln!(stderr, "  caused by: {text}");
                shown.push('\n');
                shown.push_str(&text);
            }
            if let Some(hint) = cli::hint_for(&err) {
                let _ = writeln!(stderr, "hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
