//! The attention inner loop of one (sequence, query head): scores against the sequence's cached
//! keys, a softmax in f32 with the max subtracted, and the weighted sum of its cached values.
//!
//! Invariants: the math is Hugging Face's; rows see only positions up to their own (causal) and,
//! with a sliding window `W`, none before `own - W + 1`; positions live in a ring of slots
//! (`p % ring`), whose caller guarantees it still holds every visible position; a soft-cap `c` maps each scaled score to
//! `c * tanh(score / c)` before the softmax; every read is a bounds-checked slice except inside [`dot_avx2`], which reads
//! `min(a.len(), b.len())` values of each input, and the AVX2 path's [`scores_avx2`] and
//! [`weighted_sum_avx2`], which assert the lengths they read (release builds too). The AVX2 path
//! (head sizes that are multiples of 8) computes the same sums in another order and the
//! exponentials with `kernels::softmax`'s polynomial: it agrees with the portable loop to f32
//! rounding (checked in the tests below). Cached keys and values are f32 or f16 ([`KvElem`]):
//! f16 halves the bytes a decode step reads from the cache; every product is still f32 (the AVX2
//! path widens 8 values per load with F16C, which the probe's AVX2 tier includes).

/// The element type of cached keys and values.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// True for f16: the AVX2 path widens its loads.
    const HALF: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    const HALF: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// 8 cached values at `p` (a `*const K`) as f32: a plain load for f32, an F16C widening for f16.
/// A macro, so the intrinsics sit inside the calling `#[target_feature]` function.
#[cfg(target_arch = "x86_64")]
macro_rules! load8 {
    ($k:ty, $p:expr) => {
        if <$k as KvElem>::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
        } else {
            _mm256_loadu_ps($p as *const f32)
        }
    };
}

/// The attention of one head of one sequence over its rows.
pub struct HeadAttention<'a, K: KvElem = f32> {
    /// Queries of the step, `[rows, q_stride]`; this head's are at `q_off..q_off + hd`.
    pub q: &'a [f32],
    /// Values per query row.
    pub q_stride: usize,
    /// Offset of this head within a query row.
    pub q_off: usize,
    /// The sequence's cached keys of this head's kv head, `ring` slots of `hd` values; position
    /// `p` is in slot `p % ring`.
    pub keys: &'a [K],
    /// The cached values, laid out as `keys`.
    pub values: &'a [K],
    /// Slots in `keys` / `values` (the cache capacity, or a sliding-window layer's ring).
    pub ring: usize,
    /// Head dimension.
    pub hd: usize,
    /// First row of the sequence in the step.
    pub start: usize,
    /// Rows of the sequence in the step.
    pub len: usize,
    /// Position of the first row (the cached positions before it are visible to all rows).
    pub pos: usize,
    /// Score scale (`1 / sqrt(hd)`, or the family's).
    pub scale: f32,
    /// Sliding window: the number of positions a row sees, itself included.
    pub window: Option<usize>,
    /// Attention-logit soft-cap.
    pub softcap: Option<f32>,
    /// Whether the kernel asks for the cached keys and values 4 KB ahead of its reads
    /// (the first head to read this cache in a pass; the heads after it find it in cache, and a
    /// prefetch costs about a cycle per line even then).
    pub look_ahead: bool,
}

