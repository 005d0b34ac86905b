//! Applying per-request compositions inside a batch step: the [`RowDeltas`] implementation.
//!
//! The base product `y = x W^T` runs once for every row (before, or beside, this); here each
//! chunk's rows get the deltas of that chunk's own composition only: low-rank as `(x A^T) B^T`,
//! sparse grouped by module across rows with a cost that scales with the non-zeros, dense as
//! `x D^T`. Invariant: rows of a chunk
//! without a composition (or whose composition does not touch the layer) are left exactly as the
//! base computed them, so a request's result does not depend on its batch neighbours.
use std::cell::RefCell;
use std::thread::LocalKey;

use candle_core::{Result, Tensor};

use super::delta::{MatrixDelta, QuantRow, SparseBlock, SparseMatrix, Target, SPARSE_ROW_BLOCK};
use super::store::Composition;
use crate::model::linear::{LinearId, RowDeltas};
use crate::model::qgemm::SendPtr;

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

    /// Whether any chunk's composition has a delta for `target`.
    fn touches(&self, target: &Target) -> bool {
        self.chunks.iter().any(|c| c.2.is_some_and(|c| c.parts.iter().any(|(d, _)| d.targets.contains_key(target))))
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
    /// CPU path: one host copy of `x`, every composition's deltas accumulated into one host buffer,
    /// then a single add. Sparse deltas first, grouped by module ([`add_sparse_grouped`]): each
    /// module's non-zeros are read once per step for all rows using it. Then low-rank and dense
    /// deltas per chunk (per-row kernels for decode rows, GEMMs for prefill segments). Per row, the
    /// order of additions depends only on its own composition, never on its neighbours.
    fn add_deltas_cpu(&self, target: Target, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let (n, in_dim) = x.dims2()?;
        let out = y.dim(1)?;
        let xh = x.flatten_all()?.to_vec1::<f32>()?;
        let mut dh = vec![0f32; n * out];
        self.accumulate_host(&mut [(target, out, &mut dh)], &xh, in_dim)?;
        let dh = Tensor::from_vec(dh, (n, out), y.device())?;
        y + dh
    }

    /// Adds every chunk's deltas of each target for the rows `xh` (`[n, in_dim]`, host) into that
    /// target's `dh` (`[n, out]`, host): sparse parts first (grouped by module across rows, see
    /// [`add_sparse_grouped`]), then low-rank and dense parts per chunk, each row in its
    /// composition's order. A chunk's rows go through all targets back to back (q, k and v of one
    /// row read one adapter's factors in a row), chunks in parallel.
    fn accumulate_host(&self, targets: &mut [(Target, usize, &mut [f32])], xh: &[f32], in_dim: usize) -> Result<()> {
        use rayon::prelude::*;
        add_sparse_grouped(&self.chunks, targets, xh, in_dim);
        // Chunks own disjoint, consecutive row ranges: split every output once, by chunk.
        let mut tasks: Vec<(usize, usize, &Composition, Vec<(Target, usize, &mut [f32])>)> = Vec::with_capacity(self.chunks.len());
        let mut rests: Vec<(Target, usize, &mut [f32])> = targets.iter_mut().map(|(t, out, dh)| (*t, *out, &mut **dh)).collect();
        let mut consumed = 0;
        for &(start, len, comp) in &self.chunks {
            let mut mine = Vec::new();
            for (t, out, rest) in rests.iter_mut() {
                let (_, tail) = std::mem::take(rest).split_at_mut((start - consumed) * *out);
                let (piece, tail) = tail.split_at_mut(len * *out);
                *rest = tail;
                let non_sparse = comp.is_some_and(|c| c.parts.iter().any(|(d, _)| d.targets.get(t).is_some_and(|m| !matches!(m, MatrixDelta::Sparse(_)))));
                if non_sparse {
                    mine.push((*t, *out, piece));
                }
            }
            consumed = start + len;
            if let (Some(c), false) = (comp, mine.is_empty()) {
                tasks.push((start, len, c, mine));
            }
        }
        tasks.into_par_iter().try_for_each(|(start, len, c, outs)| {
            let xs = &xh[start * in_dim..(start + len) * in_dim];
            // This thread's reused quantized rows (a nested use on one thread gets fresh ones).
            QUANT_ROWS.with(|cell| match cell.try_borrow_mut() {
                Ok(mut rows) => add_chunk_deltas(c, outs, xs, in_dim, &mut rows),
                Err(_) => add_chunk_deltas(c, outs, xs, in_dim, &mut Vec::new()),
            })
        })
    }
}

