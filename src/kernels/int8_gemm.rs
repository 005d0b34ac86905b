//! Int8 matrix multiply for Q8_0 base weights on CPUs with AVX-512 VNNI.
//!
//! Role: the quantized base product `y = x W^T` of every CPU batch step, one stream or many.
//! candle's Q8_0 kernel computes one dot product per (row, output) and walks the whole weight once
//! per batch row; here W is packed once at load into panels of 16 output rows laid out for
//! `vpdpbusd` (4 consecutive input bytes per 32-bit lane), the step's rows are quantized to 8 bits
//! per 32-block exactly as candle quantizes them (Q8_0: d = amax/127, q = round(x/d), d rounded
//! to f16), and a tile of up to [`MR`] rows is multiplied against each panel while the panel's
//! block sits in registers, so the weights are read once per tile instead of once per row.
//!
//! Invariants: the arithmetic is candle's `vec_dot_q8_0_q8_0` (an exact int32 dot per 32-block,
//! scaled by d_w * d_x), so results equal candle's up to float summation order. Weights are
//! stored as `q + 128` (u8, the unsigned operand of vpdpbusd) and the resulting `128 * sum(q_x)`
//! bias is removed per block. Packing happens only when the CPU probe reports the int8 tier
//! ([`super::CpuFeatures::int8`]); otherwise callers keep candle's kernels. Panels past `n` are
//! zero-padded and never written out.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

use super::host::with_host_f32;
use super::int8_available as available;
use super::shared_out::SendPtr;

/// Output rows per panel (one 512-bit register of f32 / i32 lanes).
const NR: usize = 16;
/// Inputs per quantization block (Q8_0).
const QK: usize = 32;
/// Batch rows multiplied per panel visit.
pub const MR: usize = 8;
/// Bytes of one (panel, block): 16 x 32 weight bytes then 16 f16 scales.
const PB: usize = NR * QK + NR * 2;

