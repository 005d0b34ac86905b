//! Next-token selection: greedy, temperature, top-k, top-p with a seeded RNG, plus the top-k
//! log-probabilities of the model's (unscaled) distribution for every generated token.
//!
//! Invariants: parameters are validated before a [`Sampler`] exists; log-probabilities are the
//! log-softmax of the raw logits (what reference implementations report), independent of the
//! sampling temperature; the same seed and logits give the same token.
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Errors in sampling parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("top_logprobs must be at most {max}, got {got}")]
    TopLogprobs { got: usize, max: usize },
    #[error("logits contain no finite value")]
    NoFiniteLogit,
}

/// Largest accepted `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    pub seed: u64,
    /// Number of alternatives to report per token (0 = none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, top_logprobs: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(SamplingError::TopLogprobs { got: self.top_logprobs, max: MAX_TOP_LOGPROBS });
        }
        Ok(())
    }
}

/// A token id with its log-probability.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// The outcome of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: TokenLogprob,
    /// Highest first; `top_logprobs` entries.
    pub top: Vec<TokenLogprob>,
}

/// Per-sequence sampler state (owns the RNG).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled, SamplingError> {
        // Logprobs are only formed for the tokens reported. Greedy shares the largest value with
        // the normaliser when it is finite (then it is also the largest finite value).
        let (lse, id) = if self.params.temperature == 0.0 {
            let max = crate::kernels::softmax::max_lanes(logits);
            let lse = if max.is_finite() { log_sum_exp_from(logits, max)? } else { log_sum_exp(logits)? };
            (lse, first_index_of(logits, max))
        } else {
            (log_sum_exp(logits)?, self.sample_stochastic(logits)?)
        };
        let mut top = top_k_logprobs(logits, self.params.top_logprobs);
        top.iter_mut().for_each(|t| t.logprob -= lse);
        Ok(Sampled { token: TokenLogprob { id, logprob: logits[id as usize] - lse }, top })
    }

    fn sample_stochastic(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        // Scaled in f64 relative to the largest logit, so any temperature > 0 (even subnormal) gives
        // finite values: the maximum maps to 0 and the rest to <= 0.
        let t = self.params.temperature as f64;
        let lmax = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut cands: Vec<(u32, f64)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, (l as f64 - lmax) / t)).collect();
        if cands.is_empty() {
            return Err(SamplingError::NoFiniteLogit);
        }
        // Highest first, ties by id so the order (and thus the draw) is deterministic.
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cands.truncate(self.params.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|&(_, l)| (l - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cands.truncate(keep);
        }
        let dist = WeightedIndex::new(&probs).map_err(|_| SamplingError::NoFiniteLogit)?;
        Ok(cands[dist.sample(&mut self.rng)].0)
    }
}

/// `log(sum(exp(logits)))` over the finite logits: f32 exponentials (vectorised, see
/// `kernels::softmax`), f64 sum.
pub fn log_sum_exp(logits: &[f32]) -> Result<f32, SamplingError> {
    log_sum_exp_from(logits, crate::kernels::softmax::max_finite(logits))
}

/// [`log_sum_exp`] given the largest finite logit (`-inf` when there is none).
fn log_sum_exp_from(logits: &[f32], max: f32) -> Result<f32, SamplingError> {
    if !max.is_finite() {
        return Err(SamplingError::NoFiniteLogit);
    }
    let sum = crate::kernels::softmax::exp_sum(logits, max);
    Ok(max + sum.ln() as f32)
}

/// Log-softmax in f32 with an f64 normaliser.
pub fn log_softmax(logits: &[f32]) -> Result<Vec<f32>, SamplingError> {
    let lse = log_sum_exp(logits)?;
    Ok(logits.iter().map(|&l| l - lse).collect())
}

#[cfg(test)]
fn argmax(v: &[f32]) -> u32 {
    // The largest value (NaN ignored), then its first index: two passes that vectorise, where
    // one `if x > best` loop is a dependent chain (a few hundred microseconds a step at batch 32
    // over a 49,152-token vocabulary). Ties go to the lowest id; 0 when no value is a number.
    first_index_of(v, crate::kernels::softmax::max_lanes(v))
}

