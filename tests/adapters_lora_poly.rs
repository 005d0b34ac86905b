//! PEFT LoRA and Poly loaders: behaviour on tiny adapters written here (scaling, rsLoRA,
//! fan_in_fan_out, rank/alpha patterns, layers_to_transform, every refusal) and on the parity kit's
//! real adapters (copied under tests/fixtures/parity). Numeric parity of whole-model logits lives
//! with the engine tests.
mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use modserve::adapters::error::AdapterError;
use modserve::adapters::formats::lora::{load_peft_lora, load_peft_lora_from};
use modserve::adapters::formats::poly::{load_peft_poly, Routing};
use modserve::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use modserve::adapters::target::{BaseShapes, Target};
use modserve::model::config::LlamaConfig;
use modserve::model::linear::{LinearId, Proj};
use serde_json::{json, Value};

fn tiny_base() -> BaseShapes {
    // q_proj 8x8, k/v_proj 4x8, gate/up 12x8, down 8x12, two layers.
    BaseShapes::new(LlamaConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![2],
        arch: Default::default(),
    })
}

fn smollm2_base() -> BaseShapes {
    BaseShapes::new(LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        arch: Default::default(),
    })
}

fn lin(layer: usize, proj: Proj) -> Target {
    Target::Linear(LinearId { layer, proj })
}

fn mat(rows: usize, cols: usize, seed: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.61 + seed).sin()).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn module(layer: usize, proj: Proj) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{}", proj.hf_parent(), proj.hf_name())
}

/// Canonical factors `(A [r, in], B [out, r])` for a module of the tiny base.
fn factors(layer: usize, proj: Proj, r: usize) -> (Tensor, Tensor) {
    let (out, inp) = tiny_base().shape(lin(layer % 2, proj)).unwrap();
    let seed = layer as f32 * 10.0 + proj as usize as f32;
    (mat(r, inp, seed), mat(out, r, seed + 0.5))
}

/// Config defaults: r=2, alpha=4, q_proj + v_proj; `extra` keys override.
fn write_lora(dir: &Path, extra: Value, tensors: Vec<(String, Tensor)>) {
    let mut cfg = json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "use_dora": false, "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {}});
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
}

/// lora_A/lora_B tensors for `mods` with rank `r` (per module override in `ranks`).
fn lora_tensors(mods: &[(usize, Proj)], r: usize, ranks: &[((usize, Proj), usize)]) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for &(l, p) in mods {
        let r = ranks.iter().find(|(m, _)| *m == (l, p)).map(|x| x.1).unwrap_or(r);
        let (a, b) = factors(l, p, r);
        v.push((format!("{}.lora_A.weight", module(l, p)), a));
        v.push((format!("{}.lora_B.weight", module(l, p)), b));
    }
    v
}

const QV: [(usize, Proj); 4] = [(0, Proj::Q), (0, Proj::V), (1, Proj::Q), (1, Proj::V)];

