//! PEFT Poly (Polytropon / multi-head routing) adapters: an inventory of skills per adapted linear
//! layer, mixed into one low-rank delta per layer for a task (or explicit routing weights).
//!
//! Per layer the file holds `poly_lora_A` `[n_splits, n_skills, in/n_splits, r]`, `poly_lora_B`
//! `[n_splits, n_skills, r, out/n_splits]` and `poly_router.module_logits`
//! `[n_tasks, n_splits*n_skills]`. As in PEFT (`tuners/poly/layer.py`, `router.py`, eval mode):
//! `w = sigmoid(logits[t]).view(n_splits, n_skills)`, `w /= w.sum(-1) + 1e-12`,
//! `A_t[q*in/n_splits + i, :] = sum_s w[q,s] A[q,s,i,:]`, `B_t[:, q*out/n_splits + j] = sum_s
//! w[q,s] B[q,s,:,j]`, and `y = base(x) + x @ A_t @ B_t / r`. Invariants: the inventory is
//! validated at load (shapes against the base, finite values, exactly the selected modules), is
//! immutable, and [`PolyInventory::mix`] yields `LowRank { a: A_t^T, b: B_t^T / r }` f32 CPU factors.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::peft::{check_coverage, load_adapter_tensors, malformed, module_target, present, read_config, to_f32, unsupported, Selector};
use crate::adapters::error::AdapterError;
use crate::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use crate::adapters::source::ModuleBytes;
use crate::adapters::target::{BaseShapes, Target};

/// PyTorch's `EPS` of the Poly router.
const EPS: f32 = 1e-12;

/// How a Poly inventory's skills are mixed.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// The learned routing of task `t` (every layer uses its own router logits).
    Task(i64),
    /// Explicit non-negative weights, `n_splits * n_skills` (split-major) or `n_skills` (reused for
    /// every split), used in place of `sigmoid(logits)` in every layer, then normalised per split.
    Weights(Vec<f32>),
}

#[derive(Debug, Clone, Deserialize)]
struct PolyConfig {
    peft_type: Option<String>,
    poly_type: Option<String>,
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default = "one")]
    n_tasks: usize,
    #[serde(default = "default_skills")]
    n_skills: usize,
    #[serde(default = "one")]
    n_splits: usize,
    target_modules: Option<Value>,
    exclude_modules: Option<Value>,
    modules_to_save: Option<Value>,
}

fn default_r() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_skills() -> usize {
    4
}

/// One adapted layer: skills and router.
#[derive(Debug, Clone)]
struct PolyLayer {
    /// `[n_splits, n_skills, in/n_splits, r]`.
    a: Tensor,
    /// `[n_splits, n_skills, r, out/n_splits]`.
    b: Tensor,
    /// `[n_tasks * n_splits * n_skills]`, row-major.
    logits: Vec<f32>,
}

/// A loaded, validated PEFT Poly adapter.
#[derive(Debug, Clone)]
pub struct PolyInventory {
    file: PathBuf,
    base: BaseShapes,
    r: usize,
    n_tasks: usize,
    n_skills: usize,
    n_splits: usize,
    layers: BTreeMap<Target, PolyLayer>,
}

/// `poly_lora_A`, `poly_lora_B`, `poly_router.module_logits` of one module, with tensor names.
type Parts = [Option<(String, Tensor)>; 3];

/// `[base_model.model.]<module>.poly_lora_A[.<adapter>]` etc. -> (module, part index 0/1/2).
fn parse_poly_name(name: &str) -> Option<(String, usize)> {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    let tags = [(".poly_lora_A", 0, ""), (".poly_lora_B", 1, ""), (".poly_router", 2, ".module_logits")];
    tags.into_iter().find_map(|(tag, part, tail)| {
        let i = name.find(&format!("{tag}.")).or_else(|| (name.ends_with(tag) && tail.is_empty()).then(|| name.len() - tag.len()))?;
        let rest = &name[i + tag.len()..];
        let rest = rest.strip_suffix(tail)?;
        // `rest` is "" or ".<adapter name>".
        let ok = rest.is_empty() || rest.strip_prefix('.').is_some_and(|a| !a.is_empty() && !a.contains('.'));
        ok.then(|| (name[..i].to_string(), part))
    })
}

fn check_finite(t: &Tensor, file: &Path, name: &str) -> Result<(), AdapterError> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    match crate::adapters::module_deltas::non_finite(&v) {
        Some(what) => Err(AdapterError::NonFinite { path: file.into(), tensor: name.into(), what }),
        None => Ok(()),
    }
}

