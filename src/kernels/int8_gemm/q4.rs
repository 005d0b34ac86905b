//! Q4_1 weights in the int8 GEMM: panels of 4-bit values, for AVX2 CPUs ([`Variant::Q4Avx2`])
//! and for AVX-512 VNNI ones ([`Variant::Q4Vnni`]).
//!
//! Role: the base product over GGUF Q4_1 weights (SmolLM2's projections) without re-blocking them
//! as Q8_0. A Q4_1 block is 32 values `w = d * q + m` (`q` 4-bit unsigned, `d` and `m` f16): 20
//! bytes against Q8_0's 34. A decode step of one stream reads every weight once and is bound by
//! those bytes, so it reads 41% fewer of them (llama.cpp reads the file's blocks the same way).
//!
//! Layout: panels of `NR` output rows (the variant's [`Variant::nr`]: 8 for AVX2, one `ymm` of
//! f32; 16 for VNNI, one `zmm`); per 32-input block, 4 groups of `NR * 4` bytes where byte `(j,
//! t)` of group `g` is row `j`'s Q4_1 byte `qs[4g + t]`: its low nibble is input `4g + t`, its
//! high nibble input `16 + 4g + t` (so packing copies bytes and never splits them), then the `NR`
//! rows' `d` and the `NR` rows' `m` (f16): `NR * 20` bytes per (panel, block).
//!
//! Product: with the row quantized to Q8 (`dx`, `xq`), `sum_i (d q_i + m) x_i` is
//! `d dx sum(q_i xq_i) + m s` with `s = dx sum(xq)` rounded to f16: the Q4_1 x Q8_1 dot of
//! llama.cpp and candle. The nibbles are unsigned, the activations signed: exactly the operands
//! of `vpmaddubsw` (AVX2) and `vpdpbusd` (VNNI), so neither needs a sign trick. AVX2: a block's
//! 16 products per i16 lane stay below 16 * 15 * 127 = 30480, so they add up in i16 and reach i32
//! through one `vpmaddwd` per block and row; VNNI adds them in i32 directly.
//!
//! Invariants: both tiles read the activations in the AVX2 variants' layout ([`QuantRows`], with
//! its block sums); results equal candle's Q4_1 `QMatMul` up to float summation order and the
//! rounding of `s` (candle rounds `sum` to f16 before the product); panels past `n` are zero.
use rayon::prelude::*;

use super::{QuantRows, Variant, QK};

/// Bytes of one Q4_1 block in a GGUF file: `d`, `m` (f16), 16 bytes of nibbles.
const BLOCK: usize = 20;

/// Offsets of the `nr` `d` and the `nr` `m` in a (panel, block) of `nr` rows.
const fn d_at(nr: usize) -> usize {
    nr * QK / 2
}
const fn m_at(nr: usize) -> usize {
    d_at(nr) + nr * 2
}

/// Packs raw Q4_1 blocks (row-major, `n` rows of `k / 32` blocks) into the panels of `variant`
/// (a Q4_1 one).
pub(super) fn pack(raw: &[u8], n: usize, k: usize, variant: Variant) -> Vec<u8> {
    let (nr, pb, nb) = (variant.nr(), variant.pb(), k / QK);
    assert_eq!(raw.len(), n * nb * BLOCK, "Q4_1 data of a [{n}, {k}] tensor");
    assert_eq!(pb, nr * BLOCK, "{variant:?} is not a Q4_1 variant");
    let mut data = vec![0u8; n.div_ceil(nr) * nb * pb];
    data.par_chunks_mut(nb * pb).enumerate().for_each(|(p, panel)| {
        for (b, dst) in panel.chunks_exact_mut(pb).enumerate() {
            for j in 0..nr.min(n - p * nr) {
                let blk = &raw[((p * nr + j) * nb + b) * BLOCK..][..BLOCK];
                for g in 0..4 {
                    dst[g * nr * 4 + j * 4..][..4].copy_from_slice(&blk[4 + g * 4..][..4]);
                }
                dst[d_at(nr) + 2 * j..][..2].copy_from_slice(&blk[0..2]);
                dst[m_at(nr) + 2 * j..][..2].copy_from_slice(&blk[2..4]);
            }
        }
    });
    data
}