/// A Q8_0 weight `[n, k]` packed for the int8 kernel.
pub struct PackedQ8 {
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl PackedQ8 {
    /// Packs a CPU Q8_0 tensor `[n, k]`; `None` when the kernel is unavailable or the tensor is
    /// not a 2-D Q8_0 CPU tensor with `k` a multiple of 32.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if !available() || q.dtype() != GgmlDType::Q8_0 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = match q.shape().dims() {
            [n, k] if k % QK == 0 => (*n, *k),
            _ => return Ok(None),
        };
        let raw = q.data()?;
        Ok(Some(Self::from_q8_0_bytes(&raw, n, k)))
    }

    /// Packs raw Q8_0 blocks (`{ d: f16, qs: [i8; 32] }`, 34 bytes, row-major).
    fn from_q8_0_bytes(raw: &[u8], n: usize, k: usize) -> Self {
        let nb = k / QK;
        assert_eq!(raw.len(), n * nb * 34, "Q8_0 data of a [{n}, {k}] tensor");
        let panels = n.div_ceil(NR);
        let mut data = vec![0u8; panels * nb * PB];
        data.par_chunks_mut(nb * PB).enumerate().for_each(|(p, panel)| {
            for b in 0..nb {
                let dst = &mut panel[b * PB..(b + 1) * PB];
                for j in 0..NR {
                    let row = p * NR + j;
                    let (d, qs): ([u8; 2], &[u8]) = if row < n {
                        let blk = &raw[(row * nb + b) * 34..(row * nb + b + 1) * 34];
                        ([blk[0], blk[1]], &blk[2..])
                    } else {
                        ([0, 0], &[0u8; QK][..])
                    };
                    for g in 0..QK / 4 {
                        for t in 0..4 {
                            dst[g * 64 + j * 4 + t] = (qs[g * 4 + t] as i8 as i16 + 128) as u8;
                        }
                    }
                    dst[NR * QK + 2 * j..NR * QK + 2 * j + 2].copy_from_slice(&d);
                }
            }
        });
        Self { n, k, data }
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Resident bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// The weight `[n, k]` as f32 (exactly the dequantized Q8_0 values).
    pub fn dequantize(&self) -> Result<Tensor> {
        let nb = self.k / QK;
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k).enumerate().for_each(|(row, out)| {
            let (p, j) = (row / NR, row % NR);
            for b in 0..nb {
                let src = &self.data[(p * nb + b) * PB..(p * nb + b + 1) * PB];
                let d = f16::from_le_bytes([src[NR * QK + 2 * j], src[NR * QK + 2 * j + 1]]).to_f32();
                for i in 0..QK {
                    let (g, t) = (i / 4, i % 4);
                    out[b * QK + i] = (src[g * 64 + j * 4 + t] as i16 - 128) as f32 * d;
                }
            }
        });
        Tensor::from_vec(w, (self.n, self.k), &Device::Cpu)
    }

    /// `x W^T` for `x` `[m, k]` (f32, CPU).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (m, _) = x.dims2()?;
        let y = with_host_f32(x, |xs| Self::matmul_host_many(&[self], xs, m))?.pop().expect("one output");
        Tensor::from_vec(y, (m, self.n), &Device::Cpu)
    }

    /// `x W_i^T` for every weight (all with `k` inputs) on host slices (`x` `[m, k]`), one host
    /// vector per weight: `x` is quantized once and all panels of all weights run in one parallel
    /// region (q/k/v or gate/up of a block: one dispatch instead of three or two, which matters
    /// for a single stream).
    pub fn matmul_host_many(ws: &[&PackedQ8], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        if let Some(w) = ws.iter().find(|w| w.k * m != x.len()) {
            candle_core::bail!("int8 matmul: {} inputs for {m} rows of {} columns", x.len(), w.k);
        }
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
        let mut outs: Vec<(&PackedQ8, &mut [f32])> = ws.iter().copied().zip(ys.iter_mut().map(|y| y.as_mut_slice())).collect();
        Self::matmul_into_many(&mut outs, x, m);
        Ok(ys)
    }

    fn matmul_into_many(outs: &mut [(&PackedQ8, &mut [f32])], x: &[f32], m: usize) {
        let Some(k) = outs.first().map(|o| o.0.k) else { return };
        assert_eq!(x.len(), m * k);
        for (w, y) in outs.iter() {
            assert_eq!(w.k, k);
            assert_eq!(y.len(), m * w.n);
        }
        if m == 0 {
            return;
        }
        let act = QuantRows::new(x, m, k);
        let nb = k / QK;
        // Every (weight, panel) of the call, in order.
        let panels: Vec<(usize, usize)> =
            outs.iter().enumerate().flat_map(|(wi, (w, _))| (0..w.n.div_ceil(NR)).map(move |p| (wi, p))).collect();
        let targets: Vec<(&PackedQ8, SendPtr)> = outs.iter_mut().map(|(w, y)| (*w, SendPtr(y.as_mut_ptr()))).collect();
        // Enough tasks for every thread, each at least a few panels (amortise the dispatch).
        let threads = rayon::current_num_threads().max(1);
        let per_task = panels.len().div_ceil(threads * 4).max(4.min(panels.len()));
        panels.par_chunks(per_task.max(1)).for_each(|chunk| {
            for &(wi, p) in chunk {
                let (w, out) = (targets[wi].0, &targets[wi].1);
                let data = &w.data[p * nb * PB..(p + 1) * nb * PB];
                let cols = (w.n - p * NR).min(NR);
                let mut r0 = 0;
                while r0 < m {
                    let rows = (m - r0).min(MR);
                    // SAFETY: `available()` held when this weight was packed; every task writes
                    // only columns p*16..p*16+cols of its rows of its weight's output, and tasks
                    // own disjoint (weight, panel) pairs.
                    unsafe { kernel::tile(data, nb, &act, r0, rows, out.0.add(r0 * w.n + p * NR), w.n, cols) };
                    r0 += rows;
                }
            }
        });
    }
}

/// The step's rows quantized per 32-block as candle's Q8_0 does.
struct QuantRows {
    k: usize,
    /// `[m, k]` int8 values.
    q: Vec<i8>,
    /// `[m, k/32]` block scales (f16-rounded, as f32).
    d: Vec<f32>,
    /// `[m, k/32]` `128 * sum(q)` of each block.
    bias: Vec<i32>,
}