fn max_abs_diff(x: &Tensor, y: &Tensor) -> f32 {
    (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Checks `delta == scale * B @ A` for the canonical factors of every listed module.
fn assert_scaled(d: &ModuleDeltas, mods: &[(usize, Proj)], r: usize, scale: f64) {
    assert_eq!(d.targets.len(), mods.len());
    for &(l, p) in mods {
        let (a, b) = factors(l, p, r);
        let want = (b.matmul(&a).unwrap() * scale).unwrap();
        let got = d.targets[&lin(l, p)].to_dense().unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "{l} {p:?}");
    }
}

#[test]
fn lora_scaling_is_alpha_over_r_or_sqrt_r() {
    let dir = tempfile::tempdir().unwrap();
    write_lora(dir.path(), json!({}), lora_tensors(&QV, 2, &[]));
    let (d, info) = load_peft_lora(dir.path(), &tiny_base()).unwrap();
    assert_scaled(&d, &QV, 2, 2.0);
    assert_eq!((info.rank, info.alpha, info.use_rslora), (2, 4.0, false));
    assert_eq!(info.targets, vec!["q_proj".to_string(), "v_proj".to_string()]);
    match &d.targets[&lin(1, Proj::V)] {
        MatrixDelta::LowRank { a, b } => {
            assert_eq!((a.dims(), b.dims()), (&[2, 8][..], &[4, 2][..]));
            assert!(a.is_contiguous() && b.is_contiguous());
        }
        other => panic!("expected low-rank, got {other:?}"),
    }
    write_lora(dir.path(), json!({"use_rslora": true}), lora_tensors(&QV, 2, &[]));
    let (d, info) = load_peft_lora(dir.path(), &tiny_base()).unwrap();
    assert!(info.use_rslora);
    assert_scaled(&d, &QV, 2, 4.0 / 2f64.sqrt());
}

#[test]
fn fan_in_fan_out_accepts_transposed_factors() {
    let dir = tempfile::tempdir().unwrap();
    let transposed: Vec<(String, Tensor)> =
        lora_tensors(&QV, 2, &[]).into_iter().map(|(n, t)| (n, t.t().unwrap().contiguous().unwrap())).collect();
    write_lora(dir.path(), json!({"fan_in_fan_out": true}), transposed.clone());
    let (d, _) = load_peft_lora(dir.path(), &tiny_base()).unwrap();
    assert_scaled(&d, &QV, 2, 2.0);
    // PEFT resets the flag for nn.Linear, so canonical factors are still read as they are.
    write_lora(dir.path(), json!({"fan_in_fan_out": true}), lora_tensors(&QV, 2, &[]));
    assert_scaled(&load_peft_lora(dir.path(), &tiny_base()).unwrap().0, &QV, 2, 2.0);
    // Without the flag, transposed factors are a shape error.
    write_lora(dir.path(), json!({}), transposed);
    let e = load_peft_lora(dir.path(), &tiny_base()).unwrap_err();
    assert!(matches!(e, AdapterError::Shape { .. }) && e.to_string().contains("adapter_model.safetensors"), "{e}");
}

#[test]
fn rank_and_alpha_patterns_apply_per_module() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({"rank_pattern": {"layers.1.self_attn.q_proj": 3}, "alpha_pattern": {"v_proj": 1}});
    write_lora(dir.path(), cfg, lora_tensors(&QV, 2, &[((1, Proj::Q), 3)]));
    let (d, info) = load_peft_lora(dir.path(), &tiny_base()).unwrap();
    assert_eq!(info.rank, 3);
    let check = |l, p, r, s: f64| {
        let (a, b) = factors(l, p, r);
        let want = (b.matmul(&a).unwrap() * s).unwrap();
        assert!(max_abs_diff(&d.targets[&lin(l, p)].to_dense().unwrap(), &want) < 1e-5);
    };
    check(0, Proj::Q, 2, 2.0);
    check(1, Proj::Q, 3, 4.0 / 3.0);
    check(0, Proj::V, 2, 0.5);
    check(1, Proj::V, 2, 0.5);
}

#[test]
fn layers_to_transform_selects_layers() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = [(1, Proj::Q), (1, Proj::V)];
    write_lora(dir.path(), json!({"layers_to_transform": 1, "layers_pattern": "layers"}), lora_tensors(&l1, 2, &[]));
    assert_scaled(&load_peft_lora(dir.path(), &tiny_base()).unwrap().0, &l1, 2, 2.0);
    write_lora(dir.path(), json!({"layers_to_transform": [0, 1]}), lora_tensors(&QV, 2, &[]));
    assert_scaled(&load_peft_lora(dir.path(), &tiny_base()).unwrap().0, &QV, 2, 2.0);
    // Tensors for a layer the config leaves out are refused.
    write_lora(dir.path(), json!({"layers_to_transform": [1]}), lora_tensors(&QV, 2, &[]));
    let e = load_peft_lora(dir.path(), &tiny_base()).unwrap_err();
    assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("layers.0"), "{e}");
}

#[test]
fn default_adapter_name_and_all_linear_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<(usize, Proj)> = (0..2).flat_map(|l| Proj::UNFUSED.map(|p| (l, p))).collect();
    let named = lora_tensors(&all, 2, &[]).into_iter().map(|(n, t)| (n.replace(".weight", ".default.weight"), t)).collect();
    write_lora(dir.path(), json!({"target_modules": "all-linear"}), named);
    let (d, info) = load_peft_lora(dir.path(), &tiny_base()).unwrap();
    assert_scaled(&d, &all, 2, 2.0);
    assert_eq!(info.targets.len(), 7);
}

