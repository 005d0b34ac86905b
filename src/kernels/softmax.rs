//! The vocabulary-wide passes of sampling: the largest finite logit and `sum(exp(x - max))` over
//! the finite logits, the normaliser of every generated token's log-probability. With libm's
//! scalar `expf` (about 4 ns a value) the normaliser of 32 rows of a 49,152-token vocabulary took
//! as long as a tenth of a decode step; the polynomial below vectorises (8 lanes with AVX2 + FMA,
//! 4 with the baseline SSE2).
//!
//! Invariants: [`exp`] is Cephes' `expf` (Cody-Waite reduction by ln 2, degree-5 polynomial),
//! within 2 f32 ulps of libm on `[-87, 0]` (checked in the tests), and inputs there are the only
//! ones the sum forms: `x - max <= 0` for finite `x`; terms below `exp(-87)` (under 1.7e-38,
//! nothing next to the maximum's 1) and non-finite logits count 0. Lanes sum in f32 over at most
//! [`FLUSH`] values each, then into an f64 total, so the sum's error stays near f32 rounding of
//! each term. The AVX2 copy is entered only when [`super::cpu`] reported AVX2 and FMA.

/// Values per lane summed in f32 before the lanes are added into the f64 total.
const FLUSH: usize = 64;
const LANES: usize = 16;

/// `e^d` for `d` in `[-87, 0]` (callers clamp; see the module comment).
#[inline(always)]
pub(super) fn exp(d: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5 * 2^23 trick (vectorises without SSE4.1's round).
    const MAGIC: f32 = 12_582_912.0;
    let t = d * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = d - n * C1 - n * C2;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the exponent bits: n is in [-126, 0] for d in [-87, 0].
    let pow2 = f32::from_bits(((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23) as u32);
    e * pow2
}

/// The largest value (NaN ignored, as `f32::max`), over 16 lanes: one `f32::max` after the
/// other is a chain of dependent compares and blends (perf: a quarter of the attention kernel's
/// time, and greedy sampling's argmax was the same chain). Inlined into callers, so it takes
/// their `#[target_feature]` width.
#[inline(always)]
pub fn max_lanes(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    lanes.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn max_finite_generic(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // NaN and +-inf compare false against `is_finite`; `-inf` never raises a lane.
            *m = if v.is_finite() && v > *m { v } else { *m };
        }
    }
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        if v.is_finite() && v > m {
            m = v;
        }
    }
    m
}

#[inline(always)]
fn term(v: f32, max: f32) -> f32 {
    let d = v - max;
    let keep = (-87.0..=0.0).contains(&d); // false for NaN, +-inf and underflowing terms
    let e = exp(d.clamp(-87.0, 0.0));
    if keep {
        e
    } else {
        0.0
    }
}

#[inline(always)]
fn exp_sum_generic(x: &[f32], max: f32) -> f64 {
    let mut total = 0f64;
    let blocks = x.chunks(LANES * FLUSH);
    for b in blocks {
        let mut lanes = [0f32; LANES];
        let chunks = b.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (s, &v) in lanes.iter_mut().zip(c) {
                *s += term(v, max);
            }
        }
        total += lanes.iter().map(|&s| s as f64).sum::<f64>();
        total += tail.iter().map(|&v| term(v, max) as f64).sum::<f64>();
    }
    total
}

/// `x[i] = exp(x[i] - max)` (0 for non-finite values and terms below `exp(-87)`) and their sum,
/// for callers that inline it into their own `#[target_feature]` code (attention's softmax).
#[inline(always)]
pub(super) fn exp_in_place_generic(x: &mut [f32], max: f32) -> f64 {
    let mut total = 0f64;
    for b in x.chunks_mut(LANES * FLUSH) {
        let mut lanes = [0f32; LANES];
        let mut chunks = b.chunks_exact_mut(LANES);
        for c in chunks.by_ref() {
            for (s, v) in lanes.iter_mut().zip(c.iter_mut()) {
                *v = term(*v, max);
                *s += *v;
            }
        }
        for v in chunks.into_remainder() {
            *v = term(*v, max);
            total += *v as f64;
        }
        total += lanes.iter().map(|&s| s as f64).sum::<f64>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_finite_avx2(x: &[f32]) -> f32 {
    max_finite_generic(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum_avx2(x: &[f32], max: f32) -> f64 {
    exp_sum_generic(x, max)
}

/// The largest finite value of `x`, or `-inf` when it has none.
pub fn max_finite(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2_fma {
        // SAFETY: the probe reported AVX2 and FMA; the function only reads `x` through safe code.
        return unsafe { max_finite_avx2(x) };
    }
    max_finite_generic(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(x: &mut [f32], max: f32) -> f64 {
    exp_in_place_generic(x, max)
}

/// `x[i] = exp(x[i] - max)` (0 for non-finite values and terms below `exp(-87)`; `max` is
/// [`max_finite`] of `x`) and their sum, as [`exp_sum`] forms it: stochastic sampling's weights.
pub fn exp_in_place(x: &mut [f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2_fma {
        // SAFETY: the probe reported AVX2 and FMA; the function is safe code.
        return unsafe { exp_in_place_avx2(x, max) };
    }
    exp_in_place_generic(x, max)
}

/// `sum(exp(x_i - max))` over the finite `x_i` (see the module comment for its accuracy); `max`
/// is [`max_finite`] of `x`.
pub fn exp_sum(x: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2_fma {
        // SAFETY: as in `max_finite`.
        return unsafe { exp_sum_avx2(x, max) };
    }
    exp_sum_generic(x, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `max_lanes` is `f32::max` folded over the slice (NaN ignored), at every length.
    #[test]
    fn max_lanes_is_the_folded_max() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in 0..70 {
            let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-50.0f32..50.0)).collect();
            if n > 3 {
                x[n / 2] = f32::NAN;
                x[1] = f32::NEG_INFINITY;
            }
            assert_eq!(max_lanes(&x).to_bits(), x.iter().copied().fold(f32::NEG_INFINITY, f32::max).to_bits(), "n = {n}");
        }
    }

    #[test]
    fn exp_is_within_two_ulps_of_libm_on_its_range() {
        let mut worst = 0i64;
        let mut d = -87.0f32;
        while d <= 0.0 {
            let (a, b) = (exp(d), d.exp());
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).abs());
            d += 1.3e-4;
        }
        for d in [0.0f32, -0.0, -1e-30, -1e-7, -0.5, -std::f32::consts::LN_2, -86.999] {
            let (a, b) = (exp(d), d.exp());
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).abs());
        }
        assert!(worst <= 2, "worst error {worst} ulps");
    }

    #[test]
    fn both_copies_match_an_f64_reference_and_skip_non_finite_values() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in [0usize, 1, 15, 16, 17, 1023, 1024, 1025, 49_152, 151_936] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-40.0f32..30.0)).collect();
            if n > 20 {
                v[2] = f32::NEG_INFINITY;
                v[7] = f32::NAN;
                v[n - 1] = f32::INFINITY;
                v[11] = -1e30;
            }
            let want_max = v.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_finite(&v).to_bits(), want_max.to_bits(), "n={n}");
            assert_eq!(max_finite_generic(&v).to_bits(), want_max.to_bits(), "n={n}");
            if n == 0 {
                continue;
            }
            let want: f64 = v.iter().filter(|x| x.is_finite()).map(|&x| (x as f64 - want_max as f64).exp()).sum();
            for got in [exp_sum(&v, want_max), exp_sum_generic(&v, want_max)] {
                assert!((got - want).abs() <= 1e-6 * want, "n={n}: {got} vs {want}");
            }
        }
    }
}
