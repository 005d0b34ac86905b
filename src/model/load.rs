//! Loading a model of any supported family: a `.gguf` file (`model::load_gguf`) or a Hugging Face
//! directory (`model::load_hf`), chosen by the path.
//!
//! Invariants: every tensor's shape is checked against the config before use; bf16 / f16 tensors
//! are upcast to float32 (and re-blocked in quantized mode); the result is immutable.
use std::path::Path;

pub use super::load_gguf::{gguf_row_of_hf_row, load_gguf};
pub use super::load_hf::load_hf_dir;
pub use super::loaded::{LoadError, LoadOptions, LoadedModel};

/// Loads a `.gguf` file or a Hugging Face model directory.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        load_hf_dir(path, opts)
    } else {
        load_gguf(path, opts)
    }
}