/// The weight `[n, k]` packed for `variant` as f32, each value `q * d + m` as candle
/// dequantizes Q4_1.
pub(super) fn dequantize(data: &[u8], n: usize, k: usize, variant: Variant) -> Vec<f32> {
    let (nr, pb, nb) = (variant.nr(), variant.pb(), k / QK);
    let f16_at = |src: &[u8], at: usize| half::f16::from_le_bytes([src[at], src[at + 1]]).to_f32();
    let mut w = vec![0f32; n * k];
    w.par_chunks_mut(k).enumerate().for_each(|(row, out)| {
        let (p, j) = (row / nr, row % nr);
        for (b, vals) in out.chunks_exact_mut(QK).enumerate() {
            let src = &data[(p * nb + b) * pb..][..pb];
            let (d, m) = (f16_at(src, d_at(nr) + 2 * j), f16_at(src, m_at(nr) + 2 * j));
            for i in 0..QK / 2 {
                let byte = src[(i / 4) * nr * 4 + j * 4 + i % 4];
                vals[i] = (byte & 0x0f) as f32 * d + m;
                vals[i + QK / 2] = (byte >> 4) as f32 * d + m;
            }
        }
    });
    w
}

pub(super) use kernel::{tile, tile_vnni};

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{d_at, m_at, QuantRows, Variant, QK};
    use std::arch::x86_64::*;
    const NR: usize = Variant::Q4Avx2.nr();
    const PB: usize = Variant::Q4Avx2.pb();
    const D_AT: usize = d_at(NR);
    const M_AT: usize = m_at(NR);

    /// Multiplies rows `r0..r0+rows` of `act` (AVX2 tile layout with `sums`) by one Q4_1 panel
    /// and stores `cols` outputs per row at `out` (row stride `ldo`).
    ///
    /// # Safety
    /// The CPU must support avx/avx2/fma/f16c; `w` must hold `nb` panel blocks (any bytes after
    /// are only prefetched); `act` must be quantized for [`Variant::Q4Avx2`] and hold rows
    /// `r0..r0+rows` (up to 8; `r0` a multiple of 4, asserted); `out` must be valid for `rows` rows of `cols <= 8` floats at stride `ldo`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(w: &[u8], nb: usize, act: &QuantRows, r0: usize, rows: usize, out: *mut f32, ldo: usize, cols: usize) {
        assert!(
            (1..=Variant::Q4Avx2.tile_rows()).contains(&rows) && r0.is_multiple_of(Variant::Q4Avx2.mr()),
            "a tile of {rows} rows at row {r0}"
        );
        by_rows!(rows, tile_n(w, nb, act, r0, out, ldo, cols))
    }

    #[target_feature(enable = "avx,avx2,fma,f16c")]
    unsafe fn tile_n<const R: usize>(w: &[u8], nb: usize, act: &QuantRows, r0: usize, out: *mut f32, ldo: usize, cols: usize) {
        const MR4: usize = Variant::Q4Avx2.mr();
        debug_assert!(w.len() >= nb * PB && cols <= NR && R <= 2 * MR4 && r0.is_multiple_of(MR4));
        // Row r of the tile (QuantRows' AVX2 layout).
        let (xo, drow) = act.avx2_rows::<R>(r0);
        let xrow: [*const i8; R] = xo.map(|o| act.q.as_ptr().add(o));
        let (dt, st) = (act.d.as_ptr(), act.sums.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); R];
        let wp = w.as_ptr();
        // As the Q8 AVX2 tile: the first row tile's slice runs on over the next panel.
        let next_panel = w.len() >= 2 * nb * PB;
        for b in 0..nb {
            let blk = wp.add(b * PB);
            if next_panel {
                super::super::avx2::prefetch_next_panel(blk, nb * PB, PB);
            }
            let mut s = [_mm256_setzero_si256(); R];
            for g in 0..4 {
                // 8 output rows x 4 bytes: low nibbles are inputs 4g.., high nibbles 16+4g..
                let packed = _mm256_loadu_si256(blk.add(g * NR * 4) as *const __m256i);
                let lo = _mm256_and_si256(packed, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                for (r, sr) in s.iter_mut().enumerate() {
                    let xb = xrow[r].add(b * QK * MR4);
                    let bc = |grp: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xb.add(grp * MR4 * 4) as *const i32));
                    *sr = _mm256_add_epi16(*sr, _mm256_maddubs_epi16(lo, bc(g)));
                    *sr = _mm256_add_epi16(*sr, _mm256_maddubs_epi16(hi, bc(g + 4)));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(D_AT) as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(M_AT) as *const __m128i));
            for (r, a) in acc.iter_mut().enumerate() {
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[r], ones));
                let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*dt.add(drow[r] + b * MR4)));
                *a = _mm256_fmadd_ps(dot, sc, *a);
                *a = _mm256_fmadd_ps(mw, _mm256_set1_ps(*st.add(drow[r] + b * MR4)), *a);
            }
        }
        super::super::avx2::store_rows_avx2(&acc, out, ldo, cols);
    }

    /// [`tile`] for a [`Variant::Q4Vnni`] panel (16 outputs per row, `cols <= 16`): the same
    /// blocks and activations, the nibbles multiplied by `vpdpbusd` into i32 on 512-bit lanes.
    ///
    /// # Safety
    /// The CPU must support avx512f/bw/vl/vnni, avx2, fma and f16c (the probe's VNNI tier); `w`
    /// must hold `nb` panel blocks (any bytes after are only prefetched); `act` must be quantized
    /// for a Q4_1 variant and hold rows `r0..r0+rows` (up to 8; `r0` a multiple of 4, asserted);
    /// `out` must be valid for `rows` rows of `cols <= 16` floats at stride `ldo`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_vnni(w: &[u8], nb: usize, act: &QuantRows, r0: usize, rows: usize, out: *mut f32, ldo: usize, cols: usize) {
        assert!(
            (1..=Variant::Q4Vnni.tile_rows()).contains(&rows) && r0.is_multiple_of(Variant::Q4Vnni.mr()),
            "a tile of {rows} rows at row {r0}"
        );
        by_rows!(rows, tile_vnni_n(w, nb, act, r0, out, ldo, cols))
    }

    #[target_feature(enable = "avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_vnni_n<const R: usize>(w: &[u8], nb: usize, act: &QuantRows, r0: usize, out: *mut f32, ldo: usize, cols: usize) {
        const NR16: usize = Variant::Q4Vnni.nr();
        const PB16: usize = Variant::Q4Vnni.pb();
        const MR4: usize = Variant::Q4Vnni.mr();
        debug_assert!(w.len() >= nb * PB16 && cols <= NR16 && R <= 2 * MR4 && r0.is_multiple_of(MR4));
        let (xo, drow) = act.avx2_rows::<R>(r0);
        let xrow: [*const i8; R] = xo.map(|o| act.q.as_ptr().add(o));
        let (dt, st) = (act.d.as_ptr(), act.sums.as_ptr());
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        let next_panel = w.len() >= 2 * nb * PB16;
        for b in 0..nb {
            let blk = wp.add(b * PB16);
            if next_panel {
                super::super::avx2::prefetch_next_panel(blk, nb * PB16, PB16);
            }
            let mut s = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                // 16 output rows x 4 bytes: low nibbles are inputs 4g.., high nibbles 16+4g..
                let packed = _mm512_loadu_si512(blk.add(g * NR16 * 4) as *const _);
                let lo = _mm512_and_si512(packed, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                for (r, sr) in s.iter_mut().enumerate() {
                    let xb = xrow[r].add(b * QK * MR4);
                    let bc = |grp: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xb.add(grp * MR4 * 4) as *const i32));
                    *sr = _mm512_dpbusd_epi32(*sr, lo, bc(g));
                    *sr = _mm512_dpbusd_epi32(*sr, hi, bc(g + 4));
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(d_at(NR16)) as *const __m256i));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(m_at(NR16)) as *const __m256i));
            for (r, a) in acc.iter_mut().enumerate() {
                let sc = _mm512_mul_ps(dw, _mm512_set1_ps(*dt.add(drow[r] + b * MR4)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), sc, *a);
                *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(*st.add(drow[r] + b * MR4)), *a);
            }
        }
        let mask: __mmask16 = if cols >= NR16 { 0xffff } else { ((1u32 << cols) - 1) as __mmask16 };
        for (r, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * ldo), mask, *a);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::QuantRows;
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(_w: &[u8], _nb: usize, _act: &QuantRows, _r0: usize, _rows: usize, _out: *mut f32, _ldo: usize, _cols: usize) {
        unreachable!("Q4_1 panels are only built when the AVX2 tier holds")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_vnni(_w: &[u8], _nb: usize, _act: &QuantRows, _r0: usize, _rows: usize, _out: *mut f32, _ldo: usize, _cols: usize) {
        unreachable!("Q4_1 VNNI panels are only built when the VNNI tier holds")
    }
}
