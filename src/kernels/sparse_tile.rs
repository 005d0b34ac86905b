//! The grouped sparse kernel's inner pieces: one block of a [`SparseMatrix`] times a tile of
//! [`SPARSE_TILE`] transposed input rows, the 8-lane interleaving of inputs, the scaled add of a
//! tile's lanes into their rows, and cache prefetches of a block.
//!
//! Invariants: every row's sum is accumulated in column order (the same order as
//! [`SparseMatrix::add_matmul_t`]); the safe entry points check every length the SIMD code relies
//! on; column indices are below the matrix's width (checked when the matrix was built) and its
//! block layout covers its entries exactly (built with it, private).
use super::sparse_layout::{SparseBlock, SparseMatrix, SPARSE_ROW_BLOCK};

/// Batch rows per register tile of the grouped sparse kernel.
pub const SPARSE_TILE: usize = 8;

/// For every lane `l` with a destination: `dst[l][i] += scales[l] * tile[i * SPARSE_TILE + l]`
/// for `i` in `0..w`, each value a multiply, then an add (`tile`: the `[w][SPARSE_TILE]` products
/// of one tile as [`sparse_block_tile`] writes them; every destination holds `w` values). The
/// lanes are split out of the tile in registers, 8 outputs at a time.
pub fn add_lanes_scaled(tile: &[f32], dst: &mut [Option<&mut [f32]>; SPARSE_TILE], scales: &[f32; SPARSE_TILE]) {
    let w = tile.len() / SPARSE_TILE;
    assert_eq!(tile.len(), w * SPARSE_TILE, "a tile of whole lanes");
    assert!(dst.iter().flatten().all(|d| d.len() == w), "destinations of the tile's width");
    #[allow(unused_mut)]
    let mut i0 = 0;
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx {
        // SAFETY: the CPU has AVX; the lengths were checked above.
        i0 = unsafe { add_lanes_avx(tile, w, dst, scales) };
    }
    for (l, d) in dst.iter_mut().enumerate() {
        let Some(d) = d else { continue };
        for i in i0..w {
            d[i] += scales[l] * tile[i * SPARSE_TILE + l];
        }
    }
}

/// [`add_lanes_scaled`] for whole groups of 8 outputs; returns the outputs done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn add_lanes_avx(tile: &[f32], w: usize, dst: &mut [Option<&mut [f32]>; SPARSE_TILE], scales: &[f32; SPARSE_TILE]) -> usize {
    use std::arch::x86_64::*;
    let lanes: [Option<(*mut f32, __m256)>; SPARSE_TILE] =
        std::array::from_fn(|l| dst[l].as_mut().map(|d| (d.as_mut_ptr(), _mm256_set1_ps(scales[l]))));
    let mut i0 = 0;
    while i0 + SPARSE_TILE <= w {
        // Outputs i0..i0 + 8 of every lane (8 values from each of 8 tile rows below w).
        let cols = transpose8_regs(std::array::from_fn(|i| _mm256_loadu_ps(tile.as_ptr().add((i0 + i) * SPARSE_TILE))));
        for (c, lane) in cols.iter().zip(&lanes) {
            if let Some((y, s)) = lane {
                // Each destination holds w values, i0 + 8 <= w.
                let yp = y.add(i0);
                _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), _mm256_mul_ps(*s, *c)));
            }
        }
        i0 += SPARSE_TILE;
    }
    i0
}