impl QuantRows {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let nb = k / QK;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * nb];
        let mut bias = vec![0i32; m * nb];
        // SAFETY: QuantRows are only built by PackedQ8, which exists only when available().
        #[cfg(target_arch = "x86_64")]
        unsafe {
            kernel::quantize(x, &mut q, &mut d, &mut bias)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, &mut q, &mut d, &mut bias);
        Self { k, q, d, bias }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{QuantRows, MR, NR, QK};
    use half::f16;
    use std::arch::x86_64::*;

    /// Quantizes rows to Q8_0 blocks as candle does (d = amax/127 rounded to f16, q =
    /// round(x/d)), except that exact .5 ties round to even instead of away from zero.
    ///
    /// # Safety
    /// The CPU must support avx512f/bw.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], bias: &mut [i32]) {
        for (((xb, qb), db), sb) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(d.iter_mut()).zip(bias.iter_mut()) {
            let lo = _mm512_loadu_ps(xb.as_ptr());
            let hi = _mm512_loadu_ps(xb.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let dd = amax / 127.0;
            let id = _mm512_set1_ps(if dd != 0.0 { 1.0 / dd } else { 0.0 });
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let ql = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(lo, id));
            let qh = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(hi, id));
            _mm_storeu_si128(qb.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(ql));
            _mm_storeu_si128(qb.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qh));
            *db = f16::from_f32(dd).to_f32();
            *sb = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
        }
    }

    /// Multiplies rows `r0..r0+rows` of `act` by one panel (`nb` blocks of [`super::PB`] bytes)
    /// and stores `cols` outputs per row at `out` (row stride `ldo`).
    ///
    /// # Safety
    /// The CPU must support avx512f/bw/vnni and f16c; `out` must be valid for `rows` rows of
    /// `cols` floats at stride `ldo`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(w: &[u8], nb: usize, act: &QuantRows, r0: usize, rows: usize, out: *mut f32, ldo: usize, cols: usize) {
        match rows {
            1 => tile_n::<1>(w, nb, act, r0, out, ldo, cols),
            2 => tile_n::<2>(w, nb, act, r0, out, ldo, cols),
            3 => tile_n::<3>(w, nb, act, r0, out, ldo, cols),
            4 => tile_n::<4>(w, nb, act, r0, out, ldo, cols),
            5 => tile_n::<5>(w, nb, act, r0, out, ldo, cols),
            6 => tile_n::<6>(w, nb, act, r0, out, ldo, cols),
            7 => tile_n::<7>(w, nb, act, r0, out, ldo, cols),
            _ => tile_n::<MR>(w, nb, act, r0, out, ldo, cols),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tile_n<const R: usize>(w: &[u8], nb: usize, act: &QuantRows, r0: usize, out: *mut f32, ldo: usize, cols: usize) {
        debug_assert!(w.len() >= nb * super::PB);
        let k = act.k;
        let anb = k / QK;
        let xq = act.q.as_ptr().add(r0 * k);
        let xd = act.d.as_ptr().add(r0 * anb);
        let xb = act.bias.as_ptr().add(r0 * anb);
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * super::PB);
            let w0 = _mm512_loadu_si512(blk as *const _);
            let w1 = _mm512_loadu_si512(blk.add(64) as *const _);
            let w2 = _mm512_loadu_si512(blk.add(128) as *const _);
            let w3 = _mm512_loadu_si512(blk.add(192) as *const _);
            let w4 = _mm512_loadu_si512(blk.add(256) as *const _);
            let w5 = _mm512_loadu_si512(blk.add(320) as *const _);
            let w6 = _mm512_loadu_si512(blk.add(384) as *const _);
            let w7 = _mm512_loadu_si512(blk.add(448) as *const _);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(NR * QK) as *const __m256i));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = xq.add(r * k + b * QK) as *const i32;
                let bc = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(x.add(g)));
                // Two independent chains halve the dependent-latency path of one row.
                let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, bc(0));
                let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, bc(1));
                s0 = _mm512_dpbusd_epi32(s0, w2, bc(2));
                s1 = _mm512_dpbusd_epi32(s1, w3, bc(3));
                s0 = _mm512_dpbusd_epi32(s0, w4, bc(4));
                s1 = _mm512_dpbusd_epi32(s1, w5, bc(5));
                s0 = _mm512_dpbusd_epi32(s0, w6, bc(6));
                s1 = _mm512_dpbusd_epi32(s1, w7, bc(7));
                let s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(*xb.add(r * anb + b)));
                let sc = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(r * anb + b)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *a);
            }
        }
        let mask: __mmask16 = if cols >= NR { 0xffff } else { ((1u32 << cols) - 1) as __mmask16 };
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
        unreachable!("PackedQ8 is only built when available() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand_t(rng: &mut StdRng, r: usize, c: usize) -> Tensor {
        let v: Vec<f32> = (0..r * c).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
    }

    /// Against candle's own Q8_0 matmul on the same quantized weight: the same integer dot
    /// products, so only float summation order may differ.
    #[test]
    fn equals_candle_q8_0_matmul() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX-512 VNNI; the int8 kernel is not used here");
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        for &(n, k) in &[(16, 32), (40, 64), (192, 576), (33, 96)] {
            let w = rand_t(&mut rng, n, k);
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let packed = PackedQ8::from_qtensor(&q).unwrap().expect("packed");
            let deq = packed.dequantize().unwrap();
            let ref_deq = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(deq.to_vec2::<f32>().unwrap(), ref_deq.to_vec2::<f32>().unwrap(), "dequantize {n}x{k}");
            let qm = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 2, 7, 8, 9, 17, 33] {
                let x = rand_t(&mut rng, m, k);
                let got = packed.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap();
                let want = qm.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for (gr, wr) in got.iter().zip(&want) {
                    for (g, w) in gr.iter().zip(wr) {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{n}x{k} m={m}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Zero rows (all-zero activations, scale 0) give exact zeros, not NaN.
    #[test]
    fn zero_input_rows_give_zeros() {
        if !available() {
            eprintln!("SKIPPED: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        let q = QTensor::quantize(&rand_t(&mut rng, 32, 64), GgmlDType::Q8_0).unwrap();
        let packed = PackedQ8::from_qtensor(&q).unwrap().unwrap();
        let y = packed.matmul_t(&Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0));
    }
}
