//! Sparse fine-tunings and merges on real files: composable-sft `pytorch_diff.bin` (hand-built
//! archives for the index convention and every refusal; the parity kit's `sft_lang` / `sft_task`
//! with counts and values read from the files by a Python zip/pickle inspection, not by our code),
//! the native sparse format round trip, and the kit's EWR merge reproduced from the reference
//! model's dequantized weights. Fixtures are copies under tests/fixtures/parity.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use modserve::adapters::error::AdapterError;
use modserve::adapters::formats::sft::{convert_pytorch_diff, load_pytorch_diff, load_sparse_safetensors, ConvertSummary};
use modserve::adapters::merge::{load_delta, load_recipe, merge, MergeMethod};
use modserve::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use modserve::adapters::target::{BaseShapes, Target};
use modserve::kernels::sparse_layout::SparseMatrix;
use modserve::model::config::LlamaConfig;
use modserve::model::linear::{LinearId, Proj, WeightMode};
use modserve::model::load::{load, LoadOptions};

fn config(vocab: usize, hidden: usize, ff: usize, layers: usize, heads: usize, kv: usize, hd: usize) -> BaseShapes {
    BaseShapes::new(LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ff,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hd,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![2],
        arch: Default::default(),
    })
}

/// q_proj 8x8, k/v 4x8, two layers.
fn tiny_base() -> BaseShapes {
    config(16, 8, 12, 2, 2, 1, 4)
}

fn smollm2_base() -> BaseShapes {
    config(49152, 576, 1536, 30, 9, 3, 64)
}

fn lin(layer: usize, proj: Proj) -> Target {
    Target::Linear(LinearId { layer, proj })
}

fn sparse(d: &ModuleDeltas, t: Target) -> &SparseMatrix {
    match d.targets.get(&t) {
        Some(MatrixDelta::Sparse(s)) => s,
        other => panic!("{t:?}: expected a sparse delta, got {other:?}"),
    }
}

/// Value at (row, col) of a sparse matrix (0 when absent).
fn at(s: &SparseMatrix, row: usize, col: usize) -> f32 {
    let (cols, vals) = s.row(row);
    cols.iter().position(|&c| c as usize == col).map_or(0.0, |i| vals[i])
}

// ----- a minimal torch.save writer (pickle protocol 2 in a zip), as composable-sft produces -----

struct Param<'a> {
    name: &'a str,
    size: [i32; 2],
    steps: &'a [i32],
    storage: &'a str, // FloatStorage, DoubleStorage, ...
    data: Vec<u8>,
    offset: i32,
    numel: i32,
    len: i32,
}

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
}

fn int(p: &mut Vec<u8>, v: i32) {
    p.push(b'J');
    p.extend(v.to_le_bytes());
}

fn global(p: &mut Vec<u8>, module: &str, class: &str) {
    p.push(b'c');
    p.extend(format!("{module}\n{class}\n").as_bytes());
}

