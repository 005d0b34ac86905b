//! Int8 matrix multiply for Q8_0 (and Q4_1) base weights on CPUs with AVX-512 VNNI, or AVX2.
//!
//! Role: the quantized base product `y = x W^T` of every CPU batch step, one stream or many.
//! candle's Q8_0 kernel computes one dot product per (row, output) and walks the whole weight once
//! per batch row; here W is packed once at load into panels of output rows laid out for a 4-byte
//! dot product (4 consecutive input bytes per 32-bit lane), the step's rows are quantized to 8
//! bits per 32-block exactly as candle quantizes them (Q8_0: d = amax/127, q = round(x/d), d
//! rounded to f16), and a tile of rows is multiplied against each panel while the panel's block
//! sits in registers, so the weights are read once per tile instead of once per row.
//!
//! Two variants, chosen once per process by the CPU probe:
//! - **VNNI** ([`super::CpuFeatures::int8`]): panels of 16 rows, `vpdpbusd`, tiles of 8 rows.
//!   Weights are stored as `q + 128` (u8, the unsigned operand of vpdpbusd) and the resulting
//!   `128 * sum(q_x)` bias is removed per block.
//! - **AVX2** ([`super::CpuFeatures::int8_avx2`]): panels of 8 rows of `q` (i8), tiles of 8 rows,
//!   `vpmaddubsw(|w|, sign(x, w))` then `vpmaddwd` by ones (pair sums fit i16: |w| <= 128, |x| <=
//!   127). It replaces candle's AVX2 `vec_dot_q8_0_q8_0`, which spills its accumulator and calls
//!   out per f16 scale: its speed moved by half with the caller's stack depth (AMD EPYC: 30 vs 46
//!   tok/s single-stream decode for two builds with identical kernel machine code).
//! - **Q4_1** ([`q4`]): Q4_1 weights kept at 4 bits (20 bytes per block, not 34 as Q8_0), on
//!   AVX2 (8-row panels, `vpmaddubsw`) or VNNI (16-row panels, `vpdpbusd`); whether the model's
//!   Q4_1 tensors stay 4-bit is chosen per CPU by [`super::CpuFeatures::q4_1`].
//!
//! Invariants: the arithmetic is candle's `vec_dot_q8_0_q8_0` (an exact int32 dot per 32-block,
//! scaled by d_w * d_x), so results equal candle's up to float summation order. Packing happens
//! only when the CPU probe reports a variant's tier (`MODSERVE_INT8_GEMM=0` turns both off);
//! otherwise callers keep candle's kernels. Panels past `n` are zero-padded and never written out.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::host::with_host_f32;
use super::shared_out::SendPtr;

/// Inputs per quantization block (Q8_0).
const QK: usize = 32;

/// Which kernel a packed weight is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// AVX-512 VNNI: 16-row panels of `q + 128`.
    Vnni,
    /// AVX2: 8-row panels of `q`.
    Avx2,
    /// AVX2 over Q4_1 weights: 8-row panels of 4-bit `q` with per-block `d` and `m` ([`q4`]).
    Q4Avx2,
    /// AVX-512 VNNI over Q4_1 weights: as `Q4Avx2` with 16-row panels ([`q4`]).
    Q4Vnni,
}

