//! Applying per-request compositions inside a batch step: the [`RowDeltas`] implementation, the
//! per-chunk low-rank and dense work, and (in [`sparse_plan`]) the grouped sparse step with its
//! plan; [`resolved`] looks a layer group's deltas up once for all of them, and [`buffers`] holds
//! the per-thread buffers they reuse between steps. No SIMD here: the
//! kernels are in `crate::kernels`.
//!
//! The base product `y = x W^T` runs once for every row (before, or beside, this); here each
//! chunk's rows get the deltas of that chunk's own composition only: low-rank as `(x A^T) B^T`,
//! sparse grouped by module across rows with a cost that scales with the non-zeros, dense as
//! `x D^T`. Invariant: rows of a chunk
//! without a composition (or whose composition does not touch the layer) are left exactly as the
//! base computed them, so a request's result does not depend on its batch neighbours.
mod buffers;
mod resolved;
mod sparse_plan;

use std::ops::Range;
use std::sync::{Mutex, OnceLock, PoisonError};

use candle_core::{Result, Tensor};

use self::buffers::QUANT_ROWS;
use self::resolved::{Resolved, StepIndex};
use self::sparse_plan::add_sparse_resolved;
use super::composition::Composition;
use super::module_deltas::{factor_tensors, MatrixDelta};
use super::target::Target;
use crate::kernels::claim::{try_on_pool_threads, Claims};
use crate::kernels::lowrank::{prefetch_rows, CompactRef, QuantRow};
use crate::model::linear::{LinearId, RowDeltas};

/// One target's share of a task: `(out, [rows, out] host buffer, range of the task's deltas for
/// it in [`Resolved::entries`])`.
type TargetOut<'a> = (usize, &'a mut [f32], Range<usize>);

/// One task of [`BatchDeltas::accumulate_host`]: `(first row, rows, composition, its targets)`.
type Task<'a> = (usize, usize, &'a Composition, Vec<TargetOut<'a>>);

/// The compositions of one batch step, by chunk.
pub struct BatchDeltas<'a> {
    /// `(first row, rows, composition)` per chunk, in the step's chunk order.
    chunks: Vec<(usize, usize, Option<&'a Composition>)>,
    /// Whether the output head shares the embedding matrix (embedding deltas then apply to it too).
    tied: bool,
    /// The step's modules' linear deltas in one table, built by the first host lookup.
    index: OnceLock<StepIndex<'a>>,
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
        Self { chunks, tied, index: OnceLock::new() }
    }

    /// Whether no chunk has a composition (the step is base-only).
    pub fn is_empty(&self) -> bool {
        self.chunks.iter().all(|c| c.2.is_none())
    }

    /// Whether any chunk's composition has a delta for `target`.
    fn touches(&self, target: &Target) -> bool {
        self.chunks.iter().any(|c| c.2.is_some_and(|c| c.parts.iter().any(|(d, _)| d.targets.contains_key(target))))
    }

    /// Every chunk's deltas for `targets`, through the step's index (built on first use).
    fn resolve(&self, targets: &[Target]) -> Resolved<'a> {
        Resolved::new(&self.chunks, self.index.get_or_init(|| StepIndex::new(&self.chunks)), targets)
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
        MatrixDelta::Packed(h) => {
            // A prefill segment: widen the factors for two GEMMs (as many bytes as the GEMMs read).
            let (at, bt) = factor_tensors(h, x.device())?;
            x.matmul(&at)?.matmul(&bt)? * s
        }
        MatrixDelta::Dense(d) => x.matmul(&d.t()?)? * s,
        MatrixDelta::Sparse(sp) => {
            let n = x.dim(0)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; n * sp.rows()];
            sp.add_matmul_t(&xv, n, &mut y, scale);
            Tensor::from_vec(y, (n, sp.rows()), x.device())
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

/// Segments of f32 factors up to this many rows use the per-row kernel; longer ones (prefill)
/// use GEMMs. Compact factors use the row kernel for every segment: with the
/// factors in cache after the first row it beats widening them for GEMMs at every length
/// measured, 8 to 128 rows and ranks 8 to 64 (`cargo run --release --example lora_row_kernel`).
const ROW_KERNEL_MAX_ROWS: usize = 8;

