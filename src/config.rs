//! Server configuration: the `serve` options (one clap derive; every serve flag is also an
//! environment variable `MODSERVE_*`), the options shared by everything that loads the model or
//! adapters ([`ModelArgs`], [`AdapterArgs`]), the TOML config file (precedence file < env <
//! flags, and `--print-config`) and device parsing.
//!
//! Invariants: values are validated here, before any model is loaded, and errors name the
//! offending flag. This module depends on no tool and not on the command line (`cli`): the
//! config file's keys and their variables come from [`ServeArgs`] itself.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::Args;

use crate::model::linear::WeightMode;

/// Default models folder (relative to the working directory, overridable by `MODSERVE_MODELS_DIR`).
pub const DEFAULT_MODELS_DIR: &str = "models";

/// Options shared by everything that loads the model.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory. Default: the fetched SmolLM2 in the
    /// models folder (fetched on first use).
    #[arg(long, env = "MODSERVE_MODEL")]
    pub model: Option<PathBuf>,
    /// Models folder used when --model is not given.
    #[arg(long, env = "MODSERVE_MODELS_DIR", default_value = DEFAULT_MODELS_DIR)]
    pub models_dir: PathBuf,
    /// Keep weights quantized (fast) or dequantize every tensor to float32 (reference parity).
    #[arg(long, env = "MODSERVE_WEIGHTS", default_value = "quantized",
          value_parser = clap::builder::EnumValueParser::<WeightsArg>::new().map(WeightMode::from))]
    pub weights: WeightMode,
    /// `cpu` or `cuda:N` (needs the `cuda` cargo feature).
    #[arg(long, env = "MODSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute threads (default: all cores).
    #[arg(long, env = "MODSERVE_THREADS")]
    pub threads: Option<usize>,
}

/// `--weights` as the command line spells it (the model layer's [`WeightMode`] knows nothing of
/// clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsArg {
    /// Keep GGUF block-quantized weights and multiply with candle's quantized kernels.
    Quantized,
    /// Dequantize every tensor to float32 (the mode that matches the parity kit).
    F32,
    /// Hold both: quantized blocks for steps of few rows (memory-bound matrix-vector products),
    /// float32 for larger batch steps (compute-bound GEMMs). About 5x the memory of `quantized`.
    Auto,
}

impl From<WeightsArg> for WeightMode {
    fn from(a: WeightsArg) -> Self {
        match a {
            WeightsArg::Quantized => WeightMode::Quantized,
            WeightsArg::F32 => WeightMode::F32,
            WeightsArg::Auto => WeightMode::Auto,
        }
    }
}

