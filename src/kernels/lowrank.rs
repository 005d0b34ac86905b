//! Low-rank (LoRA, Poly mixture) factors in the layout of the per-row CPU kernels, and those
//! kernels: `y += scale * (x A^T) B^T` for one decode row.
//!
//! Invariants: a [`HostLowRank`]'s rank and widths are private and its factor buffers are built
//! for exactly them, so the kernels' pointer arithmetic stays inside; the safe entry points check
//! the row widths and the buffers' sizes (release builds too) before entering SIMD code. Results
//! do not depend on which kernel ran beyond float summation order (f32 factors) or the documented
//! 8-bit error (compact factors).

#[cfg(target_arch = "x86_64")]
use super::lowrank_int8::{lowrank_compact, lowrank_compact_q};
pub use super::lowrank_int8::{QuantRow, FACTOR_BLOCK, GROUP};
use super::lowrank_pack::{b8_index, pack_compact, CompactLayout, CompactSlot, Int8Parts, LINE_WORDS};

/// Low-rank factors laid out for the per-row CPU kernel: `at` `[in, r]` = A^T and `bt` `[r, out]`
/// = B^T (scale folded), so both products are contiguous axpy loops that vectorise, 8 rank
/// columns per vector (a masked load for the last group of a rank that is not a multiple of 8).
/// This is the module's only resident copy of the factors on the CPU: prefill (GEMMs), merges
/// and the GPU widen it on demand ([`HostLowRank::factors`]), so a module takes no more than its
/// f32 file's bytes, and about a quarter of them compact.
///
/// With `compact` (any rank up to [`MAX_KERNEL_RANK`]), both factors are held as 8-bit blocks for
/// an 8-bit kernel (VNNI, or AVX2 where the CPU lacks VNNI: `kernels::lowrank_int8`): the row `x` is quantized per 32 inputs as the base kernel quantizes
/// activations, `x A^T` is an int8 dot product per block and group of 8 rank columns, each group
/// of 8 values of `t` is quantized to 8 bits with its own scale, and `t B^T` is an int8 dot
/// product per output and group. Decode rows of distinct adapters read their own factors, which
/// made the f32/f16 row kernels the main cost of mixed LoRA batches (measured on one core for
/// 32 distinct r=8 all-projection LoRAs per step: f32 15.5 ms, f16 9.4 ms, float kernel over
/// int8 storage 9.5 ms: bound by the widening instructions, not the bytes). The server picks this
/// when the base weights are 8-bit blocks run by an int8 kernel themselves; the error of the
/// delta is about 1% of its norm at every rank (measured by the unit test below: 0.5-1.3%
/// relative L2 for ranks 1 to 128), far below the base's quantization error. With f32 base
/// weights (the parity mode) the factors stay f32.
#[derive(Debug, Clone)]
pub struct HostLowRank {
    rank: usize,
    /// `rank` rounded up to a multiple of [`GROUP`]: the width of the compact layout.
    rp: usize,
    in_dim: usize,
    out_dim: usize,
    factors: HostFactors,
}

pub use super::lowrank_int8::MAX_KERNEL_RANK;

#[derive(Clone)]
enum HostFactors {
    F32 {
        at: Vec<f32>,
        bt: Vec<f32>,
    },
    /// Any rank up to [`MAX_KERNEL_RANK`], padded to `rp` columns (zero values, zero scales), in
    /// the module's shared buffer `words` from word `start` (see `kernels::lowrank_pack`: the
    /// four parts follow each other, each on a cache line, sizes from [`CompactLayout`]).
    /// `a4`: `[in_pad / 4][rp][4]` bytes `q + 128` (4 consecutive inputs of one rank column per
    /// 32-bit lane, as `vpdpbusd` reads them), `in_pad` = `in` rounded up to [`FACTOR_BLOCK`],
    /// zero-padded; `sa`: `[in_pad / 32][rp]` absmax/127 scales per (input block, rank column).
    /// `b8`: `[out_pad / 8][rp / 8][2 quads][8 outputs][4 columns]` bytes `q + 128` (per group
    /// of 8 outputs and 8 columns, columns 0-3 of each output in one 32-bit lane, then columns
    /// 4-7: one 512-bit `vpdpbusd` against the group's t sums each output's 4-column halves in
    /// its two lanes); `out_pad` = `out` rounded up to 8; `sb`: one absmax/127 scale per 32
    /// outputs (all columns).
    Int8 {
        words: std::sync::Arc<Vec<f32>>,
        start: usize,
    },
}

