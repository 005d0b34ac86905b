//! Synthetic, seeded adapter modules written in their real on-disk formats: PEFT LoRA folders, a
//! PEFT Poly inventory, and native sparse deltas (`sparse_delta.safetensors`).
//!
//! Magnitudes are those of trained adapters: LoRA `A ~ 0.5 * N(0, 1/sqrt(in))`, `B ~ N(0, 0.02)`
//! (alpha = 2r); Poly skills alike with router logits `~ N(0, 1)`; sparse values `~ N(0, 0.01)`.
use std::path::Path;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::stats::normal;
use crate::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use crate::adapters::target::{BaseShapes, Target};
use crate::kernels::sparse_layout::SparseMatrix;
use crate::model::linear::{LinearId, Proj};

/// Element type of written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
}

/// One tensor to write: name, shape, f32 data.
struct Named {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn encode(data: &[f32], elem: Elem) -> Vec<u8> {
    match elem {
        Elem::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Elem::F16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
    }
}

fn write_safetensors(path: &Path, tensors: &[Named], elem: Elem) -> anyhow::Result<()> {
    let bufs: Vec<Vec<u8>> = tensors.iter().map(|t| encode(&t.data, elem)).collect();
    let dtype = match elem {
        Elem::F32 => Dtype::F32,
        Elem::F16 => Dtype::F16,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bufs) {
        views.push((t.name.clone(), TensorView::new(dtype, t.shape.clone(), b)?));
    }
    let md = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(md), path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn gaussian(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| normal(rng) * std).collect()
}

fn module_prefix(layer: usize, p: Proj) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{}", p.hf_parent(), p.hf_name())
}

fn shape_of(base: &BaseShapes, layer: usize, p: Proj) -> anyhow::Result<(usize, usize)> {
    base.shape(Target::Linear(LinearId { layer, proj: p })).with_context(|| format!("the base model has no layers.{layer}.{}", p.hf_name()))
}

fn names(projs: &[Proj]) -> Vec<&'static str> {
    projs.iter().map(|p| p.hf_name()).collect()
}

/// Writes a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`) of rank `r` on
/// `projs` of every layer.
pub fn write_lora(dir: &Path, base: &BaseShapes, projs: &[Proj], r: usize, elem: Elem, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = Vec::new();
    for layer in 0..base.cfg.num_hidden_layers {
        for &p in projs {
            let (out, inp) = shape_of(base, layer, p)?;
            let pre = module_prefix(layer, p);
            let a_std = 0.5 / (inp as f32).sqrt();
            tensors.push(Named { name: format!("{pre}.lora_A.weight"), shape: vec![r, inp], data: gaussian(&mut rng, r * inp, a_std) });
            tensors.push(Named { name: format!("{pre}.lora_B.weight"), shape: vec![out, r], data: gaussian(&mut rng, out * r, 0.02) });
        }
    }
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": names(projs),
        "inference_mode": true,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, elem)
}

/// Shape of a Poly inventory.
#[derive(Debug, Clone, Copy)]
pub struct PolyShape {
    pub n_tasks: usize,
    pub n_skills: usize,
    pub n_splits: usize,
    pub r: usize,
}