impl Variant {
    /// The best Q8_0 variant this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        [Self::Vnni, Self::Avx2].into_iter().find(|v| v.supported())
    }

    /// The best Q4_1 variant this CPU runs, if any (whether the model uses it is
    /// [`super::CpuFeatures::q4_1`]'s call).
    pub fn detect_q4() -> Option<Self> {
        [Self::Q4Vnni, Self::Q4Avx2].into_iter().find(|v| v.supported())
    }

    /// True for the variants over Q4_1 blocks (their activations carry block sums).
    const fn is_q4(self) -> bool {
        matches!(self, Self::Q4Avx2 | Self::Q4Vnni)
    }

    /// True when this CPU runs the variant.
    pub fn supported(self) -> bool {
        let c = super::cpu();
        match self {
            Self::Vnni | Self::Q4Vnni => c.int8,
            Self::Avx2 | Self::Q4Avx2 => c.int8_avx2,
        }
    }

    /// Output rows per panel (one register of f32 / i32 lanes).
    const fn nr(self) -> usize {
        match self {
            Self::Vnni | Self::Q4Vnni => 16,
            Self::Avx2 | Self::Q4Avx2 => 8,
        }
    }

    /// Rows per tile of the activations' layout ([`QuantRows`]); the VNNI tile call's rows too.
    const fn mr(self) -> usize {
        match self {
            Self::Vnni => 8,
            Self::Avx2 | Self::Q4Avx2 | Self::Q4Vnni => 4,
        }
    }

    /// Batch rows of one tile call (one visit of a panel): the VNNI tile's `mr`; the AVX2 tiles
    /// take two of the activations' 4-row layout tiles at once, so each panel block's weights are
    /// loaded (Q8_0: and their absolute values taken; Q4_1: unpacked) once per 8 rows instead of
    /// 4 (`examples/int8_gemm 32 cached q4_1`, one Zen 3 core, six interleaved pairs: the layers'
    /// four groups 44.2-45.8 -> 40.3-42.9 ms per step; the Q8_0 head 17.5-18.6 -> 16.2-17.0).
    pub(super) const fn tile_rows(self) -> usize {
        match self {
            Self::Vnni => self.mr(),
            Self::Avx2 | Self::Q4Avx2 | Self::Q4Vnni => 2 * self.mr(),
        }
    }

    /// Bytes of one (panel, block): `nr` x 32 weight bytes then `nr` f16 scales (Q4_1: `nr` x
    /// 16 bytes, then `nr` f16 `d` and `nr` f16 `m`).
    const fn pb(self) -> usize {
        match self {
            Self::Q4Avx2 | Self::Q4Vnni => self.nr() * QK / 2 + self.nr() * 4,
            _ => self.nr() * QK + self.nr() * 2,
        }
    }

    /// The GGUF block type the variant's panels are packed from.
    fn source(self) -> GgmlDType {
        match self {
            Self::Q4Avx2 | Self::Q4Vnni => GgmlDType::Q4_1,
            _ => GgmlDType::Q8_0,
        }
    }

    /// The stored byte of Q8_0 weight value `q`, and back.
    fn store(self, q: i8) -> u8 {
        if self == Self::Vnni {
            (q as i16 + 128) as u8
        } else {
            q as u8
        }
    }
    fn load(self, b: u8) -> i16 {
        if self == Self::Vnni {
            b as i16 - 128
        } else {
            b as i8 as i16
        }
    }
}

/// A Q8_0 or Q4_1 weight `[n, k]` packed for the int8 kernel.
pub struct PackedWeight {
    n: usize,
    k: usize,
    variant: Variant,
    data: Vec<u8>,
}

