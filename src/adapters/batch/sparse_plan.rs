//! The grouped sparse step: each sparse module's non-zeros read once per step for all the batch
//! rows that use it. A plan per target groups the rows by module; inputs are transposed into
//! tiles of [`SPARSE_TILE`] rows; (target, row block) tasks run in parallel, each writing its own
//! block of output columns.
//!
//! Invariant: a row's value is `scale * sum_i v_i x[c_i]` accumulated in column order, its sparse
//! parts added in its composition's order, so it does not depend on its batch neighbours.
use std::ops::Range;

use super::buffers::{with_reused, INPUT_BUF, PROD_BUF};
use super::resolved::Resolved;
#[cfg(test)]
use super::resolved::StepIndex;
use crate::adapters::composition::Composition;
use crate::adapters::module_deltas::MatrixDelta;
use crate::adapters::target::Target;
use crate::kernels::shared_out::ColumnBlocks;
use crate::kernels::sparse_layout::{SparseMatrix, SPARSE_ROW_BLOCK};
use crate::kernels::sparse_tile::{add_lanes_scaled, interleave_rows, prefetch_block_start, sparse_block_tile, SPARSE_TILE};

/// One lane of a tile: `(batch row, scale, pass)`, where the pass is the part's index among its
/// row's sparse parts for the target (the lanes of pass 0 are added first, so every row gets its
/// parts in its composition's order); `pass == NO_PASS` for a lane without a row.
type Lane = (u32, f32, u32);
const NO_PASS: u32 = u32::MAX;

/// One target's sparse work in a step: the distinct sparse matrices with the batch rows that use
/// each, and where each (row, part) sits among the tiles.
struct SparsePlan<'a> {
    /// Distinct sparse matrices of the step, each with its range of `rows`.
    groups: Vec<(&'a SparseMatrix, Range<usize>)>,
    /// The batch rows of every group, group after group, each group's in batch order (a row once
    /// per part of its composition that uses the group's matrix).
    rows: Vec<usize>,
    /// Every tile of [`SPARSE_TILE`] rows of every group, groups in order: its lanes.
    lanes: Vec<[Lane; SPARSE_TILE]>,
    /// The most sparse parts any row has for the target.
    passes: u32,
}

