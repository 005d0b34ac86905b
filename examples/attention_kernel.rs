//! One-core timing of the attention kernel (`kernels::attention::HeadAttention`) for the `base32`
//! decode shape: 32 sequences, one new row each, SmolLM2-135M's 30 layers of 9 query heads on 3
//! kv heads of 64 values, an f16 cache holding POSITIONS positions (default 100). Each sequence
//! runs its 9 heads one after the other into its own output row, as the server's batched decode
//! does (`model::attention`, one task per sequence). Two cases: every (layer, sequence) with its
//! own cache (the step's keys and values stream from memory, as in the server) and one cache
//! shared by all (in cache). Prints ms per decode step, the cache bytes one step reads and the
//! rate they were read at. `MODSERVE_PREFETCH=0` runs it without the server's software prefetch.
//!
//!     cargo run --release --example attention_kernel [POSITIONS]
use half::f16;
use modserve::kernels::attention::HeadAttention;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

const SEQS: usize = 32;
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HD: usize = 64;

fn main() {
    let positions: usize = std::env::args().nth(1).map(|p| p.parse().expect("POSITIONS: a number")).unwrap_or(100).max(1);
    let ring = positions + 28;
    let mut rng = StdRng::seed_from_u64(1);
    let mut cache = || -> Vec<f16> { (0..KV_HEADS * ring * HD).map(|_| f16::from_f32(rng.random_range(-1.0f32..1.0))).collect() };
    // Keys and values of every (layer, sequence), allocated one after the other as the server's
    // caches are (each sequence's own allocation).
    let caches: Vec<(Vec<f16>, Vec<f16>)> = (0..LAYERS * SEQS).map(|_| (cache(), cache())).collect();
    let q: Vec<f32> = (0..SEQS * HEADS * HD).map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6).collect();
    let mut out = vec![0f32; SEQS * HEADS * HD];
    let mut scores = Vec::new();
    let qw = HEADS * HD;
    let group = HEADS / KV_HEADS;
    // Query head `h` of sequence `s` against cache `c`, as the server builds it (the first head
    // of each kv head's group reads with look-ahead).
    let head_of = |c: usize, s: usize, h: usize| {
        let (kc, vc) = &caches[c];
        let kvh = h / group;
        HeadAttention {
            q: &q[s * qw..(s + 1) * qw],
            q_stride: qw,
            q_off: h * HD,
            keys: &kc[kvh * ring * HD..(kvh + 1) * ring * HD],
            values: &vc[kvh * ring * HD..(kvh + 1) * ring * HD],
            ring,
            hd: HD,
            start: 0,
            len: 1,
            pos: positions - 1,
            scale: 0.125,
            window: None,
            softcap: None,
            look_ahead: h.is_multiple_of(group),
        }
    };
    let mut step = |pick: &dyn Fn(usize) -> usize| {
        for layer in 0..LAYERS {
            for s in 0..SEQS {
                let c = pick(layer * SEQS + s);
                // The server's prefetches: this kv head's cache, then the next one's while a
                // group of query heads computes.
                head_of(c, s, 0).prefetch();
                let rows = &mut out[s * qw..(s + 1) * qw];
                for h in 0..HEADS {
                    if h.is_multiple_of(group) && h + group < HEADS {
                        head_of(c, s, h + group).prefetch();
                    }
                    head_of(c, s, h).run_into(&mut rows[h * HD..], qw, &mut scores);
                }
            }
        }
    };
    let step_bytes = LAYERS * SEQS * KV_HEADS * positions * HD * 2 * std::mem::size_of::<f16>();
    println!("attention, one core: {SEQS} sequences x {LAYERS} layers, {HEADS} query heads on {KV_HEADS} kv heads of {HD}, f16 cache of {positions} positions");
    println!("cache bytes one decode step reads: {:.1} MB", step_bytes as f64 / 1e6);
    let distinct = |i: usize| i;
    let shared = |_: usize| 0;
    for (name, pick) in [("distinct caches (streamed)", &distinct as &dyn Fn(usize) -> usize), ("one shared cache (in cache)", &shared)] {
        step(pick);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..4 {
                step(pick);
            }
            best = best.min(t.elapsed().as_secs_f64() / 4.0);
        }
        println!("{name}: {:.2} ms per decode step (best of 5), {:.1} GB/s of cache", best * 1e3, step_bytes as f64 / best / 1e9);
    }
    std::hint::black_box(&out);
}
