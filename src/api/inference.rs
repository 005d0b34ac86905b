//! The `modserve.v1.Inference` service: converts protobuf requests into engine requests (deadline
//! from `grpc-timeout`), prepares them off the async threads (tokenization and adapter loading),
//! submits them, and streams engine events back as chunks. Dropping the response stream (client
//! cancel or disconnect) drops the event receiver, which the engine sees and frees the sequence.
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::auth::{Scope, TokenSet};
use super::state::ServingState;
use super::status::status;
use super::submit::{self, combine, resolve_model, UsageLabels};
use crate::adapters::composition::{CompositionSpec, DeltaRef};
use crate::adapters::formats::poly::Routing;
use crate::engine::actor::{EventResult, FinishInfo, StreamEvent};
use crate::engine::error::EngineError;
use crate::engine::output::Collected;
use crate::engine::prepare::{EngineRequest, PromptInput};
use crate::engine::sequence::GenerateSpec;
use crate::model::chat::ChatMessage;
use crate::model::sampling::{SamplingParams, TokenLogprob};
use crate::pb;

/// Default `max_new_tokens` when the request leaves it at 0.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// Service implementation.
pub struct InferenceApi {
    state: Arc<ServingState>,
    tokens: TokenSet,
}

impl InferenceApi {
    pub fn new(state: Arc<ServingState>, tokens: TokenSet) -> Self {
        Self { state, tokens }
    }

