//! Fuzz target `pickle_bin`: see `modserve_fuzz::pickle_bin` (fuzz/src/lib.rs) for what it feeds where.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    modserve_fuzz::pickle_bin(data);
});
