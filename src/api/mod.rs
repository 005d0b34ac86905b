//! gRPC front end: `modserve.v1.Inference`, `modserve.v1.Adapters`, `grpc.health.v1.Health`, server
//! reflection, and the Prometheus `/metrics` endpoint; plus the server lifecycle.
//!
//! Lifecycle invariants: the port is bound at once and health reports NOT_SERVING until the model
//! is loaded; on SIGTERM/SIGINT health turns NOT_SERVING, new requests are refused (UNAVAILABLE),
//! in-flight requests finish within `--drain-timeout`, then the process exits 0; a second signal
//! exits at once.
pub mod adapters;
pub mod auth;
pub mod http;
pub mod inference;
pub mod labels;
pub mod state;
pub mod status;
pub mod submit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::adapters::loader::AdapterLimits;
use crate::adapters::registry::detect_kind;
use crate::adapters::store::AdapterStore;
use crate::config::ServeArgs;
use crate::engine::actor::{spawn_engine, EngineConfig};
use crate::engine::prepare::{RequestLimits, TextFrontEnd};
use crate::pb::adapters_server::AdaptersServer;
use crate::pb::inference_server::InferenceServer;
use state::{Ready, ServingState};

/// Service name reported by the health service for the inference API.
pub const INFERENCE_SERVICE: &str = "modserve.v1.Inference";

async fn set_health(h: &HealthReporter, s: ServingStatus) {
    h.set_service_status("", s).await;
    h.set_service_status(INFERENCE_SERVICE, s).await;
}

/// Installs the Prometheus exporter with explicit histogram buckets and serves `/metrics` on `addr`.
pub fn install_metrics(addr: &str) -> anyhow::Result<()> {
    if addr.is_empty() {
        return Ok(());
    }
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let addr: SocketAddr = addr.parse().map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    let latency = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    let rows = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .set_buckets_for_metric(Matcher::Full("modserve_batch_rows".into()), &rows)?
        .install()?;
    tracing::info!(%addr, "metrics on /metrics");
    Ok(())
}

/// The default name of the base model: its file name without `.gguf`, or its folder's name.
pub fn base_model_name(source: &std::path::Path) -> String {
    let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}

/// Registers every module folder found directly under the adapter root, by folder name. Only
/// folders are modules at start: loose files (notes, a stray JSON or safetensors file) are skipped
/// and logged, as are folders whose kind cannot be detected; `Register` may still name a file.
fn register_existing(store: &AdapterStore) {
    let root = store.registry().root().path();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) => return tracing::warn!(root = %root.display(), "adapter root not scanned: {e}"),
    };
    for e in rd.flatten() {
        let (Some(name), path) = (e.file_name().to_str().map(str::to_string), e.path()) else {
            tracing::warn!(entry = ?e.file_name(), "skipped at start: the name is not UTF-8");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if !path.is_dir() {
            tracing::info!(entry = %name, "skipped at start: not a folder (only folders under the adapter root are modules)");
            continue;
        }
        if let Err(e) = detect_kind(&path) {
            tracing::warn!(entry = %name, "skipped at start: {e}");
            continue;
        }
        match store.registry().register(&name, None) {
            Ok(r) => tracing::info!(module = %r.id, kind = r.kind.as_str(), "registered"),
            Err(e) => tracing::warn!(module = %name, "not registered: {e}"),
        }
    }
}

