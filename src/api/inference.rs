//! The `modserve.v1.Inference` service: validates requests, converts them to engine requests and
//! results back to protobuf. No model work happens here.
use tonic::{Code, Request, Response, Status};

use super::status::status;
use crate::adapters::poly::Routing;
use crate::adapters::store::{CompositionSpec, DeltaRef};
use crate::engine::sequence::GenerateSpec;
use crate::engine::worker::{EngineHandle, EngineRequest, PromptInput};
use crate::model::sampling::SamplingParams;
use crate::pb;

/// Default `max_new_tokens` when the request leaves it at 0.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// Service implementation.
pub struct InferenceApi {
    engine: EngineHandle,
}

impl InferenceApi {
    pub fn new(engine: EngineHandle) -> Self {
        Self { engine }
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    status(Code::InvalidArgument, "invalid_argument", msg)
}

/// Converts a protobuf request into an engine request, validating sampling parameters.
pub fn to_engine_request(r: pb::GenerateRequest) -> Result<EngineRequest, Status> {
    let prompt = match r.prompt {
        Some(pb::generate_request::Prompt::Text(t)) => PromptInput::Text(t),
        Some(pb::generate_request::Prompt::TokenIds(ids)) => PromptInput::TokenIds(ids.ids),
        Some(pb::generate_request::Prompt::ChatUser(u)) => PromptInput::ChatUser(u),
        None => return Err(invalid("a prompt is required (text, token_ids or chat_user)")),
    };
    let sampling = SamplingParams {
        temperature: r.temperature,
        top_k: r.top_k as usize,
        top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
        seed: r.seed,
        top_logprobs: r.top_logprobs as usize,
    };
    sampling.validate().map_err(|e| invalid(e.to_string()))?;
    let composition = CompositionSpec {
        deltas: r.deltas.into_iter().map(|d| DeltaRef { id: d.module_id, scale: d.scale }).collect(),
        route: match r.route {
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
    };
    let max_new_tokens = if r.max_new_tokens == 0 { DEFAULT_MAX_NEW_TOKENS } else { r.max_new_tokens as usize };
    Ok(EngineRequest {
        prompt,
        spec: GenerateSpec {
            prompt_ids: Vec::new(),
            max_new_tokens,
            min_new_tokens: r.min_new_tokens as usize,
            stop: r.stop,
            sampling,
        },
        composition,
    })
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceApi {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let req = to_engine_request(request.into_inner())?;
        let out = self.engine.generate(req).await?;
        Ok(Response::new(pb::GenerateResponse {
            text: out.text,
            token_ids: out.token_ids,
            finish_reason: out.finish_reason.to_string(),
            prompt_tokens: out.prompt_ids.len() as u32,
            top_logprobs: out
                .top_logprobs
                .into_iter()
                .map(|v| pb::TopLogprobs {
                    entries: v.into_iter().map(|t| pb::TokenLogprob { id: t.id, logprob: t.logprob }).collect(),
                })
                .collect(),
        }))
    }
}
