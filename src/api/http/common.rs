//! What the HTTP handlers share: their state, and the error type that renders a gRPC status in
//! OpenAI's error shape with the HTTP code of the one error table ([`crate::api::status`]).
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tonic::Status;

use crate::api::auth::TokenSet;
use crate::api::state::ServingState;
use crate::api::status::{http_status, stable_code};

/// What every handler shares.
#[derive(Clone)]
pub struct HttpState {
    pub serving: Arc<ServingState>,
    pub tokens: TokenSet,
}

/// An error on its way out: a gRPC status, rendered as OpenAI's error JSON.
pub struct ApiError(pub Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        Self(s)
    }
}

impl From<crate::adapters::error::AdapterError> for ApiError {
    fn from(e: crate::adapters::error::AdapterError) -> Self {
        Self(e.into())
    }
}

/// OpenAI's error body for a status.
pub fn error_body(s: &Status) -> serde_json::Value {
    let (_, kind) = http_status(s.code());
    serde_json::json!({"error": {"message": s.message(), "type": kind, "param": null, "code": stable_code(s)}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, _) = http_status(self.0.code());
        metrics::counter!("modserve_http_requests_total", "status" => code.to_string()).increment(1);
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(error_body(&self.0))).into_response()
    }
}

/// A 400 with the stable code `invalid_argument` (or `unsupported_field`).
pub fn bad_request(stable: &str, msg: impl Into<String>) -> ApiError {
    ApiError(crate::api::status::status(tonic::Code::InvalidArgument, stable, msg))
}
