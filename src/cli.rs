//! The `modserve` command line: the top-level [`Cli`] parser and its [`Command`] enum, one variant
//! per subcommand. Each subcommand's options live with its code ([`ServeArgs`] in `config`, the
//! other `*Args` beside their tool under `tools`); this is the one module that names them all,
//! which keeps `config` free of the tools: `cli` -> `tools` -> `config`, and `cli` -> `config`.
//!
//! Invariant: the flags, environment variables, subcommand names and help texts are a public
//! interface (scripts and the deployment depend on them).
use clap::{Parser, Subcommand};

use crate::config::ServeArgs;
use crate::tools::bench::BenchArgs;
use crate::tools::convert::ConvertSftArgs;
use crate::tools::fetch::FetchArgs;
use crate::tools::generate::GenerateArgs;
use crate::tools::loadgen::LoadgenArgs;

/// modserve: one frozen Llama-family base model, many per-request adapter compositions.
#[derive(Debug, Parser)]
#[command(name = "modserve", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download and unpack the default model (SmolLM2-135M-Instruct Q4_1 GGUF) into the models folder.
    FetchModel(FetchArgs),
    /// Generate text in-process (no server).
    Generate(GenerateArgs),
    /// Start the server (gRPC, and the OpenAI HTTP API with --http-listen).
    Serve(Box<ServeArgs>),
    /// Run the in-process benchmark scenarios and print a table.
    Bench(BenchArgs),
    /// Load-test a running server over gRPC and print a JSON report.
    Loadgen(LoadgenArgs),
    /// Convert a composable-sft pytorch_diff.bin to the native sparse format (a module folder).
    ConvertSft(ConvertSftArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::WeightMode;

    #[test]
    fn generate_requires_exactly_one_input() {
        assert!(Cli::try_parse_from(["modserve", "generate"]).is_err());
        assert!(Cli::try_parse_from(["modserve", "generate", "--prompt", "a", "--chat", "b"]).is_err());
        let c = Cli::try_parse_from(["modserve", "generate", "--prompt-ids", "1,2,3", "--weights", "f32"]).unwrap();
        match c.command {
            Command::Generate(g) => {
                assert_eq!(g.prompt_ids, Some(vec![1, 2, 3]));
                assert_eq!(g.model.weights, WeightMode::F32);
            }
            _ => panic!("wrong subcommand"),
        }
    }
}