/// Loads a PEFT Poly adapter folder (`adapter_config.json` + `adapter_model.safetensors`/`.bin`).
pub fn load_peft_poly(dir: &Path, base: &BaseShapes) -> Result<PolyInventory, AdapterError> {
    load_peft_poly_from(dir, base, None)
}

/// [`load_peft_poly`], parsing the tensor file from `read` when it holds its bytes.
pub fn load_peft_poly_from(dir: &Path, base: &BaseShapes, read: Option<&ModuleBytes>) -> Result<PolyInventory, AdapterError> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: PolyConfig = read_config(&cfg_path)?;
    match cfg.peft_type.as_deref() {
        Some("POLY") => {}
        Some(other) => return Err(unsupported(&cfg_path, format!("peft_type `{other}` is not POLY"))),
        None => return Err(malformed(&cfg_path, "`peft_type` is missing")),
    }
    if let Some(p) = cfg.poly_type.as_deref().filter(|p| *p != "poly") {
        return Err(unsupported(&cfg_path, format!("poly_type `{p}` (only `poly`)")));
    }
    if present(&cfg.modules_to_save) {
        return Err(unsupported(&cfg_path, "`modules_to_save` (fully trained extra modules)"));
    }
    if cfg.r == 0 || cfg.n_tasks == 0 || cfg.n_skills == 0 || cfg.n_splits == 0 {
        return Err(malformed(&cfg_path, "r, n_tasks, n_skills and n_splits must all be positive"));
    }
    let sel = Selector::new(&cfg.target_modules, &cfg.exclude_modules, &cfg_path)?;
    let (file, tensors) = load_adapter_tensors(dir, read)?;
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (name, t) in tensors {
        let (module, part) = parse_poly_name(&name).ok_or_else(|| {
            malformed(
                &file,
                format!("unexpected tensor `{name}` (expected `<module>.poly_lora_A`, `.poly_lora_B`, `.poly_router.module_logits`)"),
            )
        })?;
        let slot = &mut parts.entry(module.clone()).or_default()[part];
        if slot.is_some() {
            return Err(malformed(&file, format!("two tensors for the same part of module `{module}` (`{name}`)")));
        }
        *slot = Some((name, t));
    }
    let mut targets = BTreeMap::new();
    for module in parts.keys() {
        targets.insert(module.clone(), module_target(module, &file, base)?);
    }
    check_coverage(&sel, base, &parts.keys().cloned().collect::<BTreeSet<_>>(), &file)?;
    let (r, q, s, nt) = (cfg.r, cfg.n_splits, cfg.n_skills, cfg.n_tasks);
    let mut layers = BTreeMap::new();
    for (module, [pa, pb, pl]) in parts {
        let target = targets[&module];
        let (out, inp) = base.shape(target).ok_or_else(|| AdapterError::UnknownTarget { path: file.clone(), target: module.clone() })?;
        if inp % q != 0 || out % q != 0 {
            return Err(malformed(&file, format!("n_splits={q} does not divide the {out}x{inp} weight of `{module}`")));
        }
        let get = |part: Option<(String, Tensor)>, what: &str, expected: Vec<usize>| -> Result<Tensor, AdapterError> {
            let (name, t) = part.ok_or_else(|| malformed(&file, format!("module `{module}` has no {what} tensor")))?;
            if t.dims() != expected.as_slice() {
                return Err(AdapterError::Shape { path: file.clone(), tensor: name, expected, got: t.dims().to_vec() });
            }
            let t = to_f32(&t, &file, &name)?;
            check_finite(&t, &file, &name)?;
            Ok(t)
        };
        let a = get(pa, "poly_lora_A", vec![q, s, inp / q, r])?;
        let b = get(pb, "poly_lora_B", vec![q, s, r, out / q])?;
        let logits = get(pl, "poly_router.module_logits", vec![nt, q * s])?.flatten_all()?.to_vec1::<f32>()?;
        layers.insert(target, PolyLayer { a, b, logits });
    }
    Ok(PolyInventory { file, base: base.clone(), r, n_tasks: nt, n_skills: s, n_splits: q, layers })
}

impl PolyInventory {
    /// Number of tasks the routers know.
    pub fn n_tasks(&self) -> usize {
        self.n_tasks
    }

