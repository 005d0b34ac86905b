//! Packing of compact (8-bit) low-rank factors into one shared buffer per module: the layout
//! [`super::lowrank::HostLowRank`]'s 8-bit row kernels (VNNI and AVX2) read.
//!
//! A decode row reads, per layer group (q/k/v, o, gate/up, down), every target of its adapter in
//! turn. [`pack_compact`] puts all targets of a module in one buffer, in the order the caller gives
//! (the decode order: layer by layer, q k v o gate up down), each part aligned to a cache line, so
//! one row's group is one contiguous stretch of 10 to 35 KB (r=8), and a module is one allocation
//! instead of four per target (840 for an all-projection LoRA). The one-core timing of
//! `examples/lora_row_kernel` did not change with it (docs/BENCHMARKS.md): its adapters were
//! already nearly contiguous in a fresh heap.
//!
//! Invariants: a region's size follows from (padded rank, in, out) alone ([`CompactLayout`]), the
//! buffer is never written after packing, and every region is filled by exactly one slot.

use std::sync::Arc;

use super::lowrank_int8::{round_i8, FACTOR_BLOCK, GROUP, MAX_KERNEL_RANK};

/// The four parts (a4, sa, b8, sb) of one target's compact factors.
pub(super) type Int8Parts<'a> = (&'a [u8], &'a [f32], &'a [u8], &'a [f32]);

/// f32 words per cache line: every region starts on a line boundary of the buffer.
pub(super) const LINE_WORDS: usize = 16;

/// Word counts (4 bytes each) of one target's four regions in the shared buffer, each rounded up
/// to a whole cache line. The exact sizes are documented on `HostFactors::Int8`
/// (`kernels::lowrank`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CompactLayout {
    pub a4_bytes: usize,
    pub sa_len: usize,
    pub b8_bytes: usize,
    pub sb_len: usize,
}

impl CompactLayout {
    pub fn new(rp: usize, in_dim: usize, out_dim: usize) -> Self {
        let blocks = in_dim.div_ceil(FACTOR_BLOCK);
        Self {
            a4_bytes: blocks * FACTOR_BLOCK * rp,
            sa_len: blocks * rp,
            b8_bytes: out_dim.div_ceil(8) * 8 * rp,
            sb_len: out_dim.div_ceil(FACTOR_BLOCK),
        }
    }

    /// Word offsets of (a4, sa, b8, sb) from the target's start, and its total words.
    pub fn offsets(&self) -> ([usize; 4], usize) {
        let line = |w: usize| w.next_multiple_of(LINE_WORDS);
        // a4 and b8 are whole words: 32 * rp and 8 * rp bytes per block of inputs / outputs.
        let sizes = [line(self.a4_bytes / 4), line(self.sa_len), line(self.b8_bytes / 4), line(self.sb_len)];
        let mut at = [0; 4];
        let mut total = 0;
        for (o, s) in at.iter_mut().zip(sizes) {
            *o = total;
            total += s;
        }
        (at, total)
    }

    /// The four regions of a target's words `w` (exact lengths, not the padded ones).
    pub fn split<'a>(&self, w: &'a [f32]) -> Int8Parts<'a> {
        let ([a, s, b, t], _) = self.offsets();
        let bytes = |from: usize, n: usize| &bytemuck::cast_slice::<f32, u8>(&w[from..])[..n];
        (bytes(a, self.a4_bytes), &w[s..s + self.sa_len], bytes(b, self.b8_bytes), &w[t..t + self.sb_len])
    }
}

/// Compact factors of several targets in one buffer: target `i` starts at word `starts[i]`.
#[derive(Debug)]
pub struct PackedFactors {
    pub(super) words: Arc<Vec<f32>>,
    pub(super) starts: Vec<usize>,
}

/// One target's region of the shared buffer, handed to the caller's fill function.
pub struct CompactSlot<'a> {
    dst: &'a mut [f32],
    rank: usize,
    rp: usize,
    in_dim: usize,
    out_dim: usize,
    filled: bool,
}