/// The first index holding `max` (0 when none does: `max` is NaN, or `v` is empty).
fn first_index_of(v: &[f32], max: f32) -> u32 {
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// The `k` highest entries, highest first (ties: lower id first).
pub fn top_k_logprobs(logprobs: &[f32], k: usize) -> Vec<TokenLogprob> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|id| TokenLogprob { id, logprob: logprobs[id as usize] }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first index of the largest number, at every length around the 16 lanes, with ties,
    /// infinities and NaNs (never chosen while a number exists).
    #[test]
    fn argmax_is_the_first_index_of_the_largest_number() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(9);
        for n in 1..70 {
            for trial in 0..20 {
                let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-4i32..4) as f32).collect();
                if trial % 3 == 0 {
                    v[rng.random_range(0..n)] = f32::NAN;
                }
                if trial % 5 == 0 {
                    v[rng.random_range(0..n)] = f32::NEG_INFINITY;
                }
                if trial % 7 == 0 {
                    v[rng.random_range(0..n)] = f32::INFINITY;
                }
                let mut want = None;
                for (i, x) in v.iter().enumerate() {
                    if !x.is_nan() && want.is_none_or(|w: usize| *x > v[w]) {
                        want = Some(i);
                    }
                }
                assert_eq!(argmax(&v), want.unwrap_or(0) as u32, "{v:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn greedy_picks_argmax_and_reports_sorted_top() {
        let mut s = Sampler::new(SamplingParams { top_logprobs: 3, ..Default::default() }).unwrap();
        let out = s.sample(&[0.0, 3.0, 1.0, 2.0]).unwrap();
        assert_eq!(out.token.id, 1);
        let ids: Vec<u32> = out.top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let total: f32 = log_softmax(&[0.0, 3.0, 1.0, 2.0]).unwrap().iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 1.0, top_k: 5, seed: 42, ..Default::default() };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..100).map(|_| s.sample(&logits).unwrap().token.id).collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        let mut allowed: Vec<u32> = (0..50).collect();
        allowed.sort_by(|x, y| logits[*y as usize].total_cmp(&logits[*x as usize]).then(x.cmp(y)));
        allowed.truncate(5);
        assert!(a.iter().all(|t| allowed.contains(t)));
        assert!(a.iter().any(|t| *t != a[0]), "temperature 1 over 5 equal candidates should vary");
    }

    #[test]
    fn subnormal_temperature_is_greedy_not_an_error() {
        let mut s = Sampler::new(SamplingParams { temperature: 1e-40, seed: 3, ..Default::default() }).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.1, 0.5, 0.4]).unwrap().token.id, 1);
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-6, seed: 7, ..Default::default() }).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 0.5, 0.4]).unwrap().token.id, 1);
        }
    }

    #[test]
    fn rejects_bad_params() {
        for (p, e) in [
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { top_logprobs: 99, ..Default::default() }, "top_logprobs"),
        ] {
            let err = Sampler::new(p).err().expect("must fail").to_string();
            assert!(err.contains(e), "{err}");
        }
    }

    /// `log_sum_exp` (f32 exponentials, f64 sum) against an f64 reference, on short and
    /// vocabulary-sized rows and rows with -inf entries.
    #[test]
    fn log_sum_exp_matches_an_f64_reference() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        for n in [1usize, 7, 8, 9, 31, 1000, 49152] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0f32..25.0)).collect();
            if n > 8 {
                v[3] = f32::NEG_INFINITY;
                v[n - 1] = f32::NEG_INFINITY;
            }
            let max = v.iter().copied().filter(|x| x.is_finite()).fold(f64::NEG_INFINITY, |m, x| m.max(x as f64));
            let want = max + v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&v).unwrap() as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "n={n}: {got} vs {want}");
        }
        assert!(log_sum_exp(&[f32::NEG_INFINITY; 9]).is_err());
    }
}
