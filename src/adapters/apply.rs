//! Applying per-request compositions inside a batch step: the [`RowDeltas`] implementation.
//!
//! The base product `y = x W^T` has already run once for every row; here each chunk's rows get
//! the deltas of that chunk's own composition only: low-rank as `(x A^T) B^T`, sparse as a CSR
//! product whose cost scales with the non-zeros, dense as `x D^T`. Invariant: rows of a chunk
//! without a composition (or whose composition does not touch the layer) are left exactly as the
//! base computed them, so a request's result does not depend on its batch neighbours.
use candle_core::{Result, Tensor};

use super::delta::{MatrixDelta, Target};
use super::store::Composition;
use crate::model::linear::{LinearId, RowDeltas};

/// The compositions of one batch step, by chunk.
pub struct BatchDeltas<'a> {
    /// `(first row, rows, composition)` per chunk, in the step's chunk order.
    chunks: Vec<(usize, usize, Option<&'a Composition>)>,
    /// Whether the output head shares the embedding matrix (embedding deltas then apply to it too).
    tied: bool,
}

impl<'a> BatchDeltas<'a> {
    /// `chunks`: rows and composition of every chunk, in order.
    pub fn new(chunks: impl IntoIterator<Item = (usize, Option<&'a Composition>)>, tied: bool) -> Self {
        let mut start = 0;
        let chunks = chunks
            .into_iter()
            .map(|(len, c)| {
                let s = start;
                start += len;
                (s, len, c.filter(|c| !c.parts.is_empty()))
            })
            .collect();
        Self { chunks, tied }
    }

    /// Whether no chunk has a composition (the step is base-only).
    pub fn is_empty(&self) -> bool {
        self.chunks.iter().all(|c| c.2.is_none())
    }

    fn head_target(&self) -> Target {
        if self.tied {
            Target::Embedding
        } else {
            Target::LmHead
        }
    }
}

/// `scale * x M^T` for one delta matrix; `x: [n, in]` -> `[n, out]`.
pub fn delta_product(m: &MatrixDelta, x: &Tensor, scale: f32) -> Result<Tensor> {
    let s = scale as f64;
    match m {
        MatrixDelta::LowRank { a, b } => x.matmul(&a.t()?)?.matmul(&b.t()?)? * s,
        MatrixDelta::Dense(d) => x.matmul(&d.t()?)? * s,
        MatrixDelta::Sparse(sp) => {
            let n = x.dim(0)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; n * sp.rows];
            sp.add_matmul_t(&xv, n, &mut y, scale);
            Tensor::from_vec(y, (n, sp.rows), x.device())
        }
    }
}

/// Sum over a composition's parts that touch `target` of `scale * x M^T`, or None.
fn composition_product(c: &Composition, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (deltas, scale) in &c.parts {
        if let Some(m) = deltas.targets.get(&target) {
            let d = delta_product(m, x, *scale)?;
            acc = Some(match acc {
                Some(a) => (a + d)?,
                None => d,
            });
        }
    }
    Ok(acc)
}

/// Segments shorter than this use the per-row CPU kernels; longer ones (prefill) use GEMMs.
const ROW_KERNEL_MAX_ROWS: usize = 8;

impl BatchDeltas<'_> {
    /// CPU path: one host copy of `x`, every composition's deltas accumulated into one host buffer
    /// with per-row kernels (low-rank axpy, CSR), then a single add. Cost per row is
    /// `r * (in + out)` for LoRA and `nnz` for sparse deltas, without per-module tensor ops.
    fn add_deltas_cpu(&self, target: Target, x: &Tensor, y: Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let (n, in_dim) = x.dims2()?;
        let out = y.dim(1)?;
        let xh = x.flatten_all()?.to_vec1::<f32>()?;
        let mut dh = vec![0f32; n * out];
        // Chunks own disjoint, consecutive row ranges: split the output once and work in parallel.
        let mut slices: Vec<(usize, usize, &Composition, &mut [f32])> = Vec::with_capacity(self.chunks.len());
        let mut rest: &mut [f32] = &mut dh;
        let mut consumed = 0;
        for &(start, len, comp) in &self.chunks {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - consumed) * out);
            let (mine, tail) = tail.split_at_mut(len * out);
            rest = tail;
            consumed = start + len;
            if let Some(c) = comp {
                slices.push((start, len, c, mine));
            }
        }
        slices.into_par_iter().try_for_each(|(start, len, c, dst)| -> Result<()> {
            let xs = &xh[start * in_dim..(start + len) * in_dim];
            for (deltas, scale) in &c.parts {
                let Some(m) = deltas.targets.get(&target) else { continue };
                match (m, deltas.host_low_rank(&target)) {
                    (MatrixDelta::LowRank { .. }, Some(h)) if len <= ROW_KERNEL_MAX_ROWS => {
                        for (xr, yr) in xs.chunks_exact(in_dim).zip(dst.chunks_exact_mut(out)) {
                            h.add_row(xr, yr, *scale);
                        }
                    }
                    (MatrixDelta::Sparse(sp), _) => sp.add_matmul_t(xs, len, dst, *scale),
                    _ => {
                        let d = delta_product(m, &x.narrow(0, start, len)?, *scale)?.flatten_all()?.to_vec1::<f32>()?;
                        for (o, v) in dst.iter_mut().zip(d) {
                            *o += v;
                        }
                    }
                }
            }
            Ok(())
        })?;
        let dh = Tensor::from_vec(dh, (n, out), y.device())?;
        y + dh
    }
}

