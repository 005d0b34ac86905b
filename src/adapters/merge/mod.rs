//! Merges: a new module built from existing ones (task vectors, sparse fine-tunings, LoRAs) as
//! described by a JSON recipe (format in docs/ADAPTER_FORMATS.md): Elastic Weight Removal (EWR),
//! task arithmetic, linear averaging, TIES, DARE and Fisher merging, with optional low-rank or
//! top-k compression of the result.
//!
//! Invariants: a recipe's paths are relative to its folder and never leave it (`..`, absolute
//! paths and symbolic links out are refused); every component is validated against the base
//! shapes before any arithmetic; per-element arithmetic runs in f64 in a fixed order, so a merge is
//! deterministic (DARE's RNG is seeded per component and tensor); the output is the exact delta
//! `theta' - theta0` in its cheapest exact form (sparse CSR when under a third of the elements are
//! non-zero, else dense) unless the recipe asks for compression, whose relative Frobenius error
//! is reported. All-zero deltas are omitted.
//!
//! Rooms: [`recipe`] (the JSON recipe, its paths confined to its folder), [`build`] (loading the
//! components and running a merge), [`methods`] (the per-element formulas), [`compress`] (storage
//! of the result).
pub mod build;
pub mod compress;
pub mod methods;
pub mod recipe;

pub use build::{load_delta, merge, CompressionReport, MergeOutcome, MergeReport};
pub use recipe::{load_recipe, Component, Compression, MergeMethod, Recipe};