/// Starts the server and runs until drained after SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tokens = match &args.security.auth_tokens_file {
        Some(p) => auth::TokenSet::from_file(p).map_err(|e| anyhow::anyhow!("--auth-tokens-file {e}"))?,
        None => auth::TokenSet::default(),
    };
    if tokens.is_empty() && !args.listen.ip().is_loopback() && !args.security.insecure_allow_anonymous {
        anyhow::bail!(
            "refusing to serve {} without authentication: give --auth-tokens-file, listen on loopback, or pass --insecure-allow-anonymous",
            args.listen
        );
    }
    let http_public = !args.http_listen.is_empty() && args.http_listen.parse::<SocketAddr>().map(|a| !a.ip().is_loopback()).unwrap_or(true);
    if tokens.is_empty() && http_public && !args.security.insecure_allow_anonymous {
        anyhow::bail!(
            "refusing to serve HTTP on {} without authentication: give --auth-tokens-file, listen on loopback, or pass --insecure-allow-anonymous",
            args.http_listen
        );
    }
    install_metrics(&args.metrics_listen)?;
    crate::bootstrap::spawn_memory_trimmer(std::time::Duration::from_secs(30));
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let state = Arc::new(ServingState::default());

    // Load in the background so health answers (NOT_SERVING) meanwhile.
    {
        let (state, health) = (state.clone(), health.clone());
        let model_args = args.model.clone();
        let adapter_args = args.adapters.clone();
        let limits = args.limits.clone();
        let (state_dir, served_name, top_n) = (args.state_dir.clone(), args.served_model_name.clone(), args.metrics_top_modules);
        let cfg = EngineConfig {
            max_queued: args.max_queued,
            max_running: args.max_running,
            max_kv_bytes: crate::bootstrap::kv_budget(args.max_kv_bytes),
            max_batch_tokens: args.max_batch_tokens,
            prefill_chunk: args.prefill_chunk,
            max_decode_stall: crate::engine::actor::decode_stall(args.max_decode_stall_ms),
            stream_buffer: args.stream_buffer,
            slow_client_timeout: Duration::from_secs(args.slow_client_timeout),
        };
        tokio::spawn(async move {
            let t0 = Instant::now();
            let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<Ready> {
                let model = crate::bootstrap::load_model(&model_args)?;
                let store = crate::bootstrap::open_adapter_store(&model, &adapter_args, false)?.map(|s| {
                    Arc::new(
                        s.with_limits(AdapterLimits {
                            max_components: limits.max_components,
                            max_file_bytes: limits.max_adapter_file_bytes,
                            max_rank: limits.max_adapter_rank,
                        })
                        .with_load_slots(limits.max_concurrent_loads, limits.max_waiting_loads),
                    )
                });
                if let Some(s) = &store {
                    register_existing(s);
                }
                let front = Arc::new(TextFrontEnd::from_model(&model).with_limits(RequestLimits {
                    max_prompt_tokens: limits.max_prompt_tokens,
                    max_new_tokens: limits.max_new_tokens_limit,
                    max_stop_strings: limits.max_stop_strings,
                    max_stop_bytes: limits.max_stop_bytes,
                }));
                let book = Arc::new(crate::adapters::named::CompositionBook::open(&state_dir)?);
                tracing::info!(state_dir = %state_dir.display(), compositions = book.list().len(), "saved compositions loaded");
                let base_name = served_name.unwrap_or_else(|| base_model_name(&model.source));
                let engine = spawn_engine(model.llama.clone(), front.clone(), cfg)?;
                Ok(Ready { engine, front, store, book, base_name, labels: Arc::new(labels::LabelBudget::new(top_n)) })
            })
            .await;
            match loaded {
                Ok(Ok(ready)) => {
                    metrics::gauge!("modserve_model_load_seconds").set(t0.elapsed().as_secs_f64());
                    let engine = ready.engine.clone();
                    let watch_health = health.clone();
                    // If the engine thread dies, nothing can serve: say so, let the in-flight
                    // requests' UNAVAILABLE errors go out, and exit non-zero (Kubernetes restarts).
                    tokio::spawn(async move {
                        engine.ended().await;
                        if engine.died() {
                            set_health(&watch_health, ServingStatus::NotServing).await;
                            tracing::error!("the engine thread died: exiting with status 70");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            std::process::exit(70);
                        }
                    });
                    state.set_ready(ready);
                    if !state.is_draining() {
                        set_health(&health, ServingStatus::Serving).await;
                    }
                    tracing::info!(secs = t0.elapsed().as_secs_f64(), "model ready: serving");
                }
                Ok(Err(e)) => {
                    tracing::error!("model failed to load: {e:#}");
                    std::process::exit(1);
                }
                Err(e) => {
                    tracing::error!("model loading panicked: {e}");
                    std::process::exit(1);
                }
            }
        });
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Older clients (grpcurl before 1.8.8, grpcio-reflection's descriptor database) speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening");
    // Scripts and tests read this line to learn the port when --listen uses port 0.
    println!("modserve listening on {local}");

    let http = if args.http_listen.is_empty() {
        None
    } else {
        let st = http::HttpState { serving: state.clone(), tokens: tokens.clone() };
        Some(http::start(&args.http_listen, st, &args.security, args.limits.max_request_bytes).await?)
    };

    let drain_timeout = Duration::from_secs(args.drain_timeout);
    let shutdown = {
        let (state, health) = (state.clone(), health.clone());
        async move {
            shutdown_signal().await;
            tracing::info!(timeout_s = drain_timeout.as_secs(), "draining");
            state.start_draining();
            set_health(&health, ServingStatus::NotServing).await;
            // A second signal exits at once.
            tokio::spawn(async {
                shutdown_signal().await;
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            });
            let deadline = Instant::now() + drain_timeout;
            while Instant::now() < deadline {
                let busy = state.ready().map(|r| r.engine.running() + r.engine.queued()).unwrap_or(0);
                if busy == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!("drained");
            if let Some(h) = &http {
                h.shutdown(Duration::from_secs(1));
            }
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.security.tls_cert, &args.security.tls_key) {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |p: &std::path::PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &args.security.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(tls)?;
        tracing::info!(mutual = args.security.tls_client_ca.is_some(), "TLS enabled");
    }
    let max_bytes = args.limits.max_request_bytes;
    let inference = InferenceServer::new(inference::InferenceApi::new(state.clone(), tokens.clone())).max_decoding_message_size(max_bytes);
    let admin = AdaptersServer::new(adapters::AdaptersApi::new(state.clone(), tokens)).max_decoding_message_size(max_bytes);
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(admin)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown);
    server.await?;
    tracing::info!("server stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
