//! Hyper-parameters of a Llama-family decoder, read from GGUF metadata (`llama.*` keys) or from a
//! Hugging Face `config.json`. Invariant: `head_dim * num_attention_heads` is the attention width and
//! `num_attention_heads` is a multiple of `num_key_value_heads` (checked by [`LlamaConfig::validate`]).
use candle_core::quantized::gguf_file::{Content, Value};
use serde::Deserialize;

/// Errors raised while reading or checking a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("model metadata is missing key `{key}`")]
    MissingKey { key: String },
    #[error("model metadata key `{key}` has the wrong type: {reason}")]
    BadKey { key: String, reason: String },
    #[error("unsupported architecture `{0}` (only the llama family is supported)")]
    Architecture(String),
    #[error("inconsistent model config: {0}")]
    Inconsistent(String),
}

impl ConfigError {
    /// Stable code string for logs, metrics and gRPC details.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } | Self::BadKey { .. } => "model_metadata",
            Self::Architecture(_) => "model_architecture",
            Self::Inconsistent(_) => "model_config",
        }
    }
}

/// The shape of the decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Number of query heads sharing one key/value head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Inconsistent(m));
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even and non-zero", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab, hidden size and layer count must be non-zero".into());
        }
        Ok(())
    }

    /// Reads the `llama.*` keys of a GGUF file.
    pub fn from_gguf(content: &Content) -> Result<Self, ConfigError> {
        let md = &content.metadata;
        let arch = get_str(md, "general.architecture")?;
        if arch != "llama" {
            return Err(ConfigError::Architecture(arch));
        }
        let u = |k: &str| get_u64(md, &format!("llama.{k}")).map(|v| v as usize);
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = u("attention.key_length").or_else(|_| u("rope.dimension_count")).unwrap_or(hidden / heads.max(1));
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => match md.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => return Err(ConfigError::MissingKey { key: "llama.vocab_size".into() }),
            },
        };
        let has_output = content.tensor_infos.contains_key("output.weight");
        let cfg = Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: get_f64(md, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f64(md, "llama.rope.freq_base").unwrap_or(10_000.0) as f32,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !has_output,
            bos_token_id: get_u64(md, "tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
            eos_token_ids: get_u64(md, "tokenizer.ggml.eos_token_id").ok().map(|v| vec![v as u32]).unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (LlamaForCausalLM and compatible).
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Ids {
            One(u32),
            Many(Vec<u32>),
        }
        #[derive(Deserialize)]
        struct Hf {
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rms_norm_eps: Option<f64>,
            rope_theta: Option<f64>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
            bos_token_id: Option<u32>,
            eos_token_id: Option<Ids>,
            model_type: Option<String>,
            rope_scaling: Option<serde_json::Value>,
            /// transformers >= 5 keeps `rope_theta` here.
            rope_parameters: Option<serde_json::Value>,
        }
        let hf: Hf = serde_json::from_str(text).map_err(|e| ConfigError::BadKey { key: "config.json".into(), reason: e.to_string() })?;
        if let Some(t) = &hf.model_type {
            if t != "llama" && t != "mistral" {
                return Err(ConfigError::Architecture(t.clone()));
            }
        }
        if let Some(rs) = &hf.rope_scaling {
            if !rs.is_null() {
                return Err(ConfigError::Inconsistent(format!("rope_scaling {rs} is not supported")));
            }
        }
        let mut rope_theta = hf.rope_theta;
        if let Some(rp) = &hf.rope_parameters {
            if let Some(t) = rp.get("rope_type").and_then(|t| t.as_str()) {
                if t != "default" {
                    return Err(ConfigError::Inconsistent(format!("rope_type `{t}` is not supported")));
                }
            }
            if let Some(t) = rp.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = Some(t);
            }
        }
        let cfg = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0) as f32,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_ids: match hf.eos_token_id {
                Some(Ids::One(i)) => vec![i],
                Some(Ids::Many(v)) => v,
                None => vec![],
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
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
    use super::*;

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
        assert!(matches!(e, ConfigError::Architecture(_)));
    }
}
