//! What loading produces and how it fails: [`LoadedModel`] (the decoder with its text front
//! end), [`LoadOptions`] and [`LoadError`], shared by the Hugging Face and GGUF loaders.
//!
//! Invariant: every load error names the file it concerns and has a stable code.
use std::path::PathBuf;

use candle_core::Device;

use super::chat::ChatTemplate;
use super::config::ConfigError;
use super::linear::WeightMode;
use super::llama::Llama;

/// Errors raised while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Candle {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

impl LoadError {
    /// Stable code string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "model_io",
            Self::Format { .. } | Self::MissingTensor { .. } | Self::Shape { .. } => "model_format",
            Self::Config { source, .. } => source.code(),
            Self::Tokenizer { .. } => "model_tokenizer",
            Self::Candle { .. } => "model_tensor",
        }
    }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub weights: WeightMode,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { weights: WeightMode::Quantized, device: Device::Cpu }
    }
}

/// A loaded model with its text front end.
pub struct LoadedModel {
    pub llama: std::sync::Arc<Llama>,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<std::sync::Arc<ChatTemplate>>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    pub source: PathBuf,
}