/// Where adapter modules live and how much of them stays resident.
#[derive(Debug, Args, Clone)]
pub struct AdapterArgs {
    /// Folder holding adapter modules; module ids are paths inside it (nothing outside is reachable).
    #[arg(long, env = "MODSERVE_ADAPTER_ROOT")]
    pub adapter_root: Option<PathBuf>,
    /// Byte budget of the hot adapter cache.
    #[arg(long, env = "MODSERVE_ADAPTER_CACHE_BYTES", default_value_t = 1 << 30)]
    pub adapter_cache_bytes: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file: keys are the flag names (`max_running = 32`); precedence file < env < flags.
    #[arg(long, env = "MODSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (and where each value came from) and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// gRPC listen address.
    #[arg(long, env = "MODSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// OpenAI-compatible HTTP API listen address (`/v1/models`, `/v1/completions`,
    /// `/v1/chat/completions`, `/health`), with the same tokens, TLS and limits as gRPC; empty
    /// (the default) to disable.
    #[arg(long, env = "MODSERVE_HTTP_LISTEN", default_value = "")]
    pub http_listen: String,
    /// Folder of the server's own durable state (saved compositions); created when missing.
    #[arg(long, env = "MODSERVE_STATE_DIR", default_value = "state")]
    pub state_dir: PathBuf,
    /// The base model's name in requests and listings (`model`); default: the model file's name
    /// without `.gguf` (or the model folder's name). `base` always works as well.
    #[arg(long, env = "MODSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Per-module metrics: how many distinct module ids (and, separately, composition names) get
    /// their own label value; the first ones seen keep it, later ones count under `other`.
    #[arg(long, env = "MODSERVE_METRICS_TOP_MODULES", default_value_t = 32)]
    pub metrics_top_modules: usize,
    /// Prometheus `/metrics` listen address (HTTP); empty to disable.
    #[arg(long, env = "MODSERVE_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: String,
    /// Largest number of requests waiting for a running slot (more are RESOURCE_EXHAUSTED).
    #[arg(long, env = "MODSERVE_MAX_QUEUED", default_value_t = 256)]
    pub max_queued: usize,
    /// Largest number of sequences generating at once.
    #[arg(long, env = "MODSERVE_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// KV-cache memory of all running sequences, in bytes: a request is admitted only when its
    /// KV (prompt + max_new_tokens positions) fits beside the others', and waits in the queue
    /// otherwise; one that alone needs more is RESOURCE_EXHAUSTED. 0 = a quarter of the
    /// container's memory limit (cgroup), or of the machine's memory.
    #[arg(long, env = "MODSERVE_MAX_KV_BYTES", default_value_t = 0)]
    pub max_kv_bytes: u64,
    /// Largest number of token rows in one batch step (decode tokens + prefill chunks).
    #[arg(long, env = "MODSERVE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Largest prefill chunk of one prompt per step.
    #[arg(long, env = "MODSERVE_PREFILL_CHUNK", default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Stall-free batching: while sequences decode, a step takes only as many prefill rows as
    /// add at most this many milliseconds to it (sized from measured step costs, planned at 80%
    /// of it; at least one row, so prompts always progress). Bounds the inter-token stall of
    /// decoding streams when long prompts arrive, at the cost of their TTFT. 0 = off (full
    /// prefill chunks).
    #[arg(long, env = "MODSERVE_MAX_DECODE_STALL_MS", default_value_t = crate::engine::actor::DEFAULT_MAX_DECODE_STALL_MS)]
    pub max_decode_stall_ms: u64,
    /// Generated tokens buffered per stream before its sequence pauses for a slow reader.
    #[arg(long, env = "MODSERVE_STREAM_BUFFER", default_value_t = 64)]
    pub stream_buffer: usize,
    /// Seconds a stream may stay unread (buffer full) before the request is dropped.
    #[arg(long, env = "MODSERVE_SLOW_CLIENT_TIMEOUT", default_value_t = 30)]
    pub slow_client_timeout: u64,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, env = "MODSERVE_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Log format.
    #[arg(long, env = "MODSERVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Errors in the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path}: unknown key `{key}` (known: {known})")]
    UnknownKey { path: PathBuf, key: String, known: String },
    #[error("config file {path}: key `{key}` must be a string, number or boolean")]
    BadValue { path: PathBuf, key: String },
}

/// The config file named by `--config FILE` / `--config=FILE` in `argv`, else `$MODSERVE_CONFIG`.
pub fn config_path(argv: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("MODSERVE_CONFIG").map(PathBuf::from)
}

/// Environment variable names of the `serve` flags, by config key (`max_running` -> `MODSERVE_MAX_RUNNING`).
fn serve_env_keys() -> Vec<(String, String)> {
    let serve = ServeArgs::augment_args(clap::Command::new("serve"));
    serve
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| (a.get_id().as_str().to_string(), e.to_string_lossy().into_owned())))
        .filter(|(id, _)| id != "config")
        .collect()
}

/// Reads the TOML config file and exports each key as its `MODSERVE_*` variable unless the
/// environment already sets it, so clap applies file < env < flags. Returns the variables set.
pub fn apply_config_file(path: &std::path::Path) -> Result<Vec<String>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read { path: path.into(), reason: e.to_string() })?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigFileError::Read { path: path.into(), reason: e.to_string() })?;
    let keys = serve_env_keys();
    let mut set = Vec::new();
    for (key, value) in table {
        let norm = key.replace('-', "_");
        let Some((_, env)) = keys.iter().find(|(id, _)| *id == norm) else {
            let known = keys.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ");
            return Err(ConfigFileError::UnknownKey { path: path.into(), key, known });
        };
        let v = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err(ConfigFileError::BadValue { path: path.into(), key }),
        };
        if std::env::var_os(env).is_none() {
            // Single-threaded start-up: no other thread reads the environment yet.
            std::env::set_var(env, v);
            set.push(env.clone());
        }
    }
    Ok(set)
}

