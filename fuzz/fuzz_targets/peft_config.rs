//! Fuzz target `peft_config`: see `modserve_fuzz::peft_config` (fuzz/src/lib.rs) for what it feeds where.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    modserve_fuzz::peft_config(data);
});
