//! Errors of the adapter layer. Every error names the file (or module id) and the problem, and has
//! a stable code string for gRPC details and metrics labels.
use std::path::PathBuf;

/// Errors while loading, validating, composing or merging adapter modules.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: malformed file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: unsupported: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: tensor `{tensor}` contains {what} values")]
    NonFinite { path: PathBuf, tensor: String, what: &'static str },
    #[error("{path}: `{target}` is not a parameter of the base model")]
    UnknownTarget { path: PathBuf, target: String },
    #[error("module `{0}` is not registered")]
    UnknownModule(String),
    #[error("module `{module}`: unknown task id {task} (the inventory has {n_tasks} tasks)")]
    UnknownTask { module: String, task: i64, n_tasks: usize },
    #[error("module id `{id}` is refused: {reason}")]
    BadPath { id: String, reason: String },
    #[error("module `{module}` is a {kind}, which cannot be used {usage}")]
    WrongKind { module: String, kind: &'static str, usage: &'static str },
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("invalid composition: {0}")]
    Composition(String),
    #[error("merge recipe {path}: {reason}")]
    Recipe { path: PathBuf, reason: String },
    #[error("tensor operation failed: {0}")]
    Tensor(String),
}

impl AdapterError {
    /// Stable code string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "adapter_io",
            Self::Malformed { .. } => "adapter_malformed",
            Self::Unsupported { .. } => "adapter_unsupported",
            Self::Shape { .. } => "adapter_shape",
            Self::NonFinite { .. } => "adapter_non_finite",
            Self::UnknownTarget { .. } => "adapter_unknown_target",
            Self::UnknownModule(_) => "unknown_module",
            Self::UnknownTask { .. } => "unknown_task",
            Self::BadPath { .. } => "adapter_path",
            Self::WrongKind { .. } => "adapter_kind",
            Self::Composition(_) => "invalid_composition",
            Self::Limit(_) => "limit_exceeded",
            Self::Recipe { .. } => "merge_recipe",
            Self::Tensor(_) => "adapter_tensor",
        }
    }

    /// Helper for `map_err` on candle results.
    pub fn tensor(e: candle_core::Error) -> Self {
        Self::Tensor(e.to_string())
    }
}

impl From<candle_core::Error> for AdapterError {
    fn from(e: candle_core::Error) -> Self {
        Self::tensor(e)
    }
}

/// Runs a third-party parser (candle's pickle reader) that may panic on hostile input, turning a
/// panic into `Malformed` for `path` instead of unwinding through the server.
pub fn guard_parser<T>(path: &std::path::Path, what: &str, f: impl FnOnce() -> Result<T, AdapterError>) -> Result<T, AdapterError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(AdapterError::Malformed { path: path.into(), reason: format!("{what}: the parser rejected the input (panic)") }),
    }
}