impl BatchDeltas<'_> {
    /// CPU path: one host copy of `x`, every composition's deltas accumulated into one host buffer,
    /// then a single add. Sparse deltas first, grouped by module ([`add_sparse_resolved`]): each
    /// module's non-zeros are read once per step for all rows using it. Then low-rank and dense
    /// deltas per chunk (per-row kernels for compact factors and for decode rows of f32 factors,
    /// GEMMs for prefill segments of f32 factors and for dense deltas). Per row, the
    /// order of additions depends only on its own composition, never on its neighbours.
    fn add_deltas_cpu(&self, target: Target, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let (n, in_dim) = x.dims2()?;
        let out = y.dim(1)?;
        let xh = x.flatten_all()?.to_vec1::<f32>()?;
        let mut dh = vec![0f32; n * out];
        let res = self.resolve(&[target]);
        self.accumulate_host(&res, &mut [(target, out, &mut dh)], &xh, in_dim)?;
        let dh = Tensor::from_vec(dh, (n, out), y.device())?;
        y + dh
    }

    /// Adds every chunk's deltas of each target for the rows `xh` (`[n, in_dim]`, host) into that
    /// target's `dh` (`[n, out]`, host): sparse parts first (grouped by module across rows, see
    /// [`add_sparse_resolved`]), then low-rank and dense parts per chunk, each row in its
    /// composition's order. A chunk's rows go through all targets back to back (q, k and v of one
    /// row read one adapter's factors in a row), chunks in parallel. `res` holds the deltas of
    /// exactly `targets`, in order.
    fn accumulate_host(&self, res: &Resolved, targets: &mut [(Target, usize, &mut [f32])], xh: &[f32], in_dim: usize) -> Result<()> {
        add_sparse_resolved(&self.chunks, res, targets, xh, in_dim);
        // Chunks own disjoint, consecutive row ranges: split every output once, by chunk.
        let mut tasks: Vec<Task> = Vec::with_capacity(self.chunks.len());
        let mut rests: Vec<(usize, &mut [f32])> = targets.iter_mut().map(|(_, out, dh)| (*out, &mut **dh)).collect();
        let mut consumed = 0;
        for (ci, &(start, len, comp)) in self.chunks.iter().enumerate() {
            let mut mine = Vec::new();
            for (ti, (out, rest)) in rests.iter_mut().enumerate() {
                let (_, tail) = std::mem::take(rest).split_at_mut((start - consumed) * *out);
                let (piece, tail) = tail.split_at_mut(len * *out);
                *rest = tail;
                if res.any_not_sparse(ci, ti) {
                    mine.push((*out, piece, res.range(ci, ti)));
                }
            }
            consumed = start + len;
            let Some(c) = comp.filter(|_| !mine.is_empty()) else { continue };
            // (Length first: `row_kernels_only` walks the chunk's deltas.)
            if len <= PIECE_ROWS || !row_kernels_only(res, &mine) {
                tasks.push((start, len, c, mine));
                continue;
            }
            // A prefill segment on the row kernels: pieces of rows, so both threads share it.
            let mut first = start;
            while first < start + len {
                let rows = PIECE_ROWS.min(start + len - first);
                let outs = mine
                    .iter_mut()
                    .map(|(out, rest, r)| {
                        let (piece, tail) = std::mem::take(rest).split_at_mut(rows * *out);
                        *rest = tail;
                        (*out, piece, r.clone())
                    })
                    .collect();
                tasks.push((first, rows, c, outs));
                first += rows;
            }
        }
        // Tasks of one composition next to each other (rows of a popular adapter, the pieces of
        // a prefill segment): the second reads the factors the first left in cache. Each row's
        // result does not depend on the order.
        tasks.sort_by(|a, b| modules_of(a.2).cmp(modules_of(b.2)));
        // Every thread claims ranges of tasks from the list, shrinking as the list runs out
        // (`kernels::claim`: a thread that comes free from the base GEMM beside this joins in,
        // and no thread waits on a fixed share), and takes its next task before it runs the
        // current one, so that while one task computes, the next one's compact factors are
        // already on their way from memory (decode rows of distinct modules read short
        // stretches the hardware prefetchers miss). The current task's kernels ask for them, one
        // region per kernel call, at the pace of their own reads: asked for in one burst before
        // the task, the requests filled the core's miss buffers and the thread stalled on them
        // instead of computing (one thread, deltas per decode step: lora32 6.4-7.4 -> 5.3-5.4 ms,
        // lora32_r16 10.0-10.5 -> 8.7-9.3). A task that repeats its thread's previous
        // composition asks for nothing (its factors are in cache, and a prefetch costs about a
        // cycle per line even then).
        let (entries, compact) = (&res.entries, &res.compact);
        // Each task behind its own lock: the claims hand every index out once, and the lock
        // moves the task (with its output slices) to the thread that claimed it.
        let slots: Vec<Mutex<Option<Task>>> = tasks.into_iter().map(|t| Mutex::new(Some(t))).collect();
        let claims = Claims::guided(slots.len(), 1);
        try_on_pool_threads(|| {
            let mut mine = 0..0;
            let mut next_task = || {
                let i = mine.next().or_else(|| {
                    mine = claims.claim()?;
                    mine.next()
                })?;
                let task = slots[i].lock().unwrap_or_else(PoisonError::into_inner).take();
                Some(task.expect("every task is claimed once"))
            };
            let mut cur = next_task();
            if let Some((_, _, _, outs)) = &cur {
                prefetch_factors(entries, compact, outs, (&mut Vec::new(), 0));
            }
            // Whether this task's modules differ from the previous task's on this thread.
            let mut look_ahead = true;
            let mut paced: Vec<&[f32]> = Vec::new();
            while let Some((start, len, comp, outs)) = cur {
                let next = next_task();
                let next_repeats = next.as_ref().is_some_and(|n| modules_of(comp).eq(modules_of(n.2)));
                paced.clear();
                if let Some((first, rows, _, next_outs)) = next.as_ref() {
                    if !next_repeats {
                        // The next task's compact factors are asked for by this task's compact
                        // kernels, one region each, at the pace of their reads; what they cannot
                        // take (more regions than this task has) now, in one burst.
                        let mine = outs.iter().flat_map(|(_, _, r)| &compact[r.clone()]).filter(|c| c.is_some()).count();
                        prefetch_factors(entries, compact, next_outs, (&mut paced, mine));
                    }
                    // Its first rows too (the quantization reads them first).
                    prefetch_rows(&xh[first * in_dim..(first + rows.min(&PREFETCH_ROWS)) * in_dim]);
                }
                let xs = &xh[start * in_dim..(start + len) * in_dim];
                // This thread's reused quantized rows (a nested use on one thread gets fresh ones).
                QUANT_ROWS.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut rows) => add_chunk_deltas((entries, compact), outs, xs, in_dim, &mut rows, look_ahead, &paced),
                    Err(_) => add_chunk_deltas((entries, compact), outs, xs, in_dim, &mut Vec::new(), look_ahead, &paced),
                })?;
                look_ahead = !next_repeats;
                cur = next;
            }
            Ok(())
        })
    }
}

