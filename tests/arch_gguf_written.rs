//! GGUF files for the families whose kit ships none (qwen2, mistral, gemma2), written here from the
//! kit's HF folders the way llama.cpp's converter lays them out (qwen2: `qwen2` with q/k/v biases,
//! HF row order; mistral: `llama`, q/k rows permuted for interleaved RoPE and no sliding-window
//! key; gemma2: `gemma2`, norms stored as `1 + w`, soft-caps and window as metadata), then loaded by
//! the GGUF reader:
//! - qwen2 reproduces the kit (base and LoRA logits, top-5, greedy);
//! - mistral, which the `llama` architecture cannot express with its window, runs full attention
//!   as llama.cpp does: equal to the kit on the 8-token prompt (shorter than the window of 16);
//! - gemma2, whose GGUF cannot express `query_pre_attn_scalar` 24 (llama.cpp scales by
//!   head_dim^-0.5), equals the HF folder with `query_pre_attn_scalar` set to head_dim.
mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::arch::{assert_logits_match, cases, dir, ids_of, prompts, reference_logits, Family};
use modserve::engine::step::run_to_completion;
use modserve::model::linear::WeightMode;
use modserve::model::load::gguf_row_of_hf_row;

/// The GGUF name of an HF tensor (`None`: not written).
fn gguf_name(hf: &str, gemma: bool) -> Option<String> {
    let map = |s: &str| -> Option<&'static str> {
        Some(match s {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" if gemma => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        })
    };
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    Some(format!("blk.{layer}.{}.{kind}", map(module)?))
}

/// Writes `family`'s HF folder as a GGUF of `arch` with `metadata` (beside the architecture keys).
fn write_gguf(family: &str, arch: &str, path: &Path, extra: &[(&str, Value)]) {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir(family).join("model/config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let head_dim = cfg["head_dim"].as_u64().map_or(u("hidden_size") / u("num_attention_heads"), |h| h as u32) as usize;
    let gemma = arch.starts_with("gemma");
    let permute = arch == "llama";
    let weights = candle_core::safetensors::load(dir(family).join("model/model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let Some(g) = gguf_name(name, gemma) else { panic!("{family}: no GGUF name for {name}") };
        let mut t = t.to_dtype(DType::F32).unwrap();
        if gemma && name.ends_with("norm.weight") {
            t = (t + 1.0).unwrap();
        }
        if permute && (name.contains("q_proj") || name.contains("k_proj")) {
            let rows = t.dim(0).unwrap();
            let mut idx = vec![0u32; rows];
            for r in 0..rows {
                idx[gguf_row_of_hf_row(r, head_dim)] = r as u32;
            }
            t = t.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
        }
        tensors.push((g, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("block_count"), Value::U32(u("num_hidden_layers"))),
        (k("vocab_size"), Value::U32(u("vocab_size"))),
        (k("context_length"), Value::U32(u("max_position_embeddings"))),
        (k("embedding_length"), Value::U32(u("hidden_size"))),
        (k("feed_forward_length"), Value::U32(u("intermediate_size"))),
        (k("attention.head_count"), Value::U32(u("num_attention_heads"))),
        (k("attention.head_count_kv"), Value::U32(u("num_key_value_heads"))),
        (k("attention.key_length"), Value::U32(head_dim as u32)),
        (k("attention.value_length"), Value::U32(head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(head_dim as u32)),
        (k("rope.freq_base"), Value::F32(cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    md.extend(extra.iter().map(|(key, v)| (k(key), v.clone())));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(a, b)| (a.as_str(), b)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(a, b)| (a.as_str(), b)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn qwen2_gguf_with_biases_reproduces_the_kit() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen2.gguf");
    write_gguf("qwen2", "qwen2", &path, &[]);
    let fam = Family::load_from("qwen2", path, WeightMode::F32);
    assert!(fam.model.llama.cfg.arch.qkv_bias && !fam.model.llama.cfg.arch.o_bias);
    let cases = cases();
    let lora = fam.composition(&[("lora", 1.0)]);
    for case in ["base", "lora"] {
        let c = &cases["archs"]["qwen2"]["cases"][case];
        let comp = (case == "lora").then_some(&lora);
        let reference = reference_logits(&cases, "qwen2", case);
        for (p, ids) in prompts(&cases).iter().enumerate() {
            let what = format!("qwen2 GGUF {case} prompt {p}");
            assert_logits_match(
                &what,
                &fam.logits(comp.map(|c| c.as_ref()), ids),
                &reference[p],
                &c["top5_ids"][p],
                &c["top5_logprobs"][p],
            );
            let mut s = fam.sequence(ids, 16, comp);
            run_to_completion(&fam.model.llama, &mut [&mut s], 9).unwrap();
            assert_eq!(s.generated, ids_of(&c["greedy"][p]), "{what}: greedy");
        }
    }
}

#[test]
fn mistral_as_llama_gguf_unpermutes_and_runs_full_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mistral.gguf");
    write_gguf("mistral", "llama", &path, &[]);
    let fam = Family::load_from("mistral", path, WeightMode::F32);
    assert!(fam.model.llama.cfg.arch.layers.iter().all(|l| l.window.is_none()), "a llama GGUF has no window");
    let cases = cases();
    let c = &cases["archs"]["mistral"]["cases"]["base"];
    let reference = reference_logits(&cases, "mistral", "base");
    let ids = &prompts(&cases)[0];
    assert!(ids.len() <= 16);
    assert_logits_match("mistral-as-llama GGUF prompt 0", &fam.logits(None, ids), &reference[0], &c["top5_ids"][0], &c["top5_logprobs"][0]);
}

#[test]
fn gemma2_gguf_equals_its_folder_under_llama_cpp_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gemma2.gguf");
    write_gguf(
        "gemma2",
        "gemma2",
        &path,
        &[
            ("attention.sliding_window", Value::U32(8)),
            ("attn_logit_softcapping", Value::F32(2.0)),
            ("final_logit_softcapping", Value::F32(5.0)),
        ],
    );
    let gguf = Family::load_from("gemma2", path, WeightMode::F32);
    // The folder with query_pre_attn_scalar = head_dim, which is what the GGUF computes.
    let folder = tmp.path().join("gemma2_hd");
    std::fs::create_dir_all(&folder).unwrap();
    let mut cfg: HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir("gemma2").join("model/config.json")).unwrap()).unwrap();
    cfg.insert("query_pre_attn_scalar".into(), serde_json::json!(16));
    std::fs::write(folder.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    std::fs::copy(dir("gemma2").join("model/model.safetensors"), folder.join("model.safetensors")).unwrap();
    let hf = Family::load_from("gemma2", folder, WeightMode::F32);
    assert_eq!(gguf.model.llama.cfg.arch.layers, hf.model.llama.cfg.arch.layers);
    let lora_g = gguf.composition(&[("lora", 1.0)]);
    let lora_h = hf.composition(&[("lora", 1.0)]);
    for (p, ids) in prompts(&cases()).iter().enumerate() {
        for (a, b) in [
            (gguf.logits(None, ids), hf.logits(None, ids)),
            (gguf.logits(Some(lora_g.as_ref()), ids), hf.logits(Some(lora_h.as_ref()), ids)),
        ] {
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-4, "gemma2 GGUF vs folder, prompt {p}: max |logit diff| {diff}");
        }
    }
    // And the scale matters: the kit's own folder (scalar 24) differs.
    let kit = Family::hf("gemma2", WeightMode::F32);
    let ids = &prompts(&cases())[2];
    let diff = kit.logits(None, ids).iter().zip(&gguf.logits(None, ids)).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff > 0.05, "query_pre_attn_scalar made no difference ({diff})");
}
