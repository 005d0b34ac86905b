//! RMSNorm of a batch's rows on the host, fused with the residual add that precedes it in every
//! decoder layer (`x += a; h = rms_norm(x)`): one pass that writes both, where candle's
//! `x + a` and `rms_norm` each allocate a tensor and read it back. `modserve bench --scenarios
//! base32 --profile` (2 cores): the norms 1.45 -> 0.6 ms and the rest of the step (the residual
//! adds) 0.65 -> 0.26 ms of a 40 ms decode step.
//!
//! Invariants: each row's result is candle's `x / sqrt(mean(x^2) + eps) * w`, except that the sum
//! of squares is accumulated in 8 lanes (then added lane by lane) instead of in one sequential sum
//! and the division is a multiplication by the reciprocal: equal within a few f32 roundings
//! (checked in the tests). The AVX2 copy runs only when [`super::cpu`] reported AVX2 and FMA;
//! both copies are safe code compiled for different features.

const LANES: usize = 8;

#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in chunks.by_ref() {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in chunks.remainder() {
        s += v * v;
    }
    s
}

#[inline(always)]
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let inv = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
    out.extend(x.iter().zip(w).map(|(v, wv)| v * inv * wv));
}

#[inline(always)]
fn add_norm_generic(x: &[f32], a: Option<&[f32]>, w: &[f32], eps: f32) -> (Option<Vec<f32>>, Vec<f32>) {
    let width = w.len();
    let mut normed = Vec::with_capacity(x.len());
    match a {
        None => {
            for row in x.chunks_exact(width) {
                norm_row(row, w, eps, &mut normed);
            }
            (None, normed)
        }
        Some(a) => {
            let mut sum = Vec::with_capacity(x.len());
            for (xr, ar) in x.chunks_exact(width).zip(a.chunks_exact(width)) {
                let at = sum.len();
                sum.extend(xr.iter().zip(ar).map(|(p, q)| p + q));
                norm_row(&sum[at..], w, eps, &mut normed);
            }
            (Some(sum), normed)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_norm_avx2(x: &[f32], a: Option<&[f32]>, w: &[f32], eps: f32) -> (Option<Vec<f32>>, Vec<f32>) {
    add_norm_generic(x, a, w, eps)
}

fn add_norm(x: &[f32], a: Option<&[f32]>, w: &[f32], eps: f32) -> (Option<Vec<f32>>, Vec<f32>) {
    assert!(!w.is_empty() && x.len().is_multiple_of(w.len()), "rows of the weight's width");
    assert!(a.is_none_or(|a| a.len() == x.len()), "a residual of the input's length");
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2_fma {
        // SAFETY: the probe reported AVX2 and FMA; the function is safe code.
        return unsafe { add_norm_avx2(x, a, w, eps) };
    }
    add_norm_generic(x, a, w, eps)
}

/// RMSNorm of every `w.len()`-wide row of `x`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    add_norm(x, None, w, eps).1
}

/// `s = x + a` and the RMSNorm of every `w.len()`-wide row of `s`: `(s, norm(s))`.
pub fn add_rms_norm_rows(x: &[f32], a: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (s, n) = add_norm(x, Some(a), w, eps);
    (s.expect("a sum when a residual was given"), n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Against candle's `rms_norm` (its sequential sum of squares), on widths with and without a
    /// remainder of 8 lanes and rows of very different scales; the sum equals `x + a` exactly.
    #[test]
    fn matches_candle_rms_norm() {
        let mut rng = StdRng::seed_from_u64(5);
        for (rows, width) in [(1, 576), (7, 64), (3, 13), (32, 576), (2, 1)] {
            let x: Vec<f32> =
                (0..rows * width).map(|i| rng.random_range(-3.0f32..3.0) * if i % width == 0 { 100.0 } else { 1.0 }).collect();
            let a: Vec<f32> = (0..rows * width).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w: Vec<f32> = (0..width).map(|_| rng.random_range(0.5f32..2.0)).collect();
            let eps = 1e-5;
            let (s, n) = add_rms_norm_rows(&x, &a, &w, eps);
            let want_s: Vec<f32> = x.iter().zip(&a).map(|(p, q)| p + q).collect();
            assert_eq!(s, want_s);
            let st = Tensor::from_vec(want_s, (rows, width), &Device::Cpu).unwrap();
            let wt = Tensor::from_vec(w.clone(), width, &Device::Cpu).unwrap();
            let want: Vec<f32> = candle_nn::ops::rms_norm(&st, &wt, eps).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(rms_norm_rows(&s, &w, eps), n, "with and without the residual");
            for (i, (g, e)) in n.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-6 * (1.0 + e.abs()), "rows {rows} width {width} at {i}: {g} vs {e}");
            }
        }
    }
}