impl CompactSlot<'_> {
    /// Packs `a` `[rank, in]` and `b` `[out, rank]` (row-major, as PEFT stores them).
    pub fn pack(&mut self, a: &[f32], b: &[f32]) {
        self.pack_scaled(a, b, 1.0);
        self.filled = true;
    }

    /// Packs `a` and `b_scale * b` (the scale goes into `b`'s block scales: the 8-bit values are
    /// those of `b`). Returns false, leaving the slot unfilled, when a value of `a` or `b` is
    /// NaN or infinite: the caller reports the error (a slot left unfilled and not reported is a
    /// panic in [`pack_compact`]).
    pub fn pack_scaled(&mut self, a: &[f32], b: &[f32], b_scale: f32) -> bool {
        let (r, rp, n, out) = (self.rank, self.rp, self.in_dim, self.out_dim);
        assert!(a.len() == r * n && b.len() == out * r, "factors of a rank-{r} {n}->{out} delta");
        let layout = CompactLayout::new(rp, n, out);
        let ([ao, so, bo, to], total) = layout.offsets();
        let (head, tail) = self.dst[..total].split_at_mut(bo);
        let (a4w, sa) = head.split_at_mut(so);
        let (b8w, sb) = tail.split_at_mut(to - bo);
        debug_assert_eq!(ao, 0);
        let (a4, sa) = (&mut bytemuck::cast_slice_mut::<f32, u8>(a4w)[..layout.a4_bytes], &mut sa[..layout.sa_len]);
        let (b8, sb) = (&mut bytemuck::cast_slice_mut::<f32, u8>(b8w)[..layout.b8_bytes], &mut sb[..layout.sb_len]);
        #[cfg(target_arch = "x86_64")]
        if super::cpu().avx2_fma {
            // SAFETY: the CPU has AVX2 (the probe); the kernels index every slice with checked
            // operations or through fixed-size local arrays.
            let (fa, fb) = unsafe { (pack_a_avx2(a, n, rp, a4, sa), pack_b_avx2(b, out, r, rp, b_scale, b8, sb)) };
            self.filled = fa && fb;
            return self.filled;
        }
        let finite_a = pack_a(a, n, rp, a4, sa);
        let finite_b = pack_b(b, out, r, rp, b_scale, b8, sb);
        self.filled = finite_a && finite_b;
        self.filled
    }
}

/// Packs targets of shapes `(rank, in, out)` (ranks 1 to [`MAX_KERNEL_RANK`]) into one buffer, in
/// the given order, in parallel: `fill(i, slot)` must call [`CompactSlot::pack`] with target
/// `i`'s factors. Fails with `fill`'s first error; panics if a slot is left unfilled.
pub fn pack_compact<E: Send>(
    shapes: &[(usize, usize, usize)],
    fill: impl Fn(usize, &mut CompactSlot<'_>) -> Result<(), E> + Sync,
) -> Result<PackedFactors, E> {
    use rayon::prelude::*;
    let mut starts = Vec::with_capacity(shapes.len());
    let mut total = 0;
    for &(r, n, out) in shapes {
        assert!(r > 0 && r <= MAX_KERNEL_RANK, "compact factors of rank {r}");
        starts.push(total);
        total += CompactLayout::new(r.next_multiple_of(GROUP), n, out).offsets().1;
    }
    let mut words = vec![0f32; total];
    let mut slots = Vec::with_capacity(shapes.len());
    let mut rest = words.as_mut_slice();
    for (i, &(rank, in_dim, out_dim)) in shapes.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(total);
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(end - starts[i]);
        rest = tail;
        slots.push(CompactSlot { dst, rank, rp: rank.next_multiple_of(GROUP), in_dim, out_dim, filled: false });
    }
    slots.par_iter_mut().enumerate().try_for_each(|(i, slot)| {
        fill(i, slot)?;
        assert!(slot.filled, "target {i} of a packed module was not filled");
        Ok(())
    })?;
    drop(slots);
    Ok(PackedFactors { words: Arc::new(words), starts })
}

