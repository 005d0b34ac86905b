//! A table-driven corpus of bad inputs against ONE real `modserve serve`: malformed requests,
//! broken or hostile module files (generated here, in a temp adapter root), and bad admin calls.
//! Every case asserts the precise gRPC code AND the stable error code string (the
//! `modserve-error-code` metadata); request cases are sent both unary and streaming. After the
//! whole table the server must still answer the reference kit correctly, and no bad module may
//! have become resident in the adapter cache.
//!
//! Expectations follow src/api/status.rs (`adapter_code`), src/engine/prepare.rs and the loaders;
//! where the server's answer is not what a demanding client should get, the case keeps the right
//! expectation (see the `// BUG?` notes) and the table reports it.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::server::{metric, scrape, spawn, wait_serving};
use modserve::pb;
use modserve::pb::adapters_client::AdaptersClient;
use modserve::pb::generate_request::Prompt;
use modserve::pb::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

// ------------------------------------------------------------------------------------------------
// Fixture generation
// ------------------------------------------------------------------------------------------------

const HIDDEN: usize = 576;

/// Deterministic small values in [-0.01, 0.01].
fn vals(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 0.02
        })
        .collect()
}

fn garbage(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(747796405).wrapping_add(2891336453);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 11) as u8
        })
        .collect()
}

fn t(shape: &[usize], seed: u32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(vals(n, seed), shape, &Device::Cpu).unwrap()
}

fn lora_name(layer: usize, parent: &str, proj: &str, factor: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{parent}.{proj}.lora_{factor}.weight")
}

/// A PEFT LoRA config; `extra` is merged over the defaults.
fn lora_cfg(r: usize, targets: serde_json::Value, layers: Option<Vec<usize>>, extra: serde_json::Value) -> String {
    let mut c = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": targets,
        "bias": "none", "use_dora": false, "modules_to_save": null, "fan_in_fan_out": false,
    });
    if let Some(l) = layers {
        c["layers_to_transform"] = serde_json::json!(l);
    }
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

