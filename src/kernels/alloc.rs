//! The process allocator's settings (glibc's `mallopt`), set once at start.
//!
//! Invariant: called first thing in `main`, before any other thread exists.

/// Keeps freed heap memory in the process instead of returning it to the kernel. A batch step
/// allocates and frees buffers of the same few sizes (tens to hundreds of KB) hundreds of times;
/// with glibc's adaptive thresholds those were trimmed or unmapped and faulted back in, zeroed,
/// on the next step (a tenth of a sparse-delta decode step, measured). Allocations up to 32 MB
/// now come from the heap, and a heap's free top is kept up to 1 GB. Call once, first thing.
/// (mimalloc was tried instead: it backs fresh pages with 2 MB huge pages, and a cold adapter load
/// went from 10 to 30 ms, zeroing them.)
///
/// The number of malloc arenas is capped at the core count (at least 2; glibc's default is 8 per
/// core): module loads run on tokio's blocking threads, which come and go, and each arena kept its
/// own freed memory, so RSS crept. `scripts/soak.sh 600s 32` on 2 cores (2026-12-03): RSS +7.6%
/// from the 1/4 mark to the end (534 -> 575 MB) with glibc's default, +1.6% (446 -> 453 MB) with 2
/// arenas, at the same throughput (9369 vs 9618 requests, 0 errors).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2);
        let arenas = i32::try_from(arenas).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes glibc's allocation settings; called before other threads.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Returns the free pages of every malloc arena to the kernel (glibc's `malloc_trim(0)`, which
/// also releases whole free pages in the middle of a heap, not only its top). With the settings
/// of [`keep_freed_memory`] freed memory otherwise stays resident, and a server that loads and
/// evicts modules of many sizes fragments its heaps: RSS crept by 2% in 10 minutes of
/// `scripts/soak.sh` even with the arena cap. Returns whether any memory was released. Safe to
/// call from any thread at any time (it takes each arena's lock in turn).
pub fn return_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks glibc's own free lists under their locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
