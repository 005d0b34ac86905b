//! safetensors reading shared by the formats: whole-file reads, parsing, the `__metadata__` map
//! and float tensor views converted to f32.
//!
//! Invariant: a truncated or corrupt file is `Malformed` and an unreadable one `Io`, each naming
//! the file; non-float dtypes are `Unsupported`, never reinterpreted.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::adapters::error::AdapterError;

/// Reads a whole regular file ([`crate::adapters::source::read_regular`]: FIFOs and devices are
/// refused without blocking; a missing file is `Io`, another I/O failure `Unreadable`).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, AdapterError> {
    crate::adapters::source::read_regular(path)
}

/// Parses a safetensors buffer; a truncated or corrupt file is `Malformed`.
pub fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>, AdapterError> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| AdapterError::Malformed { path: path.into(), reason: format!("not a readable safetensors file: {e}") })
}

/// The `__metadata__` map of a safetensors buffer (None when absent).
pub fn metadata(bytes: &[u8], path: &Path) -> Result<Option<std::collections::HashMap<String, String>>, AdapterError> {
    let (_, md) = SafeTensors::read_metadata(bytes)
        .map_err(|e| AdapterError::Malformed { path: path.into(), reason: format!("not a readable safetensors file: {e}") })?;
    Ok(md.metadata().clone())
}

/// Converts a floating-point tensor view to an f32 CPU tensor; other dtypes are `Unsupported`.
pub fn view_to_f32(view: &safetensors::tensor::TensorView<'_>, path: &Path, name: &str) -> Result<Tensor, AdapterError> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        other => {
            return Err(AdapterError::Unsupported {
                path: path.into(),
                reason: format!("tensor `{name}` has dtype {other:?} (expected F32, F16, BF16 or F64)"),
            })
        }
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
    Ok(t.to_dtype(DType::F32)?)
}
