//! Q4_1 weights in the int8 GEMM: panels of 4-bit values for AVX2 CPUs ([`Variant::Q4Avx2`]).
//!
//! Role: the base product over GGUF Q4_1 weights (SmolLM2's projections) without re-blocking them
//! as Q8_0. A Q4_1 block is 32 values `w = d * q + m` (`q` 4-bit unsigned, `d` and `m` f16): 20
//! bytes against Q8_0's 34. A decode step of one stream reads every weight once and is bound by
//! those bytes, so it reads 41% fewer of them (llama.cpp reads the file's blocks the same way).
//!
//! Layout: panels of 8 output rows; per 32-input block, 4 groups of 32 bytes where byte
//! `(j, t)` of group `g` is row `j`'s Q4_1 byte `qs[4g + t]`: its low nibble is input `4g + t`,
//! its high nibble input `16 + 4g + t` (so packing copies bytes and never splits them), then the
//! 8 rows' `d` and the 8 rows' `m` (f16), 160 bytes per (panel, block).
//!
//! Product: with the row quantized to Q8 (`dx`, `xq`), `sum_i (d q_i + m) x_i` is
//! `d dx sum(q_i xq_i) + m s` with `s = dx sum(xq)` rounded to f16: the Q4_1 x Q8_1 dot of
//! llama.cpp and candle. The nibbles are unsigned, so `vpmaddubsw(q, xq)` needs no sign trick,
//! and a block's 16 products per i16 lane stay below 16 * 15 * 127 = 30480: they add up in i16
//! and reach i32 through one `vpmaddwd` per block and row.
//!
//! Invariants: the row tiles and the activations' layout are the AVX2 variant's
//! ([`QuantRows`]); results equal candle's Q4_1 `QMatMul` up to float summation order and the
//! rounding of `s` (candle rounds `sum` to f16 before the product); panels past `n` are zero.
use rayon::prelude::*;

use super::{QuantRows, Variant, QK};

/// Bytes of one Q4_1 block in a GGUF file: `d`, `m` (f16), 16 bytes of nibbles.
const BLOCK: usize = 20;
const NR: usize = Variant::Q4Avx2.nr();
const PB: usize = Variant::Q4Avx2.pb();
/// Offsets of the 8 `d` and the 8 `m` in a (panel, block).
const D_AT: usize = NR * QK / 2;
const M_AT: usize = D_AT + NR * 2;

/// Packs raw Q4_1 blocks (row-major, `n` rows of `k / 32` blocks) into 8-row panels.
pub(super) fn pack(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nb = k / QK;
    assert_eq!(raw.len(), n * nb * BLOCK, "Q4_1 data of a [{n}, {k}] tensor");
    let mut data = vec![0u8; n.div_ceil(NR) * nb * PB];
    data.par_chunks_mut(nb * PB).enumerate().for_each(|(p, panel)| {
        for (b, dst) in panel.chunks_exact_mut(PB).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let blk = &raw[((p * NR + j) * nb + b) * BLOCK..][..BLOCK];
                for g in 0..4 {
                    dst[g * NR * 4 + j * 4..][..4].copy_from_slice(&blk[4 + g * 4..][..4]);
                }
                dst[D_AT + 2 * j..][..2].copy_from_slice(&blk[0..2]);
                dst[M_AT + 2 * j..][..2].copy_from_slice(&blk[2..4]);
            }
        }
    });
    data
}

/// The packed weight `[n, k]` as f32, each value `q * d + m` as candle dequantizes Q4_1.
pub(super) fn dequantize(data: &[u8], n: usize, k: usize) -> Vec<f32> {
    let nb = k / QK;
    let f16_at = |src: &[u8], at: usize| half::f16::from_le_bytes([src[at], src[at + 1]]).to_f32();
    let mut w = vec![0f32; n * k];
    w.par_chunks_mut(k).enumerate().for_each(|(row, out)| {
        let (p, j) = (row / NR, row % NR);
        for (b, vals) in out.chunks_exact_mut(QK).enumerate() {
            let src = &data[(p * nb + b) * PB..][..PB];
            let (d, m) = (f16_at(src, D_AT + 2 * j), f16_at(src, M_AT + 2 * j));
            for i in 0..QK / 2 {
                let byte = src[(i / 4) * NR * 4 + j * 4 + i % 4];
                vals[i] = (byte & 0x0f) as f32 * d + m;
                vals[i + QK / 2] = (byte >> 4) as f32 * d + m;
            }
        }
    });
    w
}

pub(super) use kernel::tile;

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{QuantRows, Variant, D_AT, M_AT, NR, PB, QK};
    use std::arch::x86_64::*;

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
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::QuantRows;
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(_w: &[u8], _nb: usize, _act: &QuantRows, _r0: usize, _rows: usize, _out: *mut f32, _ldo: usize, _cols: usize) {
        unreachable!("Q4_1 panels are only built when the AVX2 tier holds")
    }
}
