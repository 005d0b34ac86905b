//! The sparse delta layout: a matrix stored by row in the order the batched kernel
//! ([`super::sparse_tile`]) reads it, with CSR-like access by row for everything else.
//!
//! Invariants: the dimensions and the block layout are private and fixed at construction;
//! column indices are below the width (checked by [`SparseMatrix::from_flat`]), and each block's
//! runs cover exactly its entries, so the kernel can read them without bounds checks.

/// A sparse matrix `[rows, cols]` by row (for a linear weight, rows are outputs), laid out in the
/// order the batched kernel reads it: block after block of [`SPARSE_ROW_BLOCK`] rows, within a
/// block the rows in runs of equal length (longest first, ascending index within a run, empty rows
/// last), within a row by column. The kernel then streams each block's non-zeros front to back
/// with a fixed trip count per run: rows of a few non-zeros each (0.5% of 576 columns is about 3)
/// made a row-by-row loop mispredict its exit on almost every row, and jump around in memory.
/// A row's own sum is unchanged by the layout: its non-zeros are still visited by column.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMatrix {
    rows: usize,
    cols: usize,
    /// 16-bit column indices: every Llama-family weight has at most 65,536 columns (rows are
    /// outputs; embedding and head rows have the hidden size), and a quarter less memory traffic
    /// made the memory-bound kernel faster.
    col_idx: Vec<u16>,
    values: Vec<f32>,
    /// Per row, its first entry in `col_idx` / `values` and its length.
    spans: Vec<(u32, u32)>,
    /// Row index within its block, block after block, in layout order.
    order: Vec<u16>,
    /// `(length, rows)` runs, block after block.
    runs: Vec<(u32, u32)>,
    /// Per block, where it starts in `order`, `runs` and the entries (one extra end entry).
    starts: Vec<(u32, u32, u32)>,
}

/// The widest sparse matrix (16-bit column indices).
pub const MAX_SPARSE_COLS: usize = 1 << 16;

/// Rows per block of the batched sparse kernel: its unit of parallel work and of layout.
pub const SPARSE_ROW_BLOCK: usize = 192;

/// One block of a [`SparseMatrix`] as the kernel reads it.
pub struct SparseBlock<'a> {
    /// Row indices within the block, in layout order.
    pub order: &'a [u16],
    /// `(length, rows)`: the next `rows` rows of `order` hold `length` entries each.
    pub runs: &'a [(u32, u32)],
    /// The block's entries, row after row in `order`.
    pub col_idx: &'a [u16],
    pub values: &'a [f32],
}