impl<K: KvElem> HeadAttention<'_, K> {
    /// The head's outputs, `[len, hd]`.
    pub fn run(&self) -> Vec<f32> {
        let mut o = vec![0f32; self.len * self.hd];
        self.run_into(&mut o, self.hd, &mut Vec::new());
        o
    }

    /// Writes row `i`'s output to `out[i * stride..i * stride + hd]` (the rest of `out` is left
    /// alone: a caller hands in its `[rows, heads * hd]` rows from this head's column, so no
    /// per-head buffer or copy is needed); `scores` is scratch, reused between calls.
    pub fn run_into(&self, out: &mut [f32], stride: usize, scores: &mut Vec<f32>) {
        assert!(self.len == 0 || (stride >= self.hd && out.len() >= (self.len - 1) * stride + self.hd), "an output of {} rows", self.len);
        scores.clear();
        scores.resize(self.pos + self.len, 0.0);
        #[cfg(target_arch = "x86_64")]
        {
            if super::cpu().avx2_fma {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { self.run_avx2(out, stride, scores) };
            }
        }
        self.run_with(out, stride, scores, dot)
    }

    /// Asks the CPU to start loading the first 4 KB of the cached keys and of the values the rows
    /// will read (the slots of positions `0..pos + len`, at most the ring; the kernel's look-ahead
    /// asks for the rest as it reads): a hint, with no effect on results, and none with
    /// `MODSERVE_PREFETCH=0` or off x86-64. One (sequence, kv head)'s cache is a few KB, too
    /// short for the hardware prefetchers to ramp up.
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu().prefetch {
            let used = (self.pos + self.len).min(self.ring) * self.hd;
            for region in [&self.keys[..used.min(self.keys.len())], &self.values[..used.min(self.values.len())]] {
                // The first AHEAD bytes: the rest the kernel's own look-ahead asks for.
                // SAFETY: `region` is a live slice of `size_of_val(region)` bytes.
                unsafe { ahead(region.as_ptr() as *const u8, std::mem::size_of_val(region), 0, AHEAD) };
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, out: &mut [f32], stride: usize, scores: &mut [f32]) {
        if !self.hd.is_multiple_of(8) || self.keys.len() < self.ring * self.hd || self.values.len() < self.ring * self.hd {
            // SAFETY: this function only runs when avx2, fma and f16c are present.
            return self.run_with(out, stride, scores, |a, b| unsafe { dot_avx2(a, b) });
        }
        let hd = self.hd;
        for i in 0..self.len {
            let (qv, first, visible) = self.query_row(i);
            // The visible positions as at most two runs of consecutive ring slots.
            let s0 = first % self.ring;
            let n1 = (visible - first).min(self.ring - s0);
            let runs = [(s0, n1, first), (0, visible - first - n1, first + n1)];
            for &(slot, n, at) in &runs {
                // SAFETY: slots `slot..slot + n` lie in the ring (n1 stops at its end, the second
                // run restarts at 0 and is shorter than the ring), whose `ring * hd` keys were
                // checked above; `qv` holds `hd` values, a multiple of 8.
                unsafe { scores_avx2(qv, &self.keys[slot * hd..(slot + n) * hd], &mut scores[at..at + n], hd, self.look_ahead) };
            }
            let sc = &mut scores[first..visible];
            match self.softcap {
                Some(c) => sc.iter_mut().for_each(|v| *v = c * super::tanh::tanh(*v * self.scale / c)),
                None => sc.iter_mut().for_each(|v| *v *= self.scale),
            }
            let max = super::softmax::max_lanes(sc);
            let inv = (1.0 / super::softmax::exp_in_place_generic(sc, max)) as f32;
            let orow = &mut out[i * stride..i * stride + hd];
            orow.fill(0.0);
            let mut p = 0;
            for &(slot, n, _) in &runs {
                // SAFETY: as for the scores; `orow` holds `hd` values.
                unsafe { weighted_sum_avx2(&sc[p..p + n], inv, &self.values[slot * hd..(slot + n) * hd], orow, hd, self.look_ahead) };
                p += n;
            }
        }
    }

    /// Row `i`'s query and the positions it sees, `first..visible` (causal, and the window's).
    #[inline(always)]
    fn query_row(&self, i: usize) -> (&[f32], usize, usize) {
        let r = self.start + i;
        let at = r * self.q_stride + self.q_off;
        let visible = self.pos + i + 1;
        (&self.q[at..at + self.hd], self.window.map_or(0, |w| visible.saturating_sub(w)), visible)
    }

    #[cfg(test)]
    fn run_generic(&self) -> Vec<f32> {
        let mut o = vec![0f32; self.len * self.hd];
        self.run_with(&mut o, self.hd, &mut vec![0f32; self.pos + self.len], dot);
        o
    }

    /// The portable loop; `scores` holds at least `pos + len` values.
    #[inline(always)]
    fn run_with(&self, out: &mut [f32], stride: usize, scores: &mut [f32], dot: impl Fn(&[f32], &[K]) -> f32) {
        let hd = self.hd;
        for i in 0..self.len {
            let (qv, first, visible) = self.query_row(i);
            let mut max = f32::NEG_INFINITY;
            let mut slot = first % self.ring;
            for sc in scores[first..visible].iter_mut() {
                *sc = dot(qv, &self.keys[slot * hd..(slot + 1) * hd]) * self.scale;
                slot += 1;
                if slot == self.ring {
                    slot = 0;
                }
                if let Some(c) = self.softcap {
                    *sc = c * super::tanh::tanh(*sc / c);
                }
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in scores[first..visible].iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            let orow = &mut out[i * stride..i * stride + hd];
            orow.fill(0.0);
            let mut slot = first % self.ring;
            for sc in scores[first..visible].iter() {
                let p = sc * inv;
                for (ov, vv) in orow.iter_mut().zip(&self.values[slot * hd..(slot + 1) * hd]) {
                    *ov += p * vv.to_f32();
                }
                slot += 1;
                if slot == self.ring {
                    slot = 0;
                }
            }
        }
    }
}

/// `out[j] = q . keys[j]` for the `out.len()` consecutive keys of `hd` values (a multiple of 8),
/// four keys at a time so four FMA chains run side by side and one horizontal add serves four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scores_avx2<K: KvElem>(q: &[f32], keys: &[K], out: &mut [f32], hd: usize, look_ahead: bool) {
    use std::arch::x86_64::*;
    assert!(hd.is_multiple_of(8) && q.len() >= hd && keys.len() >= out.len() * hd, "scores of {} keys", out.len());
    let (pq, pk) = (q.as_ptr(), keys.as_ptr());
    let n = out.len();
    let mut j = 0;
    let (kb, row) = (out.len() * hd * std::mem::size_of::<K>(), hd * std::mem::size_of::<K>());
    while j + 4 <= n {
        if look_ahead {
            // `pk[..kb]` is the `out.len()` keys read here (asserted above).
            ahead(pk as *const u8, kb, j * row + AHEAD, (j + 4) * row + AHEAD);
        }
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < hd {
            let qc = _mm256_loadu_ps(pq.add(c));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qc, load8!(K, pk.add((j + k) * hd + c)), *a);
            }
            c += 8;
        }
        // Lanes (a01, a23, b01, b23 | a45, a67, b45, b67), then (a, b, c, d | a', b', c', d').
        let s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        _mm_storeu_ps(out.as_mut_ptr().add(j), s4);
        j += 4;
    }
    while j < n {
        out[j] = dot_avx2(&q[..hd], &keys[j * hd..(j + 1) * hd]);
        j += 1;
    }
}

