//! Request preparation, on the way into the engine: prompt forms, the text front end that turns
//! them into token ids, and composition resolution (which pins adapter versions).
//!
//! Invariant: a [`PreparedRequest`] is fully validated (non-empty prompt of in-vocabulary ids that
//! fits the context, valid sampling parameters, resolved and pinned composition), so the model
//! thread never does I/O or validation work that could fail for a client mistake.
use std::sync::Arc;
use std::time::Instant;

use super::error::EngineError;
use super::sequence::GenerateSpec;
use crate::adapters::composition::{Composition, CompositionSpec};
use crate::adapters::store::AdapterStore;
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::load::LoadedModel;

/// The prompt of a request, before tokenization.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
    ChatUser(String),
    Chat(Vec<ChatMessage>),
}

/// A generation request as clients describe it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: PromptInput,
    /// Everything but the prompt ids, which preparation fills in.
    pub spec: GenerateSpec,
    /// Adapter deltas for this request alone.
    pub composition: CompositionSpec,
    pub deadline: Option<Instant>,
    pub request_id: String,
}

/// A validated request, ready for the engine queue.
pub struct PreparedRequest {
    pub spec: GenerateSpec,
    pub composition: Option<Arc<Composition>>,
    pub deadline: Option<Instant>,
    pub request_id: String,
    pub received_at: Instant,
}

/// Per-request limits (exceeding one is INVALID_ARGUMENT, code `limit_exceeded`).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_prompt_tokens: 4096, max_new_tokens: 2048, max_stop_strings: 8, max_stop_bytes: 256 }
    }
}

/// Tokenizer, chat template and limits: what turns prompts into ids.
pub struct TextFrontEnd {
    pub limits: RequestLimits,
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub eos: Arc<[u32]>,
    pub vocab_size: usize,
    pub max_context: usize,
}

impl TextFrontEnd {
    pub fn from_model(m: &LoadedModel) -> Self {
        Self {
            tokenizer: m.tokenizer.clone().map(Arc::new),
            chat_template: m.chat_template.clone(),
            eos: m.eos_token_ids.clone().into(),
            vocab_size: m.llama.cfg.vocab_size,
            max_context: m.llama.cfg.max_position_embeddings,
            limits: RequestLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Token ids of a prompt.
    pub fn tokenize(&self, prompt: &PromptInput) -> Result<Vec<u32>, EngineError> {
        let text = match prompt {
            PromptInput::TokenIds(ids) => return Ok(ids.clone()),
            PromptInput::Text(t) => t.clone(),
            PromptInput::ChatUser(u) => self.render(&[ChatMessage { role: "user".into(), content: u.clone() }])?,
            PromptInput::Chat(m) => self.render(m)?,
        };
        let tok =
            self.tokenizer.as_ref().ok_or_else(|| EngineError::InvalidArgument("the model has no tokenizer; send token ids".into()))?;
        let enc = tok.encode(text.as_str(), false).map_err(|e| EngineError::InvalidArgument(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let tpl = self.chat_template.as_ref().ok_or_else(|| EngineError::InvalidArgument("the model has no chat template".into()))?;
        tpl.render(messages, true).map_err(|e| EngineError::InvalidArgument(format!("chat template: {e}")))
    }

    /// Validates a request, tokenizes it and resolves (pins) its composition. May load adapter
    /// modules: call it off the model thread.
    pub fn prepare(&self, store: Option<&AdapterStore>, req: EngineRequest) -> Result<PreparedRequest, EngineError> {
        let received_at = Instant::now();
        req.spec.sampling.validate().map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        let l = &self.limits;
        if req.spec.max_new_tokens > l.max_new_tokens {
            return Err(EngineError::Limit(format!(
                "max_new_tokens {} exceeds max_new_tokens_limit {}",
                req.spec.max_new_tokens, l.max_new_tokens
            )));
        }
        if req.spec.stop.len() > l.max_stop_strings {
            return Err(EngineError::Limit(format!("{} stop strings exceed max_stop_strings {}", req.spec.stop.len(), l.max_stop_strings)));
        }
        if let Some(s) = req.spec.stop.iter().find(|s| s.len() > l.max_stop_bytes) {
            return Err(EngineError::Limit(format!("a stop string of {} bytes exceeds max_stop_bytes {}", s.len(), l.max_stop_bytes)));
        }
        if req.spec.stop.iter().any(|s| s.is_empty()) {
            return Err(EngineError::InvalidArgument("stop strings must not be empty".into()));
        }
        if let PromptInput::Text(t) | PromptInput::ChatUser(t) = &req.prompt {
            // Cheap guard before tokenizing: a token covers at least one byte.
            if t.len() > l.max_prompt_tokens.saturating_mul(64) {
                return Err(EngineError::Limit(format!("a prompt of {} bytes exceeds max_prompt_tokens {}", t.len(), l.max_prompt_tokens)));
            }
        }
        let ids = self.tokenize(&req.prompt)?;
        if ids.len() > l.max_prompt_tokens {
            return Err(EngineError::Limit(format!("the prompt has {} tokens; max_prompt_tokens is {}", ids.len(), l.max_prompt_tokens)));
        }
        if ids.is_empty() {
            return Err(EngineError::InvalidArgument("the prompt is empty".into()));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::InvalidArgument(format!("token id {bad} is outside the vocabulary of {}", self.vocab_size)));
        }
        if ids.len() >= self.max_context {
            return Err(EngineError::InvalidArgument(format!("the prompt has {} tokens; the context is {}", ids.len(), self.max_context)));
        }
        let composition = if req.composition.is_empty() {
            None
        } else {
            let store = store
                .ok_or_else(|| EngineError::InvalidArgument("this server has no adapter root; compositions are unavailable".into()))?;
            Some(Arc::new(store.resolve_by(&req.composition, req.deadline)?))
        };
        let mut spec = req.spec;
        spec.prompt_ids = ids;
        Ok(PreparedRequest { spec, composition, deadline: req.deadline, request_id: req.request_id, received_at })
    }
}
