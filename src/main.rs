//! The `modserve` binary: read the config file (serve), parse the command line, set up logging and
//! threads, dispatch. Fatal errors print one line and exit 1.
use clap::{CommandFactory, FromArgMatches};
use modserve::cli::{Cli, Command};
use modserve::config::{apply_config_file, config_path, effective_config, LogFormat};

fn main() -> std::process::ExitCode {
    modserve::bootstrap::keep_freed_memory();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let is_serve = argv.get(1).is_some_and(|a| a == "serve");
    let from_file = match config_path(&argv).filter(|_| is_serve) {
        Some(p) => match apply_config_file(&p) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => Vec::new(),
    };
    let matches = Cli::command().get_matches_from(&argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.log_format == LogFormat::Json);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let profile = matches!(&cli.command, Command::Bench(a) if a.profile);
    if profile {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
        tracing_subscriber::registry().with(fmt).with(modserve::tools::profile::global().layer()).init();
    } else if json_logs {
        tracing_subscriber::fmt().json().with_current_span(true).with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    if let Command::Serve(a) = &cli.command {
        if a.print_config {
            print!("{}", effective_config(&matches, &from_file));
            return std::process::ExitCode::SUCCESS;
        }
    }
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
            let p = modserve::tools::fetch::fetch_model(&a.models_dir, &mut |m| eprintln!("{m}"))?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Generate(a) => {
            modserve::bootstrap::set_threads(a.model.threads);
            modserve::tools::generate::request_from_args(&a)?; // validate before loading anything
            let model = modserve::bootstrap::load_model(&a.model)?;
            let store = modserve::bootstrap::open_adapter_store(&model, &a.adapters, true)?;
            let out = modserve::tools::generate::run(&model, store.as_ref(), &a)?;
            if a.json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("{}", out.text);
            }
            Ok(())
        }
        Command::Loadgen(a) => modserve::tools::loadgen::run(a),
        Command::ConvertSft(a) => {
            let (path, s) = modserve::tools::convert::run(&a)?;
            println!("wrote {}: {} parameters, {} non-zeros", path.display(), s.params, s.nnz);
            Ok(())
        }
        Command::Bench(a) => modserve::tools::bench::run(a),
        Command::Serve(a) => {
            modserve::bootstrap::set_threads(a.model.threads);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(modserve::api::serve(*a))
        }
    }
}