/// Every refusal: the variant and the file named in the message.
#[test]
fn lora_errors_name_the_file_and_the_problem() {
    type Case = (&'static str, Value, Vec<(String, Tensor)>, fn(&AdapterError) -> bool, &'static str);
    let nan = {
        let mut t = lora_tensors(&QV, 2, &[]);
        t[0].1 = Tensor::from_vec(vec![f32::NAN; 16], (2, 8), &Device::Cpu).unwrap();
        t
    };
    let mut no_b = lora_tensors(&QV, 2, &[]);
    no_b.remove(1);
    let mut rank_mismatch = lora_tensors(&QV, 2, &[]);
    rank_mismatch[1].1 = mat(8, 3, 0.0);
    let mut foo = lora_tensors(&QV, 2, &[]);
    foo.extend(lora_tensors(&[(0, Proj::Q)], 2, &[]).into_iter().map(|(n, t)| (n.replace("q_proj", "foo_proj"), t)));
    let far = lora_tensors(&[(0, Proj::Q), (5, Proj::Q)], 2, &[]);
    let ok = || lora_tensors(&QV, 2, &[]);
    let cases: Vec<Case> = vec![
        ("dora", json!({"use_dora": true}), ok(), |e| matches!(e, AdapterError::Unsupported { .. }), "adapter_config.json"),
        (
            "modules_to_save",
            json!({"modules_to_save": ["lm_head"]}),
            ok(),
            |e| matches!(e, AdapterError::Unsupported { .. }),
            "adapter_config.json",
        ),
        ("bias", json!({"bias": "all"}), ok(), |e| matches!(e, AdapterError::Unsupported { .. }), "adapter_config.json"),
        (
            "regex",
            json!({"target_modules": ".*\\.(q|v)_proj"}),
            ok(),
            |e| matches!(e, AdapterError::Unsupported { .. }),
            "adapter_config.json",
        ),
        ("peft_type", json!({"peft_type": "IA3"}), ok(), |e| matches!(e, AdapterError::Unsupported { .. }), "adapter_config.json"),
        ("nan", json!({}), nan, |e| matches!(e, AdapterError::NonFinite { what: "NaN", .. }), "adapter_model.safetensors"),
        ("no_b", json!({}), no_b, |e| matches!(e, AdapterError::Malformed { .. }), "no lora_B"),
        ("rank_ab", json!({}), rank_mismatch, |e| matches!(e, AdapterError::Malformed { .. }), "rank 3"),
        ("rank_cfg", json!({"r": 3}), ok(), |e| matches!(e, AdapterError::Malformed { .. }), "r=3"),
        (
            "foo_proj",
            json!({"target_modules": ["q_proj", "v_proj", "foo_proj"]}),
            foo,
            |e| matches!(e, AdapterError::UnknownTarget { .. }),
            "foo_proj",
        ),
        ("layer_5", json!({"target_modules": ["q_proj"]}), far, |e| matches!(e, AdapterError::UnknownTarget { .. }), "layers.5"),
        (
            "missing",
            json!({"target_modules": ["q_proj", "v_proj", "k_proj"]}),
            ok(),
            |e| matches!(e, AdapterError::Malformed { .. }),
            "k_proj",
        ),
    ];
    for (name, cfg, tensors, want, text) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_lora(dir.path(), cfg, tensors);
        // The same refusal whether the factors become tensors or are packed straight from the file.
        for compact in [false, true] {
            let e = load_peft_lora_from(dir.path(), &tiny_base(), None, compact).unwrap_err();
            let msg = e.to_string();
            assert!(want(&e) && msg.contains(text) && msg.contains(&dir.path().display().to_string()), "{name} (compact {compact}): {msg}");
        }
    }
}

#[test]
fn broken_files_are_malformed_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    write_lora(dir.path(), json!({}), lora_tensors(&QV, 2, &[]));
    let st = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for cut in [bytes.len() - 7, bytes.len() / 2, 20, 3, 0] {
        std::fs::write(&st, &bytes[..cut]).unwrap();
        let e = load_peft_lora(dir.path(), &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("adapter_model.safetensors"), "{e}");
    }
    std::fs::remove_file(&st).unwrap();
    let e = load_peft_lora(dir.path(), &tiny_base()).unwrap_err();
    assert!(matches!(e, AdapterError::Io { .. }) && e.to_string().contains("adapter_model.safetensors"), "{e}");
    std::fs::write(dir.path().join("adapter_config.json"), "{ not json").unwrap();
    let e = load_peft_lora(dir.path(), &tiny_base()).unwrap_err();
    assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("adapter_config.json"), "{e}");
    std::fs::remove_file(dir.path().join("adapter_config.json")).unwrap();
    let e = load_peft_lora(dir.path(), &tiny_base()).unwrap_err();
    assert!(matches!(e, AdapterError::Io { .. }) && e.to_string().contains("adapter_config.json"), "{e}");
}

