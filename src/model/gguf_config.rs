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
        // End of sequence, and llama.cpp's end of turn where the file names one (instruct models).
        eos_token_ids: ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"].iter().fold(Vec::new(), |mut ids, k| {
            if let Ok(v) = get_u64(md, k) {
                if !ids.contains(&(v as u32)) {
                    ids.push(v as u32);
                }
            }
            ids
        }),
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
    use candle_core::quantized::GgmlDType;

    use super::*;

    /// Metadata of a 4-layer model of `arch` (hidden 8, 2 heads, head_dim 4), plus `extra`, and
    /// tensors named `tensors` (shapes do not matter to the config reader).
    fn content(arch: &str, extra: &[(&str, Value)], tensors: &[&str]) -> Content {
        let mut md = HashMap::new();
        let k = |s: &str| format!("{arch}.{s}");
        md.insert("general.architecture".to_string(), Value::String(arch.into()));
        for (key, v) in
            [("block_count", 4u32), ("embedding_length", 8), ("feed_forward_length", 16), ("attention.head_count", 2), ("vocab_size", 10)]
        {
            md.insert(k(key), Value::U32(v));
        }
        for (key, v) in extra {
            md.insert(k(key), v.clone());
        }
        let info = || TensorInfo { ggml_dtype: GgmlDType::F32, shape: candle_core::Shape::from(vec![1]), offset: 0 };
        let tensor_infos = tensors.iter().map(|t| (t.to_string(), info())).collect();
        Content { magic: VersionedMagic::GgufV3, metadata: md, tensor_infos, tensor_data_offset: 0 }
    }

    #[test]
    fn llama_cpp_layouts_per_family() {
        let windows = |c: &LlamaConfig| c.arch.layers.iter().map(|l| l.window).collect::<Vec<_>>();
        let c = read(&content("gemma2", &[("attention.sliding_window", Value::U32(5))], &[])).unwrap();
        assert_eq!(windows(&c), vec![Some(5), None, Some(5), None]);
        assert_eq!((c.arch.attn_softcap, c.arch.final_softcap), (Some(50.0), Some(30.0)));
        assert!(c.arch.sandwich_norms && c.arch.norm_weight_offset == 0.0 && c.arch.embed_scale == Some((8f64).sqrt() as f32));
        let pattern = Value::Array(vec![Value::Bool(true), Value::Bool(false), Value::Bool(false), Value::Bool(true)]);
        let c =
            read(&content("gemma3", &[("attention.sliding_window", Value::U32(3)), ("attention.sliding_window_pattern", pattern)], &[]))
                .unwrap();
        assert_eq!(windows(&c), vec![Some(3), None, None, Some(3)]);
        let c = read(&content("gemma3", &[("rope.freq_base_swa", Value::F32(7.0))], &[])).unwrap();
        assert_eq!(windows(&c), vec![Some(4096), Some(4096), Some(4096), Some(4096)]);
        assert_eq!(c.arch.layers[0].rope_theta, 7.0);
        let c = read(&content("phi3", &[("attention.sliding_window", Value::U32(0))], &["blk.0.attn_qkv.weight"])).unwrap();
        assert!(c.arch.fused_qkv && windows(&c).iter().all(|w| w.is_none()));
        let c = read(&content(
            "phi3",
            &[("attention.sliding_window", Value::U32(6)), ("rope.dimension_count", Value::U32(2))],
            &["blk.0.attn_qkv.weight"],
        ))
        .unwrap();
        assert_eq!((windows(&c)[3], c.rotary_dim()), (Some(6), 2));
        let mut q = content("qwen2", &[], &["blk.0.attn_q.bias"]);
        q.metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        q.metadata.insert("tokenizer.ggml.eot_token_id".into(), Value::U32(106));
        assert_eq!(read(&q).unwrap().eos_token_ids, vec![1, 106]);
        let c = read(&content("qwen2", &[], &["blk.0.attn_q.bias"])).unwrap();
        assert!(c.arch.qkv_bias && !c.arch.o_bias && !c.arch.qk_norm);
        assert!(read(&content("qwen3", &[], &[])).unwrap().arch.qk_norm);
    }

    #[test]
    fn refuses_what_the_decoder_cannot_reproduce() {
        for (c, needle) in [
            (content("falcon", &[], &[]), "falcon"),
            (content("phi3", &[], &[]), "attn_qkv"),
            (content("phi3", &[], &["blk.0.attn_qkv.weight", "rope_factors_long.weight"]), "RoPE factors"),
            (content("llama", &[("rope.scaling.type", Value::String("yarn".into()))], &[]), "yarn"),
            (content("qwen2", &[("rope.dimension_count", Value::U32(2))], &[]), "partial rotary"),
            (content("gemma2", &[], &["blk.0.ffn_down.bias"]), "MLP biases"),
        ] {
            let e = read(&c).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
