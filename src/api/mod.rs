//! gRPC front end: the `Inference` service, `grpc.health.v1.Health` and server reflection.
//!
//! Invariants: health reports NOT_SERVING until the model thread has loaded the model; requests
//! reach the model only through the bounded channel of [`crate::engine::worker`], so a full queue is
//! RESOURCE_EXHAUSTED rather than unbounded memory.
pub mod inference;
pub mod status;

use crate::config::ServeArgs;
use crate::engine::worker::{spawn_worker, WorkerConfig};
use crate::pb::inference_server::InferenceServer;

/// Service name reported by the health service for the inference API.
pub const INFERENCE_SERVICE: &str = "modserve.v1.Inference";

/// Starts the server and runs until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    health_reporter.set_service_status(INFERENCE_SERVICE, tonic_health::ServingStatus::NotServing).await;

    let model_args = args.model.clone();
    let adapter_args = args.adapters.clone();
    let (handle, ready) = spawn_worker(
        WorkerConfig { max_queued: args.max_queued, prefill_chunk: 512 },
        // Until the Adapters service lands, module ids resolve as paths under the adapter root.
        move || crate::runtime::build_context(&model_args, &adapter_args, true),
    )?;
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        match ready.await {
            Ok(Ok(())) => {
                reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
                reporter.set_service_status(INFERENCE_SERVICE, tonic_health::ServingStatus::Serving).await;
                tracing::info!("model ready: serving");
            }
            Ok(Err(e)) => tracing::error!("model failed to load: {e}"),
            Err(_) => tracing::error!("model thread ended before loading"),
        }
    });

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(inference::InferenceApi::new(handle)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown_signal())
        .await?;
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
    tracing::info!("shutdown signal received");
}