impl RowDeltas for BatchDeltas<'_> {
    fn add_deltas(&self, id: LinearId, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let target = Target::Linear(id);
        let touched = self.chunks.iter().any(|c| c.2.is_some_and(|c| c.parts.iter().any(|(d, _)| d.targets.contains_key(&target))));
        if !touched {
            return Ok(y);
        }
        if x.device().is_cpu() {
            return self.add_deltas_cpu(target, x, y);
        }
        let mut pieces: Vec<Option<Tensor>> = Vec::with_capacity(self.chunks.len());
        let mut any = false;
        for &(start, len, comp) in &self.chunks {
            let p = match comp {
                Some(c) => composition_product(c, target, &x.narrow(0, start, len)?)?,
                None => None,
            };
            any |= p.is_some();
            pieces.push(p);
        }
        if !any {
            return Ok(y);
        }
        add_row_blocks(y, pieces.into_iter().zip(self.chunks.iter().map(|c| c.1)))
    }

    fn add_embedding_deltas(&self, ids: &[u32], x: Tensor) -> Result<Tensor> {
        let touched = self.chunks.iter().any(|c| c.2.is_some_and(|c| c.parts.iter().any(|(d, _)| d.targets.contains_key(&Target::Embedding))));
        if !touched {
            return Ok(x);
        }
        let (n, hidden) = x.dims2()?;
        let mut add = vec![0f32; n * hidden];
        for &(start, len, comp) in &self.chunks {
            let Some(c) = comp else { continue };
            for (deltas, scale) in &c.parts {
                let Some(m) = deltas.targets.get(&Target::Embedding) else { continue };
                for r in start..start + len {
                    let row = &mut add[r * hidden..(r + 1) * hidden];
                    let tok = ids[r] as usize;
                    match m {
                        MatrixDelta::Sparse(sp) => sp.add_row(tok, row, *scale),
                        MatrixDelta::Dense(d) => {
                            for (o, v) in row.iter_mut().zip(d.get(tok)?.to_vec1::<f32>()?) {
                                *o += scale * v;
                            }
                        }
                        MatrixDelta::LowRank { a, b } => {
                            let v = b.get(tok)?.unsqueeze(0)?.matmul(a)?.squeeze(0)?.to_vec1::<f32>()?;
                            for (o, v) in row.iter_mut().zip(v) {
                                *o += scale * v;
                            }
                        }
                    }
                }
            }
        }
        let add = Tensor::from_vec(add, (n, hidden), x.device())?;
        x + add
    }

    fn add_lm_head_deltas(&self, chunks: &[usize], x: &Tensor, y: Tensor) -> Result<Tensor> {
        let target = self.head_target();
        let mut rows = Vec::with_capacity(chunks.len());
        let mut any = false;
        for (k, &ci) in chunks.iter().enumerate() {
            let p = match self.chunks.get(ci).and_then(|c| c.2) {
                Some(c) => composition_product(c, target, &x.narrow(0, k, 1)?)?,
                None => None,
            };
            any |= p.is_some();
            rows.push(p);
        }
        if !any {
            return Ok(y);
        }
        add_row_blocks(y, rows.into_iter().map(|p| (p, 1)))
    }
}

/// `y +` the row blocks stacked in order; a missing block is that many rows of zeros.
fn add_row_blocks(y: Tensor, blocks: impl Iterator<Item = (Option<Tensor>, usize)>) -> Result<Tensor> {
    let width = y.dim(1)?;
    let full: Vec<Tensor> = blocks
        .map(|(p, rows)| match p {
            Some(t) => Ok(t),
            None => Tensor::zeros((rows, width), y.dtype(), y.device()),
        })
        .collect::<Result<_>>()?;
    y + Tensor::cat(&full, 0)?
}
