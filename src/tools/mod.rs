//! The command-line tools beside `serve`: each subcommand that is not the server lives here, one
//! file or folder per tool (`bench`, `loadgen`, `generate`, `convert-sft`, `fetch-model`), plus the
//! statistics the benchmark and the load generator share and the step phase profile (`profile`).
//!
//! Invariants: the server's layers (`config`, `api`, `engine`, `model`, `adapters`) never depend on
//! a tool; tools use those layers, `bootstrap` and the generated `pb` client. The one edge the
//! other way: `bootstrap` fetches the default model through [`fetch`] when it is missing, so
//! `fetch` uses nothing of the crate but `config`. Tools share code only through [`stats`] and
//! [`fetch`] (where the default model lives).
pub mod bench;
pub mod convert;
pub mod fetch;
pub mod generate;
pub mod loadgen;
pub mod profile;
pub mod stats;
