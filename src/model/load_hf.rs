//! Loading a Hugging Face directory of any supported family: `config.json` (`model::hf_config`),
//! `model.safetensors` or shards (float32, bf16 or f16, upcast to float32), `tokenizer.json`, and
//! the chat template (`tokenizer_config.json` or `chat_template.jinja`).
//!
//! Invariants: tensors are read by the family's Hugging Face names (Phi-3's fused `qkv_proj` and
//! `gate_up_proj` stay fused; Gemma's norms `w` become `1 + w`); a missing tensor or a wrong shape
//! is an error naming it; the result is immutable.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::assemble::{assemble_block, norm_multiplier, NormSlot};
use super::chat::ChatTemplate;
use super::config::LlamaConfig;
use super::linear::{BaseWeight, Linear, LinearId, Proj};
use super::llama::Llama;
use super::loaded::{LoadError, LoadOptions, LoadedModel};
use super::tokenizer;

/// Loads a Hugging Face directory: `config.json`, `model.safetensors` or shards (float32, bf16 or
/// f16), and optionally `tokenizer.json` / `tokenizer_config.json` / `chat_template.jinja`.
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| LoadError::Io { path: cfg_path.clone(), source })?;
    let cfg = LlamaConfig::from_hf_json(&text).map_err(|source| LoadError::Config { path: cfg_path.clone(), source })?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| LoadError::Io { path: dir.into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Format { path: dir.into(), reason: "no *.safetensors file".into() });
    }
    let dev = &opts.device;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, dev)
            .map_err(|e| LoadError::Format { path: f.clone(), reason: format!("unreadable safetensors: {e}") })?;
        tensors.extend(loaded);
    }
    let get = |name: &str, expected: &[usize]| -> Result<Tensor, LoadError> {
        let t = tensors.get(name).ok_or_else(|| LoadError::MissingTensor { path: dir.into(), name: name.into() })?;
        if t.dims() != expected {
            return Err(LoadError::Shape { path: dir.into(), name: name.into(), expected: expected.to_vec(), got: t.dims().to_vec() });
        }
        if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(LoadError::Format {
                path: dir.into(),
                reason: format!("tensor `{name}` has dtype {:?} (float32, bf16 or f16 expected)", t.dtype()),
            });
        }
        t.to_dtype(DType::F32).map_err(|source| LoadError::Candle { path: dir.into(), source })
    };
    let cd = |source| LoadError::Candle { path: dir.to_path_buf(), source };
    let h = cfg.hidden_size;
    let offset = cfg.arch.norm_weight_offset;
    let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    let final_norm = norm_multiplier(get("model.norm.weight", &[h])?, offset).map_err(cd)?;
    // Tied: the embeddings (transformers ignores a stored `lm_head.weight` then). Untied: the
    // checkpoint must hold the head; it is never silently replaced by the embeddings.
    let head = if cfg.tie_word_embeddings { embed.clone() } else { get("lm_head.weight", &[cfg.vocab_size, h])? };
    let lm_head = BaseWeight::from_dense(head, opts.weights).map_err(cd)?;
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let mut lin = |proj: Proj, out: usize, inp: usize, bias: bool| {
            let id = LinearId { layer: l, proj };
            let w = BaseWeight::from_dense(get(&id.hf_weight_name(), &[out, inp])?, opts.weights).map_err(cd)?;
            let b = if bias { Some(get(&format!("model.layers.{l}.{}.{}.bias", proj.hf_parent(), proj.hf_name()), &[out])?) } else { None };
            Ok::<_, LoadError>(Linear::new(id, w, out, inp).with_bias(b))
        };
        let sandwich = cfg.arch.sandwich_norms;
        let mut norm = |slot: NormSlot, len: usize| {
            let name = match slot {
                NormSlot::Input => "input_layernorm",
                NormSlot::PostAttn => "post_attention_layernorm",
                NormSlot::PreMlp if sandwich => "pre_feedforward_layernorm",
                NormSlot::PreMlp => "post_attention_layernorm",
                NormSlot::PostMlp => "post_feedforward_layernorm",
                NormSlot::Q => "self_attn.q_norm",
                NormSlot::K => "self_attn.k_norm",
            };
            norm_multiplier(get(&format!("model.layers.{l}.{name}.weight"), &[len])?, offset).map_err(cd)
        };
        blocks.push(assemble_block(&cfg, &mut lin, &mut norm)?);
    }
    let tok_path = dir.join("tokenizer.json");
    let tok = if tok_path.exists() {
        Some(
            tokenizer::tokenizer_from_file(&tok_path)
                .map_err(|e| LoadError::Tokenizer { path: tok_path.clone(), reason: e.to_string() })?,
        )
    } else {
        None
    };
    let chat_template = read_hf_chat_template(dir)?;
    let eos_token_ids = eos_ids(dir, &cfg.eos_token_ids)?;
    let llama = Llama::new(cfg, embed, blocks, final_norm, lm_head, dev.clone()).map_err(cd)?;
    Ok(LoadedModel {
        llama: std::sync::Arc::new(llama),
        tokenizer: tok,
        chat_template: chat_template.map(std::sync::Arc::new),
        eos_token_ids,
        source: dir.into(),
    })
}

/// The ids that end generation: `config.json`'s, plus `generation_config.json`'s (instruct models
/// list their end-of-turn token there, e.g. Gemma's `<end_of_turn>`).
fn eos_ids(dir: &Path, from_config: &[u32]) -> Result<Vec<u32>, LoadError> {
    let p = dir.join("generation_config.json");
    let mut ids = from_config.to_vec();
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(ids) };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Format { path: p.clone(), reason: e.to_string() })?;
    let more: Vec<u32> = match v.get("eos_token_id") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => vec![],
    };
    for id in more {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// The chat template of a Hugging Face folder: `tokenizer_config.json`'s `chat_template`, else
/// `chat_template.jinja` (transformers 5 writes it there), with the BOS / EOS strings of
/// `tokenizer_config.json`.
fn read_hf_chat_template(dir: &Path) -> Result<Option<ChatTemplate>, LoadError> {
    let p = dir.join("tokenizer_config.json");
    let v: serde_json::Value = match std::fs::read_to_string(&p) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| LoadError::Format { path: p.clone(), reason: e.to_string() })?,
        Err(_) => serde_json::Value::Null,
    };
    let special = |key: &str| -> String {
        match v.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
            None => String::new(),
        }
    };
    let jinja = dir.join("chat_template.jinja");
    // A string, or (older tokenizers) a list of `{name, template}` of which `default` is used.
    let in_config = match v.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template").and_then(|t| t.as_str()).map(String::from)),
        _ => None,
    };
    let (template, from) = match in_config {
        Some(t) => (t, p.clone()),
        None => match std::fs::read_to_string(&jinja) {
            Ok(t) => (t, jinja),
            Err(_) => return Ok(None),
        },
    };
    ChatTemplate::with_special_tokens(&template, &special("bos_token"), &special("eos_token"))
        .map(Some)
        .map_err(|e| LoadError::Tokenizer { path: from, reason: e.to_string() })
}
