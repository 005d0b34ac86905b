//! Fuzz target `safetensors_task_vector`: see `modserve_fuzz::safetensors_task_vector` (fuzz/src/lib.rs) for what it feeds where.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    modserve_fuzz::safetensors_task_vector(data);
});