/// For the rows of block `blk` of `sp` (`r0..r1`, `w` rows):
/// `out[r - r0][l] = sum_i v_i * xt[c_i][l]` for each lane `l` of a tile of [`SPARSE_TILE`]
/// transposed input rows (`xt`: `[in][SPARSE_TILE]`), every row's sum in column order; `out`
/// (`[w][SPARSE_TILE]`) is written whole. [`add_lanes_scaled`] splits it by lane. `next`: a
/// block read after this one (the next module group's), whose entries are asked for into L2 as
/// this block's are read, in proportion (a hint: spread over the work, not in one burst before
/// it).
pub fn sparse_block_tile(sp: &SparseMatrix, blk: usize, xt: &[f32], out: &mut [f32], next: Option<(&SparseMatrix, usize)>) {
    let (r0, r1) = (blk * SPARSE_ROW_BLOCK, ((blk + 1) * SPARSE_ROW_BLOCK).min(sp.rows()));
    let w = r1 - r0;
    assert_eq!(out.len(), w * SPARSE_TILE);
    assert_eq!(xt.len(), sp.cols() * SPARSE_TILE);
    let b = sp.block(blk);
    #[cfg(target_arch = "x86_64")]
    {
        if super::cpu().avx2_fma {
            // (Checked once, when the matrix was built: scanning the order here on every call
            // cost a fifth of the sparse kernel's own time in `sft32`.)
            debug_assert!(b.order.iter().all(|&i| (i as usize) < w));
            // SAFETY: the CPU has the features; the block's runs cover its entries and its order
            // is a permutation of the block's `w` rows (both built with the matrix by
            // `SparseMatrix::from_flat`, private, and checked there); column indices are <
            // sp.cols (checked when the matrix was built) and `xt` holds sp.cols columns of
            // SPARSE_TILE lanes.
            let next = next.map(|(m, blk)| m.block(blk));
            // SAFETY: as above; `next` is only prefetched from, inside its slices.
            unsafe { sparse_block_tile_avx2(&b, xt, out, next.as_ref()) };
            return;
        }
    }
    let _ = next;
    let mut e = 0;
    let mut rows = b.order.iter();
    for &(len, n) in b.runs {
        for &i in rows.by_ref().take(n as usize) {
            let o = &mut out[i as usize * SPARSE_TILE..][..SPARSE_TILE];
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
}

/// Asks for every line of a block's column indices and values to be brought into the cache level
/// `HINT` names (`_MM_HINT_T0`, `_MM_HINT_T1`, ...). A hint: no effect on results.
#[cfg(target_arch = "x86_64")]
fn prefetch_block<const HINT: i32>(b: &SparseBlock<'_>) {
    use std::arch::x86_64::_mm_prefetch;
    // The row order and the runs first: the kernel reads them before any entry.
    for i in (0..b.order.len()).step_by(32) {
        // SAFETY: a prefetch never faults; the address is inside the array.
        unsafe { _mm_prefetch::<HINT>(b.order.as_ptr().add(i) as *const i8) };
    }
    for i in (0..b.runs.len()).step_by(8) {
        // SAFETY: as above.
        unsafe { _mm_prefetch::<HINT>(b.runs.as_ptr().add(i) as *const i8) };
    }
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

/// Asks for the entry that locates block `blk` of `sp` (so that a later
/// kernel call on it, or an earlier one's paced requests for it, do not wait for it first).
pub fn prefetch_block_start(sp: &SparseMatrix, blk: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch of a live reference's address never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(sp.block_start(blk) as *const _ as *const i8)
    };
}

/// The products of one block, row-major (`out[i * SPARSE_TILE + l]` for row `i` of the
/// block), streaming its entries front to back: runs of equal length, each through a loop with
/// a fixed trip count.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sparse_block_tile_avx2(b: &SparseBlock<'_>, xt: &[f32], out: &mut [f32], next: Option<&SparseBlock<'_>>) {
    use std::arch::x86_64::*;
    const _: () = assert!(SPARSE_TILE == 8);
    let (cols, vals) = (b.col_idx.as_ptr(), b.values.as_ptr());
    // The block is short (a few KB) and its matrix differs from the previous call's, so the
    // hardware prefetcher has no stream to follow yet: request every line of it up front.
    prefetch_block::<_MM_HINT_T0>(b);
    let mut paced = next.map(|n| PacedBlock::new(n, b.values.len()));
    let mut k = Kern { cols, vals, xt: xt.as_ptr(), out: out.as_mut_ptr() };
    let mut at = 0;
    let mut done = 0;
    for &(len, n) in b.runs {
        done += (len * n) as usize;
        if let Some(p) = paced.as_mut() {
            p.upto(done);
        }
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

/// Another block's entries asked for into L2 in proportion to the entries of the block being
/// read (its row order and runs first, at once: they are a line or two).
#[cfg(target_arch = "x86_64")]
struct PacedBlock<'a> {
    b: &'a SparseBlock<'a>,
    /// Entries asked for so far (a multiple of 16: one line of values).
    next: usize,
    /// Entries of the block being read.
    of: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a> PacedBlock<'a> {
    fn new(b: &'a SparseBlock<'a>, of: usize) -> Self {
        use std::arch::x86_64::*;
        for i in (0..b.order.len()).step_by(32) {
            // SAFETY: a prefetch never faults; the address is inside the array.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(b.order.as_ptr().add(i) as *const i8) };
        }
        for i in (0..b.runs.len()).step_by(8) {
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(b.runs.as_ptr().add(i) as *const i8) };
        }
        Self { b, next: 0, of: of.max(1) }
    }

    /// Asks for the entries up to `done / of` of the way through the block (all at `of`).
    #[inline(always)]
    fn upto(&mut self, done: usize) {
        use std::arch::x86_64::*;
        let n = self.b.values.len();
        let end = (done * n).div_ceil(self.of).min(n);
        while self.next < end {
            // SAFETY: a prefetch never faults; `next < n`, inside both arrays (16 values or 32
            // column indices per line).
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(self.b.values.as_ptr().add(self.next) as *const i8);
                if self.next.is_multiple_of(32) {
                    _mm_prefetch::<_MM_HINT_T1>(self.b.col_idx.as_ptr().add(self.next) as *const i8);
                }
            }
            self.next += 16;
        }
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
pub fn interleave_rows(src: &[&[f32]], dst: &mut [f32]) {
    assert!(src.len() <= SPARSE_TILE);
    let n = dst.len() / SPARSE_TILE;
    assert!(src.iter().all(|r| r.len() == n) && dst.len() == n * SPARSE_TILE);
    #[allow(unused_mut)]
    let mut c0 = 0;
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx {
        // SAFETY: the CPU has AVX; the lengths were checked above.
        c0 = unsafe { interleave_avx(src, n, dst) };
    }
    for c in c0..n {
        for l in 0..SPARSE_TILE {
            dst[c * SPARSE_TILE + l] = src.get(l).map_or(0.0, |r| r[c]);
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

/// 8x8 transpose: reads 8 consecutive values from each `rows[i]` and writes column `j` of that
/// block as 8 consecutive values at `dst + j * dst_stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8(rows: [*const f32; 8], dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let cols = transpose8_regs(std::array::from_fn(|i| _mm256_loadu_ps(rows[i])));
    for (j, c) in cols.into_iter().enumerate() {
        _mm256_storeu_ps(dst.add(j * dst_stride), c);
    }
}

/// 8x8 transpose in registers: element `j` of `r[i]` becomes element `i` of the result's `j`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8_regs(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
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
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8-lane interleave against plain index arithmetic, on lengths with and without a
    /// remainder and tiles with fewer than 8 rows.
    #[test]
    fn lane_interleaving_matches_indexing() {
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
        }
    }

    /// The lanes of a tile added into their rows equal the plain multiply-then-add, bit for bit,
    /// on widths with and without a remainder of 8 and with lanes left out.
    #[test]
    fn lanes_add_scaled_into_their_rows() {
        for w in [0, 5, 8, 21, 192] {
            let tile: Vec<f32> = (0..w * SPARSE_TILE).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let scales: [f32; SPARSE_TILE] = std::array::from_fn(|l| 0.3 + l as f32 * 1.7);
            let mut rows: Vec<Vec<f32>> = (0..SPARSE_TILE).map(|l| (0..w).map(|i| (l * 100 + i) as f32 / 3.0).collect()).collect();
            let before = rows.clone();
            let mut it = rows.iter_mut();
            let mut dst: [Option<&mut [f32]>; SPARSE_TILE] =
                std::array::from_fn(|l| it.next().filter(|_| l % 3 != 1).map(|r| r.as_mut_slice()));
            add_lanes_scaled(&tile, &mut dst, &scales);
            for l in 0..SPARSE_TILE {
                for i in 0..w {
                    let want = if l % 3 == 1 { before[l][i] } else { before[l][i] + scales[l] * tile[i * SPARSE_TILE + l] };
                    assert_eq!(rows[l][i].to_bits(), want.to_bits(), "w {w} lane {l} output {i}");
                }
            }
        }
    }
}