/// Writes a PEFT Poly inventory folder on `projs` of every layer.
pub fn write_poly(dir: &Path, base: &BaseShapes, projs: &[Proj], s: PolyShape, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let (q, k, r) = (s.n_splits, s.n_skills, s.r);
    let mut tensors = Vec::new();
    for layer in 0..base.cfg.num_hidden_layers {
        for &p in projs {
            let (out, inp) = shape_of(base, layer, p)?;
            anyhow::ensure!(inp % q == 0 && out % q == 0, "n_splits {q} does not divide {out}x{inp}");
            let pre = module_prefix(layer, p);
            let a_std = 0.5 / (inp as f32).sqrt();
            tensors.push(Named {
                name: format!("{pre}.poly_lora_A"),
                shape: vec![q, k, inp / q, r],
                data: gaussian(&mut rng, k * inp * r, a_std),
            });
            // PEFT divides by r (no alpha): scale B up so the delta magnitude matches the LoRAs'.
            tensors.push(Named {
                name: format!("{pre}.poly_lora_B"),
                shape: vec![q, k, r, out / q],
                data: gaussian(&mut rng, k * r * out, 0.02 * 2.0 * r as f32),
            });
            tensors.push(Named {
                name: format!("{pre}.poly_router.module_logits"),
                shape: vec![s.n_tasks, q * k],
                data: gaussian(&mut rng, s.n_tasks * q * k, 1.0),
            });
        }
    }
    let cfg = serde_json::json!({
        "peft_type": "POLY",
        "poly_type": "poly",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic",
        "r": r,
        "n_tasks": s.n_tasks,
        "n_skills": s.n_skills,
        "n_splits": s.n_splits,
        "target_modules": names(projs),
        "modules_to_save": null,
        "inference_mode": true,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Elem::F32)
}

/// Uniformly random distinct positions in `0..total` at `density`, ascending (geometric skips).
pub fn sparse_positions(rng: &mut impl Rng, total: u64, density: f64) -> Vec<u64> {
    let mut out = Vec::with_capacity((total as f64 * density * 1.1) as usize + 1);
    if density <= 0.0 || total == 0 {
        return out;
    }
    if density >= 1.0 {
        return (0..total).collect();
    }
    let l = (1.0 - density).ln();
    let mut pos: u64 = 0;
    loop {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let skip = (u.ln() / l).floor();
        if !skip.is_finite() || skip >= (total - pos) as f64 {
            break;
        }
        pos += skip as u64;
        out.push(pos);
        pos += 1;
        if pos >= total {
            break;
        }
    }
    out
}

/// Writes a native sparse delta (`DIR/sparse_delta.safetensors`) at `density` on `projs` of every
/// layer; returns the number of non-zeros.
pub fn write_sparse(dir: &Path, base: &BaseShapes, projs: &[Proj], density: f64, seed: u64) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deltas = ModuleDeltas::default();
    let mut nnz = 0;
    for layer in 0..base.cfg.num_hidden_layers {
        for &p in projs {
            let (out, inp) = shape_of(base, layer, p)?;
            let flat = sparse_positions(&mut rng, (out * inp) as u64, density);
            let values = gaussian(&mut rng, flat.len(), 0.01);
            nnz += flat.len();
            let m = SparseMatrix::from_flat(out, inp, &flat, &values).map_err(anyhow::Error::msg)?;
            deltas.targets.insert(Target::Linear(LinearId { layer, proj: p }), MatrixDelta::Sparse(m));
        }
    }
    crate::adapters::formats::sft::save_sparse_safetensors(&dir.join("sparse_delta.safetensors"), &deltas)?;
    Ok(nnz)
}

/// Runs `make` unless `dir/.complete` exists (generation is seeded, so a finished folder from an
/// earlier run with the same work dir is reused), then marks it complete.
pub fn ensure(dir: &Path, what: &str, make: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let marker = dir.join(".complete");
    if marker.exists() {
        eprintln!("[bench] reusing {what} in {}", dir.display());
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    eprintln!("[bench] writing {what} into {} ...", dir.display());
    std::fs::create_dir_all(dir)?;
    make()?;
    std::fs::write(&marker, b"")?;
    eprintln!("[bench]   done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_positions_are_distinct_sorted_and_near_density() {
        let mut rng = StdRng::seed_from_u64(3);
        let v = sparse_positions(&mut rng, 1_000_000, 0.005);
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        assert!(v.iter().all(|&x| x < 1_000_000));
        assert!((v.len() as f64 - 5000.0).abs() < 400.0, "{}", v.len());
        assert_eq!(sparse_positions(&mut rng, 10, 1.0).len(), 10);
        assert!(sparse_positions(&mut rng, 10, 0.0).is_empty());
    }

    fn tiny_base() -> BaseShapes {
        BaseShapes::new(crate::model::config::LlamaConfig {
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            arch: Default::default(),
        })
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("modserve-bench-synth-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn written_modules_load_through_the_real_loaders() {
        let base = tiny_base();
        let d = tmp("lora");
        write_lora(&d, &base, &Proj::UNFUSED, 2, Elem::F16, 1).unwrap();
        let (m, info) = crate::adapters::formats::lora::load_peft_lora(&d, &base).unwrap();
        assert_eq!((info.rank, m.targets.len()), (2, 14));
        let d2 = tmp("poly");
        let shape = PolyShape { n_tasks: 3, n_skills: 4, n_splits: 2, r: 2 };
        write_poly(&d2, &base, &[Proj::Q, Proj::Down], shape, 2).unwrap();
        let p = crate::adapters::formats::poly::load_peft_poly(&d2, &base).unwrap();
        assert_eq!((p.n_tasks(), p.n_skills(), p.n_splits(), p.rank()), (3, 4, 2, 2));
        assert_eq!(p.mix(&crate::adapters::formats::poly::Routing::Task(2)).unwrap().targets.len(), 4);
        let d3 = tmp("sparse");
        let nnz = write_sparse(&d3, &base, &Proj::UNFUSED, 0.2, 3).unwrap();
        let sp = crate::adapters::formats::sft::load_sparse_safetensors(&d3.join("sparse_delta.safetensors"), &base).unwrap();
        let got: usize = sp
            .targets
            .values()
            .map(|t| match t {
                MatrixDelta::Sparse(m) => m.nnz(),
                _ => 0,
            })
            .sum();
        assert!(nnz > 0 && got == nnz);
        for x in [d, d2, d3] {
            let _ = std::fs::remove_dir_all(x);
        }
    }

    #[test]
    fn f16_encoding_round_trips() {
        let b = encode(&[1.5, -2.0], Elem::F16);
        assert_eq!(b.len(), 4);
        assert_eq!(half::f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.5);
    }
}
