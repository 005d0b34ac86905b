//! What the server's surroundings cost the compact LoRA decode loop, on one core: the loop of
//! `lora_row_kernel` (32 rows of distinct r=8 modules on all 7 projections, in the server's
//! order, the next row's factors prefetched) with the engine's other memory traffic added one
//! piece at a time. Only the delta loop is timed (per layer group: the delta buffers, the
//! prefetches, the kernels), never the added traffic itself.
//!
//! - V0: one input row and one output row for every row (the `lora_row_kernel` figure);
//! - V1: each row its own input and output row, in per-target buffers `[32, out]`, as the server;
//! - V2: V0, plus a 2 MB read of other memory before each layer group (the base weights the
//!   server's GEMM streams between two delta groups, 160 MB in all);
//! - V3: V1 and V2 together; V4: V3 plus a 1 MB write before each group (activations, KV);
//! - V5: V0 over 128 modules, a different 32 each step: no factor is still in the L3 cache from
//!   the step before (84 MB of factors per step against a 32 MB L3 leaves some there in V0).
//!
//!     cargo run --release --example lora_gap
use modserve::adapters::module_deltas::ModuleDeltas;
use modserve::adapters::target::Target;
use modserve::kernels::lowrank::QuantRow;
use modserve::model::linear::{LinearId, Proj};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

mod common;
#[path = "common/lora.rs"]
mod lora;
use common::{dims, LAYERS};
use lora::adapter;

const ROWS: usize = 32;

fn main() {
    let mut rng = StdRng::seed_from_u64(5);
    let adapters: Vec<ModuleDeltas> = (0..4 * ROWS).map(|_| adapter(&mut rng, true, 8)).collect();
    let xs: Vec<f32> = (0..ROWS * 1536).map(|_| rng.random_range(-1f32..1.0)).collect();
    let mut big = vec![1f32; 40 << 20]; // 160 MB: the "weights"
    let groups: [&[Proj]; 4] = [&[Proj::Q, Proj::K, Proj::V], &[Proj::O], &[Proj::Gate, Proj::Up], &[Proj::Down]];
    let mut qrow = QuantRow::default();
    let mut pos = 0usize;
    let mut sink = 0f32;
    for variant in [
        "V0 same x,y",
        "V1 distinct x,y rows",
        "V2 V0 + 2MB read per group",
        "V3 V1 + read",
        "V4 V3 + 1MB write per group",
        "V5 V0, 128 adapters cycled (no reuse across steps)",
    ] {
        let (distinct_rows, read, write) = match &variant[..2] {
            "V0" => (false, false, false),
            "V1" => (true, false, false),
            "V2" => (false, true, false),
            "V3" => (true, true, false),
            "V4" => (true, true, true),
            _ => (false, false, false),
        };
        let cycle = variant.starts_with("V5");
        let iters = 10;
        let mut total = 0f64;
        for it in 0..iters + 1 {
            let mut dt = 0f64;
            for layer in 0..LAYERS {
                for g in groups {
                    if read {
                        let n = 512 << 10; // 2 MB of f32
                        if pos + n > big.len() {
                            pos = 0;
                        }
                        sink += big[pos..pos + n].chunks_exact(16).map(|c| c[0]).sum::<f32>();
                        pos += n;
                    }
                    if write {
                        let n = 256 << 10;
                        if pos + n > big.len() {
                            pos = 0;
                        }
                        big[pos..pos + n].fill(it as f32);
                        pos += n;
                    }
                    let t0 = Instant::now();
                    let in_dim = dims(g[0]).0;
                    let mut dh: Vec<Vec<f32>> = g.iter().map(|&p| vec![0f32; ROWS * dims(p).1]).collect();
                    let off = if cycle { (it % 4) * ROWS } else { 0 };
                    let h = |r: usize, p: Proj| adapters[off + r].host_low_rank(&Target::Linear(LinearId { layer, proj: p })).unwrap();
                    g.iter().for_each(|&p| h(0, p).prefetch());
                    for r in 0..ROWS {
                        if r + 1 < ROWS {
                            g.iter().for_each(|&p| h(r + 1, p).prefetch());
                        }
                        let x = if distinct_rows { &xs[r * in_dim..(r + 1) * in_dim] } else { &xs[..in_dim] };
                        qrow.set(x);
                        for (k, &p) in g.iter().enumerate() {
                            let out = dims(p).1;
                            let y = if distinct_rows { &mut dh[k][r * out..(r + 1) * out] } else { &mut dh[k][..out] };
                            h(r, p).add_row_q(x, &qrow, y, 0.5);
                        }
                    }
                    sink += dh[0][7];
                    dt += t0.elapsed().as_secs_f64();
                }
            }
            if it > 0 {
                total += dt;
            }
        }
        println!("{variant}: {:.2} ms per step (delta loop only)", total / iters as f64 * 1e3);
    }
    println!("{sink}");
}