    /// Skills (LoRA modules) per layer.
    pub fn n_skills(&self) -> usize {
        self.n_skills
    }

    /// Splits (routing heads) per layer.
    pub fn n_splits(&self) -> usize {
        self.n_splits
    }

    /// Rank of every skill.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The file the inventory was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The adapted parameters.
    pub fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        self.layers.keys().copied()
    }

    /// Resident bytes of skills and routers.
    pub fn bytes(&self) -> usize {
        self.layers.values().map(|l| (l.a.elem_count() + l.b.elem_count() + l.logits.len()) * 4).sum()
    }

    /// Mixes the skills of every layer for `routing` into low-rank deltas (see the module docs).
    pub fn mix(&self, routing: &Routing) -> Result<ModuleDeltas, AdapterError> {
        let k = self.n_splits * self.n_skills;
        let (task, fixed) = match routing {
            Routing::Task(t) if *t < 0 || *t as u64 >= self.n_tasks as u64 => {
                return Err(AdapterError::UnknownTask { module: self.file.display().to_string(), task: *t, n_tasks: self.n_tasks })
            }
            Routing::Task(t) => (*t as usize, None),
            Routing::Weights(w) => (0, Some(self.normalise(self.explicit_weights(w)?))),
        };
        // Layers are mixed in parallel (the first request of a new routing waits on this); the
        // first failing layer in order is reported.
        use rayon::prelude::*;
        let mixed: Vec<Result<(Target, MatrixDelta), AdapterError>> = self
            .layers
            .par_iter()
            .map(|(target, layer)| {
                let w = match &fixed {
                    Some(w) => w.clone(),
                    None => {
                        let row = &layer.logits[task * k..(task + 1) * k];
                        self.normalise(row.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect())
                    }
                };
                Ok((*target, self.mix_layer(*target, layer, w)?))
            })
            .collect();
        let mut deltas = ModuleDeltas::default();
        for m in mixed {
            let (target, d) = m?;
            deltas.targets.insert(target, d);
        }
        deltas.validate(&self.base, &self.file)?;
        Ok(deltas)
    }

    /// `w` `[n_splits * n_skills]` (normalised) -> `LowRank { a: A_t^T, b: B_t^T / r }`.
    fn mix_layer(&self, target: Target, layer: &PolyLayer, w: Vec<f32>) -> Result<MatrixDelta, AdapterError> {
        let (q, s, r) = (self.n_splits, self.n_skills, self.r);
        let (out, inp) =
            self.base.shape(target).ok_or_else(|| AdapterError::UnknownTarget { path: self.file.clone(), target: target.hf_name() })?;
        let w = Tensor::from_vec(w, (q, s, 1, 1), &Device::Cpu)?;
        // [q, in/q, r] -> [in, r] (split q covers inputs q*in/q..) -> [r, in]
        let a = layer.a.broadcast_mul(&w)?.sum(1)?.reshape((inp, r))?.t()?.contiguous()?;
        // [q, r, out/q] -> [r, q, out/q] -> [r, out] -> [out, r]
        let b = layer.b.broadcast_mul(&w)?.sum(1)?.transpose(0, 1)?.contiguous()?.reshape((r, out))?.t()?;
        let b = (b / r as f64)?.contiguous()?;
        Ok(MatrixDelta::LowRank { a, b })
    }

    /// Per split, `w / (sum(w) + 1e-12)`.
    fn normalise(&self, mut w: Vec<f32>) -> Vec<f32> {
        for split in w.chunks_mut(self.n_skills) {
            let sum: f32 = split.iter().sum::<f32>() + EPS;
            split.iter_mut().for_each(|x| *x /= sum);
        }
        w
    }

    /// Checks explicit routing weights and expands an `n_skills` vector to every split.
    fn explicit_weights(&self, w: &[f32]) -> Result<Vec<f32>, AdapterError> {
        let (q, s) = (self.n_splits, self.n_skills);
        let bad = |m: String| AdapterError::Composition(format!("{}: routing weights {m}", self.file.display()));
        let full: Vec<f32> = if w.len() == q * s {
            w.to_vec()
        } else if w.len() == s {
            w.iter().copied().cycle().take(q * s).collect()
        } else {
            return Err(bad(format!("have {} values, expected n_splits*n_skills={} or n_skills={s}", w.len(), q * s)));
        };
        if let Some(x) = full.iter().find(|x| !x.is_finite() || **x < 0.0) {
            return Err(bad(format!("must be finite and non-negative, got {x}")));
        }
        if let Some(i) = full.chunks(s).position(|c| c.iter().all(|x| *x == 0.0)) {
            return Err(bad(format!("are all zero for split {i}")));
        }
        Ok(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::LlamaConfig;
    use crate::model::linear::{LinearId, Proj};
    use std::collections::HashMap;

    fn tiny_base() -> BaseShapes {
        BaseShapes::new(LlamaConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 1,
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

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 0.5).collect()
    }

    /// Writes a Poly adapter on q_proj (8x8) and v_proj (4x8) of layer 0.
    fn write_poly(dir: &Path, q: usize, s: usize, r: usize, nt: usize, logits: Option<Vec<f32>>) {
        let cfg = serde_json::json!({"peft_type": "POLY", "poly_type": "poly", "r": r, "n_tasks": nt,
            "n_skills": s, "n_splits": q, "target_modules": ["q_proj", "v_proj"]});
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let mut ts = HashMap::new();
        for (i, (m, out)) in [("self_attn.q_proj", 8usize), ("self_attn.v_proj", 4)].into_iter().enumerate() {
            let p = format!("base_model.model.model.layers.0.{m}");
            let dev = &Device::Cpu;
            let a = Tensor::from_vec(values(q * s * 8 / q * r, i as f32), (q, s, 8 / q, r), dev).unwrap();
            let b = Tensor::from_vec(values(q * s * r * out / q, 3.0 + i as f32), (q, s, r, out / q), dev).unwrap();
            let l = logits.clone().unwrap_or_else(|| values(nt * q * s, 7.0 + i as f32));
            ts.insert(format!("{p}.poly_lora_A"), a);
            ts.insert(format!("{p}.poly_lora_B"), b);
            ts.insert(format!("{p}.poly_router.module_logits"), Tensor::from_vec(l, (nt, q * s), dev).unwrap());
        }
        candle_core::safetensors::save(&ts, dir.join("adapter_model.safetensors")).unwrap();
    }

    /// PEFT's formula written out with loops: dense `[out, in]` delta for weights `w [q, s]`.
    fn reference(a: &Tensor, b: &Tensor, w: &[f32], r: usize) -> Vec<Vec<f32>> {
        let (q, s, din, _) = a.dims4().unwrap();
        let dout = b.dim(3).unwrap();
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut at = vec![vec![0f32; r]; q * din];
        let mut bt = vec![vec![0f32; q * dout]; r];
        for qi in 0..q {
            for si in 0..s {
                let wv = w[qi * s + si];
                for i in 0..din {
                    for k in 0..r {
                        at[qi * din + i][k] += wv * a[((qi * s + si) * din + i) * r + k];
                    }
                }
                for k in 0..r {
                    for j in 0..dout {
                        bt[k][qi * dout + j] += wv * b[((qi * s + si) * r + k) * dout + j];
                    }
                }
            }
        }
        (0..q * dout).map(|o| (0..q * din).map(|i| (0..r).map(|k| at[i][k] * bt[k][o]).sum::<f32>() / r as f32).collect()).collect()
    }

    fn assert_close(d: &MatrixDelta, want: &[Vec<f32>]) {
        let got = d.to_dense().unwrap().to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert_eq!(got.len(), want.len());
    }

    fn sig_norm(l: &[f32], q: usize, s: usize) -> Vec<f32> {
        let mut w: Vec<f32> = l.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
        for c in w.chunks_mut(s) {
            let t: f32 = c.iter().sum();
            c.iter_mut().for_each(|x| *x /= t + 1e-12);
        }
        assert_eq!(w.len(), q * s);
        w
    }

    #[test]
    fn one_split_two_skills_matches_hand_formula() {
        let dir = tempfile::tempdir().unwrap();
        // task 1 logits: [0, ln 3] -> sigmoid [0.5, 0.75] -> w = [0.4, 0.6]
        write_poly(dir.path(), 1, 2, 2, 2, Some(vec![5.0, -5.0, 0.0, 3f32.ln()]));
        let inv = load_peft_poly(dir.path(), &tiny_base()).unwrap();
        assert_eq!((inv.n_tasks(), inv.n_skills(), inv.n_splits(), inv.rank()), (2, 2, 1, 2));
        let d = inv.mix(&Routing::Task(1)).unwrap();
        assert_eq!(d.targets.len(), 2);
        let t = Target::Linear(LinearId { layer: 0, proj: Proj::Q });
        let layer = &inv.layers[&t];
        assert_close(&d.targets[&t], &reference(&layer.a, &layer.b, &[0.4, 0.6], 2));
    }

    #[test]
    fn splits_concatenate_inputs_and_outputs_like_peft() {
        let dir = tempfile::tempdir().unwrap();
        write_poly(dir.path(), 2, 3, 2, 3, None);
        let inv = load_peft_poly(dir.path(), &tiny_base()).unwrap();
        let d = inv.mix(&Routing::Task(2)).unwrap();
        for (t, layer) in &inv.layers {
            let w = sig_norm(&layer.logits[12..18], 2, 3);
            assert_close(&d.targets[t], &reference(&layer.a, &layer.b, &w, 2));
        }
        // Explicit weights equal to one layer's sigmoid give that layer's deltas.
        let t = Target::Linear(LinearId { layer: 0, proj: Proj::V });
        let raw: Vec<f32> = inv.layers[&t].logits[12..18].iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
        let e = inv.mix(&Routing::Weights(raw)).unwrap();
        let (x, y) = (e.targets[&t].to_dense().unwrap(), d.targets[&t].to_dense().unwrap());
        assert!((x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn shared_router_logits_equal_explicit_weights_and_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let logits = vec![0.3, -1.2, 0.5, 2.0, 0.0, -0.7];
        write_poly(dir.path(), 2, 3, 1, 1, Some(logits.clone()));
        let inv = load_peft_poly(dir.path(), &tiny_base()).unwrap();
        let by_task = inv.mix(&Routing::Task(0)).unwrap();
        let sig: Vec<f32> = logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
        let by_w = inv.mix(&Routing::Weights(sig)).unwrap();
        for (t, d) in &by_task.targets {
            let diff = (d.to_dense().unwrap() - by_w.targets[t].to_dense().unwrap()).unwrap();
            assert!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        }
        for t in [-1, 1] {
            let e = inv.mix(&Routing::Task(t)).unwrap_err();
            assert!(matches!(e, AdapterError::UnknownTask { task, n_tasks: 1, .. } if task == t), "{e}");
        }
        for w in [vec![1.0; 5], vec![1.0, -1.0, 1.0], vec![f32::NAN, 1.0, 1.0], vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]] {
            let e = inv.mix(&Routing::Weights(w)).unwrap_err();
            assert!(matches!(e, AdapterError::Composition(ref m) if m.contains("adapter_model.safetensors")), "{e}");
        }
        assert!(inv.mix(&Routing::Weights(vec![1.0, 0.0, 2.0])).is_ok());
    }

    #[test]
    fn names_parse_with_and_without_adapter_name() {
        let m = "model.layers.0.mlp.up_proj".to_string();
        assert_eq!(parse_poly_name("base_model.model.model.layers.0.mlp.up_proj.poly_lora_A"), Some((m.clone(), 0)));
        assert_eq!(parse_poly_name("base_model.model.model.layers.0.mlp.up_proj.poly_lora_B.default"), Some((m.clone(), 1)));
        assert_eq!(parse_poly_name("base_model.model.model.layers.0.mlp.up_proj.poly_router.module_logits"), Some((m.clone(), 2)));
        assert_eq!(parse_poly_name("base_model.model.model.layers.0.mlp.up_proj.poly_router.default.module_logits"), Some((m, 2)));
        assert_eq!(parse_poly_name("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"), None);
    }

    #[test]
    fn bad_files_name_the_file() {
        let base = tiny_base();
        let dir = tempfile::tempdir().unwrap();
        write_poly(dir.path(), 2, 3, 1, 1, None);
        let st = dir.path().join("adapter_model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_peft_poly(dir.path(), &base).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("adapter_model.safetensors"), "{e}");
        // 3 splits do not divide the 8 inputs.
        write_poly(dir.path(), 2, 3, 1, 1, None);
        let cfg = dir.path().join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg).unwrap().replace("\"n_splits\":2", "\"n_splits\":3");
        std::fs::write(&cfg, text).unwrap();
        let e = load_peft_poly(dir.path(), &base).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("n_splits=3"), "{e}");
        std::fs::write(&cfg, r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#).unwrap();
        let e = load_peft_poly(dir.path(), &base).unwrap_err();
        assert!(matches!(e, AdapterError::Unsupported { .. }) && e.to_string().contains("adapter_config.json"), "{e}");
    }
}
