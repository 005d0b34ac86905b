//! Harness of modserve's fuzz targets: each public target function writes the fuzz input where an
//! adapter loader reads it (a file in a per-thread scratch folder that also holds small valid
//! companion files) and calls the public loader. The property is "never panics": any `Err` is fine.
//!
//! Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`, nightly or `RUSTC_BOOTSTRAP=1`) and
//! by the stable regression replay `tests/fuzz_regressions.rs`, which includes this file with
//! `#[path]` and runs every input under `tests/fixtures/fuzz/<target>/`. It therefore uses only
//! crates the main package already depends on (candle-core, safetensors, serde_json, zip, and
//! tempfile from its dev-dependencies) and the public `modserve::adapters` API.
//!
//! Targets (each returns how many loaders accepted the input, which the seed tests check):
//! - [`safetensors_task_vector`]: bytes as a `.safetensors` file -> `dense::load_task_vector`,
//!   `dense::load_fisher`, `sft::load_sparse_safetensors`.
//! - [`peft_config`]: bytes as `adapter_config.json` next to a valid LoRA (q_proj/v_proj, r=2)
//!   -> `lora::load_peft_lora`, and next to a valid Poly inventory -> `poly::load_peft_poly` (+ mix).
//! - [`peft_bin`]: bytes as `data.pkl` of a torch.save zip `adapter_model.bin` next to a valid LoRA
//!   config -> `lora::load_peft_lora` (`pickle_guard`'s pre-scan, then candle's pickle reader).
//! - [`pickle_diff`]: bytes as `archive/data.pkl` of a zip with float / long / int storages
//!   -> `sft::load_pytorch_diff` (`pickle_guard`, then candle).
//!
//! The pickle targets also check that a pickle `modserve::adapters::formats::pickle_guard::scan`
//! refuses is refused by the loader (the loaders never hand candle bytes the guard has not accepted). Every
//! loader result goes through one counter that also records refusals, so [`run_explained`] can
//! show why an input was refused (the replay checks resource findings are refused for the right
//! reason).
//! - [`pickle_bin`]: bytes as the whole `pytorch_diff.bin` -> `sft::load_pytorch_diff`.
//! - [`merge_recipe`]: bytes as `recipe.json` in a folder of valid task vectors, Fisher files, a
//!   native sparse delta, a composable-sft diff and a LoRA folder -> `merge::load_recipe` then
//!   `merge::merge` with zero base weights.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use modserve::adapters::error::AdapterError;
use modserve::adapters::formats::poly::Routing;
use modserve::adapters::formats::{lora, pickle_guard, poly, sft, task_vector as dense};
use modserve::adapters::merge;
use modserve::adapters::target::{BaseShapes, Target};
use modserve::model::config::LlamaConfig;
use safetensors::Dtype;

/// Every target, by the name of its fuzz binary and of its folder under `tests/fixtures/fuzz/`.
pub const TARGETS: [&str; 6] = ["safetensors_task_vector", "peft_config", "peft_bin", "pickle_diff", "pickle_bin", "merge_recipe"];

/// Runs target `name` on `data`; None for an unknown name.
pub fn run(name: &str, data: &[u8]) -> Option<usize> {
    Some(match name {
        "safetensors_task_vector" => safetensors_task_vector(data),
        "peft_config" => peft_config(data),
        "peft_bin" => peft_bin(data),
        "pickle_diff" => pickle_diff(data),
        "pickle_bin" => pickle_bin(data),
        "merge_recipe" => merge_recipe(data),
        _ => return None,
    })
}

thread_local! {
    /// Refusals (`code: message`) of the loaders run on this thread since the last [`run_explained`].
    static REFUSALS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// [`run`], also returning the refusals of the loaders it ran (`code: message`, in call order).
pub fn run_explained(name: &str, data: &[u8]) -> Option<(usize, Vec<String>)> {
    REFUSALS.with(|r| r.borrow_mut().clear());
    let accepted = run(name, data);
    let refusals = REFUSALS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    accepted.map(|n| (n, refusals))
}

/// The tiny base: q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64, embeddings 64x32 (tied), two
/// layers.
pub fn tiny_base() -> BaseShapes {
    BaseShapes::new(LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        arch: Default::default(),
    })
}

