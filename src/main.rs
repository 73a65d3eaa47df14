//! The `emlab` command line: parses arguments (see `cli`), runs one library call, prints.

mod cli;

use std::io::Write;
use std::process::ExitCode;

/// Model passes allocate and free tensors of tens of megabytes many times a second. glibc
/// serves those with fresh `mmap`s and returns them at once, so every tensor costs page
/// faults and page clearing (4% of a CPU training step, measured with perf). Keeping freed
/// memory in the heap for reuse removes that.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts (larger values are refused).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    match cli::run() {
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
            for cause in err.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            if let Some(hint) = cli::hint_for(&err) {
                let _ = writeln!(stderr, "hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
