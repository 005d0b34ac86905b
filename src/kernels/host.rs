//! Host views of candle tensors for the kernels: a CPU tensor's values as one `&[f32]`.
//!
//! Invariant: the slice is exactly the tensor's elements in row-major order (a contiguous f32
//! copy is made only when the tensor is not already one).
use candle_core::{Result, Tensor};

/// Runs `f` on the values of a CPU tensor as one host f32 slice (row-major), without a copy when
/// it already is contiguous f32.
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor");
    };
    let start = layout.start_offset();
    f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()])
}
