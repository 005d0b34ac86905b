//! The decoder on candle for every supported family (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2,
//! Gemma 3, Phi-3): family detection and options, loading (GGUF and Hugging Face directories), the
//! one shared forward pass over batches of sequences at independent positions, the per-sequence
//! KV cache, the tokenizer and chat template, and sampling.
//!
//! Invariant: weights are stored in Hugging Face layout (q/k rows un-permuted from GGUF at load,
//! Phi-3's projections fused as in its checkpoints), so adapters written against a family's HF
//! parameter names apply without any permutation.
/// Enters a phase span of a batch step (see [`PHASE`]); bind the guard for the phase's scope.
macro_rules! phase {
    ($name:literal) => {
        tracing::trace_span!(target: $crate::model::PHASE, $name).entered()
    };
}

pub mod assemble;
pub mod attention;
pub mod chat;
pub mod config;
pub mod detok;
pub mod device_attention;
pub mod family;
pub mod gguf_config;
pub mod hf_config;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod load;
pub mod load_gguf;
pub mod load_hf;
pub mod loaded;
pub mod sampling;
pub mod tokenizer;

/// The `tracing` target of the phase spans of a batch step (trace level; `tools::profile` sums
/// them for `modserve bench --profile`).
pub const PHASE: &str = "modserve::phase";
