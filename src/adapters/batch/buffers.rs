//! Buffers of the batch step kept per thread between calls: the step asks for the same few sizes
//! hundreds of times, and fresh zeroed buffers cost tens of MB of memset per decode step.
//!
//! Invariant: users write every element before reading it (debug builds fill buffers with NaN so
//! a read before a write shows in tests); a nested use on one thread gets a fresh buffer.
use std::cell::RefCell;
use std::thread::LocalKey;

use crate::kernels::lowrank::QuantRow;

thread_local! {
    // Buffers of the sparse step kept per thread between calls. The step asks for the same few
    // sizes hundreds of times, and each user writes every element before reading it, so they
    // need no zeroing: fresh zeroed buffers cost tens of MB of memset per decode step.
    pub(super) static INPUT_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    pub(super) static PROD_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Decode rows quantized for the compact LoRA kernels, kept between calls like the above.
    pub(super) static QUANT_ROWS: RefCell<Vec<QuantRow>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` values of this thread's `buf`, grown if needed; the values are whatever an
/// earlier use left (the caller writes before it reads). A nested use of the same buffer on one
/// thread (a worker stealing another step's task while it holds it) gets a fresh one instead.
pub(super) fn with_reused<R>(buf: &'static LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    buf.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            if cfg!(debug_assertions) {
                // Tests run in debug builds: a read before a write shows up as NaN in results.
                v[..len].fill(f32::NAN);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![if cfg!(debug_assertions) { f32::NAN } else { 0.0 }; len]),
    })
}
