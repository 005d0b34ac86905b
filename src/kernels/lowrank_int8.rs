//! The compact (8-bit) low-rank row kernel of [`super::lowrank::HostLowRank`] and the quantized
//! input row it reads: `y += scale * (x A^T) B^T` with VNNI dot products, generic over the
//! number of 8-column rank groups.
//!
//! Invariants: the kernels are entered only through `HostLowRank`, which checks the row widths
//! and the factor buffers' padded sizes (release builds too) and that the CPU has the features;
//! a [`QuantRow`] holds whole blocks of [`FACTOR_BLOCK`] values once set.

/// Inputs per quantization block of compact factors (and of the quantized row).
pub const FACTOR_BLOCK: usize = 32;

/// Rank columns per group: one vector of 8 f32, or two 32-bit lanes of 8-bit values.
pub const GROUP: usize = 8;

/// Largest rank the SIMD kernels and the compact layout take; a larger rank keeps f32 factors and
/// runs the portable kernel.
pub const MAX_KERNEL_RANK: usize = 128;

/// `round(s)` (half away from zero, as Q8_0) clamped to +-127. The cast rounds without a libm
/// call (`f32::round` is one, and made packing twice as slow).
pub(super) fn round_i8(s: f32) -> i8 {
    ((s + 0.5f32.copysign(s)) as i32).clamp(-127, 127) as i8
}

thread_local! {
    /// The quantized row of [`lowrank_vnni`] (reused: it runs thousands of times per step).
    static ROW_Q: std::cell::RefCell<QuantRow> = std::cell::RefCell::new(QuantRow::default());
}

/// One input row quantized per [`FACTOR_BLOCK`] inputs for the compact kernel: 8-bit
/// values (absmax/127 per block, the base kernel's activation scheme), the block scales and the
/// blocks' sums of quantized values. Reused between rows (no allocation once grown).
#[derive(Debug, Default)]
pub struct QuantRow {
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) qsum: Vec<i32>,
    pub(super) n: usize,
}

impl QuantRow {
    /// Quantizes `x` (a no-op where the CPU lacks VNNI: the portable kernels read `x` itself).
    pub fn set(&mut self, x: &[f32]) {
        self.n = x.len();
        #[cfg(target_arch = "x86_64")]
        if super::cpu().int8 {
            let blocks = x.len().div_ceil(FACTOR_BLOCK);
            self.q.resize(blocks * FACTOR_BLOCK, 0);
            self.d.resize(blocks, 0.0);
            self.qsum.resize(blocks, 0);
            // SAFETY: the CPU supports the features; the buffers hold `blocks` blocks.
            unsafe { quantize_row(x, &mut self.q, &mut self.d, &mut self.qsum) };
        }
    }
}

/// `x` quantized per 32 inputs (absmax/127, round to nearest even): `q` (zero-padded to whole
/// blocks), per block the scale `d` and the sum of its quantized values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], qsum: &mut [i32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut xb = [0f32; FACTOR_BLOCK];
    for blk in 0..n.div_ceil(FACTOR_BLOCK) {
        let (i0, i1) = (blk * FACTOR_BLOCK, ((blk + 1) * FACTOR_BLOCK).min(n));
        let src: &[f32] = if i1 - i0 == FACTOR_BLOCK {
            &x[i0..i1]
        } else {
            xb.fill(0.0);
            xb[..i1 - i0].copy_from_slice(&x[i0..i1]);
            &xb
        };
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let db = amax / 127.0;
        let inv = _mm512_set1_ps(if db > 0.0 { 1.0 / db } else { 0.0 });
        let ql = _mm512_cvtps_epi32(_mm512_roundscale_ps::<0x08>(_mm512_mul_ps(lo, inv)));
        let qh = _mm512_cvtps_epi32(_mm512_roundscale_ps::<0x08>(_mm512_mul_ps(hi, inv)));
        let qp = q.as_mut_ptr().add(i0);
        _mm_storeu_si128(qp as *mut __m128i, _mm512_cvtsepi32_epi8(ql));
        _mm_storeu_si128(qp.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qh));
        d[blk] = db;
        qsum[blk] = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
    }
}

/// How far ahead of its reads (bytes) the compact kernel asks for factors of padded rank `rp`:
/// 4 KB up to rank 16, then 256 bytes per rank column (8 KB at rank 32, 16 KB at 64), about
/// twice the bandwidth-delay product of one core's reads at the rate each rank's kernel consumes
/// bytes. `examples/lora_row_kernel.rs` in the server's order, two runs each (docs/BENCHMARKS.md):
/// rank 64 26.2-26.8 ms per step at 16 KB against 29.7-29.8 at 4 KB, rank 32 14.2-14.4 at 8 KB
/// against 15.5-15.6; ranks 8 and 16 were no faster at 8 KB (and slower at 2 KB).
#[cfg(target_arch = "x86_64")]
fn look_ahead_bytes(rp: usize) -> usize {
    (256 * rp).max(4096)
}