/// `round(v * inv)` clamped to +-127 ([`round_i8`]), stored `+ 128`.
fn q8(v: f32, inv: f32) -> u8 {
    (round_i8(v * inv) as u8).wrapping_add(128)
}

/// Largest `|v|` of `v` (0 for none) and whether every value is finite, in 8 lanes so the
/// compiler vectorises it (a cold load packs millions of values). `max` ignores NaN, so a second
/// set of lanes sums `v * 0`: 0 for finite values, NaN as soon as one is NaN or infinite.
fn absmax(v: &[f32]) -> (f32, bool) {
    let mut lanes = [0f32; 8];
    let mut probe = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for ((m, p), x) in lanes.iter_mut().zip(&mut probe).zip(c) {
            *m = m.max(x.abs());
            *p += x * 0.0;
        }
    }
    let rest = chunks.remainder();
    let finite = probe.iter().chain(rest).all(|x| x.is_finite());
    (rest.iter().chain(&lanes).fold(0f32, |m, x| m.max(x.abs())), finite)
}

/// A block's scale `absmax / 127` and its inverse (0 for an all-zero block); clears `finite` when
/// a value of the block is not finite.
fn block_scale(vals: &[f32], finite: &mut bool) -> (f32, f32) {
    let (m, ok) = absmax(vals);
    *finite &= ok;
    let d = m / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// `a` `[r, in]` (row-major, as stored by PEFT) into `HostFactors::Int8`'s `a4`, `sa` of width `rp`:
/// per rank row and block of 32 inputs, the block quantized into a buffer (a loop the compiler
/// vectorises), then copied out 4 inputs (one 32-bit lane) at a time. Returns whether every value
/// was finite.
fn pack_a(a: &[f32], n: usize, rp: usize, a4: &mut [u8], sa: &mut [f32]) -> bool {
    a4.fill(128);
    sa.fill(0.0);
    let mut finite = true;
    let mut q = [128u8; FACTOR_BLOCK];
    for (j, row) in a.chunks_exact(n).enumerate() {
        for (blk, vals) in row.chunks(FACTOR_BLOCK).enumerate() {
            let (d, inv) = block_scale(vals, &mut finite);
            sa[blk * rp + j] = d;
            q.fill(128);
            for (qk, v) in q.iter_mut().zip(vals) {
                *qk = q8(*v, inv);
            }
            for (g, quad) in q.chunks_exact(4).enumerate().take(vals.len().div_ceil(4)) {
                let at = ((blk * (FACTOR_BLOCK / 4) + g) * rp + j) * 4;
                a4[at..at + 4].copy_from_slice(quad);
            }
        }
    }
    finite
}

/// Eight values `v * inv` rounded half away from zero (as [`round_i8`]: `+-0.5`, then truncation),
/// clamped to +-127, plus 128: one 32-bit lane each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
fn q8x8(v: std::arch::x86_64::__m256, inv: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let t = _mm256_mul_ps(v, inv);
    let half = _mm256_or_ps(_mm256_set1_ps(0.5), _mm256_and_ps(t, _mm256_set1_ps(-0.0)));
    let i = _mm256_cvttps_epi32(_mm256_add_ps(t, half));
    _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(i, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127)), _mm256_set1_epi32(128))
}

/// `vals` (at most `N * 8`) as `N` vectors, zero-padded.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
fn load_padded<const N: usize>(vals: &[f32]) -> [std::arch::x86_64::__m256; N] {
    use std::arch::x86_64::*;
    let mut buf = [[0f32; 8]; N];
    for (dst, src) in buf.iter_mut().flatten().zip(vals) {
        *dst = *src;
    }
    // SAFETY: each load reads one whole local array of 8 values.
    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(buf[i].as_ptr()) })
}

