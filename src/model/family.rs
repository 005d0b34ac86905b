//! Model families and the per-family options of the one shared decoder (`model::llama`).
//!
//! A family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3) is detected from a Hugging Face
//! `config.json` (`model_type` / `architectures`) or a GGUF file (`general.architecture`); its
//! rules become an [`Arch`]: explicit switches (biases, q/k norms, sandwich norms, soft-capping,
//! embedding scale, activation, fused projections) and one [`LayerAttn`] per layer (sliding
//! window, RoPE base and scaling). The forward pass reads only these switches, never the family
//! name. Invariant: an [`Arch`] built by the readers in `hf_config` / `gguf_config` describes every
//! setting that changes the computation; settings the decoder cannot honour are refused there.
use std::fmt;

/// A supported decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    /// Every supported family, in the order error messages list them.
    pub const ALL: [Family; 7] =
        [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma2, Family::Gemma3, Family::Phi3];

    /// The family's name as `config.json`'s `model_type` spells it (`gemma3_text` for Gemma 3).
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    /// The family of a `config.json` `model_type`.
    pub fn from_model_type(t: &str) -> Option<Family> {
        Some(match t {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The family of a `config.json` `architectures` entry (`Qwen2ForCausalLM`, ...).
    pub fn from_hf_class(c: &str) -> Option<Family> {
        Some(match c {
            "LlamaForCausalLM" => Family::Llama,
            "MistralForCausalLM" => Family::Mistral,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen3ForCausalLM" => Family::Qwen3,
            "Gemma2ForCausalLM" => Family::Gemma2,
            "Gemma3ForCausalLM" => Family::Gemma3,
            "Phi3ForCausalLM" => Family::Phi3,
            _ => return None,
        })
    }

    /// The family of a GGUF `general.architecture` (llama.cpp writes Mistral models as `llama`).
    pub fn from_gguf_arch(a: &str) -> Option<Family> {
        Some(match a {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The supported list, for error messages.
    pub fn supported_list() -> String {
        Family::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The MLP's activation, applied to the gate: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (`silu`, `swish`).
    Silu,
    /// The tanh approximation of gelu (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// Exact gelu with erf (`gelu`).
    GeluErf,
}

impl Activation {
    /// Parses a transformers `ACT2FN` name; None for one the decoder does not implement.
    pub fn from_hf_name(name: &str) -> Option<Activation> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            _ => return None,
        })
    }
}

/// Attention settings of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttn {
    /// Sliding window `W`: position `i` attends to `j` with `i - W < j <= i`. None: full causal.
    pub window: Option<usize>,
    /// RoPE base.
    pub rope_theta: f32,
    /// Linear RoPE scaling: positions are divided by this factor (1 = none).
    pub rope_linear_factor: f32,
}

/// The per-family switches of the shared decoder. `Default` is plain Llama.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub family: Family,
    /// q/k/v projections add a bias (Qwen2; Llama / Qwen3 / Gemma with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj adds a bias (`attention_bias` where it covers o_proj).
    pub o_bias: bool,
    /// gate/up/down add a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys over head_dim, before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Added to every stored RMSNorm weight at load: Gemma's Hugging Face checkpoints store `w` and
    /// compute with `1 + w` (1.0); its GGUF files already store `1 + w` (0.0).
    pub norm_weight_offset: f32,
    /// Gemma 2/3: RMSNorms on the attention output and the MLP output before each residual add.
    pub sandwich_norms: bool,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden) in float32).
    pub embed_scale: Option<f32>,
    /// Attention score scale (`head_dim^-0.5`; Gemma: `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f32,
    /// `cap * tanh(score / cap)` on the scaled scores before masking (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `cap * tanh(logit / cap)` on the output logits (Gemma 2).
    pub final_softcap: Option<f32>,
    pub activation: Activation,
    /// Phi-3: one `qkv_proj` (rows `[q | k | v]`) instead of q/k/v.
    pub fused_qkv: bool,
    /// Phi-3: one `gate_up_proj` (rows `[gate | up]`) instead of gate/up.
    pub fused_gate_up: bool,
    /// Rotated dimensions of each head (`head_dim`; Phi-3 `partial_rotary_factor` may make it less).
    /// 0 means the whole head.
    pub rotary_dim: usize,
    /// One entry per layer; empty means every layer is full attention with the config's RoPE base.
    pub layers: Vec<LayerAttn>,
}

impl Default for Arch {
    fn default() -> Self {
        Self {
            family: Family::Llama,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            norm_weight_offset: 0.0,
            sandwich_norms: false,
            embed_scale: None,
            attn_scale: 0.0,
            attn_softcap: None,
            final_softcap: None,
            activation: Activation::Silu,
            fused_qkv: false,
            fused_gate_up: false,
            rotary_dim: 0,
            layers: Vec::new(),
        }
    }
}

/// Which layers slide, from a `layer_types` list (`sliding_attention` / `full_attention`).
pub fn windows_from_layer_types(types: &[String], window: Option<usize>) -> Result<Vec<Option<usize>>, String> {
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => Ok(window),
            other => Err(format!("layer type `{other}` is not supported (only full_attention and sliding_attention)")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_list_is_complete() {
        for f in Family::ALL {
            let mt = if f == Family::Gemma3 { "gemma3_text" } else { f.name() };
            assert_eq!(Family::from_model_type(mt), Some(f));
            assert!(Family::supported_list().contains(f.name()));
        }
        assert_eq!(Family::from_model_type("gpt2"), None);
        assert_eq!(Family::from_gguf_arch("llama"), Some(Family::Llama));
        assert_eq!(Family::from_hf_class("Phi3ForCausalLM"), Some(Family::Phi3));
    }

    #[test]
    fn activations_and_layer_types() {
        assert_eq!(Activation::from_hf_name("gelu_pytorch_tanh"), Some(Activation::GeluTanh));
        assert_eq!(Activation::from_hf_name("gelu"), Some(Activation::GeluErf));
        assert_eq!(Activation::from_hf_name("relu2"), None);
        let t = vec!["sliding_attention".to_string(), "full_attention".to_string()];
        assert_eq!(windows_from_layer_types(&t, Some(8)).unwrap(), vec![Some(8), None]);
        assert!(windows_from_layer_types(&["chunked_attention".to_string()], Some(8)).is_err());
    }
}