/// The effective `serve` configuration as TOML, each line annotated with its source.
pub fn effective_config(matches: &clap::ArgMatches, from_file: &[String]) -> String {
    use clap::parser::ValueSource;
    let Some(m) = matches.subcommand_matches("serve") else { return String::new() };
    let mut out = String::new();
    for (id, env) in serve_env_keys() {
        let Some(vals) = m.get_raw(&id) else { continue };
        let v: Vec<String> = vals.map(|v| v.to_string_lossy().into_owned()).collect();
        let source = match m.value_source(&id) {
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) if from_file.contains(&env) => "file",
            Some(ValueSource::EnvVariable) => "env",
            _ => "default",
        };
        out.push_str(&format!("{id} = {:?}  # {source} ({env})\n", v.join(",")));
    }
    out
}

/// Authentication and TLS.
#[derive(Debug, Args, Clone)]
pub struct SecurityArgs {
    /// Bearer tokens, one per line: `TOKEN SCOPE[,SCOPE]` (scopes: inference, admin); `#` comments.
    #[arg(long, env = "MODSERVE_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Serve without tokens on a non-loopback address (everyone gets every scope).
    #[arg(long, env = "MODSERVE_INSECURE_ALLOW_ANONYMOUS")]
    pub insecure_allow_anonymous: bool,
    /// TLS certificate chain (PEM); enables TLS together with --tls-key.
    #[arg(long, env = "MODSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "MODSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to (mutual TLS).
    #[arg(long, env = "MODSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Per-request and per-module limits; exceeding one is INVALID_ARGUMENT naming the limit.
#[derive(Debug, Args, Clone)]
pub struct LimitArgs {
    #[arg(long, env = "MODSERVE_MAX_PROMPT_TOKENS", default_value_t = 4096)]
    pub max_prompt_tokens: usize,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "MODSERVE_MAX_NEW_TOKENS_LIMIT", default_value_t = 2048)]
    pub max_new_tokens_limit: usize,
    #[arg(long, env = "MODSERVE_MAX_STOP_STRINGS", default_value_t = 8)]
    pub max_stop_strings: usize,
    #[arg(long, env = "MODSERVE_MAX_STOP_BYTES", default_value_t = 256)]
    pub max_stop_bytes: usize,
    /// Largest encoded request message.
    #[arg(long, env = "MODSERVE_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub max_request_bytes: usize,
    /// Largest number of components (deltas + route) in one composition.
    #[arg(long, env = "MODSERVE_MAX_COMPONENTS", default_value_t = 16)]
    pub max_components: usize,
    /// Largest total file size of one adapter module.
    #[arg(long, env = "MODSERVE_MAX_ADAPTER_FILE_BYTES", default_value_t = 2 << 30)]
    pub max_adapter_file_bytes: u64,
    /// Largest LoRA / Poly rank.
    #[arg(long, env = "MODSERVE_MAX_ADAPTER_RANK", default_value_t = 256)]
    pub max_adapter_rank: usize,
    /// Cold module loads, merges and Poly mixtures running at once (a cache hit takes no slot).
    #[arg(long, env = "MODSERVE_MAX_CONCURRENT_LOADS", default_value_t = crate::adapters::gate::DEFAULT_LOAD_SLOTS)]
    pub max_concurrent_loads: usize,
    /// Requests waiting for a load slot (each within its deadline); beyond this a request that
    /// needs a cold load is RESOURCE_EXHAUSTED (`adapter_load_busy`).
    #[arg(long, env = "MODSERVE_MAX_WAITING_LOADS", default_value_t = crate::adapters::gate::DEFAULT_LOAD_WAITERS)]
    pub max_waiting_loads: usize,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `cpu` / `cuda` / `cuda:N` into a candle device.
pub fn parse_device(s: &str) -> anyhow::Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => anyhow::bail!("--device: expected `cpu` or `cuda:N`, got `{other}`"),
        },
    }
}

fn cuda(n: usize) -> anyhow::Result<candle_core::Device> {
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("--device cuda:{n}: this binary was built without the `cuda` feature (cargo build --features cuda)");
    }
    Ok(candle_core::Device::new_cuda(n)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_from_argv() {
        let a: Vec<std::ffi::OsString> = ["modserve", "serve", "--config", "x.toml"].iter().map(Into::into).collect();
        assert_eq!(config_path(&a), Some(PathBuf::from("x.toml")));
        let a: Vec<std::ffi::OsString> = ["modserve", "serve", "--config=y.toml"].iter().map(Into::into).collect();
        assert_eq!(config_path(&a), Some(PathBuf::from("y.toml")));
    }

    #[test]
    fn device_parsing() {
        assert!(matches!(parse_device("cpu").unwrap(), candle_core::Device::Cpu));
        assert!(parse_device("gpu").unwrap_err().to_string().contains("--device"));
    }
}