/// `o += sum_j w[j] * scale * values[j]` over consecutive values of `hd` values (a multiple of
/// 8), 64 output columns at a time held in registers across all the values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn weighted_sum_avx2<K: KvElem>(w: &[f32], scale: f32, values: &[K], o: &mut [f32], hd: usize, look_ahead: bool) {
    assert!(hd.is_multiple_of(8) && o.len() >= hd && values.len() >= w.len() * hd, "weighted sum of {} values", w.len());
    let mut c0 = 0;
    while c0 < hd {
        // Whole 64-column slices with a constant width (the loops over the accumulators unroll:
        // no compare per vector); the rest with its own.
        match (hd - c0).min(64) / 8 {
            8 => weighted_cols::<K, 8>(w, scale, values, o, hd, c0, 8, look_ahead && c0 == 0),
            width => weighted_cols::<K, 0>(w, scale, values, o, hd, c0, width, look_ahead && c0 == 0),
        }
        c0 += 64.min(hd - c0);
    }
}

/// Columns `c0..c0 + 8 * width` of [`weighted_sum_avx2`] (whose checks cover these reads), the
/// accumulators held in registers across all the values. `W`: the width when the caller knows
/// it at compile time, else 0 (then `width` is read).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_cols<K: KvElem, const W: usize>(
    w: &[f32],
    scale: f32,
    values: &[K],
    o: &mut [f32],
    hd: usize,
    c0: usize,
    width: usize,
    look_ahead: bool,
) {
    use std::arch::x86_64::*;
    let width = if W > 0 { W } else { width };
    let pv = values.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 8];
    for (c, a) in acc.iter_mut().enumerate().take(width) {
        *a = _mm256_loadu_ps(o.as_ptr().add(c0 + c * 8));
    }
    let (vb, rb) = (w.len() * hd * std::mem::size_of::<K>(), hd * std::mem::size_of::<K>());
    for (j, &wj) in w.iter().enumerate() {
        if look_ahead {
            // `pv[..vb]` is the `w.len()` values read here (asserted by the caller).
            ahead(pv as *const u8, vb, j * rb + AHEAD, (j + 1) * rb + AHEAD);
        }
        let p = _mm256_set1_ps(wj * scale);
        let row = pv.add(j * hd + c0);
        for (c, a) in acc.iter_mut().enumerate().take(width) {
            *a = _mm256_fmadd_ps(p, load8!(K, row.add(c * 8)), *a);
        }
    }
    for (c, a) in acc.iter().enumerate().take(width) {
        _mm256_storeu_ps(o.as_mut_ptr().add(c0 + c * 8), *a);
    }
}

