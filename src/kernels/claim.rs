//! Sharing one parallel loop between the pool's threads by claims on an atomic cursor, so that a
//! thread busy elsewhere joins in when it comes free and nobody waits on a fixed share.
//!
//! Why: a projection runs its base GEMM and its adapters' deltas side by side
//! (`rayon::join` in `model::linear`). One thread takes the deltas, the other the GEMM. With the
//! GEMM cut into fixed pieces, the deltas' thread came free after a piece had been taken and
//! waited for the last one (`lora32` on 2 threads: the GEMM half of the join ended 6 ms per step
//! after the base-only GEMM, with the deltas done at 10 ms). With claims the first thread takes
//! big ranges while alone, and the ranges shrink as the work runs out, so both threads end
//! together.
//!
//! Short calls (a GEMM of a few rows, a few microseconds: about a sleeping thread's wake-up)
//! keep rayon's halving, which gives a thread that wakes late half of what is left
//! ([`share_slice`]).
//!
//! Invariants: every index of `0..total` is handed out exactly once, in increasing order, in
//! disjoint ranges; [`on_pool_threads`] and [`try_on_pool_threads`] run their worker on the
//! calling thread first and return only when every copy of the worker has returned (so when
//! every claim has been processed).
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// An atomic cursor over `0..total` handing out ranges: about `1 / (2 * threads)` of what is
/// left (guided self-scheduling), never fewer than `min` items (less at the very end).
#[derive(Debug)]
pub struct Claims {
    next: AtomicUsize,
    total: usize,
    /// What is left is divided by this for the next claim.
    div: usize,
    min: usize,
}

impl Claims {
    /// Guided claims over `0..total` for the current pool: big ranges first, down to `min`.
    pub fn guided(total: usize, min: usize) -> Self {
        Self { next: AtomicUsize::new(0), total, div: 2 * rayon::current_num_threads().max(1), min: min.max(1) }
    }

    /// The next range, or None when everything has been claimed.
    pub fn claim(&self) -> Option<Range<usize>> {
        let mut at = self.next.load(Ordering::Relaxed);
        loop {
            let left = self.total.checked_sub(at).filter(|&l| l > 0)?;
            let take = (left / self.div).max(self.min).min(left);
            match self.next.compare_exchange_weak(at, at + take, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(at..at + take),
                Err(now) => at = now,
            }
        }
    }
}

/// Runs `worker` on the calling thread, and once more per other thread of the current pool as a
/// job that thread may steal: a thread that is busy elsewhere starts its copy when it comes free,
/// and a copy that starts after the work is gone returns at once (its claims come back empty).
pub fn on_pool_threads(worker: impl Fn() + Sync) {
    let _ = try_on_pool_threads(|| -> Result<(), ()> {
        worker();
        Ok(())
    });
}

/// [`on_pool_threads`] for a worker that can fail: the first error any copy returns.
pub fn try_on_pool_threads<E: Send>(worker: impl Fn() -> Result<(), E> + Sync) -> Result<(), E> {
    let n = rayon::current_num_threads();
    if n <= 1 {
        return worker();
    }
    (0..n).into_par_iter().try_for_each(|_| worker())
}

/// Runs `run` on disjoint pieces of `items` that cover it once, on the current pool: by guided
/// claims when `claims` (work a busy thread may join late), else by rayon's halving over pieces
/// of a quarter of a thread's share, at least 4 items (short calls, where a thread that wakes
/// late should still get half of what is left).
pub fn share_slice<T: Sync>(items: &[T], claims: bool, run: impl Fn(&[T]) + Sync) {
    if claims {
        let c = Claims::guided(items.len(), 1);
        on_pool_threads(|| {
            while let Some(r) = c.claim() {
                run(&items[r]);
            }
        });
    } else {
        let per_task = items.len().div_ceil(rayon::current_num_threads().max(1) * 4).max(4);
        items.par_chunks(per_task).for_each(&run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn drain(c: &Claims) -> Vec<Range<usize>> {
        std::iter::from_fn(|| c.claim()).collect()
    }

    #[test]
    fn guided_claims_cover_every_index_once_and_shrink() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let ranges = pool.install(|| drain(&Claims::guided(100, 3)));
        // Contiguous, in order, covering 0..100 exactly.
        assert_eq!(ranges.first().map(|r| r.start), Some(0));
        assert_eq!(ranges.last().map(|r| r.end), Some(100));
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        // A quarter of what is left at first, then never below the minimum but at the very end.
        assert_eq!(ranges[0], 0..25);
        assert!(ranges.windows(2).all(|w| w[0].len() >= w[1].len()));
        assert!(ranges[..ranges.len() - 1].iter().all(|r| r.len() >= 3));
        assert!(Claims::guided(0, 1).claim().is_none());
        // Down to single items: three items on two threads go one by one.
        assert_eq!(pool.install(|| drain(&Claims::guided(3, 1))), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn every_thread_shares_the_claims_and_each_index_runs_once() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let seen = Mutex::new(vec![0u32; 1000]);
        let threads = Mutex::new(std::collections::BTreeSet::new());
        let claims = pool.install(|| Claims::guided(1000, 1));
        pool.install(|| {
            on_pool_threads(|| {
                while let Some(r) = claims.claim() {
                    threads.lock().unwrap().insert(rayon::current_thread_index());
                    for i in r {
                        seen.lock().unwrap()[i] += 1;
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    }
                }
            })
        });
        assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1));
        assert!(threads.into_inner().unwrap().len() > 1, "the work was not shared");
    }

    #[test]
    fn share_slice_runs_every_item_once_both_ways() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let items: Vec<usize> = (0..37).collect();
        for claims in [true, false] {
            let seen = Mutex::new(vec![0u32; items.len()]);
            pool.install(|| share_slice(&items, claims, |piece| piece.iter().for_each(|&i| seen.lock().unwrap()[i] += 1)));
            assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1), "claims={claims}");
        }
    }

    #[test]
    fn an_error_from_any_copy_is_returned() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let claims = pool.install(|| Claims::guided(10, 1));
        let r = pool.install(|| {
            try_on_pool_threads(|| {
                while let Some(r) = claims.claim() {
                    if r.contains(&7) {
                        return Err(7);
                    }
                }
                Ok(())
            })
        });
        // Some copy claimed the range holding item 7 (every item is claimed once) and stopped.
        assert_eq!(r, Err(7));
    }
}
