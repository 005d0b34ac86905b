//! The Llama-family decoder on candle: loading (GGUF and Hugging Face directories), the forward
//! pass over batches of sequences at independent positions, the per-sequence KV cache, the
//! tokenizer and chat template, and sampling.
//!
//! Invariant: weights are stored in Hugging Face layout (q/k rows un-permuted from GGUF at load),
//! so adapters written against HF parameter names apply without any permutation.
pub mod attention;
pub mod chat;
pub mod config;
pub mod detok;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod load;
pub mod sampling;
pub mod tokenizer;
