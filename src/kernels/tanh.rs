//! Vectorisable `tanh` for logit soft-capping `cap * tanh(x / cap)` (Gemma 2's attention scores and
//! final logits). candle and `f32::tanh` call the scalar libm `tanhf` per value (about 20 ns), which
//! made a Gemma 2 step spend as long in its final soft-cap over the vocabulary as in the rest of a
//! tiny model. Not used for the tanh-gelu MLP: there `1 + tanh(z)` cancels for negative `z`, and
//! the approximation's few-ulp error, amplified by the cancellation, made two equal computations
//! in a different float order (W+delta as a folder, and the request with the delta) differ by
//! 1.8e-3 on the kit's Gemma 2 logits (measured), against under 7e-4 with libm's `tanhf`.
//!
//! Invariants: [`tanh`] is the rational approximation Eigen uses for float (odd polynomial of
//! degree 13 over an even one of degree 6 on `[-7.9053, 7.9053]`, where it reaches +-1 in f32; `x`
//! itself below 4e-4): within a few f32 ulps of `tanhf` everywhere (checked against it in the tests
//! below), NaN in, NaN out. Safe code only; the loops are written so the compiler vectorises them.

/// `tanh(x)`, rational approximation (see the module comment).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_6e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    let tiny = x.abs() < 4e-4;
    let z = x.clamp(-CLAMP, CLAMP);
    let z2 = z * z;
    let p = z * (A1 + z2 * (A3 + z2 * (A5 + z2 * (A7 + z2 * (A9 + z2 * (A11 + z2 * A13))))));
    let q = B0 + z2 * (B2 + z2 * (B4 + z2 * B6));
    if tiny {
        x
    } else {
        p / q
    }
}

/// `x = cap * tanh(x / cap)` for every value.
pub fn softcap_in_place(xs: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for x in xs.iter_mut() {
        *x = cap * tanh(*x * inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f32;
        let mut x = -12.0f32;
        while x <= 12.0 {
            let (a, b) = (tanh(x), x.tanh());
            worst = worst.max((a - b).abs() / b.abs().max(f32::MIN_POSITIVE));
            x += 0.000_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        for x in [0.0f32, 1e-30, -3e-4, 5e-4, 20.0, -1e30] {
            assert!((tanh(x) - x.tanh()).abs() <= 5e-7 * x.tanh().abs().max(1e-30), "{x}: {} vs {}", tanh(x), x.tanh());
        }
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn softcap_matches_its_formula() {
        let xs: Vec<f32> = (0..2000).map(|i| (i as f32 - 1000.0) * 0.013).collect();
        let mut s = xs.clone();
        softcap_in_place(&mut s, 5.0);
        for (x, s) in xs.iter().zip(&s) {
            assert!((s - 5.0 * (x / 5.0).tanh()).abs() < 1e-5, "softcap {x}");
        }
    }
}