fn save(tensors: Vec<(String, Tensor)>, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// A LoRA folder with the given config and tensors.
fn write_lora(dir: &Path, cfg: &str, tensors: Vec<(String, Tensor)>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    save(tensors, &dir.join("adapter_model.safetensors"));
}

/// The tensors of a valid rank-`r` LoRA on layer 0's q_proj.
fn q0(r: usize, seed: u32) -> Vec<(String, Tensor)> {
    vec![
        (lora_name(0, "self_attn", "q_proj", "A"), t(&[r, HIDDEN], seed)),
        (lora_name(0, "self_attn", "q_proj", "B"), t(&[HIDDEN, r], seed + 1)),
    ]
}

fn q0_cfg(r: usize) -> String {
    lora_cfg(r, serde_json::json!(["q_proj"]), Some(vec![0]), serde_json::json!({}))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Rewrites the zip `src` into `dst`, transforming the entry whose name ends with `suffix`.
fn rewrite_zip(src: &Path, dst: &Path, suffix: &str, f: impl Fn(Vec<u8>) -> Vec<u8>) {
    rewrite_zip_as(src, dst, suffix, zip::CompressionMethod::Stored, f)
}

fn rewrite_zip_as(src: &Path, dst: &Path, suffix: &str, method: zip::CompressionMethod, f: impl Fn(Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(method).large_file(true);
    let mut hit = false;
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let name = e.name().to_string();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        if name.ends_with(suffix) {
            buf = f(buf);
            hit = true;
        }
        zout.start_file(name, opts).unwrap();
        zout.write_all(&buf).unwrap();
    }
    zout.finish().unwrap();
    assert!(hit, "no entry ending in {suffix} in {}", src.display());
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn vm_hwm_kb(pid: u32) -> u64 {
    common::server::proc_kib(pid, "VmHWM")
}

fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

fn write_json(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Populates the adapter root with the good fixtures this test uses plus every bad module.
/// `outside` is a folder next to (not inside) the root.
fn build_root(root: &Path, outside: &Path) {
    let parity = common::fixture("parity");
    for m in ["lora_qv_r4", "poly_qvup", "sft_lang", "sft_task"] {
        copy_dir(&parity.join(m), &root.join(m));
    }
    // A generated control: proves the generator writes loadable LoRAs, so the bad ones fail for
    // the reason they were built with.
    write_lora(&root.join("tiny_ok"), &q0_cfg(4), q0(4, 1));

    // --- safetensors LoRA files -----------------------------------------------------------------
    let good = std::fs::read(parity.join("lora_qv_r4/adapter_model.safetensors")).unwrap();
    let cfg_qv = std::fs::read_to_string(parity.join("lora_qv_r4/adapter_config.json")).unwrap();
    let d = root.join("st_truncated");
    write_json(&d.join("adapter_config.json"), &cfg_qv);
    std::fs::write(d.join("adapter_model.safetensors"), &good[..good.len() / 2]).unwrap();
    let d = root.join("st_garbage");
    write_json(&d.join("adapter_config.json"), &cfg_qv);
    std::fs::write(d.join("adapter_model.safetensors"), garbage(200_000, 7)).unwrap();
    let d = root.join("st_empty");
    write_json(&d.join("adapter_config.json"), &cfg_qv);
    std::fs::write(d.join("adapter_model.safetensors"), b"").unwrap();
    let d = root.join("lora_bin_garbage");
    write_json(&d.join("adapter_config.json"), &q0_cfg(4));
    std::fs::write(d.join("adapter_model.bin"), garbage(4096, 8)).unwrap();
    let d = root.join("lora_no_weights");
    write_json(&d.join("adapter_config.json"), &q0_cfg(4));

    // Shapes and ranks.
    write_lora(
        &root.join("lora_wrong_shape"),
        &q0_cfg(4),
        vec![(lora_name(0, "self_attn", "q_proj", "A"), t(&[4, 100], 2)), (lora_name(0, "self_attn", "q_proj", "B"), t(&[HIDDEN, 4], 3))],
    );
    write_lora(
        &root.join("lora_rank_mismatch"),
        &q0_cfg(4),
        vec![
            (lora_name(0, "self_attn", "q_proj", "A"), t(&[4, HIDDEN], 4)),
            (lora_name(0, "self_attn", "q_proj", "B"), t(&[HIDDEN, 8], 5)),
        ],
    );
    write_lora(&root.join("lora_cfg_rank_mismatch"), &q0_cfg(8), q0(4, 6));
    write_lora(&root.join("lora_missing_b"), &q0_cfg(4), vec![(lora_name(0, "self_attn", "q_proj", "A"), t(&[4, HIDDEN], 7))]);
    // Config selects q_proj of every layer, file holds layer 0 only.
    write_lora(&root.join("lora_missing_layers"), &lora_cfg(4, serde_json::json!(["q_proj"]), None, serde_json::json!({})), q0(4, 8));
    write_lora(&root.join("lora_rank128"), &q0_cfg(128), q0(128, 9));

    // Non-finite values.
    let mut a = vals(4 * HIDDEN, 10);
    a[17] = f32::NAN;
    write_lora(
        &root.join("lora_nan"),
        &q0_cfg(4),
        vec![
            (lora_name(0, "self_attn", "q_proj", "A"), Tensor::from_vec(a, (4, HIDDEN), &Device::Cpu).unwrap()),
            (lora_name(0, "self_attn", "q_proj", "B"), t(&[HIDDEN, 4], 11)),
        ],
    );
    let mut b = vals(HIDDEN * 4, 12);
    b[3] = f32::INFINITY;
    write_lora(
        &root.join("lora_inf"),
        &q0_cfg(4),
        vec![
            (lora_name(0, "self_attn", "q_proj", "A"), t(&[4, HIDDEN], 13)),
            (lora_name(0, "self_attn", "q_proj", "B"), Tensor::from_vec(b, (HIDDEN, 4), &Device::Cpu).unwrap()),
        ],
    );

    // Targets.
    write_lora(
        &root.join("lora_foo_proj"),
        &lora_cfg(4, serde_json::json!(["foo_proj"]), None, serde_json::json!({})),
        vec![
            (lora_name(0, "self_attn", "foo_proj", "A"), t(&[4, HIDDEN], 14)),
            (lora_name(0, "self_attn", "foo_proj", "B"), t(&[HIDDEN, 4], 15)),
        ],
    );
    write_lora(
        &root.join("lora_layer_oob"),
        &lora_cfg(4, serde_json::json!(["q_proj"]), Some(vec![30]), serde_json::json!({})),
        vec![
            (lora_name(30, "self_attn", "q_proj", "A"), t(&[4, HIDDEN], 16)),
            (lora_name(30, "self_attn", "q_proj", "B"), t(&[HIDDEN, 4], 17)),
        ],
    );
    write_lora(&root.join("lora_regex_targets"), &lora_cfg(4, serde_json::json!(".*\\.q_proj"), None, serde_json::json!({})), q0(4, 18));

    // Unsupported PEFT features.
    write_lora(
        &root.join("lora_dora"),
        &lora_cfg(4, serde_json::json!(["q_proj"]), Some(vec![0]), serde_json::json!({"use_dora": true})),
        q0(4, 19),
    );
    write_lora(
        &root.join("lora_modules_to_save"),
        &lora_cfg(4, serde_json::json!(["q_proj"]), Some(vec![0]), serde_json::json!({"modules_to_save": ["lm_head"]})),
        q0(4, 20),
    );
    write_lora(
        &root.join("peft_unknown"),
        &lora_cfg(4, serde_json::json!(["q_proj"]), Some(vec![0]), serde_json::json!({"peft_type": "IA3"})),
        q0(4, 21),
    );
    let d = root.join("cfg_malformed");
    write_json(&d.join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"q_proj\"");
    save(q0(4, 22), &d.join("adapter_model.safetensors"));
    std::fs::create_dir_all(root.join("empty_module")).unwrap();
    std::fs::write(root.join("empty_module/README.txt"), "nothing here").unwrap();

    // Size limit: a valid LoRA plus a 17 MB (sparse) extra file; --max-adapter-file-bytes 16e6.
    write_lora(&root.join("too_big"), &q0_cfg(4), q0(4, 23));
    std::fs::File::create(root.join("too_big/padding.bin")).unwrap().set_len(17_000_000).unwrap();
    // The same 17 MB reached through a symlink that stays inside the root.
    write_lora(&root.join("too_big_via_link"), &q0_cfg(4), q0(4, 33));
    std::os::unix::fs::symlink("../too_big/padding.bin", root.join("too_big_via_link/padding.bin")).unwrap();

    // --- Poly -------------------------------------------------------------------------------------
    let poly = parity.join("poly_qvup");
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(poly.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let router = "base_model.model.model.layers.0.mlp.up_proj.poly_router.module_logits";
    let slot = tensors.iter_mut().find(|(n, _)| n == router).expect("poly router tensor");
    slot.1 = Tensor::zeros((3, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
    let d = root.join("poly_bad_router");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(poly.join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    save(tensors, &d.join("adapter_model.safetensors"));

    // --- composable-sft pytorch_diff.bin ------------------------------------------------------------
    let diff = parity.join("sft_task/pytorch_diff.bin");
    let bytes = std::fs::read(&diff).unwrap();
    let d = root.join("sft_truncated");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("pytorch_diff.bin"), &bytes[..bytes.len() / 2]).unwrap();
    let d = root.join("sft_not_zip");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("pytorch_diff.bin"), garbage(100_000, 24)).unwrap();
    rewrite_zip(&diff, &root.join("sft_garbage_pickle/pytorch_diff.bin"), "data.pkl", |_| garbage(50_000, 25));
    rewrite_zip(&diff, &root.join("sft_truncated_pickle/pytorch_diff.bin"), "data.pkl", |b| b[..b.len() / 2].to_vec());
    // PROTO 2, BINUNICODE with a 4 GiB length and no payload.
    rewrite_zip(&diff, &root.join("sft_pickle_bomb/pytorch_diff.bin"), "data.pkl", |_| b"\x80\x02X\xff\xff\xff\xff".to_vec());
    rewrite_zip(&diff, &root.join("sft_truncated_storage/pytorch_diff.bin"), "/data/0", |b| b[..b.len() / 3].to_vec());
    // Memo deep-copy bomb: `[]` memo-put, then 40 x (get, get, TUPLE2, put) doubles the memo'd
    // object per round (candle deep-copies on each memo get/put: ~2^40 nodes).
    rewrite_zip(&diff, &root.join("sft_memo_bomb/pytorch_diff.bin"), "data.pkl", |_| {
        let mut p = b"\x80\x02]q\x00".to_vec();
        (0..40).for_each(|_| p.extend_from_slice(b"h\x00h\x00\x86q\x00"));
        p.push(b'.');
        p
    });
    // 200 000 nested 1-tuples: candle's recursive drop would overflow the stack (process abort).
    rewrite_zip(&diff, &root.join("sft_deep_pickle/pytorch_diff.bin"), "data.pkl", |_| {
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 200_000));
        p.push(b'.');
        p
    });

    // A small file whose data.pkl inflates to 300 MB (deflate): the reader must stop long before.
    rewrite_zip_as(&diff, &root.join("sft_inflating_pickle/pytorch_diff.bin"), "data.pkl", zip::CompressionMethod::Deflated, |_| {
        let mut p = b"\x80\x02N".to_vec();
        p.resize(300 << 20, b'N');
        p
    });
    let bomb_len = std::fs::metadata(root.join("sft_inflating_pickle/pytorch_diff.bin")).unwrap().len();
    assert!(bomb_len < 2 << 20, "the inflating pickle should be a small file ({bomb_len} bytes)");

    // --- Dense task vectors (folders holding task_vector.safetensors) ---------------------------------
    save(vec![("model.layers.0.self_attn.q_proj.weight".into(), t(&[10, 10], 26))], &root.join("tv_wrong_shape/task_vector.safetensors"));
    let mut v = vals(192 * HIDDEN, 27);
    v[5] = f32::NAN;
    save(
        vec![("model.layers.0.self_attn.v_proj.weight".into(), Tensor::from_vec(v, (192, HIDDEN), &Device::Cpu).unwrap())],
        &root.join("tv_nan/task_vector.safetensors"),
    );
    // Loose files at the root are not modules (only folders are registered at start).
    write_json(&root.join("notes.json"), r#"{"method": "task_arithmetic", "components": [{"task_vector": "x.safetensors"}]}"#);
    save(vec![("model.layers.0.self_attn.q_proj.weight".into(), t(&[HIDDEN, HIDDEN], 40))], &root.join("loose.safetensors"));

    // --- Merge recipes --------------------------------------------------------------------------------
    write_json(
        &root.join("recipe_missing/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "missing.safetensors", "lambda": 1.0}]}"#,
    );
    write_json(
        &root.join("recipe_dotdot/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "../tv_nan.safetensors", "lambda": 1.0}]}"#,
    );
    // JSON cannot hold NaN: an out-of-range number and a string stand in for it.
    write_json(
        &root.join("recipe_nan_lambda/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "tv.safetensors", "lambda": 1e999}]}"#,
    );
    save(vec![("model.layers.0.self_attn.q_proj.weight".into(), t(&[HIDDEN, HIDDEN], 28))], &root.join("recipe_nan_lambda/tv.safetensors"));
    write_json(
        &root.join("recipe_string_lambda/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "tv.safetensors", "lambda": "NaN"}]}"#,
    );
    save(
        vec![("model.layers.0.self_attn.q_proj.weight".into(), t(&[HIDDEN, HIDDEN], 29))],
        &root.join("recipe_string_lambda/tv.safetensors"),
    );
    write_json(&root.join("recipe_unknown_method/recipe.json"), r#"{"method": "magic", "components": [{"task_vector": "x"}]}"#);
    write_json(
        &root.join("recipe_bad_component/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "tv.safetensors", "lambda": 1.0}]}"#,
    );
    std::fs::write(root.join("recipe_bad_component/tv.safetensors"), garbage(10_000, 30)).unwrap();
    write_json(
        &root.join("recipe_symlink_out/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "tv.safetensors", "lambda": 1.0}]}"#,
    );
    save(vec![("model.layers.0.self_attn.q_proj.weight".into(), t(&[HIDDEN, HIDDEN], 31))], &outside.join("tv.safetensors"));
    std::os::unix::fs::symlink(outside.join("tv.safetensors"), root.join("recipe_symlink_out/tv.safetensors")).unwrap();
    // Named pipes where files are expected: opening one for reading blocks until a writer comes.
    write_json(
        &root.join("recipe_fifo/recipe.json"),
        r#"{"method": "task_arithmetic", "components": [{"task_vector": "tv.safetensors", "lambda": 1.0}]}"#,
    );
    mkfifo(&root.join("recipe_fifo/tv.safetensors"));
    write_json(&root.join("lora_fifo/adapter_config.json"), &q0_cfg(4));
    mkfifo(&root.join("lora_fifo/adapter_model.safetensors"));

    // --- Symbolic links leaving the root ---------------------------------------------------------------
    write_lora(&outside.join("lora_out"), &q0_cfg(4), q0(4, 32));
    std::os::unix::fs::symlink(outside.join("lora_out"), root.join("escape_link")).unwrap();
    let d = root.join("inner_symlink");
    write_json(&d.join("adapter_config.json"), &q0_cfg(4));
    std::os::unix::fs::symlink(outside.join("lora_out/adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
}

// ------------------------------------------------------------------------------------------------
// The table
// ------------------------------------------------------------------------------------------------

enum Call {
    Gen(pb::GenerateRequest),
    Register(String, String),
    Unregister(String),
    Describe(String),
    Preload(String),
    Evict(String),
    Merge(String, String),
}

#[derive(Clone, Copy, Debug)]
enum Want {
    Ok,
    Err(Code, &'static str),
    /// Success, or this error (either is a correct answer; anything else is not).
    OkOr(Code, &'static str),
}

struct Case {
    name: String,
    call: Call,
    want: Want,
}

fn code_of(s: &tonic::Status) -> String {
    s.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// What a call returned: Ok, or (code, stable code, message).
type Outcome = Result<(), (Code, String, String)>;

fn err_outcome(e: tonic::Status) -> Outcome {
    // Echoed input is cut: a message over 4 KB is a failure of its own.
    if e.message().len() > 4096 {
        return Err((e.code(), "message_too_long".into(), format!("{} bytes", e.message().len())));
    }
    Err((e.code(), code_of(&e), e.message().chars().take(200).collect()))
}

fn matches(want: Want, got: &Outcome) -> bool {
    match (want, got) {
        (Want::Ok | Want::OkOr(..), Ok(())) => true,
        (Want::Err(c, s) | Want::OkOr(c, s), Err((gc, gs, _))) => c == *gc && s == gs,
        _ => false,
    }
}

fn show(o: &Outcome) -> String {
    match o {
        Ok(()) => "OK".into(),
        Err((c, s, m)) => format!("{c:?}/{s} ({m})"),
    }
}

fn small() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![504, 2365] })),
        max_new_tokens: 2,
        min_new_tokens: 2,
        ..Default::default()
    }
}

fn with_deltas(d: &[(&str, f32)]) -> pb::GenerateRequest {
    pb::GenerateRequest {
        deltas: d.iter().map(|(id, s)| pb::DeltaRef { module_id: id.to_string(), scale: *s, scale_is_set: true }).collect(),
        ..small()
    }
}

fn delta(id: &str) -> pb::GenerateRequest {
    with_deltas(&[(id, 1.0)])
}

fn route(inv: &str, r: pb::poly_route::Routing) -> pb::GenerateRequest {
    pb::GenerateRequest { route: Some(pb::PolyRoute { inventory_id: inv.into(), routing: Some(r) }), ..small() }
}

fn task(inv: &str, t: i64) -> pb::GenerateRequest {
    route(inv, pb::poly_route::Routing::TaskId(t))
}

fn weights(w: &[f32]) -> pb::GenerateRequest {
    route("poly_qvup", pb::poly_route::Routing::Weights(pb::RoutingWeights { values: w.to_vec() }))
}

const INVALID: (Code, &str) = (Code::InvalidArgument, "invalid_argument");
const LIMIT: (Code, &str) = (Code::InvalidArgument, "limit_exceeded");
const COMPOSITION: (Code, &str) = (Code::InvalidArgument, "invalid_composition");
const UNKNOWN: (Code, &str) = (Code::NotFound, "unknown_module");
const PATH: (Code, &str) = (Code::InvalidArgument, "adapter_path");
const MALFORMED: (Code, &str) = (Code::FailedPrecondition, "adapter_malformed");
const UNSUPPORTED: (Code, &str) = (Code::FailedPrecondition, "adapter_unsupported");
const SHAPE: (Code, &str) = (Code::FailedPrecondition, "adapter_shape");
const NON_FINITE: (Code, &str) = (Code::FailedPrecondition, "adapter_non_finite");
const UNKNOWN_TARGET: (Code, &str) = (Code::FailedPrecondition, "adapter_unknown_target");
const RECIPE: (Code, &str) = (Code::FailedPrecondition, "merge_recipe");

fn table() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let mut add = |name: &str, call: Call, want: Want| v.push(Case { name: name.into(), call, want });
    let e = |(c, s): (Code, &'static str)| Want::Err(c, s);
    let gen = Call::Gen;

    // --- Requests: prompt ------------------------------------------------------------------------
    add("empty text prompt", gen(pb::GenerateRequest { prompt: Some(Prompt::Text(String::new())), ..small() }), e(INVALID));
    add(
        "empty token ids",
        gen(pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![] })), ..small() }),
        e(INVALID),
    );
    add(
        "token id == vocab (49152)",
        gen(pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![504, 49152] })), ..small() }),
        e(INVALID),
    );
    add(
        "token id u32::MAX",
        gen(pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![u32::MAX] })), ..small() }),
        e(INVALID),
    );
    add(
        "prompt of 513 token ids > --max-prompt-tokens 512",
        gen(pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: vec![504; 513] })), ..small() }),
        e(LIMIT),
    );
    add(
        "text prompt of 40000 bytes > 64 * --max-prompt-tokens",
        gen(pb::GenerateRequest { prompt: Some(Prompt::Text("ab ".repeat(13_334))), ..small() }),
        e(LIMIT),
    );
    add(
        "text prompt of ~600 tokens > --max-prompt-tokens 512",
        gen(pb::GenerateRequest { prompt: Some(Prompt::Text("hello ".repeat(600))), ..small() }),
        e(LIMIT),
    );
    add(
        "chat with zero messages",
        gen(pb::GenerateRequest { prompt: Some(Prompt::Chat(pb::ChatMessages { messages: vec![] })), ..small() }),
        e(INVALID),
    );
    add("no prompt at all", gen(pb::GenerateRequest { prompt: None, ..small() }), e(INVALID));
    // --- Requests: generation limits and sampling --------------------------------------------------
    add(
        "max_new_tokens 257 > --max-new-tokens-limit 256",
        gen(pb::GenerateRequest { max_new_tokens: 257, min_new_tokens: 0, ..small() }),
        e(LIMIT),
    );
    add("max_new_tokens u32::MAX", gen(pb::GenerateRequest { max_new_tokens: u32::MAX, min_new_tokens: 0, ..small() }), e(LIMIT));
    add("NaN temperature", gen(pb::GenerateRequest { temperature: f32::NAN, ..small() }), e(INVALID));
    add("negative temperature", gen(pb::GenerateRequest { temperature: -0.5, ..small() }), e(INVALID));
    add("infinite temperature", gen(pb::GenerateRequest { temperature: f32::INFINITY, ..small() }), e(INVALID));
    // BUG? A positive, finite but subnormal temperature makes every logit/t infinite: the sampler
    // fails inside the batch step (INTERNAL for this request and its batch neighbours). Right:
    // refuse it up front or sample as greedy.
    add("subnormal temperature 1e-40", gen(pb::GenerateRequest { temperature: 1e-40, ..small() }), Want::OkOr(INVALID.0, INVALID.1));
    add("top_p 1.5", gen(pb::GenerateRequest { top_p: 1.5, temperature: 0.7, ..small() }), e(INVALID));
    add("top_p negative", gen(pb::GenerateRequest { top_p: -0.1, temperature: 0.7, ..small() }), e(INVALID));
    add("top_p NaN", gen(pb::GenerateRequest { top_p: f32::NAN, temperature: 0.7, ..small() }), e(INVALID));
    add("top_logprobs 100 > 20", gen(pb::GenerateRequest { top_logprobs: 100, ..small() }), e(INVALID));
    add(
        "top_k larger than the vocabulary is valid",
        gen(pb::GenerateRequest { top_k: u32::MAX, temperature: 0.8, seed: 3, ..small() }),
        Want::Ok,
    );
    add("empty stop string", gen(pb::GenerateRequest { stop: vec!["x".into(), String::new()], ..small() }), e(INVALID));
    add(
        "5 stop strings > --max-stop-strings 4",
        gen(pb::GenerateRequest { stop: (0..5).map(|i| format!("s{i}")).collect(), ..small() }),
        e(LIMIT),
    );
    add("stop string of 33 bytes > --max-stop-bytes 32", gen(pb::GenerateRequest { stop: vec!["y".repeat(33)], ..small() }), e(LIMIT));
    // --- Requests: compositions ----------------------------------------------------------------------
    add("unknown module", gen(delta("no_such_module")), e(UNKNOWN));
    add("unknown Poly inventory", gen(task("no_such_poly", 0)), e(UNKNOWN));
    add("unknown task id 3 (3 tasks)", gen(task("poly_qvup", 3)), e((Code::NotFound, "unknown_task")));
    add("unknown task id -1", gen(task("poly_qvup", -1)), e((Code::NotFound, "unknown_task")));
    add("unknown task id i64::MAX", gen(task("poly_qvup", i64::MAX)), e((Code::NotFound, "unknown_task")));
    add(
        "route without task id or weights",
        gen(pb::GenerateRequest { route: Some(pb::PolyRoute { inventory_id: "poly_qvup".into(), routing: None }), ..small() }),
        e(INVALID),
    );
    add("routing weights of wrong length (3)", gen(weights(&[0.3, 0.3, 0.4])), e(COMPOSITION));
    add("routing weights empty", gen(weights(&[])), e(COMPOSITION));
    add("routing weights negative", gen(weights(&[0.5, -0.1, 0.3, 0.3])), e(COMPOSITION));
    add("routing weights NaN", gen(weights(&[0.5, f32::NAN, 0.3, 0.3])), e(COMPOSITION));
    add("routing weights infinite", gen(weights(&[0.5, f32::INFINITY, 0.3, 0.3])), e(COMPOSITION));
    add("routing weights all zero", gen(weights(&[0.0; 4])), e(COMPOSITION));
    add("routing weights all zero in split 1 of 2", gen(weights(&[0.2, 0.2, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0])), e(COMPOSITION));
    add("explicit routing weights n_skills (valid)", gen(weights(&[0.25, 0.25, 0.25, 0.25])), Want::Ok);
    add("NaN scale", gen(with_deltas(&[("lora_qv_r4", f32::NAN)])), e(COMPOSITION));
    add("infinite scale", gen(with_deltas(&[("lora_qv_r4", f32::INFINITY)])), e(COMPOSITION));
    add("negative infinite scale", gen(with_deltas(&[("lora_qv_r4", f32::NEG_INFINITY)])), e(COMPOSITION));
    add("negative scale is valid", gen(with_deltas(&[("lora_qv_r4", -1.0)])), Want::Ok);
    add("scale 0 set literally is valid", gen(with_deltas(&[("lora_qv_r4", 0.0)])), Want::Ok);
    // BUG? A finite but absurd scale overflows the activations to NaN: the sampler finds no finite
    // logit and the whole batch step fails with INTERNAL. Right: refuse the scale or confine the
    // failure to this request with a client error, never INTERNAL.
    add("finite scale 1e30", gen(with_deltas(&[("lora_qv_r4", 1e30)])), Want::OkOr(COMPOSITION.0, COMPOSITION.1));
    add("5 components > --max-components 4", gen(with_deltas(&[("lora_qv_r4", 1.0); 5])), e(LIMIT));
    add(
        "4 deltas + a route = 5 components",
        gen(pb::GenerateRequest { route: task("poly_qvup", 0).route, ..with_deltas(&[("lora_qv_r4", 0.1); 4]) }),
        e(LIMIT),
    );
    add("route naming a LoRA (wrong kind)", gen(task("lora_qv_r4", 0)), e((Code::InvalidArgument, "adapter_kind")));
    add("delta naming the Poly inventory (wrong kind)", gen(delta("poly_qvup")), e((Code::InvalidArgument, "adapter_kind")));
    add("delta with an empty module id", gen(delta("")), e(UNKNOWN));

    // --- Module files, used through requests (registered at start by folder name) ---------------------
    add("control: generated tiny LoRA loads", gen(delta("tiny_ok")), Want::Ok);
    add("truncated safetensors (valid file cut in half)", gen(delta("st_truncated")), e(MALFORMED));
    add("garbage bytes as adapter_model.safetensors", gen(delta("st_garbage")), e(MALFORMED));
    add("empty adapter_model.safetensors", gen(delta("st_empty")), e(MALFORMED));
    add("garbage adapter_model.bin (not a checkpoint)", gen(delta("lora_bin_garbage")), e(MALFORMED));
    add("LoRA folder without weights file", gen(delta("lora_no_weights")), e((Code::NotFound, "adapter_io")));
    add("LoRA A with wrong input dim", gen(delta("lora_wrong_shape")), e(SHAPE));
    add("LoRA A/B rank mismatch (4 vs 8)", gen(delta("lora_rank_mismatch")), e(MALFORMED));
    add("LoRA rank 4 but config r=8", gen(delta("lora_cfg_rank_mismatch")), e(MALFORMED));
    add("LoRA with lora_A but no lora_B", gen(delta("lora_missing_b")), e(MALFORMED));
    add("LoRA config selects layers the file lacks", gen(delta("lora_missing_layers")), e(MALFORMED));
    add("LoRA with a NaN weight", gen(delta("lora_nan")), e(NON_FINITE));
    add("LoRA with an Inf weight", gen(delta("lora_inf")), e(NON_FINITE));
    add("LoRA on unknown target foo_proj", gen(delta("lora_foo_proj")), e(UNKNOWN_TARGET));
    add("LoRA on layer 30 of a 30-layer model", gen(delta("lora_layer_oob")), e(UNKNOWN_TARGET));
    add("LoRA with regex target_modules", gen(delta("lora_regex_targets")), e(UNSUPPORTED));
    add("DoRA config", gen(delta("lora_dora")), e(UNSUPPORTED));
    add("modules_to_save config", gen(delta("lora_modules_to_save")), e(UNSUPPORTED));
    add("rank 128 > --max-adapter-rank 64", gen(delta("lora_rank128")), e(LIMIT));
    add("module of 17 MB > --max-adapter-file-bytes 16e6", gen(delta("too_big")), e(LIMIT));
    // BUG? module_bytes() sizes files with DirEntry::metadata, which does not follow symlinks:
    // a symlinked file is read and hashed but never counted against the limit.
    add("module of 17 MB via a symlinked file (inside the root)", gen(delta("too_big_via_link")), e(LIMIT));
    add("Poly with a [3, 7] router (expects [3, 8])", gen(task("poly_bad_router", 0)), e(SHAPE));
    add("pytorch_diff.bin truncated", gen(delta("sft_truncated")), e(MALFORMED));
    add("pytorch_diff.bin not a zip", gen(delta("sft_not_zip")), e(MALFORMED));
    add("pytorch_diff.bin with a garbage pickle", gen(delta("sft_garbage_pickle")), e(MALFORMED));
    add("pytorch_diff.bin with a truncated pickle", gen(delta("sft_truncated_pickle")), e(MALFORMED));
    add("pytorch_diff.bin pickle claiming a 4 GiB string", gen(delta("sft_pickle_bomb")), e(MALFORMED));
    add("pytorch_diff.bin with a truncated storage", gen(delta("sft_truncated_storage")), e(MALFORMED));
    add("pytorch_diff.bin with a memo deep-copy bomb pickle", gen(delta("sft_memo_bomb")), e(MALFORMED));
    add("pytorch_diff.bin with a pickle nested 200 000 deep", gen(delta("sft_deep_pickle")), e(MALFORMED));
    add("pytorch_diff.bin whose 1 MB data.pkl inflates to 300 MB", gen(delta("sft_inflating_pickle")), e(MALFORMED));
    add("task vector with a wrong shape", gen(delta("tv_wrong_shape")), e(SHAPE));
    add("task vector with a NaN", gen(delta("tv_nan")), e(NON_FINITE));
    add("a loose *.json at the root is not a module", gen(delta("notes.json")), e(UNKNOWN));
    add("a loose *.safetensors at the root is not a module", gen(delta("loose.safetensors")), e(UNKNOWN));
    add("recipe whose component is a named pipe (FIFO)", gen(delta("recipe_fifo")), e(UNSUPPORTED));
    add("describe of the FIFO recipe answers too", Call::Describe("recipe_fifo".into()), e(UNSUPPORTED));
    add("LoRA whose weights file is a named pipe", gen(delta("lora_fifo")), e(UNSUPPORTED));
    add("recipe referencing a missing file", gen(delta("recipe_missing")), e(RECIPE));
    add("recipe with a `..` path", gen(delta("recipe_dotdot")), e(RECIPE));
    add("recipe with lambda 1e999 (JSON stand-in for inf/NaN)", gen(delta("recipe_nan_lambda")), e(RECIPE));
    add("recipe with lambda \"NaN\" (string)", gen(delta("recipe_string_lambda")), e(RECIPE));
    add("recipe with an unknown method", gen(delta("recipe_unknown_method")), e(RECIPE));
    add("recipe whose component is garbage", gen(delta("recipe_bad_component")), e(MALFORMED));
    // The link leaves the adapter root, which the store refuses before the recipe is read.
    add(
        "recipe whose component is a symlink out of its folder",
        gen(delta("recipe_symlink_out")),
        e((Code::InvalidArgument, "adapter_path")),
    );
    add("symlink leaving the root is not registered at start", gen(delta("escape_link")), e(UNKNOWN));
    add("unknown peft_type is not registered at start", gen(delta("peft_unknown")), e(UNKNOWN));
    // BUG? The folder is inside the root but its weights file is a symlink to a file outside it;
    // the root confinement ("nothing outside is reachable") only checks the folder itself.
    add("module file symlinked to outside the root", gen(delta("inner_symlink")), e(PATH));
    add("a bad module fails again on retry (nothing cached)", gen(delta("st_truncated")), e(MALFORMED));
    add("good + bad module in one composition", gen(with_deltas(&[("lora_qv_r4", 1.0), ("lora_nan", 1.0)])), e(NON_FINITE));

    // --- Admin calls ------------------------------------------------------------------------------
    let reg = |id: &str, p: &str| Call::Register(id.into(), p.into());
    add("register unknown peft_type", reg("peft_unknown", ""), e(UNSUPPORTED));
    add("register malformed adapter_config.json", reg("cfg_malformed", ""), e(MALFORMED));
    add("register folder with no recognisable files", reg("empty_module", ""), e(UNSUPPORTED));
    add("register a symlink leaving the root", reg("escape", "escape_link"), e(PATH));
    add("register with `..`", reg("up", "../outside"), e(PATH));
    add("register id with `..` and no path", reg("../lora_qv_r4", ""), e(PATH));
    add("register absolute path", reg("abs", "/etc"), e(PATH));
    add("register empty id", reg("", "lora_qv_r4"), e(PATH));
    add("register id with '#'", reg("a#b", "lora_qv_r4"), e(PATH));
    add("register id with '@'", reg("a@b", "lora_qv_r4"), e(PATH));
    add("register id of 300 bytes", reg(&"x".repeat(300), "lora_qv_r4"), e(PATH));
    add("register a missing path", reg("ghost", "no/such/folder"), e((Code::NotFound, "adapter_io")));
    add("register a loose file explicitly (allowed: a task vector)", reg("loose_tv", "loose.safetensors"), Want::Ok);
    add("...and it serves", gen(delta("loose_tv")), Want::Ok);
    add("...and is evicted again (the cache check below)", Call::Evict("loose_tv".into()), Want::Ok);
    let long = "m".repeat(100_000);
    add("unknown module id of 100 KB", gen(delta(&long)), e(UNKNOWN));
    add("register a path of 100 KB", reg("long_path", &long), e((Code::NotFound, "adapter_io")));
    add("evict an id of 100 KB", Call::Evict(long.clone()), e(UNKNOWN));
    add("unregister unknown", Call::Unregister("no_such_module".into()), e(UNKNOWN));
    add("describe unknown", Call::Describe("no_such_module".into()), e(UNKNOWN));
    add("describe a broken module reports the load error", Call::Describe("lora_nan".into()), e(NON_FINITE));
    add("preload unknown", Call::Preload("no_such_module".into()), e(UNKNOWN));
    add("preload a broken module", Call::Preload("sft_garbage_pickle".into()), e(MALFORMED));
    add("evict unknown", Call::Evict("no_such_module".into()), e(UNKNOWN));
    add(
        "merge with a non-recipe path (LoRA folder)",
        Call::Merge("m_lora".into(), "tiny_ok".into()),
        e((Code::InvalidArgument, "merge_recipe")),
    );
    add("merge with an empty recipe path", Call::Merge("m_empty".into(), String::new()), e(PATH));
    add("merge with a `..` recipe path", Call::Merge("m_up".into(), "../recipe.json".into()), e(PATH));
    add("merge: recipe referencing a missing file", Call::Merge("m_missing".into(), "recipe_missing/recipe.json".into()), e(RECIPE));
    add("merge: recipe with a `..` component", Call::Merge("m_dotdot".into(), "recipe_dotdot".into()), e(RECIPE));
    add("merge: recipe with lambda 1e999", Call::Merge("m_nan".into(), "recipe_nan_lambda/recipe.json".into()), e(RECIPE));
    add("failed merge leaves no registration", Call::Describe("m_missing".into()), e(UNKNOWN));
    // A merge may not take an existing id (it would replace, and on failure delete, that module).
    add(
        "merge over an existing id with a non-recipe path",
        Call::Merge("sft_task".into(), "tiny_ok".into()),
        e((Code::AlreadyExists, "module_exists")),
    );
    add("...the existing module still serves after the failed merge", gen(delta("sft_task")), Want::Ok);
    v
}