/// Raw `lora_B` of the kit file, to check the folded scale.
fn raw(dir: &Path, name: &str) -> Tensor {
    let map = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    map[name].clone()
}

#[test]
fn kit_lora_adapters_load_with_their_scaling() {
    let base = smollm2_base();
    for (name, n_targets, rank, scale) in [("lora_qv_r4", 60, 4, 2.0), ("lora_all_r8", 210, 8, 2.0), ("lora_all_r4_rslora", 210, 4, 4.0)] {
        let dir = common::fixture(&format!("parity/{name}"));
        let (d, info) = load_peft_lora(&dir, &base).unwrap();
        assert_eq!((d.targets.len(), info.rank), (n_targets, rank), "{name}");
        d.validate(&base, &dir).unwrap();
        let t = "base_model.model.model.layers.7.self_attn.v_proj.lora_B.weight";
        let MatrixDelta::LowRank { a, b } = &d.targets[&lin(7, Proj::V)] else { panic!("low-rank expected") };
        let want = (raw(&dir, t) * scale).unwrap();
        assert!(max_abs_diff(b, &want) < 1e-7, "{name}");
        let ta = t.replace("lora_B", "lora_A");
        assert_eq!(max_abs_diff(a, &raw(&dir, &ta)), 0.0, "{name}");
    }
}

#[test]
fn kit_poly_mixes_like_peft() {
    let base = smollm2_base();
    let dir = common::fixture("parity/poly_qvup");
    let inv = load_peft_poly(&dir, &base).unwrap();
    assert_eq!((inv.n_tasks(), inv.n_skills(), inv.n_splits(), inv.rank()), (3, 4, 2, 4));
    assert_eq!(inv.targets().count(), 90);
    assert!(inv.bytes() > 7_000_000);
    // Expected entries of the dense delta, from numpy with PEFT's einsum/reshape code (float64).
    type Point = (usize, usize, f64);
    let expected: [(usize, Proj, i64, [Point; 4], f64); 3] = [
        (
            0,
            Proj::Q,
            1,
            [(0, 0, -2.3898275224e-04), (575, 575, -7.0809929419e-04), (291, 283, 4.3235804355e-04), (3, 293, 1.0530106746e-03)],
            2.8922508065e-01,
        ),
        (
            29,
            Proj::Up,
            2,
            [(0, 0, 4.0803241705e-04), (1535, 575, -4.2455200197e-04), (771, 283, 9.3231813367e-05), (3, 293, -5.2372307729e-04)],
            5.1125963090e-01,
        ),
        (
            7,
            Proj::V,
            0,
            [(0, 0, -2.9890440484e-04), (191, 575, -2.1514428869e-04), (99, 283, -7.6716362566e-04), (3, 293, -9.8782711139e-04)],
            1.7382138572e-01,
        ),
    ];
    for (layer, proj, task, points, norm) in expected {
        let d = inv.mix(&Routing::Task(task)).unwrap();
        assert_eq!(d.targets.len(), 90);
        let dense = d.targets[&lin(layer, proj)].to_dense().unwrap().to_vec2::<f32>().unwrap();
        for (o, i, v) in points {
            assert!((dense[o][i] as f64 - v).abs() < 1e-7 + 1e-4 * v.abs(), "{layer} {proj:?} [{o},{i}] {} vs {v}", dense[o][i]);
        }
        let got = dense.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        assert!((got - norm).abs() < 1e-5 * norm, "{got} vs {norm}");
    }
    let e = inv.mix(&Routing::Task(3)).unwrap_err();
    assert!(matches!(e, AdapterError::UnknownTask { task: 3, n_tasks: 3, .. }), "{e}");
}

