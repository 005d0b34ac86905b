//! Adapter modules: file formats (PEFT LoRA, PEFT Poly, composable-sft sparse diffs, dense task
//! vectors and Fisher files), merges (EWR, task arithmetic, TIES, DARE, Fisher), the registry of
//! module ids under a confined adapter root, the byte-bounded hot cache, and per-request
//! compositions applied to their own rows of a batch.
//!
//! Invariant: everything a format produces is a validated, immutable [`delta::ModuleDeltas`];
//! requests hold `Arc`s to the versions they pinned, so nothing changes under an in-flight request.
pub mod apply;
pub mod cache;
pub mod delta;
pub mod dense;
pub mod error;
pub mod lora;
pub mod merge;
pub mod pickle_guard;
pub mod poly;
pub mod registry;
pub mod sft;
pub mod store;
