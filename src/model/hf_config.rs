//! Reading a Hugging Face `config.json` into a [`LlamaConfig`] for every supported family.
//!
//! Invariants: a key missing from the file takes the default of that family's transformers config
//! class (so a hand-written config means what transformers would make of it); every key that
//! changes the computation is either honoured or refused with [`ConfigError::Unsupported`]
//! naming it (RoPE types other than default/linear, quantized checkpoints, multimodal wrappers,
//! bidirectional attention, unknown activations and layer types, ...).
use serde_json::{Map, Value};

use super::config::{ConfigError, LlamaConfig};
use super::family::{windows_from_layer_types, Activation, Arch, Family, LayerAttn};

type Obj = Map<String, Value>;

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::BadKey { key: key.into(), reason: reason.into() }
}

fn unsupported(family: Family, what: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported { family: family.name().into(), what: what.into() }
}

/// `obj[key]` unless absent or null.
fn opt<'a>(o: &'a Obj, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn usize_of(o: &Obj, key: &str) -> Result<Option<usize>, ConfigError> {
    opt(o, key)
        .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| bad(key, format!("expected a non-negative integer, got {v}"))))
        .transpose()
}

fn req_usize(o: &Obj, key: &str) -> Result<usize, ConfigError> {
    usize_of(o, key)?.ok_or_else(|| ConfigError::MissingKey { key: key.into() })
}

fn f64_of(o: &Obj, key: &str) -> Result<Option<f64>, ConfigError> {
    opt(o, key).map(|v| v.as_f64().ok_or_else(|| bad(key, format!("expected a number, got {v}")))).transpose()
}

fn bool_of(o: &Obj, key: &str) -> Result<Option<bool>, ConfigError> {
    opt(o, key).map(|v| v.as_bool().ok_or_else(|| bad(key, format!("expected a boolean, got {v}")))).transpose()
}

fn str_of<'a>(o: &'a Obj, key: &str) -> Result<Option<&'a str>, ConfigError> {
    opt(o, key).map(|v| v.as_str().ok_or_else(|| bad(key, format!("expected a string, got {v}")))).transpose()
}

/// Detects the family from `model_type`, else `architectures`.
fn detect(o: &Obj) -> Result<Family, ConfigError> {
    if let Some(t) = str_of(o, "model_type")? {
        return Family::from_model_type(t).ok_or_else(|| {
            let hint = if t == "gemma3" { " (the multimodal Gemma 3 wrapper; only the text model `gemma3_text` is supported)" } else { "" };
            ConfigError::Architecture { name: format!("{t}{hint}"), supported: Family::supported_list() }
        });
    }
    let classes: Vec<&str> =
        opt(o, "architectures").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|c| c.as_str()).collect()).unwrap_or_default();
    match classes.first() {
        Some(c) => {
            Family::from_hf_class(c).ok_or_else(|| ConfigError::Architecture { name: (*c).into(), supported: Family::supported_list() })
        }
        // Older Llama configs carry neither key.
        None => Ok(Family::Llama),
    }
}

/// One RoPE setting: base, linear factor, partial rotary factor.
#[derive(Debug, Clone, Copy)]
struct Rope {
    theta: f64,
    linear: f64,
    partial: f64,
}

/// Parses one RoPE parameter object (`rope_parameters` of transformers 5, or 4's `rope_scaling`).
fn rope_params(family: Family, v: &Value, key: &str, mut base: Rope) -> Result<Rope, ConfigError> {
    let o = v.as_object().ok_or_else(|| bad(key, "expected an object"))?;
    let kind = str_of(o, "rope_type")?.or(str_of(o, "type")?).unwrap_or("default");
    match kind {
        "default" => {}
        "linear" => base.linear = f64_of(o, "factor")?.ok_or_else(|| bad(key, "linear RoPE scaling without `factor`"))?,
        other => return Err(unsupported(family, format!("{key}: rope_type `{other}` (only default and linear are implemented)"))),
    }
    if let Some(t) = f64_of(o, "rope_theta")? {
        base.theta = t;
    }
    if let Some(p) = f64_of(o, "partial_rotary_factor")? {
        base.partial = p;
    }
    Ok(base)
}

/// Per-family defaults of the transformers config classes.
struct Defaults {
    rms_norm_eps: f64,
    rope_theta: f64,
    tie: bool,
    sliding_window: Option<usize>,
}