/// How far ahead of the scaled read position another task's factors are asked for (bytes).
/// Shorter is better: lora32's deltas on one thread took 5.2-5.5 ms per decode step at 0 and
/// 512 bytes, 5.6-5.9 at 1 KB, 5.9-6.5 at 2 KB and 7.3-8.0 at 8 KB (a burst again).
#[cfg(target_arch = "x86_64")]
const NEXT_LEAD: usize = 512;

/// Software prefetch of a byte slice in order: asks for every line from `dist` to `dist` bytes
/// past the read position, once each, as the reads advance, so the requests spread over the
/// kernel instead of coming in one burst. The first `dist` bytes are the caller's to ask for
/// ([`super::lowrank::HostLowRank::prefetch`], one row ahead).
#[cfg(target_arch = "x86_64")]
struct LookAhead<const HINT: i32> {
    base: *const u8,
    len: usize,
    next: usize,
    dist: usize,
    /// Positions are scaled by `num / den` (a slice of another length read at the same pace).
    num: usize,
    den: usize,
}

#[cfg(target_arch = "x86_64")]
impl<const HINT: i32> LookAhead<HINT> {
    fn new(ahead: &[u8], dist: usize) -> Self {
        Self { base: ahead.as_ptr(), len: ahead.len(), next: dist.min(ahead.len()), dist, num: 1, den: 1 }
    }

    /// A slice that another's reads pace: by the time the reads reach position `p` of `of` bytes,
    /// every line of `ahead` up to `(p + dist) * ahead.len() / of` is asked for (all of it at the
    /// end), from its first line on.
    fn paced(ahead: &[u8], of: usize, dist: usize) -> Self {
        Self { base: ahead.as_ptr(), len: ahead.len(), next: 0, dist, num: ahead.len(), den: of.max(1) }
    }

    /// Asks for the lines up to `pos + dist` (scaled, within the slice).
    #[inline(always)]
    fn upto(&mut self, pos: usize) {
        let end = ((pos + self.dist) * self.num / self.den).min(self.len);
        while self.next < end {
            // SAFETY: `next < len`: an address inside the live slice `new` was given. A prefetch
            // reads nothing architecturally and cannot fault.
            unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(self.base.add(self.next) as *const i8) };
            self.next += 64;
        }
    }
}

/// Row kernel on `HostFactors::Int8` (`kernels::lowrank`) factors of padded rank `rp` (see there for the layouts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn lowrank_vnni(x: &[f32], y: &mut [f32], scale: f32, rp: usize, a4: &[u8], sa: &[f32], b8: &[u8], sb: &[f32]) {
    ROW_Q.with_borrow_mut(|row| {
        row.set(x);
        lowrank_vnni_q(row, y, scale, rp, a4, sa, b8, sb, (&[], &[]))
    })
}