/// Runs one call; for generation, unary and streaming must agree.
async fn run(c: &mut InferenceClient<Channel>, a: &mut AdaptersClient<Channel>, call: &Call) -> (Outcome, Option<Outcome>) {
    match call {
        Call::Gen(req) => {
            let unary = match c.generate(req.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let want = if req.max_new_tokens == 0 { 64 } else { req.max_new_tokens as usize };
                    if r.token_ids.len() == want || r.finish_reason != "length" {
                        Ok(())
                    } else {
                        Err((Code::Ok, "short".into(), format!("{} tokens, finish {}", r.token_ids.len(), r.finish_reason)))
                    }
                }
                Err(e) => err_outcome(e),
            };
            let stream = match c.generate_stream(req.clone()).await {
                Err(e) => err_outcome(e),
                Ok(s) => {
                    let mut s = s.into_inner();
                    let mut out = Ok(());
                    while let Some(item) = s.next().await {
                        if let Err(e) = item {
                            out = err_outcome(e);
                            break;
                        }
                    }
                    out
                }
            };
            (unary, Some(stream))
        }
        Call::Register(id, path) => {
            (a.register(pb::RegisterRequest { module_id: id.clone(), path: path.clone() }).await.map(|_| ()).or_else(err_outcome), None)
        }
        Call::Unregister(id) => (a.unregister(pb::ModuleRef { module_id: id.clone() }).await.map(|_| ()).or_else(err_outcome), None),
        Call::Describe(id) => (a.describe(pb::ModuleRef { module_id: id.clone() }).await.map(|_| ()).or_else(err_outcome), None),
        Call::Preload(id) => (a.preload(pb::ModuleRef { module_id: id.clone() }).await.map(|_| ()).or_else(err_outcome), None),
        Call::Evict(id) => (a.evict(pb::ModuleRef { module_id: id.clone() }).await.map(|_| ()).or_else(err_outcome), None),
        Call::Merge(id, p) => {
            (a.merge(pb::MergeRequest { module_id: id.clone(), recipe_path: p.clone() }).await.map(|_| ()).or_else(err_outcome), None)
        }
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Ids of the bad modules that are registered (at start) and must never become resident.
const BAD_REGISTERED: &[&str] = &[
    "st_truncated",
    "st_garbage",
    "st_empty",
    "lora_bin_garbage",
    "lora_no_weights",
    "lora_wrong_shape",
    "lora_rank_mismatch",
    "lora_cfg_rank_mismatch",
    "lora_missing_b",
    "lora_missing_layers",
    "lora_nan",
    "lora_inf",
    "lora_foo_proj",
    "lora_layer_oob",
    "lora_regex_targets",
    "lora_dora",
    "lora_modules_to_save",
    "lora_rank128",
    "too_big",
    "too_big_via_link",
    "poly_bad_router",
    "sft_truncated",
    "sft_not_zip",
    "sft_garbage_pickle",
    "sft_truncated_pickle",
    "sft_pickle_bomb",
    "sft_truncated_storage",
    "sft_memo_bomb",
    "sft_deep_pickle",
    "sft_inflating_pickle",
    "tv_wrong_shape",
    "tv_nan",
    "recipe_missing",
    "recipe_dotdot",
    "recipe_nan_lambda",
    "recipe_string_lambda",
    "recipe_unknown_method",
    "recipe_bad_component",
    "recipe_symlink_out",
    "recipe_fifo",
    "lora_fifo",
    "inner_symlink",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_table_then_server_still_serves_and_caches_nothing_broken() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    build_root(&root, &outside);
    let mut server = spawn(&[
        "--weights",
        "f32",
        "--adapter-root",
        root.to_str().unwrap(),
        "--max-prompt-tokens",
        "512",
        "--max-new-tokens-limit",
        "256",
        "--max-stop-strings",
        "4",
        "--max-stop-bytes",
        "32",
        "--max-components",
        "4",
        "--max-adapter-file-bytes",
        "16000000",
        "--max-adapter-rank",
        "64",
    ]);
    wait_serving(&server.url, Duration::from_secs(60)).await;
    let mut c = InferenceClient::connect(server.url.clone()).await.unwrap();
    let mut a = AdaptersClient::connect(server.url.clone()).await.unwrap();

    let listed: Vec<String> = a.list(pb::ListRequest {}).await.unwrap().into_inner().modules.into_iter().map(|m| m.module_id).collect();
    for id in BAD_REGISTERED.iter().chain(&["lora_qv_r4", "poly_qvup", "sft_lang", "sft_task", "tiny_ok"]) {
        assert!(listed.iter().any(|l| l == id), "{id} was not registered at start: {listed:?}");
    }
    for loose in ["notes.json", "loose.safetensors"] {
        assert!(!listed.iter().any(|l| l == loose), "the loose file {loose} was registered at start as a module");
    }

    // Warm the good modules the table uses successfully, then snapshot the cache.
    for req in [delta("lora_qv_r4"), task("poly_qvup", 0), delta("sft_task"), delta("sft_lang"), delta("tiny_ok"), weights(&[0.25; 4])] {
        c.generate(req).await.expect("warm-up");
    }
    let before = scrape(&server.metrics_addr);
    let entries0 = metric(&before, "modserve_adapter_cache_entries", "").unwrap();
    let bytes0 = metric(&before, "modserve_adapter_cache_bytes", "").unwrap();

    let hwm0 = vm_hwm_kb(server.child.id());
    let cases = table();
    let n = cases.len();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (got, stream) = tokio::time::timeout(Duration::from_secs(30), run(&mut c, &mut a, &case.call))
            .await
            .unwrap_or_else(|_| (Err((Code::DeadlineExceeded, "test_timeout".into(), "no answer in 30 s".into())), None));
        let mut ok = matches(case.want, &got);
        let mut line = format!("{:>3} {:<58} want {:<45} got {}", i + 1, case.name, format!("{:?}", case.want), show(&got));
        if let Some(s) = &stream {
            let same = matches(case.want, s);
            if !same {
                line.push_str(&format!(" | stream got {}", show(s)));
            }
            ok &= same;
        }
        println!("{} {line}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            failures.push(line);
        }
        // A crash is fatal for every later case: stop at once with a clear message.
        if let Some(st) = server.child.try_wait().unwrap() {
            panic!("the server died ({st}) during case {}: {}\nfailures so far:\n{}", i + 1, case.name, failures.join("\n"));
        }
    }
    println!("{} cases, {} failed", n, failures.len());
    // No hostile file made the server allocate far more than its size (the inflating pickle
    // alone would add 300 MB).
    let hwm1 = vm_hwm_kb(server.child.id());
    println!("server peak RSS: {} MB before the table, {} MB after", hwm0 / 1024, hwm1 / 1024);
    if hwm1.saturating_sub(hwm0) > 150 << 10 {
        failures.push(format!("the table raised the server's peak RSS by {} MB (bound 150 MB)", (hwm1 - hwm0) / 1024));
    }

    // Nothing broken became resident; the cache holds exactly what it held before the table.
    let modules = a.list(pb::ListRequest {}).await.unwrap().into_inner().modules;
    let resident_bad: Vec<&str> =
        modules.iter().filter(|m| m.resident && BAD_REGISTERED.contains(&m.module_id.as_str())).map(|m| m.module_id.as_str()).collect();
    let after = scrape(&server.metrics_addr);
    let entries1 = metric(&after, "modserve_adapter_cache_entries", "").unwrap();
    let bytes1 = metric(&after, "modserve_adapter_cache_bytes", "").unwrap();
    let load_failures: f64 = after
        .lines()
        .filter(|l| l.starts_with("modserve_adapter_load_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    println!("cache before: {entries0} entries / {bytes0} bytes; after: {entries1} / {bytes1}; load failures {load_failures}");
    // The server still serves the reference kit correctly (f32 weights: exact kit tokens).
    let kit = common::cases();
    let prompt: Vec<u32> = ids_of(&kit["prompt_token_ids"][0]);
    for (case, req) in [
        ("base", pb::GenerateRequest { ..small() }),
        ("lora_qv_r4", delta("lora_qv_r4")),
        ("poly_task1", task("poly_qvup", 1)),
        ("sft_lang", delta("sft_lang")),
    ] {
        let req = pb::GenerateRequest {
            prompt: Some(Prompt::TokenIds(pb::TokenIds { ids: prompt.clone() })),
            max_new_tokens: 16,
            min_new_tokens: 16,
            ..req
        };
        match c.generate(req).await {
            Ok(r) => {
                let got = r.into_inner().token_ids;
                let want = ids_of(&kit["cases"][case]["greedy"][0]);
                if got != want {
                    failures.push(format!("after the table, {case}: greedy tokens {got:?} != kit {want:?}"));
                }
            }
            Err(e) => failures.push(format!("after the table, {case} failed: {e}")),
        }
    }

    if load_failures < 30.0 {
        failures.push(format!("only {load_failures} adapter load failures counted"));
    }
    if !resident_bad.is_empty() {
        failures.push(format!("broken modules became resident: {resident_bad:?}"));
    }
    if (entries1, bytes1) != (entries0, bytes0) {
        failures.push(format!("the table changed the cache: {entries0} entries / {bytes0} bytes -> {entries1} / {bytes1}"));
    }
    assert!(failures.is_empty(), "{} problems ({n} cases):\n{}", failures.len(), failures.join("\n"));
}
