//! `modserve generate`: one generation in-process, through the same request path the server's
//! model thread uses. Prints the text, or with `--json` one object:
//! `{"prompt_ids":[..],"token_ids":[..],"text":"..","finish_reason":"..","top_logprobs":[[{"id":..,"logprob":..},..],..]}`.
use std::sync::Arc;

use crate::config::GenerateArgs;
use crate::engine::sequence::GenerateSpec;
use crate::engine::worker::{generate_blocking, EngineRequest, PromptInput};
use crate::model::load::LoadedModel;
use crate::model::sampling::{SamplingParams, TokenLogprob};

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
pub struct GenerateOutput {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
}

/// Builds the engine request for the command-line arguments.
pub fn request_from_args(args: &GenerateArgs) -> anyhow::Result<EngineRequest> {
    let prompt = match (&args.prompt, &args.prompt_ids, &args.chat) {
        (Some(p), _, _) => PromptInput::Text(p.clone()),
        (None, Some(ids), _) => PromptInput::TokenIds(ids.clone()),
        (None, None, Some(c)) => PromptInput::ChatUser(c.clone()),
        (None, None, None) => anyhow::bail!("one of --prompt, --prompt-ids, --chat is required"),
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        top_logprobs: args.top_logprobs,
    };
    sampling.validate()?;
    Ok(EngineRequest {
        prompt,
        spec: GenerateSpec { prompt_ids: Vec::new(), max_new_tokens: args.max_new_tokens, min_new_tokens: args.min_new_tokens, stop: args.stop.clone(), sampling },
    })
}

/// Runs the generation described by `args` on `model`.
pub fn run(model: &LoadedModel, args: &GenerateArgs) -> anyhow::Result<GenerateOutput> {
    let req = request_from_args(args)?;
    let tok = model.tokenizer.clone().map(Arc::new);
    let out = generate_blocking(model, tok, model.eos_token_ids.clone().into(), req, args.prefill_chunk)?;
    Ok(GenerateOutput {
        prompt_ids: out.prompt_ids,
        token_ids: out.token_ids,
        text: out.text,
        finish_reason: out.finish_reason.to_string(),
        top_logprobs: out.top_logprobs,
    })
}
