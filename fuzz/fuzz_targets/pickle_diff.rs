//! Fuzz target `pickle_diff`: see `modserve_fuzz::pickle_diff` (fuzz/src/lib.rs) for what it feeds where.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    modserve_fuzz::pickle_diff(data);
});
