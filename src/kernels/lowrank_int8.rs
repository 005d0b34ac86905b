//! The compact (8-bit) low-rank row kernels of [`super::lowrank::HostLowRank`] and the quantized
//! input row they read: `y += scale * (x A^T) B^T` with 8-bit dot products, generic over the
//! number of 8-column rank groups. Two variants over the same bytes, chosen per call by the CPU
//! probe: VNNI (`vpdpbusd`, AVX-512 CPUs) and AVX2 (`vpmaddubsw` / `vpmaddwd`, every AVX2 CPU),
//! so that compact factors, and their quarter of the f32 bytes, are not limited to VNNI CPUs.
//!
//! Invariants: the kernels are entered only through `HostLowRank`, which checks the row widths
//! and the factor buffers' padded sizes (release builds too) and that the CPU has the features
//! of [`super::CpuFeatures::int8_avx2`] (every VNNI CPU has them too); a [`QuantRow`] holds whole
//! blocks of [`FACTOR_BLOCK`] values once set. Both variants compute the same exact integer dot
//! products; they differ only in float rounding (the VNNI one removes the stored bytes' +128 in
//! float, the AVX2 one never adds it).

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
    /// The quantized row of [`lowrank_compact`] (reused: it runs thousands of times per step).
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
    /// Quantizes `x` (a no-op where the CPU runs neither compact kernel: the portable kernels read
    /// `x` itself). Both variants give the same bytes.
    pub fn set(&mut self, x: &[f32]) {
        self.n = x.len();
        #[cfg(target_arch = "x86_64")]
        if super::cpu().int8_avx2 {
            let blocks = x.len().div_ceil(FACTOR_BLOCK);
            self.q.resize(blocks * FACTOR_BLOCK, 0);
            self.d.resize(blocks, 0.0);
            self.qsum.resize(blocks, 0);
            // SAFETY: the CPU supports the features of the variant called; the buffers hold
            // `blocks` blocks.
            unsafe {
                if super::cpu().int8 {
                    quantize_row(x, &mut self.q, &mut self.d, &mut self.qsum)
                } else {
                    quantize_row_avx2(x, &mut self.q, &mut self.d, &mut self.qsum)
                }
            };
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

/// [`quantize_row`] with AVX2 (the same bytes, scales and sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], qsum: &mut [i32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut xb = [0f32; FACTOR_BLOCK];
    let sign = _mm256_set1_ps(-0.0);
    // packs interleave the 128-bit lanes: this permute restores input order.
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for blk in 0..n.div_ceil(FACTOR_BLOCK) {
        let (i0, i1) = (blk * FACTOR_BLOCK, ((blk + 1) * FACTOR_BLOCK).min(n));
        let src: &[f32] = if i1 - i0 == FACTOR_BLOCK {
            &x[i0..i1]
        } else {
            xb.fill(0.0);
            xb[..i1 - i0].copy_from_slice(&x[i0..i1]);
            &xb
        };
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(src.as_ptr().add(8 * j)));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let db = amax / 127.0;
        let inv = _mm256_set1_ps(if db > 0.0 { 1.0 / db } else { 0.0 });
        let qi = v.map(|vi| _mm256_cvtps_epi32(_mm256_round_ps::<0x08>(_mm256_mul_ps(vi, inv))));
        let p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3])), perm);
        _mm256_storeu_si256(q.as_mut_ptr().add(i0) as *mut __m256i, p8);
        d[blk] = db;
        let s = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        qsum[blk] = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
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

/// The look-ahead of a compact kernel's reads (`pf`, into L1, over `ahead`: a4, sa, b8, sb, then
/// the module's next targets, in order; it follows a4's position, then b8's) and of another
/// task's factors (`pn`, into L2, `next` from its start at the same pace); `b8_at`: b8's offset
/// from a4, `reads`: the bytes the kernel walks.
#[cfg(target_arch = "x86_64")]
struct Pacers {
    pf: LookAhead<{ std::arch::x86_64::_MM_HINT_T0 }>,
    pn: LookAhead<{ std::arch::x86_64::_MM_HINT_T1 }>,
    b8_at: usize,
    reads: usize,
}

