//! The OpenAI-compatible HTTP API beside gRPC (axum): `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (whole or as server-sent events) and `GET /health`.
//!
//! Invariants: it serves the same engine through the same path as gRPC ([`super::submit`]), with
//! the same bearer tokens, TLS files and limits; every error is a gRPC status first, mapped to an
//! HTTP code by the one table in [`super::status`], and sent in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`, `code` = the stable error code). Requests
//! are refused (503) while the model loads or the server drains, as gRPC calls are.
mod common;
mod openai;
mod respond;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::auth::Scope;
use super::status::stable_code;
use crate::config::SecurityArgs;

pub use common::{bad_request, error_body, ApiError, HttpState};

async fn require_inference(State(st): State<HttpState>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match st.tokens.check_header(header, Scope::Inference) {
        Ok(()) => next.run(req).await,
        Err(s) => ApiError(s).into_response(),
    }
}

/// Readiness: 200 only while the gRPC health reports SERVING (model loaded, not draining, the
/// engine alive).
async fn health(State(st): State<HttpState>) -> Response {
    match st.serving.accepting() {
        Ok(r) if !r.engine.died() => (StatusCode::OK, Json(serde_json::json!({"status": "SERVING"}))).into_response(),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "NOT_SERVING", "reason": "engine_stopped"})))
            .into_response(),
        Err(s) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "NOT_SERVING", "reason": stable_code(&s)}))).into_response()
        }
    }
}

async fn models(State(st): State<HttpState>) -> Result<Json<serde_json::Value>, ApiError> {
    let ready = st.serving.loaded()?;
    let data: Vec<serde_json::Value> = super::submit::catalog(ready)
        .into_iter()
        .map(|e| {
            serde_json::json!({
                "id": e.id, "object": "model", "created": 0, "owned_by": "modserve",
                "modserve": {"kind": e.kind, "detail": e.detail, "missing_modules": e.missing},
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// The router: every `/v1` route needs the `inference` scope; `/health` needs no token (probes).
pub fn router(st: HttpState, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(respond::completions))
        .route("/v1/chat/completions", post(respond::chat_completions))
        .route_layer(axum::middleware::from_fn_with_state(st.clone(), require_inference));
    Router::new().route("/health", get(health)).merge(v1).layer(DefaultBodyLimit::max(max_body_bytes)).with_state(st)
}

/// The rustls server configuration of `--tls-cert`/`--tls-key` (and `--tls-client-ca`).
fn tls_config(sec: &SecurityArgs) -> anyhow::Result<Option<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&sec.tls_cert, &sec.tls_key) else { return Ok(None) };
    let what = |p: &std::path::Path, e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", p.display());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).map_err(|e| what(cert, &e))?.collect::<Result<_, _>>().map_err(|e| what(cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| what(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &sec.tls_client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| what(ca, &e))? {
                roots.add(c.map_err(|e| what(ca, &e))?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(cfg))
}

/// A running HTTP listener.
pub struct HttpServer {
    pub local: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
}

impl HttpServer {
    /// Stops accepting connections; open ones get `grace` to finish.
    pub fn shutdown(&self, grace: Duration) {
        self.handle.graceful_shutdown(Some(grace));
    }
}

/// Binds `addr` and serves the API in the background.
pub async fn start(addr: &str, st: HttpState, sec: &SecurityArgs, max_body_bytes: usize) -> anyhow::Result<HttpServer> {
    let addr: SocketAddr = addr.parse().map_err(|e| anyhow::anyhow!("--http-listen {addr}: {e}"))?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--http-listen {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let app = router(st, max_body_bytes).into_make_service();
    let tls = tls_config(sec)?;
    let secure = tls.is_some();
    match tls {
        Some(cfg) => {
            let cfg = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(cfg));
            let server = axum_server::from_tcp_rustls(listener, cfg)?.handle(handle.clone());
            tokio::spawn(async move {
                if let Err(e) = server.serve(app).await {
                    tracing::error!("HTTP API server failed: {e}");
                }
            });
        }
        None => {
            let server = axum_server::from_tcp(listener)?.handle(handle.clone());
            tokio::spawn(async move {
                if let Err(e) = server.serve(app).await {
                    tracing::error!("HTTP API server failed: {e}");
                }
            });
        }
    }
    tracing::info!(addr = %local, tls = secure, "OpenAI-compatible HTTP API listening");
    // Scripts and tests read this line to learn the port when --http-listen uses port 0.
    println!("modserve http listening on {local}");
    Ok(HttpServer { local, handle })
}
