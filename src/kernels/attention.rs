//! The attention inner loop of one (sequence, query head): scores against the sequence's cached
//! keys, a softmax in f32 with the max subtracted, and the weighted sum of its cached values.
//!
//! Invariants: the math is Hugging Face's; rows see only positions up to their own (causal) and,
//! with a sliding window `W`, none before `own - W + 1`; positions live in a ring of slots
//! (`p % ring`), whose caller guarantees it still holds every visible position; a soft-cap `c` maps each scaled score to
//! `c * tanh(score / c)` before the softmax; every read is a bounds-checked slice except inside [`dot_avx2`], which reads
//! `min(a.len(), b.len())` values of each input.

/// The attention of one head of one sequence over its rows.
pub struct HeadAttention<'a> {
    /// Queries of the step, `[rows, q_stride]`; this head's are at `q_off..q_off + hd`.
    pub q: &'a [f32],
    /// Values per query row.
    pub q_stride: usize,
    /// Offset of this head within a query row.
    pub q_off: usize,
    /// The sequence's cached keys of this head's kv head, `ring` slots of `hd` values; position
    /// `p` is in slot `p % ring`.
    pub keys: &'a [f32],
    /// The cached values, laid out as `keys`.
    pub values: &'a [f32],
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
}

impl HeadAttention<'_> {
    /// The head's outputs, `[len, hd]`.
    pub fn run(&self) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if super::cpu().avx2_fma {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { self.run_avx2() };
            }
        }
        self.run_generic()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self) -> Vec<f32> {
        // SAFETY: this function only runs when avx2 and fma are present.
        self.run_with(|a, b| unsafe { dot_avx2(a, b) })
    }

    fn run_generic(&self) -> Vec<f32> {
        self.run_with(dot)
    }

    #[inline(always)]
    fn run_with(&self, dot: impl Fn(&[f32], &[f32]) -> f32) -> Vec<f32> {
        let hd = self.hd;
        let mut o = vec![0f32; self.len * hd];
        let mut scores = vec![0f32; self.pos + self.len];
        for i in 0..self.len {
            let r = self.start + i;
            let qv = &self.q[r * self.q_stride + self.q_off..r * self.q_stride + self.q_off + hd];
            let visible = self.pos + i + 1;
            let first = self.window.map_or(0, |w| visible.saturating_sub(w));
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
            let orow = &mut o[i * hd..(i + 1) * hd];
            let mut slot = first % self.ring;
            for sc in scores[first..visible].iter() {
                let p = sc * inv;
                for (ov, vv) in orow.iter_mut().zip(&self.values[slot * hd..(slot + 1) * hd]) {
                    *ov += p * vv;
                }
                slot += 1;
                if slot == self.ring {
                    slot = 0;
                }
            }
        }
        o
    }
}

/// Dot product on 2 x 8 FMA lanes (the compiler does not vectorise [`dot`] well).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// Dot product with 8 independent accumulators (vectorises without reassociation).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
