//! Tests of the int8 GEMM: packed products equal candle's Q8_0 (Q4_1) `QMatMul` on the same
//! weights for every variant this CPU runs, extreme values do not saturate, zero rows give zeros.

use super::*;
use candle_core::quantized::QMatMul;
use candle_core::Module;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn rand_t(rng: &mut StdRng, r: usize, c: usize) -> Tensor {
    Tensor::from_vec((0..r * c).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<f32>>(), (r, c), &Device::Cpu).unwrap()
}

/// The Q8_0 variants this CPU runs (the AVX2 one too on an AVX-512 machine, so both get tested
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
            let packed = PackedWeight::from_qtensor_as(&q, variant).unwrap().expect("packed");
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
        let packed = PackedWeight::from_q8_0_bytes(&raw, n, k, variant);
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
        let packed = PackedWeight::from_qtensor_as(&q, variant).unwrap().unwrap();
        let y = packed.matmul_t(&Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0), "{variant:?}");
    }
}

/// The Q4_1 variants this CPU runs, whatever `MODSERVE_Q4_1` says about the model's use (the
/// AVX2 one too on an AVX-512 machine, so both get tested wherever possible).
fn q4_variants() -> Vec<Variant> {
    let v: Vec<Variant> = [Variant::Q4Vnni, Variant::Q4Avx2].into_iter().filter(|v| v.supported()).collect();
    if v.is_empty() {
        eprintln!("SKIPPED: this CPU lacks AVX2+FMA+F16C; the Q4_1 kernels are not used here");
    }
    if !Variant::Q4Vnni.supported() {
        eprintln!("not run here: the Q4_1 VNNI tile (this CPU lacks AVX-512 VNNI); the AVX2 one is tested");
    }
    v
}

/// Against candle's Q4_1 matmul (Q4_1 x Q8_1 dot) on the same weights: dequantized values are
/// identical; products differ by float order and by the rounding of each block's `s = dx *
/// sum(xq)` to f16 (candle rounds `sum` to f16 first), which the bound allows per block as
/// `|m| * sum |x| * 2^-9` and nothing more (a wrong nibble or scale is off by ~d * |x|).
#[test]
fn q4_1_equals_candle_q4_1_matmul() {
    for variant in q4_variants() {
        q4_1_equals_candle_for(variant);
    }
}

fn q4_1_equals_candle_for(variant: Variant) {
    let mut rng = StdRng::seed_from_u64(11);
    // Even block counts: candle's Q4_1 dot asserts one (in builds with debug assertions).
    for &(n, k) in &[(8, 64), (40, 128), (192, 576), (33, 128), (5, 192)] {
        let w = rand_t(&mut rng, n, k);
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let packed = PackedWeight::from_qtensor_as(&q, variant).unwrap().expect("packed");
        let nr = variant.nr();
        assert_eq!((packed.variant(), packed.size_in_bytes()), (variant, n.div_ceil(nr) * k / 32 * nr * 20));
        let deq = packed.dequantize().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(deq, q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap(), "{variant:?} dequantize {n}x{k}");
        // A Q4_1 block's minimum is its `m` (its q is 0).
        let mins: Vec<Vec<f32>> =
            deq.iter().map(|r| r.chunks(32).map(|b| b.iter().copied().fold(f32::INFINITY, f32::min)).collect()).collect();
        let qm = QMatMul::from_qtensor(q).unwrap();
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 17, 33] {
            let x = rand_t(&mut rng, m, k);
            let xs = x.to_vec2::<f32>().unwrap();
            let got = packed.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap();
            let want = qm.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for ((gr, wr), xr) in got.iter().zip(&want).zip(&xs) {
                let xabs: Vec<f32> = xr.chunks(32).map(|b| b.iter().map(|v| v.abs()).sum()).collect();
                for ((g, w), mr) in gr.iter().zip(wr).zip(&mins) {
                    let s_err: f32 = mr.iter().zip(&xabs).map(|(mb, xb)| mb.abs() * xb).sum::<f32>() / 512.0;
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()) + s_err, "{variant:?} {n}x{k} m={m}: {g} vs {w} (s bound {s_err})");
                }
            }
        }
    }
}

/// Every nibble at 15 against activations at +-127 of one sign: a block's 16 products per i16
/// lane reach 16 * 15 * 127 = 30480, which must add up exactly (no saturation); `m = 0` keeps
/// the check on the integer dot alone.
#[test]
fn q4_1_extreme_values_do_not_saturate() {
    for variant in q4_variants() {
        q4_1_extreme_values_for(variant);
    }
}

fn q4_1_extreme_values_for(variant: Variant) {
    let (n, k) = (16, 64);
    let mut raw = Vec::new();
    for row in 0..n {
        for _ in 0..k / 32 {
            raw.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
            raw.extend_from_slice(&f16::from_f32(0.0).to_le_bytes());
            raw.extend((0..16).map(|i| if (row + i) % 5 == 0 { 0x0f } else { 0xff }));
        }
    }
    let packed = PackedWeight { n, k, variant, data: q4::pack(&raw, n, k, variant) };
    let wf = packed.dequantize().unwrap().to_vec2::<f32>().unwrap();
    for xs in [vec![127.0f32; k], vec![-127.0f32; k]] {
        let got = packed.matmul_t(&Tensor::from_vec(xs.clone(), (1, k), &Device::Cpu).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (j, wr) in wf.iter().enumerate() {
            let want: f32 = wr.iter().zip(&xs).map(|(w, x)| w * x).sum();
            assert_eq!(got[0][j], want, "{variant:?} row {j}");
        }
    }
}

/// Zero rows give exact zeros with Q4_1 weights too (their `m` term has `s = 0`).
#[test]
fn q4_1_zero_input_rows_give_zeros() {
    for variant in q4_variants() {
        let mut rng = StdRng::seed_from_u64(5);
        let q = QTensor::quantize(&rand_t(&mut rng, 24, 96), GgmlDType::Q4_1).unwrap();
        let packed = PackedWeight::from_qtensor_as(&q, variant).unwrap().unwrap();
        let y = packed.matmul_t(&Tensor::zeros((5, 96), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0), "{variant:?}");
    }
}

/// Both Q4_1 panel widths (8 rows for AVX2, 16 for VNNI) hold exactly the file's values, on any
/// CPU (packing is plain Rust): a nibble, scale or minimum in the wrong place changes a value.
#[test]
fn q4_1_panels_of_both_widths_hold_the_files_values() {
    let mut rng = StdRng::seed_from_u64(13);
    for &(n, k) in &[(8, 64), (16, 64), (40, 128), (33, 96), (5, 192)] {
        let q = QTensor::quantize(&rand_t(&mut rng, n, k), GgmlDType::Q4_1).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let raw = q.data().unwrap();
        for variant in [Variant::Q4Avx2, Variant::Q4Vnni] {
            let data = q4::pack(&raw, n, k, variant);
            assert_eq!(data.len(), n.div_ceil(variant.nr()) * (k / 32) * variant.pb(), "{variant:?} {n}x{k}");
            assert_eq!(q4::dequantize(&data, n, k, variant), want, "{variant:?} {n}x{k}");
        }
    }
}