impl SparseMatrix {
    /// Builds from row-major flat indices (`r * cols + c`) and values; duplicates are summed.
    pub fn from_flat(rows: usize, cols: usize, flat: &[u64], values: &[f32]) -> Result<Self, String> {
        if flat.len() != values.len() {
            return Err(format!("{} indices but {} values", flat.len(), values.len()));
        }
        if cols > MAX_SPARSE_COLS || flat.len() > u32::MAX as usize {
            return Err(format!(
                "a {rows}x{cols} sparse matrix with {} entries is not supported (at most {MAX_SPARSE_COLS} columns and 2^32 entries)",
                flat.len()
            ));
        }
        let total = (rows as u64) * (cols as u64);
        let mut entries: Vec<(u64, f32)> = Vec::with_capacity(flat.len());
        for (&f, &v) in flat.iter().zip(values) {
            if f >= total {
                return Err(format!("index {f} is outside a {rows}x{cols} matrix"));
            }
            entries.push((f, v));
        }
        entries.sort_unstable_by_key(|e| e.0);
        // CSR by row first (duplicates summed), then the kernel layout.
        let mut row_ptr = vec![0u32; rows + 1];
        let mut csr: Vec<(u16, f32)> = Vec::with_capacity(entries.len());
        let mut last: Option<u64> = None;
        for (f, v) in entries {
            if last == Some(f) {
                csr.last_mut().expect("a previous entry").1 += v;
                continue;
            }
            last = Some(f);
            row_ptr[(f / cols as u64) as usize + 1] += 1;
            csr.push(((f % cols as u64) as u16, v));
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        let len = |r: usize| row_ptr[r + 1] - row_ptr[r];
        let mut m = SparseMatrix {
            rows,
            cols,
            col_idx: Vec::with_capacity(csr.len()),
            values: Vec::with_capacity(csr.len()),
            spans: vec![(0, 0); rows],
            order: Vec::with_capacity(rows),
            runs: Vec::new(),
            starts: vec![(0, 0, 0)],
        };
        for r0 in (0..rows).step_by(SPARSE_ROW_BLOCK) {
            let r1 = (r0 + SPARSE_ROW_BLOCK).min(rows);
            let mut local: Vec<u16> = (0..(r1 - r0) as u16).collect();
            local.sort_by_key(|&i| std::cmp::Reverse(len(r0 + i as usize)));
            let first_run = m.runs.len();
            for &i in &local {
                let r = r0 + i as usize;
                let l = len(r);
                let block_runs = &mut m.runs[first_run..];
                match block_runs.last_mut() {
                    Some((rl, n)) if *rl == l => *n += 1,
                    _ => m.runs.push((l, 1)),
                }
                m.spans[r] = (m.col_idx.len() as u32, l);
                for &(c, v) in &csr[row_ptr[r] as usize..row_ptr[r + 1] as usize] {
                    m.col_idx.push(c);
                    m.values.push(v);
                }
            }
            m.order.extend(local);
            m.starts.push((m.order.len() as u32, m.runs.len() as u32, m.col_idx.len() as u32));
        }
        m.check_layout();
        Ok(m)
    }

    /// What the kernel trusts without checking per call (release builds too): each block's
    /// order is a permutation of its rows, and its runs cover exactly its entries.
    fn check_layout(&self) {
        for b in 0..self.starts.len() - 1 {
            let w = (self.rows - b * SPARSE_ROW_BLOCK).min(SPARSE_ROW_BLOCK);
            let blk = self.block(b);
            let mut seen = vec![false; w];
            for &i in blk.order {
                assert!((i as usize) < w && !std::mem::replace(&mut seen[i as usize], true), "sparse block {b}: row order");
            }
            assert_eq!(blk.order.len(), w, "sparse block {b}: row order");
            let (rows, entries) = blk.runs.iter().fold((0u64, 0u64), |(r, e), &(len, n)| (r + n as u64, e + len as u64 * n as u64));
            assert!(rows == w as u64 && entries == blk.values.len() as u64, "sparse block {b}: runs");
        }
    }

    /// Rows (outputs of a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs of a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Stored (non-zero) entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Row `r`'s column indices (ascending) and values.
    pub fn row(&self, r: usize) -> (&[u16], &[f32]) {
        let (s, n) = self.spans[r];
        let (s, e) = (s as usize, (s + n) as usize);
        (&self.col_idx[s..e], &self.values[s..e])
    }

    /// Every stored value, in layout order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The layout entry [`SparseMatrix::block`] reads first for block `b` (for a prefetch).
    pub(super) fn block_start(&self, b: usize) -> &(u32, u32, u32) {
        &self.starts[b]
    }

    /// Block `b` (rows `b * SPARSE_ROW_BLOCK..`) in the kernel's layout.
    pub fn block(&self, b: usize) -> SparseBlock<'_> {
        let ((o0, u0, e0), (o1, u1, e1)) = (self.starts[b], self.starts[b + 1]);
        let (e0, e1) = (e0 as usize, e1 as usize);
        SparseBlock {
            order: &self.order[o0 as usize..o1 as usize],
            runs: &self.runs[u0 as usize..u1 as usize],
            col_idx: &self.col_idx[e0..e1],
            values: &self.values[e0..e1],
        }
    }

    /// `y[k, r] += scale * sum_c M[r, c] * x[k, c]` for host row-major buffers.
    pub fn add_matmul_t(&self, x: &[f32], n: usize, y: &mut [f32], scale: f32) {
        for k in 0..n {
            let xr = &x[k * self.cols..(k + 1) * self.cols];
            let yr = &mut y[k * self.rows..(k + 1) * self.rows];
            for (r, yv) in yr.iter_mut().enumerate() {
                let (cols, vals) = self.row(r);
                if cols.is_empty() {
                    continue;
                }
                let mut acc = 0f32;
                for (&c, &v) in cols.iter().zip(vals) {
                    acc += v * xr[c as usize];
                }
                *yv += scale * acc;
            }
        }
    }

    /// `out += scale * M[row, :]` (embedding lookup of one row).
    pub fn add_row(&self, row: usize, out: &mut [f32], scale: f32) {
        let (cols, vals) = self.row(row);
        for (&c, &v) in cols.iter().zip(vals) {
            out[c as usize] += scale * v;
        }
    }