impl PackedWeight {
    /// Packs a CPU Q8_0 tensor `[n, k]` for this CPU's best variant, or a Q4_1 one for its best
    /// Q4_1 variant ([`Variant::detect_q4`]) where [`super::CpuFeatures::q4_1`] holds; `None` when no variant runs
    /// here or the tensor is not a 2-D CPU tensor of those types with `k` a multiple of 32.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        match Self::variant_for(q) {
            Some(v) => Self::from_qtensor_as(q, v),
            None => Ok(None),
        }
    }

    /// True when [`PackedWeight::from_qtensor`] packs `q` (the loader keeps such tensors as stored).
    pub fn packs(q: &QTensor) -> bool {
        Self::variant_for(q).is_some()
    }

    /// The variant [`PackedWeight::from_qtensor`] packs `q` for, if any.
    fn variant_for(q: &QTensor) -> Option<Variant> {
        let v = if q.dtype() == GgmlDType::Q4_1 { super::cpu().q4_1.then(Variant::detect_q4).flatten() } else { Variant::detect() };
        v.filter(|&v| Self::dims_for(q, v).is_some())
    }

    /// `(n, k)` when `q` is a 2-D CPU tensor of the variant's block type with `k` a multiple of 32
    /// and this CPU runs the variant.
    fn dims_for(q: &QTensor, variant: Variant) -> Option<(usize, usize)> {
        if !variant.supported() || q.dtype() != variant.source() || !q.device().is_cpu() {
            return None;
        }
        match q.shape().dims() {
            [n, k] if k % QK == 0 => Some((*n, *k)),
            _ => None,
        }
    }

    /// [`PackedWeight::from_qtensor`] for one variant; `None` also when this CPU does not run it.
    pub fn from_qtensor_as(q: &QTensor, variant: Variant) -> Result<Option<Self>> {
        let Some((n, k)) = Self::dims_for(q, variant) else { return Ok(None) };
        let raw = q.data()?;
        if variant.is_q4() {
            return Ok(Some(Self { n, k, variant, data: q4::pack(&raw, n, k, variant) }));
        }
        Ok(Some(Self::from_q8_0_bytes(&raw, n, k, variant)))
    }

    /// Packs raw Q8_0 blocks (`{ d: f16, qs: [i8; 32] }`, 34 bytes, row-major).
    fn from_q8_0_bytes(raw: &[u8], n: usize, k: usize, variant: Variant) -> Self {
        let nb = k / QK;
        let (nr, pb) = (variant.nr(), variant.pb());
        assert_eq!(raw.len(), n * nb * 34, "Q8_0 data of a [{n}, {k}] tensor");
        let panels = n.div_ceil(nr);
        let mut data = vec![0u8; panels * nb * pb];
        data.par_chunks_mut(nb * pb).enumerate().for_each(|(p, panel)| {
            for b in 0..nb {
                let dst = &mut panel[b * pb..(b + 1) * pb];
                for j in 0..nr {
                    let row = p * nr + j;
                    let (d, qs): ([u8; 2], &[u8]) = if row < n {
                        let blk = &raw[(row * nb + b) * 34..(row * nb + b + 1) * 34];
                        ([blk[0], blk[1]], &blk[2..])
                    } else {
                        ([0, 0], &[0u8; QK][..])
                    };
                    for g in 0..QK / 4 {
                        for t in 0..4 {
                            dst[g * nr * 4 + j * 4 + t] = variant.store(qs[g * 4 + t] as i8);
                        }
                    }
                    dst[nr * QK + 2 * j..nr * QK + 2 * j + 2].copy_from_slice(&d);
                }
            }
        });
        Self { n, k, variant, data }
    }

    /// The kernel variant the weight is packed for.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Resident bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// The weight `[n, k]` as f32 (exactly the dequantized Q8_0 or Q4_1 values).
    pub fn dequantize(&self) -> Result<Tensor> {
        if self.variant.is_q4() {
            return Tensor::from_vec(q4::dequantize(&self.data, self.n, self.k, self.variant), (self.n, self.k), &Device::Cpu);
        }
        let nb = self.k / QK;
        let (v, nr, pb) = (self.variant, self.variant.nr(), self.variant.pb());
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k).enumerate().for_each(|(row, out)| {
            let (p, j) = (row / nr, row % nr);
            for b in 0..nb {
                let src = &self.data[(p * nb + b) * pb..(p * nb + b + 1) * pb];
                let d = f16::from_le_bytes([src[nr * QK + 2 * j], src[nr * QK + 2 * j + 1]]).to_f32();
                for i in 0..QK {
                    let (g, t) = (i / 4, i % 4);
                    out[b * QK + i] = v.load(src[g * nr * 4 + j * 4 + t]) as f32 * d;
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
    pub fn matmul_host_many(ws: &[&PackedWeight], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        if let Some(w) = ws.iter().find(|w| w.k * m != x.len()) {
            candle_core::bail!("int8 matmul: {} inputs for {m} rows of {} columns", x.len(), w.k);
        }
        // Not zeroed first: the kernels store every value (a memset was ~2% of a base32 step).
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.n)).collect();
        let mut outs: Vec<(&PackedWeight, &mut [MaybeUninit<f32>])> =
            ws.iter().copied().zip(ys.iter_mut().map(|y| &mut y.spare_capacity_mut()[..])).collect();
        Self::matmul_into_many(&mut outs, x, m);
        for (y, w) in ys.iter_mut().zip(ws) {
            // SAFETY: `matmul_into_many` stored all m * n values of every output (every panel of
            // every weight, all columns below n, for every row tile of all m rows).
            unsafe { y.set_len(m * w.n) };
        }
        Ok(ys)
    }

    /// Writes every one of the `m * n` values of each output (uninitialised memory is fine).
    fn matmul_into_many(outs: &mut [(&PackedWeight, &mut [MaybeUninit<f32>])], x: &[f32], m: usize) {
        let Some((k, variant)) = outs.first().map(|o| (o.0.k, o.0.variant)) else { return };
        assert_eq!(x.len(), m * k);
        for (w, y) in outs.iter() {
            assert_eq!(w.k, k);
            assert_eq!(w.variant, variant);
            assert_eq!(y.len(), m * w.n);
            assert_eq!(w.data.len(), w.n.div_ceil(variant.nr()) * (k / QK) * variant.pb());
        }
        if m == 0 {
            return;
        }
        let act = QuantRows::new(x, m, k, variant);
        // The Q4_1 tile reads a block sum beside each block scale.
        assert!(!variant.is_q4() || act.sums.len() == act.d.len(), "Q4_1 rows without their block sums");
        let nb = k / QK;
        let (nr, pb) = (variant.nr(), variant.pb());
        // Every (weight, panel) of the call, in order.
        let panels: Vec<(usize, usize)> =
            outs.iter().enumerate().flat_map(|(wi, (w, _))| (0..w.n.div_ceil(nr)).map(move |p| (wi, p))).collect();
        let targets: Vec<(&PackedWeight, SendPtr)> = outs.iter_mut().map(|(w, y)| (*w, SendPtr(y.as_mut_ptr().cast::<f32>()))).collect();
        // The panels of a disjoint slice of `panels`, for all rows.
        let run = |chunk: &[(usize, usize)]| {
            for &(wi, p) in chunk {
                let (w, out) = (targets[wi].0, &targets[wi].1);
                let data = &w.data[p * nb * pb..(p + 1) * nb * pb];
                let cols = (w.n - p * nr).min(nr);
                // The first row tile's slice runs on into the next panel: the AVX2 tile prefetches it.
                let ahead = &w.data[p * nb * pb..((p + 2) * nb * pb).min(w.data.len())];
                let mut r0 = 0;
                while r0 < m {
                    let data = if r0 == 0 && super::cpu().prefetch { ahead } else { data };
                    let rows = (m - r0).min(variant.tile_rows());
                    // SAFETY: the variant's tier held when this weight was packed (and again in
                    // QuantRows::new); the panel slice holds nb blocks of the variant's size and
                    // `act` holds rows r0..r0+rows of k inputs; every call writes only columns
                    // p*nr..p*nr+cols of its rows of its weight's output, and the callers below
                    // hand out disjoint (weight, panel) pairs, each once.
                    unsafe {
                        let o = out.0.add(r0 * w.n + p * nr);
                        match variant {
                            Variant::Vnni => kernel::tile(&data[..nb * pb], nb, &act, r0, rows, o, w.n, cols),
                            Variant::Avx2 => kernel::tile_avx2(data, nb, &act, r0, rows, o, w.n, cols),
                            Variant::Q4Avx2 => q4::tile(data, nb, &act, r0, rows, o, w.n, cols),
                            Variant::Q4Vnni => q4::tile_vnni(data, nb, &act, r0, rows, o, w.n, cols),
                        }
                    }
                    r0 += rows;
                }
            }
        };
        // From 8 rows, panels are claimed in shrinking ranges: a thread that comes late (from
        // the deltas beside this GEMM) still gets a share, and both threads end together. With
        // fewer rows a call lasts a few microseconds, about a sleeping thread's wake-up, and
        // rayon's halving gives the thread that wakes late half of what is left (guided claims
        // gave it a quarter: single stream 284-294 against 303-308 tok/s).
        super::claim::share_slice(&panels, m >= 8, run);
    }
}

/// The step's rows quantized per 32-block as candle's Q8_0 does.
///
/// VNNI (Q8_0): row-major. AVX2 and the Q4_1 variants (VNNI's too): in tiles of [`Variant::mr`] rows (4), interleaved so
/// that one tile's 4-input groups sit together: tile t, block b, group g holds rows 4t..4t+4's 4
/// bytes each (16 bytes; rows past m zero), and `d` per (t, b) the 4 rows' scales. The AVX2 tile
/// then reads every row through one pointer at constant offsets: with row-major rows, a row
/// stride known only at run time and four row pointers cost a quarter of the kernel's speed
/// (`examples/int8_gemm`, SmolLM2's shapes, 32 rows, one Zen 3 core: 32.1 G multiply-adds/s
/// row-major, 42.6 tiled).
struct QuantRows {
    k: usize,
    /// `[m, k]` int8 values (AVX2: tiled, as above).
    q: Vec<i8>,
    /// `[m, k/32]` block scales (f16-rounded, as f32; AVX2: tiled).
    d: Vec<f32>,
    /// `[m, k/32]` `128 * sum(q)` of each block (VNNI variant only; empty otherwise).
    bias: Vec<i32>,
    /// Tiled as `d`: `d * sum(q)` of each block rounded to f16, as llama.cpp's Q8_1 `s`
    /// (the Q4_1 variants only; empty otherwise).
    sums: Vec<f32>,
}

impl QuantRows {
    /// Where row `r0 + r` of an AVX2 tile call starts, for each of its `R` rows (`r0` a multiple
    /// of 4): its values' offset in `q` (layout tile `(r0 + r) / 4`, slot `r % 4`; add
    /// `b * 128 + g * 16` for block `b`, group `g`) and its scales' offset in `d` and `sums` (add
    /// `b * 4`).
    #[cfg(target_arch = "x86_64")]
    fn avx2_rows<const R: usize>(&self, r0: usize) -> ([usize; R], [usize; R]) {
        const MR4: usize = Variant::Avx2.mr();
        let nb = self.k / QK;
        (std::array::from_fn(|r| (r0 + r - r % MR4) * self.k + (r % MR4) * 4), std::array::from_fn(|r| (r0 + r - r % MR4) * nb + r % MR4))
    }

    fn new(x: &[f32], m: usize, k: usize, variant: Variant) -> Self {
        assert!(variant.supported(), "int8 kernel variant {variant:?} on a CPU without it");
        assert!(k.is_multiple_of(QK) && x.len() == m * k, "int8 matmul: {} inputs for {m} rows of {k}", x.len());
        let nb = k / QK;
        // AVX2: whole tiles of rows (the rows past m stay zero).
        let rows = if variant == Variant::Vnni { m } else { m.next_multiple_of(variant.mr()) };
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * nb];
        let mut bias = if variant == Variant::Vnni { vec![0i32; m * nb] } else { Vec::new() };
        let mut sums = if variant.is_q4() { vec![0f32; rows * nb] } else { Vec::new() };
        // SAFETY: the variant's tier was just checked; the buffers hold m*k inputs and m*k/32
        // blocks (AVX2: whole tiles of them; `sums` empty or as `d`), and the kernels walk them in
        // exact 32-chunks.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match variant {
                Variant::Vnni => kernel::quantize(x, &mut q, &mut d, &mut bias),
                Variant::Avx2 | Variant::Q4Avx2 | Variant::Q4Vnni => kernel::quantize_avx2(x, k, &mut q, &mut d, &mut sums),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, &mut q, &mut d, &mut bias, &mut sums);
        Self { k, q, d, bias, sums }
    }
}