#[cfg(target_arch = "x86_64")]
impl Pacers {
    fn new(rp: usize, a4: &[u8], b8: &[u8], (ahead, next): (&[u8], &[u8])) -> Self {
        let b8_at = (b8.as_ptr() as usize).saturating_sub(a4.as_ptr() as usize);
        let reads = b8_at + b8.len();
        Self { pf: LookAhead::new(ahead, look_ahead_bytes(rp)), pn: LookAhead::paced(next, reads, NEXT_LEAD), b8_at, reads }
    }
}

/// One group of 8 values of t quantized with its own scale (absmax/127): the scale and the
/// values, or None for an all-zero group (it adds nothing).
fn quantize_group(g: &[f32; GROUP]) -> Option<(f32, [i8; GROUP])> {
    let tmax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
    if tmax == 0.0 {
        return None;
    }
    let dt = tmax / 127.0;
    Some((dt, std::array::from_fn(|j| round_i8(g[j] / dt))))
}

/// `y[o..o + 8] += s * v`, the outputs past `y.len()` dropped (the last 8 of a width that is not a
/// multiple of 8).
///
/// # Safety
/// The CPU must have AVX and FMA; `o < y.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
#[inline]
unsafe fn add_scaled_8(y: &mut [f32], o: usize, v: std::arch::x86_64::__m256, s: f32) {
    use std::arch::x86_64::*;
    let (yp, s) = (y.as_mut_ptr(), _mm256_set1_ps(s));
    if o + 8 <= y.len() {
        _mm256_storeu_ps(yp.add(o), _mm256_fmadd_ps(v, s, _mm256_loadu_ps(yp.add(o))));
    } else {
        let mut part = [0f32; 8];
        _mm256_storeu_ps(part.as_mut_ptr(), _mm256_mul_ps(v, s));
        for (yk, p) in y[o..].iter_mut().zip(part) {
            *yk += p;
        }
    }
}

/// Row kernel on `HostFactors::Int8` (`kernels::lowrank`) factors of padded rank `rp` (see there
/// for the layouts): quantizes `x` into its thread's row, then [`lowrank_compact_q`].
///
/// # Safety
/// The CPU must have the features of `int8_avx2`; the buffers must hold the padded sizes
/// `HostFactors::Int8` documents for `x.len()`, `y.len()` and `rp` (1 to 16 groups).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn lowrank_compact(x: &[f32], y: &mut [f32], scale: f32, rp: usize, a4: &[u8], sa: &[f32], b8: &[u8], sb: &[f32]) {
    ROW_Q.with_borrow_mut(|row| {
        row.set(x);
        lowrank_compact_q(row, y, scale, rp, a4, sa, b8, sb, (&[], &[]))
    })
}

/// The compact row kernel on a row quantized by [`QuantRow::set`]: [`vnni_kernel`] where the CPU
/// has VNNI, else [`avx2_kernel`], for the factors' group count (a constant there, so the
/// accumulators and per-group tables stay in registers and on a stack sized for them).
/// `ahead.0`: empty, or bytes that start at `a4` and that the kernel prefetches as it reads (see
/// [`LookAhead`]); `ahead.1`: empty, or another task's factors, asked for into L2 at the pace of
/// this kernel's reads.
///
/// # Safety
/// As [`lowrank_compact`], and `row` must hold whole blocks of `y`'s input width.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn lowrank_compact_q(
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
    if super::cpu().int8 {
        lowrank_variant_q(true, row, y, scale, rp, a4, sa, b8, sb, ahead)
    } else {
        lowrank_variant_q(false, row, y, scale, rp, a4, sa, b8, sb, ahead)
    }
}

/// [`lowrank_compact_q`] with the variant named: `vnni` true needs the `int8` features, false
/// the `int8_avx2` ones (the tests run both on one CPU).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn lowrank_variant_q(
    vnni: bool,
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
            match (vnni, rp / GROUP) {
                $((true, $g) => vnni_kernel::<$g>(row, y, scale, a4, sa, b8, sb, ahead),)*
                $((false, $g) => avx2_kernel::<$g>(row, y, scale, a4, sa, b8, sb, ahead),)*
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
    let Pacers { mut pf, mut pn, b8_at, reads } = Pacers::new(rp, a4, b8, (ahead, next));
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
        let Some((dt, tq)) = quantize_group(&g) else {
            continue; // zero pattern and scale: the group adds nothing
        };
        live = true;
        dts[c] = dt;
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
        add_scaled_8(y, o, v, scale * *sb.get_unchecked(o / FACTOR_BLOCK));
        o += 8;
    }
    pn.upto(reads);
}

