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
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
