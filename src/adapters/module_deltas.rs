//! The data model of a delta, the common currency of every adapter kind: a module's additive
//! change to the base model, per target, in the cheapest exact form (low-rank factors, sparse by
//! output row, or dense). The host layouts the CPU kernels read (the sparse block layout, the
//! per-row low-rank layout) live in `kernels`. On the CPU a loaded module's low-rank targets are
//! converted to the kernels' layout ([`MatrixDelta::Packed`], by [`ModuleDeltas::into_host`]),
//! which is then their only copy: prefill GEMMs, merges and device copies widen it on demand.
//!
//! Formats (PEFT LoRA, Poly, composable-sft, task vectors, merges) all produce a [`ModuleDeltas`];
//! the batch step only ever sees these. Invariants: shapes match the base parameter they target
//! (checked by [`ModuleDeltas::validate`] against a [`BaseShapes`]); values are finite; low-rank
//! factors have any module scale folded into `b`; tensors are float32 and immutable once built.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

use super::error::AdapterError;
use super::target::{BaseShapes, Target};
use crate::kernels::host::with_host_f32;
use crate::kernels::lowrank::HostLowRank;
use crate::kernels::sparse_layout::SparseMatrix;

/// The change to one parameter matrix `[out, in]`.
#[derive(Debug, Clone)]
pub enum MatrixDelta {
    /// `delta = b @ a`, `a: [r, in]`, `b: [out, r]` (scale folded into `b`).
    LowRank {
        a: Tensor,
        b: Tensor,
    },
    Sparse(SparseMatrix),
    /// `[out, in]`.
    Dense(Tensor),
    /// A low-rank delta in the CPU kernels' layout (f32, or 8-bit blocks for an int8 base), the
    /// module's only copy of those factors.
    Packed(Arc<HostLowRank>),
}

/// `(a [r, in], b [out, r])` CPU tensors of packed factors, in PEFT's layout.
fn widened(h: &HostLowRank) -> Result<(Tensor, Tensor), AdapterError> {
    let (at, bt) = factor_tensors(h, &candle_core::Device::Cpu)?;
    Ok((at.t()?.contiguous()?, bt.t()?.contiguous()?))
}

/// `(A^T [in, r], B^T [r, out])` tensors on `device` of packed factors (widened from the compact
/// form): what a prefill segment's two GEMMs multiply with.
pub fn factor_tensors(h: &HostLowRank, device: &candle_core::Device) -> candle_core::Result<(Tensor, Tensor)> {
    let (at, bt) = h.factors();
    Ok((Tensor::from_vec(at, (h.in_dim(), h.rank()), device)?, Tensor::from_vec(bt, (h.rank(), h.out_dim()), device)?))
}

impl MatrixDelta {
    /// `(out, in)` of the delta.
    pub fn dims(&self) -> Result<(usize, usize), AdapterError> {
        Ok(match self {
            Self::LowRank { a, b } => (b.dim(0)?, a.dim(1)?),
            Self::Sparse(s) => (s.rows(), s.cols()),
            Self::Dense(d) => d.dims2()?,
            Self::Packed(h) => (h.out_dim(), h.in_dim()),
        })
    }

    /// `self`, with packed factors widened back to [`MatrixDelta::LowRank`] CPU tensors.
    pub fn unpacked(&self) -> Result<Self, AdapterError> {
        Ok(match self {
            Self::Packed(h) => {
                let (a, b) = widened(h)?;
                Self::LowRank { a, b }
            }
            other => other.clone(),
        })
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Self::LowRank { a, b } => (a.elem_count() + b.elem_count()) * 4,
            Self::Sparse(s) => s.bytes(),
            Self::Dense(d) => d.elem_count() * 4,
            Self::Packed(h) => h.bytes(),
        }
    }

    /// Dense `[out, in]` f32 copy (merges and tests only; never on the serving path).
    pub fn to_dense(&self) -> Result<Tensor, AdapterError> {
        Ok(match self {
            Self::LowRank { a, b } => b.matmul(a)?,
            Self::Sparse(s) => Tensor::from_vec(s.to_dense(), (s.rows(), s.cols()), &candle_core::Device::Cpu)?,
            Self::Dense(d) => d.clone(),
            Self::Packed(_) => return self.unpacked()?.to_dense(),
        })
    }

    /// Multiplies the delta by `s`.
    pub fn scaled(&self, s: f32) -> Result<Self, AdapterError> {
        Ok(match self {
            Self::Packed(_) => return self.unpacked()?.scaled(s),
            Self::LowRank { a, b } => Self::LowRank { a: a.clone(), b: (b * s as f64)? },
            Self::Sparse(m) => Self::Sparse(m.scaled(s)),
            Self::Dense(d) => Self::Dense((d * s as f64)?),
        })
    }
}

/// One module's deltas, by target.
#[derive(Debug, Clone, Default)]
pub struct ModuleDeltas {
    pub targets: BTreeMap<Target, MatrixDelta>,
}

