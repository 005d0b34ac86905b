//! The generation engine: sequences, batch steps and (with the API issue) the scheduler actor that
//! owns the model. Invariant: only the engine mutates KV caches and sequence state.
pub mod sequence;
pub mod step;
pub mod worker;
