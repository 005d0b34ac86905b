//! Keeps the thread pool's other workers awake through a batch step.
//!
//! A step forks and joins a few hundred times (projections and their deltas, attention, the
//! head) with short serial stretches between (norms, residual adds, batch assembly). rayon puts a
//! worker that finds no work to sleep after about 33 yields, tens of microseconds, and the next
//! fork wakes it with a futex. On a virtual machine that wake is an interrupt to a halted vCPU:
//! `perf record` of `modserve bench --scenarios lora32` on the 2-core VM put 18% of the step
//! thread's samples in the kernel's wake-up path (`try_to_wake_up`), more than the LoRA kernels.
//! [`step_scope`] runs a step with one keep-awake job per other worker, which polls for the
//! step's work (`rayon::yield_now`) until the step ends, as llama.cpp's thread pool spins through
//! a graph. `MODSERVE_KEEP_AWAKE=0` switches it off (the worker then sleeps as rayon decides).
//!
//! Invariants: a keep-awake job returns at once on the step's own worker, and after
//! [`IDLE_LIMIT`] without finding work anywhere, so it never holds a frame the step waits on for
//! longer than that (a job runs below whatever it executes: if a worker waiting inside a join
//! picked one up, the join's continuation would wait for it); between steps the workers sleep.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A keep-awake job that found no work for this long returns (its worker may then sleep).
pub const IDLE_LIMIT: Duration = Duration::from_millis(1);

/// Whether steps keep the other workers awake (`MODSERVE_KEEP_AWAKE`, default on).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("MODSERVE_KEEP_AWAKE").is_ok_and(|v| v == "0" || v == "off"))
}

/// Runs `step` on a worker of the current rayon pool (injecting it when called from outside,
/// as the engine thread does) with the pool's other workers polling for its work until it
/// returns.
pub fn step_scope<R: Send>(step: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let others = rayon::current_num_threads().saturating_sub(1);
        if enabled() {
            let home = rayon::current_thread_index();
            let done = &done;
            for _ in 0..others {
                s.spawn(move |_| keep_awake(done, home));
            }
        }
        let r = step();
        done.store(true, Ordering::Release);
        r
    })
}

/// Executes the pool's pending jobs until `done`, or until none turned up for [`IDLE_LIMIT`].
fn keep_awake(done: &AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home {
        return;
    }
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            _ => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_LIMIT {
                    return;
                }
                // Lets the server's other threads (network, streaming) run on this core.
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's forks run on both workers while it keeps the second one awake, and the scope
    /// returns the step's result; a step that waits without work lets the keep-awake job go.
    #[test]
    fn step_scope_runs_the_step_and_its_forks() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (r, threads) = pool.install(|| {
            step_scope(|| {
                let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
                for _ in 0..200 {
                    // Both halves take a while, so the other worker has time to steal one.
                    rayon::join(
                        || {
                            std::thread::sleep(Duration::from_micros(50));
                            seen.lock().unwrap().insert(rayon::current_thread_index())
                        },
                        || {
                            std::thread::sleep(Duration::from_micros(50));
                            seen.lock().unwrap().insert(rayon::current_thread_index())
                        },
                    );
                }
                // Longer than IDLE_LIMIT with nothing to do: the keep-awake job returns.
                std::thread::sleep(IDLE_LIMIT * 3);
                (42, seen.into_inner().unwrap().len())
            })
        });
        assert_eq!(r, 42);
        assert_eq!(threads, 2, "the forks ran on both workers");
    }
}
