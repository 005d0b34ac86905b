//! The one place where errors become gRPC statuses. Every status carries the error's stable code
//! string in its details (and as the `modserve-error-code` metadata entry).
use tonic::{Code, Status};

use crate::engine::worker::EngineError;

/// Builds a status whose details hold the stable `code`.
pub fn status(code: Code, stable: &str, message: impl Into<String>) -> Status {
    let mut s = Status::with_details(code, message.into(), stable.as_bytes().to_vec().into());
    if let Ok(v) = stable.parse() {
        s.metadata_mut().insert("modserve-error-code", v);
    }
    s
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::QueueFull(_) => Code::ResourceExhausted,
            EngineError::NotReady => Code::Unavailable,
            EngineError::InvalidArgument(_) => Code::InvalidArgument,
            EngineError::Internal(_) => Code::Internal,
        };
        status(code, e.code(), e.to_string())
    }
}