impl std::fmt::Debug for HostFactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::F32 { at, bt } => write!(f, "F32 {{ at: {} values, bt: {} values }}", at.len(), bt.len()),
            Self::Int8 { words, start } => write!(f, "Int8 {{ at word {start} of a {}-word buffer }}", words.len()),
        }
    }
}

/// One target's compact factors as the decode loop reads them: the widths, the padded rank and
/// the target's region of its module's buffer (from its first word to the buffer's end: the
/// module's later targets follow, and the kernel's look-ahead runs on into them). Made once per
/// step for every target of the step's modules (`adapters::batch`), so that a row reaches its
/// factors without first following the module's map node and the buffer's `Arc` to find them:
/// three dependent misses per target, since the step's other reads evict them between layers.
#[derive(Debug, Clone, Copy)]
pub struct CompactRef<'a> {
    words: &'a [f32],
    rank: u32,
    rp: u32,
    in_dim: u32,
    out_dim: u32,
}

impl<'a> CompactRef<'a> {
    pub(super) fn parts(&self) -> Int8Parts<'a> {
        CompactLayout::new(self.rp as usize, self.in_dim as usize, self.out_dim as usize).split(self.words)
    }

    /// The sizes [`HostFactors::Int8`] documents for these widths and padded rank.
    fn check_sizes(&self, a4: &[u8], sa: &[f32], b8: &[u8], sb: &[f32]) {
        let (in_dim, out, rp) = (self.in_dim as usize, self.out_dim as usize, self.rp as usize);
        let blocks = in_dim.div_ceil(FACTOR_BLOCK);
        assert!(
            rp.is_multiple_of(GROUP)
                && rp <= MAX_KERNEL_RANK
                && a4.len() == blocks * FACTOR_BLOCK * rp
                && sa.len() == blocks * rp
                && b8.len() == out.div_ceil(8) * 8 * rp
                && sb.len() == out.div_ceil(FACTOR_BLOCK),
            "compact rank-{} factors of a {in_dim}->{out} delta",
            self.rank
        );
    }

    /// [`HostLowRank::add_rows_q`] on these factors (the caller checked the CPU's `int8_avx2`).
    /// `look_ahead`: whether the kernel prefetches ahead of its reads. `next`: empty, or another
    /// target's factors (the region of the task a thread runs next), which the first row asks for
    /// into L2 at the pace of its own reads, all of them by its end: their misses overlap this
    /// row's compute instead of stalling the thread in one burst before it.
    pub fn add_rows_q(&self, xs: &[f32], rows: &[QuantRow], ys: &mut [f32], scale: f32, look_ahead: bool, next: &[f32]) {
        let (in_dim, out) = (self.in_dim as usize, self.out_dim as usize);
        let n = xs.len() / in_dim.max(1);
        assert!(xs.len() == n * in_dim && ys.len() == n * out && rows.len() >= n, "rows of the wrong width or count");
        assert!(super::cpu().int8_avx2, "the compact kernel needs the int8 CPU features");
        let (a4, sa, b8, sb) = self.parts();
        self.check_sizes(a4, sa, b8, sb);
        #[cfg(target_arch = "x86_64")]
        for (i, (row, y)) in rows.iter().zip(ys.chunks_exact_mut(out)).enumerate() {
            assert!(row.n == in_dim && row.q.len() == in_dim.div_ceil(FACTOR_BLOCK) * FACTOR_BLOCK, "a quantized row of whole blocks");
            let pf = i == 0 && super::cpu().prefetch;
            let ahead: &[u8] = if pf && look_ahead { bytemuck::cast_slice(self.words) } else { &[] };
            let next: &[u8] = if pf { bytemuck::cast_slice(next) } else { &[] };
            // SAFETY: the CPU supports the features (asserted); the buffers hold the padded sizes
            // documented on HostFactors::Int8 for these widths, and `row` holds whole blocks of
            // this width (both checked above); `ahead` is empty or a live slice that starts at
            // `a4`, and `next` empty or a live slice (the kernel only prefetches inside them).
            unsafe { lowrank_compact_q(row, y, scale, self.rp as usize, a4, sa, b8, sb, (ahead, next)) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (xs, rows, ys, scale, look_ahead, next, a4, sa, b8, sb);
    }

    /// The words of these factors: the target's region of its module's buffer.
    pub fn region(&self) -> &'a [f32] {
        let (_, total) = CompactLayout::new(self.rp as usize, self.in_dim as usize, self.out_dim as usize).offsets();
        &self.words[..total.min(self.words.len())]
    }

    /// Asks the CPU to start loading these factors into its L2 cache: a hint, with no effect on
    /// results, and none on other CPUs or with `MODSERVE_PREFETCH=0`. The decode loop
    /// (`adapters::batch`) calls it for the next row's targets while the current row computes.
    /// A row's factors are a few short stretches of distinct modules (about 20 KB per
    /// projection group at r=8), too short for the hardware prefetchers to ramp up, and each
    /// stretch waited for memory at the latency of a few dependent misses; with this and the
    /// kernel's own look-ahead, 32 rows of distinct r=8 modules went from 13-17.5 to 8.5-11 ms per
    /// step on one core (`examples/lora_row_kernel.rs`, AMD EPYC, three interleaved pairs).
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu().prefetch {
            let region = self.region();
            // (The buffer need not start on a line: the last word's line is asked for too.)
            for w in region.chunks(LINE_WORDS).map(|l| l.as_ptr()).chain(region.last().map(|w| w as *const f32)) {
                // SAFETY: a prefetch of an address inside a live slice: it reads nothing
                // architecturally and cannot fault.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(w as *const i8) };
            }
        }
    }
}

