//! One-core timing of the per-row LoRA kernels (`HostLowRank::add_row`) for the `lora32` shape:
//! 32 decode rows, each with its own adapter of rank RANK (default 8) on all 7 projections of
//! SmolLM2-135M's 30 layers, in f32 and compact (8-bit, VNNI) form, with 32 distinct adapters
//! (factors streamed from memory) and with one adapter shared by all rows (factors in cache).
//! Also prints a sequential read of 320 MB as the machine's one-core streaming bandwidth, and
//! the factor bytes one decode step reads, so the figure can be set against that bound.
//!
//! `MODSERVE_PREFETCH=0` runs it without software prefetch, for the before/after of that.
//!
//!     cargo run --release --example lora_row_kernel [RANK]
use candle_core::{Device, Tensor};
use modserve::adapters::module_deltas::ModuleDeltas;
use modserve::adapters::target::Target;
use modserve::model::linear::{LinearId, Proj};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

mod common;
#[path = "common/lora.rs"]
mod lora;
use common::LAYERS;
use lora::adapter;

const ROWS: usize = 32;

fn main() {
    let rank: usize = std::env::args().nth(1).map(|r| r.parse().expect("RANK: a number")).unwrap_or(8);
    let big = vec![1f32; 80 << 20];
    let t0 = Instant::now();
    let s: f32 = big.chunks_exact(16).map(|c| c.iter().sum::<f32>()).sum();
    println!("sequential read of 320 MB: {:.1} GB/s (checksum {s})", (big.len() * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    drop(big);
    let mut rng = StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..1536).map(|_| rng.random_range(-1f32..1.0)).collect();
    let mut y = vec![0f32; 1536];
    for compact in [false, true] {
        for distinct in [ROWS, 1] {
            let adapters: Vec<ModuleDeltas> = (0..distinct).map(|_| adapter(&mut rng, compact, rank)).collect();
            // Every row reads its adapter's factors once per step; only `distinct` of them differ.
            let (step_mb, distinct_mb) =
                (adapters[0].bytes() as f64 * ROWS as f64 / 1e6, adapters[0].bytes() as f64 * distinct as f64 / 1e6);
            let targets: Vec<Target> = adapters[0].targets.keys().copied().collect();
            if distinct == 1 {
                // What a prefill segment pays per module before its GEMMs: the factors widened to f32.
                let t0 = Instant::now();
                let floats: usize = targets.iter().map(|t| adapters[0].host_low_rank(t).expect("packed").factors().0.len()).sum();
                println!("  widening one module's factors for prefill: {:.2} ms ({floats} f32 of A^T)", t0.elapsed().as_secs_f64() * 1e3);
            }
            let iters = 10;
            let t0 = Instant::now();
            for _ in 0..iters {
                for t in &targets {
                    for r in 0..ROWS {
                        let h = adapters[r % distinct].host_low_rank(t).expect("prepared");
                        h.add_row(&x[..h.in_dim()], &mut y[..h.out_dim()], 0.5);
                    }
                }
            }
            let dt = t0.elapsed().as_secs_f64() / iters as f64;
            // The server's order: per layer and projection group (q/k/v, o, gate/up, down, as
            // `Linear::forward_many` runs them), each row through the group's targets.
            let groups: [&[Proj]; 4] = [&[Proj::Q, Proj::K, Proj::V], &[Proj::O], &[Proj::Gate, Proj::Up], &[Proj::Down]];
            // `next_row`: also ask for the next row's factors of the group while this row computes,
            // as `adapters::batch` does (`MODSERVE_PREFETCH=0`: no prefetch at all, neither this
            // nor the kernel's own look-ahead).
            let mut qrow = modserve::kernels::lowrank::QuantRow::default();
            let mut server_order = |next_row: bool| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    for layer in 0..LAYERS {
                        for g in groups {
                            let ad = &adapters;
                            let group = |r: usize| {
                                g.iter().map(move |&proj| {
                                    ad[r % distinct].host_low_rank(&Target::Linear(LinearId { layer, proj })).expect("prepared")
                                })
                            };
                            if next_row {
                                group(0).for_each(|h| h.prefetch());
                            }
                            for r in 0..ROWS {
                                if next_row && r + 1 < ROWS {
                                    group(r + 1).for_each(|h| h.prefetch());
                                }
                                // The group's input quantized once per row, as the server does.
                                let in_dim = common::dims(g[0]).0;
                                qrow.set(&x[..in_dim]);
                                for h in group(r) {
                                    h.add_row_q(&x[..in_dim], &qrow, &mut y[..h.out_dim()], 0.5);
                                }
                            }
                        }
                    }
                }
                t0.elapsed().as_secs_f64() / iters as f64
            };
            let (ds, dp) = (server_order(false), server_order(true));
            println!(
                "r={rank} {} factors, {distinct:2} distinct adapter(s) over {ROWS} rows ({step_mb:.0} MB of factors read per step, {distinct_mb:.0} MB distinct): {:.2} ms per decode step target by target, {:.2} ms in the server's order (row by row through each layer's q/k/v, o, gate/up, down), {:.2} ms so with the next row's factors prefetched",
                if compact { "compact" } else { "f32    " },
                dt * 1e3,
                ds * 1e3,
                dp * 1e3
            );
        }
    }
    prefill_paths(rank, &mut rng);
}

/// A prefill segment of `len` rows of one module through every target: the per-row compact
/// kernel (factors stay in cache after the first row) against widening the factors and two
/// GEMMs (the path `adapters::batch` takes for segments longer than its row-kernel limit).
fn prefill_paths(rank: usize, rng: &mut StdRng) {
    use modserve::adapters::module_deltas::factor_tensors;
    let m = adapter(rng, true, rank);
    let targets: Vec<Target> = m.targets.keys().copied().collect();
    for len in [8usize, 16, 32, 64, 128] {
        let x: Vec<f32> = (0..len * 1536).map(|_| rng.random_range(-1f32..1.0)).collect();
        let mut y = vec![0f32; len * 1536];
        let mut qrows: Vec<modserve::kernels::lowrank::QuantRow> = (0..len).map(|_| Default::default()).collect();
        let iters = 3;
        let t0 = Instant::now();
        for _ in 0..iters {
            for t in &targets {
                let h = m.host_low_rank(t).expect("packed");
                let (i, o) = (h.in_dim(), h.out_dim());
                for (q, xr) in qrows.iter_mut().zip(x[..len * i].chunks_exact(i)) {
                    q.set(xr);
                }
                h.add_rows_q(&x[..len * i], &qrows, &mut y[..len * o], 0.5, true);
            }
        }
        let rows_ms = t0.elapsed().as_secs_f64() / iters as f64 * 1e3;
        let t0 = Instant::now();
        for _ in 0..iters {
            for t in &targets {
                let h = m.host_low_rank(t).expect("packed");
                let xt = Tensor::from_slice(&x[..len * h.in_dim()], (len, h.in_dim()), &Device::Cpu).unwrap();
                let (at, bt) = factor_tensors(h, &Device::Cpu).unwrap();
                let d = (xt.matmul(&at).unwrap().matmul(&bt).unwrap() * 0.5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (o, v) in y.iter_mut().zip(d) {
                    *o += v;
                }
            }
        }
        let gemm_ms = t0.elapsed().as_secs_f64() / iters as f64 * 1e3;
        println!(
            "prefill segment of {len:3} rows, one r={rank} module, all targets: row kernel {rows_ms:.2} ms, widen + GEMMs {gemm_ms:.2} ms"
        );
    }
}