/// [`pack_a`] with AVX2: the same values and bytes, 8 inputs per instruction.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
unsafe fn pack_a_avx2(a: &[f32], n: usize, rp: usize, a4: &mut [u8], sa: &mut [f32]) -> bool {
    use std::arch::x86_64::*;
    a4.fill(128);
    sa.fill(0.0);
    let mut finite = true;
    // packs/packus interleave the 128-bit lanes: this puts the 8 quads back in input order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (j, row) in a.chunks_exact(n).enumerate() {
        for (blk, vals) in row.chunks(FACTOR_BLOCK).enumerate() {
            let (d, inv) = block_scale(vals, &mut finite);
            sa[blk * rp + j] = d;
            let inv = _mm256_set1_ps(inv);
            let v: [__m256; 4] = load_padded(vals);
            let i = v.map(|x| q8x8(x, inv));
            let bytes = _mm256_packus_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            let mut quads = [0u32; 8];
            _mm256_storeu_si256(quads.as_mut_ptr() as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
            // Padded inputs quantize to 0, stored 128: what the fill left there.
            for (g, quad) in quads.iter().enumerate() {
                let at = ((blk * (FACTOR_BLOCK / 4) + g) * rp + j) * 4;
                a4[at..at + 4].copy_from_slice(&quad.to_le_bytes());
            }
        }
    }
    finite
}

/// [`pack_b`] with AVX2: the same values and bytes, one group of 8 rank columns per instruction.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
unsafe fn pack_b_avx2(b: &[f32], out: usize, r: usize, rp: usize, scale: f32, b8: &mut [u8], sb: &mut [f32]) -> bool {
    use std::arch::x86_64::*;
    b8.fill(128);
    let mut finite = true;
    // The low byte of each 32-bit lane, per 128-bit lane.
    let low_bytes = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    );
    for (blk, sbk) in sb.iter_mut().enumerate() {
        let (o0, o1) = (blk * FACTOR_BLOCK, ((blk + 1) * FACTOR_BLOCK).min(out));
        let vals = &b[o0 * r..o1 * r];
        let (d, inv) = block_scale(vals, &mut finite);
        *sbk = d * scale;
        let inv = _mm256_set1_ps(inv);
        for (o, row) in (o0..o1).zip(vals.chunks_exact(r)) {
            let at = b8_index(o, 0, rp);
            for (c, group) in row.chunks(GROUP).enumerate() {
                let v = if group.len() == GROUP { _mm256_loadu_ps(group.as_ptr()) } else { load_padded::<1>(group)[0] };
                let q = _mm256_shuffle_epi8(q8x8(v, inv), low_bytes);
                let eight = _mm_unpacklo_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                let mut bytes = [0u8; 16];
                _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, eight);
                // Columns 0-3 and 4-7 of the group go to the two halves of its 64 bytes.
                b8[at + c * 64..at + c * 64 + 4].copy_from_slice(&bytes[..4]);
                b8[at + c * 64 + 32..at + c * 64 + 36].copy_from_slice(&bytes[4..GROUP]);
            }
        }
    }
    finite
}

/// Index of output `o`, rank column `j` in `HostFactors::Int8`'s `b8` of width `rp`: per 8
/// outputs and group of 8 columns 64 bytes, the first 32 the group's columns 0-3 of the 8
/// outputs (4 bytes, one 32-bit lane, per output), the next 32 its columns 4-7.
pub(super) fn b8_index(o: usize, j: usize, rp: usize) -> usize {
    ((o / 8) * (rp / GROUP) + j / GROUP) * 64 + ((j % GROUP) / 4) * 32 + (o % 8) * 4 + j % 4
}

