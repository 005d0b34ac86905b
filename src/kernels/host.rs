//! Host views of candle tensors for the kernels: a CPU tensor's values as one `&[f32]`, or in
//! place as one `&mut [f32]`.
//!
//! Invariants: the slice is exactly the tensor's elements in row-major order (a contiguous f32
//! copy is made only when the tensor is not already one). An in-place view is given only for a
//! contiguous CPU f32 tensor whose storage no tensor named as read beside it shares (the view
//! holds the storage's write lock, so reading such a tensor inside would deadlock), and it
//! changes that storage: callers use it only on tensors that nothing reads afterwards.
use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};

/// Runs `f` on the values of a CPU tensor as one host f32 slice (row-major), without a copy when
/// it already is contiguous f32.
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor");
    };
    let start = layout.start_offset();
    f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()])
}

/// The start of a CPU f32 tensor's storage (equal for two tensors exactly when they share it).
fn storage_start(t: &Tensor) -> Option<*const f32> {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(v.as_ptr()),
        _ => None,
    }
}

/// True when `t` is a contiguous CPU f32 tensor sharing its storage with none of `reads`.
fn in_place_ok(t: &Tensor, reads: &[&Tensor]) -> bool {
    // `storage_start` is `None` unless the storage is CPU f32.
    storage_start(t).filter(|_| t.is_contiguous()).is_some_and(|own| reads.iter().all(|r| storage_start(r) != Some(own)))
}

/// Runs `f` on the values of `t` in place (one mutable row-major slice, no copy) when `t` is a
/// contiguous CPU f32 tensor that shares its storage with none of `reads` (the tensors `f` reads);
/// `Ok(None)` without calling `f` otherwise. `t`'s values are then whatever `f` left: only for a
/// tensor that nothing else reads afterwards (a step's intermediate, consumed here).
pub fn with_host_f32_in_place<R>(t: &Tensor, reads: &[&Tensor], f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<Option<R>> {
    if !in_place_ok(t, reads) {
        return Ok(None);
    }
    run_in_place(t, f).map(Some)
}

/// Runs `f` on the values of `t` as one mutable row-major slice: in place where
/// [`with_host_f32_in_place`] would, else on a copy that is dropped after. Only for a tensor that
/// nothing reads afterwards (its values may or may not be what `f` left).
pub fn with_host_f32_mut<R>(t: &Tensor, reads: &[&Tensor], f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    if in_place_ok(t, reads) {
        return run_in_place(t, f);
    }
    f(&mut t.flatten_all()?.to_vec1::<f32>()?)
}

/// Hands `t`'s own storage slice to `f` (the caller checked [`in_place_ok`]).
fn run_in_place<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    let op = InPlace { f: RefCell::new(Some(f)), out: RefCell::new(None) };
    t.inplace_op1(&op)?;
    op.out.into_inner().expect("candle runs an in-place op's CPU body once")
}

/// The candle in-place op that hands its CPU storage's slice to a closure, once.
struct InPlace<F, R> {
    f: RefCell<Option<F>>,
    out: RefCell<Option<Result<R>>>,
}

impl<F: FnOnce(&mut [f32]) -> Result<R>, R> InplaceOp1 for InPlace<F, R> {
    fn name(&self) -> &'static str {
        "host-f32-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (CpuStorage::F32(v), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("host-f32-in-place: not a contiguous f32 CPU tensor")
        };
        let f = self.f.borrow_mut().take().expect("one call");
        *self.out.borrow_mut() = Some(f(&mut v[start..end]));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_changes_the_tensor_and_refuses_shared_or_strided_storage() {
        let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let other = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let sum = with_host_f32_in_place(&t, &[&other], |v| {
            v.iter_mut().for_each(|x| *x *= 2.0);
            Ok(v.iter().sum::<f32>())
        })
        .unwrap();
        assert_eq!(sum, Some(30.0));
        assert_eq!(t.to_vec2::<f32>().unwrap(), [[0., 2., 4.], [6., 8., 10.]]);
        // A view sharing t's storage among the reads, a transposed (strided) view, another dtype.
        let row = t.narrow(0, 1, 1).unwrap();
        assert!(with_host_f32_in_place(&t, &[&row], |_| Ok(())).unwrap().is_none());
        assert!(with_host_f32_in_place(&t.t().unwrap(), &[], |_| Ok(())).unwrap().is_none());
        let ints = Tensor::arange(0u32, 4, &Device::Cpu).unwrap();
        assert!(with_host_f32_in_place(&ints, &[], |_| Ok(())).unwrap().is_none());
        // An offset view (row 1) is contiguous: only its own values are handed out.
        let seen = with_host_f32_in_place(&row, &[], |v| Ok(v.to_vec())).unwrap();
        assert_eq!(seen, Some(vec![6., 8., 10.]));
        // The closure's error comes back as the call's.
        assert!(with_host_f32_in_place(&t, &[], |_| -> Result<()> { candle_core::bail!("no") }).is_err());
        // The copying fallback: the same values, and the shared tensor left as it was.
        let seen = with_host_f32_mut(&t, &[&row], |v| {
            v.iter_mut().for_each(|x| *x += 1.0);
            Ok(v.to_vec())
        })
        .unwrap();
        assert_eq!(seen, [1., 3., 5., 7., 9., 11.]);
        assert_eq!(t.to_vec2::<f32>().unwrap(), [[0., 2., 4.], [6., 8., 10.]]);
        // Without a shared read it works in place.
        with_host_f32_mut(&t, &[], |v| {
            v[0] = -1.0;
            Ok(())
        })
        .unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap()[0][0], -1.0);
    }
}
