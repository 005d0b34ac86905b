//! The generation engine: request preparation, its errors, sequences, the batching policy, batch steps and
//! the actor thread that owns the KV caches. Invariant: only the engine thread mutates KV caches
//! and sequence state; everything reaching it is already validated.
pub mod actor;
pub mod awake;
pub mod config;
pub mod error;
pub mod faults;
pub mod output;
pub mod prepare;
pub mod scheduler;
pub mod sequence;
pub mod step;
