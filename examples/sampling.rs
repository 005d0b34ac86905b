//! Timing of next-token selection over SmolLM2's 49,152-token vocabulary, per row: greedy, and
//! stochastic with the settings chat clients send (temperature 0.7-1.0, top-p 0.9-0.95, top-k
//! 40 or off). Logits are drawn like a model's (normal, a few much larger), one set per row.
//! A batch-32 step samples 32 such rows on the pool's threads.
//!
//!     cargo run --release --example sampling
use modserve::model::sampling::{Sampler, SamplingParams};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

const VOCAB: usize = 49_152;
const ROWS: usize = 64;

fn main() {
    let mut rng = StdRng::seed_from_u64(3);
    let rows: Vec<Vec<f32>> = (0..ROWS)
        .map(|_| {
            let mut v: Vec<f32> = (0..VOCAB).map(|_| rng.random_range(-1.0f32..1.0) * 3.0 - 2.0).collect();
            for _ in 0..20 {
                v[rng.random_range(0..VOCAB)] = rng.random_range(8.0f32..14.0);
            }
            v
        })
        .collect();
    let cases: [(&str, SamplingParams); 5] = [
        ("greedy", SamplingParams::default()),
        ("greedy, top_logprobs 5", SamplingParams { top_logprobs: 5, ..Default::default() }),
        ("temperature 0.8, top-p 0.95", SamplingParams { temperature: 0.8, top_p: 0.95, seed: 1, ..Default::default() }),
        ("temperature 1.0", SamplingParams { temperature: 1.0, seed: 1, ..Default::default() }),
        ("temperature 0.7, top-k 40", SamplingParams { temperature: 0.7, top_k: 40, seed: 1, ..Default::default() }),
    ];
    for (name, params) in cases {
        let mut s = Sampler::new(params).unwrap();
        let mut picked = 0u64;
        for r in &rows[..4] {
            picked += s.sample(r).unwrap().token.id as u64;
        }
        let t0 = Instant::now();
        for r in &rows {
            picked += s.sample(r).unwrap().token.id as u64;
        }
        let per_row = t0.elapsed().as_secs_f64() / ROWS as f64;
        println!("{name}: {:.1} us per row, {:.2} ms per 32 rows on one thread (checksum {picked})", per_row * 1e6, per_row * 32e3);
    }
}