    /// Dense copy (tests, merges).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.add_row(r, &mut d[r * self.cols..(r + 1) * self.cols], 1.0);
        }
        d
    }

    /// The matrix times `s`.
    pub fn scaled(&self, s: f32) -> Self {
        let mut m = self.clone();
        m.values.iter_mut().for_each(|v| *v *= s);
        m
    }

    pub fn bytes(&self) -> usize {
        let layout = self.spans.len() * 8 + self.order.len() * 2 + self.runs.len() * 8 + self.starts.len() * 12;
        self.col_idx.len() * 2 + self.values.len() * 4 + layout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_from_flat_sums_duplicates_and_multiplies() {
        // M = [[0, 2, 0], [1, 0, 3]]
        let m = SparseMatrix::from_flat(2, 3, &[1, 3, 5, 5], &[2.0, 1.0, 1.0, 2.0]).unwrap();
        assert_eq!(m.nnz(), 3);
        assert_eq!(m.to_dense(), vec![0.0, 2.0, 0.0, 1.0, 0.0, 3.0]);
        let x = [1.0, 10.0, 100.0, 2.0, 20.0, 200.0];
        let mut y = vec![0.0; 4];
        m.add_matmul_t(&x, 2, &mut y, 0.5);
        assert_eq!(y, vec![10.0, 150.5, 20.0, 301.0]);
        assert!(SparseMatrix::from_flat(2, 3, &[6], &[1.0]).is_err());
        let e = SparseMatrix::from_flat(1, MAX_SPARSE_COLS + 1, &[0], &[1.0]).unwrap_err();
        assert!(e.contains("at most 65536 columns"), "{e}");
        let wide = SparseMatrix::from_flat(1, MAX_SPARSE_COLS, &[MAX_SPARSE_COLS as u64 - 1], &[1.0]).unwrap();
        assert_eq!(wide.row(0), (&[u16::MAX][..], &[1.0f32][..]));
    }

    /// The kernel layout holds every row of each block exactly once, in runs of rows that
    /// really have the run's length, longest first, and each row's entries equal the CSR
    /// matrix's (checked against the dense copy built entry by entry).
    #[test]
    fn kernel_layout_covers_each_block_in_runs_of_equal_length() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        for (rows, cols, nnz) in [(1, 7, 3), (SPARSE_ROW_BLOCK, 9, 40), (2 * SPARSE_ROW_BLOCK + 37, 50, 3000), (500, 3, 0)] {
            let flat: Vec<u64> = (0..nnz).map(|_| rng.random_range(0..(rows * cols) as u64)).collect();
            let vals: Vec<f32> = (0..nnz).map(|_| rng.random_range(-1f32..1.0)).collect();
            let m = SparseMatrix::from_flat(rows, cols, &flat, &vals).unwrap();
            let mut dense = vec![0f32; rows * cols];
            for (&f, &v) in flat.iter().zip(&vals) {
                dense[f as usize] += v;
            }
            let mut seen_entries = 0;
            for b in 0..rows.div_ceil(SPARSE_ROW_BLOCK) {
                let r0 = b * SPARSE_ROW_BLOCK;
                let w = (rows - r0).min(SPARSE_ROW_BLOCK);
                let blk = m.block(b);
                let mut seen: Vec<u16> = blk.order.to_vec();
                seen.sort_unstable();
                assert_eq!(seen, (0..w as u16).collect::<Vec<_>>(), "block {b} of {rows} rows");
                assert_eq!(blk.runs.iter().map(|r| r.1 as usize).sum::<usize>(), w);
                assert!(blk.runs.windows(2).all(|p| p[0].0 > p[1].0), "runs longest first, one per length: {:?}", blk.runs);
                let (mut k, mut e) = (0, 0);
                for &(len, n) in blk.runs {
                    for &i in &blk.order[k..k + n as usize] {
                        let r = r0 + i as usize;
                        let (cols_r, vals_r) = (&blk.col_idx[e..e + len as usize], &blk.values[e..e + len as usize]);
                        assert_eq!((cols_r, vals_r), m.row(r));
                        assert!(cols_r.windows(2).all(|c| c[0] < c[1]));
                        let want: Vec<(u16, f32)> =
                            (0..cols).filter(|&c| dense[r * cols + c] != 0.0).map(|c| (c as u16, dense[r * cols + c])).collect();
                        let got: Vec<(u16, f32)> = cols_r.iter().copied().zip(vals_r.iter().copied()).collect();
                        assert_eq!(got, want, "row {r}");
                        e += len as usize;
                    }
                    k += n as usize;
                }
                assert_eq!(e, blk.col_idx.len());
                seen_entries += e;
            }
            assert_eq!(seen_entries, m.nnz());
        }
    }
}
