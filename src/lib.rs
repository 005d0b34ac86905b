//! modserve: a gRPC inference server for modular deep learning.
//!
//! One frozen Llama-family base model stays resident; every request names its own composition of
//! adapter deltas (LoRA, Poly routing, sparse fine-tunings, merged task vectors), applied to that
//! request's rows only. Layers, in request order: `api` (gRPC) -> `engine` (queue, batching) ->
//! `model` (forward, KV cache, sampling) with `adapters` supplying the deltas.
pub mod adapters;
pub mod api;
pub mod bench;
pub mod bootstrap;
pub mod config;
pub mod convert;
pub mod engine;
pub mod fetch;
pub mod generate;
pub mod loadgen;
pub mod stats;
pub mod model;

/// Generated protobuf / gRPC code for `proto/modserve/v1`.
pub mod pb {
    tonic::include_proto!("modserve.v1");
    /// Encoded file descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("modserve_descriptor");
}