/// `scale * b`, `b` `[out, r]` (row-major, as stored by PEFT), into `HostFactors::Int8`'s `b8`,
/// `sb` of width `rp` (the 8-bit values of `b`, `scale` in the block scales). Returns whether
/// every value was finite.
fn pack_b(b: &[f32], out: usize, r: usize, rp: usize, scale: f32, b8: &mut [u8], sb: &mut [f32]) -> bool {
    b8.fill(128);
    let mut finite = true;
    for (blk, sbk) in sb.iter_mut().enumerate() {
        let (o0, o1) = (blk * FACTOR_BLOCK, ((blk + 1) * FACTOR_BLOCK).min(out));
        let vals = &b[o0 * r..o1 * r];
        let (d, inv) = block_scale(vals, &mut finite);
        *sbk = d * scale;
        for (o, row) in (o0..o1).zip(vals.chunks_exact(r)) {
            for (j, v) in row.iter().enumerate() {
                b8[b8_index(o, j, rp)] = q8(*v, inv);
            }
        }
    }
    finite
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The AVX2 packers write the very bytes, scales and finiteness flags of the portable ones:
    /// ranks that are and are not multiples of 8, widths with partial blocks of 32 and of 8,
    /// values of mixed magnitudes, exact ties of the rounding (x.5 after scaling), zero blocks,
    /// and a NaN.
    #[test]
    fn avx2_packing_equals_the_portable_packing() {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(crate::kernels::cpu().avx2_fma, "this test compares the AVX2 packers; the CPU has no AVX2");
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            for &(r, n, out) in
                &[(1usize, 8usize, 8usize), (8, 576, 576), (5, 100, 37), (16, 1536, 576), (64, 576, 192), (128, 33, 9), (3, 64, 40)]
            {
                let rp = r.next_multiple_of(GROUP);
                let layout = CompactLayout::new(rp, n, out);
                let mut gen = |len: usize| -> Vec<f32> {
                    (0..len)
                        .map(|i| if i % 97 == 5 { 0.0 } else { rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..2)) })
                        .collect()
                };
                let (mut a, mut b) = (gen(r * n), gen(out * r));
                // Ties: a first block whose absmax is 127 (d = 1), holding values that end in .5.
                for (k, v) in a.iter_mut().take(n.min(FACTOR_BLOCK)).enumerate() {
                    *v = if k == 0 { 127.0 } else { (k as f32 - 16.0) + 0.5 };
                }
                b[..r.min(8)].iter_mut().for_each(|v| *v = 0.0);
                for nan in [false, true] {
                    if nan {
                        a[n / 2] = f32::NAN;
                        let last = b.len() - 1;
                        b[last] = f32::INFINITY;
                    }
                    let (mut a4p, mut sap) = (vec![0u8; layout.a4_bytes], vec![0f32; layout.sa_len]);
                    let (mut a4v, mut sav) = (a4p.clone(), sap.clone());
                    let (mut b8p, mut sbp) = (vec![0u8; layout.b8_bytes], vec![0f32; layout.sb_len]);
                    let (mut b8v, mut sbv) = (b8p.clone(), sbp.clone());
                    let fa = pack_a(&a, n, rp, &mut a4p, &mut sap);
                    let fb = pack_b(&b, out, r, rp, 0.37, &mut b8p, &mut sbp);
                    // SAFETY: the CPU has AVX2 (asserted above).
                    let (fav, fbv) =
                        unsafe { (pack_a_avx2(&a, n, rp, &mut a4v, &mut sav), pack_b_avx2(&b, out, r, rp, 0.37, &mut b8v, &mut sbv)) };
                    assert_eq!((fa, fb), (!nan, !nan), "rank {r} {n}->{out}: finiteness");
                    assert_eq!((fav, fbv), (fa, fb), "rank {r} {n}->{out}: finiteness");
                    if !nan {
                        assert!(a4p == a4v && sap == sav, "rank {r} {n}->{out}: a differs");
                        assert!(b8p == b8v && sbp == sbv, "rank {r} {n}->{out}: b differs");
                    }
                }
            }
        }
    }
}
