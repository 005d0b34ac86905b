//! Timing of the grouped sparse delta kernels for the `sft32` shape: 32 decode rows, row `s`
//! composed of `lang_(s/8 % 4)` + `task_(s % 8)`, each module holding 0.5% of every weight of all
//! 7 projections of SmolLM2-135M's 30 layers (uniformly random positions, like the benchmark's
//! synthetic modules). One decode step = the host deltas of every layer's projection groups
//! (q/k/v, o, gate/up, down), as the engine asks for them. Runs on one thread, then on the
//! default pool.
//!
//!     cargo run --release --example sparse_kernel
use modserve::adapters::batch::BatchDeltas;
use modserve::adapters::composition::Composition;
use modserve::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use modserve::adapters::target::Target;
use modserve::kernels::sparse_layout::SparseMatrix;
use modserve::model::linear::{LinearId, Proj, RowDeltas};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

mod common;
use common::{dims, LAYERS};

const ROWS: usize = 32;
const DENSITY: f64 = 0.005;

fn module(rng: &mut StdRng) -> Arc<ModuleDeltas> {
    let mut m = ModuleDeltas::default();
    for layer in 0..LAYERS {
        for proj in Proj::UNFUSED {
            let (inp, out) = dims(proj);
            let nnz = ((inp * out) as f64 * DENSITY) as usize;
            let flat: Vec<u64> = (0..nnz).map(|_| rng.random_range(0..(inp * out) as u64)).collect();
            let vals: Vec<f32> = (0..nnz).map(|_| rng.random_range(-0.01f32..0.01)).collect();
            let sp = SparseMatrix::from_flat(out, inp, &flat, &vals).unwrap();
            m.targets.insert(Target::Linear(LinearId { layer, proj }), MatrixDelta::Sparse(sp));
        }
    }
    Arc::new(m)
}

fn main() {
    modserve::bootstrap::keep_freed_memory();
    // SPARSE_KERNEL_SHARED=1: one language and one task module for every row (5 MB, in cache).
    let shared = std::env::var("SPARSE_KERNEL_SHARED").is_ok_and(|v| v == "1");
    let (nl, nt) = if shared { (1, 1) } else { (4, 8) };
    let mut rng = StdRng::seed_from_u64(7);
    let langs: Vec<_> = (0..nl).map(|_| module(&mut rng)).collect();
    let tasks: Vec<_> = (0..nt).map(|_| module(&mut rng)).collect();
    let bytes: usize = langs.iter().chain(&tasks).map(|m| m.bytes()).sum();
    let comps: Vec<Composition> = (0..ROWS)
        .map(|s| Composition {
            parts: vec![(Arc::clone(&langs[(s / 8) % nl]), 1.0), (Arc::clone(&tasks[s % nt]), 1.0)],
            pinned: Vec::new(),
            key: String::new(),
        })
        .collect();
    let deltas = BatchDeltas::new(comps.iter().map(|c| (1, Some(c))), true);
    let x576: Vec<f32> = (0..ROWS * 576).map(|_| rng.random_range(-1f32..1.0)).collect();
    let x1536: Vec<f32> = (0..ROWS * 1536).map(|_| rng.random_range(-1f32..1.0)).collect();
    let step = || {
        for layer in 0..LAYERS {
            let id = |proj| LinearId { layer, proj };
            for group in [&[Proj::Q, Proj::K, Proj::V][..], &[Proj::O], &[Proj::Gate, Proj::Up], &[Proj::Down]] {
                let ids: Vec<LinearId> = group.iter().map(|&p| id(p)).collect();
                let outs: Vec<usize> = group.iter().map(|&p| dims(p).1).collect();
                let x = if group[0] == Proj::Down { &x1536 } else { &x576 };
                let d = deltas.host_deltas(&ids, x, ROWS, &outs).unwrap().unwrap();
                std::hint::black_box(d);
            }
        }
    };
    println!("{} modules, {:.1} MB of non-zeros and indices in all, 32 rows of lang+task", nl + nt, bytes as f64 / 1e6);
    for threads in [1, rayon::current_num_threads()] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            step();
            let iters = 20;
            let t0 = Instant::now();
            for _ in 0..iters {
                step();
            }
            let dt = t0.elapsed().as_secs_f64() / iters as f64;
            println!("{threads} thread(s): {:.2} ms per decode step", dt * 1e3);
        });
    }
}