// ---------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------

/// 1 for an accepted input; records a refusal for [`run_explained`].
fn ok<T>(r: &Result<T, AdapterError>) -> usize {
    if let Err(e) = r {
        REFUSALS.with(|v| v.borrow_mut().push(format!("{}: {e}", e.code())));
    }
    r.is_ok() as usize
}

/// A pickle the guard refuses must be refused by the loader that read it.
fn guard_agrees<T>(pickle: &[u8], r: &Result<T, AdapterError>) {
    if let Err(refusal) = pickle_guard::scan(pickle) {
        assert!(r.is_err(), "a loader accepted a pickle the guard refuses ({refusal})");
    }
}

/// Bytes as a safetensors file: dense task vector, Fisher file and native sparse delta loaders.
pub fn safetensors_task_vector(data: &[u8]) -> usize {
    let base = tiny_base();
    let p = scratch().join("input.safetensors");
    write(&p, data);
    let tv = dense::load_task_vector(&p, &base);
    if let Ok(d) = &tv {
        d.validate(&base, &p).expect("a loaded task vector validates");
    }
    let fisher = dense::load_fisher(&p, &base);
    let sparse = sft::load_sparse_safetensors(&p, &base);
    if let Ok(d) = &sparse {
        d.validate(&base, &p).expect("a loaded sparse delta validates");
    }
    ok(&tv) + ok(&fisher) + ok(&sparse)
}

/// Bytes as `adapter_config.json` of a LoRA folder and of a Poly folder (valid weight files).
pub fn peft_config(data: &[u8]) -> usize {
    let base = tiny_base();
    let root = scratch();
    let (lora_dir, poly_dir) = (root.join("lora"), root.join("poly"));
    write(&lora_dir.join("adapter_config.json"), data);
    write(&poly_dir.join("adapter_config.json"), data);
    let l = lora::load_peft_lora(&lora_dir, &base);
    if let Ok((d, _)) = &l {
        d.clone().into_host(false).expect("host layout of loaded factors");
        d.clone().into_host(true).expect("compact host layout of loaded factors");
    }
    let p = poly::load_peft_poly(&poly_dir, &base);
    let mut mixed = 0;
    if let Ok(inv) = &p {
        let last = inv.n_tasks() as i64 - 1;
        for routing in [Routing::Task(0), Routing::Task(last), Routing::Weights(vec![1.0; inv.n_skills()])] {
            mixed += ok(&inv.mix(&routing));
        }
    }
    ok(&l) + ok(&p) + mixed
}

/// Bytes as the `data.pkl` of a PEFT `adapter_model.bin` (torch.save zip; storages `0`..`2`),
/// next to a valid LoRA config selecting layer 0's q_proj with r=2.
pub fn peft_bin(data: &[u8]) -> usize {
    let base = tiny_base();
    let dir = scratch().join("lora_bin");
    write(&dir.join("adapter_model.bin"), &torch_zip(data));
    let r = lora::load_peft_lora(&dir, &base);
    guard_agrees(data, &r);
    ok(&r)
}

/// Bytes as the `data.pkl` of a composable-sft `pytorch_diff.bin` (storages `0`..`2`).
pub fn pickle_diff(data: &[u8]) -> usize {
    let base = tiny_base();
    let p = scratch().join("pickle_diff.bin");
    write(&p, &torch_zip(data));
    let r = sft::load_pytorch_diff(&p, &base);
    guard_agrees(data, &r);
    ok(&r)
}

/// Bytes as a whole `pytorch_diff.bin`.
pub fn pickle_bin(data: &[u8]) -> usize {
    let base = tiny_base();
    let p = scratch().join("pickle_bin.bin");
    write(&p, data);
    ok(&sft::load_pytorch_diff(&p, &base))
}