impl<'a> SparsePlan<'a> {
    /// The plan of target `ti` of `res` (None when no chunk has a sparse delta for it).
    fn new(chunks: &[(usize, usize, Option<&'a Composition>)], res: &Resolved<'a>, ti: usize) -> Option<Self> {
        if !res.any_sparse(ti) {
            return None;
        }
        // Every (row, part) with its group, in row order and each row's parts in order.
        let mut mats: Vec<(&SparseMatrix, usize)> = Vec::new(); // (matrix, rows using it)
        let mut parts: Vec<(usize, u32, f32, u32)> = Vec::new(); // (row, group, scale, pass)
        let mut passes = 0;
        for (ci, &(start, len, _)) in chunks.iter().enumerate() {
            let first = parts.len();
            let mut pass = 0;
            for &(m, scale) in res.of(ci, ti) {
                let MatrixDelta::Sparse(sp) = m else { continue };
                let g = match mats.iter().position(|(m, _)| std::ptr::eq(*m, sp)) {
                    Some(g) => g,
                    None => {
                        mats.push((sp, 0));
                        mats.len() - 1
                    }
                };
                mats[g].1 += len;
                parts.push((start, g as u32, scale, pass));
                pass += 1;
            }
            passes = passes.max(pass);
            // The chunk's other rows have the same parts.
            let n = parts.len() - first;
            for row in start + 1..start + len {
                for k in first..first + n {
                    let (_, g, s, p) = parts[k];
                    parts.push((row, g, s, p));
                }
            }
        }
        if mats.is_empty() {
            return None;
        }
        let mut groups = Vec::with_capacity(mats.len());
        let mut tile0 = Vec::with_capacity(mats.len());
        let (mut at, mut tiles) = (0, 0);
        for &(sp, n) in &mats {
            groups.push((sp, at..at));
            tile0.push(tiles);
            at += n;
            tiles += n.div_ceil(SPARSE_TILE);
        }
        let mut rows = vec![0; at];
        let mut lanes = vec![[(0, 0.0, NO_PASS); SPARSE_TILE]; tiles];
        // (Chunks are in row order, so each group's rows come out in batch order.)
        for &(row, g, scale, pass) in &parts {
            let (g, r) = (g as usize, &mut groups[g as usize].1);
            let j = r.end - r.start;
            rows[r.end] = row;
            r.end += 1;
            lanes[tile0[g] + j / SPARSE_TILE][j % SPARSE_TILE] = (row as u32, scale, pass);
        }
        Some(SparsePlan { groups, rows, lanes, passes })
    }

    /// The batch rows of group `g`.
    fn group_rows(&self, g: usize) -> &[usize] {
        &self.rows[self.groups[g].1.clone()]
    }

    /// Whether the groups hold the same rows in the same order (their transposed inputs agree).
    fn same_rows(&self, other: &SparsePlan<'_>) -> bool {
        self.rows == other.rows && self.groups.len() == other.groups.len() && self.groups.iter().zip(&other.groups).all(|(a, b)| a.1 == b.1)
    }
}

/// Writes the groups' input rows transposed in tiles of [`SPARSE_TILE`] rows into `xt`
/// (`[in][SPARSE_TILE]` per tile, groups in order, lanes without a row zero): every value of
/// `xt` (`tiles * in_dim * SPARSE_TILE`) is written.
fn transpose_inputs(plan: &SparsePlan<'_>, xh: &[f32], in_dim: usize, xt: &mut [f32]) {
    let tile_len = in_dim * SPARSE_TILE;
    assert_eq!(xt.len(), plan.lanes.len() * tile_len);
    let mut src: Vec<&[f32]> = Vec::with_capacity(SPARSE_TILE);
    let mut dst_tiles = xt.chunks_exact_mut(tile_len);
    for g in 0..plan.groups.len() {
        for tile in plan.group_rows(g).chunks(SPARSE_TILE) {
            src.clear();
            src.extend(tile.iter().map(|&r| &xh[r * in_dim..(r + 1) * in_dim]));
            interleave_rows(&src, dst_tiles.next().expect("one buffer tile per group tile"));
        }
    }
}

/// [`add_sparse_resolved`] looking the deltas up itself (the tests' entry point).
#[cfg(test)]
fn add_sparse_grouped(
    chunks: &[(usize, usize, Option<&Composition>)],
    targets: &mut [(Target, usize, &mut [f32])],
    xh: &[f32],
    in_dim: usize,
) {
    let ts: Vec<Target> = targets.iter().map(|t| t.0).collect();
    add_sparse_resolved(chunks, &Resolved::new(chunks, &StepIndex::new(chunks), &ts), targets, xh, in_dim)
}

/// Adds every sparse delta of each target to its `dh` (`[n, out]`), reading each module's
/// non-zeros once for all the batch rows that use it. For each (row, weight row) the value is
/// `scale * sum_i v_i x[c_i]` accumulated in column order, as [`SparseMatrix::add_matmul_t`]
/// computes it, and a row's sparse parts are added in its composition's order. Targets whose
/// groups hold the same rows (q, k and v of lang+task modules) share one transposed input; the
/// (target, row block) tasks of all targets run as one parallel loop.
///
/// `res` holds the deltas of exactly the targets of `targets`, in order, for `chunks` (looked up
/// once for the whole group, see [`Resolved`]).
pub(super) fn add_sparse_resolved<'a>(
    chunks: &[(usize, usize, Option<&'a Composition>)],
    res: &Resolved<'a>,
    targets: &mut [(Target, usize, &mut [f32])],
    xh: &[f32],
    in_dim: usize,
) {
    use rayon::prelude::*;
    let plans: Vec<Option<SparsePlan>> = (0..targets.len()).map(|ti| SparsePlan::new(chunks, res, ti)).collect();
    if plans.iter().all(Option::is_none) {
        return;
    }
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
                total += plan.lanes.len() * tile_len;
                at
            }
        });
    }
    let n = xh.len() / in_dim;
    let outs: Vec<(usize, ColumnBlocks)> =
        targets.iter_mut().map(|(_, out, dh)| (*out, ColumnBlocks::new(dh, n, *out, SPARSE_ROW_BLOCK))).collect();
    let tasks: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_some())
        .flat_map(|(i, _)| (0..outs[i].0.div_ceil(SPARSE_ROW_BLOCK)).map(move |blk| (i, blk)))
        .collect();
    with_reused(&INPUT_BUF, total, |inputs| {
        for &(i, at) in &firsts {
            let plan = plans[i].as_ref().expect("a planned target");
            transpose_inputs(plan, xh, in_dim, &mut inputs[at..at + plan.lanes.len() * tile_len]);
        }
        let inputs = &*inputs;
        tasks.into_par_iter().for_each(|(i, blk)| {
            let plan = plans[i].as_ref().expect("tasks only for planned targets");
            let out = outs[i].0;
            // This task alone writes columns r0..r1 of this target's rows.
            let mut dst = outs[i].1.claim(blk);
            let tiles = plan.lanes.len();
            let xt = &inputs[input_at[i]..input_at[i] + tiles * tile_len];
            let (r0, r1) = (blk * SPARSE_ROW_BLOCK, ((blk + 1) * SPARSE_ROW_BLOCK).min(out));
            let w = r1 - r0;
            // Unscaled products of every group tile for this block, row-major:
            // [tile][w][SPARSE_TILE], every value written by `sparse_block_tile`.
            with_reused(&PROD_BUF, tiles * SPARSE_TILE * w, |prods| {
                let mut prod_tiles = prods.chunks_exact_mut(SPARSE_TILE * w).zip(xt.chunks_exact(tile_len));
                for (g, (sp, rows)) in plan.groups.iter().enumerate() {
                    // The next group's block is asked for by this group's first tile, as it
                    // reads its own (the first group's, by the kernel itself); the entry that
                    // locates the one after it, now.
                    if let Some((after, _)) = plan.groups.get(g + 2) {
                        prefetch_block_start(after, blk);
                    }
                    let next = plan.groups.get(g + 1).map(|(m, _)| (*m, blk));
                    for (t, (pt, xt)) in prod_tiles.by_ref().take(rows.len().div_ceil(SPARSE_TILE)).enumerate() {
                        sparse_block_tile(sp, blk, xt, pt, next.filter(|_| t == 0));
                    }
                }
                // Pass by pass, each lane of that pass into its row (a row has at most one
                // lane per pass, so each row gets its parts in its composition's order).
                for pass in 0..plan.passes {
                    for (lanes, pt) in plan.lanes.iter().zip(prods.chunks_exact(SPARSE_TILE * w)) {
                        if !lanes.iter().any(|l| l.2 == pass) {
                            continue;
                        }
                        let mut dsts = dst.rows_many(lanes.map(|(row, _, p)| (p == pass).then_some(row as usize)));
                        add_lanes_scaled(pt, &mut dsts, &lanes.map(|l| l.1));
                    }
                }
            });
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::module_deltas::ModuleDeltas;
    use crate::model::linear::{LinearId, Proj};
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
}