/// How far ahead of its reads (bytes) the kernel asks for cached keys and values: 2 and 8 KB
/// were slower (`examples/attention_kernel.rs`, docs/BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 4096;

/// Prefetches the lines of `base[from..to]` that lie inside `base[..len]` (consecutive calls with
/// adjoining ranges touch every line once).
///
/// # Safety
/// `base[..len]` must be one live slice: every address formed stays inside it (`at < len`), and a
/// prefetch reads nothing architecturally and cannot fault.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn ahead(base: *const u8, len: usize, from: usize, to: usize) {
    let mut at = from.next_multiple_of(64);
    while at < to.min(len) {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(at) as *const i8);
        at += 64;
    }
}

/// Dot product on 2 x 8 FMA lanes (the compiler does not vectorise [`dot`] well).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx2<K: KvElem>(a: &[f32], b: &[K]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load8!(K, pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), load8!(K, pb.add(i + 8)), acc1);
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load8!(K, pb.add(i)), acc0);
        i += 8;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < n {
        s += a[i] * b[i].to_f32();
        i += 1;
    }
    s
}

/// Dot product with 8 independent accumulators (vectorises without reassociation).
#[inline(always)]
pub fn dot<K: KvElem>(a: &[f32], b: &[K]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.to_f32();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The AVX2 path against the portable loop: rings that wrap, windows, soft-caps, several rows.
    #[test]
    fn avx2_path_matches_the_portable_loop() {
        if !crate::kernels::cpu().avx2_fma {
            eprintln!("no AVX2 + FMA here: only the portable loop runs");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for (hd, ring, pos, len, window, softcap) in [
            (64, 300, 0, 5, None, None),
            (64, 300, 100, 1, None, None),
            (64, 300, 37, 9, None, Some(50.0)),
            (128, 40, 70, 3, Some(33), None),
            (8, 17, 20, 2, Some(10), None),
            (72, 600, 517, 1, None, None),
        ] {
            let q_stride = hd * 3;
            let rows = len + 2;
            let q: Vec<f32> = (0..rows * q_stride).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let keys: Vec<f32> = (0..ring * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let values: Vec<f32> = (0..ring * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let h = HeadAttention {
                q: &q,
                q_stride,
                q_off: hd,
                keys: &keys,
                values: &values,
                ring,
                hd,
                start: 1,
                len,
                pos,
                scale: 3.0 / (hd as f32).sqrt(),
                window,
                softcap,
                look_ahead: true,
            };
            let want = h.run_generic();
            // (`run` takes the AVX2 path here: the probe reported it.)
            let got = h.run();
            let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 2e-5, "hd {hd} ring {ring} pos {pos}: max difference {err}");
            // Into a strided output (this head's column of `[rows, 3 * hd]`, stale values in
            // it): the same bits, and the other columns untouched.
            let stride = 3 * hd;
            let mut wide = vec![7f32; len * stride];
            h.run_into(&mut wide[hd..], stride, &mut vec![1f32; 3]);
            for i in 0..len {
                assert_eq!(&wide[i * stride + hd..i * stride + 2 * hd], &got[i * hd..(i + 1) * hd], "hd {hd} row {i}");
                assert!(wide[i * stride..i * stride + hd].iter().chain(&wide[i * stride + 2 * hd..(i + 1) * stride]).all(|&v| v == 7.0));
            }
            // An f16 cache: both paths on the f16 values give what the f32 paths give on the
            // same values widened (the products stay f32).
            let k16: Vec<half::f16> = keys.iter().map(|&v| half::f16::from_f32(v)).collect();
            let v16: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            let (kw, vw): (Vec<f32>, Vec<f32>) = (k16.iter().map(|v| v.to_f32()).collect(), v16.iter().map(|v| v.to_f32()).collect());
            let wide = HeadAttention { keys: &kw, values: &vw, ..h };
            let half = HeadAttention {
                q: &q,
                q_stride,
                q_off: hd,
                keys: &k16,
                values: &v16,
                ring,
                hd,
                start: 1,
                len,
                pos,
                scale: h.scale,
                window,
                softcap,
                look_ahead: false,
            };
            let want = wide.run_generic();
            for (path, got) in [("portable", half.run_generic()), ("avx2", half.run())] {
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 2e-5, "f16 cache, {path}, hd {hd} ring {ring} pos {pos}: max difference {err}");
            }
            // And the f16 cache stays close to the f32 one it rounds (values in -1..1).
            let err = h.run_generic().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 2e-3, "f16 rounding moved an output by {err}");
        }
    }
}