/// A loaded LoRA keeps one copy of its factors on the CPU, in the kernels' layout: no more
/// bytes than its f32 file with f32 factors, and as 8-bit blocks about a quarter of them (27% at
/// rank 8; a rank below 8 is padded to 8 columns, so 53% at rank 4); and the packed module still
/// computes the delta of the file's factors (dense reconstruction within the 8-bit error).
#[test]
fn a_loaded_lora_is_resident_in_no_more_than_its_file_bytes() {
    let base = smollm2_base();
    for name in ["lora_qv_r4", "lora_all_r8", "lora_all_r4_rslora"] {
        let dir = common::fixture(&format!("parity/{name}"));
        let file = std::fs::metadata(dir.join("adapter_model.safetensors")).unwrap().len() as usize;
        let (d, _) = load_peft_lora(&dir, &base).unwrap();
        let t = lin(7, Proj::V);
        let want = d.targets[&t].to_dense().unwrap();
        let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let f32_host = d.clone().into_host(false).unwrap();
        let compact = d.into_host(true).unwrap();
        println!("{name}: file {file} B, f32 resident {} B, compact resident {} B", f32_host.bytes(), compact.bytes());
        assert!(f32_host.bytes() <= file, "{name}: f32 factors resident in {} B > file {file} B", f32_host.bytes());
        let bound = if name.contains("r8") { file * 3 / 10 } else { file * 6 / 10 };
        assert!(compact.bytes() <= bound, "{name}: compact factors resident in {} B > {bound} B (file {file} B)", compact.bytes());
        for (what, m) in [("f32", &f32_host), ("compact", &compact)] {
            assert!(matches!(m.targets[&t], MatrixDelta::Packed(_)), "{name} {what}: not packed");
            let got = m.targets[&t].to_dense().unwrap();
            let err = (got - &want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() / norm;
            let tol = if what == "f32" { 1e-6 } else { 0.02 };
            assert!(err <= tol, "{name} {what}: dense delta off by {err} (relative L2)");
        }
    }
}

/// Relative L2 distance of two deltas' dense forms.
fn rel_l2(got: &MatrixDelta, want: &MatrixDelta) -> f32 {
    let (g, w) = (got.to_dense().unwrap(), want.to_dense().unwrap());
    let norm = w.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    (g - &w).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() / norm
}

/// The compact layout packed straight from the file's bytes (the server's cold-load path on the
/// CPU) is the layout `into_host(true)` makes from the loaded tensors: same targets, same bytes,
/// same delta up to the rounding of the folded scaling; for f32, f16 and bf16 files (the two
/// half types are converted while packing) and the kit's real adapters. Factors stored
/// transposed (`fan_in_fan_out`) take the tensor path and are packed after.
#[test]
fn lora_packed_from_the_file_matches_packing_the_tensors() {
    let check = |dir: &Path, base: &BaseShapes, what: &str| {
        let (direct, info_d) = load_peft_lora_from(dir, base, None, true).unwrap();
        let packed_now = direct.targets.values().all(|d| matches!(d, MatrixDelta::Packed(_)));
        assert_eq!(packed_now, what != "fan_in_fan_out", "{what}: packed straight from the file");
        // What the loader does next: packs whatever took the tensor path (a no-op otherwise).
        let direct = direct.into_host(true).unwrap();
        let (tensors, info_t) = load_peft_lora(dir, base).unwrap();
        let via_tensors = tensors.into_host(true).unwrap();
        assert_eq!(info_d, info_t, "{what}");
        assert_eq!(direct.targets.keys().collect::<Vec<_>>(), via_tensors.targets.keys().collect::<Vec<_>>(), "{what}");
        assert_eq!(direct.bytes(), via_tensors.bytes(), "{what}");
        for (t, d) in &direct.targets {
            assert!(matches!(d, MatrixDelta::Packed(_)), "{what}: {t:?} not packed");
            let err = rel_l2(d, &via_tensors.targets[t]);
            assert!(err < 1e-3, "{what}: {t:?} differs by {err} (relative L2)");
        }
    };
    for dtype in [candle_core::DType::F32, candle_core::DType::F16, candle_core::DType::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let tensors = lora_tensors(&QV, 2, &[]).into_iter().map(|(n, t)| (n, t.to_dtype(dtype).unwrap())).collect();
        write_lora(dir.path(), json!({"lora_alpha": 3}), tensors);
        check(dir.path(), &tiny_base(), &format!("{dtype:?}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let transposed = lora_tensors(&QV, 2, &[]).into_iter().map(|(n, t)| (n, t.t().unwrap().contiguous().unwrap())).collect();
    write_lora(dir.path(), json!({"fan_in_fan_out": true}), transposed);
    check(dir.path(), &tiny_base(), "fan_in_fan_out");
    for name in ["lora_qv_r4", "lora_all_r8", "lora_all_r4_rslora"] {
        check(&common::fixture(&format!("parity/{name}")), &smollm2_base(), name);
    }
}