/// `$tile::<R>($args)` for a tile of `$rows` batch rows, 1 to 8 (the row count is a constant
/// there, so the accumulators stay in registers); more than 8 takes 8 (callers assert the count).
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($rows:expr, $tile:ident($($arg:expr),*)) => {
        match $rows {
            1 => $tile::<1>($($arg),*),
            2 => $tile::<2>($($arg),*),
            3 => $tile::<3>($($arg),*),
            4 => $tile::<4>($($arg),*),
            5 => $tile::<5>($($arg),*),
            6 => $tile::<6>($($arg),*),
            7 => $tile::<7>($($arg),*),
            _ => $tile::<8>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{QuantRows, Variant, QK};
    const NR: usize = Variant::Vnni.nr();
    const MR: usize = Variant::Vnni.mr();
    use half::f16;
    use std::arch::x86_64::*;

    pub use super::avx2::{quantize_avx2, tile_avx2};

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

    /// Multiplies rows `r0..r0+rows` of `act` by one panel (`nb` blocks of [`Variant::Vnni.pb()`] bytes)
    /// and stores `cols` outputs per row at `out` (row stride `ldo`).
    ///
    /// # Safety
    /// The CPU must support avx512f/bw/vnni and f16c; `out` must be valid for `rows` rows of
    /// `cols` floats at stride `ldo`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(w: &[u8], nb: usize, act: &QuantRows, r0: usize, rows: usize, out: *mut f32, ldo: usize, cols: usize) {
        const _: () = assert!(MR == 8);
        by_rows!(rows, tile_n(w, nb, act, r0, out, ldo, cols))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tile_n<const R: usize>(w: &[u8], nb: usize, act: &QuantRows, r0: usize, out: *mut f32, ldo: usize, cols: usize) {
        debug_assert!(w.len() >= nb * Variant::Vnni.pb());
        let k = act.k;
        let anb = k / QK;
        let xq = act.q.as_ptr().add(r0 * k);
        let xd = act.d.as_ptr().add(r0 * anb);
        let xb = act.bias.as_ptr().add(r0 * anb);
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * Variant::Vnni.pb());
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
        unreachable!("PackedWeight is only built when its variant's tier holds")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2(_w: &[u8], _nb: usize, _act: &QuantRows, _r0: usize, _rows: usize, _out: *mut f32, _ldo: usize, _cols: usize) {
        unreachable!("PackedWeight is only built when its variant's tier holds")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod q4;

#[cfg(test)]
mod tests;