fn pickle(params: &[Param<'_>]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    unicode(&mut p, "body");
    p.extend([b'}', b'(']);
    for (i, prm) in params.iter().enumerate() {
        unicode(&mut p, prm.name);
        p.extend([b'}', b'(']);
        unicode(&mut p, "size");
        global(&mut p, "torch", "Size");
        int(&mut p, prm.size[0]);
        int(&mut p, prm.size[1]);
        p.extend([0x86, 0x85, b'R']);
        unicode(&mut p, "index_steps");
        p.extend([b']', b'(']);
        prm.steps.iter().for_each(|s| int(&mut p, *s));
        p.push(b'e');
        unicode(&mut p, "values");
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.push(b'(');
        p.push(b'(');
        unicode(&mut p, "storage");
        global(&mut p, "torch", prm.storage);
        unicode(&mut p, &i.to_string());
        unicode(&mut p, "cpu");
        int(&mut p, prm.numel);
        p.extend([b't', b'Q']);
        int(&mut p, prm.offset);
        int(&mut p, prm.len);
        p.push(0x85);
        int(&mut p, 1);
        p.extend([0x85, 0x89]);
        global(&mut p, "collections", "OrderedDict");
        p.extend([b')', b'R', b't', b'R']);
        p.push(b'u');
    }
    p.extend([b'u', b'u', b'.']);
    p
}

fn write_diff(path: &Path, params: &[Param<'_>], pkl: Option<Vec<u8>>) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(&pkl.unwrap_or_else(|| pickle(params))).unwrap();
    for (i, prm) in params.iter().enumerate() {
        z.start_file(format!("archive/data/{i}"), opts).unwrap();
        z.write_all(&prm.data).unwrap();
    }
    z.finish().unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn k0_param<'a>(steps: &'a [i32], values: &[f32]) -> Param<'a> {
    let n = values.len() as i32;
    Param {
        name: "model.layers.0.self_attn.k_proj.weight",
        size: [4, 8],
        steps,
        storage: "FloatStorage",
        data: f32s(values),
        offset: 0,
        numel: n,
        len: n,
    }
}

#[test]
fn pytorch_diff_indices_run_first_dimension_fastest() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pytorch_diff.bin");
    // k_proj is [4, 8]. Steps 1, 4, 6 -> flat 1, 5, 11; row = flat % 4, col = flat / 4:
    // (1, 0), (1, 1), (3, 2). Values come from storage [9, 1, 2, 3, 9] at offset 1.
    let mut prm = k0_param(&[1, 4, 6], &[9.0, 1.0, 2.0, 3.0, 9.0]);
    (prm.offset, prm.len) = (1, 3);
    write_diff(&p, &[prm], None);
    let d = load_pytorch_diff(&p, &tiny_base()).unwrap();
    let s = sparse(&d, lin(0, Proj::K));
    assert_eq!(s.nnz(), 3);
    assert_eq!((at(s, 1, 0), at(s, 1, 1), at(s, 3, 2)), (1.0, 2.0, 3.0));
    let dense = s.to_dense();
    assert_eq!((dense[8], dense[9], dense[26]), (1.0, 2.0, 3.0));
}

#[test]
fn pytorch_diff_refusals_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pytorch_diff.bin");
    let base = tiny_base();
    let check = |prm: Param<'_>, pkl: Option<Vec<u8>>, want: &str| -> AdapterError {
        write_diff(&p, &[prm], pkl);
        let e = load_pytorch_diff(&p, &base).unwrap_err();
        assert!(e.to_string().contains("pytorch_diff.bin") && e.to_string().contains(want), "{want}: {e}");
        e
    };
    // 32 elements: flat 32 is outside.
    let e = check(k0_param(&[30, 2], &[1.0, 1.0]), None, "outside");
    assert!(matches!(e, AdapterError::Malformed { .. }));
    let mut prm = k0_param(&[1], &[1.0]);
    prm.size = [8, 4];
    assert!(matches!(check(prm, None, "shape"), AdapterError::Shape { .. }));
    let mut prm = k0_param(&[1], &[1.0]);
    prm.name = "model.layers.7.self_attn.k_proj.weight";
    assert!(matches!(check(prm, None, "layers.7"), AdapterError::UnknownTarget { .. }));
    let mut prm = k0_param(&[1], &[1.0]);
    prm.name = "model.norm.weight";
    assert!(matches!(check(prm, None, "model.norm.weight"), AdapterError::UnknownTarget { .. }));
    let mut prm = k0_param(&[1], &[1.0]);
    (prm.storage, prm.data) = ("DoubleStorage", 1f64.to_le_bytes().to_vec());
    assert!(matches!(check(prm, None, "float32"), AdapterError::Unsupported { .. }));
    assert!(matches!(check(k0_param(&[1], &[f32::NAN]), None, "NaN"), AdapterError::NonFinite { .. }));
    let mut prm = k0_param(&[1, 1], &[1.0, 2.0]);
    prm.data.truncate(4);
    assert!(matches!(check(prm, None, "truncated"), AdapterError::Malformed { .. }));
    let e = check(k0_param(&[1], &[1.0]), Some(b"\x80\x02}q\x00(X\x04\x00\x00\x00bo".to_vec()), "pickle");
    assert!(matches!(e, AdapterError::Malformed { .. }));
    // A truncated archive.
    write_diff(&p, &[k0_param(&[1], &[1.0])], None);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_pytorch_diff(&p, &base).unwrap_err();
    assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("pytorch_diff.bin"), "{e}");
}

