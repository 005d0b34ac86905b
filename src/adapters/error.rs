//! Errors of the adapter layer. Every error names the file (or module id) and the problem, and has
//! a stable code string for gRPC details and metrics labels.
//!
//! Invariant: strings a caller supplied (module ids, paths) are echoed through [`clip`], so a
//! message stays small whatever the input (gRPC clients refuse status metadata over 16 KB).
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Longest echo of one caller-supplied string in an error message, in bytes.
pub const ECHO_BYTES: usize = 256;

/// `s` cut to [`ECHO_BYTES`] (at a character boundary) and marked as cut, or `s` itself.
pub fn clip(s: &str) -> Cow<'_, str> {
    clip_to(s, ECHO_BYTES)
}

/// `s` cut to at most `max` bytes (at a character boundary) and marked as cut, or `s` itself.
pub fn clip_to(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...[{} more bytes cut]", &s[..end], s.len() - end))
}

/// A path for an error message, clipped like [`clip`].
pub fn clip_path(p: &Path) -> String {
    clip(&p.to_string_lossy()).into_owned()
}

/// Errors while loading, validating, composing or merging adapter modules.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    /// A file or folder that does not exist (NOT_FOUND).
    #[error("{}: {reason}", clip_path(path))]
    Io { path: PathBuf, reason: String },
    /// A file that exists but could not be read (permissions, a symlink loop, an I/O error):
    /// the server's failure, not the caller's (INTERNAL).
    #[error("{}: {reason}", clip_path(path))]
    Unreadable { path: PathBuf, reason: String },
    #[error("{}: malformed file: {reason}", clip_path(path))]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: unsupported: {reason}", clip_path(path))]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: tensor `{}` has shape {got:?}, expected {expected:?}", clip_path(path), clip(tensor))]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{}: tensor `{}` contains {what} values", clip_path(path), clip(tensor))]
    NonFinite { path: PathBuf, tensor: String, what: &'static str },
    #[error("{}: `{}` is not a parameter of the base model", clip_path(path), clip(target))]
    UnknownTarget { path: PathBuf, target: String },
    #[error("module `{}` is not registered", clip(.0))]
    UnknownModule(String),
    #[error("composition `{}` is not saved", clip(.0))]
    UnknownComposition(String),
    /// A request's `model` names nothing the server has.
    #[error("model `{}` is neither the base model, a registered module, a saved composition nor a composition expression (`a+b@0.5+inv#task=1`)", clip(.0))]
    UnknownModel(String),
    /// The server's own state (saved compositions) could not be read or written (INTERNAL).
    #[error("server state {}: {reason}", clip_path(path))]
    State { path: PathBuf, reason: String },
    #[error("module `{}`: unknown task id {task} (the inventory has {n_tasks} tasks)", clip(module))]
    UnknownTask { module: String, task: i64, n_tasks: usize },
    #[error("module id `{}` is refused: {reason}", clip(id))]
    BadPath { id: String, reason: String },
    #[error("module `{}` is a {kind}, which cannot be used {usage}", clip(module))]
    WrongKind { module: String, kind: &'static str, usage: &'static str },
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("too many module loads at once: {0}")]
    Busy(String),
    #[error("invalid composition: {0}")]
    Composition(String),
    #[error("merge recipe {}: {reason}", clip_path(path))]
    Recipe { path: PathBuf, reason: String },
    #[error("tensor operation failed: {0}")]
    Tensor(String),
}

impl AdapterError {
    /// Stable code string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "adapter_io",
            Self::Unreadable { .. } => "adapter_unreadable",
            Self::Malformed { .. } => "adapter_malformed",
            Self::Unsupported { .. } => "adapter_unsupported",
            Self::Shape { .. } => "adapter_shape",
            Self::NonFinite { .. } => "adapter_non_finite",
            Self::UnknownTarget { .. } => "adapter_unknown_target",
            Self::UnknownModule(_) => "unknown_module",
            Self::UnknownComposition(_) => "unknown_composition",
            Self::UnknownModel(_) => "model_not_found",
            Self::State { .. } => "state_io",
            Self::UnknownTask { .. } => "unknown_task",
            Self::BadPath { .. } => "adapter_path",
            Self::WrongKind { .. } => "adapter_kind",
            Self::Composition(_) => "invalid_composition",
            Self::Limit(_) => "limit_exceeded",
            Self::Busy(_) => "adapter_load_busy",
            Self::Recipe { .. } => "merge_recipe",
            Self::Tensor(_) => "adapter_tensor",
        }
    }

    /// An I/O error on `path`: `Io` (NOT_FOUND) when the path does not exist, `Unreadable`
    /// (INTERNAL) for every other failure.
    pub fn io(path: &Path, what: &str, e: std::io::Error) -> Self {
        use std::io::ErrorKind::{NotADirectory, NotFound};
        let reason = format!("{what}: {e}");
        match e.kind() {
            NotFound | NotADirectory => Self::Io { path: path.into(), reason },
            _ => Self::Unreadable { path: path.into(), reason },
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
