//! The model thread: the only owner of the model and the KV caches. Requests arrive through a
//! bounded channel (admission control) and are answered through oneshot channels.
//!
//! Invariants: the model is never shared (`Send` to this thread only, no locks); a full queue is
//! reported to the caller immediately instead of growing memory; a request whose caller has gone
//! away is skipped. (Continuous batching across requests replaces the one-at-a-time loop with the
//! API/engine issue.)
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::sequence::{GenerateSpec, Sequence};
use super::step::run_to_completion;
use crate::adapters::error::AdapterError;
use crate::adapters::store::{AdapterStore, CompositionSpec};
use crate::model::chat::ChatMessage;
use crate::model::kv_cache::SeqKvCache;
use crate::model::load::LoadedModel;
use crate::model::sampling::TokenLogprob;

/// Everything the model thread owns: the model, its text front end and the adapter store.
pub struct EngineContext {
    pub model: LoadedModel,
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    pub eos: Arc<[u32]>,
    pub adapters: Option<AdapterStore>,
}

impl EngineContext {
    pub fn new(model: LoadedModel, adapters: Option<AdapterStore>) -> Self {
        let tokenizer = model.tokenizer.clone().map(Arc::new);
        let eos = model.eos_token_ids.clone().into();
        Self { model, tokenizer, eos, adapters }
    }
}

/// The prompt of a request, before tokenization.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
    ChatUser(String),
}

/// A generation request as the engine sees it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: PromptInput,
    /// Everything but the prompt ids, which the engine fills in.
    pub spec: GenerateSpec,
    /// Adapter deltas for this request alone.
    pub composition: CompositionSpec,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct EngineResponse {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: &'static str,
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
}

/// Errors the engine reports to callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the model is not loaded yet or has stopped")]
    NotReady,
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Stable code string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::QueueFull(_) => "queue_full",
            Self::NotReady => "not_ready",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Adapter(e) => e.code(),
            Self::Internal(_) => "internal",
        }
    }
}

type Job = (EngineRequest, oneshot::Sender<Result<EngineResponse, EngineError>>);

/// Sizing of the worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub max_queued: usize,
    pub prefill_chunk: usize,
}

/// Cloneable handle to the model thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    max_queued: usize,
}

impl EngineHandle {
    /// Submits a request and waits for its result.
    pub async fn generate(&self, req: EngineRequest) -> Result<EngineResponse, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send((req, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::QueueFull(self.max_queued),
            mpsc::error::TrySendError::Closed(_) => EngineError::NotReady,
        })?;
        rx.await.map_err(|_| EngineError::NotReady)?
    }
}

/// Starts the model thread. `load` runs on that thread; the returned receiver resolves once the
/// model is ready (or failed to load).
pub fn spawn_worker<F>(
    cfg: WorkerConfig,
    load: F,
) -> std::io::Result<(EngineHandle, oneshot::Receiver<Result<(), String>>)>
where
    F: FnOnce() -> anyhow::Result<EngineContext> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Job>(cfg.max_queued.max(1));
    let (ready_tx, ready_rx) = oneshot::channel();
    let prefill_chunk = cfg.prefill_chunk;
    std::thread::Builder::new().name("modserve-model".into()).spawn(move || {
        let ctx = match load() {
            Ok(c) => {
                let _ = ready_tx.send(Ok(()));
                c
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("{e:#}")));
                return;
            }
        };
        while let Some((req, reply)) = rx.blocking_recv() {
            if reply.is_closed() {
                continue;
            }
            let out = generate_blocking(&ctx, req, prefill_chunk);
            let _ = reply.send(out);
        }
    })?;
    Ok((EngineHandle { tx, max_queued: cfg.max_queued }, ready_rx))
}

/// Tokenizes a prompt input with the model's tokenizer and chat template.
pub fn tokenize_prompt(model: &LoadedModel, prompt: &PromptInput) -> Result<Vec<u32>, EngineError> {
    let text = match prompt {
        PromptInput::TokenIds(ids) => return Ok(ids.clone()),
        PromptInput::Text(t) => t.clone(),
        PromptInput::ChatUser(u) => {
            let tpl = model
                .chat_template
                .as_ref()
                .ok_or_else(|| EngineError::InvalidArgument("the model has no chat template".into()))?;
            tpl.render(&[ChatMessage { role: "user".into(), content: u.clone() }], true)
                .map_err(|e| EngineError::InvalidArgument(format!("chat template: {e}")))?
        }
    };
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or_else(|| EngineError::InvalidArgument("the model has no tokenizer; send token ids".into()))?;
    let enc = tok.encode(text.as_str(), false).map_err(|e| EngineError::InvalidArgument(format!("tokenizer: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Runs one request to completion on the calling thread (the model thread, or the CLI).
pub fn generate_blocking(ctx: &EngineContext, req: EngineRequest, prefill_chunk: usize) -> Result<EngineResponse, EngineError> {
    let model = &ctx.model;
    let cfg = &model.llama.cfg;
    let composition = if req.composition.is_empty() {
        None
    } else {
        let store = ctx.adapters.as_ref().ok_or_else(|| {
            EngineError::InvalidArgument("this server has no adapter root; compositions are unavailable".into())
        })?;
        Some(Arc::new(store.resolve(&req.composition)?))
    };
    let prompt_ids = tokenize_prompt(model, &req.prompt)?;
    if prompt_ids.is_empty() {
        return Err(EngineError::InvalidArgument("the prompt is empty".into()));
    }
    if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(EngineError::InvalidArgument(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
    }
    if prompt_ids.len() >= cfg.max_position_embeddings {
        return Err(EngineError::InvalidArgument(format!(
            "the prompt has {} tokens; the context is {}",
            prompt_ids.len(),
            cfg.max_position_embeddings
        )));
    }
    let mut spec = req.spec;
    spec.prompt_ids = prompt_ids.clone();
    let capacity = (prompt_ids.len() + spec.max_new_tokens).min(cfg.max_position_embeddings);
    let cache = SeqKvCache::new(cfg, capacity, model.llama.device()).map_err(|e| EngineError::Internal(e.to_string()))?;
    let mut seq = Sequence::new(spec, cache, ctx.tokenizer.clone(), ctx.eos.clone())
        .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
    seq.composition = composition;
    run_to_completion(&model.llama, &mut [&mut seq], prefill_chunk)
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(EngineResponse {
        prompt_ids,
        token_ids: seq.generated.clone(),
        text: seq.text().to_string(),
        finish_reason: seq.finished().map(|f| f.as_str()).unwrap_or("length"),
        top_logprobs: seq.top_logprobs.clone(),
    })
}