impl ModuleDeltas {
    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.targets.values().map(|d| d.bytes()).sum::<usize>()
    }

    /// A copy whose low-rank and dense tensors live on `device` (a GPU model's). Sparse matrices
    /// stay on the host: their product runs there (the rows' inputs are copied over and back).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self, AdapterError> {
        let mut targets = BTreeMap::new();
        for (t, d) in &self.targets {
            let moved = match d {
                MatrixDelta::LowRank { a, b } => MatrixDelta::LowRank { a: a.to_device(device)?, b: b.to_device(device)? },
                MatrixDelta::Dense(w) => MatrixDelta::Dense(w.to_device(device)?),
                MatrixDelta::Sparse(s) => MatrixDelta::Sparse(s.clone()),
                MatrixDelta::Packed(h) => {
                    let (a, b) = widened(h)?;
                    MatrixDelta::LowRank { a: a.to_device(device)?, b: b.to_device(device)? }
                }
            };
            targets.insert(*t, moved);
        }
        Ok(Self { targets })
    }

    /// Converts the low-rank factors of the linear targets to the CPU kernels' layout
    /// ([`MatrixDelta::Packed`], their only copy from then on; call off the engine thread);
    /// `compact`: hold them (ranks up to 128) as 8-bit blocks (see [`HostLowRank`]). Embedding
    /// and output-head deltas keep their tensors (they are multiplied by row lookups and GEMMs).
    pub fn into_host(mut self, compact: bool) -> Result<Self, AdapterError> {
        use crate::kernels::lowrank::MAX_KERNEL_RANK;
        use rayon::prelude::*;
        let low_rank: Vec<(Target, &Tensor, &Tensor)> = self
            .targets
            .iter()
            .filter_map(|(t, d)| match d {
                MatrixDelta::LowRank { a, b } if a.device().is_cpu() && matches!(t, Target::Linear(_)) => Some((*t, a, b)),
                _ => None,
            })
            .collect();
        // Compact factors of every rank the kernel takes go into one buffer, in the map's order
        // (layer by layer, q k v o gate up down: the order a decode row reads them); the rest
        // keep f32 factors, one target at a time. Both in parallel: a cold load waits on this.
        let (small, large): (Vec<_>, Vec<_>) =
            low_rank.into_iter().partition(|(_, a, _)| compact && a.dim(0).is_ok_and(|r| r <= MAX_KERNEL_RANK));
        let mut packed: Vec<(Target, MatrixDelta)> = large
            .par_iter()
            .map(|(t, a, b)| host_low_rank(a, b, false).map(|h| (*t, MatrixDelta::Packed(Arc::new(h)))))
            .collect::<Result<_, _>>()?;
        let shapes = small.iter().map(|(_, a, b)| Ok((a.dim(0)?, a.dim(1)?, b.dim(0)?))).collect::<Result<Vec<_>, AdapterError>>()?;
        let hs = HostLowRank::new_compact_many(&shapes, |i, slot| {
            let (_, a, b) = small[i];
            with_host_f32(a, |av| {
                with_host_f32(b, |bv| {
                    slot.pack(av, bv);
                    Ok(())
                })
            })
        })?;
        packed.extend(small.iter().zip(hs).map(|((t, _, _), h)| (*t, MatrixDelta::Packed(Arc::new(h)))));
        self.targets.extend(packed);
        Ok(self)
    }

    /// The CPU layout of a low-rank target, if packed.
    pub fn host_low_rank(&self, t: &Target) -> Option<&HostLowRank> {
        match self.targets.get(t)? {
            MatrixDelta::Packed(h) => Some(h),
            _ => None,
        }
    }

    /// Checks every target exists in the base model with the delta's shape and that all values
    /// are finite. `path` names the source in errors.
    pub fn validate(&self, base: &BaseShapes, path: &Path) -> Result<(), AdapterError> {
        use rayon::prelude::*;
        // Targets are checked in parallel (a cold load waits on this); the first failing target
        // in order is reported, as a sequential check would.
        let checked: Vec<Result<(), AdapterError>> = self
            .targets
            .par_iter()
            .map(|(t, d)| {
                let want = base.shape(*t).ok_or_else(|| AdapterError::UnknownTarget { path: path.into(), target: t.hf_name() })?;
                let got = d.dims()?;
                if got != want {
                    return Err(AdapterError::Shape {
                        path: path.into(),
                        tensor: t.hf_name(),
                        expected: vec![want.0, want.1],
                        got: vec![got.0, got.1],
                    });
                }
                check_finite(d, path, &t.hf_name())
            })
            .collect();
        checked.into_iter().collect()
    }
}

/// The per-row kernel layout of factors `a` `[rank, in]`, `b` `[out, rank]` (CPU tensors).
fn host_low_rank(a: &Tensor, b: &Tensor, compact: bool) -> Result<HostLowRank, AdapterError> {
    let (rank, in_dim) = a.dims2()?;
    let out_dim = b.dim(0)?;
    Ok(with_host_f32(a, |av| with_host_f32(b, |bv| Ok(HostLowRank::new(av, bv, rank, in_dim, out_dim, compact))))?)
}

/// What the first value of `v` that is not finite is (`"NaN"` or `"infinite"`, as
/// [`AdapterError::NonFinite`] names it), if there is one.
pub(crate) fn non_finite(v: &[f32]) -> Option<&'static str> {
    v.iter().find(|x| !x.is_finite()).map(|x| if x.is_nan() { "NaN" } else { "infinite" })
}

fn check_finite(d: &MatrixDelta, path: &Path, name: &str) -> Result<(), AdapterError> {
    let host = |t: &Tensor| with_host_f32(t, |v| Ok(non_finite(v)));
    let found = match d {
        MatrixDelta::Sparse(s) => non_finite(s.values()),
        MatrixDelta::Dense(t) => host(t)?,
        MatrixDelta::LowRank { a, b } => host(a)?.or(host(b)?),
        MatrixDelta::Packed(_) => None, // packed from checked factors
    };
    match found {
        Some(what) => Err(AdapterError::NonFinite { path: path.into(), tensor: name.into(), what }),
        None => Ok(()),
    }
}
