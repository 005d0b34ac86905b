//! Statistics shared by the load generator and the benchmark: exact nearest-rank percentiles,
//! summaries of latency samples, and a Zipf popularity sampler (rand_distr's).
use rand::Rng;
use rand_distr::Distribution;
use serde::Serialize;

/// Summary of a set of samples (e.g. milliseconds), rounded to 3 decimals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// Nearest-rank percentile of SORTED samples: the smallest value with at least p% of the samples
/// at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sorted copy of the finite samples.
pub fn sorted_finite(samples: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Exact summary (sorts the samples).
pub fn summarize(samples: &[f64]) -> Summary {
    let v = sorted_finite(samples);
    let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Summary {
        count: v.len(),
        mean: mean.map(round3),
        p50: percentile(&v, 50.0).map(round3),
        p90: percentile(&v, 90.0).map(round3),
        p99: percentile(&v, 99.0).map(round3),
        min: v.first().copied().map(round3),
        max: v.last().copied().map(round3),
    }
}

/// Zipf(s) over ranks `0..n`: P(rank k) proportional to 1 / (k+1)^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    inner: rand_distr::Zipf<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        assert!(n > 0, "Zipf over an empty set");
        Self { inner: rand_distr::Zipf::new(n as f64, s).expect("n > 0 and s >= 0") }
    }

    /// Draws a 0-based rank.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        self.inner.sample(rng) as usize - 1
    }
}
