//! Reading a GGUF file's metadata into a [`LlamaConfig`]: `general.architecture` picks the family,
//! whose `<arch>.*` keys and llama.cpp conventions fill the switches.
//!
//! Invariants: what llama.cpp assumes where the file is silent is assumed here too (Gemma 2 slides
//! on even layers, Gemma 3 on all but every 6th, attention scale `head_dim^-0.5` except for the
//! 27B sizes, norms stored as `1 + w`); a setting the decoder cannot reproduce (RoPE types other
//! than linear, Phi-3 long-RoPE factors, unfused Phi-3 projections) is refused, never ignored.
use candle_core::quantized::gguf_file::{Content, Value};

use super::config::{ConfigError, LlamaConfig};
use super::family::{Activation, Arch, Family, LayerAttn};

fn unsupported(family: Family, what: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported { family: format!("{family} (GGUF)"), what: what.into() }
}

impl LlamaConfig {
    /// Reads a GGUF file's metadata (`general.architecture` and that family's keys).
    pub fn from_gguf(content: &Content) -> Result<Self, ConfigError> {
        read(content)
    }
}

/// Reads the metadata of `content`.
pub fn read(content: &Content) -> Result<LlamaConfig, ConfigError> {
    let md = &content.metadata;
    let arch_name = get_str(md, "general.architecture")?;
    let family = Family::from_gguf_arch(&arch_name).ok_or_else(|| ConfigError::Architecture {
        name: arch_name.clone(),
        supported: "llama, qwen2, qwen3, gemma2, gemma3, phi3 (GGUF general.architecture)".into(),
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let u = |k: &str| get_u64(md, &key(k)).map(|v| v as usize);
    let has = |k: &str| md.contains_key(&key(k));
    let tensor = |n: &str| content.tensor_infos.contains_key(n);
    let is_gemma = matches!(family, Family::Gemma2 | Family::Gemma3);

    let heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let layers = u("block_count")?;
    let kv_heads = if has("attention.head_count_kv") { u("attention.head_count_kv")? } else { heads };
    let head_dim = match family {
        Family::Llama => u("attention.key_length").or_else(|_| u("rope.dimension_count")).unwrap_or(hidden / heads.max(1)),
        _ => u("attention.key_length").unwrap_or(hidden / heads.max(1)),
    };
    if has("attention.value_length") && u("attention.value_length")? != head_dim {
        return Err(unsupported(family, "attention.value_length different from key_length"));
    }
    let rotary_dim = if has("rope.dimension_count") { u("rope.dimension_count")? } else { head_dim };
    if rotary_dim != head_dim && family != Family::Phi3 {
        return Err(unsupported(family, format!("rope.dimension_count {rotary_dim} != head_dim {head_dim} (partial rotary)")));
    }
    let vocab = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => return Err(ConfigError::MissingKey { key: key("vocab_size") }),
        },
    };

    // RoPE.
    let theta = get_f64(md, &key("rope.freq_base")).unwrap_or(10_000.0);
    let theta_swa = get_f64(md, &key("rope.freq_base_swa")).unwrap_or(10_000.0);
    let linear = match get_str(md, &key("rope.scaling.type")).ok().as_deref() {
        None | Some("none") => 1.0,
        Some("linear") => get_f64(md, &key("rope.scaling.factor")).unwrap_or(1.0),
        Some(other) => return Err(unsupported(family, format!("rope.scaling.type `{other}`"))),
    };
    if tensor("rope_factors_long.weight") || tensor("rope_factors_short.weight") || tensor("blk.0.rope_freqs.weight") {
        return Err(unsupported(family, "per-dimension RoPE factors (long-context RoPE)"));
    }

    // Sliding windows, as llama.cpp lays them out.
    let window = match family {
        Family::Gemma2 | Family::Gemma3 => Some(if has("attention.sliding_window") { u("attention.sliding_window")? } else { 4096 }),
        Family::Phi3 if has("attention.sliding_window") => Some(u("attention.sliding_window")?).filter(|&w| w > 0),
        _ => None,
    };
    let sliding: Vec<bool> = match (family, md.get(&key("attention.sliding_window_pattern"))) {
        (Family::Gemma2 | Family::Gemma3, Some(Value::Array(a))) => {
            if a.len() != layers {
                return Err(ConfigError::BadKey {
                    key: key("attention.sliding_window_pattern"),
                    reason: format!("{} entries for {layers} layers", a.len()),
                });
            }
            a.iter().map(|v| matches!(v, Value::Bool(true))).collect()
        }
        (Family::Gemma2 | Family::Gemma3, Some(_)) => {
            let n = u("attention.sliding_window_pattern")?;
            (0..layers).map(|i| n == 0 || (i + 1) % n != 0).collect()
        }
        (Family::Gemma2, None) => (0..layers).map(|i| i % 2 == 0).collect(),
        (Family::Gemma3, None) => (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
        _ => vec![window.is_some(); layers],
    };
    let layer_attn: Vec<LayerAttn> = sliding
        .iter()
        .map(|&s| {
            let w = window.filter(|_| s);
            if family == Family::Gemma3 && w.is_some() {
                LayerAttn { window: w, rope_theta: theta_swa as f32, rope_linear_factor: 1.0 }
            } else {
                LayerAttn { window: w, rope_theta: theta as f32, rope_linear_factor: linear as f32 }
            }
        })
        .collect();

    let soft = |k: &str, default: Option<f64>| get_f64(md, &key(k)).ok().or(default).filter(|c| *c > 0.0).map(|c| c as f32);
    let (attn_softcap, final_softcap) = match family {
        Family::Gemma2 => (soft("attn_logit_softcapping", Some(50.0)), soft("final_logit_softcapping", Some(30.0))),
        Family::Gemma3 => (soft("attn_logit_softcapping", None), soft("final_logit_softcapping", None)),
        _ => (None, None),
    };
    // llama.cpp: Gemma 27B models scale by (hidden / heads)^-0.5 (their query_pre_attn_scalar).
    let is_27b = (family == Family::Gemma2 && layers == 46) || (family == Family::Gemma3 && layers == 62);
    let attn_scale = if is_27b { ((hidden / heads) as f64).powf(-0.5) } else { (head_dim as f64).powf(-0.5) } as f32;

    let fused = family == Family::Phi3;
    if fused && !tensor("blk.0.attn_qkv.weight") {
        return Err(unsupported(family, "separate attn_q/attn_k/attn_v tensors (expected the fused attn_qkv)"));
    }
    let mlp_bias = tensor("blk.0.ffn_down.bias") || tensor("blk.0.ffn_up.bias") || tensor("blk.0.ffn_gate.bias");
    if mlp_bias && family != Family::Llama {
        return Err(unsupported(family, "MLP biases"));
    }
    let arch = Arch {
        family,
        qkv_bias: tensor("blk.0.attn_q.bias") || tensor("blk.0.attn_qkv.bias"),
        o_bias: tensor("blk.0.attn_output.bias"),
        mlp_bias,
        qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
        norm_weight_offset: 0.0,
        sandwich_norms: is_gemma,
        embed_scale: is_gemma.then(|| (hidden as f64).sqrt() as f32),
        attn_scale,
        attn_softcap,
        final_softcap,
        activation: if is_gemma { Activation::GeluTanh } else { Activation::Silu },
        fused_qkv: fused,
        fused_gate_up: fused,
        rotary_dim,
        layers: layer_attn,
    };
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: get_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: theta as f32,
        max_position_embeddings: u("context_length").unwrap_or(4096),
        tie_word_embeddings: !tensor("output.weight"),
        bos_token_id: get_u64(md, "tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
        eos_token_ids: get_u64(md, "tokenizer.ggml.eos_token_id").ok().map(|v| vec![v as u32]).unwrap_or_default(),
        arch,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn get<'a>(md: &'a std::collections::HashMap<String, Value>, key: &str) -> Result<&'a Value, ConfigError> {
    md.get(key).ok_or_else(|| ConfigError::MissingKey { key: key.into() })
}

fn bad_key(key: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::BadKey { key: key.into(), reason: e.to_string() }
}

fn get_str(md: &std::collections::HashMap<String, Value>, key: &str) -> Result<String, ConfigError> {
    get(md, key)?.to_string().cloned().map_err(|e| bad_key(key, e))
}

fn get_u64(md: &std::collections::HashMap<String, Value>, key: &str) -> Result<u64, ConfigError> {
    let v = get(md, key)?;
    match v {
        Value::U8(x) => Ok(*x as u64),
        Value::U16(x) => Ok(*x as u64),
        Value::U32(x) => Ok(*x as u64),
        Value::U64(x) => Ok(*x),
        Value::I8(x) if *x >= 0 => Ok(*x as u64),
        Value::I16(x) if *x >= 0 => Ok(*x as u64),
        Value::I32(x) if *x >= 0 => Ok(*x as u64),
        Value::I64(x) if *x >= 0 => Ok(*x as u64),
        other => Err(bad_key(key, format!("expected a non-negative integer, got {:?}", other.value_type()))),
    }
}

fn get_f64(md: &std::collections::HashMap<String, Value>, key: &str) -> Result<f64, ConfigError> {
    match get(md, key)? {
        Value::F32(x) => Ok(*x as f64),
        Value::F64(x) => Ok(*x),
        other => Err(bad_key(key, format!("expected a float, got {:?}", other.value_type()))),
    }
}
