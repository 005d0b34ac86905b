//! Hyper-parameters of the shared decoder, read from GGUF metadata (`model::gguf_config`) or
//! from a Hugging Face `config.json` (`model::hf_config`), with the family's switches in
//! [`LlamaConfig::arch`]. Invariant: `head_dim * num_attention_heads` is the attention width,
//! `num_attention_heads` is a multiple of `num_key_value_heads`, and `arch.layers` is empty or
//! has one entry per layer (checked by [`LlamaConfig::validate`]).
use super::family::{Arch, LayerAttn};

/// Errors raised while reading or checking a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("model metadata is missing key `{key}`")]
    MissingKey { key: String },
    #[error("model metadata key `{key}` has the wrong type: {reason}")]
    BadKey { key: String, reason: String },
    #[error("unsupported model family `{name}` (supported: {supported})")]
    Architecture { name: String, supported: String },
    #[error("{family}: {what} is not supported")]
    Unsupported { family: String, what: String },
    #[error("inconsistent model config: {0}")]
    Inconsistent(String),
}

impl ConfigError {
    /// Stable code string for logs, metrics and gRPC details.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } | Self::BadKey { .. } => "model_metadata",
            Self::Architecture { .. } => "model_architecture",
            Self::Unsupported { .. } => "model_unsupported",
            Self::Inconsistent(_) => "model_config",
        }
    }
}

/// The shape of the decoder and its family's switches.
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
    /// RoPE base of full-attention layers (per layer: [`LlamaConfig::layer_attn`]).
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The family's switches (`Arch::default()` is plain Llama).
    pub arch: Arch,
}

impl LlamaConfig {
    /// Number of query heads sharing one key/value head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Attention settings of `layer` (full attention with `rope_theta` when `arch.layers` is empty).
    pub fn layer_attn(&self, layer: usize) -> LayerAttn {
        self.arch.layers.get(layer).copied().unwrap_or(LayerAttn { window: None, rope_theta: self.rope_theta, rope_linear_factor: 1.0 })
    }

    /// Attention score scale (`arch.attn_scale`, else `head_dim^-0.5`).
    pub fn attn_scale(&self) -> f32 {
        if self.arch.attn_scale > 0.0 {
            self.arch.attn_scale
        } else {
            (self.head_dim as f64).powf(-0.5) as f32
        }
    }

    /// Rotated dimensions per head.
    pub fn rotary_dim(&self) -> usize {
        if self.arch.rotary_dim == 0 {
            self.head_dim
        } else {
            self.arch.rotary_dim
        }
    }

    /// Width of q_proj's output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of k_proj's (and v_proj's) output.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
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
        let rot = self.rotary_dim();
        if rot == 0 || !rot.is_multiple_of(2) || rot > self.head_dim {
            return bad(format!("rotary dimension {rot} must be even, non-zero and at most head_dim {}", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab, hidden size and layer count must be non-zero".into());
        }
        if !self.arch.layers.is_empty() && self.arch.layers.len() != self.num_hidden_layers {
            return bad(format!("{} per-layer attention settings for {} layers", self.arch.layers.len(), self.num_hidden_layers));
        }
        if self.arch.layers.iter().any(|l| {
            l.window == Some(0)
                || !l.rope_theta.is_finite()
                || l.rope_theta <= 0.0
                || !l.rope_linear_factor.is_finite()
                || l.rope_linear_factor <= 0.0
        }) {
            return bad("sliding windows, RoPE bases and RoPE factors must be positive".into());
        }
        Ok(())
    }
}