/// [`lowrank_vnni`] on a row quantized by [`QuantRow::set`]: [`vnni_kernel`] for the factors'
/// group count (a constant there, so its accumulators and per-group tables stay in registers
/// and on a stack sized for them). `ahead.0`: empty, or bytes that start at `a4` and that the
/// kernel prefetches as it reads (see [`LookAhead`]); `ahead.1`: empty, or another task's
/// factors, asked for into L2 at the pace of this kernel's reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn lowrank_vnni_q(
    row: &QuantRow,
    y: &mut [f32],
    scale: f32,
    rp: usize,
    a4: &[u8],
    sa: &[f32],
    b8: &[u8],
    sb: &[f32],
    ahead: (&[u8], &[u8]),
) {
    macro_rules! dispatch {
        ($($g:literal)*) => {
            match rp / GROUP {
                $($g => vnni_kernel::<$g>(row, y, scale, a4, sa, b8, sb, ahead),)*
                _ => unreachable!("compact factors have 1 to 16 groups (checked by the caller)"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
}

/// The compact row kernel for `G` groups of 8 rank columns (see `HostFactors::Int8` (`kernels::lowrank`)).
///
/// `x A^T`: per block of 32 inputs the row's 8 lanes of 4 inputs are broadcast once, then per
/// group 8 vpdpbusd over the block's contiguous factor bytes (a + 128 unsigned, x signed), minus
/// 128 * sum(x_q), scaled by d_x * d_a per column. `t B^T`: each group of 8 values of t
/// quantized to 8 bits with its own scale; per 8 outputs and group one 512-bit vpdpbusd (its
/// low half against the group's columns 0-3, its high half against 4-7), widened and scaled
/// into 16 float lanes; the halves are summed once per 8 outputs, and the +128 of the stored
/// bytes comes off as one constant (no horizontal adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_kernel<const G: usize>(
    row: &QuantRow,
    y: &mut [f32],
    scale: f32,
    a4: &[u8],
    sa: &[f32],
    b8: &[u8],
    sb: &[f32],
    (ahead, next): (&[u8], &[u8]),
) {
    use std::arch::x86_64::*;
    let (rp, out) = (G * GROUP, y.len());
    // Reads walk `ahead` (a4, sa, b8, sb, then the module's next targets) in order; the look-ahead
    // follows a4's position, then b8's. `next` is asked for at the same pace, from its start.
    let mut pf = LookAhead::<_MM_HINT_T0>::new(ahead, look_ahead_bytes(rp));
    let b8_at = (b8.as_ptr() as usize).saturating_sub(a4.as_ptr() as usize);
    let reads = b8_at + b8.len();
    let mut pn = LookAhead::<_MM_HINT_T1>::paced(next, reads, NEXT_LEAD);
    let mut t = [_mm256_setzero_ps(); G];
    for blk in 0..row.n.div_ceil(FACTOR_BLOCK) {
        pf.upto(blk * FACTOR_BLOCK * rp);
        pn.upto(blk * FACTOR_BLOCK * rp);
        let qp = row.q.as_ptr().add(blk * FACTOR_BLOCK);
        let xs: [__m256i; 8] = std::array::from_fn(|g| _mm256_set1_epi32((qp.add(4 * g) as *const i32).read_unaligned()));
        let bias = _mm256_set1_epi32(128 * *row.qsum.get_unchecked(blk));
        let d = _mm256_set1_ps(*row.d.get_unchecked(blk));
        let ap = a4.as_ptr().add(blk * FACTOR_BLOCK * rp);
        for (c, tc) in t.iter_mut().enumerate() {
            let gp = ap.add(c * 32);
            let mut acc0 = _mm256_setzero_si256();
            let mut acc1 = _mm256_setzero_si256();
            for g in (0..8).step_by(2) {
                acc0 = _mm256_dpbusd_epi32(acc0, _mm256_loadu_si256(gp.add(g * rp * 4) as *const __m256i), xs[g]);
                acc1 = _mm256_dpbusd_epi32(acc1, _mm256_loadu_si256(gp.add((g + 1) * rp * 4) as *const __m256i), xs[g + 1]);
            }
            let acc = _mm256_sub_epi32(_mm256_add_epi32(acc0, acc1), bias);
            let s = _mm256_mul_ps(_mm256_loadu_ps(sa.as_ptr().add(blk * rp + c * GROUP)), d);
            *tc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, *tc);
        }
    }
    // Per group, t's 8 values quantized with their own scale: columns 0-3 broadcast to the low
    // 8 lanes, 4-7 to the high 8, as the group's 64 bytes of `b8` hold them per 8 outputs.
    let mut pats = [_mm512_setzero_si512(); G];
    let mut dts = [0f32; G];
    // sum over groups of d_t * 128 * sum(t_q): what the +128 of the stored bytes added.
    let mut offset = 0f32;
    let mut live = false;
    for c in 0..G {
        let mut g = [0f32; GROUP];
        _mm256_storeu_ps(g.as_mut_ptr(), t[c]);
        let tmax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        if tmax == 0.0 {
            continue; // zero pattern and scale: the group adds nothing
        }
        live = true;
        dts[c] = tmax / 127.0;
        let tq: [i8; 8] = std::array::from_fn(|j| round_i8(g[j] / dts[c]));
        let tsum: i32 = tq.iter().map(|&v| v as i32).sum();
        let lo = i32::from_le_bytes([tq[0] as u8, tq[1] as u8, tq[2] as u8, tq[3] as u8]);
        let hi = i32::from_le_bytes([tq[4] as u8, tq[5] as u8, tq[6] as u8, tq[7] as u8]);
        pats[c] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_set1_epi32(lo)), _mm256_set1_epi32(hi));
        offset += dts[c] * (128 * tsum) as f32;
    }
    if !live {
        pn.upto(reads);
        return;
    }
    let dtv: [__m512; G] = std::array::from_fn(|c| _mm512_set1_ps(dts[c]));
    let offset = _mm256_set1_ps(offset);
    let yp = y.as_mut_ptr();
    let mut o = 0;
    while o < out {
        let bp = b8.as_ptr().add((o / 8) * G * 64);
        pf.upto(b8_at + (o / 8) * G * 64);
        pn.upto(b8_at + (o / 8) * G * 64);
        let mut v16 = _mm512_setzero_ps();
        for c in 0..G {
            // Lanes k and 8 + k: output k's columns 0-3 and 4-7 of the group (exact integers).
            let r = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(bp.add(c * 64) as *const _), pats[c]);
            v16 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(r), dtv[c], v16);
        }
        let v = _mm256_sub_ps(
            _mm256_add_ps(_mm512_castps512_ps256(v16), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v16)))),
            offset,
        );
        let s = _mm256_set1_ps(scale * *sb.get_unchecked(o / FACTOR_BLOCK));
        if o + 8 <= out {
            _mm256_storeu_ps(yp.add(o), _mm256_fmadd_ps(v, s, _mm256_loadu_ps(yp.add(o))));
        } else {
            let mut part = [0f32; 8];
            _mm256_storeu_ps(part.as_mut_ptr(), _mm256_mul_ps(v, s));
            for (k, p) in part.iter().enumerate().take(out - o) {
                *yp.add(o + k) += p;
            }
        }
        o += 8;
    }
    pn.upto(reads);
}
