//! The engine's errors, each with a stable code string (the gRPC status mapping lives in
//! `api::status`, the one table of codes).
use crate::adapters::error::AdapterError;

/// Errors the engine reports to callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the model is not loaded yet, or the server is shutting down")]
    NotReady,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("KV memory budget exceeded: {0}")]
    KvBudget(String),
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    #[error("the client stopped reading the stream")]
    SlowClient,
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the engine stopped (the server is exiting): retry on another replica")]
    Stopped,
}

impl EngineError {
    /// Stable code string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::QueueFull(_) => "queue_full",
            Self::NotReady => "not_ready",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Limit(_) => "limit_exceeded",
            Self::KvBudget(_) => "kv_budget_exceeded",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::SlowClient => "slow_client",
            Self::Adapter(e) => e.code(),
            Self::Internal(_) => "internal",
            Self::Stopped => "engine_stopped",
        }
    }
}
