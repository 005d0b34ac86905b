//! The one place where errors become gRPC statuses. Every status carries the error's stable code
//! string in its details (and as the `modserve-error-code` metadata entry).
use tonic::{Code, Status};

use crate::adapters::error::AdapterError;
use crate::engine::error::EngineError;

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
            EngineError::DeadlineExceeded => Code::DeadlineExceeded,
            EngineError::SlowClient => Code::Aborted,
            EngineError::InvalidArgument(_) | EngineError::Limit(_) => Code::InvalidArgument,
            EngineError::Adapter(a) => adapter_code(a),
            EngineError::Internal(_) => Code::Internal,
        };
        status(code, e.code(), e.to_string())
    }
}

impl From<AdapterError> for Status {
    fn from(e: AdapterError) -> Self {
        status(adapter_code(&e), e.code(), e.to_string())
    }
}

/// gRPC code of an adapter error: the caller named something missing (NOT_FOUND), asked for
/// something malformed (INVALID_ARGUMENT), or named a module whose files are broken
/// (FAILED_PRECONDITION: fix the module, not the request).
pub fn adapter_code(e: &AdapterError) -> Code {
    match e {
        AdapterError::UnknownModule(_) | AdapterError::UnknownTask { .. } | AdapterError::Io { .. } => Code::NotFound,
        AdapterError::BadPath { .. } | AdapterError::Composition(_) | AdapterError::WrongKind { .. } | AdapterError::Limit(_) => {
            Code::InvalidArgument
        }
        AdapterError::Malformed { .. }
        | AdapterError::Unsupported { .. }
        | AdapterError::Shape { .. }
        | AdapterError::NonFinite { .. }
        | AdapterError::UnknownTarget { .. }
        | AdapterError::Recipe { .. } => Code::FailedPrecondition,
        AdapterError::Tensor(_) => Code::Internal,
    }
}