thread_local! {
    /// The `t` of the portable kernel (reused: no allocation per row).
    static T_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Asks the CPU to bring the input rows `xs` into its L1 cache: a hint, with no effect on
/// results (none on other CPUs or with `MODSERVE_PREFETCH=0`). The decode loop
/// (`adapters::batch`) calls it for the next task's rows beside [`HostLowRank::prefetch`]: the
/// rows were written by another thread (the step's norm), and the quantization that opens
/// every task otherwise waited for them line by line.
pub fn prefetch_rows(xs: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().prefetch {
        for l in xs.chunks(LINE_WORDS) {
            // SAFETY: a prefetch of an address inside a live slice: it reads nothing
            // architecturally and cannot fault.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(l.as_ptr() as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xs;
}

impl HostLowRank {
    /// Lays out `a` `[rank, in_dim]` and `b` `[out_dim, rank]` (row-major, as PEFT stores them,
    /// any scale folded into `b`); `compact`: hold the factors as 8-bit blocks (ranks up to
    /// [`MAX_KERNEL_RANK`]; a larger rank stays f32).
    pub fn new(a: &[f32], b: &[f32], rank: usize, in_dim: usize, out_dim: usize, compact: bool) -> Self {
        assert!(rank > 0 && a.len() == rank * in_dim && b.len() == out_dim * rank, "factors of a rank-{rank} {in_dim}->{out_dim} delta");
        fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
            let mut out = vec![0f32; rows * cols];
            for (r, row) in v.chunks_exact(cols).enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    out[c * rows + r] = x;
                }
            }
            out
        }
        if compact && rank <= MAX_KERNEL_RANK {
            let packed = Self::new_compact_many(&[(rank, in_dim, out_dim)], |_, slot| {
                slot.pack(a, b);
                Ok::<(), std::convert::Infallible>(())
            });
            let Ok(mut one) = packed;
            return one.pop().expect("one target");
        }
        // a [rank, in] -> at [in, rank]; b [out, rank] -> bt [rank, out].
        let factors = HostFactors::F32 { at: transpose(a, rank, in_dim), bt: transpose(b, out_dim, rank) };
        Self { rank, rp: rank.next_multiple_of(GROUP), in_dim, out_dim, factors }
    }

    /// Compact factors of several targets of shapes `(rank, in, out)` (ranks 1 to
    /// [`MAX_KERNEL_RANK`]), packed in parallel into one buffer in the given order (a module's
    /// targets in decode order: a row's reads of one layer group are then one contiguous stretch).
    /// `fill(i, slot)` packs target `i`'s `a` `[rank, in]` and `b` `[out, rank]` with
    /// [`CompactSlot::pack`]; the first error it returns is returned.
    pub fn new_compact_many<E: Send>(
        shapes: &[(usize, usize, usize)],
        fill: impl Fn(usize, &mut CompactSlot<'_>) -> Result<(), E> + Sync,
    ) -> Result<Vec<Self>, E> {
        let packed = pack_compact(shapes, fill)?;
        Ok(shapes
            .iter()
            .zip(&packed.starts)
            .map(|(&(rank, in_dim, out_dim), &start)| Self {
                rank,
                rp: rank.next_multiple_of(GROUP),
                in_dim,
                out_dim,
                factors: HostFactors::Int8 { words: packed.words.clone(), start },
            })
            .collect())
    }

    /// Asks the CPU for this value's own fields (rank, widths, where its factors are): a hint, as
    /// [`CompactRef::prefetch`]. The step's index (`adapters::batch`) asks for all its modules'
    /// before it reads any: one at a time, each waited for memory (every module's targets are
    /// their own allocations, evicted since the step before).
    pub fn prefetch_fields(&self) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu().prefetch {
            // SAFETY: a prefetch of a live reference's address: it reads nothing architecturally
            // and cannot fault.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(self as *const Self as *const i8) };
        }
    }

    /// The four parts (a4, sa, b8, sb) of compact factors, or None for f32 ones.
    fn int8_parts(&self) -> Option<Int8Parts<'_>> {
        self.compact().map(|c| c.parts())
    }

    /// Compact factors as the decode loop reads them (None for f32 factors): see [`CompactRef`].
    pub fn compact(&self) -> Option<CompactRef<'_>> {
        match &self.factors {
            HostFactors::Int8 { words, start } => Some(CompactRef {
                words: &words[*start..],
                rank: self.rank as u32,
                rp: self.rp as u32,
                in_dim: self.in_dim as u32,
                out_dim: self.out_dim as u32,
            }),
            HostFactors::F32 { .. } => None,
        }
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Inputs per row.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Outputs per row.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Whether the factors are held as 8-bit blocks.
    pub fn is_compact(&self) -> bool {
        matches!(self.factors, HostFactors::Int8 { .. })
    }

    /// `y += scale * (x A^T) B^T` for one row `x` (`in_dim`) into `y` (`out_dim`).
    pub fn add_row(&self, x: &[f32], y: &mut [f32], scale: f32) {
        assert!(x.len() == self.in_dim && y.len() == self.out_dim, "row of the wrong width");
        #[cfg(target_arch = "x86_64")]
        {
            match &self.factors {
                HostFactors::F32 { at, bt } if self.rank <= MAX_KERNEL_RANK && super::cpu().avx2_fma => {
                    assert!(
                        at.len() == self.in_dim * self.rank && bt.len() == self.rank * self.out_dim,
                        "f32 factors of rank {}",
                        self.rank
                    );
                    // SAFETY: the CPU supports the features; the widths, the rank (at most
                    // MAX_KERNEL_RANK) and the factors' sizes (in_dim x rank and rank x out_dim
                    // values) were checked above.
                    unsafe { lowrank_f32_avx2(x, y, scale, self.rank, at, bt) };
                    return;
                }
                HostFactors::Int8 { .. } if super::cpu().int8_avx2 => {
                    let c = self.compact().expect("compact");
                    let (a4, sa, b8, sb) = c.parts();
                    c.check_sizes(a4, sa, b8, sb);
                    // SAFETY: the CPU supports the features; the buffers hold the padded sizes
                    // documented on HostFactors::Int8 for these widths (checked above).
                    unsafe { lowrank_compact(x, y, scale, self.rp, a4, sa, b8, sb) };
                    return;
                }
                _ => {}
            }
        }
        self.add_row_generic(x, y, scale);
    }

    /// [`HostLowRank::add_row`] for a row `x` that [`QuantRow::set`] already quantized into `row`:
    /// the targets that read the same input (q, k and v; gate and up) quantize it once. The same
    /// result as `add_row(x, ..)`, bit for bit.
    pub fn add_row_q(&self, x: &[f32], row: &QuantRow, y: &mut [f32], scale: f32) {
        self.add_rows_q(x, std::slice::from_ref(row), y, scale, true);
    }

    /// [`HostLowRank::add_row_q`] for consecutive rows `xs` (`[n, in]`) quantized into `rows`
    /// (at least `n`), `ys` `[n, out]`: a prefill segment. Only the first row asks for the
    /// factors ahead of its reads, and only with `look_ahead` (false: this thread just read them
    /// for an earlier row); the later ones find them in cache (prefetching them again once per
    /// row cost about as much as the rows' own work: `examples/lora_row_kernel.rs`).
    pub fn add_rows_q(&self, xs: &[f32], rows: &[QuantRow], ys: &mut [f32], scale: f32, look_ahead: bool) {
        match self.compact() {
            Some(c) if super::cpu().int8_avx2 => c.add_rows_q(xs, rows, ys, scale, look_ahead, &[]),
            _ => {
                let n = xs.len() / self.in_dim.max(1);
                assert!(xs.len() == n * self.in_dim && ys.len() == n * self.out_dim, "rows of the wrong width or count");
                for (x, y) in xs.chunks_exact(self.in_dim).zip(ys.chunks_exact_mut(self.out_dim)) {
                    self.add_row(x, y, scale);
                }
            }
        }
    }

    /// [`CompactRef::prefetch`] for compact factors (nothing for f32 ones).
    pub fn prefetch(&self) {
        if let Some(c) = self.compact() {
            c.prefetch();
        }
    }

    /// Portable form of [`HostLowRank::add_row`] (any rank, any CPU; compact factors are
    /// widened, the row is not quantized). Allocates nothing once its thread's buffer has grown.
    fn add_row_generic(&self, x: &[f32], y: &mut [f32], scale: f32) {
        T_BUF.with_borrow_mut(|t| {
            t.clear();
            t.resize(self.rp, 0.0);
            self.add_row_generic_with(x, y, scale, t)
        })
    }

    fn add_row_generic_with(&self, x: &[f32], y: &mut [f32], scale: f32, t: &mut [f32]) {
        let (rp, out) = (self.rp, self.out_dim);
        match &self.factors {
            HostFactors::F32 { at, bt } => {
                let t = &mut t[..self.rank];
                for (xi, row) in x.iter().zip(at.chunks_exact(self.rank)) {
                    for (tj, a) in t.iter_mut().zip(row) {
                        *tj += xi * a;
                    }
                }
                for (tj, row) in t.iter().zip(bt.chunks_exact(out)) {
                    let s = tj * scale;
                    for (yo, b) in y.iter_mut().zip(row) {
                        *yo += s * b;
                    }
                }
            }
            HostFactors::Int8 { .. } => {
                let (a4, sa, b8, sb) = self.int8_parts().expect("compact");
                for (i, xi) in x.iter().enumerate() {
                    for (j, tj) in t.iter_mut().enumerate() {
                        let q = a4[((i / 4) * rp + j) * 4 + i % 4] as f32 - 128.0;
                        *tj += xi * q * sa[(i / FACTOR_BLOCK) * rp + j];
                    }
                }
                for (o, yo) in y.iter_mut().enumerate() {
                    let d = sb[o / FACTOR_BLOCK] * scale;
                    let dot: f32 = t.iter().enumerate().map(|(j, tj)| tj * (b8[b8_index(o, j, rp)] as f32 - 128.0)).sum();
                    *yo += d * dot;
                }
            }
        }
    }

    /// The factors as f32 `(at [in, r], bt [r, out])` = (A^T, B^T) (scale folded), widened from
    /// the compact form (with its 8-bit error) where the factors are held so: what prefill
    /// segments multiply with, and what merges and a GPU copy start from.
    pub fn factors(&self) -> (Vec<f32>, Vec<f32>) {
        let (r, rp, n, out) = (self.rank, self.rp, self.in_dim, self.out_dim);
        match &self.factors {
            HostFactors::F32 { at, bt } => (at.clone(), bt.clone()),
            HostFactors::Int8 { .. } => {
                let (a4, sa, b8, sb) = self.int8_parts().expect("compact");
                // Both walks follow the packed bytes in memory order (no index arithmetic per value).
                let mut at = vec![0f32; n * r];
                for (i4, lanes) in a4.chunks_exact(rp * 4).enumerate().take(n.div_ceil(4)) {
                    let scales = &sa[(i4 * 4 / FACTOR_BLOCK) * rp..][..r];
                    for (j, (quad, d)) in lanes.chunks_exact(4).zip(scales).enumerate() {
                        for (k, q) in quad.iter().enumerate().take(n - i4 * 4) {
                            at[(i4 * 4 + k) * r + j] = (*q as f32 - 128.0) * d;
                        }
                    }
                }
                let mut bt = vec![0f32; r * out];
                for (o8, outs) in b8.chunks_exact(rp * 8).enumerate() {
                    for (c4, quads) in outs.chunks_exact(32).enumerate() {
                        // 32 bytes: 4 columns (c4's quad of its group) of 8 outputs.
                        let j0 = (c4 / 2) * GROUP + (c4 % 2) * 4;
                        for (k, vals) in quads.chunks_exact(4).enumerate().take(out.saturating_sub(o8 * 8)) {
                            let o = o8 * 8 + k;
                            let d = sb[o / FACTOR_BLOCK];
                            for (jj, q) in vals.iter().enumerate().take(r.saturating_sub(j0)) {
                                bt[(j0 + jj) * out + o] = (*q as f32 - 128.0) * d;
                            }
                        }
                    }
                }
                (at, bt)
            }
        }
    }

    /// Resident bytes of the factors (of compact ones, this target's share of the module's
    /// buffer, cache-line padding included).
    pub fn bytes(&self) -> usize {
        match &self.factors {
            HostFactors::F32 { at, bt } => (at.len() + bt.len()) * 4,
            HostFactors::Int8 { .. } => CompactLayout::new(self.rp, self.in_dim, self.out_dim).offsets().1 * 4,
        }
    }
}

