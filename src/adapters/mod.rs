//! Adapter modules, from files on disk to the deltas a batch step applies.
//!
//! Rooms, in the order a module travels through them:
//! - [`registry`]: module ids under a confined adapter root, with kind detection;
//! - [`source`]: a module's files, their fingerprint, and the one read that hashes and keeps them;
//! - [`formats`]: PEFT LoRA and Poly, composable-sft and native sparse diffs, task vectors and
//!   Fisher files, each parsed into the data model;
//! - [`merge`]: recipes (EWR, task arithmetic, linear, TIES, DARE, Fisher) built into one module;
//! - [`loader`]: the kind dispatch, limits and confinement of one load, and Poly mixtures;
//! - [`cache`]: the byte-bounded hot cache of loaded versions;
//! - [`gate`]: the bound on concurrent loads, merges and mixtures;
//! - [`store`]: resolves a request's [`composition`] into pinned deltas;
//! - [`batch`]: applies every chunk's composition to its own rows inside a batch step.
//!
//! The data model is [`target`] (where a delta applies) and [`module_deltas`] (what it adds).
//!
//! Invariant: everything a format produces is a validated, immutable
//! [`module_deltas::ModuleDeltas`]; requests hold `Arc`s to the versions they pinned, so nothing
//! changes under an in-flight request.
pub mod batch;
pub mod cache;
pub mod composition;
pub mod error;
pub mod formats;
pub mod gate;
pub mod loader;
pub mod merge;
pub mod module_deltas;
pub mod named;
pub mod registry;
pub mod source;
pub mod store;
pub mod target;
#[cfg(test)]
pub(crate) mod testing;
