//! Tests of the int8 GEMM: packed products equal candle's Q8_0 `QMatMul` on the same weights for
//! every variant this CPU runs, extreme values do not saturate, zero rows give zeros.

use super::*;
use candle_core::quantized::QMatMul;
use candle_core::Module;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn rand_t(rng: &mut StdRng, r: usize, c: usize) -> Tensor {
    Tensor::from_vec((0..r * c).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>(), (r, c), &Device::Cpu).unwrap()
}

/// The variants this CPU runs (the AVX2 one too on an AVX-512 machine, so both get tested
/// wherever possible).
fn variants() -> Vec<Variant> {
    let v: Vec<Variant> = [Variant::Vnni, Variant::Avx2].into_iter().filter(|v| v.supported()).collect();
    if v.is_empty() {
        eprintln!("SKIPPED: this CPU has neither AVX-512 VNNI nor AVX2+FMA+F16C; the int8 kernels are not used here");
    }
    v
}

/// Against candle's own Q8_0 matmul on the same quantized weight: the same integer dot
/// products, so only float summation order may differ.
#[test]
fn equals_candle_q8_0_matmul() {
    for variant in variants() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(n, k) in &[(16, 32), (40, 64), (192, 576), (33, 96), (5, 160)] {
            let w = rand_t(&mut rng, n, k);
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let packed = PackedQ8::from_qtensor_as(&q, variant).unwrap().expect("packed");
            assert_eq!(packed.variant(), variant);
            let deq = packed.dequantize().unwrap();
            let ref_deq = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(deq.to_vec2::<f32>().unwrap(), ref_deq.to_vec2::<f32>().unwrap(), "{variant:?} dequantize {n}x{k}");
            let qm = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 2, 3, 4, 5, 7, 8, 9, 17, 33] {
                let x = rand_t(&mut rng, m, k);
                let got = packed.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap();
                let want = qm.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for (gr, wr) in got.iter().zip(&want) {
                    for (g, w) in gr.iter().zip(wr) {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{variant:?} {n}x{k} m={m}: {g} vs {w}");
                    }
                }
            }
        }
    }
}

/// Extreme blocks: weights at -128 (possible in a GGUF file, never produced by candle) and
/// +-127 against activations at +-127 are the largest pairwise i16 sums of the AVX2 variant;
/// the result must be the exact integer dot, not a saturated one.
#[test]
fn extreme_values_do_not_saturate() {
    for variant in variants() {
        let (n, k) = (8, 64);
        let one = f16::from_f32(1.0).to_le_bytes();
        let mut raw = Vec::new();
        for row in 0..n {
            for _ in 0..k / 32 {
                raw.extend_from_slice(&one);
                raw.extend((0..32).map(|i| [-128i8 as u8, 127, -127i8 as u8][(row + i) % 3]));
            }
        }
        let packed = PackedQ8::from_q8_0_bytes(&raw, n, k, variant);
        let wf = packed.dequantize().unwrap().to_vec2::<f32>().unwrap();
        // x quantizes to exactly +-127 with d = 1.
        let xs: Vec<f32> = (0..k).map(|i| if (i / 2) % 2 == 0 { 127.0 } else { -127.0 }).collect();
        let got = packed.matmul_t(&Tensor::from_vec(xs.clone(), (1, k), &Device::Cpu).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (j, wr) in wf.iter().enumerate() {
            let want: f32 = wr.iter().zip(&xs).map(|(w, x)| w * x).sum();
            assert_eq!(got[0][j], want, "{variant:?} row {j}");
        }
    }
}

/// Zero rows (all-zero activations, scale 0) give exact zeros, not NaN.
#[test]
fn zero_input_rows_give_zeros() {
    for variant in variants() {
        let mut rng = StdRng::seed_from_u64(3);
        let q = QTensor::quantize(&rand_t(&mut rng, 32, 64), GgmlDType::Q8_0).unwrap();
        let packed = PackedQ8::from_qtensor_as(&q, variant).unwrap().unwrap();
        let y = packed.matmul_t(&Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0), "{variant:?}");
    }
}
