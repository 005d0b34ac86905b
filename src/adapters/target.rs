//! Where a delta applies: [`Target`] (a linear weight of a layer, the embedding, the untied output
//! head) named as Hugging Face names the parameter, and [`BaseShapes`], the base model's shapes of
//! every adaptable parameter (per family: Phi-3 has `qkv_proj` / `gate_up_proj` instead of q/k/v
//! and gate/up).
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
            Target::Linear(id) => match id.proj {
                Proj::Q | Proj::K | Proj::V if c.arch.fused_qkv => None,
                Proj::Qkv if !c.arch.fused_qkv => None,
                Proj::Gate | Proj::Up if c.arch.fused_gate_up => None,
                Proj::GateUp if !c.arch.fused_gate_up => None,
                Proj::Q => Some((q, h)),
                Proj::K | Proj::V => Some((kv, h)),
                Proj::O => Some((h, q)),
                Proj::Gate | Proj::Up => Some((ff, h)),
                Proj::Down => Some((h, ff)),
                Proj::Qkv => Some((q + 2 * kv, h)),
                Proj::GateUp => Some((2 * ff, h)),
            },
        }
    }

    /// The projections every layer of this model has (`qkv_proj` instead of q/k/v on Phi-3, ...).
    pub fn projections(&self) -> Vec<Proj> {
        Proj::ALL.into_iter().filter(|&p| self.shape(Target::Linear(LinearId { layer: 0, proj: p })).is_some()).collect()
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
        assert_eq!(
            Target::from_hf_name("model.layers.2.mlp.gate_up_proj.weight"),
            Some(Target::Linear(LinearId { layer: 2, proj: Proj::GateUp }))
        );
    }

    #[test]
    fn fused_projections_exist_only_on_fused_models() {
        let json = |t: &str| {
            format!(
                r#"{{"model_type":"{t}","vocab_size":16,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4}}"#
            )
        };
        let base = BaseShapes::new(LlamaConfig::from_hf_json(&json("qwen2")).unwrap());
        assert_eq!(base.projections(), Proj::UNFUSED.to_vec());
        let base = BaseShapes::new(LlamaConfig::from_hf_json(&json("phi3")).unwrap());
        assert_eq!(base.projections(), vec![Proj::O, Proj::Down, Proj::Qkv, Proj::GateUp]);
        assert_eq!(base.shape(Target::Linear(LinearId { layer: 1, proj: Proj::Qkv })), Some((16, 8)));
        assert_eq!(base.shape(Target::Linear(LinearId { layer: 1, proj: Proj::GateUp })), Some((24, 8)));
        assert_eq!(base.shape(Target::Linear(LinearId { layer: 1, proj: Proj::Q })), None);
    }
}