#[test]
fn kit_sft_lang_matches_the_file() {
    let d = load_pytorch_diff(&common::fixture("parity/sft_lang/pytorch_diff.bin"), &smollm2_base()).unwrap();
    // Expectations from a Python zipfile + pickle inspection of the file (row-major (index, value)).
    assert_eq!(d.targets.len(), 211);
    let nnz = |t| sparse(&d, t).nnz();
    assert_eq!(d.targets.keys().map(|t| nnz(*t)).sum::<usize>(), 587_293);
    let e = sparse(&d, Target::Embedding);
    assert_eq!(e.nnz(), 56_623);
    assert_eq!(at(e, 0, 193) as f64, -0.060573648661375046); // flat row-major 193
    assert_eq!(at(e, 49151, 415) as f64, -0.006736934185028076); // row-major 28311391
    let sum: f64 = e.values().iter().map(|v| *v as f64).sum();
    assert!((sum - 80.47744418913135).abs() < 1e-6, "{sum}");
    let q = sparse(&d, lin(0, Proj::Q));
    assert_eq!(q.nnz(), 1658);
    assert_eq!(at(q, 0, 210) as f64, 0.1183842197060585);
    assert!((q.values().iter().map(|v| *v as f64).sum::<f64>() + 2.1782718545291573).abs() < 1e-6);
    let down = sparse(&d, lin(29, Proj::Down));
    assert_eq!(down.nnz(), 4423);
    assert_eq!((at(down, 0, 66) as f64, at(down, 575, 1339) as f64), (0.42543825507164, 0.3304571509361267));
    let gate = sparse(&d, lin(15, Proj::Gate));
    assert_eq!((gate.nnz(), at(gate, 0, 361) as f64), (4423, 0.04689214006066322));
    assert!((gate.values().iter().map(|v| *v as f64).sum::<f64>() - 17.98271327758266).abs() < 1e-6);
}

#[test]
fn kit_sft_task_matches_the_file_and_converts_losslessly() {
    let base = smollm2_base();
    let src = common::fixture("parity/sft_task/pytorch_diff.bin");
    let d = load_pytorch_diff(&src, &base).unwrap();
    assert_eq!(d.targets.len(), 140); // layers 10..29 x 7 projections, no embeddings
    assert!(!d.targets.contains_key(&Target::Embedding) && !d.targets.contains_key(&lin(9, Proj::Q)));
    let q = sparse(&d, lin(10, Proj::Q));
    assert_eq!((q.nnz(), at(q, 0, 43) as f64), (1658, 0.26486116647720337));
    let down = sparse(&d, lin(29, Proj::Down));
    assert_eq!((down.nnz(), at(down, 0, 163) as f64), (4423, 1.3892138004302979));

    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("sparse_delta.safetensors");
    let summary = convert_pytorch_diff(&src, &dst, &base).unwrap();
    assert_eq!(summary, ConvertSummary { params: 140, nnz: 353_780 });
    let back = load_sparse_safetensors(&dst, &base).unwrap();
    assert_eq!(back.targets.len(), 140);
    for (t, m) in &d.targets {
        let MatrixDelta::Sparse(m) = m else { unreachable!() };
        assert_eq!(sparse(&back, *t), m, "{t:?}");
    }
    // A module folder holding the native file loads through the generic loader too.
    assert_eq!(load_delta(dir.path(), &base).unwrap().targets.len(), 140);
}

