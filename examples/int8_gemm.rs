//! Timing of the base product (`kernels::int8_gemm::PackedWeight`) alone, for each projection group
//! of SmolLM2-135M's decode step as the model calls it (q/k/v in one call, o, gate/up in one
//! call, down, and the output head), with the weights of 30 distinct layers (streamed from
//! memory, as in the server) and ROWS batch rows (default 32, the `base32` decode step). Prints
//! per group the ms per decode step and the multiply-adds per second, so the model's phase
//! profile (`modserve bench --profile`) can be set against the GEMM alone. Threads: rayon's
//! (`RAYON_NUM_THREADS`, as `--threads` sets it in the server). `cached`: one layer's weights
//! serve all 30 calls (in cache), to tell the kernel's rate from the memory's. `q4_1`: the
//! layers' weights are Q4_1 blocks on this CPU's best 4-bit kernel (VNNI, else AVX2; the head
//! stays Q8_0, as in SmolLM2's GGUF), instead of Q8_0 blocks; `q4_1_avx2`: on the AVX2 one
//! (to compare on a VNNI CPU). Also prints the bytes of weights read per step and their rate.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example int8_gemm [ROWS] [cached] [q4_1|q4_1_avx2]
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use modserve::kernels::int8_gemm::{PackedWeight, Variant};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV: usize = 192;
const FFN: usize = 1536;
const VOCAB: usize = 49152;

/// A projection group: its name, the `(n, k)` of its weights (one call), calls per step.
type Group = (&'static str, &'static [(usize, usize)], usize);

fn packed(rng: &mut StdRng, n: usize, k: usize, q4: Option<Variant>) -> PackedWeight {
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
    if let Some(v) = q4 {
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).expect("Q4_1");
        return PackedWeight::from_qtensor_as(&q, v)
            .expect("pack")
            .unwrap_or_else(|| panic!("this CPU does not run the Q4_1 kernel {v:?}"));
    }
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).expect("Q8_0");
    PackedWeight::from_qtensor(&q).expect("pack").expect("this CPU runs neither int8 GEMM variant (AVX-512 VNNI or AVX2)")
}

fn main() {
    // The server's allocator settings (its step buffers come from the heap, not fresh pages).
    modserve::bootstrap::keep_freed_memory();
    let rows: usize = std::env::args().nth(1).map(|r| r.parse().expect("ROWS: a number")).unwrap_or(32).max(1);
    let cached = std::env::args().skip(2).any(|a| a == "cached");
    let q4 = std::env::args().skip(2).find_map(|a| match a.as_str() {
        "q4_1" => Some(Variant::detect_q4().expect("this CPU runs no Q4_1 kernel (AVX2 or AVX-512 VNNI)")),
        "q4_1_avx2" => Some(Variant::Q4Avx2),
        _ => None,
    });
    let mut rng = StdRng::seed_from_u64(1);
    // (group, [(n, k)] of its weights, one call per layer, or once for the head)
    let groups: [Group; 5] = [
        ("qkv", &[(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN)], LAYERS),
        ("o_proj", &[(HIDDEN, HIDDEN)], LAYERS),
        ("gate_up", &[(FFN, HIDDEN), (FFN, HIDDEN)], LAYERS),
        ("down", &[(HIDDEN, FFN)], LAYERS),
        ("head", &[(VOCAB, HIDDEN)], 1),
    ];
    eprintln!("packing the weights of {LAYERS} layers and the head ...");
    let distinct = |calls: usize| if cached { 1 } else { calls };
    let weights: Vec<Vec<Vec<PackedWeight>>> = groups
        .iter()
        .map(|&(name, shapes, calls)| {
            (0..distinct(calls))
                .map(|_| shapes.iter().map(|&(n, k)| packed(&mut rng, n, k, q4.filter(|_| name != "head"))).collect())
                .collect()
        })
        .collect();
    let variant = weights[0][0][0].variant();
    let xs: Vec<Vec<f32>> = [HIDDEN, FFN].iter().map(|&k| (0..rows * k).map(|_| rng.random_range(-2.0f32..2.0)).collect()).collect();
    let source = if cached { "one layer's weights for all 30 (in cache)" } else { "30 distinct layers (weights from memory)" };
    println!("int8 GEMM {variant:?} (head Q8_0), {rows} rows, {} threads, {source}", rayon::current_num_threads());
    let (mut total_ms, mut total_mac, mut total_bytes) = (0.0, 0.0, 0.0);
    for (&(name, shapes, calls), ws) in groups.iter().zip(&weights) {
        let k = shapes[0].1;
        let x = &xs[usize::from(k == FFN)];
        let macs = (calls * rows * shapes.iter().map(|(n, k)| n * k).sum::<usize>()) as f64;
        let bytes = (calls * ws[0].iter().map(PackedWeight::size_in_bytes).sum::<usize>()) as f64;
        let step = || {
            for call in ws.iter().cycle().take(calls) {
                let refs: Vec<&PackedWeight> = call.iter().collect();
                std::hint::black_box(PackedWeight::matmul_host_many(&refs, x, rows).expect("matmul"));
            }
        };
        step();
        let mut best = f64::INFINITY;
        let mut sum = 0.0;
        let reps = 20;
        for _ in 0..reps {
            let t = Instant::now();
            step();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            best = best.min(ms);
            sum += ms;
        }
        let mean = sum / reps as f64;
        total_ms += mean;
        total_mac += macs;
        total_bytes += bytes;
        let rate = |b: f64| b / mean * 1e-6;
        println!(
            "{name:8} {mean:7.2} ms per step (best {best:6.2}), {:6.1} G multiply-adds/s, {:5.1} MB at {:5.1} GB/s",
            rate(macs),
            bytes * 1e-6,
            rate(bytes)
        );
    }
    let (gmac, gbs) = (total_mac / total_ms * 1e-6, total_bytes / total_ms * 1e-6);
    println!("all      {total_ms:7.2} ms per step, {gmac:6.1} G multiply-adds/s, {:5.1} MB at {gbs:5.1} GB/s", total_bytes * 1e-6);
}