/// [`vnni_kernel`] for CPUs with AVX2 but not VNNI, on the same bytes. AVX2 multiplies 8-bit
/// values only as unsigned x signed pairs summed to 16 bits (`vpmaddubsw`), and `a + 128` (up to
/// 255) against a signed row would overflow those sums. So the stored bytes are made signed
/// again (`xor 0x80`: values in [-127, 127], padding 0), and each product is formed as
/// `|u| * (v * sign(u))` (`vpsign`): pair sums stay within 2 * 127 * 127, exact, and
/// `vpmaddwd` by ones widens them to 32 bits. `x A^T`: `|x|` per block once, `a`'s sign put on
/// it per group. `t B^T`: `|t|` per group once, each output's bytes given t's sign. No +128 to
/// remove afterwards.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_kernel<const G: usize>(
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
    let Pacers { mut pf, mut pn, b8_at, reads } = Pacers::new(rp, a4, b8, (ahead, next));
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    // Signed product of bytes `s` (signed, any sign) and `u`, summed per 32-bit lane of 4 pairs.
    let dot = |au: __m256i, u: __m256i, s: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(s, u)), ones);
    let mut t = [_mm256_setzero_ps(); G];
    for blk in 0..row.n.div_ceil(FACTOR_BLOCK) {
        pf.upto(blk * FACTOR_BLOCK * rp);
        pn.upto(blk * FACTOR_BLOCK * rp);
        let qp = row.q.as_ptr().add(blk * FACTOR_BLOCK);
        let xs: [__m256i; 8] = std::array::from_fn(|g| _mm256_set1_epi32((qp.add(4 * g) as *const i32).read_unaligned()));
        let ax: [__m256i; 8] = xs.map(|v| _mm256_abs_epi8(v));
        let d = _mm256_set1_ps(*row.d.get_unchecked(blk));
        let ap = a4.as_ptr().add(blk * FACTOR_BLOCK * rp);
        for (c, tc) in t.iter_mut().enumerate() {
            let gp = ap.add(c * 32);
            let mut acc0 = _mm256_setzero_si256();
            let mut acc1 = _mm256_setzero_si256();
            for g in (0..8).step_by(2) {
                let a0 = _mm256_xor_si256(_mm256_loadu_si256(gp.add(g * rp * 4) as *const __m256i), flip);
                let a1 = _mm256_xor_si256(_mm256_loadu_si256(gp.add((g + 1) * rp * 4) as *const __m256i), flip);
                acc0 = _mm256_add_epi32(acc0, dot(ax[g], xs[g], a0));
                acc1 = _mm256_add_epi32(acc1, dot(ax[g + 1], xs[g + 1], a1));
            }
            let s = _mm256_mul_ps(_mm256_loadu_ps(sa.as_ptr().add(blk * rp + c * GROUP)), d);
            *tc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc0, acc1)), s, *tc);
        }
    }
    // Per group, t's 8 values quantized with their own scale (as in vnni_kernel): columns 0-3
    // broadcast against the group's first 32 bytes per 8 outputs, 4-7 against the next 32.
    let mut tlo = [_mm256_setzero_si256(); G];
    let mut thi = [_mm256_setzero_si256(); G];
    let mut dts = [0f32; G];
    let mut live = false;
    for c in 0..G {
        let mut g = [0f32; GROUP];
        _mm256_storeu_ps(g.as_mut_ptr(), t[c]);
        let Some((dt, tq)) = quantize_group(&g) else {
            continue; // zero pattern and scale: the group adds nothing
        };
        live = true;
        dts[c] = dt;
        tlo[c] = _mm256_set1_epi32(i32::from_le_bytes([tq[0] as u8, tq[1] as u8, tq[2] as u8, tq[3] as u8]));
        thi[c] = _mm256_set1_epi32(i32::from_le_bytes([tq[4] as u8, tq[5] as u8, tq[6] as u8, tq[7] as u8]));
    }
    if !live {
        pn.upto(reads);
        return;
    }
    let alo = tlo.map(|v| _mm256_abs_epi8(v));
    let ahi = thi.map(|v| _mm256_abs_epi8(v));
    let dtv: [__m256; G] = std::array::from_fn(|c| _mm256_set1_ps(dts[c]));
    let mut o = 0;
    while o < out {
        let bp = b8.as_ptr().add((o / 8) * G * 64);
        pf.upto(b8_at + (o / 8) * G * 64);
        pn.upto(b8_at + (o / 8) * G * 64);
        let mut v = _mm256_setzero_ps();
        for c in 0..G {
            let lo = _mm256_xor_si256(_mm256_loadu_si256(bp.add(c * 64) as *const __m256i), flip);
            let hi = _mm256_xor_si256(_mm256_loadu_si256(bp.add(c * 64 + 32) as *const __m256i), flip);
            // Lane k: output k's dot with the group's 8 values of t (exact integers).
            let r = _mm256_add_epi32(dot(alo[c], tlo[c], lo), dot(ahi[c], thi[c], hi));
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), dtv[c], v);
        }
        add_scaled_8(y, o, v, scale * *sb.get_unchecked(o / FACTOR_BLOCK));
        o += 8;
    }
    pn.upto(reads);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::lowrank::HostLowRank;
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The AVX2 kernel on every group count against the VNNI kernel on the same quantized row and
    /// bytes (where the CPU has VNNI: the same integers, so only float rounding apart), and
    /// against the product of the same factors widened to f32 (every AVX2 CPU: that one does not
    /// quantize the row or t, so about 1% apart). The lowrank tests cover the variant the CPU
    /// picks; this one covers the AVX2 variant on VNNI CPUs too.
    #[test]
    fn avx2_kernel_matches_the_vnni_kernel_and_the_widened_product() {
        let cpu = crate::kernels::cpu();
        if !cpu.int8_avx2 {
            eprintln!("skipped: this CPU runs neither compact kernel");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for (g, (inp, out)) in (1..=16).zip([(576, 192), (37, 21), (64, 1540), (100, 45)].into_iter().cycle()) {
            let r = g * GROUP - (g % 3); // ranks that are and are not multiples of 8
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let x: Vec<f32> = (0..inp).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let h = HostLowRank::new(&a, &b, r, inp, out, true);
            let (a4, sa, b8, sb) = h.compact().expect("compact").parts();
            let mut row = QuantRow::default();
            row.set(&x);
            let base: Vec<f32> = (0..out).map(|i| (i % 5) as f32).collect();
            let run = |vnni: bool| {
                let mut y = base.clone();
                // SAFETY: the CPU has the variant's features (checked by the callers below); the
                // buffers are a HostLowRank's own compact parts for these widths and rank, and
                // `row` holds whole blocks of `inp` values.
                unsafe { lowrank_variant_q(vnni, &row, &mut y, 0.75, g * GROUP, a4, sa, b8, sb, (&[], &[])) };
                y.iter().zip(&base).map(|(v, b0)| v - b0).collect::<Vec<f32>>()
            };
            let avx2 = run(false);
            let rel = |p: &[f32], q: &[f32]| {
                let n = q.iter().map(|v| v * v).sum::<f32>().sqrt();
                p.iter().zip(q).map(|(u, v)| (u - v) * (u - v)).sum::<f32>().sqrt() / n
            };
            let mut generic = vec![0f32; out];
            let (at, bt) = h.factors();
            let t: Vec<f32> = (0..r).map(|j| (0..inp).map(|i| x[i] * at[i * r + j]).sum()).collect();
            for (o, yo) in generic.iter_mut().enumerate() {
                *yo = 0.75 * (0..r).map(|j| t[j] * bt[j * out + o]).sum::<f32>();
            }
            assert!(
                rel(&avx2, &generic) < 0.03,
                "rank {r} {inp}->{out}: AVX2 kernel {} from the widened factors' product",
                rel(&avx2, &generic)
            );
            if cpu.int8 {
                let vnni = run(true);
                assert!(rel(&avx2, &vnni) < 1e-5, "rank {r} {inp}->{out}: AVX2 and VNNI kernels {} apart", rel(&avx2, &vnni));
            }
        }
    }
}