/// Bytes as `recipe.json` in the merge folder; a loaded recipe is merged over zero base weights
/// (counts only a successful merge).
pub fn merge_recipe(data: &[u8]) -> usize {
    let base = tiny_base();
    let p = scratch().join("merge").join("recipe.json");
    write(&p, data);
    let recipe = match merge::load_recipe(&p) {
        Ok(r) => r,
        Err(e) => return ok::<()>(&Err(e)),
    };
    let zeros = |t: Target| -> Result<Tensor, AdapterError> {
        let (r, c) = tiny_base().shape(t).ok_or_else(|| AdapterError::Tensor(format!("no base weight {}", t.hf_name())))?;
        Ok(Tensor::zeros((r, c), DType::F32, &Device::Cpu)?)
    };
    let out = merge::merge(&recipe, &zeros, &base);
    if let Ok(o) = &out {
        o.deltas.validate(&base, &p).expect("a merge result validates");
        assert_eq!(o.report.tensors, o.deltas.targets.len(), "merge report counts its tensors");
    }
    ok(&out)
}

// ---------------------------------------------------------------------------------------------
// Scratch folder with the fixed companion files
// ---------------------------------------------------------------------------------------------

thread_local! {
    static SCRATCH: tempfile::TempDir = {
        let d = tempfile::Builder::new().prefix("modserve-fuzz-").tempdir().expect("create a scratch folder");
        write_companions(d.path());
        d
    };
}

/// This thread's scratch folder (created with its companion files on first use).
pub fn scratch() -> PathBuf {
    SCRATCH.with(|d| d.path().to_path_buf())
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("harness cannot write {}: {e}", path.display()))
}

/// The valid files every target's input sits next to.
fn write_companions(root: &Path) {
    for sub in ["lora", "poly", "lora_bin", "merge", "merge/lora", "merge/task"] {
        std::fs::create_dir_all(root.join(sub)).expect("scratch sub-folder");
    }
    let lora = lora_safetensors();
    write(&root.join("lora/adapter_model.safetensors"), &lora);
    write(&root.join("poly/adapter_model.safetensors"), &poly_safetensors());
    write(&root.join("lora_bin/adapter_config.json"), LORA_BIN_CONFIG.as_bytes());
    let m = root.join("merge");
    write(&m.join("lora/adapter_model.safetensors"), &lora);
    write(&m.join("lora/adapter_config.json"), LORA_CONFIG.as_bytes());
    write(&m.join("tv_a.safetensors"), &safetensors_f32(&[(K0, vals(512, 0.0)), (V1, vals(512, 1.0))], None));
    write(&m.join("tv_b.safetensors"), &safetensors_f32(&[(K0, vals(512, 2.0))], None));
    write(&m.join("task/task_vector.safetensors"), &safetensors_f32(&[(Q1, vals(1024, 3.0))], None));
    for (name, seed) in [("fisher_a", 4.0), ("fisher_b", 5.0), ("fisher_base", 6.0)] {
        let f = |s: f32| vals(512, s).into_iter().map(f32::abs).collect::<Vec<_>>();
        write(&m.join(format!("{name}.safetensors")), &safetensors_f32(&[(K0, f(seed)), (V1, f(seed + 0.5))], None));
    }
    write(&m.join("sparse.safetensors"), &sparse_safetensors(K0, &[1, 40, 511], &[0.5, -1.0, 2.0]));
    write(&m.join("diff.bin"), &torch_zip(&diff_pickle(&[DiffParam::k0_list(&[3, 17, 100])])));
}

// ---------------------------------------------------------------------------------------------
// Valid-file builders (companions and seeds)
// ---------------------------------------------------------------------------------------------

pub const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
pub const Q1: &str = "model.layers.1.self_attn.q_proj.weight";
pub const K0: &str = "model.layers.0.self_attn.k_proj.weight";
pub const V1: &str = "model.layers.1.self_attn.v_proj.weight";
pub const EMBED: &str = "model.embed_tokens.weight";

/// LoRA config matching [`lora_safetensors`].
pub const LORA_CONFIG: &str = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}"#;
/// LoRA config of the `peft_bin` folder: layer 0's q_proj only.
pub const LORA_BIN_CONFIG: &str =
    r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]}"#;
/// Poly config matching [`poly_safetensors`].
pub const POLY_CONFIG: &str = r#"{"peft_type": "POLY", "poly_type": "poly", "r": 2, "n_tasks": 2, "n_skills": 2, "n_splits": 2, "target_modules": ["q_proj", "v_proj"]}"#;