/// One chunk's low-rank and dense deltas of every target in `outs` for its rows `xs`
/// (`[len, in_dim]`): per-row kernels for decode rows (each row quantized once, into `qrows`, for
/// all compact targets), GEMMs for prefill segments.
fn add_chunk_deltas(c: &Composition, outs: Vec<(Target, usize, &mut [f32])>, xs: &[f32], in_dim: usize, qrows: &mut Vec<QuantRow>) -> Result<()> {
    let len = xs.len() / in_dim;
    let mut quantized = false;
    for (target, out, dst) in outs {
        for (deltas, scale) in &c.parts {
            let Some(m) = deltas.targets.get(&target) else { continue };
            match (m, deltas.host_low_rank(&target)) {
                (MatrixDelta::Sparse(_), _) => {} // done by add_sparse_grouped
                (MatrixDelta::LowRank { .. }, Some(h)) if len <= ROW_KERNEL_MAX_ROWS && h.is_compact() => {
                    if !quantized {
                        if qrows.len() < len {
                            qrows.resize_with(len, QuantRow::default);
                        }
                        for (q, xr) in qrows.iter_mut().zip(xs.chunks_exact(in_dim)) {
                            q.set(xr);
                        }
                        quantized = true;
                    }
                    for ((xr, q), yr) in xs.chunks_exact(in_dim).zip(qrows.iter()).zip(dst.chunks_exact_mut(out)) {
                        h.add_row_q(xr, q, yr, *scale);
                    }
                }
                (MatrixDelta::LowRank { .. }, Some(h)) if len <= ROW_KERNEL_MAX_ROWS => {
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

/// Batch rows per register tile of the grouped sparse kernel.
const SPARSE_TILE: usize = 8;

/// One target's sparse work in a step: the distinct sparse matrices with the batch rows that use
/// each, and every row's parts.
struct SparsePlan<'a> {
    /// Distinct sparse matrices of the step, each with the batch rows that use it.
    groups: Vec<(&'a SparseMatrix, Vec<usize>)>,
    /// Every (batch row, group, index of the row in the group, scale), rows in order and a row's
    /// parts in its composition's order.
    row_parts: Vec<(usize, usize, usize, f32)>,
    /// Per group, its first tile of [`SPARSE_TILE`] rows among all groups' tiles.
    tile0: Vec<usize>,
    /// Tiles of all groups.
    tiles: usize,
}

impl<'a> SparsePlan<'a> {
    fn new(chunks: &[(usize, usize, Option<&'a Composition>)], target: Target) -> Option<Self> {
        let mut plan = SparsePlan { groups: Vec::new(), row_parts: Vec::new(), tile0: Vec::new(), tiles: 0 };
        let mut parts: Vec<(&SparseMatrix, f32)> = Vec::new();
        for &(start, len, comp) in chunks {
            let Some(c) = comp else { continue };
            parts.clear();
            parts.extend(c.parts.iter().filter_map(|(d, s)| match d.targets.get(&target) {
                Some(MatrixDelta::Sparse(sp)) => Some((sp, *s)),
                _ => None,
            }));
            for row in start..start + len {
                for &(sp, scale) in &parts {
                    let g = match plan.groups.iter().position(|(m, _)| std::ptr::eq(*m, sp)) {
                        Some(g) => g,
                        None => {
                            plan.groups.push((sp, Vec::new()));
                            plan.groups.len() - 1
                        }
                    };
                    plan.row_parts.push((row, g, plan.groups[g].1.len(), scale));
                    plan.groups[g].1.push(row);
                }
            }
        }
        for (_, rows) in &plan.groups {
            plan.tile0.push(plan.tiles);
            plan.tiles += rows.len().div_ceil(SPARSE_TILE);
        }
        (!plan.groups.is_empty()).then_some(plan)
    }

    /// Whether the groups hold the same rows in the same order (their transposed inputs agree).
    fn same_rows(&self, other: &SparsePlan<'_>) -> bool {
        self.groups.len() == other.groups.len() && self.groups.iter().zip(&other.groups).all(|(a, b)| a.1 == b.1)
    }
}

/// Writes the groups' input rows transposed in tiles of [`SPARSE_TILE`] rows into `xt`
/// (`[in][SPARSE_TILE]` per tile, groups in order, lanes without a row zero): every value of
/// `xt` (`tiles * in_dim * SPARSE_TILE`) is written.
fn transpose_inputs(plan: &SparsePlan<'_>, xh: &[f32], in_dim: usize, xt: &mut [f32]) {
    let tile_len = in_dim * SPARSE_TILE;
    assert_eq!(xt.len(), plan.tiles * tile_len);
    let mut src: Vec<&[f32]> = Vec::with_capacity(SPARSE_TILE);
    let mut dst_tiles = xt.chunks_exact_mut(tile_len);
    for (_, rows) in &plan.groups {
        for tile in rows.chunks(SPARSE_TILE) {
            src.clear();
            src.extend(tile.iter().map(|&r| &xh[r * in_dim..(r + 1) * in_dim]));
            interleave_rows(&src, dst_tiles.next().expect("one buffer tile per group tile"));
        }
    }
}

thread_local! {
    // Buffers of the sparse step kept per thread between calls. The step asks for the same few
    // sizes hundreds of times, and each user writes every element before reading it, so they
    // need no zeroing: fresh zeroed buffers cost tens of MB of memset per decode step.
    static INPUT_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PROD_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Decode rows quantized for the compact LoRA kernels, kept between calls like the above.
    static QUANT_ROWS: RefCell<Vec<QuantRow>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` values of this thread's `buf`, grown if needed; the values are whatever an
/// earlier use left (the caller writes before it reads). A nested use of the same buffer on one
/// thread (a worker stealing another step's task while it holds it) gets a fresh one instead.
fn with_reused<R>(buf: &'static LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    buf.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            if cfg!(debug_assertions) {
                // Tests run in debug builds: a read before a write shows up as NaN in results.
                v[..len].fill(f32::NAN);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![if cfg!(debug_assertions) { f32::NAN } else { 0.0 }; len]),
    })
}

/// Adds every sparse delta of each target to its `dh` (`[n, out]`), reading each module's
/// non-zeros once for all the batch rows that use it. For each (row, weight row) the value is
/// `scale * sum_i v_i x[c_i]` accumulated in column order, as [`SparseMatrix::add_matmul_t`]
/// computes it, and a row's sparse parts are added in its composition's order. Targets whose
/// groups hold the same rows (q, k and v of lang+task modules) share one transposed input; the
/// (target, row block) tasks of all targets run as one parallel loop.
fn add_sparse_grouped(chunks: &[(usize, usize, Option<&Composition>)], targets: &mut [(Target, usize, &mut [f32])], xh: &[f32], in_dim: usize) {
    use rayon::prelude::*;
    let plans: Vec<Option<SparsePlan>> = targets.iter().map(|(t, _, _)| SparsePlan::new(chunks, *t)).collect();
    let tile_len = in_dim * SPARSE_TILE;
    // One transposed input per distinct set of group rows, at an offset of one buffer. Built here,
    // on the calling thread: a parallel loop over one or two inputs cost more in thread wake-ups
    // than it saved (measured).
    let mut firsts: Vec<(usize, usize)> = Vec::new(); // (plan, offset)
    let mut input_at: Vec<usize> = Vec::with_capacity(plans.len());
    let mut total = 0;
    for (i, plan) in plans.iter().enumerate() {
        let Some(plan) = plan else {
            input_at.push(usize::MAX);
            continue;
        };
        let shared = firsts.iter().find(|&&(j, _)| plans[j].as_ref().is_some_and(|p| p.same_rows(plan)));
        input_at.push(match shared {
            Some(&(_, at)) => at,
            None => {
                let at = total;
                firsts.push((i, at));
                total += plan.tiles * tile_len;
                at
            }
        });
    }
    let outs: Vec<(usize, SendPtr)> = targets.iter_mut().map(|(_, out, dh)| (*out, SendPtr(dh.as_mut_ptr()))).collect();
    let tasks: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_some())
        .flat_map(|(i, _)| (0..outs[i].0.div_ceil(SPARSE_ROW_BLOCK)).map(move |blk| (i, blk)))
        .collect();
    with_reused(&INPUT_BUF, total, |inputs| {
        for &(i, at) in &firsts {
            let plan = plans[i].as_ref().expect("a planned target");
            transpose_inputs(plan, xh, in_dim, &mut inputs[at..at + plan.tiles * tile_len]);
        }
        let inputs = &*inputs;
        tasks.into_par_iter().for_each(|(i, blk)| {
            let plan = plans[i].as_ref().expect("tasks only for planned targets");
            let (out, dst) = (outs[i].0, &outs[i].1);
            let tiles = plan.tiles;
            let xt = &inputs[input_at[i]..input_at[i] + tiles * tile_len];
            let (r0, r1) = (blk * SPARSE_ROW_BLOCK, ((blk + 1) * SPARSE_ROW_BLOCK).min(out));
            let w = r1 - r0;
            // Unscaled products of every group tile for this block, lane-major:
            // [tile][SPARSE_TILE][w], every value written by `sparse_block_tile`.
            with_reused(&PROD_BUF, tiles * SPARSE_TILE * w, |prods| {
                with_reused(&SCRATCH_BUF, w * SPARSE_TILE, |scratch| {
                    let mut prod_tiles = prods.chunks_exact_mut(SPARSE_TILE * w).zip(xt.chunks_exact(tile_len));
                    for (g, (sp, rows)) in plan.groups.iter().enumerate() {
                        // The next group's block is requested a whole group's work ahead (this
                        // one's was requested one ahead, or is requested now by the kernel).
                        if let Some((next, _)) = plan.groups.get(g + 1) {
                            prefetch_block_l2(next, blk);
                        }
                        for (pt, xt) in prod_tiles.by_ref().take(rows.len().div_ceil(SPARSE_TILE)) {
                            sparse_block_tile(sp, blk, xt, scratch, pt);
                        }
                    }
                });
                for &(row, g, j, scale) in &plan.row_parts {
                    // SAFETY: this task alone writes columns r0..r1 of this target's rows; rows
                    // are distinct and every target has its own buffer.
                    let yr = unsafe { std::slice::from_raw_parts_mut(dst.0.add(row * out + r0), w) };
                    let (tile, lane) = (plan.tile0[g] + j / SPARSE_TILE, j % SPARSE_TILE);
                    add_scaled(yr, &prods[(tile * SPARSE_TILE + lane) * w..][..w], scale);
                }
            });
        });
    });
}

/// `y += scale * p`, element by element (a multiply, then an add).
fn add_scaled(y: &mut [f32], p: &[f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        unsafe fn avx(y: &mut [f32], p: &[f32], scale: f32) {
            for (y, p) in y.iter_mut().zip(p) {
                *y += scale * p;
            }
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX.
            return unsafe { avx(y, p, scale) };
        }
    }
    for (y, p) in y.iter_mut().zip(p) {
        *y += scale * p;
    }
}

/// For the rows of block `blk` of `sp` (`r0..r1`, `w` rows):
/// `out[l][r - r0] = sum_i v_i * xt[c_i][l]` for each lane `l` of a tile of [`SPARSE_TILE`]
/// transposed input rows (`xt`: `[in][SPARSE_TILE]`), every row's sum in column order. `scratch`
/// holds `w * SPARSE_TILE` values (the row-major products before they are split by lane).
fn sparse_block_tile(sp: &SparseMatrix, blk: usize, xt: &[f32], scratch: &mut [f32], out: &mut [f32]) {
    let (r0, r1) = (blk * SPARSE_ROW_BLOCK, ((blk + 1) * SPARSE_ROW_BLOCK).min(sp.rows));
    let w = r1 - r0;
    assert_eq!(out.len(), w * SPARSE_TILE);
    assert_eq!(scratch.len(), w * SPARSE_TILE);
    assert_eq!(xt.len(), sp.cols * SPARSE_TILE);
    let b = sp.block(blk);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            assert!(b.order.iter().all(|&i| (i as usize) < w));
            // SAFETY: the CPU has the features; the block's runs cover its entries (built with
            // the matrix) and its order names rows of the block (checked above); column indices
            // are < sp.cols (checked when the matrix was built) and `xt` holds sp.cols columns of
            // SPARSE_TILE lanes.
            unsafe { sparse_block_tile_avx2(&b, xt, scratch) };
            deinterleave_lanes(scratch, out);
            return;
        }
    }
    let mut e = 0;
    let mut rows = b.order.iter();
    for &(len, n) in b.runs {
        for &i in rows.by_ref().take(n as usize) {
            let o = &mut scratch[i as usize * SPARSE_TILE..][..SPARSE_TILE];
            o.fill(0.0);
            for (&v, &c) in b.values[e..e + len as usize].iter().zip(&b.col_idx[e..e + len as usize]) {
                let xc = &xt[c as usize * SPARSE_TILE..][..SPARSE_TILE];
                for (a, xv) in o.iter_mut().zip(xc) {
                    *a = v.mul_add(*xv, *a);
                }
            }
            e += len as usize;
        }
    }
    deinterleave_lanes(scratch, out);
}

/// Asks for every line of a block's column indices and values to be brought into the cache level
/// `HINT` names (`_MM_HINT_T0`, `_MM_HINT_T1`, ...). A hint: no effect on results.
#[cfg(target_arch = "x86_64")]
fn prefetch_block<const HINT: i32>(b: &SparseBlock<'_>) {
    use std::arch::x86_64::_mm_prefetch;
    // 16 values or 32 column indices per 64-byte line.
    for i in (0..b.values.len()).step_by(16) {
        // SAFETY: a prefetch never faults; the addresses are inside the two arrays.
        unsafe {
            _mm_prefetch::<HINT>(b.values.as_ptr().add(i) as *const i8);
            if i % 32 == 0 {
                _mm_prefetch::<HINT>(b.col_idx.as_ptr().add(i) as *const i8);
            }
        }
    }
}

/// Asks for block `blk` of `sp` to be brought into L2.
fn prefetch_block_l2(sp: &SparseMatrix, blk: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_block::<{ std::arch::x86_64::_MM_HINT_T1 }>(&sp.block(blk));
}

/// The products of one block, row-major (`scratch[i * SPARSE_TILE + l]` for row `i` of the
/// block), streaming its entries front to back: runs of equal length, each through a loop with
/// a fixed trip count.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sparse_block_tile_avx2(b: &SparseBlock<'_>, xt: &[f32], scratch: &mut [f32]) {
    use std::arch::x86_64::*;
    const _: () = assert!(SPARSE_TILE == 8);
    let (cols, vals) = (b.col_idx.as_ptr(), b.values.as_ptr());
    // The block is short (a few KB) and its matrix differs from the previous call's, so the
    // hardware prefetcher has no stream to follow yet: request every line of it up front.
    prefetch_block::<_MM_HINT_T0>(b);
    let mut k = Kern { cols, vals, xt: xt.as_ptr(), out: scratch.as_mut_ptr() };
    let mut at = 0;
    for &(len, n) in b.runs {
        let rows = b.order.get_unchecked(at..at + n as usize);
        at += n as usize;
        macro_rules! fixed {
            ($($l:literal)*) => {
                match len {
                    $($l => k.rows(rows, $l),)*
                    _ => k.rows(rows, len as usize),
                }
            };
        }
        fixed!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    }
}

/// A cursor over one block's entries for [`sparse_block_tile_avx2`].
#[cfg(target_arch = "x86_64")]
struct Kern {
    /// The next entry.
    cols: *const u16,
    vals: *const f32,
    xt: *const f32,
    out: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl Kern {
    /// The next `rows.len()` rows (indices within the block), `len` entries each. Inlined into
    /// each arm of the dispatch on the run length, so small lengths become fixed trip counts.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows(&mut self, rows: &[u16], len: usize) {
        use std::arch::x86_64::*;
        for &r in rows {
            let mut acc = _mm256_setzero_ps();
            for i in 0..len {
                let x = _mm256_loadu_ps(self.xt.add(*self.cols.add(i) as usize * SPARSE_TILE));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(*self.vals.add(i)), x, acc);
            }
            self.cols = self.cols.add(len);
            self.vals = self.vals.add(len);
            _mm256_storeu_ps(self.out.add(r as usize * SPARSE_TILE), acc);
        }
    }
}

/// `dst[c * SPARSE_TILE + l] = src[l][c]`: up to [`SPARSE_TILE`] rows of equal length interleaved
/// column by column (`dst`: `[len][SPARSE_TILE]`; lanes without a source row are zero).
fn interleave_rows(src: &[&[f32]], dst: &mut [f32]) {
    assert!(src.len() <= SPARSE_TILE);
    let n = dst.len() / SPARSE_TILE;
    assert!(src.iter().all(|r| r.len() == n) && dst.len() == n * SPARSE_TILE);
    #[allow(unused_mut)]
    let mut c0 = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; the lengths were checked above.
        c0 = unsafe { interleave_avx(src, n, dst) };
    }
    for c in c0..n {
        for l in 0..SPARSE_TILE {
            dst[c * SPARSE_TILE + l] = src.get(l).map_or(0.0, |r| r[c]);
        }
    }
}

/// `dst[l][i] = src[i * SPARSE_TILE + l]`: the inverse of [`interleave_rows`] for one tile
/// (`src`: `[w][SPARSE_TILE]`, `dst`: `[SPARSE_TILE][w]`).
fn deinterleave_lanes(src: &[f32], dst: &mut [f32]) {
    let w = src.len() / SPARSE_TILE;
    assert!(src.len() == w * SPARSE_TILE && dst.len() == src.len());
    #[allow(unused_mut)]
    let mut i0 = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; the lengths were checked above.
        i0 = unsafe { deinterleave_avx(src, w, dst) };
    }
    for i in i0..w {
        for l in 0..SPARSE_TILE {
            dst[l * w + i] = src[i * SPARSE_TILE + l];
        }
    }
}

/// [`interleave_rows`] for whole 8x8 blocks; returns the columns done. `src` rows hold `n`
/// values and `dst` `n * SPARSE_TILE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn interleave_avx(src: &[&[f32]], n: usize, dst: &mut [f32]) -> usize {
    let zeros = [0f32; SPARSE_TILE];
    let mut c0 = 0;
    while c0 + SPARSE_TILE <= n {
        // Each row pointer has SPARSE_TILE readable values from c0 (or is the zero row).
        let rows: [*const f32; SPARSE_TILE] = std::array::from_fn(|l| src.get(l).map_or(zeros.as_ptr(), |r| r.as_ptr().add(c0)));
        transpose8(rows, dst.as_mut_ptr().add(c0 * SPARSE_TILE), SPARSE_TILE);
        c0 += SPARSE_TILE;
    }
    c0
}

/// [`deinterleave_lanes`] for whole 8x8 blocks; returns the rows done (`src`: `[w][SPARSE_TILE]`,
/// `dst` the same size).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn deinterleave_avx(src: &[f32], w: usize, dst: &mut [f32]) -> usize {
    let mut i0 = 0;
    while i0 + SPARSE_TILE <= w {
        let rows: [*const f32; SPARSE_TILE] = std::array::from_fn(|i| src.as_ptr().add((i0 + i) * SPARSE_TILE));
        // The stores go to dst[l * w + i0..][..SPARSE_TILE] with i0 + SPARSE_TILE <= w.
        transpose8(rows, dst.as_mut_ptr().add(i0), w);
        i0 += SPARSE_TILE;
    }
    i0
}

/// 8x8 transpose: reads 8 consecutive values from each `rows[i]` and writes column `j` of that
/// block as 8 consecutive values at `dst + j * dst_stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8(rows: [*const f32; 8], dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i]));
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let cols = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (j, c) in cols.into_iter().enumerate() {
        _mm256_storeu_ps(dst.add(j * dst_stride), c);
    }
}

impl RowDeltas for BatchDeltas<'_> {
    fn host_deltas(&self, ids: &[LinearId], x: &[f32], n: usize, outs: &[usize]) -> Result<Option<Vec<Option<Vec<f32>>>>> {
        if n == 0 {
            return Ok(Some(vec![None; ids.len()]));
        }
        let in_dim = x.len() / n;
        // Every touched layer's deltas in one call (nested inside the caller's join).
        let mut dhs: Vec<Option<Vec<f32>>> =
            ids.iter().zip(outs).map(|(&id, &out)| self.touches(&Target::Linear(id)).then(|| vec![0f32; n * out])).collect();
        let mut targets: Vec<(Target, usize, &mut [f32])> = ids
            .iter()
            .zip(outs)
            .zip(dhs.iter_mut())
            .filter_map(|((&id, &out), dh)| dh.as_mut().map(|dh| (Target::Linear(id), out, dh.as_mut_slice())))
            .collect();
        if !targets.is_empty() {
            self.accumulate_host(&mut targets, x, in_dim)?;
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
    use crate::adapters::delta::ModuleDeltas;
    use crate::model::linear::Proj;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::sync::Arc;

    fn sparse(rng: &mut StdRng, rows: usize, cols: usize, nnz: usize) -> SparseMatrix {
        let flat: Vec<u64> = (0..nnz).map(|_| rng.random_range(0..(rows * cols) as u64)).collect();
        let vals: Vec<f32> = (0..nnz).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        SparseMatrix::from_flat(rows, cols, &flat, &vals).unwrap()
    }

    fn comp(parts: &[(&Arc<ModuleDeltas>, f32)]) -> Composition {
        Composition { parts: parts.iter().map(|(m, s)| (Arc::clone(m), *s)).collect(), pinned: Vec::new(), key: String::new() }
    }

    /// The grouped kernel equals the per-row CSR product, and a row's result does not depend on
    /// its batch neighbours (bit for bit).
    #[test]
    fn grouped_sparse_equals_per_row_and_is_batch_independent() {
        // Two blocks and a tail of 8-lane transposes on both sides; rows of 0 to about 40
        // non-zeros (fixed-length and run-time-length kernel loops).
        let (out, inp) = (SPARSE_ROW_BLOCK + 150, 70);
        let target = Target::Linear(LinearId { layer: 0, proj: Proj::Q });
        let mut rng = StdRng::seed_from_u64(11);
        let mods: Vec<Arc<ModuleDeltas>> = [300, 1500, 6000]
            .into_iter()
            .map(|nnz| {
                let mut m = ModuleDeltas::default();
                m.targets.insert(target, MatrixDelta::Sparse(sparse(&mut rng, out, inp, nnz)));
                Arc::new(m)
            })
            .collect();
        let a = comp(&[(&mods[0], 1.0), (&mods[1], 0.5)]);
        let b = comp(&[(&mods[1], -1.0)]);
        let c = comp(&[(&mods[2], 2.0), (&mods[0], 1.0)]);
        // chunks: A (1 row), B (prefill of 11 rows: more than one tile), none, C, A again.
        let chunks: Vec<(usize, usize, Option<&Composition>)> =
            vec![(0, 1, Some(&a)), (1, 11, Some(&b)), (12, 1, None), (13, 1, Some(&c)), (14, 1, Some(&a))];
        let n = 15;
        let mut x: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let row0 = x[..inp].to_vec();
        x[14 * inp..15 * inp].copy_from_slice(&row0);
        let mut dh = vec![0f32; n * out];
        add_sparse_grouped(&chunks, &mut [(target, out, &mut dh)], &x, inp);
        // Reference: per row, parts in order, with the plain CSR kernel.
        for &(start, len, comp) in &chunks {
            for r in start..start + len {
                let mut want = vec![0f32; out];
                if let Some(c) = comp {
                    for (m, s) in &c.parts {
                        let Some(MatrixDelta::Sparse(sp)) = m.targets.get(&target) else { unreachable!() };
                        sp.add_matmul_t(&x[r * inp..(r + 1) * inp], 1, &mut want, *s);
                    }
                }
                for (g, w) in dh[r * out..(r + 1) * out].iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "row {r}: {g} vs {w}");
                }
            }
        }
        assert_eq!(dh[..out], dh[14 * out..15 * out], "same input and composition, different neighbours");
        assert!(dh[12 * out..13 * out].iter().all(|v| *v == 0.0), "a row without a composition is untouched");
        // Alone in its own batch: bit-identical to its row in the mixed batch.
        let mut alone = vec![0f32; out];
        add_sparse_grouped(&[(0, 1, Some(&c))], &mut [(target, out, &mut alone)], &x[13 * inp..14 * inp], inp);
        assert_eq!(alone[..], dh[13 * out..14 * out]);
    }

    /// Several targets in one call (some sharing their transposed inputs, one whose groups differ,
    /// one untouched) give exactly what one call per target gives.
    #[test]
    fn grouped_sparse_over_several_targets_equals_one_call_each() {
        let inp = 40;
        let q = Target::Linear(LinearId { layer: 0, proj: Proj::Q });
        let k = Target::Linear(LinearId { layer: 0, proj: Proj::K });
        let v = Target::Linear(LinearId { layer: 0, proj: Proj::V });
        let o = Target::Linear(LinearId { layer: 0, proj: Proj::O });
        let outs = [(q, 50), (k, SPARSE_ROW_BLOCK + 9), (v, 30), (o, 20)];
        let mut rng = StdRng::seed_from_u64(3);
        // Module 0 touches q, k, v; module 1 touches q and k only: v's groups differ from q's and
        // k's (which share their inputs); nobody touches o.
        let mods: Vec<Arc<ModuleDeltas>> = (0..2)
            .map(|i| {
                let mut m = ModuleDeltas::default();
                for &(t, out) in &outs[..if i == 0 { 3 } else { 2 }] {
                    m.targets.insert(t, MatrixDelta::Sparse(sparse(&mut rng, out, inp, 400)));
                }
                Arc::new(m)
            })
            .collect();
        let a = comp(&[(&mods[1], 0.5), (&mods[0], 1.0)]);
        let b = comp(&[(&mods[0], -2.0)]);
        let chunks: Vec<(usize, usize, Option<&Composition>)> = vec![(0, 1, Some(&a)), (1, 3, Some(&b)), (4, 1, None), (5, 1, Some(&a))];
        let n = 6;
        let x: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut together: Vec<Vec<f32>> = outs.iter().map(|&(_, out)| vec![0f32; n * out]).collect();
        let mut targets: Vec<(Target, usize, &mut [f32])> =
            outs.iter().zip(together.iter_mut()).map(|(&(t, out), dh)| (t, out, dh.as_mut_slice())).collect();
        add_sparse_grouped(&chunks, &mut targets, &x, inp);
        for (&(t, out), got) in outs.iter().zip(&together) {
            let mut alone = vec![0f32; n * out];
            add_sparse_grouped(&chunks, &mut [(t, out, &mut alone)], &x, inp);
            assert_eq!(got, &alone, "{t:?}");
        }
        assert!(together[3].iter().all(|v| *v == 0.0) && together[2].iter().any(|v| *v != 0.0));
    }

    /// The 8-lane interleave and its inverse against plain index arithmetic, on lengths with and
    /// without a remainder and tiles with fewer than 8 rows.
    #[test]
    fn lane_interleaving_round_trips() {
        for (rows, n) in [(8, 16), (3, 21), (8, 7), (1, 8), (5, 0)] {
            let src: Vec<Vec<f32>> = (0..rows).map(|r| (0..n).map(|c| (r * 1000 + c) as f32).collect()).collect();
            let refs: Vec<&[f32]> = src.iter().map(|r| r.as_slice()).collect();
            let mut inter = vec![f32::NAN; n * SPARSE_TILE];
            interleave_rows(&refs, &mut inter);
            for c in 0..n {
                for l in 0..SPARSE_TILE {
                    let want = if l < rows { src[l][c] } else { 0.0 };
                    assert_eq!(inter[c * SPARSE_TILE + l], want, "rows {rows} n {n} c {c} l {l}");
                }
            }
            let mut back = vec![f32::NAN; n * SPARSE_TILE];
            deinterleave_lanes(&inter, &mut back);
            for l in 0..SPARSE_TILE {
                for c in 0..n {
                    assert_eq!(back[l * n + c], inter[c * SPARSE_TILE + l]);
                }
            }
        }
    }
}
