//! The AVX2 pieces of the int8 GEMM (x86-64 only): the step's rows quantized into the tile
//! layout of [`QuantRows`], the Q8_0 tile, and the prefetch and store helpers that the Q8_0 and
//! Q4_1 ([`super::q4`]) tiles share.
//!
//! Invariants: as the parent module's; each function's `# Safety` names the CPU features it
//! needs (the probe's AVX2 tier) and the sizes its pointers must cover.
use super::{QuantRows, Variant, QK};
use half::f16;
use std::arch::x86_64::*;

/// Quantizes rows of `k` inputs to Q8_0 blocks as [`super::kernel::quantize`] does (ties to even), with
/// AVX2, into [`QuantRows`]' AVX2 tile layout (`q` and `d` hold whole tiles; slices checked),
/// and each block's `d * sum(q)` into `sums` (tiled as `d`) unless it is empty.
///
/// # Safety
/// The CPU must support avx/avx2/fma.
#[target_feature(enable = "avx,avx2,fma")]
pub unsafe fn quantize_avx2(x: &[f32], k: usize, q: &mut [i8], d: &mut [f32], sums: &mut [f32]) {
    const MR4: usize = Variant::Avx2.mr();
    let nb = k / QK;
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut qb = [0i8; QK];
    for (i, xb) in x.chunks_exact(QK).enumerate() {
        // Row r's block b: tile r / 4, slot r % 4 of each 16-byte group.
        let (r, b) = (i / nb, i % nb);
        let (tile, slot) = (r / MR4, r % MR4);
        let v = [
            _mm256_loadu_ps(xb.as_ptr()),
            _mm256_loadu_ps(xb.as_ptr().add(8)),
            _mm256_loadu_ps(xb.as_ptr().add(16)),
            _mm256_loadu_ps(xb.as_ptr().add(24)),
        ];
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let m = _mm256_max_ps(m01, m23);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let dd = _mm_cvtss_f32(m) / 127.0;
        let id = _mm256_set1_ps(if dd != 0.0 { 1.0 / dd } else { 0.0 });
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let qi = v.map(|vi| _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(vi, id))));
        // i32 -> i16 -> i8 with saturation; the packs interleave 128-bit lanes, the permute
        // restores input order.
        let p16a = _mm256_packs_epi32(qi[0], qi[1]);
        let p16b = _mm256_packs_epi32(qi[2], qi[3]);
        let p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), perm);
        _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, p8);
        let at = tile * MR4 * k + b * QK * MR4 + slot * 4;
        for (g, word) in qb.chunks_exact(4).enumerate() {
            q[at + g * 4 * MR4..at + g * 4 * MR4 + 4].copy_from_slice(word);
        }
        d[(tile * nb + b) * MR4 + slot] = f16::from_f32(dd).to_f32();
        if !sums.is_empty() {
            let s4 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
            let s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b00_00_11_10));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(s1, _mm_shuffle_epi32(s1, 0b00_00_00_01)));
            sums[(tile * nb + b) * MR4 + slot] = f16::from_f32(sum as f32 * dd).to_f32();
        }
    }
}

/// Multiplies rows `r0..r0+rows` of `act` by one AVX2 panel (`nb` blocks of
/// `Variant::Avx2.pb()` bytes) and stores `cols` outputs per row at `out` (row stride `ldo`).
///
/// # Safety
/// The CPU must support avx/avx2/fma/f16c; `w` must hold `nb` panel blocks (any bytes after are only
/// prefetched); `act` must hold rows `r0..r0+rows` (up to 8; `r0` a multiple of 4, asserted); `out` must be valid for `rows` rows of `cols <= 8` floats at stride `ldo`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_avx2(w: &[u8], nb: usize, act: &QuantRows, r0: usize, rows: usize, out: *mut f32, ldo: usize, cols: usize) {
    assert!((1..=Variant::Avx2.tile_rows()).contains(&rows) && r0.is_multiple_of(Variant::Avx2.mr()), "a tile of {rows} rows at row {r0}");
    by_rows!(rows, tile_avx2_n(w, nb, act, r0, out, ldo, cols))
}

#[target_feature(enable = "avx,avx2,fma,f16c")]
unsafe fn tile_avx2_n<const R: usize>(w: &[u8], nb: usize, act: &QuantRows, r0: usize, out: *mut f32, ldo: usize, cols: usize) {
    const NR8: usize = Variant::Avx2.nr();
    const MR4: usize = Variant::Avx2.mr();
    let pb = Variant::Avx2.pb();
    debug_assert!(w.len() >= nb * pb && cols <= NR8 && R <= 2 * MR4 && r0.is_multiple_of(MR4));
    // Row r of the tile (QuantRows' AVX2 layout: per block 32 x 4 bytes, per group 4 x 4).
    let (xo, drow) = act.avx2_rows::<R>(r0);
    let xrow: [*const i8; R] = xo.map(|o| act.q.as_ptr().add(o));
    let dt = act.d.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let wp = w.as_ptr();
    let next_panel = w.len() >= 2 * nb * pb;
    for b in 0..nb {
        let blk = wp.add(b * pb);
        if next_panel {
            prefetch_next_panel(blk, nb * pb, pb);
        }
        let mut s = [_mm256_setzero_si256(); R];
        for g in 0..QK / 4 {
            // 8 output rows x 4 consecutive inputs; |w| as the unsigned operand and x with
            // w's sign as the signed one, so each product keeps its sign.
            let wg = _mm256_loadu_si256(blk.add(g * NR8 * 4) as *const __m256i);
            let aw = _mm256_abs_epi8(wg);
            for (r, sr) in s.iter_mut().enumerate() {
                let xv = _mm256_set1_epi32(std::ptr::read_unaligned(xrow[r].add(b * QK * MR4 + g * MR4 * 4) as *const i32));
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wg));
                *sr = _mm256_add_epi32(*sr, _mm256_madd_epi16(p, ones));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(NR8 * QK) as *const __m128i));
        for (r, a) in acc.iter_mut().enumerate() {
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*dt.add(drow[r] + b * MR4)));
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), sc, *a);
        }
    }
    store_rows_avx2(&acc, out, ldo, cols);
}

/// When a tile's slice `w` runs on over the next panel (the first row tile's: `next_panel`
/// above), each block asks for the next panel's block (`panel` bytes on), its `pb` bytes' lines
/// from their start: every address lies inside the live slice, and a prefetch cannot fault.
/// # Safety
/// `blk + panel + pb` must lie inside the slice `blk` points into.
#[inline(always)]
pub unsafe fn prefetch_next_panel(blk: *const u8, panel: usize, pb: usize) {
    for l in 0..pb.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(blk.add(panel + l * 64) as *const i8);
    }
}

/// Stores a tile's rows of 8 outputs, the first `cols` of each (both AVX2 tiles).
/// # Safety
/// avx/avx2; `out` valid for `acc.len()` rows of `cols <= 8` floats at stride `ldo`.
#[target_feature(enable = "avx,avx2")]
#[inline]
pub unsafe fn store_rows_avx2(acc: &[__m256], out: *mut f32, ldo: usize, cols: usize) {
    if cols >= Variant::Avx2.nr() {
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * ldo), *a);
        }
    } else {
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (r, a) in acc.iter().enumerate() {
            _mm256_maskstore_ps(out.add(r * ldo), mask, *a);
        }
    }
}