/// Deterministic small finite values.
pub fn vals(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.37 + seed).sin() * 0.5).collect()
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The `(rows, cols)` of an HF parameter in the tiny base.
fn shape_of(name: &str) -> Vec<usize> {
    let t = Target::from_hf_name(name).expect("a known parameter name");
    let (r, c) = tiny_base().shape(t).expect("a tiny-base parameter");
    vec![r, c]
}

/// A safetensors file of raw tensors `(name, dtype, shape, bytes)`.
pub fn safetensors_raw(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], md: Option<HashMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*dt, s.clone(), b).expect("valid view")))
        .collect();
    safetensors::serialize(views, md).expect("serialize safetensors")
}

/// A safetensors file of f32 tensors named by HF parameter, each of its tiny-base shape.
pub fn safetensors_f32(tensors: &[(&str, Vec<f32>)], md: Option<HashMap<String, String>>) -> Vec<u8> {
    let raw: Vec<_> = tensors.iter().map(|(n, v)| (*n, Dtype::F32, shape_of(n), le_f32(v))).collect();
    safetensors_raw(&raw, md)
}

/// A native `modserve-sparse-v1` file with one parameter (U32 row-major flat indices).
pub fn sparse_safetensors(name: &str, idx: &[u32], values: &[f32]) -> Vec<u8> {
    let shape = shape_of(name);
    let md = HashMap::from([
        ("format".to_string(), sft::SPARSE_FORMAT.to_string()),
        ("shapes".to_string(), serde_json::json!({ name: shape }).to_string()),
    ]);
    let ib: Vec<u8> = idx.iter().flat_map(|x| x.to_le_bytes()).collect();
    safetensors_raw(
        &[
            (&format!("{name}.indices"), Dtype::U32, vec![idx.len()], ib),
            (&format!("{name}.values"), Dtype::F32, vec![values.len()], le_f32(values)),
        ],
        Some(md),
    )
}

fn tensor_bytes(ts: &[(String, Tensor)]) -> Vec<u8> {
    let map: HashMap<String, Tensor> = ts.iter().cloned().collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("t.safetensors");
    candle_core::safetensors::save(&map, &p).expect("save safetensors");
    std::fs::read(&p).expect("read back")
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// LoRA factors (r=2) for q_proj and v_proj of both layers, PEFT names.
pub fn lora_safetensors() -> Vec<u8> {
    let mut ts = Vec::new();
    for layer in 0..2 {
        for (i, (proj, out)) in [("q_proj", 32usize), ("v_proj", 16)].into_iter().enumerate() {
            let p = format!("base_model.model.model.layers.{layer}.self_attn.{proj}");
            let s = (layer * 2 + i) as f32;
            ts.push((format!("{p}.lora_A.weight"), tensor(vals(2 * 32, s), &[2, 32])));
            ts.push((format!("{p}.lora_B.weight"), tensor(vals(out * 2, s + 9.0), &[out, 2])));
        }
    }
    tensor_bytes(&ts)
}

/// Poly inventory (r=2, 2 tasks, 2 skills, 2 splits) for q_proj and v_proj of both layers.
pub fn poly_safetensors() -> Vec<u8> {
    let (q, s, r, nt) = (2usize, 2usize, 2usize, 2usize);
    let mut ts = Vec::new();
    for layer in 0..2 {
        for (i, (proj, out)) in [("q_proj", 32usize), ("v_proj", 16)].into_iter().enumerate() {
            let p = format!("base_model.model.model.layers.{layer}.self_attn.{proj}");
            let seed = (layer * 2 + i) as f32;
            ts.push((format!("{p}.poly_lora_A"), tensor(vals(q * s * 16 * r, seed), &[q, s, 16, r])));
            ts.push((format!("{p}.poly_lora_B"), tensor(vals(q * s * r * out / q, seed + 3.0), &[q, s, r, out / q])));
            ts.push((format!("{p}.poly_router.module_logits"), tensor(vals(nt * q * s, seed + 7.0), &[nt, q * s])));
        }
    }
    tensor_bytes(&ts)
}

/// Float32 storage `0` (64 values), int64 storage `1` and int32 storage `2` (16 unit steps each)
/// of every torch zip the harness builds.
fn storages() -> [(&'static str, Vec<u8>); 3] {
    [
        ("0", le_f32(&vals(64, 0.25))),
        ("1", (0..16i64).flat_map(|i| (1 + i % 3).to_le_bytes()).collect()),
        ("2", (0..16i32).flat_map(|i| (1 + i % 3).to_le_bytes()).collect()),
    ]
}

/// A torch.save zip: `archive/data.pkl` = `pkl` plus the fixed [`storages`].
pub fn torch_zip(pkl: &[u8]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).expect("zip entry");
    z.write_all(pkl).expect("zip write");
    for (key, bytes) in storages() {
        z.start_file(format!("archive/data/{key}"), opts).expect("zip entry");
        z.write_all(&bytes).expect("zip write");
    }
    z.finish().expect("zip finish").into_inner()
}

/// A tiny pickle (protocol 2) writer for the opcodes candle's reader knows.
pub struct Pickle(pub Vec<u8>);

#[allow(clippy::new_without_default)]
impl Pickle {
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }
    pub fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    pub fn int(&mut self, v: i32) -> &mut Self {
        self.0.push(b'J');
        self.op(&v.to_le_bytes())
    }
    pub fn long(&mut self, v: i64) -> &mut Self {
        self.0.extend([0x8a, 8]);
        self.op(&v.to_le_bytes())
    }
    pub fn global(&mut self, module: &str, class: &str) -> &mut Self {
        self.0.push(b'c');
        self.op(format!("{module}\n{class}\n").as_bytes())
    }
    /// `(int, ...)` tuple.
    pub fn int_tuple(&mut self, v: &[i64]) -> &mut Self {
        self.op(b"(");
        v.iter().for_each(|x| {
            self.int(*x as i32);
        });
        self.op(b"t")
    }
    /// `torch._utils._rebuild_tensor_v2(("storage", torch.<storage>, key, "cpu", numel), offset,
    /// size, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, storage: &str, key: &str, numel: i32, offset: i32, size: &[i64], stride: &[i64]) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.str("storage").global("torch", storage).str(key).str("cpu").int(numel).op(b"tQ");
        self.int(offset).int_tuple(size).int_tuple(stride).op(&[0x89]);
        self.global("collections", "OrderedDict").op(b")Rt").op(b"R")
    }
    pub fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

