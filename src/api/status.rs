//! The one place where errors become gRPC statuses. Every status carries the error's stable code
//! string in its details (and as the `modserve-error-code` metadata entry).
//!
//! Invariant: a status message is at most [`MAX_MESSAGE_BYTES`] (cut and marked beyond), whatever
//! the caller sent: grpcio refuses status metadata over 16 KB, and the client would then lose the
//! code and the stable error code with it.
use tonic::{Code, Status};

use crate::adapters::error::AdapterError;
use crate::engine::error::EngineError;

/// Longest status message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Builds a status whose details hold the stable `code`.
pub fn status(code: Code, stable: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let message = crate::adapters::error::clip_to(&message, MAX_MESSAGE_BYTES).into_owned();
    let mut s = Status::with_details(code, message, stable.as_bytes().to_vec().into());
    if let Ok(v) = stable.parse() {
        s.metadata_mut().insert("modserve-error-code", v);
    }
    s
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::QueueFull(_) | EngineError::KvBudget(_) => Code::ResourceExhausted,
            EngineError::NotReady | EngineError::Stopped => Code::Unavailable,
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
        AdapterError::UnknownModule(_)
        | AdapterError::UnknownComposition(_)
        | AdapterError::UnknownModel(_)
        | AdapterError::UnknownTask { .. }
        | AdapterError::Io { .. } => Code::NotFound,
        AdapterError::BadPath { .. } | AdapterError::Composition(_) | AdapterError::WrongKind { .. } | AdapterError::Limit(_) => {
            Code::InvalidArgument
        }
        AdapterError::Malformed { .. }
        | AdapterError::Unsupported { .. }
        | AdapterError::Shape { .. }
        | AdapterError::NonFinite { .. }
        | AdapterError::UnknownTarget { .. }
        | AdapterError::Recipe { .. } => Code::FailedPrecondition,
        AdapterError::Tensor(_) | AdapterError::Unreadable { .. } | AdapterError::State { .. } => Code::Internal,
        AdapterError::Busy(_) => Code::ResourceExhausted,
    }
}

/// The HTTP status of a gRPC code (the OpenAI-compatible API answers with these), and the
/// OpenAI error `type` that goes with it.
pub fn http_status(code: Code) -> (u16, &'static str) {
    match code {
        Code::Ok => (200, ""),
        Code::InvalidArgument | Code::OutOfRange => (400, "invalid_request_error"),
        Code::Unauthenticated => (401, "authentication_error"),
        Code::PermissionDenied => (403, "permission_error"),
        Code::NotFound => (404, "not_found_error"),
        Code::AlreadyExists | Code::Aborted => (409, "conflict_error"),
        Code::FailedPrecondition => (422, "invalid_request_error"),
        Code::ResourceExhausted => (429, "rate_limit_error"),
        Code::Cancelled => (499, "cancelled"),
        Code::Unimplemented => (501, "server_error"),
        Code::Unavailable => (503, "server_error"),
        Code::DeadlineExceeded => (504, "timeout_error"),
        Code::Internal | Code::Unknown | Code::DataLoss => (500, "server_error"),
    }
}

/// The stable error code a status carries (`internal` when it has none).
pub fn stable_code(s: &Status) -> String {
    s.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or("internal").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 100 KB unknown module id, register path or evicted id comes back cut, with its code.
    #[test]
    fn long_user_strings_are_cut_in_statuses() {
        let long = "m".repeat(100_000);
        for (e, code) in [
            (AdapterError::UnknownModule(long.clone()), Code::NotFound),
            (AdapterError::BadPath { id: long.clone(), reason: "module ids are 1 to 256 bytes".into() }, Code::InvalidArgument),
            (AdapterError::Io { path: long.clone().into(), reason: format!("module `{long}` not found") }, Code::NotFound),
        ] {
            let stable = e.code();
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(s.message().len() <= MAX_MESSAGE_BYTES + 64, "{} bytes", s.message().len());
            assert!(s.message().contains("bytes cut]"), "{}", &s.message()[..100]);
            assert_eq!(s.metadata().get("modserve-error-code").unwrap().to_str().unwrap(), stable);
        }
        let s = status(Code::Internal, "internal", "x".repeat(50_000));
        assert!(s.message().len() <= MAX_MESSAGE_BYTES + 64);
        // Short messages are untouched, multi-byte characters are cut at a boundary.
        assert_eq!(status(Code::Internal, "internal", "short").message(), "short");
        let s = status(Code::Internal, "internal", "é".repeat(5000));
        assert!(s.message().starts_with("éé"));
    }
}