fn defaults(f: Family) -> Defaults {
    let d = |rms_norm_eps, rope_theta, tie, sliding_window| Defaults { rms_norm_eps, rope_theta, tie, sliding_window };
    match f {
        Family::Llama => d(1e-6, 10_000.0, false, None),
        Family::Mistral => d(1e-6, 10_000.0, false, Some(4096)),
        Family::Qwen2 => d(1e-6, 10_000.0, false, Some(4096)),
        Family::Qwen3 => d(1e-6, 10_000.0, false, Some(4096)),
        Family::Gemma2 => d(1e-6, 10_000.0, true, Some(4096)),
        Family::Gemma3 => d(1e-6, 1_000_000.0, true, Some(4096)),
        Family::Phi3 => d(1e-5, 10_000.0, false, None),
    }
}

/// Keys that would change the computation in a way the decoder does not implement.
fn refuse_unsupported(f: Family, o: &Obj) -> Result<(), ConfigError> {
    for key in ["quantization_config", "text_config", "vision_config", "dual_chunk_attention_config", "num_experts", "num_local_experts"] {
        if opt(o, key).is_some() {
            return Err(unsupported(f, format!("config key `{key}`")));
        }
    }
    if bool_of(o, "use_bidirectional_attention")? == Some(true) {
        return Err(unsupported(f, "use_bidirectional_attention = true"));
    }
    Ok(())
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` of any supported family.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        read(text)
    }
}

/// Reads `config.json` text.
pub fn read(text: &str) -> Result<LlamaConfig, ConfigError> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad("config.json", e.to_string()))?;
    let o = v.as_object().ok_or_else(|| bad("config.json", "expected a JSON object"))?;
    let family = detect(o)?;
    refuse_unsupported(family, o)?;
    let d = defaults(family);
    let is_gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let hidden = req_usize(o, "hidden_size")?;
    let heads = req_usize(o, "num_attention_heads")?;
    let layers = req_usize(o, "num_hidden_layers")?;
    let head_dim = match usize_of(o, "head_dim")? {
        Some(h) => h,
        None if is_gemma => 256,
        None if family == Family::Qwen3 => 128,
        None => hidden / heads.max(1),
    };

    // RoPE: transformers 5 `rope_parameters` (flat, or per layer type), else 4's keys.
    let mut global = Rope { theta: f64_of(o, "rope_theta")?.unwrap_or(d.rope_theta), linear: 1.0, partial: 1.0 };
    if let Some(p) = f64_of(o, "partial_rotary_factor")? {
        global.partial = p;
    }
    let mut local = Rope { theta: f64_of(o, "rope_local_base_freq")?.unwrap_or(10_000.0), linear: 1.0, partial: 1.0 };
    if let Some(rs) = opt(o, "rope_scaling") {
        global = rope_params(family, rs, "rope_scaling", global)?;
    }
    if let Some(rp) = opt(o, "rope_parameters") {
        let rpo = rp.as_object().ok_or_else(|| bad("rope_parameters", "expected an object"))?;
        if rpo.contains_key("full_attention") || rpo.contains_key("sliding_attention") {
            if let Some(g) = rpo.get("full_attention") {
                global = rope_params(family, g, "rope_parameters.full_attention", global)?;
            }
            if let Some(l) = rpo.get("sliding_attention") {
                local = rope_params(family, l, "rope_parameters.sliding_attention", local)?;
            }
        } else {
            global = rope_params(family, rp, "rope_parameters", global)?;
        }
    }
    if family != Family::Gemma3 {
        // Only Gemma 3 gives sliding layers their own RoPE.
        local = global;
    }
    let rotary_dim = if (global.partial - 1.0).abs() > 1e-9 || (local.partial - 1.0).abs() > 1e-9 {
        if family != Family::Phi3 {
            return Err(unsupported(family, format!("partial_rotary_factor {} (only Phi-3 applies it)", global.partial)));
        }
        (head_dim as f64 * global.partial) as usize
    } else {
        head_dim
    };

    // Sliding windows.
    let window = if o.contains_key("sliding_window") { usize_of(o, "sliding_window")? } else { d.sliding_window };
    let window = match family {
        Family::Qwen2 | Family::Qwen3 if bool_of(o, "use_sliding_window")? != Some(true) => None,
        _ => window,
    };
    if window == Some(0) {
        return Err(bad("sliding_window", "must be positive"));
    }
    let windows: Vec<Option<usize>> = match opt(o, "layer_types") {
        Some(lt) => {
            let types: Vec<String> = serde_json::from_value(lt.clone()).map_err(|e| bad("layer_types", e.to_string()))?;
            if types.len() != layers {
                return Err(bad("layer_types", format!("{} entries for {layers} layers", types.len())));
            }
            if family == Family::Llama && types.iter().any(|t| t != "full_attention") {
                return Err(unsupported(family, "sliding layers in layer_types"));
            }
            windows_from_layer_types(&types, window).map_err(|e| unsupported(family, e))?
        }
        None => {
            // The family's default layout where the file has no `layer_types`.
            let first_sliding = usize_of(o, "max_window_layers")?.unwrap_or(28);
            let pattern = match usize_of(o, "sliding_window_pattern")? {
                Some(p) => p,
                None => usize_of(o, "_sliding_window_pattern")?.unwrap_or(6),
            };
            (0..layers)
                .map(|i| match family {
                    Family::Llama => None,
                    Family::Mistral | Family::Phi3 => window,
                    Family::Qwen2 | Family::Qwen3 => window.filter(|_| i >= first_sliding),
                    Family::Gemma2 => window.filter(|_| i % 2 == 0),
                    Family::Gemma3 => window.filter(|_| pattern == 0 || (i + 1) % pattern != 0),
                })
                .collect()
        }
    };
    let layer_attn: Vec<LayerAttn> = windows
        .iter()
        .map(|&w| {
            let r = if w.is_some() { local } else { global };
            LayerAttn { window: w, rope_theta: r.theta as f32, rope_linear_factor: r.linear as f32 }
        })
        .collect();

    // Activation, biases, norms, scales.
    let act_name = if is_gemma {
        str_of(o, "hidden_activation")?.or(str_of(o, "hidden_act")?).unwrap_or("gelu_pytorch_tanh")
    } else {
        str_of(o, "hidden_act")?.unwrap_or("silu")
    };
    let activation = Activation::from_hf_name(act_name).ok_or_else(|| unsupported(family, format!("activation `{act_name}`")))?;
    let attention_bias = bool_of(o, "attention_bias")?.unwrap_or(false);
    let mlp_bias = bool_of(o, "mlp_bias")?.unwrap_or(false);
    if mlp_bias && family != Family::Llama {
        return Err(unsupported(family, "mlp_bias = true"));
    }
    let (qkv_bias, o_bias) = match family {
        Family::Qwen2 => (true, false),
        Family::Llama | Family::Qwen3 | Family::Gemma2 | Family::Gemma3 => (attention_bias, attention_bias),
        Family::Mistral | Family::Phi3 => (false, false),
    };
    let soft = |key: &str, default: Option<f64>| -> Result<Option<f32>, ConfigError> {
        let v = if o.contains_key(key) { f64_of(o, key)? } else { default };
        match v {
            Some(c) if c <= 0.0 => Err(bad(key, "must be positive")),
            other => Ok(other.map(|c| c as f32)),
        }
    };
    let (attn_softcap, final_softcap) = match family {
        Family::Gemma2 => (soft("attn_logit_softcapping", Some(50.0))?, soft("final_logit_softcapping", Some(30.0))?),
        Family::Gemma3 => (soft("attn_logit_softcapping", None)?, soft("final_logit_softcapping", None)?),
        _ => (None, None),
    };
    let attn_scale = if is_gemma {
        let qpas = f64_of(o, "query_pre_attn_scalar")?.unwrap_or(256.0);
        if qpas <= 0.0 {
            return Err(bad("query_pre_attn_scalar", "must be positive"));
        }
        qpas.powf(-0.5) as f32
    } else {
        (head_dim as f64).powf(-0.5) as f32
    };
    let arch = Arch {
        family,
        qkv_bias,
        o_bias,
        mlp_bias,
        qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
        norm_weight_offset: if is_gemma { 1.0 } else { 0.0 },
        sandwich_norms: is_gemma,
        embed_scale: is_gemma.then(|| (hidden as f64).sqrt() as f32),
        attn_scale,
        attn_softcap,
        final_softcap,
        activation,
        fused_qkv: family == Family::Phi3,
        fused_gate_up: family == Family::Phi3,
        rotary_dim,
        layers: layer_attn,
    };

    let eos_token_ids = match opt(o, "eos_token_id") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|i| i as u32).ok_or_else(|| bad("eos_token_id", "expected integers")))
            .collect::<Result<_, _>>()?,
        Some(x) => vec![x.as_u64().ok_or_else(|| bad("eos_token_id", "expected an integer"))? as u32],
    };
    let cfg = LlamaConfig {
        vocab_size: req_usize(o, "vocab_size")?,
        hidden_size: hidden,
        intermediate_size: req_usize(o, "intermediate_size")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: usize_of(o, "num_key_value_heads")?.unwrap_or(heads),
        head_dim,
        rms_norm_eps: f64_of(o, "rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
        rope_theta: global.theta as f32,
        max_position_embeddings: usize_of(o, "max_position_embeddings")?.unwrap_or(4096),
        tie_word_embeddings: bool_of(o, "tie_word_embeddings")?.unwrap_or(d.tie),
        bos_token_id: usize_of(o, "bos_token_id")?.map(|b| b as u32),
        eos_token_ids,
        arch,
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":4,"num_attention_heads":2"#;

    fn cfg(extra: &str) -> Result<LlamaConfig, ConfigError> {
        read(&format!("{{{BASE}{extra}}}"))
    }

    #[test]
    fn mistral_slides_every_layer_and_qwen2_only_when_enabled() {
        let c = cfg(r#","model_type":"mistral","sliding_window":3"#).unwrap();
        assert!(c.arch.layers.iter().all(|l| l.window == Some(3)));
        let c = cfg(r#","model_type":"mistral","sliding_window":null"#).unwrap();
        assert!(c.arch.layers.iter().all(|l| l.window.is_none()));
        let c = cfg(r#","model_type":"qwen2","sliding_window":3,"use_sliding_window":false"#).unwrap();
        assert!(c.arch.qkv_bias && !c.arch.o_bias && c.arch.layers.iter().all(|l| l.window.is_none()));
        let c = cfg(r#","model_type":"qwen2","sliding_window":3,"use_sliding_window":true,"max_window_layers":2"#).unwrap();
        let w: Vec<_> = c.arch.layers.iter().map(|l| l.window).collect();
        assert_eq!(w, vec![None, None, Some(3), Some(3)]);
    }

    #[test]
    fn gemma_defaults_follow_the_transformers_classes() {
        let c = cfg(r#","model_type":"gemma2","head_dim":4"#).unwrap();
        assert_eq!(c.arch.attn_softcap, Some(50.0));
        assert_eq!(c.arch.final_softcap, Some(30.0));
        assert_eq!(c.arch.attn_scale, (256f64).powf(-0.5) as f32);
        let w: Vec<_> = c.arch.layers.iter().map(|l| l.window).collect();
        assert_eq!(w, vec![Some(4096), None, Some(4096), None]);
        assert_eq!(c.arch.activation, Activation::GeluTanh);
        assert!(c.tie_word_embeddings && c.arch.sandwich_norms && c.arch.norm_weight_offset == 1.0);
        let c = cfg(r#","model_type":"gemma3_text","head_dim":4,"sliding_window_pattern":2,"rope_theta":1e6,"rope_local_base_freq":1e4,
                      "rope_scaling":{"rope_type":"linear","factor":8.0}"#)
        .unwrap();
        let l: Vec<_> = c.arch.layers.iter().map(|l| (l.window.is_some(), l.rope_theta, l.rope_linear_factor)).collect();
        assert_eq!(l, vec![(true, 1e4, 1.0), (false, 1e6, 8.0), (true, 1e4, 1.0), (false, 1e6, 8.0)]);
        assert!(c.arch.qk_norm && c.arch.attn_softcap.is_none());
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        for (extra, needle) in [
            (r#","model_type":"gpt_neox""#, "gpt_neox"),
            (r#","model_type":"gemma3""#, "gemma3_text"),
            (r#","model_type":"llama","rope_scaling":{"rope_type":"llama3","factor":8.0}"#, "llama3"),
            (r#","model_type":"llama","hidden_act":"relu2""#, "relu2"),
            (r#","model_type":"qwen2","quantization_config":{"quant_method":"awq"}"#, "quantization_config"),
            (r#","model_type":"mistral","partial_rotary_factor":0.5"#, "partial_rotary_factor"),
            (
                r#","model_type":"gemma2","head_dim":4,"layer_types":["chunked_attention","full_attention","full_attention","full_attention"]"#,
                "chunked_attention",
            ),
            (r#","model_type":"gemma3_text","head_dim":4,"use_bidirectional_attention":true"#, "bidirectional"),
        ] {
            let e = cfg(extra).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = cfg(r#","model_type":"gpt_neox""#).unwrap_err().to_string();
        assert!(e.contains("phi3") && e.contains("gemma2"), "{e}");
    }

    #[test]
    fn phi3_partial_rotary_and_fused_projections() {
        let c =
            cfg(r#","model_type":"phi3","rope_parameters":{"rope_type":"default","rope_theta":1e4,"partial_rotary_factor":0.5}"#).unwrap();
        assert_eq!(c.arch.rotary_dim, 2);
        assert!(c.arch.fused_qkv && c.arch.fused_gate_up && !c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
    }

    #[test]
    fn hf_config_defaults_and_gqa() {
        let c = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":true,
                "eos_token_id":[2,3],"model_type":"llama"}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 2);
        assert_eq!(c.group_size(), 2);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn reads_rope_theta_from_transformers_5_rope_parameters() {
        let c = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":4,"rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 100000.0);
        let e = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":4,"rope_parameters":{"rope_theta":1.0,"rope_type":"yarn"}}"#,
        );
        assert!(e.is_err());
    }

    #[test]
    fn rejects_bad_gqa_and_architecture() {
        let e = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":3}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), "model_config");
        let e = LlamaConfig::from_hf_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":4,"model_type":"gpt2"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Architecture { .. }));
    }
}
