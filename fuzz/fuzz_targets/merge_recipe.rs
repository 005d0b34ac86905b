//! Fuzz target `merge_recipe`: see `modserve_fuzz::merge_recipe` (fuzz/src/lib.rs) for what it feeds where.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    modserve_fuzz::merge_recipe(data);
});