/// How a composable-sft parameter pickles its `index_steps`.
pub enum Steps {
    List(Vec<i32>),
    /// A 1-D tensor on storage `1` (int64) or `2` (int32) with (offset, len, stride).
    Tensor {
        storage: &'static str,
        key: &'static str,
        offset: i32,
        len: i64,
        stride: i64,
    },
}

/// One `body` entry of a composable-sft diff; values are storage `0` (64 floats).
pub struct DiffParam {
    pub name: &'static str,
    pub size: [i64; 2],
    pub steps: Steps,
    pub v_offset: i32,
    pub v_len: i64,
    pub v_stride: i64,
}

impl DiffParam {
    pub fn k0_list(steps: &[i32]) -> Self {
        let n = steps.len() as i64;
        Self { name: K0, size: [16, 32], steps: Steps::List(steps.to_vec()), v_offset: 0, v_len: n, v_stride: 1 }
    }
}

/// `{"body": {name: {"size": torch.Size(size), "index_steps": ..., "values": tensor}}}`.
pub fn diff_pickle(params: &[DiffParam]) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b"}(").str("body").op(b"}(");
    for prm in params {
        p.str(prm.name).op(b"}(").str("size").global("torch", "Size");
        p.int(prm.size[0] as i32).int(prm.size[1] as i32).op(&[0x86, 0x85, b'R']);
        p.str("index_steps");
        match &prm.steps {
            Steps::List(v) => {
                p.op(b"](");
                v.iter().for_each(|s| {
                    p.int(*s);
                });
                p.op(b"e");
            }
            Steps::Tensor { storage, key, offset, len, stride } => {
                p.tensor(storage, key, 16, *offset, &[*len], &[*stride]);
            }
        }
        p.str("values").tensor("FloatStorage", "0", 64, prm.v_offset, &[prm.v_len], &[prm.v_stride]);
        p.op(b"u");
    }
    p.op(b"uu").stop()
}