    /// Resolves the request's `model`, prepares and submits it; returns its events and the labels
    /// its metrics are counted under.
    async fn start(&self, metadata: &MetadataMap, mut r: pb::GenerateRequest) -> Result<(Receiver<EventResult>, UsageLabels), Status> {
        let ready = self.state.accepting()?;
        let model = std::mem::take(&mut r.model);
        let mut req = to_engine_request(r, grpc_deadline(metadata))?;
        let resolved = resolve_model(ready, &model)?;
        req.composition = combine(resolved.spec.clone(), std::mem::take(&mut req.composition))?;
        let labels = UsageLabels::new(ready, &resolved, &req.composition);
        Ok((submit::start(&self.state, req).await?, labels))
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    status(Code::InvalidArgument, "invalid_argument", msg)
}

/// Parses the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`) into a deadline.
pub fn grpc_deadline(md: &MetadataMap) -> Option<Instant> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

/// Converts a protobuf request into an engine request, validating what needs no model.
pub fn to_engine_request(r: pb::GenerateRequest, deadline: Option<Instant>) -> Result<EngineRequest, Status> {
    use pb::generate_request::Prompt;
    let prompt = match r.prompt {
        Some(Prompt::Text(t)) => PromptInput::Text(t),
        Some(Prompt::TokenIds(ids)) => PromptInput::TokenIds(ids.ids),
        Some(Prompt::ChatUser(u)) => PromptInput::ChatUser(u),
        Some(Prompt::Chat(c)) => {
            if c.messages.is_empty() {
                return Err(invalid("chat needs at least one message"));
            }
            PromptInput::Chat(c.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect())
        }
        None => return Err(invalid("a prompt is required (text, token_ids, chat_user or chat)")),
    };
    let sampling = SamplingParams {
        temperature: r.temperature,
        top_k: r.top_k as usize,
        top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
        seed: r.seed,
        top_logprobs: r.top_logprobs as usize,
    };
    sampling.validate().map_err(|e| invalid(e.to_string()))?;
    let composition = spec_from_pb(r.deltas, r.route)?;
    let max_new_tokens = if r.max_new_tokens == 0 { DEFAULT_MAX_NEW_TOKENS } else { r.max_new_tokens as usize };
    Ok(EngineRequest {
        prompt,
        spec: GenerateSpec { prompt_ids: Vec::new(), max_new_tokens, min_new_tokens: r.min_new_tokens as usize, stop: r.stop, sampling },
        composition,
        deadline,
        request_id: if r.request_id.is_empty() { uuid_like() } else { r.request_id },
    })
}

/// A composition from its protobuf parts (a scale of 0 reads as 1 unless `scale_is_set`).
pub fn spec_from_pb(deltas: Vec<pb::DeltaRef>, route: Option<pb::PolyRoute>) -> Result<CompositionSpec, Status> {
    Ok(CompositionSpec {
        deltas: deltas
            .into_iter()
            .map(|d| DeltaRef { scale: if d.scale == 0.0 && !d.scale_is_set { 1.0 } else { d.scale }, id: d.module_id })
            .collect(),
        route: match route {
            None => None,
            Some(pb::PolyRoute { inventory_id, routing }) => Some((
                inventory_id,
                match routing {
                    Some(pb::poly_route::Routing::TaskId(t)) => Routing::Task(t),
                    Some(pb::poly_route::Routing::Weights(w)) => Routing::Weights(w.values),
                    None => return Err(invalid("route needs a task_id or weights")),
                },
            )),
        },
    })
}

/// The protobuf parts of a composition.
pub fn spec_to_pb(spec: &CompositionSpec) -> (Vec<pb::DeltaRef>, Option<pb::PolyRoute>) {
    let deltas = spec.deltas.iter().map(|d| pb::DeltaRef { module_id: d.id.clone(), scale: d.scale, scale_is_set: true }).collect();
    let route = spec.route.as_ref().map(|(inv, r)| pb::PolyRoute {
        inventory_id: inv.clone(),
        routing: Some(match r {
            Routing::Task(t) => pb::poly_route::Routing::TaskId(*t),
            Routing::Weights(w) => pb::poly_route::Routing::Weights(pb::RoutingWeights { values: w.clone() }),
        }),
    });
    (deltas, route)
}

fn uuid_like() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

fn top(v: Vec<TokenLogprob>) -> pb::TopLogprobs {
    pb::TopLogprobs { entries: v.into_iter().map(|t| pb::TokenLogprob { id: t.id, logprob: t.logprob }).collect() }
}

fn usage_timings(f: &FinishInfo) -> (pb::Usage, pb::Timings) {
    (
        pb::Usage { prompt_tokens: f.prompt_tokens as u32, generated_tokens: f.generated_tokens as u32 },
        pb::Timings { queue_seconds: f.queue_s, ttft_seconds: f.ttft_s, total_seconds: f.total_s },
    )
}

fn to_chunk(ev: StreamEvent, labels: &UsageLabels) -> pb::GenerateChunk {
    match ev {
        StreamEvent::Token { token, top: t, text } => pb::GenerateChunk {
            text,
            token_ids: vec![token.id],
            logprobs: vec![token.logprob],
            top_logprobs: if t.is_empty() { vec![] } else { vec![top(t)] },
            ..Default::default()
        },
        StreamEvent::Finished(f) => {
            let (usage, timings) = usage_timings(&f);
            metrics::counter!("modserve_requests_total", "code" => "ok").increment(1);
            labels.record(&f);
            pb::GenerateChunk { finish_reason: f.reason.as_str().into(), usage: Some(usage), timings: Some(timings), ..Default::default() }
        }
    }
}

fn count_error(s: Status) -> Status {
    metrics::counter!("modserve_requests_total", "code" => format!("{:?}", s.code())).increment(1);
    s
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceApi {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        self.tokens.check(&request, Scope::Inference).map_err(count_error)?;
        let (md, _, r) = request.into_parts();
        let (rx, labels) = self.start(&md, r).await.map_err(count_error)?;
        let engine = self.state.ready().map(|r| r.engine.clone());
        let out = Collected::collect(rx).await.map_err(|e| count_error(engine_end(engine.as_ref(), e).into()))?;
        let f = out.finish.expect("collect() guarantees a finish");
        metrics::counter!("modserve_requests_total", "code" => "ok").increment(1);
        labels.record(&f);
        let (usage, timings) = usage_timings(&f);
        Ok(Response::new(pb::GenerateResponse {
            text: out.text,
            token_ids: out.token_ids,
            finish_reason: f.reason.as_str().into(),
            prompt_tokens: f.prompt_tokens as u32,
            top_logprobs: out.top_logprobs.into_iter().filter(|t| !t.is_empty()).map(top).collect(),
            logprobs: out.logprobs,
            usage: Some(usage),
            timings: Some(timings),
        }))
    }

    type GenerateStreamStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send + 'static>>;

    async fn generate_stream(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStreamStream>, Status> {
        self.tokens.check(&request, Scope::Inference).map_err(count_error)?;
        let (md, _, r) = request.into_parts();
        let (rx, labels) = self.start(&md, r).await.map_err(count_error)?;
        let engine = self.state.ready().map(|r| r.engine.clone());
        let stream = FinishGuard::new(rx, engine).map(move |ev| ev.map(|ev| to_chunk(ev, &labels)).map_err(|e| count_error(e.into())));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The error of a stream the engine closed without a final event: the engine died (UNAVAILABLE,
/// whatever the stream buffer held), or else the request was dropped as a slow client.
pub fn engine_end(engine: Option<&crate::engine::actor::EngineHandle>, e: EngineError) -> EngineError {
    match e {
        EngineError::SlowClient if engine.is_some_and(|h| h.died()) => EngineError::Stopped,
        e => e,
    }
}

/// Ends a stream with an error when the engine closed it without a final event (the request was
/// dropped as a slow client, or the engine died), instead of a silent, successful-looking end.
pub struct FinishGuard {
    inner: tokio_stream::wrappers::ReceiverStream<EventResult>,
    /// A final event or an error went out.
    ended: bool,
    engine: Option<crate::engine::actor::EngineHandle>,
}

impl FinishGuard {
    pub fn new(rx: Receiver<EventResult>, engine: Option<crate::engine::actor::EngineHandle>) -> Self {
        Self { inner: tokio_stream::wrappers::ReceiverStream::new(rx), ended: false, engine }
    }
}

impl Stream for FinishGuard {
    type Item = EventResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<EventResult>> {
        use std::task::Poll;
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(ev)) => {
                if matches!(ev, Ok(StreamEvent::Finished(_)) | Err(_)) {
                    self.ended = true;
                }
                Poll::Ready(Some(ev))
            }
            Poll::Ready(None) if !self.ended => {
                self.ended = true;
                Poll::Ready(Some(Err(engine_end(self.engine.as_ref(), EngineError::SlowClient))))
            }
            other => other,
        }
    }
}
