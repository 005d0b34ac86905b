//! The merge methods' per-element formulas: EWR, Fisher merging, task arithmetic / linear
//! averaging, TIES and DARE, over one tensor's components at a time.
//!
//! Invariant: arithmetic runs in f64 in component order (deterministic); DARE's drop mask comes
//! from a seed per (recipe seed, component, tensor).
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::compress::top_k_mask;
use crate::adapters::target::Target;

/// One component's view of one tensor, ready for per-element arithmetic.
pub(crate) struct Term<'a> {
    /// `s_i * tau_i` (negation applied); None when the component leaves the tensor unchanged.
    pub(crate) tau: Option<Vec<f32>>,
    pub(crate) fisher: Option<&'a [f32]>,
    pub(crate) lambda: f64,
}

/// EWR: `theta' = (l0 F0 theta0 + sum_i l_i F_i tau_i) / (l0 F0 + sum_i l_i F_i)` with
/// `F = max(F, floor)` and a missing tau counting as zero; returns `theta' - theta0`.
pub(crate) fn ewr(theta0: &[f32], f0: &[f32], l0: f64, terms: &[Term<'_>], floor: f64) -> Vec<f32> {
    (0..theta0.len())
        .map(|j| {
            let th = theta0[j] as f64;
            let w0 = l0 * (f0[j] as f64).max(floor);
            let (mut num, mut den) = (w0 * th, w0);
            for t in terms {
                let w = t.lambda * t.fisher.map_or(floor, |f| (f[j] as f64).max(floor));
                num += w * t.tau.as_ref().map_or(0.0, |v| v[j] as f64);
                den += w;
            }
            (num / den - th) as f32
        })
        .collect()
}

/// Fisher merging of `theta_i = theta0 + tau_i`: `sum l_i F_i theta_i / sum l_i F_i - theta0`,
/// computed as `sum l_i F_i tau_i / sum l_i F_i` (identical, without cancellation).
pub(crate) fn fisher_merge(n: usize, terms: &[Term<'_>], floor: f64) -> Vec<f32> {
    (0..n)
        .map(|j| {
            let (mut num, mut den) = (0f64, 0f64);
            for t in terms {
                let w = t.lambda * t.fisher.map_or(floor, |f| (f[j] as f64).max(floor));
                num += w * t.tau.as_ref().map_or(0.0, |v| v[j] as f64);
                den += w;
            }
            (num / den) as f32
        })
        .collect()
}

/// `sum_i l_i tau_i / divisor` (task arithmetic with divisor 1; linear with `sum_i l_i`).
pub(crate) fn weighted_sum(n: usize, terms: &[Term<'_>], divisor: f64) -> Vec<f32> {
    (0..n)
        .map(|j| {
            let s: f64 = terms.iter().map(|t| t.lambda * t.tau.as_ref().map_or(0.0, |v| v[j] as f64)).sum();
            (s / divisor) as f32
        })
        .collect()
}

/// TIES on the scaled task vectors `c_i = lambda_i * tau_i`: trim each to its `floor(density * n)`
/// largest magnitudes, elect the sign of `sum_i c_i` per element, and average the trimmed values
/// agreeing with it (mean over the agreeing non-zero entries).
pub(crate) fn ties(n: usize, terms: &[Term<'_>], density: f64) -> Vec<f32> {
    let k = (density * n as f64).floor() as usize;
    let trimmed: Vec<Vec<f64>> = terms
        .iter()
        .filter_map(|t| {
            let v = t.tau.as_ref()?;
            let keep = top_k_mask(v, k);
            Some(v.iter().zip(keep).map(|(x, k)| if k { t.lambda * *x as f64 } else { 0.0 }).collect())
        })
        .collect();
    (0..n)
        .map(|j| {
            let sign = trimmed.iter().map(|c| c[j]).sum::<f64>().signum();
            let (mut s, mut cnt) = (0f64, 0usize);
            for c in &trimmed {
                if c[j] != 0.0 && c[j].signum() == sign {
                    s += c[j];
                    cnt += 1;
                }
            }
            if cnt == 0 {
                0.0
            } else {
                (s / cnt as f64) as f32
            }
        })
        .collect()
}

/// DARE: drops each element with probability `1 - density`, rescales survivors by `1 / density`.
pub(crate) fn dare(v: &[f32], density: f64, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    v.iter().map(|x| if rng.random::<f64>() < density { (*x as f64 / density) as f32 } else { 0.0 }).collect()
}

/// Per (component, tensor) seed: FNV-1a of `"{component}:{hf_name}"` xor the recipe seed, so a
/// tensor's mask depends on nothing else in the merge.
pub(crate) fn dare_seed(seed: u64, component: usize, t: Target) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{component}:{}", t.hf_name()).bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(tau: &[f32], fisher: Option<&'static [f32]>, lambda: f64) -> Term<'static> {
        Term { tau: Some(tau.to_vec()), fisher, lambda }
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn ewr_follows_the_formula_with_floor() {
        // theta0 = [1, 2], F0 = [1, 0 -> 1e-6], l0 = 1; tau1 = [2, 4] (F [1, 1], l 0.5);
        // tau2 = -[1, -2] (negated by the caller; F [3, 0 -> 1e-6], l 1).
        // e0: (1 + 0.5*2 + 3*(-1)) / (1 + 0.5 + 3) - 1 = -1/4.5 - 1
        // e1: (1e-6*2 + 0.5*4 + 1e-6*2) / (1e-6 + 0.5 + 1e-6) - 2 = 2.000004/0.500002 - 2
        let terms = [term(&[2.0, 4.0], Some(&[1.0, 1.0]), 0.5), term(&[-1.0, 2.0], Some(&[3.0, 0.0]), 1.0)];
        let d = ewr(&[1.0, 2.0], &[1.0, 0.0], 1.0, &terms, 1e-6);
        close(&d, &[-1.0 / 4.5 - 1.0, 2.000004 / 0.500002 - 2.0]);
    }

    #[test]
    fn fisher_task_arithmetic_and_linear_follow_their_formulas() {
        // Fisher: e0 (1*2 + 3*4) / 4 = 3.5; e1 (1e-6*2 + 1*(-2)) / (1e-6 + 1).
        let f = fisher_merge(2, &[term(&[2.0, 2.0], Some(&[1.0, 0.0]), 1.0), term(&[4.0, -2.0], Some(&[3.0, 1.0]), 1.0)], 1e-6);
        close(&f, &[3.5, -1.999998 / 1.000001]);
        // Task arithmetic: 2*[1, 2, 0, 0] + 1*(-[1, 1, 1, 0]) = [1, 3, -1, 0].
        let t = weighted_sum(4, &[term(&[1.0, 2.0, 0.0, 0.0], None, 2.0), term(&[-1.0, -1.0, -1.0, 0.0], None, 1.0)], 1.0);
        close(&t, &[1.0, 3.0, -1.0, 0.0]);
        // Linear, weights 1 and 3 normalised: [(4 + 0)/4, (0 + 24)/4] = [1, 6]; a missing tau is 0.
        let absent = Term { tau: None, fisher: None, lambda: 4.0 };
        let l = weighted_sum(2, &[term(&[4.0, 0.0], None, 1.0), term(&[0.0, 8.0], None, 3.0)], 4.0);
        close(&l, &[1.0, 6.0]);
        let l = weighted_sum(2, &[term(&[4.0, 0.0], None, 1.0), term(&[0.0, 8.0], None, 3.0), absent], 8.0);
        close(&l, &[0.5, 3.0]);
    }

    #[test]
    fn ties_trims_elects_and_averages() {
        // density 0.5 of 4 -> keep 2: [3,0,0,2], [-2,-4,0,0], [0,2,-3,0]; sums [1,-2,-3,2];
        // agreeing means [3, -4, -3, 2]; lambda scales each trimmed vector.
        let taus: [&[f32]; 3] = [&[3.0, -1.0, 0.5, 2.0], &[-2.0, -4.0, 1.0, 0.5], &[1.0, 2.0, -3.0, 0.0]];
        let mk = |l: [f64; 3]| taus.iter().zip(l).map(|(t, l)| term(t, None, l)).collect::<Vec<_>>();
        close(&ties(4, &mk([1.0; 3]), 0.5), &[3.0, -4.0, -3.0, 2.0]);
        close(&ties(4, &mk([0.5; 3]), 0.5), &[1.5, -2.0, -1.5, 1.0]);
        // lambda2 = 2: e0 sum 3 - 4 = -1 -> only -4 agrees.
        close(&ties(4, &mk([1.0, 2.0, 1.0]), 0.5), &[-4.0, -8.0, -3.0, 2.0]);
        // density 1 keeps all: e0 sum 2 > 0, agreeing {3, 1} -> 2.
        close(&ties(4, &mk([1.0; 3]), 1.0)[..1], &[2.0]);
    }

    #[test]
    fn dare_drops_rescales_and_is_seeded() {
        let v: Vec<f32> = (0..10_000).map(|i| 1.0 + i as f32).collect();
        assert_eq!(dare(&v, 1.0, 7), v);
        let a = dare(&v, 0.5, 7);
        assert_eq!(a, dare(&v, 0.5, 7));
        assert_ne!(a, dare(&v, 0.5, 8));
        let kept = a.iter().zip(&v).filter(|(x, y)| **x == 2.0 * **y).count();
        assert_eq!(kept, a.iter().filter(|x| **x != 0.0).count());
        assert!((4_500..5_500).contains(&kept), "{kept}");
        let t = Target::Embedding;
        assert_ne!(dare_seed(0, 0, t), dare_seed(0, 1, t));
    }
}
