//! modserve: a gRPC inference server for modular deep learning.
//!
//! One frozen Llama-family base model stays resident; every request names its own composition of
//! adapter deltas (LoRA, Poly routing, sparse fine-tunings, merged task vectors), applied to that
//! request's rows only. Layers, in request order: `api` (gRPC) -> `engine` (queue, batching) ->
//! `model` (forward, KV cache, sampling) with `adapters` supplying the deltas. Around them:
//! `config` (serve flags and the config file), `bootstrap` (process setup, model loading), `tools`
//! (the subcommands beside `serve`: bench, loadgen, generate, convert-sft, fetch-model) and `cli`
//! (the command line naming every subcommand).
pub mod adapters;
pub mod api;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod engine;
pub mod kernels;
pub mod model;
pub mod tools;

/// Generated protobuf / gRPC code for `proto/modserve/v1`.
pub mod pb {
    tonic::include_proto!("modserve.v1");
    /// Encoded file descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("modserve_descriptor");
}