/// Row kernel on f32 factors of rank `r` (at most [`MAX_KERNEL_RANK`]): per group of 8 rank
/// columns (the last one loaded masked when `r` is not a multiple of 8) four independent
/// accumulators for `x A^T`, then one pass over `y` per 8 outputs for the second product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lowrank_f32_avx2(x: &[f32], y: &mut [f32], scale: f32, r: usize, at: &[f32], bt: &[f32]) {
    use std::arch::x86_64::*;
    let (n, out) = (x.len(), y.len());
    let (ap, bp) = (at.as_ptr(), bt.as_ptr());
    let mut tv = [0f32; MAX_KERNEL_RANK];
    for c in 0..r.div_ceil(GROUP) {
        let gp = ap.add(c * GROUP);
        let width = (r - c * GROUP).min(GROUP);
        let lanes: [i32; 8] = std::array::from_fn(|k| if k < width { -1 } else { 0 });
        let mask = _mm256_loadu_si256(lanes.as_ptr() as *const __m256i);
        // A full group is a plain load; the last, partial one reads only its `width` columns.
        let load = |p: *const f32| if width == GROUP { _mm256_loadu_ps(p) } else { _mm256_maskload_ps(p, mask) };
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 4 <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(i + u)), load(gp.add((i + u) * r)), *a);
            }
            i += 4;
        }
        while i < n {
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(i)), load(gp.add(i * r)), acc[0]);
            i += 1;
        }
        let t = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])), _mm256_set1_ps(scale));
        _mm256_storeu_ps(tv.as_mut_ptr().add(c * GROUP), t);
    }
    let tv = &tv[..r];
    let yp = y.as_mut_ptr();
    let mut o = 0;
    while o + 8 <= out {
        let mut v = _mm256_loadu_ps(yp.add(o));
        for (j, t) in tv.iter().enumerate() {
            v = _mm256_fmadd_ps(_mm256_set1_ps(*t), _mm256_loadu_ps(bp.add(j * out + o)), v);
        }
        _mm256_storeu_ps(yp.add(o), v);
        o += 8;
    }
    for oo in o..out {
        // Tail columns: one value at a time (a vector load would read past the factor).
        let mut v = *yp.add(oo);
        for (j, t) in tv.iter().enumerate() {
            v += t * *bp.add(j * out + oo);
        }
        *yp.add(oo) = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// The per-row kernels (rank-8 SIMD and portable, f32 and compact 8-bit factors, widths that
    /// are not multiples of 8 or of the 32-block) against `scale * x (B A)^T` computed by candle.
    #[test]
    fn host_low_rank_row_kernels_match_the_dense_product() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let dev = candle_core::Device::Cpu;
        let shapes = [(8, 576, 192), (8, 37, 21), (8, 1536, 576), (8, 64, 1540), (4, 64, 40), (16, 33, 70), (16, 576, 576), (12, 100, 45)];
        let more = [(32, 576, 1536), (64, 1536, 576), (64, 576, 192), (128, 576, 576), (1, 40, 33), (130, 64, 48)];
        let mut worst = std::collections::BTreeMap::<usize, f32>::new();
        for &(r, inp, out) in shapes.iter().chain(&more) {
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let x: Vec<f32> = (0..inp).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let (at, bt) = (Tensor::from_vec(a.clone(), (r, inp), &dev).unwrap(), Tensor::from_vec(b.clone(), (out, r), &dev).unwrap());
            let xt = Tensor::from_vec(x.clone(), (1, inp), &dev).unwrap();
            let want = (xt.matmul(&bt.matmul(&at).unwrap().t().unwrap()).unwrap() * 0.75)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let norm = want.iter().map(|w| w * w).sum::<f32>().sqrt();
            let rel = |got: &[f32]| got.iter().zip(&want).map(|(g, w)| (g - w) * (g - w)).sum::<f32>().sqrt() / norm;
            for compact in [false, true] {
                let h = HostLowRank::new(&a, &b, r, inp, out, compact);
                assert_eq!(h.is_compact(), compact && r <= MAX_KERNEL_RANK);
                let mut y: Vec<f32> = (0..out).map(|i| (i % 7) as f32).collect();
                h.add_row(&x, &mut y, 0.75);
                // A row quantized once for several targets gives the same bits.
                let mut q = QuantRow::default();
                q.set(&x);
                let mut yq: Vec<f32> = (0..out).map(|i| (i % 7) as f32).collect();
                h.add_row_q(&x, &q, &mut yq, 0.75);
                assert_eq!(y, yq, "r={r} {inp}->{out} compact={compact}: add_row_q differs from add_row");
                // A segment of three rows (only the first prefetches): each row's bits as alone.
                let xs: Vec<f32> = x.iter().chain(x.iter().rev()).copied().chain(x.iter().map(|v| v * -0.5)).collect();
                let mut qs: Vec<QuantRow> = (0..4).map(|_| QuantRow::default()).collect();
                let mut alone = vec![0f32; 3 * out];
                for ((q, xr), yr) in qs.iter_mut().zip(xs.chunks_exact(inp)).zip(alone.chunks_exact_mut(out)) {
                    q.set(xr);
                    h.add_row(xr, yr, 0.75);
                }
                let mut seg = vec![0f32; 3 * out];
                h.add_rows_q(&xs, &qs, &mut seg, 0.75, true);
                assert_eq!(seg, alone, "r={r} {inp}->{out} compact={compact}: add_rows_q differs from add_row");
                seg.fill(0.0);
                h.add_rows_q(&xs, &qs, &mut seg, 0.75, false);
                assert_eq!(seg, alone, "r={r} {inp}->{out} compact={compact}: add_rows_q differs from add_row");
                let got: Vec<f32> = y.iter().enumerate().map(|(i, g)| g - (i % 7) as f32).collect();
                // The factors widened back to f32 (what prefill and merges multiply with).
                let (at_w, bt_w) = h.factors();
                assert_eq!((at_w.len(), bt_w.len()), (inp * r, r * out));
                let t: Vec<f32> = (0..r).map(|j| (0..inp).map(|i| x[i] * at_w[i * r + j]).sum()).collect();
                let widened: Vec<f32> = (0..out).map(|o| 0.75 * (0..r).map(|j| t[j] * bt_w[j * out + o]).sum::<f32>()).collect();
                let tol = if h.is_compact() { 0.03 } else { 1e-5 };
                assert!(rel(&widened) <= tol, "r={r} {inp}->{out} compact={compact}: widened factors off by {}", rel(&widened));
                // The portable kernel (other ranks, other CPUs) on the same factors.
                let mut portable = vec![0f32; out];
                h.add_row_generic(&x, &mut portable, 0.75);
                if h.is_compact() {
                    // 8-bit factors, row and t: about 1% of the product's norm.
                    assert!(rel(&got) <= 0.03, "r={r} {inp}->{out} compact: relative L2 error {}", rel(&got));
                    let w = worst.entry(r).or_default();
                    *w = w.max(rel(&got));
                    assert!(rel(&portable) <= 0.03, "r={r} {inp}->{out} compact portable: relative L2 error {}", rel(&portable));
                } else {
                    for (i, ((g, p), w)) in got.iter().zip(&portable).zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "r={r} {inp}->{out} f32 [{i}]: {g} vs {w}");
                        assert!((p - w).abs() <= 1e-4 * (1.0 + w.abs()), "r={r} {inp}->{out} f32 portable [{i}]: {p} vs {w}");
                    }
                }
            }
        }
        println!("compact 8-bit factors, worst relative L2 error by rank: {worst:?}");
    }
}