/// A model folder holding only SmolLM2-135M's `config.json` (the shapes of [`smollm2_base`]).
fn smollm2_config_dir(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn convert_sft_cli_writes_a_module_with_the_same_deltas() {
    let base = smollm2_base();
    let src = common::fixture("parity/sft_lang/pytorch_diff.bin");
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_config_dir(&tmp.path().join("model"));
    let convert = |input: &Path, out: &Path, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_modserve"))
            .arg("convert-sft")
            .args(["--input".as_ref(), input.as_os_str(), "--output".as_ref(), out.as_os_str(), "--model".as_ref(), model.as_os_str()])
            .args(extra)
            .output()
            .unwrap()
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    let out = tmp.path().join("sft_lang_native");
    let o = convert(&src, &out, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("211 parameters, 587293 non-zeros"), "{}", text(&o.stdout));
    assert_eq!(file_names(&out), ["sparse_delta.safetensors"]);
    // The converted module folder (through the generic module loader) holds exactly the deltas
    // of the .bin loaded directly, embeddings included.
    let direct = load_pytorch_diff(&src, &base).unwrap();
    let converted = load_delta(&out, &base).unwrap();
    assert_eq!(converted.targets.keys().collect::<Vec<_>>(), direct.targets.keys().collect::<Vec<_>>());
    assert!(direct.targets.contains_key(&Target::Embedding));
    for t in direct.targets.keys() {
        assert_eq!(sparse(&converted, *t), sparse(&direct, *t), "{t:?}");
    }

    // An existing output is kept unless --force.
    let o = convert(&src, &out, &[]);
    assert!(!o.status.success() && text(&o.stderr).contains("--force"), "{}", text(&o.stderr));
    let o = convert(&common::fixture("parity/sft_task/pytorch_diff.bin"), &out, &["--force"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(load_sparse_safetensors(&out.join("sparse_delta.safetensors"), &base).unwrap().targets.len(), 140);

    // A refused diff (a memo deep-copy bomb pickle) writes nothing and says why.
    let bomb = tmp.path().join("bomb.bin");
    let mut pkl = b"\x80\x02]q\x00".to_vec();
    (0..40).for_each(|_| pkl.extend_from_slice(b"h\x00h\x00\x86q\x00"));
    pkl.push(b'.');
    write_diff(&bomb, &[], Some(pkl));
    let bad_out = tmp.path().join("bomb_native");
    let o = convert(&bomb, &bad_out, &[]);
    assert!(!o.status.success() && text(&o.stderr).contains("memo deep-copy bomb"), "{}", text(&o.stderr));
    assert!(!bad_out.exists(), "{:?}", file_names(&bad_out));
}

#[test]
fn kit_pickles_are_far_inside_the_pickle_guard_limits() {
    use modserve::adapters::formats::pickle_guard::{scan, MAX_COPIED_NODES, MAX_DEPTH};
    use std::io::Read;
    for m in ["sft_lang", "sft_task"] {
        let mut z = zip::ZipArchive::new(std::fs::File::open(common::fixture(&format!("parity/{m}/pytorch_diff.bin"))).unwrap()).unwrap();
        let mut pkl = Vec::new();
        z.by_name("pytorch_diff/data.pkl").unwrap().read_to_end(&mut pkl).unwrap();
        let s = scan(&pkl).unwrap();
        assert!(s.copied_nodes * 100 < MAX_COPIED_NODES && s.depth * 10 <= MAX_DEPTH, "{m}: {s:?}");
    }
}

#[test]
fn kit_sfts_merge_by_task_arithmetic_and_stay_sparse() {
    let dir = tempfile::tempdir().unwrap();
    for m in ["sft_lang", "sft_task"] {
        std::fs::create_dir(dir.path().join(m)).unwrap();
        std::fs::copy(common::fixture(&format!("parity/{m}/pytorch_diff.bin")), dir.path().join(m).join("pytorch_diff.bin")).unwrap();
    }
    let recipe = dir.path().join("recipe.json");
    std::fs::write(&recipe, r#"{"method": "task_arithmetic", "components": [{"task_vector": "sft_lang"}, {"task_vector": "sft_task"}]}"#)
        .unwrap();
    let base = smollm2_base();
    let no_base = |_t: Target| -> Result<Tensor, AdapterError> { panic!("task arithmetic needs no base weights") };
    let out = merge(&load_recipe(&recipe).unwrap(), &no_base, &base).unwrap();
    assert_eq!((out.report.method, out.report.tensors, out.report.sparse, out.report.dense), (MergeMethod::TaskArithmetic, 211, 211, 0));
    let lang = load_pytorch_diff(&common::fixture("parity/sft_lang/pytorch_diff.bin"), &base).unwrap();
    let task = load_pytorch_diff(&common::fixture("parity/sft_task/pytorch_diff.bin"), &base).unwrap();
    // Layer 0 only in sft_lang: unchanged; layer 10 is the sum of both at each position.
    assert_eq!(sparse(&out.deltas, lin(0, Proj::Q)), sparse(&lang, lin(0, Proj::Q)));
    let (l, t, m) = (sparse(&lang, lin(10, Proj::Q)), sparse(&task, lin(10, Proj::Q)), sparse(&out.deltas, lin(10, Proj::Q)));
    assert_eq!(at(m, 0, 43), at(l, 0, 43) + at(t, 0, 43));
    assert_eq!(at(m, 0, 167), at(l, 0, 167) + at(t, 0, 167));
}

// ----- recipes and merges on tiny files (public API) -----

/// Writes f32 tensors `(name, shape, values)` to a safetensors file.
fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors.iter().map(|(n, s, v)| (n.to_string(), s.clone(), f32s(v))).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn close(got: &[f32], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "got {got:?}, want {want:?}");
    }
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
const K1: &str = "model.layers.1.self_attn.k_proj.weight";

fn write_recipe(dir: &Path, json: serde_json::Value) -> PathBuf {
    let p = dir.join("recipe.json");
    std::fs::write(&p, json.to_string()).unwrap();
    p
}

fn recipe_err(dir: &Path, json: serde_json::Value) -> String {
    match load_recipe(&write_recipe(dir, json)) {
        Err(e @ AdapterError::Recipe { .. }) => e.to_string(),
        other => panic!("expected a recipe error, got {other:?}"),
    }
}

#[test]
fn recipes_validate_paths_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in ["tv.safetensors", "f.safetensors", "f0.safetensors"] {
        write_f32(&d.join(f), &[(Q0, vec![8, 8], vec![0.5; 64])]);
    }
    // The parity kit's shape: method implied by fisher_base, `formula` ignored.
    let kit = serde_json::json!({"formula": "x", "lambda_base": 1.0, "fisher_base": "f0.safetensors", "fisher_floor": 1e-6,
        "components": [{"task_vector": "tv.safetensors", "fisher": "f.safetensors", "lambda": 0.15, "negate": true}]});
    let r = load_recipe(&write_recipe(d, kit.clone())).unwrap();
    assert_eq!((r.method, r.components.len(), r.components[0].negate), (MergeMethod::Ewr, 1, true));
    let tv = |p: &str| serde_json::json!({"method": "task_arithmetic", "components": [{"task_vector": p}]});
    assert!(recipe_err(d, tv("../tv.safetensors")).contains("`..`"));
    assert!(recipe_err(d, tv("/etc/passwd")).contains("relative"));
    let e = recipe_err(d, tv("missing.safetensors"));
    assert!(e.contains("missing.safetensors") && e.contains("not found"), "{e}");
    #[cfg(unix)]
    {
        let outside = tempfile::tempdir().unwrap();
        write_f32(&outside.path().join("x.safetensors"), &[(Q0, vec![8, 8], vec![0.5; 64])]);
        std::os::unix::fs::symlink(outside.path().join("x.safetensors"), d.join("link.safetensors")).unwrap();
        assert!(recipe_err(d, tv("link.safetensors")).contains("outside"));
    }
    let with = |k: &str, v: serde_json::Value| {
        let mut j = serde_json::json!({"method": "ties", "density": 0.5, "components": [{"task_vector": "tv.safetensors"}]});
        j[k] = v;
        j
    };
    assert!(recipe_err(d, with("density", 0.0.into())).contains("density"));
    assert!(recipe_err(d, with("density", 1.5.into())).contains("density"));
    let mut no_density = with("method", "dare_linear".into());
    no_density.as_object_mut().unwrap().remove("density");
    assert!(recipe_err(d, no_density).contains("needs `density`"));
    assert!(recipe_err(d, with("lamda", 1.0.into())).contains("unknown field"));
    assert!(recipe_err(d, with("method", "average".into())).contains("unknown variant"));
    assert!(recipe_err(d, with("fisher_base", "f0.safetensors".into())).contains("only used by ewr"));
    assert!(recipe_err(d, with("components", serde_json::json!([]))).contains("empty"));
    let huge = d.join("huge.json");
    std::fs::write(&huge, r#"{"method": "linear", "components": [{"task_vector": "tv.safetensors", "lambda": 1e400}]}"#).unwrap();
    assert!(matches!(load_recipe(&huge), Err(AdapterError::Recipe { .. })));
    assert!(recipe_err(d, with("compress", serde_json::json!({"top_k": 0.0}))).contains("top_k"));
    let mut no_fisher = kit.clone();
    no_fisher["components"][0].as_object_mut().unwrap().remove("fisher");
    assert!(recipe_err(d, no_fisher).contains("needs a `fisher`"));
    let mut neg = kit;
    neg["components"][0]["lambda"] = (-1.0).into();
    assert!(recipe_err(d, neg).contains("lambda"));
    assert!(recipe_err(d, serde_json::json!({"components": [{"task_vector": "tv.safetensors"}]})).contains("no `method`"));
}

fn values(m: &ModuleDeltas, t: Target) -> Vec<f32> {
    m.targets[&t].to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn merges_files_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = tiny_base();
    let (q0, k1) = (Target::Linear(LinearId { layer: 0, proj: Proj::Q }), Target::Linear(LinearId { layer: 1, proj: Proj::K }));
    let mut a = vec![0f32; 64];
    a[9] = 2.0;
    write_f32(&d.join("a.safetensors"), &[(Q0, vec![8, 8], a), (K1, vec![4, 8], vec![1.0; 32])]);
    write_f32(&d.join("b.safetensors"), &[(Q0, vec![8, 8], vec![1.0; 64])]);
    write_f32(&d.join("fa.safetensors"), &[(Q0, vec![8, 8], vec![1.0; 64])]);
    write_f32(&d.join("fb.safetensors"), &[(Q0, vec![8, 8], vec![3.0; 64])]);
    write_f32(&d.join("f0.safetensors"), &[(Q0, vec![8, 8], vec![2.0; 64])]);
    let theta0 = |_t: Target| -> Result<Tensor, AdapterError> { Ok(Tensor::full(4f32, (8, 8), &candle_core::Device::Cpu)?) };
    // Task arithmetic: q0 = 0.5*a - 1*b -> -1 everywhere except element 9 (0); k1 = 0.5.
    let r = write_recipe(
        d,
        serde_json::json!({"method": "task_arithmetic", "components": [
        {"task_vector": "a.safetensors", "lambda": 0.5}, {"task_vector": "b.safetensors", "negate": true}]}),
    );
    let out = merge(&load_recipe(&r).unwrap(), &theta0, &base).unwrap();
    let q = values(&out.deltas, q0);
    assert_eq!((q[9], q[10], values(&out.deltas, k1)[0]), (0.0, -1.0, 0.5));
    assert_eq!((out.report.tensors, out.report.dense, out.report.nnz), (2, 2, 63 + 32));
    // EWR over q0 only (k1 is not in the Fisher files: unchanged). Element 10:
    // (1*2*4 + 0.5*1*0 + 1*3*(-1)) / (2 + 0.5 + 3) - 4 = 5/5.5 - 4; element 9: (8 + 1 - 3)/5.5 - 4.
    let r = write_recipe(
        d,
        serde_json::json!({"fisher_base": "f0.safetensors", "components": [
        {"task_vector": "a.safetensors", "fisher": "fa.safetensors", "lambda": 0.5},
        {"task_vector": "b.safetensors", "fisher": "fb.safetensors", "negate": true}]}),
    );
    let out = merge(&load_recipe(&r).unwrap(), &theta0, &base).unwrap();
    assert_eq!((out.report.tensors, out.report.unchanged), (1, 1));
    let q = values(&out.deltas, q0);
    close(&q[9..11], &[6.0 / 5.5 - 4.0, 5.0 / 5.5 - 4.0]);
    // Compression of delta = a: top_k keeps 1 of q0's 64 entries (its single non-zero): exact.
    let r = write_recipe(
        d,
        serde_json::json!({"method": "linear", "components": [{"task_vector": "a.safetensors"}],
        "compress": {"top_k": 0.02}}),
    );
    let out = merge(&load_recipe(&r).unwrap(), &theta0, &base).unwrap();
    let c = out.report.compression.unwrap();
    assert!(matches!(out.deltas.targets[&q0], MatrixDelta::Sparse(_)));
    // k1 (all ones, 32 entries) keeps 0 -> max(1) = 1 entry: error sqrt(31/32).
    assert!((c.max_tensor_relative_error - (31f64 / 32.0).sqrt()).abs() < 1e-9, "{c:?}");
    assert!((c.relative_error - (31f64 / 36.0).sqrt()).abs() < 1e-9, "{c:?}");
    let r = write_recipe(
        d,
        serde_json::json!({"method": "linear", "components": [{"task_vector": "a.safetensors"}],
        "compress": {"low_rank": 1}}),
    );
    let out = merge(&load_recipe(&r).unwrap(), &theta0, &base).unwrap();
    assert_eq!(out.report.low_rank, 2);
    assert!(out.report.compression.unwrap().relative_error < 1e-6);
    // A component with a wrong shape is refused with the file named.
    write_f32(&d.join("bad.safetensors"), &[(Q0, vec![4, 8], vec![1.0; 32])]);
    let r = write_recipe(d, serde_json::json!({"method": "linear", "components": [{"task_vector": "bad.safetensors"}]}));
    let e = merge(&load_recipe(&r).unwrap(), &theta0, &base).unwrap_err();
    assert!(matches!(e, AdapterError::Shape { .. }) && e.to_string().contains("bad.safetensors"), "{e}");
}

fn read_kit(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(common::fixture(&format!("parity/ewr/{name}")), &Device::Cpu).unwrap()
}

#[test]
fn kit_task_arithmetic_is_expert_minus_anti_expert() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["expert_task_vector.safetensors", "anti_expert_task_vector.safetensors"] {
        std::fs::copy(common::fixture(&format!("parity/ewr/{f}")), dir.path().join(f)).unwrap();
    }
    let recipe = dir.path().join("ta.json");
    std::fs::write(
        &recipe,
        r#"{"method": "task_arithmetic", "components": [
        {"task_vector": "expert_task_vector.safetensors", "lambda": 1.0},
        {"task_vector": "anti_expert_task_vector.safetensors", "lambda": 1.0, "negate": true}]}"#,
    )
    .unwrap();
    let no_base = |_t: Target| -> Result<Tensor, AdapterError> { panic!("not needed") };
    let out = merge(&load_recipe(&recipe).unwrap(), &no_base, &smollm2_base()).unwrap();
    let (e, a) = (read_kit("expert_task_vector.safetensors"), read_kit("anti_expert_task_vector.safetensors"));
    assert_eq!(out.deltas.targets.len(), e.len());
    for (name, et) in &e {
        let want = (et - &a[name]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let t = Target::from_hf_name(name).unwrap();
        let got = out.deltas.targets[&t].to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "{name}");
    }
}

