//! `modserve loadgen`: (being written)
use clap::Args;

/// Load generator options.
#[derive(Debug, Args)]
pub struct LoadgenArgs {}

/// Runs the load generator.
pub fn run(_args: LoadgenArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