/// A PEFT `adapter_model.bin` state dict pickle: `{name: tensor}` over storage `0`.
pub fn state_dict_pickle(tensors: &[(&str, &[i64], &[i64], i32)]) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b"}(");
    for (name, size, stride, offset) in tensors {
        p.str(name).tensor("FloatStorage", "0", 64, *offset, size, stride);
    }
    p.op(b"u").stop()
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// The seed inputs of `target`: `(file name, bytes)`. Names starting `seed-ok-` are inputs some
/// loader of the target accepts (the regression test checks it); `seed-err-` ones are refused.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let s = |name: &str, b: Vec<u8>| (name.to_string(), b);
    match target {
        "safetensors_task_vector" => {
            let f16: Vec<u8> = (0..512u32).flat_map(|i| (if i % 2 == 0 { 0x3C00u16 } else { 0xC100u16 }).to_le_bytes()).collect();
            let bf16: Vec<u8> = (0..512u32).flat_map(|i| (if i % 3 == 0 { 0x3F80u16 } else { 0x0000u16 }).to_le_bytes()).collect();
            let f64s: Vec<u8> = vals(512, 1.0).iter().flat_map(|x| (*x as f64).to_le_bytes()).collect();
            let md = HashMap::from([("note".to_string(), "seed".to_string())]);
            let mut neg = vals(512, 0.0);
            neg.iter_mut().for_each(|x| *x = x.abs());
            vec![
                s("seed-ok-dense-f32-k0", safetensors_f32(&[(K0, vals(512, 0.0))], None)),
                s("seed-ok-dense-two-with-metadata", safetensors_f32(&[(K0, vals(512, 0.0)), (V1, vals(512, 1.0))], Some(md))),
                s("seed-ok-fisher-k0", safetensors_f32(&[(K0, neg)], None)),
                s("seed-ok-f16-v1", safetensors_raw(&[(V1, Dtype::F16, vec![16, 32], f16)], None)),
                s("seed-ok-bf16-k0", safetensors_raw(&[(K0, Dtype::BF16, vec![16, 32], bf16)], None)),
                s("seed-ok-f64-v1", safetensors_raw(&[(V1, Dtype::F64, vec![16, 32], f64s)], None)),
                s("seed-ok-sparse-k0", sparse_safetensors(K0, &[0, 33, 511], &[1.0, -2.0, 0.5])),
                s("seed-ok-empty", safetensors_raw(&[], None)),
                s("seed-err-shape", safetensors_raw(&[(K0, Dtype::F32, vec![32, 16], le_f32(&vals(512, 0.0)))], None)),
                s("seed-err-i32", safetensors_raw(&[(K0, Dtype::I32, vec![16, 32], vec![0; 2048])], None)),
            ]
        }
        "peft_config" => vec![
            s("seed-ok-lora", LORA_CONFIG.as_bytes().to_vec()),
            s("seed-ok-poly", POLY_CONFIG.as_bytes().to_vec()),
            s(
                "seed-ok-lora-patterns",
                br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj", "v_proj", "k_proj"], "exclude_modules": ["k_proj"], "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "q_proj": 2, "v_proj": 2}, "alpha_pattern": {"v_proj": 3.5}, "layers_to_transform": [0, 1], "layers_pattern": "layers", "fan_in_fan_out": false, "use_dora": false, "modules_to_save": null, "lora_bias": false}"#.to_vec(),
            ),
            s("seed-ok-lora-all-linear-excluded", br#"{"peft_type": "LORA", "r": 2, "target_modules": "all-linear", "exclude_modules": ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}"#.to_vec()),
            s("seed-ok-poly-defaults", br#"{"peft_type": "POLY", "r": 2, "n_tasks": 2, "n_skills": 2, "n_splits": 2, "target_modules": ["self_attn.q_proj", "self_attn.v_proj"], "exclude_modules": []}"#.to_vec()),
            s("seed-err-layers", br#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1, "layers_pattern": ["h"]}"#.to_vec()),
            s("seed-err-regex", br#"{"peft_type": "LORA", "target_modules": ".*\\.(q|v)_proj", "use_dora": true}"#.to_vec()),
        ],
        "peft_bin" => {
            let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
            let b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
            vec![
                s("seed-ok-state-dict", state_dict_pickle(&[(a, &[2, 32], &[32, 1], 0), (b, &[32, 2], &[2, 1], 0)])),
                // B stored transposed (Fortran order) and A with an offset.
                s("seed-ok-strided", state_dict_pickle(&[(a, &[2, 32], &[32, 1], 0), (b, &[32, 2], &[1, 32], 0)])),
                s("seed-err-rank", state_dict_pickle(&[(a, &[1, 32], &[32, 1], 32), (b, &[32, 1], &[1, 1], 0)])),
            ]
        }
        "pickle_diff" => {
            let tensor_steps = |storage: &'static str, key: &'static str| DiffParam {
                name: V1,
                size: [16, 32],
                steps: Steps::Tensor { storage, key, offset: 2, len: 5, stride: 2 },
                v_offset: 10,
                v_len: 5,
                v_stride: 3,
            };
            let embed = DiffParam { name: EMBED, size: [64, 32], steps: Steps::List(vec![0, 64, 1, 1900]), v_offset: 60, v_len: 4, v_stride: 1 };
            vec![
                s("seed-ok-list-steps", diff_pickle(&[DiffParam::k0_list(&[0, 5, 7, 100])])),
                s("seed-ok-long-steps", diff_pickle(&[tensor_steps("LongStorage", "1")])),
                s("seed-ok-int-steps", diff_pickle(&[tensor_steps("IntStorage", "2")])),
                s("seed-ok-two-params", diff_pickle(&[DiffParam::k0_list(&[1, 1, 1]), embed])),
                s("seed-err-outside", diff_pickle(&[DiffParam::k0_list(&[511, 1])])),
                s("seed-ok-empty-body", Pickle::new().op(b"}(").str("body").op(b"}u").stop()),
            ]
        }
        "pickle_bin" => seeds("pickle_diff")
            .into_iter()
            .map(|(n, b)| (n, torch_zip(&b)))
            .chain([s("seed-err-bare-pickle", diff_pickle(&[DiffParam::k0_list(&[0])]))])
            .collect(),
        "merge_recipe" => {
            let j = |v: serde_json::Value| serde_json::to_vec_pretty(&v).expect("json");
            use serde_json::json;
            vec![
                s("seed-ok-task-arithmetic", j(json!({"method": "task_arithmetic", "description": "seed", "components": [
                    {"task_vector": "tv_a.safetensors", "lambda": 0.5}, {"task_vector": "tv_b.safetensors", "negate": true}]}))),
                s("seed-ok-linear-mixed-kinds", j(json!({"method": "linear", "components": [
                    {"task_vector": "sparse.safetensors", "lambda": 1.0}, {"task_vector": "diff.bin", "lambda": 2.0},
                    {"task_vector": "lora", "lambda": 0.5}, {"task_vector": "task"}]}))),
                s("seed-ok-ties-top-k", j(json!({"method": "ties", "density": 0.5, "components": [
                    {"task_vector": "tv_a.safetensors"}, {"task_vector": "./tv_b.safetensors", "lambda": -1.0}],
                    "compress": {"top_k": 0.25}}))),
                s("seed-ok-dare-low-rank", j(json!({"method": "dare_linear", "density": 0.7, "seed": 3, "components": [
                    {"task_vector": "tv_a.safetensors"}, {"task_vector": "lora"}], "compress": {"low_rank": 2}}))),
                s("seed-ok-fisher", j(json!({"method": "fisher", "fisher_floor": 1e-4, "components": [
                    {"task_vector": "tv_a.safetensors", "fisher": "fisher_a.safetensors"},
                    {"task_vector": "tv_b.safetensors", "fisher": "fisher_b.safetensors", "lambda": 2.0}]}))),
                s("seed-ok-ewr", j(json!({"fisher_base": "fisher_base.safetensors", "lambda_base": 2.0, "formula": "ewr", "components": [
                    {"task_vector": "tv_a.safetensors", "fisher": "fisher_a.safetensors", "negate": true},
                    {"task_vector": "diff.bin", "fisher": "fisher_b.safetensors", "lambda": 0.5}]}))),
                s("seed-err-escape", j(json!({"method": "linear", "components": [{"task_vector": "../merge/tv_a.safetensors"}]}))),
                s("seed-err-not-a-delta", j(json!({"method": "task_arithmetic", "components": [{"task_vector": "recipe.json"}, {"task_vector": "."}]}))),
            ]
        }
        _ => vec![],
    }
}