/// Reproduces `ewr/expected_merged_delta.safetensors` from the kit's recipe and the reference
/// model's weights dequantized to f32. Tolerance: per tensor, max |ours - ref| <= 1e-5 * max |ref|.
/// An elementwise relative test would be ill-conditioned: the delta theta' - theta0 is a difference
/// of nearly equal f32 numbers wherever the task vectors are small, so tiny entries carry float32
/// rounding of |theta0| (~6e-8 |theta0|) as large relative noise; scaling by the tensor's largest
/// entry keeps the bound far above that noise and far below any formula mistake.
#[test]
fn kit_ewr_reproduces_the_reference_merge() {
    let path = common::reference_model();
    let model = load(&path, &LoadOptions { weights: WeightMode::F32, device: Device::Cpu })
        .unwrap_or_else(|e| panic!("cannot load the reference model {}: {e}", path.display()));
    let base = BaseShapes::new(model.llama.cfg.clone());
    let theta0 = |t: Target| -> Result<Tensor, AdapterError> {
        let Target::Linear(id) = t else { return Err(AdapterError::Tensor(format!("{t:?} is not a linear layer"))) };
        let l = model.llama.linear(id).ok_or_else(|| AdapterError::Tensor(format!("no layer {id}")))?;
        Ok(l.weight().to_dense()?)
    };
    let recipe = load_recipe(&common::fixture("parity/ewr/recipe.json")).unwrap();
    assert_eq!(recipe.method, MergeMethod::Ewr);
    let out = merge(&recipe, &theta0, &base).unwrap();
    let expected = read_kit("expected_merged_delta.safetensors");
    assert_eq!(out.deltas.targets.len(), expected.len());
    assert_eq!(out.report.dense, expected.len());
    for (name, want) in &expected {
        let t = Target::from_hf_name(name).unwrap();
        let got = out.deltas.targets[&t].to_dense().unwrap();
        let diff = (&got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        println!("{name}: max|ours - ref| = {diff:e}, max|ref| = {scale:e}, ratio {:e}", diff / scale);
        assert!(diff <= 1e-5 * scale, "{name}: max|ours - ref| = {diff} > 1e-5 * {scale}");
    }
}
