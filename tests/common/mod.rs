//! Shared helpers for integration tests: locating the fetched reference model and the fixtures.
#![allow(dead_code)]
use std::path::PathBuf;

/// The reference GGUF: `$MODSERVE_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf` in the
/// crate. Panics (never skips) when it is missing: run `cargo run -- fetch-model` first
/// (scripts/test.sh does).
pub fn reference_model() -> PathBuf {
    let p = std::env::var_os("MODSERVE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(modserve::tools::fetch::MODEL_FILE));
    assert!(p.exists(), "reference model {} missing: run `cargo run -- fetch-model` (scripts/test.sh does)", p.display());
    p
}

/// The device the parity tests run the model on: `$MODSERVE_TEST_DEVICE` (`cpu` or `cuda:N`, the
/// latter in a build with `--features cuda`), else the CPU. CI has no GPU and runs them on the CPU;
/// on a GPU machine the same tests check the CUDA path against the same reference outputs.
pub fn test_device() -> candle_core::Device {
    let name = std::env::var("MODSERVE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    modserve::config::parse_device(&name).unwrap_or_else(|e| panic!("MODSERVE_TEST_DEVICE: {e:#}"))
}

/// `--device` for a CLI run under test: the same device as [`test_device`].
pub fn test_device_flag() -> String {
    std::env::var("MODSERVE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(rel)
}

/// The parity kit's `cases.json`.
pub fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("parity/cases.json")).expect("cases.json fixture");
    serde_json::from_str(&text).expect("cases.json parses")
}

pub mod arch;
pub mod server;
