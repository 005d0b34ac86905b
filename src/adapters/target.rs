//! Where a delta applies: [`Target`] (a linear weight of a layer, the embedding, the untied output
//! head) named as Hugging Face names the parameter, and [`BaseShapes`], the base model's shapes of
//! every adaptable parameter.
//!
//! Invariant: [`Target::from_hf_name`] and [`Target::hf_name`] round-trip, and a target the base
//! model lacks has no shape (every format checks its tensors against [`BaseShapes::shape`]).
use crate::model::config::LlamaConfig;
use crate::model::linear::{LinearId, Proj};

/// Where a delta applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Linear(LinearId),
    /// `model.embed_tokens.weight` `[vocab, hidden]` (also the output head when tied).
    Embedding,
    /// `lm_head.weight` of an untied model.
    LmHead,
}

impl Target {
    /// Parses a Hugging Face parameter name (`model.layers.3.mlp.up_proj.weight`, ...), accepting
    /// PEFT's `base_model.model.` prefix.
    pub fn from_hf_name(name: &str) -> Option<Target> {
        let name = name.strip_prefix("base_model.model.").unwrap_or(name);
        match name {
            "model.embed_tokens.weight" => return Some(Target::Embedding),
            "lm_head.weight" => return Some(Target::LmHead),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let rest = rest.strip_suffix(".weight")?;
        let (parent, proj) = rest.split_once('.')?;
        let proj = Proj::from_hf_name(proj)?;
        (proj.hf_parent() == parent).then_some(Target::Linear(LinearId { layer, proj }))
    }

    /// The Hugging Face parameter name.
    pub fn hf_name(&self) -> String {
        match self {
            Target::Linear(id) => id.hf_weight_name(),
            Target::Embedding => "model.embed_tokens.weight".into(),
            Target::LmHead => "lm_head.weight".into(),
        }
    }
}

/// The shapes of the base model's adaptable parameters.
#[derive(Debug, Clone)]
pub struct BaseShapes {
    pub cfg: LlamaConfig,
}

impl BaseShapes {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg }
    }

    /// `(rows, cols)` of the parameter, or None if the model has no such parameter.
    pub fn shape(&self, t: Target) -> Option<(usize, usize)> {
        let c = &self.cfg;
        let (h, q, kv, ff) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
        match t {
            Target::Embedding => Some((c.vocab_size, h)),
            Target::LmHead => (!c.tie_word_embeddings).then_some((c.vocab_size, h)),
            Target::Linear(id) if id.layer >= c.num_hidden_layers => None,
            Target::Linear(id) => Some(match id.proj {
                Proj::Q => (q, h),
                Proj::K | Proj::V => (kv, h),
                Proj::O => (h, q),
                Proj::Gate | Proj::Up => (ff, h),
                Proj::Down => (h, ff),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_round_trip() {
        for n in ["model.layers.12.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"] {
            assert_eq!(Target::from_hf_name(n).unwrap().hf_name(), n);
        }
        assert_eq!(
            Target::from_hf_name("base_model.model.model.layers.1.self_attn.q_proj.weight"),
            Some(Target::Linear(LinearId { layer: 1, proj: Proj::Q }))
        );
        assert_eq!(Target::from_hf_name("model.layers.1.mlp.q_proj.weight"), None);
        assert_eq!(Target::from_hf_name("model.layers.1.self_attn.rotary.weight"), None);
    }
}