/// The addresses of the modules whose factors `c` reads, in order (what a task's reads depend
/// on: equal for two compositions that read the same bytes, whatever their scales).
fn modules_of(c: &Composition) -> impl Iterator<Item = usize> + '_ {
    c.parts.iter().map(|(d, _)| std::sync::Arc::as_ptr(d) as usize)
}

/// Asks the CPU for the compact factors of the deltas `outs` list (ranges into `entries`; a
/// hint: see [`crate::kernels::lowrank::HostLowRank::prefetch`]), except the first compact
/// regions, up to `take` in all, which go into `paced` for a kernel to ask for at its own pace.
fn prefetch_factors<'m>(
    entries: &[(&MatrixDelta, f32)],
    compact: &[Option<CompactRef<'m>>],
    outs: &[TargetOut],
    (paced, take): (&mut Vec<&'m [f32]>, usize),
) {
    for (_, _, r) in outs {
        for ((m, _), c) in entries[r.clone()].iter().zip(&compact[r.clone()]) {
            match (m, c) {
                (_, Some(c)) if paced.len() < take => paced.push(c.region()),
                (_, Some(c)) => c.prefetch(),
                (MatrixDelta::Packed(h), None) => h.prefetch(),
                _ => {}
            }
        }
    }
}

/// Input rows of the next task asked for ahead of it (a decode task has one).
const PREFETCH_ROWS: usize = 2;

/// Rows per task of a prefill segment whose low-rank deltas all run on the row kernels.
const PIECE_ROWS: usize = 16;

/// Whether every low-rank or dense delta of a chunk's targets `outs` runs on the per-row kernels
/// for any number of rows (compact factors; sparse parts are done before, grouped).
fn row_kernels_only(res: &Resolved, outs: &[TargetOut]) -> bool {
    outs.iter().flat_map(|(_, _, r)| &res.entries[r.clone()]).all(|(m, _)| match m {
        MatrixDelta::Packed(h) => h.is_compact(),
        MatrixDelta::Sparse(_) => true,
        MatrixDelta::LowRank { .. } | MatrixDelta::Dense(_) => false,
    })
}

/// One chunk's low-rank and dense deltas of every target in `outs` for its rows `xs`
/// (`[len, in_dim]`): per-row kernels for compact factors (each row quantized once, into
/// `qrows`, for all compact targets) and for decode rows of f32 factors, GEMMs for longer
/// segments of f32 factors and for dense deltas. `look_ahead`: whether the compact kernels
/// prefetch (false when this thread just ran the same composition). `paced`: the next task's
/// compact factor regions, one per compact kernel call here, in order, which each call asks for
/// as it reads its own (see [`crate::kernels::lowrank::CompactRef::add_rows_q`]).
fn add_chunk_deltas(
    (entries, compact): (&[(&MatrixDelta, f32)], &[Option<CompactRef>]),
    outs: Vec<TargetOut>,
    xs: &[f32],
    in_dim: usize,
    qrows: &mut Vec<QuantRow>,
    look_ahead: bool,
    paced: &[&[f32]],
) -> Result<()> {
    let mut paced = paced.iter();
    let len = xs.len() / in_dim;
    let mut quantized = false;
    let mut quantize = |qrows: &mut Vec<QuantRow>| {
        if !quantized {
            if qrows.len() < len {
                qrows.resize_with(len, QuantRow::default);
            }
            for (q, xr) in qrows.iter_mut().zip(xs.chunks_exact(in_dim)) {
                q.set(xr);
            }
            quantized = true;
        }
    };
    for (out, dst, r) in outs {
        for ((m, scale), c) in entries[r.clone()].iter().zip(&compact[r]) {
            match (m, c) {
                // (First: it does not read the delta itself, whose map node is likely cold.)
                (_, Some(c)) => {
                    quantize(qrows);
                    c.add_rows_q(xs, qrows, dst, *scale, look_ahead, paced.next().copied().unwrap_or(&[]));
                }
                (MatrixDelta::Sparse(_), None) => {} // done by add_sparse_resolved
                (MatrixDelta::Packed(h), None) if h.is_compact() => {
                    quantize(qrows);
                    h.add_rows_q(xs, qrows, dst, *scale, look_ahead);
                }
                (MatrixDelta::Packed(h), None) if len <= ROW_KERNEL_MAX_ROWS => {
                    for (xr, yr) in xs.chunks_exact(in_dim).zip(dst.chunks_exact_mut(out)) {
                        h.add_row(xr, yr, *scale);
                    }
                }
                _ => {
                    let xt = Tensor::from_slice(xs, (len, in_dim), &candle_core::Device::Cpu)?;
                    let d = delta_product(m, &xt, *scale)?.flatten_all()?.to_vec1::<f32>()?;
                    for (o, v) in dst.iter_mut().zip(d) {
                        *o += v;
                    }
                }
            }
        }
    }
    Ok(())
}

impl RowDeltas for BatchDeltas<'_> {
    fn host_deltas(&self, ids: &[LinearId], x: &[f32], n: usize, outs: &[usize]) -> Result<Option<Vec<Option<Vec<f32>>>>> {
        if n == 0 {
            return Ok(Some(vec![None; ids.len()]));
        }
        let in_dim = x.len() / n;
        // Every touched layer's deltas in one call (nested inside the caller's join), all looked
        // up once.
        let all: Vec<Target> = ids.iter().map(|&id| Target::Linear(id)).collect();
        let res = self.resolve(&all);
        let keep: Vec<usize> = (0..ids.len()).filter(|&ti| res.touched(ti)).collect();
        let mut dhs: Vec<Option<Vec<f32>>> = (0..ids.len()).map(|ti| keep.contains(&ti).then(|| vec![0f32; n * outs[ti]])).collect();
        let mut targets: Vec<(Target, usize, &mut [f32])> =
            dhs.iter_mut().enumerate().filter_map(|(ti, dh)| dh.as_mut().map(|dh| (all[ti], outs[ti], dh.as_mut_slice()))).collect();
        if !targets.is_empty() {
            self.accumulate_host(&res.only(&keep), &mut targets, x, in_dim)?;
        }
        Ok(Some(dhs))
    }

    fn add_deltas(&self, id: LinearId, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let target = Target::Linear(id);
        let touched = self.touches(&target);
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
        let touched = self.touches(&Target::Embedding);
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
                        MatrixDelta::Packed(h) => {
                            // Not produced for embeddings (`ModuleDeltas::into_host` packs linear
                            // targets only); widened here so the match stays total.
                            let (at, bt) = h.factors();
                            let (rank, out) = (h.rank(), h.out_dim());
                            for (i, o) in row.iter_mut().enumerate() {
                                *o += scale * (0..rank).map(|j| bt[j * out + tok] * at[i * rank + j]).sum::<f32>();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::module_deltas::ModuleDeltas;
    use crate::model::linear::Proj;
    use candle_core::Device;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::sync::Arc;

    /// Compact LoRA deltas of two ranks through `host_deltas` (decode rows, a prefill segment cut
    /// into pieces, a two-part composition, a row without one): every row is its composition's
    /// f32 product within the 8-bit error, and bit for bit what the same row gives alone.
    #[test]
    fn compact_lora_rows_match_f32_and_a_batch_of_one() {
        let (inp, outs) = (64, [48usize, 16]);
        let ids = [LinearId { layer: 1, proj: Proj::Q }, LinearId { layer: 1, proj: Proj::K }];
        let mut rng = StdRng::seed_from_u64(5);
        let mut dense: Vec<Vec<Vec<f32>>> = Vec::new(); // [module][target] delta `[out, in]`
        let mut mods = Vec::new();
        for rank in [8, 24] {
            let mut m = ModuleDeltas::default();
            let mut ds = Vec::new();
            for (id, &out) in ids.iter().zip(&outs) {
                let a: Vec<f32> = (0..rank * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
                let b: Vec<f32> = (0..out * rank).map(|_| rng.random_range(-0.5f32..0.5)).collect();
                ds.push((0..out * inp).map(|i| (0..rank).map(|j| b[i / inp * rank + j] * a[j * inp + i % inp]).sum()).collect());
                let (a, b) =
                    (Tensor::from_vec(a, (rank, inp), &Device::Cpu).unwrap(), Tensor::from_vec(b, (out, rank), &Device::Cpu).unwrap());
                m.targets.insert(Target::Linear(*id), MatrixDelta::LowRank { a, b });
            }
            dense.push(ds);
            mods.push(Arc::new(m.into_host(true).unwrap()));
        }
        let comp = |parts: &[(usize, f32)]| Composition {
            parts: parts.iter().map(|&(m, s)| (Arc::clone(&mods[m]), s)).collect(),
            pinned: Vec::new(),
            key: String::new(),
        };
        let comps = [comp(&[(0, 1.0)]), comp(&[(1, 0.5)]), comp(&[(1, -1.0), (0, 2.0)])];
        let chunks = [(1, Some(&comps[0])), (2, None), (20, Some(&comps[1])), (1, Some(&comps[2])), (1, Some(&comps[0]))];
        let n: usize = chunks.iter().map(|c| c.0).sum();
        let x: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-1f32..1.0)).collect();
        let got = BatchDeltas::new(chunks, true).host_deltas(&ids, &x, n, &outs).unwrap().unwrap();
        let mut row = 0;
        for (len, c) in chunks {
            for r in row..row + len {
                let xr = &x[r * inp..(r + 1) * inp];
                let alone = BatchDeltas::new([(1, c)], true).host_deltas(&ids, xr, 1, &outs).unwrap().unwrap();
                for (ti, &out) in outs.iter().enumerate() {
                    let g = &got[ti].as_ref().expect("a touched target")[r * out..(r + 1) * out];
                    let mut want = vec![0f32; out];
                    for (m, s) in c
                        .map(|c| c.parts.iter().map(|(m, s)| (mods.iter().position(|x| Arc::ptr_eq(x, m)).unwrap(), *s)).collect())
                        .unwrap_or_else(Vec::new)
                    {
                        for (o, w) in want.iter_mut().enumerate() {
                            *w += s * dense[m][ti][o * inp..(o + 1) * inp].iter().zip(xr).map(|(d, x)| d * x).sum::<f32>();
                        }
                    }
                    let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let err = g.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                    assert!(err <= 0.03 * norm, "row {r}, target {ti}: error {err} against norm {norm}");
                    match (&alone[ti], c) {
                        (Some(a), _) => assert_eq!(&a[..], g, "row {r}, target {ti}: alone differs"),
                        (None, None) => assert!(g.iter().all(|v| *v == 0.0), "row {r} has no composition"),
                        (None, Some(_)) => panic!("row {r}: alone, its target {ti} is not touched"),
                    }
                }
            }
            row += len;
        }
    }
}
