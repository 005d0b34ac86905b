//! The `modserve` binary: parse the command line, set up logging and threads, dispatch.
use clap::Parser;
use modserve::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::FetchModel(a) => {
            let p = modserve::fetch::fetch_model(&a.models_dir, &mut |m| eprintln!("{m}"))?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Generate(a) => {
            modserve::runtime::set_threads(a.model.threads);
            modserve::generate::request_from_args(&a)?; // validate before loading anything
            let model = modserve::runtime::load_model(&a.model)?;
            let store = modserve::runtime::open_adapter_store(&model, &a.adapters, true)?;
            let out = modserve::generate::run(&model, store.as_ref(), &a)?;
            if a.json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("{}", out.text);
            }
            Ok(())
        }
        Command::Loadgen(a) => modserve::loadgen::run(a),
        Command::Serve(a) => {
            modserve::runtime::set_threads(a.model.threads);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(modserve::api::serve(a))
        }
    }
}
